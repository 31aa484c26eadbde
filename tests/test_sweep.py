"""Tests of jaxdp_study.grid, .workdir, .launchers and launch/sweep.py: expansion, naming, resume, launchers, bad input.

Most tests train with FakeTrain, which honours jaxdp.train.train_and_evaluate's contract (config.json,
history.jsonl, checkpoints/, final.json written last; a second call resumes or returns the finished result)
with deterministic, plausible numbers; one slow test runs the real training on configs/tiny.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from jaxdp import data
from jaxdp.config import base_config, flatten
from jaxdp_study import grid, launchers, paper

REPO = Path(__file__).resolve().parent.parent
PRIVACY_NOTE = "The epsilon is no guarantee against anyone who knows train.seed (dp.reproducible=True)."
BASE_ACCURACY = {"high": 67.0, "medium": 84.0, "low": 86.0, "nondp": 90.0}


def _wilson(k: float, n: float) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def fake_metrics(config: ml_collections.ConfigDict, progress: float) -> dict:
    """Metrics with the contract's keys: minority accuracy falls with imbalance, more under DP."""
    level = config.dp.privacy_level if config.dp.enabled else "nondp"
    ff = float(config.data.female_fraction)
    base = 55.0 + (BASE_ACCURACY.get(level, 80.0) - 55.0) * progress
    penalty = 0.0 if level == "nondp" else 60.0 * max(0.0, ff - 0.7)
    n_test = 600
    n = {"0": round(n_test * ff), "1": n_test - round(n_test * ff)}
    acc = {"0": base + 2.0, "1": max(base - 3.0 - penalty, 40.0)}
    m: dict = {"n_0": n["0"], "n_1": n["1"]}
    for g in "01":
        for rate, value in (("accuracy", acc[g] / 100), ("demographic_parity", 0.5 + 0.05 * int(g)),
                            ("tpr", acc[g] / 100), ("fpr", 1 - acc[g] / 100), ("fnr", 1 - acc[g] / 100)):
            lo, hi = _wilson(value * n[g], n[g])
            scale = 100.0 if rate == "accuracy" else 1.0
            m[f"{rate}_{g}"] = value * scale
            m[f"{rate}_{g}_ci_low"], m[f"{rate}_{g}_ci_high"] = lo * scale, hi * scale
    m["accuracy"] = (acc["0"] * n["0"] + acc["1"] * n["1"]) / n_test
    m["delta_accuracy"] = m["accuracy_0"] - m["accuracy_1"]
    m["delta_demographic_parity"] = abs(m["demographic_parity_0"] - m["demographic_parity_1"])
    m["delta_equal_opportunity"] = abs(m["tpr_0"] - m["tpr_1"])
    m["delta_fpr"] = abs(m["fpr_0"] - m["fpr_1"])
    if config.train.nonprivate_diagnostics:  # training-data statistics without noise: the trainer's nonprivate_ keys
        dp = bool(config.dp.enabled)
        m["nonprivate_clip_fraction_0"] = 0.6 if dp else math.nan
        m["nonprivate_clip_fraction_1"] = 0.6 + 0.3 * (ff - 0.7) if dp else math.nan
        m["nonprivate_grad_norm_mean_0"] = 4.0 if dp else math.nan
        m["nonprivate_grad_norm_mean_1"] = 4.0 + 10 * (ff - 0.7) if dp else math.nan
    return m


