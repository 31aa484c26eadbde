"""Tests of jaxdp_study.report: summary.csv, Table 1, figures, and the `report` mode of launch/sweep.py."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import re
import shutil
from pathlib import Path

import matplotlib.text
import numpy as np
import pytest
from scipy import special
from test_sweep import PRIVACY_NOTE, FakeTrain, load_cli, small_sweep

from jaxdp import audit, runlog
from jaxdp_study import grid, launchers, report
from jaxdp_study.paper import paper_results
from jaxdp_study.workdir import find_run_dirs, runs_by_name

FIGURES = {"fig1_accuracy_vs_imbalance.png", "fig2_accuracy_vs_clip.png", "fig3_training_by_privacy.png",
           "fig4_training_by_imbalance.png", "fig5_fairness_gaps_vs_imbalance.png",
           "fig6_clipping_per_group.png"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep")
    launchers.run_sweep(small_sweep(), wd, train_fn=FakeTrain())
    report.write_report(wd, verbose=False)
    return wd


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_summary_has_one_row_per_run_with_hand_checkable_numbers(workdir):
    rows = _rows(workdir / "summary.csv")
    assert len(rows) == 10
    assert [r["run"] for r in rows[:4]] == ["high-ff0.7-clip5-seed0", "high-ff0.9-clip5-seed0",
                                             "high-ff0.99-clip5-seed0", "medium-ff0.7-clip1-seed0"]
    r = {row["run"]: row for row in rows}["high-ff0.9-clip5-seed0"]
    # FakeTrain: female 67 + 2 = 69%, male 67 - 3 - 60 * (0.9 - 0.7) = 52%; 540 / 60 test images.
    assert float(r["accuracy_0"]) == 69.0 and float(r["accuracy_1"]) == pytest.approx(52.0)
    assert float(r["accuracy"]) == pytest.approx((69 * 540 + 52 * 60) / 600)
    assert float(r["delta_accuracy"]) == pytest.approx(17.0)
    assert (r["privacy_level"], r["noise_multiplier"], r["l2_clip_norm"], r["female_fraction"]) == \
        ("high", "1.5", "5.0", "0.9")
    assert float(r["epsilon_pld"]) == pytest.approx(2 / 1.5) and float(r["epsilon_rdp_classic"]) == \
        pytest.approx(2 / 1.5 * 1.3)
    # The gap's interval: Newcombe's square-and-add of the two groups' own intervals.
    lo = 17.0 - math.sqrt((69 - float(r["accuracy_0_ci_low"])) ** 2 + (float(r["accuracy_1_ci_high"]) - 52)
                          ** 2)
    assert float(r["delta_accuracy_ci_low"]) == pytest.approx(lo)
    nondp = {row["run"]: row for row in rows}["nondp-ff0.7-seed0"]
    assert nondp["noise_multiplier"] == "" and nondp["epsilon_pld"] == "" and nondp["dp_enabled"] == "false"


def test_newcombe_interval_by_hand():
    lo, hi = report.newcombe_interval(0.8, 0.7, 0.9, 0.5, 0.4, 0.6)
    assert lo == pytest.approx(0.3 - math.sqrt(0.02)) and hi == pytest.approx(0.3 + math.sqrt(0.02))


def test_table1_matches_paper_layout_and_numbers(workdir):
    rows = _rows(workdir / "table1.csv")
    assert [r["privacy_level"] for r in rows] == ["high", "medium", "nondp"]
    high = rows[0]
    nondp_acc = (92 * 540 + 87 * 60) / 600  # FakeTrain non-DP at 90%: female 92, male 87
    assert float(high["accuracy"]) == pytest.approx((69 * 540 + 52 * 60) / 600)
    assert float(high["delta_vs_nondp"]) == pytest.approx((69 * 540 + 52 * 60) / 600 - nondp_acc)
    # The paper's Table 1: high 71.05, non-DP 91.65 -> -20.6; medium 85.61 -> -6.04.
    assert float(high["paper_accuracy"]) == 71.05 and float(high["paper_delta_vs_nondp"]) == \
        pytest.approx(-20.6)
    assert float(rows[1]["paper_delta_vs_nondp"]) == pytest.approx(-6.04)
    md = (workdir / "table1.md").read_text()
    assert "at 90% female" in md and "| 71.05 | -20.60 |" in md


def test_every_figure_is_written(workdir):
    assert {p.name for p in (workdir / "figures").glob("*.png")} == FIGURES
    assert all(p.stat().st_size > 20_000 for p in (workdir / "figures").glob("*.png"))


@pytest.mark.parametrize("name", ["summary.csv", "table1.md", "figures/fig1_accuracy_vs_imbalance.png"])
def test_a_report_killed_mid_write_leaves_the_previous_file_whole(workdir, tmp_path, monkeypatch, name):
    wd = tmp_path / "w"
    shutil.copytree(workdir, wd)
    target = wd / name
    good = target.read_bytes()
    final_path = runs_by_name(wd)["high-ff0.9-clip5-seed0"] / "final.json"
    final = json.loads(final_path.read_text())
    final["metrics"].update(accuracy=12.5, accuracy_0=12.5)  # the next report differs in every file under test
    final_path.write_text(json.dumps(final))
    real_writer, partial = runlog.atomic_writer, []

    @contextlib.contextmanager
    def dies_midway(path, mode="w"):
        with real_writer(path, mode) as handle:
            if Path(path) != target:
                yield handle
                return

            class Killed:
                def write(self, data):
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    (tmp,) = target.parent.glob(f".{target.name}.*.tmp")  # the writer's temporary file
                    partial.append(tmp.stat().st_size)
                    raise OSError("simulated: killed in the middle of writing")

            yield Killed()

    monkeypatch.setattr(runlog, "atomic_writer", dies_midway)
    figures = target.suffix == ".png"
    with pytest.raises(OSError, match="simulated"):
        report.write_report(wd, figures=figures, verbose=False)
    assert 0 < partial[0] < len(good)  # half of the new file had been written when it died
    assert target.read_bytes() == good
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")) == []
    monkeypatch.setattr(runlog, "atomic_writer", real_writer)
    if figures:
        report.figure_imbalance(report.summary_rows(wd), target)
    else:
        report.write_report(wd, figures=False, verbose=False)
    assert target.read_bytes() != good  # what the killed report was writing was new


def test_report_mode_regenerates_identical_tables(workdir, monkeypatch, capsys):
    before = {n: (workdir / n).read_bytes() for n in ("summary.csv", "table1.csv", "table1.md",
                                                      "imbalance_drop.csv", "imbalance_drop.md")}
    for n in before:
        (workdir / n).unlink()
    mod = load_cli()
    mod.FLAGS.unparse_flags()
    try:
        mod.main(mod._parse_flags(["sweep.py", "report", "--workdir", str(workdir), "--nofigures"]))
    finally:
        mod.FLAGS.unparse_flags()
    assert "wrote" in capsys.readouterr().out
    assert {n: (workdir / n).read_bytes() for n in before} == before


def test_tables_do_not_depend_on_run_directory_names(tmp_path):
    # A run's settings come from its record (sweep_run.json), so renaming its directory changes nothing; here the
    # directories are shuffled among opaque names, and one series differs by an extra axis (learning rate).
    c = grid.with_seeds(small_sweep(), [0, 1])
    c.sweep.lr = grid.grid({"privacy": ("medium", "nondp"), "data.female_fraction": (0.7, 0.99),
                            "optim.learning_rate": (1e-3,)})
    launchers.run_sweep(c, tmp_path, train_fn=FakeTrain(), stream=io.StringIO())
    tables = ("summary.csv", "table1.csv", "table1.md", "imbalance_drop.csv", "imbalance_drop.md")
    report.write_report(tmp_path, figures=False, verbose=False)
    before = {n: (tmp_path / n).read_bytes() for n in tables}
    rows = report.summary_rows(tmp_path)
    clip_before = report.clip_stat_by_fraction(rows, runs_by_name(tmp_path), "nonprivate_clip_fraction_1")
    assert "medium learning_rate0.001" in before["imbalance_drop.md"].decode()
    dirs = sorted(find_run_dirs(tmp_path))
    for i, d in enumerate(dirs):
        d.rename(tmp_path / f"tmp{i}")
    for i, j in enumerate(reversed(range(len(dirs)))):
        (tmp_path / f"tmp{i}").rename(tmp_path / f"run{j:02d}")
    for n in tables:
        (tmp_path / n).unlink()
    report.write_report(tmp_path, figures=False, verbose=False)
    assert {n: (tmp_path / n).read_bytes() for n in tables} == before
    after = report.clip_stat_by_fraction(rows, runs_by_name(tmp_path), "nonprivate_clip_fraction_1")
    assert after == clip_before and not any(math.isnan(v) for v in after.values())


def test_two_directories_holding_one_run_are_refused(tmp_path):
    c = small_sweep()
    c.sweep.imbalance.data.female_fraction = (0.7,)
    del c.sweep["clipping"]
    launchers.run_sweep(c, tmp_path, train_fn=FakeTrain(), stream=io.StringIO())
    shutil.copytree(tmp_path / "nondp-ff0.7-seed0", tmp_path / "backup")
    with pytest.raises(grid.SweepError, match="both hold run 'nondp-ff0.7-seed0'"):
        report.write_report(tmp_path, figures=False)


def test_figures_without_the_data_they_need_are_skipped(tmp_path, capsys):
    c = small_sweep()
    c.sweep.imbalance.data.female_fraction = (0.7,)
    del c.sweep["clipping"]
    launchers.run_sweep(c, tmp_path, train_fn=FakeTrain())
    written = report.write_report(tmp_path)
    out = capsys.readouterr().out
    assert "skipped: Figure 1 needs runs at two or more female fractions" in out
    assert "skipped: Figure 2 needs DP runs at two or more clip bounds" in out
    assert {p.name for p in written if p.suffix == ".png"} == {"fig3_training_by_privacy.png",
                                                               "fig6_clipping_per_group.png"}


def test_nonprivate_statistics_are_labelled_and_reproducibility_reported(workdir):
    rows = _rows(workdir / "summary.csv")
    columns = set(rows[0])
    assert {"nonprivate_clip_fraction_0", "nonprivate_grad_norm_mean_1", "reproducible", "privacy_note"} <= columns
    assert not {"clip_fraction_0", "grad_norm_mean_1", "train_loss"} & columns
    assert {(r["reproducible"], r["privacy_note"]) for r in rows} == {("false", "")}
    assert "eproducible" not in (workdir / "table1.md").read_text() + (workdir / "imbalance_drop.md").read_text()


def test_clipping_figure_titles_say_non_private(workdir, monkeypatch):
    figures = []
    monkeypatch.setattr(report.figures, "save_figure", lambda fig, path: figures.append(fig) or path)
    rows = report.summary_rows(workdir)
    report.figure_clipping_diagnostics(rows, runs_by_name(workdir), workdir / "unused.png")
    (fig,) = figures
    assert "a non-private diagnostic" in fig._suptitle.get_text()
    assert all("non-private diagnostic" in ax.get_title() for ax in fig.axes)
    assert "dp.reproducible" not in fig._suptitle.get_text()


def test_without_nonprivate_diagnostics_the_report_still_works(tmp_path, capsys):
    c = small_sweep()
    c.train.nonprivate_diagnostics = False
    c.sweep.imbalance.data.female_fraction = (0.7, 0.99)
    del c.sweep["clipping"]
    launchers.run_sweep(c, tmp_path, train_fn=FakeTrain(), stream=io.StringIO())
    written = report.write_report(tmp_path)
    assert "skipped: clipping per group (a non-private diagnostic) needs nonprivate_clip_fraction" in \
        capsys.readouterr().out
    assert {p.name for p in written if p.suffix == ".png"} == FIGURES - {"fig2_accuracy_vs_clip.png",
                                                                        "fig6_clipping_per_group.png"}
    assert not [k for k in _rows(tmp_path / "summary.csv")[0] if k.startswith("nonprivate_")]


def test_reproducible_runs_are_said_so_in_tables_and_figures(tmp_path, monkeypatch):
    c = small_sweep()
    c.dp.reproducible = True
    del c.sweep["clipping"]
    launchers.run_sweep(c, tmp_path, train_fn=FakeTrain(), stream=io.StringIO())
    report.write_report(tmp_path, figures=False)
    rows = {r["run"]: r for r in _rows(tmp_path / "summary.csv")}
    assert rows["high-ff0.7-clip5-seed0"]["reproducible"] == "true"
    assert rows["high-ff0.7-clip5-seed0"]["privacy_note"] == PRIVACY_NOTE
    assert (rows["nondp-ff0.7-seed0"]["reproducible"], rows["nondp-ff0.7-seed0"]["privacy_note"]) == ("true", "")
    for table in ("table1.md", "imbalance_drop.md"):
        assert f"**Reproducible runs: 9 of 9** (`dp.reproducible=True`; column `reproducible` of summary.csv): " \
            f"{PRIVACY_NOTE}\n" in (tmp_path / table).read_text()
    figures = []
    monkeypatch.setattr(report.figures, "save_figure", lambda fig, path: figures.append(fig) or path)
    report.figure_imbalance(report.summary_rows(tmp_path), tmp_path / "unused.png")
    assert "\n9 of these 9 runs used dp.reproducible=True: their ε is no guarantee against anyone who knows " \
        "train.seed" in figures[0]._suptitle.get_text()


def test_clipping_diagnostics_average_seeds_per_fraction(tmp_path):
    # Two seeds at 0.7 (run means 0.2 and 0.4 -> 0.3), one at 0.99 (NaN rows ignored -> 0.5).
    histories = {"a": [0.1, 0.3], "b": [0.4], "c": [0.5, float("nan")]}
    for run, values in histories.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "history.jsonl").write_text(
            "".join(json.dumps({"step": i, "nonprivate_clip_fraction_1": v}) + "\n" for i, v in enumerate(values)))
    rows = [{"run": "a", "female_fraction": 0.7}, {"run": "b", "female_fraction": 0.7},
            {"run": "c", "female_fraction": 0.99}]
    means = report.clip_stat_by_fraction(rows, {run: tmp_path / run for run in histories},
                                         "nonprivate_clip_fraction_1")
    assert means == pytest.approx({0.7: 0.3, 0.99: 0.5})


def _drop_row(level, ff, seed, male, female=90.0):
    dp = level != "nondp"
    return {"run": f"{level}-ff{ff}-seed{seed}", "privacy_level": level, "variant": "", "dp_enabled": dp,
            "noise_multiplier": 0.7 if dp else None, "l2_clip_norm": 5.0 if dp else None,
            "female_fraction": ff, "seed": seed, "accuracy_0": female, "accuracy_1": male}


def test_imbalance_drop_by_hand():
    rows = [_drop_row("nondp", 0.7, 0, 80), _drop_row("nondp", 0.99, 0, 76),
            _drop_row("nondp", 0.7, 1, 82), _drop_row("nondp", 0.99, 1, 74),
            _drop_row("medium", 0.7, 0, 75, 88), _drop_row("medium", 0.99, 0, 65, 87),
            _drop_row("medium", 0.7, 1, 70, 86), _drop_row("medium", 0.99, 1, 66, 86),
            _drop_row("medium", 0.7, 2, 71)]  # seed 2 has no run at 99%: left out, not paired with nothing
    nondp, medium = sorted(report.imbalance_drop(rows), key=lambda r: r["privacy_level"] != "nondp")
    # non-DP male drops 4 and 8; medium 10 and 4 (mean 7, SD sqrt(9 + 9)); excess 6 and -4 (mean 1, SD sqrt(50)).
    assert (nondp["male_drop_mean"], nondp["male_drop_sd"]) == pytest.approx((6.0, math.sqrt(8)))
    assert medium["seeds"] == 2 and medium["male_drop_per_seed"] == "10.00;4.00"
    assert (medium["male_drop_mean"], medium["male_drop_sd"]) == pytest.approx((7.0, math.sqrt(18)))
    assert medium["female_drop_mean"] == pytest.approx(0.5)
    assert (medium["male_drop_excess_vs_nondp_mean"], medium["male_drop_excess_vs_nondp_sd"]) == \
        pytest.approx((1.0, math.sqrt(50)))
    # The paper at clip 5, 70% -> 99% female: non-DP men 87.74 -> 83.64, medium 78.61 -> 70.91.
    assert medium["paper_male_drop"] == pytest.approx(7.70)
    assert medium["paper_male_drop_excess_vs_nondp"] == pytest.approx(3.60)
    md = report.imbalance_drop_markdown([medium])
    assert "from 70% female" in md
    assert "| 99 | 2 | 10.00, 4.00 | 7.00 ± 4.24 | 0.50 | +1.00 ± 7.07 | 7.70 | +3.60 |" in md


def test_imbalance_drop_when_group_0_is_the_one_made_rarer_by_hand():
    # Fractions at most 1/2 (women in Adult: natural 33%, down to 5%): group 0 is the minority, 33% the least
    # imbalanced. Non-DP women lose 85 - 80 = 5 points, medium 80 - 68 = 12: 7 beyond non-DP's; men -1.
    rows = [_drop_row("nondp", 0.33, 0, 90, 85), _drop_row("nondp", 0.05, 0, 90, 80),
            _drop_row("medium", 0.33, 0, 86, 80), _drop_row("medium", 0.05, 0, 87, 68)]
    assert report.imbalance_order(r["female_fraction"] for r in rows) == ([0.33, 0.05], "0")
    nondp, medium = sorted(report.imbalance_drop(rows), key=lambda r: r["privacy_level"] != "nondp")
    assert (medium["from_female_fraction"], medium["to_female_fraction"], medium["minority_group"]) == (0.33, 0.05, "0")
    assert (medium["female_drop_mean"], medium["female_drop_excess_vs_nondp_mean"], medium["male_drop_mean"]) == \
        pytest.approx((12.0, 7.0, -1.0))
    assert nondp["female_drop_mean"] == pytest.approx(5.0) and medium["paper_male_drop"] is None
    md = report.imbalance_drop_markdown([medium])
    assert "from 33% female" in md and "the female loss beyond non-DP's" in md
    assert "| to % female | seeds | female drop per seed | female drop | male drop | female drop − non-DP's |" in md
    assert "| medium | 0.7 | 5 | 5 | 1 | 12.00 | 12.00 | -1.00 | +7.00 | – | – |" in md


def test_group_accuracy_by_hand():
    # Women's accuracy 80 and 86 over two seeds at 33%: mean 83, SD sqrt(18); TPR 0.4 and 0.6: mean 0.5, SD sqrt(0.02).
    rows = [_drop_row("medium", 0.33, s, 84, female) | {"epsilon_pld": 5.0, "tpr_0": tpr, "tpr_1": 0.7,
                                                          "accuracy_0_ci_low": female - 3,
                                                          "accuracy_0_ci_high": female + 2}
            for s, female, tpr in ((0, 80, 0.4), (1, 86, 0.6))]
    table = report.group_accuracy([_drop_row("nondp", 0.05, 0, 85, 91), *rows])
    assert [(r["privacy_level"], r["female_fraction"], r["seeds"]) for r in table] == [("medium", 0.33, 2),
                                                                                       ("nondp", 0.05, 1)]
    medium, nondp = table
    assert (medium["accuracy_0_mean"], medium["accuracy_0_sd"]) == pytest.approx((83.0, math.sqrt(18)))
    assert (medium["accuracy_0_ci_low"], medium["accuracy_0_ci_high"]) == pytest.approx((80.0, 85.0))
    assert (medium["tpr_0_mean"], medium["tpr_0_sd"], medium["tpr_1_sd"]) == pytest.approx((0.5, math.sqrt(0.02), 0))
    assert medium["epsilon_pld"] == 5.0 and nondp["epsilon_pld"] is None and nondp["accuracy_0_sd"] is None
    md = report.group_accuracy_markdown(table, names=("female", "male"))
    assert "| medium | 5 | 5.00 | 33 | 2 | 83.00 ± 4.24 [80.00, 85.00] | 84.00 ± 0.00 [–, –] | 0.500 ± 0.141 " in md
    assert "| nondp | – | – | 5 | 1 | 91.00 [–, –] | 85.00 [–, –] |" in md


def test_imbalance_drop_is_written_for_the_fake_sweep(workdir):
    table = _rows(workdir / "imbalance_drop.csv")
    assert [(r["privacy_level"], r["to_female_fraction"]) for r in table] == [
        (level, ff) for level in ("high", "medium", "nondp") for ff in ("0.9", "0.99")]
    rows = {r["privacy_level"]: r for r in table if r["to_female_fraction"] == "0.99"}
    # FakeTrain: DP men lose 60 x (0.99 - 0.7) = 17.4 points, non-DP men none; one seed, so no spread.
    assert float(rows["high"]["male_drop_mean"]) == pytest.approx(17.4)
    assert float(rows["high"]["male_drop_excess_vs_nondp_mean"]) == pytest.approx(17.4)
    assert rows["high"]["male_drop_sd"] == "" and float(rows["nondp"]["male_drop_mean"]) == pytest.approx(0.0)
    assert "| high | 1.5 | 5 | 99 | 1 | 17.40 | 17.40 |" in (workdir / "imbalance_drop.md").read_text()


def test_seeds_added_to_a_finished_sweep_train_only_new_runs_and_report_all(tmp_path):
    c = small_sweep()
    del c.sweep["clipping"]
    first = launchers.run_sweep(c, tmp_path, train_fn=FakeTrain())
    second = launchers.run_sweep(grid.with_seeds(c, [0, 1]), tmp_path, train_fn=FakeTrain())
    assert len(first.trained) == 9 and len(second.skipped) == 9 and len(second.trained) == 9
    rows = report.summary_rows(tmp_path)
    assert sorted(r["seed"] for r in rows) == [0] * 9 + [1] * 9 and "data.seed" not in rows[0]
    report.write_report(tmp_path, figures=False, verbose=False)
    t1 = _rows(tmp_path / "table1.csv")
    assert {r["seeds"] for r in t1} == {"2"}
    drop = [r for r in _rows(tmp_path / "imbalance_drop.csv") if r["to_female_fraction"] == "0.99"]
    assert {r["seeds"] for r in drop} == {"2"} and float(drop[0]["male_drop_sd"]) == pytest.approx(0.0)


def test_paper_results_are_packaged():
    paper = paper_results()
    assert len(paper) == 26
    row = [p for p in paper if p["privacy"] == "medium" and p["female_pct"] == 99.9 and p["clip"] == 5][0]
    assert (row["acc_female"], row["acc_male"], row["delta_eo"]) == (86.62, 33.33, 0.3302)


def _add_audit(run_dir, lower_bounds, aucs=(0.55, 0.62)):
    final = json.loads((run_dir / "final.json").read_text())
    audit = {}
    for g in (0, 1):
        audit.update({f"epsilon_lower_bound_{g}": lower_bounds[g], f"epsilon_lower_bound_max_{g}": 3.0,
                      f"mia_cal_auc_{g}": aucs[g], f"mia_cal_auc_{g}_ci_low": aucs[g] - 0.05,
                      f"mia_cal_auc_{g}_ci_high": aucs[g] + 0.05, f"mia_auc_{g}": aucs[g]})
    final["audit"] = {"settings": {"canaries_per_group": 100}, "nonprivate": audit}
    (run_dir / "final.json").write_text(json.dumps(final))


def test_audit_table_flags_a_lower_bound_above_the_reported_epsilon(workdir, tmp_path, capsys):
    wd = tmp_path / "w"
    shutil.copytree(workdir, wd)
    dirs = runs_by_name(wd)
    _add_audit(dirs["high-ff0.7-clip5-seed0"], (0.1, 0.3))  # reported pld epsilon (FakeTrain): 2 / 1.5 = 1.33
    _add_audit(dirs["high-ff0.99-clip5-seed0"], (0.2, 1.5))  # 1.5 > 1.33: must be flagged
    _add_audit(dirs["nondp-ff0.7-seed0"], (0.9, 2.5), aucs=(0.7, 0.8))  # no finite epsilon: nothing to exceed
    capsys.readouterr()
    written = report.write_report(wd, verbose=False)
    assert "AUDIT FAILURE: high-ff0.99-clip5-seed0: the audit's lower bound for male examples, 1.500, exceeds " \
           "the reported epsilon 1.333" in capsys.readouterr().err
    rows = {r["run"]: r for r in _rows(wd / "audit.csv")}
    assert set(rows) == {"high-ff0.7-clip5-seed0", "high-ff0.99-clip5-seed0", "nondp-ff0.7-seed0"}
    assert float(rows["high-ff0.7-clip5-seed0"]["nonprivate_epsilon_lower_bound_1"]) == 0.3
    assert rows["nondp-ff0.7-seed0"]["epsilon_reported"] == ""
    md = (wd / "audit.md").read_text()
    assert "**AUDIT FAILURE**" in md and md.count("exceeds the reported epsilon") == 1
    assert "| 0.550 [0.500, 0.600] |" in md
    summary = {r["run"]: r for r in _rows(wd / "summary.csv")}
    assert float(summary["nondp-ff0.7-seed0"]["nonprivate_mia_cal_auc_1"]) == 0.8
    assert wd / "figures" / "fig7_privacy_audit.png" in written
    _add_audit(dirs["high-ff0.99-clip5-seed0"], (0.2, 1.0))
    report.write_report(wd, figures=False, verbose=False)
    assert "No lower bound exceeds" in (wd / "audit.md").read_text()


# --- the AUDIT FAILURE flag, corrected for the number of tests (Bonferroni over the report's runs and groups) ------

K_GUESSES, CANARIES = 100, 1000  # jaxdp's defaults: 5% of 1,000 canaries guessed "in", 5% "out"


@functools.cache
def _bound(correct, delta, confidence=0.95):
    return audit.epsilon_lower_bound(K_GUESSES, correct, delta, confidence, num_canaries=CANARIES)


def _audit_row(run, epsilon, correct, delta=1e-6):
    """A summary row of an audited private run: ``correct`` right guesses of K_GUESSES in each group."""
    row = {"run": run, "epsilon_pld": epsilon, "delta": delta, "audit_confidence": 0.95}
    for g, v in enumerate(correct):
        row.update({f"nonprivate_epsilon_lower_bound_{g}": _bound(v, delta),
                    f"nonprivate_epsilon_lower_bound_guesses_{g}": K_GUESSES,
                    f"nonprivate_epsilon_lower_bound_correct_{g}": v,
                    f"nonprivate_epsilon_lower_bound_canaries_{g}": CANARIES})
    return row


def test_audit_flag_is_corrected_for_the_number_of_tests_by_hand():
    # delta 0, all 100 guesses right: the bound is logit((1 - c) ** (1 / 100)); one run, two groups: c = 1 - 0.05/2.
    per_test, corrected = (math.log(x / (1 - x)) for x in (0.05 ** 0.01, 0.025 ** 0.01))
    assert (per_test, corrected) == pytest.approx((3.4930, 3.2814), abs=1e-4)
    at_3_4 = _audit_row("r", 3.4, (100, 50), delta=0.0)
    assert at_3_4["nonprivate_epsilon_lower_bound_0"] > 3.4  # the uncorrected flag would fire
    assert report.audit_violations([at_3_4]) == []
    (line,) = report.audit_violations([_audit_row("r", 3.2, (100, 50), delta=0.0)])
    assert line == ("r: the audit's lower bound for female examples, 3.281 at confidence 0.975 (100 of 100 guesses "
                    "right; Bonferroni over the report's 2 tests, family-wise false-alarm rate <= 0.05), exceeds the "
                    "reported epsilon 3.200")
    # Non-DP runs (no finite epsilon) are not tests: adding one leaves the correction at 2 tests.
    assert report.audit_violations([_audit_row("r", 3.2, (100, 50), delta=0.0),
                                    {**_audit_row("n", None, (100, 100)), "epsilon_pld": None}]) == [line]


def _simulated_families(epsilons, true_epsilons, families, rng):
    """Per family: (flag raised by the report, flag the uncorrected per-test rule would raise), for runs that
    report ``epsilons`` while their audits' right guesses are Binomial(K, e^eps / (1 + e^eps)) at
    ``true_epsilons``: the most an (eps, 0)-DP training can give an auditor (randomized response on each coin)."""
    q = np.array([special.expit(e) for e in true_epsilons])
    out = []
    for _ in range(families):
        correct = rng.binomial(K_GUESSES, q[:, None], size=(len(q), 2))
        rows = [_audit_row(f"run{i}", eps, tuple(int(v) for v in correct[i])) for i, eps in enumerate(epsilons)]
        uncorrected = any(r[f"nonprivate_epsilon_lower_bound_{g}"] > r["epsilon_pld"] for r in rows for g in (0, 1))
        out.append((bool(report.audit_violations(rows)), uncorrected))
    return np.array(out)


def test_audit_flag_false_alarm_rate_is_at_most_alpha_for_the_whole_report():
    # Five runs whose reported epsilon is true (and attained: the worst case for the flag), two groups each.
    epsilons = (0.25, 0.5, 1.0, 1.5, 2.0)
    flags = _simulated_families(epsilons, epsilons, 2000, np.random.default_rng(0))
    corrected, uncorrected = flags.mean(axis=0)
    # Exactly (summing the binomial tails): 3.2% family-wise with the correction, 34% without; simulated here 3.4%
    # and 36%, with standard errors 0.4 and 1.1 points.
    assert corrected <= 0.05
    assert uncorrected > 0.25  # what the flag did before: one report in three cried wolf
    assert 0.015 < corrected  # the correction is not so strict that the flag never fires


def test_audit_flag_still_catches_a_real_violation():
    # One of the five runs reports epsilon 1 but its training is 2-DP at best (e.g. an accounting bug): flagged in
    # 98% of 300 simulated reports.
    flags = _simulated_families((0.25, 0.5, 1.0, 1.5, 2.0), (0.25, 0.5, 2.0, 1.5, 2.0), 300,
                                np.random.default_rng(1))
    assert flags[:, 0].mean() > 0.9


def test_audit_report_states_the_family_wise_rate_and_the_corrected_bounds(workdir, tmp_path, capsys):
    wd = tmp_path / "w"
    shutil.copytree(workdir, wd)
    dirs = runs_by_name(wd)
    for run, correct in (("high-ff0.7-clip5-seed0", (60, 100)), ("high-ff0.99-clip5-seed0", (60, 60))):
        final = json.loads((dirs[run] / "final.json").read_text())
        final["audit"] = {"settings": {"canaries_per_group": CANARIES, "confidence": 0.95}, "nonprivate": {
            k.removeprefix("nonprivate_"): v for k, v in _audit_row(run, None, correct).items()
            if k.startswith("nonprivate_")}}
        (dirs[run] / "final.json").write_text(json.dumps(final))
    capsys.readouterr()
    report.write_report(wd, figures=False, verbose=False)
    corrected = audit.epsilon_lower_bound(100, 100, 1e-6, 1 - 0.05 / 4, num_canaries=CANARIES)
    assert capsys.readouterr().err == (
        f"AUDIT FAILURE: high-ff0.7-clip5-seed0: the audit's lower bound for male examples, {corrected:.3f} at "
        "confidence 0.9875 (100 of 100 guesses right; Bonferroni over the report's 4 tests, family-wise false-alarm "
        "rate <= 0.05), exceeds the reported epsilon 1.333\n")
    md = (wd / "audit.md").read_text()
    assert "confidence 1 − 0.05/4 = 0.9875, so the chance of any false alarm in the whole report is at most 5%" in md
    rows = {r["run"]: r for r in _rows(wd / "audit.csv")}
    assert float(rows["high-ff0.7-clip5-seed0"]["nonprivate_epsilon_lower_bound_bonferroni_1"]) == \
        pytest.approx(corrected)
    assert float(rows["high-ff0.99-clip5-seed0"]["nonprivate_epsilon_lower_bound_bonferroni_1"]) == 0.0


# --- issue 13: DP-fairness methods, misalignment, groups named by their attribute ---------------------------------


class MethodsFakeTrain(FakeTrain):
    """FakeTrain whose DP-fairness methods each lift the minority by a known amount (dpsgd_f +4, dpsgd_global -2,
    dpsgd_global_adapt +6 points), and whose histories carry the trainer's misalignment cosines."""

    LIFT = {"dpsgd": 0.0, "dpsgd_f": 4.0, "dpsgd_global": -2.0, "dpsgd_global_adapt": 6.0}

    def __call__(self, config, workdir, *, on_progress=None):
        from pathlib import Path

        wd = Path(workdir)
        fresh = not (wd / "final.json").exists()
        final = super().__call__(config, workdir, on_progress=on_progress)
        if not fresh or not config.dp.enabled:
            return final
        lift = self.LIFT[config.dp.method]
        final["metrics"]["accuracy_1"] += lift
        for side in ("ci_low", "ci_high"):
            final["metrics"][f"accuracy_1_{side}"] += lift
        final["metrics"]["delta_accuracy"] -= lift
        (wd / "final.json").write_text(json.dumps(final))
        rows = [json.loads(line) for line in (wd / "history.jsonl").read_text().splitlines()]
        for row in rows:
            for d, base in (("unclipped", 0.8), ("clipped", 0.6), ("noised", 0.1)):
                row.update({f"nonprivate_cos_{d}_0": base, f"nonprivate_cos_{d}_1": base - 0.2 + lift / 100,
                            f"nonprivate_cos_{d}_all": base})
        (wd / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return final


def _methods_sweep(group_attribute=None):
    from jaxdp.config import base_config

    c = base_config()
    c.name = "m"
    if group_attribute:
        c.data.group_attribute = group_attribute
    c.sweep.methods = grid.grid({"privacy": ("medium",), "data.female_fraction": (0.7, 0.99),
                                 "dp.method": ("dpsgd", "dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")})
    c.sweep.baseline = grid.grid({"privacy": ("nondp",), "data.female_fraction": (0.7, 0.99)})
    return c


@pytest.fixture(scope="module")
def methods_workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("methods")
    launchers.run_sweep(_methods_sweep(), wd, train_fn=MethodsFakeTrain(), stream=io.StringIO())
    report.write_report(wd, verbose=False)
    return wd


def test_methods_table_compares_the_methods_per_group_by_hand(methods_workdir):
    rows = _rows(methods_workdir / "methods.csv")
    assert [(r["female_fraction"], r["method"]) for r in rows] == [
        (ff, m) for ff in ("0.7", "0.99") for m in ("dpsgd", "dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")] + [
        ("0.7", "non-DP"), ("0.99", "non-DP")]
    by = {(r["female_fraction"], r["method"]): r for r in rows}
    # FakeTrain at medium, 99% female: female 86, male 84 - 3 - 60 x 0.29 = 63.6; DPSGD-F lifts men by 4.
    assert float(by["0.99", "dpsgd"]["accuracy_1"]) == pytest.approx(63.6)
    assert float(by["0.99", "dpsgd_f"]["accuracy_1"]) == pytest.approx(67.6)
    assert float(by["0.99", "dpsgd_f"]["delta_accuracy"]) == pytest.approx(86 - 67.6)
    assert float(by["0.99", "dpsgd_f"]["epsilon_pld"]) == pytest.approx(2 / 0.7)
    assert by["0.7", "non-DP"]["epsilon_pld"] == "" and float(by["0.7", "non-DP"]["accuracy_1"]) == 87.0
    # The gap's interval (Newcombe) is there, and the misalignment is the mean over the history (non-private).
    assert float(by["0.99", "dpsgd_f"]["delta_accuracy_ci_low"]) < 86 - 67.6 < \
        float(by["0.99", "dpsgd_f"]["delta_accuracy_ci_high"])
    assert float(by["0.7", "dpsgd_global_adapt"]["nonprivate_cos_clipped_1"]) == pytest.approx(0.46)
    assert by["0.7", "non-DP"]["nonprivate_cos_clipped_1"] == ""
    md = (methods_workdir / "methods.md").read_text()
    assert "| medium | 99 | dpsgd_f | 2.86 | 86.00 [" in md and "accuracy female | accuracy male" in md
    assert "a non-private diagnostic" in md


def test_methods_and_misalignment_figures_are_written_and_say_non_private(methods_workdir, monkeypatch):
    figures = methods_workdir / "figures"
    assert {"fig8_methods_per_group.png", "fig9_misalignment.png"} <= {p.name for p in figures.glob("*.png")}
    captured = []
    monkeypatch.setattr(report.figures, "save_figure", lambda fig, path: captured.append(fig) or path)
    rows = report.summary_rows(methods_workdir)
    report.figure_misalignment(rows, runs_by_name(methods_workdir), methods_workdir / "unused.png")
    report.figure_methods(rows, methods_workdir / "unused.png")
    misalignment, methods_fig = captured
    assert "a non-private diagnostic" in misalignment._suptitle.get_text()
    assert all("non-private diagnostic" in ax.get_title() for ax in misalignment.axes[:4])
    ticks = [t.get_text() for t in methods_fig.axes[0].get_xticklabels()]
    assert ticks == ["DP-SGD\nε=2.86", "DPSGD-F\nε=2.86", "Global\nε=2.86", "Global-Adapt\nε=2.86", "non-DP"]


def test_runs_without_methods_write_no_methods_table(workdir):
    assert not (workdir / "methods.csv").exists() and not (workdir / "methods.md").exists()


def test_groups_are_named_by_the_group_attribute(tmp_path, monkeypatch):
    launchers.run_sweep(_methods_sweep("Young"), tmp_path, train_fn=MethodsFakeTrain(), stream=io.StringIO())
    report.write_report(tmp_path, figures=False, verbose=False)
    assert "at 99% not Young" in (tmp_path / "table1.md").read_text()
    assert "| to % not Young | seeds | Young drop per seed |" in (tmp_path / "imbalance_drop.md").read_text()
    assert "accuracy not Young | accuracy Young | gap not Young − Young" in (tmp_path / "methods.md").read_text()
    assert _rows(tmp_path / "summary.csv")[0]["group_attribute"] == "Young"
    captured = []
    monkeypatch.setattr(report.figures, "save_figure", lambda fig, path: captured.append(fig) or path)
    report.figure_imbalance(report.summary_rows(tmp_path), tmp_path / "unused.png")
    (fig,) = captured
    a, b = fig.axes
    assert a.get_xlabel() == "not Young share of the data" and b.get_ylabel() == "Δ accuracy, not Young − Young (pp)"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "not Young" in legend and "Young" in legend
    assert "paper (CelebA, ResNet18)" not in legend  # the paper's numbers are for Male groups: not drawn


def test_the_noise_multiplier_reported_is_the_one_that_ran(workdir, tmp_path):
    """With dp.target_epsilon the run calibrates z; summary.csv shows final.json's z, not the record's request."""
    wd = tmp_path / "w"
    shutil.copytree(workdir, wd)
    run_dir = runs_by_name(wd)["high-ff0.7-clip5-seed0"]
    final = json.loads((run_dir / "final.json").read_text())
    final["noise_multiplier"] = 2.34
    (run_dir / "final.json").write_text(json.dumps(final))
    report.write_report(wd, figures=False, verbose=False)
    rows = {r["run"]: r for r in _rows(wd / "summary.csv")}
    assert rows["high-ff0.7-clip5-seed0"]["noise_multiplier"] == "2.34"
    assert rows["high-ff0.9-clip5-seed0"]["noise_multiplier"] == "1.5"


# --- tabular runs: the groups' names come from each run's final.json, nothing image-specific is printed ----------


class TabularFakeTrain(MethodsFakeTrain):
    """MethodsFakeTrain whose runs record what a tabular data source gives: its groups' names and 104 features."""

    def __call__(self, config, workdir, *, on_progress=None):
        final = super().__call__(config, workdir, on_progress=on_progress)
        final.update(group_names=["white", "non-white"], input_shape=[104])
        (Path(workdir) / "final.json").write_text(json.dumps(final))
        return final


def _tabular_workdir(path):
    """A methods sweep (medium privacy, 4 methods and non-DP at 70% and 99% of group 0) recorded as if run on
    a tabular source grouped by race, one run audited."""
    launchers.run_sweep(_methods_sweep(), path, train_fn=TabularFakeTrain(), stream=io.StringIO())
    for run_dir in find_run_dirs(path):
        record = json.loads((run_dir / "sweep_run.json").read_text())
        record["config"]["data"].update(source="adult", group_attribute="race", label_attribute="income")
        (run_dir / "sweep_run.json").write_text(json.dumps(record))
    run_dir = runs_by_name(path)["medium-ff0.99-clip5-seed0-methoddpsgd_f"]
    final = json.loads((run_dir / "final.json").read_text())
    final["audit"] = {"settings": {"canaries_per_group": CANARIES, "confidence": 0.95}, "nonprivate": {
        k.removeprefix("nonprivate_"): v for k, v in _audit_row("x", None, (60, 70)).items()
        if k.startswith("nonprivate_")}}
    final["audit"]["nonprivate"].update(mia_cal_auc_0=0.52, mia_cal_auc_1=0.58)
    (run_dir / "final.json").write_text(json.dumps(final))


IMAGE_WORDS = re.compile(r"\b(smiling|images?|men|women|female|male|celeba|resnet\w*|\d+px)\b", re.IGNORECASE)


def test_tabular_runs_are_reported_with_their_own_group_names_and_no_image_words(tmp_path, monkeypatch, capsys):
    _tabular_workdir(tmp_path)
    texts = []

    def save_and_read(fig, path):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text())
        return real_save(fig, path)

    real_save = report.figures.save_figure
    monkeypatch.setattr(report.figures, "save_figure", save_and_read)
    written = report.write_report(tmp_path)
    printed = capsys.readouterr()
    assert {p.name for p in written if p.suffix == ".png"} == {
        "fig1_accuracy_vs_imbalance.png", "fig3_training_by_privacy.png", "fig4_training_by_imbalance.png",
        "fig5_fairness_gaps_vs_imbalance.png", "fig6_clipping_per_group.png", "fig7_privacy_audit.png",
        "fig8_methods_per_group.png", "fig9_misalignment.png"}
    markdown = {p.name: p.read_text() for p in written if p.suffix == ".md"}
    assert set(markdown) == {"table1.md", "imbalance_drop.md", "methods.md", "audit.md", "group_accuracy.md"}
    for text in [*markdown.values(), *texts, printed.out, printed.err]:
        assert not IMAGE_WORDS.search(text), (IMAGE_WORDS.search(text).group(), text)
    # Group 0 is white, group 1 non-white, everywhere, and the data is described by its features.
    assert "at 99% white" in markdown["table1.md"]
    assert "no published row of Farrand et al. 2020 matches these runs" in markdown["table1.md"]
    assert "| to % white | seeds | non-white drop per seed | non-white drop | white drop |" in \
        markdown["imbalance_drop.md"]
    assert "accuracy white | accuracy non-white | gap white − non-white" in markdown["methods.md"]
    assert "lower bound white / non-white" in markdown["audit.md"]
    assert "| % white | seeds | accuracy white | accuracy non-white | TPR white | TPR non-white |" in \
        markdown["group_accuracy.md"]
    assert "skipped: Figure 2 needs DP runs at two or more clip bounds at one white fraction" in printed.out
    assert "white share of the data" in texts and "Δ accuracy, white − non-white (pp)" in texts
    assert {"white", "non-white"} <= set(texts)
    assert any("ours: adult, 104 features" in t for t in texts)
    summary = _rows(tmp_path / "summary.csv")
    assert {(r["group_0"], r["group_1"], r["input_shape"]) for r in summary} == {("white", "non-white", "104")}
    assert not IMAGE_WORDS.search((tmp_path / "summary.csv").read_text().replace("female_fraction", ""))