class FakeTrain:
    """train_and_evaluate's contract in miniature: 8 steps, evaluation and checkpoint every 4."""

    def __init__(self, steps: int = 8, crash_in: str | None = None):
        self.steps, self.crash_in, self.calls = steps, crash_in, []

    def __call__(self, config, workdir, *, on_progress=None):
        wd = Path(workdir)
        self.calls.append(wd.name)
        if (wd / "final.json").exists():
            return json.loads((wd / "final.json").read_text())
        (wd / "checkpoints").mkdir(parents=True, exist_ok=True)
        (wd / "config.json").write_text(config.to_json(sort_keys=True))
        ckpt = wd / "checkpoints" / "latest"
        start = int(ckpt.read_text()) if ckpt.exists() else 0
        eps = 2.0 / float(config.dp.noise_multiplier) if config.dp.enabled else None
        for step in range(start + 1, self.steps + 1):
            if on_progress is not None:
                on_progress(step, self.steps, {"loss": 0.5, "epsilon": eps})
            if step % 4 == 0:
                row = {"step": step, "epoch": step / self.steps, "wall_time_s": 0.1 * step, "epsilon": eps,
                       **fake_metrics(config, step / self.steps)}
                if config.train.nonprivate_diagnostics:
                    row["nonprivate_train_loss"] = 0.7 - 0.02 * step
                with open(wd / "history.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                ckpt.write_text(str(step))
                if self.crash_in == wd.name and step == 4:
                    raise KeyboardInterrupt("simulated kill")
        final = {"metrics": fake_metrics(config, 1.0),
                 "epsilon": {"pld": eps, "rdp": eps and eps * 1.1, "rdp_classic": eps and eps * 1.3},
                 "delta": float(config.dp.delta), "steps": self.steps, "sampling": config.dp.sampling,
                 "group_names": list(data.group_names(config.data)),
                 "wall_time_s": 1.0, "reproducible": bool(config.dp.reproducible),
                 "privacy_note": PRIVACY_NOTE if config.dp.enabled and config.dp.reproducible else None}
        tmp = wd / "final.json.tmp"
        tmp.write_text(json.dumps(final))
        os.replace(tmp, wd / "final.json")
        return final


def small_sweep() -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "t"
    c.sweep.imbalance = grid.grid({"privacy": ("high", "medium", "nondp"),
                                    "data.female_fraction": (0.7, 0.9, 0.99)})
    c.sweep.clipping = grid.grid({"privacy": ("medium",), "data.female_fraction": (0.7,),
                                   "dp.l2_clip_norm": (1.0, 5.0)})
    return c


# --------------------------------------------------------------------------------------------- expansion


def test_paper_grid_is_26_runs_one_per_published_row():
    runs = grid.expand(_load_config("paper"))
    # 4 levels x 5 fractions + 3 levels x 3 clips, sharing the 3 clip-5 runs at 70%.
    assert len(runs) == 26
    shared = [r for r in runs if set(r.grids) == {"imbalance", "clipping"}]
    assert [r.name for r in shared] == ["high-ff0.7-clip5-seed0", "medium-ff0.7-clip5-seed0",
                                        "low-ff0.7-clip5-seed0"]
    by_name = {r.name: r.config for r in runs}
    assert by_name["high-ff0.999-clip5-seed0"].dp.noise_multiplier == 1.5
    assert by_name["low-ff0.7-clip10-seed0"].dp.l2_clip_norm == 10.0
    assert by_name["nondp-ff0.99-seed0"].dp.enabled is False
    assert all(len(r.config.sweep) == 0 and r.config.name == r.name for r in runs)


def test_level_configs_match_the_paper_settings():
    for name, z in (("high", 1.5), ("medium", 0.7), ("low", 0.5), ("nondp", None)):
        runs = grid.expand(_load_config(name))
        assert [r.config.data.female_fraction for r in runs] == [0.7, 0.8, 0.9, 0.99, 0.999]
        for r in runs:
            assert r.config.dp.enabled is (z is not None)
            if z is not None:
                assert (r.config.dp.noise_multiplier, r.config.dp.l2_clip_norm) == (z, 5.0)
            assert (r.config.train.batch_size, r.config.train.epochs, r.config.data.total) == (32, 60, 30000)


def _load_config(name: str) -> ml_collections.ConfigDict:
    return grid.load_config(REPO / "configs" / f"{name}.py")


@pytest.mark.parametrize("level, z", [("high", 1.5), ("medium", 0.7), ("low", 0.5), ("nondp", None)])
def test_level_configs_resolve_to_base_config_plus_the_level(level, z):
    # The run configs of configs/<level>.py, value by value: what they were when each file set these keys itself.
    base = flatten(base_config())
    runs = grid.expand(_load_config(level))
    assert len(runs) == 5
    for run, ff in zip(runs, (0.7, 0.8, 0.9, 0.99, 0.999), strict=True):
        name = f"{level}-ff{ff:g}-clip5-seed0" if z is not None else f"nondp-ff{ff:g}-seed0"
        expected = {"name": name, "data.female_fraction": ff, "dp.privacy_level": level,
                    "dp.enabled": z is not None, "dp.noise_multiplier": z if z is not None else 0.7,
                    "dp.l2_clip_norm": 5.0, "dp.delta": 1e-6, "data.total": 30_000, "data.image_size": 128,
                    "train.batch_size": 32, "train.epochs": 60.0, "optim.learning_rate": 5e-5}
        assert (run.name, run.grids, run.axes) == (name, ["imbalance"], {"data.female_fraction": ff})
        assert flatten(run.config) == {**base, **expected}


def test_paper_table_is_the_one_the_configs_and_published_rows_use():
    assert paper.PRIVACY_LEVELS == {"high": 1.5, "medium": 0.7, "low": 0.5, "nondp": None}
    assert paper.PRIVACY_ORDER == ("high", "medium", "low", "nondp")
    published = {(p["privacy"], p["noise_multiplier"]) for p in paper.paper_results()}
    assert published == {(level, z) for level, z in paper.PRIVACY_LEVELS.items()}
    assert base_config().dp.l2_clip_norm == paper.L2_CLIP_NORM
    assert paper.privacy_settings("low") == {"dp.enabled": True, "dp.privacy_level": "low",
                                             "dp.noise_multiplier": 0.5}
    with pytest.raises(ValueError, match="unknown privacy level 'ultra'"):
        paper.privacy_settings("ultra")


def test_run_names_spell_out_settings_and_extra_axes():
    c = base_config()
    c.sweep.g = grid.grid({"optim.learning_rate": (1e-3,), "train.seed": (0, 1)})
    names = [r.name for r in grid.expand(c)]
    assert names == ["medium-ff0.7-clip5-seed0-learning_rate0.001",
                     "medium-ff0.7-clip5-seed1-learning_rate0.001"]
    c = base_config()
    c.dp.noise_multiplier = 0.8  # not the paper's medium value: the name must say so
    assert grid.run_name(c) == "medium-ff0.7-clip5-z0.8-seed0"


def test_seed_axis_sets_train_and_data_seed_and_with_seeds_adds_it_to_every_grid():
    c = base_config()
    c.sweep.g = grid.grid({"data.female_fraction": (0.7, 0.99), "seed": (0, 2)})
    runs = grid.expand(c)
    assert [r.name for r in runs] == ["medium-ff0.7-clip5-seed0", "medium-ff0.7-clip5-seed2",
                                      "medium-ff0.99-clip5-seed0", "medium-ff0.99-clip5-seed2"]
    assert [(r.config.train.seed, r.config.data.seed) for r in runs] == [(0, 0), (2, 2), (0, 0), (2, 2)]
    # Seed 0 of a replicate sweep is the same run as the unseeded sweep's (both seeds default to 0), so a
    # finished one-seed sweep is reused, not retrained, when seeds are added.
    single = grid.expand(small_sweep())
    seeded = grid.expand(grid.with_seeds(small_sweep(), [0, 1]))
    assert len(seeded) == 2 * len(single)
    by_name = {r.name: r for r in seeded}
    for r in single:
        assert grid.config_to_dict(by_name[r.name].config) == grid.config_to_dict(r.config)
        one = by_name[r.name.replace("seed0", "seed1")].config
        assert (one.train.seed, one.data.seed) == (1, 1)
    assert [r.name for r in grid.expand(grid.with_seeds(base_config(), [3]))] == ["medium-ff0.7-clip5-seed3"]


@pytest.mark.parametrize("seeds, message", [
    ([], "give integers >= 0"), ([-1], "give integers >= 0"), ([1, 1], "repeats a seed")])
def test_with_seeds_refuses_bad_seed_lists(seeds, message):
    with pytest.raises(grid.SweepError, match=message):
        grid.with_seeds(small_sweep(), seeds)


def test_seed_axis_refuses_clashes_and_bad_values():
    c = base_config()
    c.sweep.g = grid.grid({"train.seed": (0, 1)})
    with pytest.raises(grid.SweepError, match="grid 'g' already sweeps train.seed"):
        grid.with_seeds(c, [0, 1])
    c.sweep.g = grid.grid({"seed": (0,), "data.seed": (1,)})
    with pytest.raises(grid.SweepError, match="do not also sweep data.seed"):
        grid.expand(c)
    c.sweep.g = grid.grid({"seed": (0, -2)})
    with pytest.raises(grid.SweepError, match=r"seeds must be integers >= 0, got \[-2\]"):
        grid.expand(c)


def test_run_filter_selects_by_name():
    runs = grid.expand(small_sweep())
    assert [r.name for r in grid.select_runs(runs, "nondp|clip1")] == [
        "medium-ff0.7-clip1-seed0", "nondp-ff0.7-seed0", "nondp-ff0.9-seed0", "nondp-ff0.99-seed0"]
    with pytest.raises(grid.SweepError, match="matches none of the sweep's run names"):
        grid.select_runs(runs, "ultra")


@pytest.mark.parametrize("axes, message", [
    ({"data.femal_fraction": (0.7,)}, "'data.femal_fraction' is not a key of the config"),
    ({"privacy": ("medium", "ultra")}, "unknown level(s) ['ultra']"),
    ({"data": (0.7,)}, "is a section, not a value"),
    ({"data.female_fraction": ()}, "is empty"),
])
def test_bad_sweep_axes_are_refused(axes, message):
    c = base_config()
    c.sweep.g = grid.grid(axes) if axes != {"data.female_fraction": ()} else ml_collections.ConfigDict(
        {"data": {"female_fraction": ()}})
    with pytest.raises(grid.SweepError) as e:
        grid.expand(c)
    assert message in str(e.value)


# ------------------------------------------------------------------------------------ running and resume


def test_sweep_runs_then_second_invocation_skips_all(tmp_path, capsys):
    fake = FakeTrain()
    result = launchers.run_sweep(small_sweep(), tmp_path, train_fn=fake)
    # 3 levels x 3 fractions + medium clip 1 (clip 5 at 70% is shared) = 10 runs.
    assert len(result.trained) == 10 and len(fake.calls) == 10 and result.skipped == []
    for name in result.trained:
        d = tmp_path / name
        assert {p.name for p in d.iterdir()} >= {"sweep_run.json", "config.json", "history.jsonl",
                                                 "final.json", "checkpoints"}
        assert json.loads((d / "sweep_run.json").read_text())["config"]["name"] == name
    out = capsys.readouterr().out
    assert "[10/10] nondp-ff0.99-seed0" in out and "ETA" in out and "sweep done: 10 runs" in out
    again = FakeTrain()
    result = launchers.run_sweep(small_sweep(), tmp_path, train_fn=again)
    assert again.calls == [] and len(result.skipped) == 10 and result.trained == []


def test_killed_sweep_resumes_from_checkpoint(tmp_path):
    crash = FakeTrain(crash_in="medium-ff0.9-clip5-seed0")
    with pytest.raises(KeyboardInterrupt):
        launchers.run_sweep(small_sweep(), tmp_path, train_fn=crash)
    finished = sorted(p.parent.name for p in tmp_path.glob("*/final.json"))
    # Sorted order: high x3, then medium 0.7 clip1, clip5, then medium 0.9 is killed at step 4.
    assert len(finished) == 5 and "medium-ff0.9-clip5-seed0" not in finished
    partial = tmp_path / "medium-ff0.9-clip5-seed0"
    assert (partial / "checkpoints" / "latest").read_text() == "4"
    resume = FakeTrain()
    result = launchers.run_sweep(small_sweep(), tmp_path, train_fn=resume)
    assert resume.calls[0] == "medium-ff0.9-clip5-seed0" and len(resume.calls) == 5
    assert len(result.skipped) == 5
    steps = [json.loads(line)["step"] for line in (partial / "history.jsonl").read_text().splitlines()]
    assert steps == [4, 8]  # resumed after step 4, not restarted


def test_changed_config_is_refused_then_overwritten(tmp_path):
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())
    changed = small_sweep()
    changed.optim.learning_rate = 1e-4
    with pytest.raises(grid.SweepError) as e:
        launchers.run_sweep(changed, tmp_path, train_fn=FakeTrain())
    msg = str(e.value)
    assert "10 run directories" in msg and "optim.learning_rate: stored 5e-05 != new 0.0001" in msg
    assert "--overwrite" in msg and "another --workdir" in msg
    fake = FakeTrain()
    launchers.run_sweep(changed, tmp_path, train_fn=fake, overwrite=True)
    assert len(fake.calls) == 10
    stored = json.loads((tmp_path / "high-ff0.7-clip5-seed0" / "sweep_run.json").read_text())
    assert stored["config"]["optim"]["learning_rate"] == 1e-4


def test_progress_only_change_does_not_block_resume(tmp_path):
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())
    quiet = small_sweep()
    quiet.train.progress = False
    assert len(launchers.run_sweep(quiet, tmp_path, train_fn=FakeTrain()).skipped) == 10


def test_unknown_launcher_and_unwritable_workdir(tmp_path):
    with pytest.raises(grid.SweepError, match="unknown launcher 'kubernetes'; choose one of local"):
        launchers.run_sweep(small_sweep(), tmp_path, launcher="kubernetes", train_fn=FakeTrain())
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(grid.SweepError, match="is not writable .*choose another --workdir"):
        launchers.run_sweep(small_sweep(), blocker / "results", train_fn=FakeTrain())


def test_submitit_local_executor_path(tmp_path, monkeypatch):
    import cloudpickle

    # FakeTrain lives in this test module, which the job subprocess cannot import: ship it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.delenv("PYTHONPATH", raising=False)  # run_sweep must make jaxdp importable in the job itself
    c = base_config()
    c.name = "sub"
    c.sweep.g = grid.grid({"privacy": ("medium", "nondp")})
    try:
        result = launchers.run_sweep(c, tmp_path, launcher="submitit_local", train_fn=FakeTrain())
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.failed == {} and sorted(result.trained) == ["medium-ff0.7-clip5-seed0", "nondp-ff0.7-seed0"]
    assert len(result.job_ids) == 2
    for name in result.trained:
        final = json.loads((tmp_path / name / "final.json").read_text())
        assert final["steps"] == 8
    assert list((tmp_path / "submitit").glob("*_log.out"))  # submitit's own logs, in the same workdir


# ----------------------------------------------------------------------------------------------- the CLI


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def load_cli():
    """launch/sweep.py as a module, loaded once per process (absl flags can only be defined once)."""
    import importlib.util

    if "launch_sweep_cli" not in sys.modules:
        spec = importlib.util.spec_from_file_location("launch_sweep_cli", REPO / "launch" / "sweep.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["launch_sweep_cli"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["launch_sweep_cli"]


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the command line in-process (a subprocess per case costs seconds of imports): (exit code, stderr)."""
    mod = load_cli()
    monkeypatch.chdir(REPO)

    def call(*args: str) -> tuple[int, str, str]:
        mod.FLAGS.unparse_flags()
        capsys.readouterr()
        code = 0
        try:
            mod.main(mod._parse_flags(["sweep.py", *args]))
        except SystemExit as e:
            code = e.code
        finally:
            mod.FLAGS.unparse_flags()
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def test_cli_bad_inputs_fail_before_any_work(tmp_path, cli):
    code, _, err = cli("--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "config file 'configs/nope.py' does not exist" in err
    assert "configs/demo.py" in err
    code, _, err = cli("--config", "configs/tiny.py", "--launcher", "k8s", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "unknown --launcher='k8s'; choose one of local, submitit_local, slurm" in err
    (tmp_path / "f").write_text("")
    code, _, err = cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "f" / "w"))
    assert code == 2 and "is not writable" in err and "choose another --workdir" in err
    code, _, err = cli("report", "--workdir", str(tmp_path / "empty"))
    assert code == 2 and "holds no sweep runs" in err
    code, _, err = cli("--workdir", str(tmp_path / "w"))
    assert code == 2 and "pass --config configs/<name>.py" in err
    assert not (tmp_path / "w").exists()


def test_cli_unknown_config_key(tmp_path):
    # A subprocess: config_flags registers override flags while parsing, once per process.
    r = _cli("--config", "configs/tiny.py", "--config.train.epoch=3", "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2, r.stderr
    assert "cannot apply config override --config.train.epoch=3: no such key" in r.stderr
    assert 'Did you mean "epochs"' in r.stderr and not (tmp_path / "w").exists()


def test_cli_dry_run_lists_runs_and_overrides_apply(tmp_path):
    r = _cli("--config", "configs/paper.py", "--dry_run", "--workdir", str(tmp_path / "w"),
             "--config.sweep.imbalance.data.female_fraction=(0.9,0.99)")
    assert r.returncode == 0, r.stderr
    # 4 levels x 2 fractions + 9 clipping runs (none shared now) = 17.
    assert "17 runs in" in r.stdout and "nondp-ff0.99-seed0" in r.stdout
    assert "medium-ff0.7-clip10-seed0" in r.stdout and "ff0.999" not in r.stdout
    assert not (tmp_path / "w").exists()


def test_cli_seeds_flag(tmp_path, cli):
    code, out, _ = cli("--config", "configs/tiny.py", "--seeds", "0,1", "--dry_run", "--workdir", str(tmp_path / "w"))
    assert code == 0 and "8 runs in" in out and "nondp-ff0.9-seed1" in out
    code, _, err = cli("--config", "configs/tiny.py", "--seeds", "0,x", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "--seeds=0,x: give integers >= 0" in err
    assert not (tmp_path / "w").exists()


def test_cli_medium_config_lists_the_paper_runs(tmp_path, cli):
    code, out, _ = cli("--config", "configs/medium.py", "--dry_run", "--workdir", str(tmp_path / "w"))
    assert code == 0 and "5 runs in" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == [
        f"medium-ff{ff}-clip5-seed0" for ff in ("0.7", "0.8", "0.9", "0.99", "0.999")]


@pytest.mark.slow
def test_real_training_tiny_sweep_end_to_end(tmp_path):
    """configs/tiny.py shrunk to one run on the real trainer: every artefact, then a skip on rerun.

    The run is non-private because its program compiles in a fraction of the DP step's time; the DP path of
    the trainer is tested in tests/test_train.py, and the sweep treats both alike.
    """
    from jaxdp_study import report

    c = _load_config("tiny")
    c.data.data_dir = str(tmp_path / "data")
    c.sweep.imbalance = grid.grid({"privacy": ("nondp",), "data.female_fraction": (0.7,)})
    result = launchers.run_sweep(c, tmp_path / "w")
    assert result.trained == ["nondp-ff0.7-seed0"]
    run_dir = tmp_path / "w" / "nondp-ff0.7-seed0"
    final = json.loads((run_dir / "final.json").read_text())
    # 200 images, 20% test -> 160 train; batch 32 -> 5 steps for the one epoch; balanced test of 40.
    assert final["steps"] == 5 and final["metrics"]["n_0"] == 20 and final["metrics"]["n_1"] == 20
    assert final["epsilon"] == {"pld": None, "rdp": None, "rdp_classic": None}
    assert [json.loads(x)["step"] for x in (run_dir / "history.jsonl").read_text().splitlines()] == [4, 5]
    import jax

    # The persistent compilation cache is in use: <workdir>/.xla_cache, or the one this process already had.
    cache = jax.config.jax_compilation_cache_dir
    assert cache and list(Path(cache).iterdir())
    written = {p.name for p in report.write_report(tmp_path / "w", verbose=False)}
    assert {"summary.csv", "table1.md", "fig3_training_by_privacy.png"} <= written
    rows = (tmp_path / "w" / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("nondp-ff0.7-seed0,imbalance,nondp,false,,,0.7,0")
    again = launchers.run_sweep(c, tmp_path / "w")
    assert again.skipped == ["nondp-ff0.7-seed0"] and again.trained == []


# ------------------------------------------------------------------------------------------ the package


def test_library_does_not_import_the_study():
    code = ("import sys, jaxdp, jaxdp.config, jaxdp.data, jaxdp.train\n"
            "print(jaxdp.__file__, sorted(m for m in sys.modules if m.startswith('jaxdp_study')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(REPO / "jaxdp" / "__init__.py"), "[]"]


def test_run_one_starts_jax_distributed_once_through_jaxdp_parallel(tmp_path, monkeypatch):
    import jax

    from jaxdp import parallel

    started = []
    monkeypatch.setattr(parallel, "initialize_distributed", lambda: started.append("start") or True)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(started))
    run = grid.expand(small_sweep())[0]
    launchers.run_one(run.config, tmp_path / run.name, train_fn=FakeTrain())
    assert started == []  # not a submitit job: the local launcher's process is a single process
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    for _ in range(2):
        launchers.run_one(run.config, tmp_path / run.name, train_fn=FakeTrain())
    assert started == ["start"]


def test_cli_without_celeba_stops_before_any_run_with_one_message(tmp_path):
    """The paper's command without the CelebA files: one message (which files, where, the synthetic alternative),
    exit code 2, no traceback, nothing created but the workdir (issue 12 §7)."""
    work = tmp_path / "w"
    r = _cli("--config", "configs/medium.py", "--workdir", str(work),
             f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.manual_dir={tmp_path / 'celeba'}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for needle in ("img_align_celeba.zip", "list_attr_celeba.txt", str(tmp_path / "celeba"),
                   "--config.data.source=synthetic", "(all 5 runs)"):
        assert needle in r.stderr, (needle, r.stderr)
    assert r.stderr.count("Missing CelebA") == 1, "one message for the five runs, not five"
    assert not work.exists() or not any(work.iterdir())
