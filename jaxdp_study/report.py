"""Tables and figures of a sweep working directory, with the paper's published numbers alongside.

:func:`write_report` reads every run directory under a workdir (``sweep_run.json`` + ``final.json`` +
``history.jsonl``) and writes, without training anything:

- ``summary.csv``: one row per finished run — swept axes, privacy level, noise multiplier, clip bound, epsilon
  under each accountant, ``reproducible`` and ``privacy_note`` (from final.json), every final test metric with
  its 95% confidence interval, and the run's last non-private diagnostics (columns ``nonprivate_*``, as the
  trainer names them: training-data statistics without noise, not covered by epsilon) when it recorded them;
- ``table1.csv`` / ``table1.md``: the paper's Table 1 (overall accuracy per privacy level and its drop from the
  non-DP baseline at 90% female), ours next to the paper's;
- ``imbalance_drop.csv`` / ``imbalance_drop.md``: the paper's central comparison — per privacy level, each
  group's accuracy lost from the least imbalanced fraction to each more imbalanced one, and the minority's loss beyond
  non-DP's, per seed and as mean ± SD over seeds (:func:`imbalance_drop`);
- ``methods.csv`` / ``methods.md`` (when any run used a DP-fairness method, ``config.dp.method``): the methods
  side by side per privacy level and fraction — each group's accuracy, the gaps, epsilon, 95% intervals, and the
  mean misalignment cosines (non-private) — with the non-DP runs as a baseline (:func:`methods_table`);
- ``figures/``: Figure 1 (per-group accuracy and its gap vs imbalance), Figure 2 (clip bound), Figures 3-4
  (accuracy by group vs training step, per privacy level / per imbalance), Figure 5 (demographic-parity and
  equal-opportunity gaps vs imbalance), the per-group clipping diagnostics (non-private, and titled so), the
  privacy audit, the methods per group (Figure 8) and the gradient misalignment over training (Figure 9,
  non-private, titled so).
  The paper's values
  (:func:`jaxdp_study.paper.paper_results`) are drawn as hollow markers on dotted lines where the setting
  (privacy level, clip bound, female fraction) matches one of ours. Figures needing data the workdir lacks
  (e.g. Figure 2 with one clip bound) are skipped, and the reason is printed.

When any run was trained with ``dp.reproducible=True`` (its batches and noise derived from the public
``train.seed``), the tables say so under them (:func:`reproducible_note`) and the figures in their titles.

Groups: group 0 and group 1 of jaxdp.fairness, named after each run's ``config.data.group_attribute`` (read from
its run record: female and male for the default ``Male``, e.g. "not Young" and "Young" otherwise; the columns
keep their historical names: ``accuracy_female``, ``male_drop_*`` are group 0's and group 1's); gaps are group 0
minus group 1, and the paper's numbers are drawn only for runs that predict Smiling by Male groups. Error bars
are the per-group 95% intervals of jaxdp.fairness; a gap's interval combines its two groups' intervals by
Newcombe's square-and-add method (Newcombe 1998, method 10), which is what a researcher would compute by hand.
Runs that differ only in seed are averaged in the figures: a point is the mean over seeds, its error bar the
mean of the seeds' intervals (one run's test-sampling uncertainty, not the spread between seeds), and each
seed's own value is drawn faintly beside it; ``imbalance_drop`` gives the between-seed standard deviation.
The tables are byte-identical when regenerated from the same workdir, also after its run directories have been
renamed: a run's settings are read from its run record (``sweep_run.json``), never from its directory's name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdp.accounting import ACCOUNTANTS
from jaxdp.data.core import group_names_of
from jaxdp_study import grid
from jaxdp_study.paper import L2_CLIP_NORM, PRIVACY_ORDER, paper_results
from jaxdp_study.workdir import FINAL, read_run_record, runs_by_name

DEFAULT_GROUP_NAMES = group_names_of("Male")  # ("female", "male"): runs recorded before data.group_attribute
PRIVACY_COLORS = {"high": "#d62728", "medium": "#ff7f0e", "low": "#2ca02c", "nondp": "#1f77b4"}
GROUP_STYLE = {"0": dict(ls="-", marker="o"), "1": dict(ls="--", marker="s"), "overall": dict(ls=":", marker="^")}
# The gaps a paper figure plots, with the two per-group rates whose intervals give the gap's interval.
GAPS = {"delta_accuracy": "accuracy", "delta_demographic_parity": "demographic_parity",
        "delta_equal_opportunity": "tpr", "delta_fpr": "fpr"}
# History keys of the per-group clipping diagnostics (suffix _0 / _1): training-data statistics without noise.
CLIP_DIAGNOSTICS = ("nonprivate_clip_fraction", "nonprivate_grad_norm_mean")
_FIRST_METRICS = ("accuracy", "accuracy_0", "accuracy_1", "delta_accuracy", "delta_demographic_parity",
                  "delta_equal_opportunity", "delta_fpr")


# ------------------------------------------------------------------------------------------------ loading


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """The evaluation rows of ``history.jsonl``, in step order (a resumed run's repeated steps: last wins)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row.get("step", len(by_step)))] = row
    return [by_step[s] for s in sorted(by_step)]


def _num(x: Any) -> float:
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def group_names(rows: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """The names of group 0 and group 1 of summary ``rows``, after their runs' ``config.data.group_attribute``
    (column ``group_attribute``; ``("female", "male")`` for ``Male``, e.g. ``("not Young", "Young")`` otherwise);
    ``("group 0", "group 1")`` when the runs group by different attributes."""
    attributes = {r.get("group_attribute") or "Male" for r in rows}
    if len(attributes) > 1:
        return "group 0", "group 1"
    return group_names_of(attributes.pop()) if attributes else DEFAULT_GROUP_NAMES


def _group_labels(rows: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``(("0", name of group 0), ("1", name of group 1))``."""
    names = group_names(rows)
    return (("0", names[0]), ("1", names[1]))


def newcombe_interval(p0: float, lo0: float, hi0: float, p1: float, lo1: float,
                      hi1: float) -> tuple[float, float]:
    """95% interval of p0 - p1 from the two groups' own 95% intervals (Newcombe's square-and-add).

    >>> newcombe_interval(0.8, 0.7, 0.9, 0.5, 0.4, 0.6)   # 0.3 - sqrt(0.1**2 + 0.1**2), 0.3 + ...
    (0.15857864376269052, 0.4414213562373095)
    """
    d = p0 - p1
    return (d - math.sqrt((p0 - lo0) ** 2 + (hi1 - p1) ** 2),
            d + math.sqrt((hi0 - p0) ** 2 + (p1 - lo1) ** 2))


def _gap_intervals(metrics: Mapping[str, Any]) -> dict[str, float]:
    """95% intervals of the gaps, where the metrics lack them: signed for delta_accuracy, else of |gap|."""
    out: dict[str, float] = {}
    for gap, rate in GAPS.items():
        if f"{gap}_ci_low" in metrics:
            continue
        keys = [f"{rate}_0", f"{rate}_0_ci_low", f"{rate}_0_ci_high",
                f"{rate}_1", f"{rate}_1_ci_low", f"{rate}_1_ci_high"]
        if all(k in metrics for k in keys):
            vals = [_num(metrics[k]) for k in keys]
            lo, hi = newcombe_interval(*vals)
            if gap != "delta_accuracy":  # the other gaps are absolute differences
                _, lo, hi = _abs_interval(vals[0] - vals[3], lo, hi)
            out[f"{gap}_ci_low"], out[f"{gap}_ci_high"] = lo, hi
    return out


def summary_rows(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per finished run in ``workdir`` (the rows of summary.csv), sorted like the sweep.

    Everything about a run's settings comes from its run record (``sweep_run.json``: name, grids, axis values,
    resolved config), its results from ``final.json``; directory names are never read.
    """
    records = []
    axes_seen: list[str] = []
    dirs = runs_by_name(workdir)
    for name in sorted(dirs):
        run_dir = dirs[name]
        if not (run_dir / FINAL).exists():
            continue
        record, final = read_run_record(run_dir), _read_json(run_dir / FINAL)
        records.append((record, final))
        for axis in record.get("axes", {}):
            if axis not in axes_seen:
                axes_seen.append(axis)
    extra_axes = [a for a in axes_seen if a not in ("privacy", "data.female_fraction", "dp.l2_clip_norm",
                                                    "train.seed", "seed", "dp.privacy_level", "dp.method")]
    rows = []
    for record, final in records:
        c = record["config"]
        dp = c["dp"]
        eps = final.get("epsilon") or {}
        level = dp["privacy_level"] if dp["enabled"] else "nondp"
        row: dict[str, Any] = {
            "run": record["name"], "grids": ";".join(record.get("grids", [])), "privacy_level": level,
            "dp_enabled": bool(dp["enabled"]),
            # The z that ran: final.json's (calibrated when dp.target_epsilon is set), not the record's request.
            "noise_multiplier": final.get("noise_multiplier", dp["noise_multiplier"]) if dp["enabled"] else None,
            "l2_clip_norm": dp["l2_clip_norm"] if dp["enabled"] else None,
            "female_fraction": c["data"]["female_fraction"], "seed": c["train"]["seed"],
            "variant": grid.variant(record.get("axes", {})),
            "method": dp.get("method", "dpsgd") if dp["enabled"] else None,
        }
        for axis in extra_axes:
            row[axis] = record.get("axes", {}).get(axis)
        row.update({"data_source": c["data"]["source"], "image_size": c["data"]["image_size"],
                    "label_attribute": c["data"].get("label_attribute", "Smiling"),
                    "group_attribute": c["data"].get("group_attribute", "Male"),
                    "sampling": final.get("sampling", dp.get("sampling")), "delta": final.get("delta"),
                    "steps": final.get("steps"), "epochs": c["train"]["epochs"]})
        for acc in ACCOUNTANTS:
            row[f"epsilon_{acc}"] = eps.get(acc)
        row["reproducible"] = final.get("reproducible")
        row["privacy_note"] = final.get("privacy_note")
        row["wall_time_s"] = final.get("wall_time_s")
        # The audit's results are statistics of the training data without noise: labelled like the diagnostics.
        for k, v in ((final.get("audit") or {}).get("nonprivate") or {}).items():
            row[f"nonprivate_{k}"] = v
        metrics = dict(final.get("metrics", {}))
        metrics.update(_gap_intervals(metrics))
        for k in _FIRST_METRICS:
            if k in metrics:
                row[k] = metrics[k]
        for k in sorted(metrics):
            if k not in row:
                row[k] = metrics[k]
        rows.append(row)
    rows.sort(key=_row_sort_key)
    return rows


def _level_rank(level: str) -> int:
    return PRIVACY_ORDER.index(level) if level in PRIVACY_ORDER else len(PRIVACY_ORDER)


def _row_sort_key(row: Mapping[str, Any]) -> tuple:
    level = row["privacy_level"]
    rank = _level_rank(level)
    return (rank, level, _num(row["female_fraction"]), _num(row["l2_clip_norm"] or 0.0), row["variant"],
            int(row["seed"]), row["run"])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, list | tuple):
        return "x".join(_cell(x) for x in v)
    return str(v)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(k)) for k in columns])
    return buf.getvalue()


def _paper_match(paper: Sequence[Mapping[str, Any]], level: str, female_fraction: float,
                 clip: float | None) -> Mapping[str, Any] | None:
    for p in paper:
        if p["privacy"] != level or not math.isclose(p["female_pct"], 100 * female_fraction, abs_tol=1e-6):
            continue
        if level == "nondp" or (clip is not None and math.isclose(p["clip"], clip)):
            return p
    return None


# ------------------------------------------------------------------------------------------------ grouping


def _group_by(rows: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple, list[Mapping]]:
    out: dict[tuple, list[Mapping]] = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in keys)].append(row)
    return dict(out)


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when there are none."""
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return _nanmean(_num(r.get(key)) for r in rows)


def _reference_clip(rows: Sequence[Mapping[str, Any]]) -> float | None:
    clips = [r["l2_clip_norm"] for r in rows if r["dp_enabled"]]
    if not clips:
        return None
    if any(math.isclose(c, L2_CLIP_NORM) for c in clips):
        return L2_CLIP_NORM  # the paper's clip bound for the imbalance study
    return max(set(clips), key=clips.count)


def _imbalance_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    ref = _reference_clip(rows)
    return [r for r in rows if not r["dp_enabled"] or math.isclose(r["l2_clip_norm"], ref)]


def _series_label(level: str, variant: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if level == "nondp":
        label = "non-DP"
    else:
        eps = _mean(rows, "epsilon_pld")
        z = _mean(rows, "noise_multiplier")
        label = f"{level} (z={z:g}" + (f", ε={eps:.3g})" if not math.isnan(eps) else ")")
    return f"{label} {variant}".strip()


# ------------------------------------------------------------------------------------------------- tables


def table1(rows: Sequence[Mapping[str, Any]],
           female_fraction: float = 0.9) -> tuple[list[dict[str, Any]], float | None]:
    """Table 1: overall accuracy per privacy level and its change from non-DP, ours vs the paper.

    Uses the runs at ``female_fraction`` (the paper's 0.9; the nearest fraction present otherwise) and the
    reference clip bound (5 when present). Seeds are averaged. Returns (rows, fraction used).
    """
    rows = _imbalance_rows(rows)
    fractions = sorted({r["female_fraction"] for r in rows})
    if not fractions:
        return [], None
    ff = min(fractions, key=lambda f: (abs(f - female_fraction), f))
    at = [r for r in rows if r["female_fraction"] == ff]
    paper = paper_results()
    by_level = _group_by(at, ("privacy_level", "variant"))
    base_rows = [r for r in at if r["privacy_level"] == "nondp"]
    base = _mean(base_rows, "accuracy") if base_rows else math.nan
    paper_base = _paper_match(paper, "nondp", ff, None)
    out = []
    for (level, variant), rs in sorted(by_level.items(), key=lambda kv: _row_sort_key(kv[1][0])):
        clip = rs[0]["l2_clip_norm"]
        p = _paper_match(paper, level, ff, clip)
        acc = _mean(rs, "accuracy")
        out.append({
            "privacy_level": level, "variant": variant, "noise_multiplier": rs[0]["noise_multiplier"],
            "l2_clip_norm": clip, "female_fraction": ff, "seeds": len(rs),
            **{f"epsilon_{a}": _mean(rs, f"epsilon_{a}") if rs[0]["dp_enabled"] else None
               for a in ACCOUNTANTS},
            "accuracy": acc, "accuracy_ci_low": _mean(rs, "accuracy_ci_low"),
            "accuracy_ci_high": _mean(rs, "accuracy_ci_high"),
            "delta_vs_nondp": acc - base, "accuracy_female": _mean(rs, "accuracy_0"),
            "accuracy_male": _mean(rs, "accuracy_1"),
            "paper_epsilon": p["epsilon_paper"] if p else None,
            "paper_accuracy": p["acc_overall"] if p else None,
            "paper_delta_vs_nondp": (p["acc_overall"] - paper_base["acc_overall"])
            if p and paper_base else None,
        })
    return out, ff


def _f(v: Any, fmt: str = ".2f") -> str:
    v = _num(v)
    return "–" if math.isnan(v) else format(v, fmt)


def table1_markdown(rows: Sequence[Mapping[str, Any]], ff: float | None, note: str | None = None,
                    names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> str:
    """Table 1 as markdown, ours next to the paper's (paper values at the same privacy level and fraction);
    ``note`` (e.g. :func:`reproducible_note`) is printed under the table."""
    head = (f"**Table 1: overall test accuracy at {100 * (ff or 0):g}% {names[0]} and its change from the non-DP "
            f"baseline (percentage points); ours vs Farrand et al. 2020.**\n\n"
            "| privacy level | z | clip | ε (PLD) | ε (RDP) | ε (RDP, classic) | accuracy (%) [95% CI] | Δ vs "
            f"non-DP | {names[0]} / {names[1]} (%) | paper ε | paper accuracy (%) | paper Δ |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        ci = (f" [{_f(r['accuracy_ci_low'])}, {_f(r['accuracy_ci_high'])}]"
              if not math.isnan(_num(r["accuracy_ci_low"])) else "")
        level = r["privacy_level"] + (f" {r['variant']}" if r["variant"] else "")
        seeds = f" ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
        body.append(
            f"| {level}{seeds} | {_f(r['noise_multiplier'], 'g')} | {_f(r['l2_clip_norm'], 'g')} | "
            f"{_f(r['epsilon_pld'])} | {_f(r['epsilon_rdp'])} | {_f(r['epsilon_rdp_classic'])} | "
            f"{_f(r['accuracy'])}{ci} | {_f(r['delta_vs_nondp'], '+.2f')} | "
            f"{_f(r['accuracy_female'])} / {_f(r['accuracy_male'])} | {_f(r['paper_epsilon'], 'g')} | "
            f"{_f(r['paper_accuracy'])} | {_f(r['paper_delta_vs_nondp'], '+.2f')} |")
    return head + "\n".join(body) + "\n" + _note_text(note)


def _note_text(note: str | None) -> str:
    return f"\n{note}\n" if note else ""


def reproducible_note(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A paragraph for the tables when any run of summary ``rows`` was trained with ``dp.reproducible=True``.

    Such a run derives its batches and noise from ``train.seed``, which its config states; the sentence each
    run's ``final.json`` carries (``privacy_note``) says what that means for its epsilon. None when no run is
    reproducible.
    """
    runs = [r for r in rows if r.get("reproducible") is True]
    if not runs:
        return None
    notes = sorted({str(r["privacy_note"]) for r in runs if r.get("privacy_note")})
    return (f"**Reproducible runs: {len(runs)} of {len(rows)}** (`dp.reproducible=True`; column `reproducible` "
            f"of summary.csv): " + (" ".join(notes) if notes else "see their final.json."))


def _sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None (no spread to report) for fewer than two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def imbalance_drop(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's central comparison: how much accuracy each group loses as the data gets more imbalanced, per
    privacy level, and how much more (or less) the minority loses than without DP.

    Per series (privacy level, variant; the reference clip bound) and per female fraction above the smallest,
    for every seed with runs at both fractions: drop = accuracy at the smallest female fraction minus accuracy
    at this one (percentage points; positive = lost). ``male_drop_excess_vs_nondp`` pairs each seed with the
    non-DP run of the same seed (same ``data.seed`` and so the same subsets under ``seed`` replicates) and
    averages drop(level) - drop(non-DP): positive means DP made the minority lose more to imbalance, the
    paper's claim. Spreads are sample standard deviations over seeds (None for one seed: then only the per-run
    test intervals in summary.csv speak to the uncertainty). The paper's values come from its published rows
    at the same level, clip and fractions.
    """
    rows = _imbalance_rows(rows)
    fractions = sorted({r["female_fraction"] for r in rows})
    if len(fractions) < 2:
        return []
    lo_ff = fractions[0]
    paper = paper_results()

    def drops(rs: Sequence[Mapping[str, Any]], key: str, hi_ff: float) -> dict[int, float]:
        at = {(r["female_fraction"], int(r["seed"])): _num(r.get(key)) for r in rs}
        return {s: at[(lo_ff, s)] - at[(hi_ff, s)] for (ff, s) in at if ff == lo_ff and (hi_ff, s) in at}

    def paper_drop(level: str, clip: float | None, hi_ff: float) -> float | None:
        a, b = _paper_match(paper, level, lo_ff, clip), _paper_match(paper, level, hi_ff, clip)
        return a["acc_male"] - b["acc_male"] if a and b else None

    series = sorted(_group_by(rows, ("privacy_level", "variant")).items(), key=lambda kv: _row_sort_key(kv[1][0]))
    nondp = dict(series).get(("nondp", ""), [])
    out = []
    for (level, variant), rs in series:
        for hi_ff in fractions[1:]:
            male, female = drops(rs, "accuracy_1", hi_ff), drops(rs, "accuracy_0", hi_ff)
            if not male:
                continue
            seeds = sorted(male)
            base = drops(nondp, "accuracy_1", hi_ff)
            excess = [male[s] - base[s] for s in seeds if s in base] if level != "nondp" else []
            clip = rs[0]["l2_clip_norm"]
            p, p_base = paper_drop(level, clip, hi_ff), paper_drop("nondp", None, hi_ff)
            out.append({
                "privacy_level": level, "variant": variant, "noise_multiplier": rs[0]["noise_multiplier"],
                "l2_clip_norm": clip, "from_female_fraction": lo_ff, "to_female_fraction": hi_ff,
                "seeds": len(seeds), "male_drop_per_seed": ";".join(f"{male[s]:.2f}" for s in seeds),
                "male_drop_mean": sum(male.values()) / len(male), "male_drop_sd": _sd([male[s] for s in seeds]),
                "female_drop_mean": _nanmean(female.values()),
                "male_drop_excess_vs_nondp_mean": sum(excess) / len(excess) if excess else None,
                "male_drop_excess_vs_nondp_sd": _sd(excess) if excess else None,
                "paper_male_drop": p,
                "paper_male_drop_excess_vs_nondp": p - p_base if p is not None and p_base is not None
                and level != "nondp" else None,
            })
    return out


def imbalance_drop_markdown(rows: Sequence[Mapping[str, Any]], note: str | None = None,
                            names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> str:
    """:func:`imbalance_drop` as markdown; ``note`` (e.g. :func:`reproducible_note`) is printed under it. Its
    columns ``male_*`` / ``female_*`` are group 1's / group 0's; ``names`` names them in the text."""
    g0, g1 = names
    if not rows:
        return f"No series has runs at two or more {g0} fractions.\n" + _note_text(note)
    lo = rows[0]["from_female_fraction"]
    head = (f"**Accuracy lost from {100 * lo:g}% {g0} to each more imbalanced fraction (percentage points; "
            f"positive = lost), and the {g1} loss beyond non-DP's (same seeds paired); mean ± sample SD over "
            "seeds.**\n\n"
            f"| privacy level | z | clip | to % {g0} | seeds | {g1} drop per seed | {g1} drop | {g0} drop | "
            f"{g1} drop − non-DP's | paper {g1} drop | paper − non-DP's |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")

    def pm(mean: Any, sd: Any, fmt: str) -> str:
        return _f(mean, fmt) + ("" if math.isnan(_num(sd)) else f" ± {_f(sd, '.2f')}")

    body = [f"| {r['privacy_level']}{' ' + r['variant'] if r['variant'] else ''} | "
            f"{_f(r['noise_multiplier'], 'g')} | {_f(r['l2_clip_norm'], 'g')} | {100 * r['to_female_fraction']:g} | "
            f"{r['seeds']} | "
            f"{r['male_drop_per_seed'].replace(';', ', ')} | {pm(r['male_drop_mean'], r['male_drop_sd'], '.2f')} | "
            f"{_f(r['female_drop_mean'])} | "
            f"{pm(r['male_drop_excess_vs_nondp_mean'], r['male_drop_excess_vs_nondp_sd'], '+.2f')} | "
            f"{_f(r['paper_male_drop'])} | {_f(r['paper_male_drop_excess_vs_nondp'], '+.2f')} |" for r in rows]
    return head + "\n".join(body) + "\n" + _note_text(note)


# ------------------------------------------------------------------------------------------------ audit

AUDIT_BOUND = "nonprivate_epsilon_lower_bound"


def _reported_epsilon(row: Mapping[str, Any]) -> float:
    """The smallest epsilon the run reports (every accountant's is an upper bound; the tightest one counts)."""
    values = [_num(row.get(f"epsilon_{acc}")) for acc in ACCOUNTANTS]
    values = [v for v in values if not math.isnan(v)]
    return min(values) if values else math.inf


def audit_violations(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per run and group whose empirical lower bound on epsilon exceeds the epsilon the run reports.

    The lower bound holds with 95% confidence (``jaxdp.audit``); a bound above the reported epsilon means a bug in
    jaxdp's mechanism or accounting, or a 5% accident — never something to accept silently.
    """
    lines = []
    for r in rows:
        eps = _reported_epsilon(r)
        for g, name in _group_labels([r]):
            lb = _num(r.get(f"{AUDIT_BOUND}_{g}"))
            if not math.isnan(lb) and lb > eps:
                lines.append(f"{r['run']}: the audit's lower bound for {name} examples, {lb:.3f}, exceeds the "
                             f"reported epsilon {eps:.3f}")
    return lines


def audit_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The audited runs' per-group empirical privacy next to their reported epsilon (the rows of audit.csv)."""
    out = []
    for r in rows:
        if not any(k.startswith("nonprivate_mia_") or k.startswith(AUDIT_BOUND) for k in r):
            continue
        row: dict[str, Any] = {k: r.get(k) for k in ("run", "privacy_level", "female_fraction", "seed")}
        row["epsilon_reported"] = None if math.isinf(_reported_epsilon(r)) else _reported_epsilon(r)
        for g in ("0", "1"):
            for key in (f"{AUDIT_BOUND}_{g}", f"{AUDIT_BOUND}_max_{g}", f"nonprivate_mia_auc_{g}",
                        f"nonprivate_mia_auc_{g}_ci_low", f"nonprivate_mia_auc_{g}_ci_high",
                        f"nonprivate_mia_cal_auc_{g}", f"nonprivate_mia_cal_auc_{g}_ci_low",
                        f"nonprivate_mia_cal_auc_{g}_ci_high", f"nonprivate_mia_cal_tpr_at_fpr_0.01_{g}"):
                row[key] = r.get(key)
        out.append(row)
    return out


def audit_markdown(rows: Sequence[Mapping[str, Any]], violations: Sequence[str], note: str | None = None) -> str:
    head = ("# Empirical privacy per group (privacy audit)\n\n"
            "Non-private statistics of the training data: the audit's results are computed without noise. "
            "Lower bound: one-run audit (Steinke et al. 2023), 95% confidence, at the run's delta; it must stay "
            "below the reported epsilon. MIA: loss-threshold attack calibrated by the initial model, AUC with 95% "
            "interval (0.5 = chance).\n\n")
    n0, n1 = group_names(rows)
    lines = [f"| run | epsilon reported | lower bound {n0} / {n1} (most provable) | MIA AUC {n0} | MIA AUC {n1} |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for g in ("0", "1"):
            lo, hi = r.get(f"nonprivate_mia_cal_auc_{g}_ci_low"), r.get(f"nonprivate_mia_cal_auc_{g}_ci_high")
            cells.append(f"{_f(r.get(f'nonprivate_mia_cal_auc_{g}'), '.3f')} [{_f(lo, '.3f')}, {_f(hi, '.3f')}]")
        bounds = " / ".join(_f(r.get(f"{AUDIT_BOUND}_{g}"), ".3f") for g in ("0", "1"))
        most = " / ".join(_f(r.get(f"{AUDIT_BOUND}_max_{g}"), ".2f") for g in ("0", "1"))
        lines.append(f"| {r['run']} | {_f(r['epsilon_reported'])} | {bounds} ({most}) | {cells[0]} | {cells[1]} |")
    verdict = ("\n**AUDIT FAILURE** — a lower bound above the reported epsilon (a bug, or a 5% accident):\n"
               + "\n".join(f"- {v}" for v in violations) + "\n") if violations else \
        "\nNo lower bound exceeds its run's reported epsilon.\n"
    return head + "\n".join(lines) + "\n" + verdict + _note_text(note)


def figure_audit(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Empirical privacy per group vs imbalance and privacy level: the audit's lower bound beside the reported
    epsilon, and the calibrated membership-inference AUC."""
    rows = [r for r in _imbalance_rows(rows) if f"{AUDIT_BOUND}_0" in r or "nonprivate_mia_cal_auc_0" in r]
    xs = sorted({r["female_fraction"] for r in rows})
    if not xs:
        return "the audit figure needs audited runs (config.audit.enabled, e.g. configs/demo_audit.py)"
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = _group_labels(rows)
    for g, _ in labels:
        _plot_vs_category(a, rows, "female_fraction", xs, f"{AUDIT_BOUND}_{g}", **GROUP_STYLE[g], label=g == "0")
        _plot_vs_category(b, rows, "female_fraction", xs, f"nonprivate_mia_cal_auc_{g}", **GROUP_STYLE[g],
                          label=False)
    for (level,), rs in _group_by([r for r in rows if r["dp_enabled"]], ("privacy_level",)).items():
        eps = _nanmean(_reported_epsilon(r) for r in rs)
        a.axhline(eps, color=PRIVACY_COLORS.get(level, "0.3"), ls="-.", lw=1)
    a.plot([], [], color="0.3", ls="-.", label="reported ε (per level)")
    for g, name in labels:
        a.plot([], [], color="0.3", **GROUP_STYLE[g], label=name)
    a.set_yscale("symlog", linthresh=1.0)
    a.set_ylabel("ε lower bound (95%), one-run audit")
    a.set_title("(a) empirical ε per group, reported ε dash-dotted")
    _category_axis(a, xs, [_pct_label(x) for x in xs], _share_label(rows))
    b.axhline(0.5, color="0.5", lw=0.8)
    b.set_ylabel("membership-inference AUC (calibrated)")
    b.set_title("(b) membership inference per group (0.5 = chance)")
    _category_axis(b, xs, [_pct_label(x) for x in xs], _share_label(rows))
    _figure_legend(fig, (a, b))
    _suptitle(fig, f"Privacy audit (non-private statistics of the training data) — {_source_note(rows)}", rows)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ methods

METHOD_ORDER = ("dpsgd", "dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")  # jaxdp.methods.METHODS
NONDP = "non-DP"
METHOD_LABELS = {"dpsgd": "DP-SGD", "dpsgd_f": "DPSGD-F", "dpsgd_global": "Global",
                 "dpsgd_global_adapt": "Global-Adapt"}
# Misalignment cosines a history row carries (jaxdp.train.misalignment_cosines): non-private diagnostics.
MISALIGNMENT = ("unclipped", "clipped", "noised")
_METHOD_METRICS = ("accuracy", "accuracy_0", "accuracy_1", "delta_accuracy", "delta_demographic_parity",
                   "delta_equal_opportunity")


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER) + (method == NONDP)


def has_methods(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any run used a DP-fairness method (``config.dp.method`` other than plain DP-SGD)."""
    return any(r.get("method") not in (None, "dpsgd") for r in rows)


def methods_table(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path] | None = None) -> list[dict]:
    """The DP-fairness methods side by side, per privacy level and female fraction (the rows of methods.csv).

    One row per (privacy level, method, female fraction, clip bound), seeds averaged, with the non-DP runs of each
    fraction as method ``non-DP``: epsilon, each group's test accuracy and the gaps with their 95% intervals (a
    gap's by Newcombe's method, as in summary.csv; means over seeds of the runs' own intervals) and, from the runs'
    histories (``run_dirs``), the mean over training of the misalignment cosines per group
    (``nonprivate_cos_<clipped|noised>_<g>``: non-private diagnostics).
    """
    out = []
    keyed = _group_by(rows, ("privacy_level", "method", "female_fraction", "l2_clip_norm"))
    for (level, method, ff, clip), rs in keyed.items():
        name = method if method is not None else NONDP
        row: dict[str, Any] = {"privacy_level": level, "method": name, "female_fraction": ff, "l2_clip_norm": clip,
                               "noise_multiplier": rs[0]["noise_multiplier"], "seeds": len(rs),
                               "group_0": group_names(rs)[0], "group_1": group_names(rs)[1]}
        for acc in ACCOUNTANTS:
            row[f"epsilon_{acc}"] = _mean(rs, f"epsilon_{acc}") if rs[0]["dp_enabled"] else None
        for key in _METHOD_METRICS:
            row[key] = _mean(rs, key)
            row[f"{key}_ci_low"] = _mean(rs, f"{key}_ci_low")
            row[f"{key}_ci_high"] = _mean(rs, f"{key}_ci_high")
        if run_dirs is not None and rs[0]["dp_enabled"]:
            for direction in ("clipped", "noised"):
                for g in ("0", "1", "all"):
                    key = f"nonprivate_cos_{direction}_{g}"
                    row[key] = _nanmean(_history_mean(run_dirs[r["run"]], key) for r in rs)
        out.append(row)
    out.sort(key=lambda r: (_level_rank(r["privacy_level"]), r["privacy_level"], _num(r["female_fraction"]),
                            _method_rank(r["method"]), _num(r["l2_clip_norm"] or 0.0)))
    return out


def methods_markdown(rows: Sequence[Mapping[str, Any]], note: str | None = None) -> str:
    """:func:`methods_table` as markdown: accuracy per group, the gaps and epsilon, with 95% intervals."""
    if not rows:
        return "No finished runs.\n" + _note_text(note)
    n0, n1 = rows[0]["group_0"], rows[0]["group_1"]

    def ci(r: Mapping[str, Any], key: str, fmt: str = ".2f") -> str:
        lo, hi = _num(r.get(f"{key}_ci_low")), _num(r.get(f"{key}_ci_high"))
        interval = "" if math.isnan(lo) or math.isnan(hi) else f" [{_f(lo, fmt)}, {_f(hi, fmt)}]"
        return _f(r.get(key), fmt) + interval

    head = (f"**DP-fairness methods per group: test accuracy (%), the {n0} − {n1} accuracy gap (points), "
            f"|Δ demographic parity| and |Δ equal opportunity| (TPR gap), with 95% intervals; epsilon (PLD); "
            f"misalignment: the mean over training of cos(group's mean gradient, clipped / noised batch gradient), "
            f"a non-private diagnostic.**\n\n"
            f"| privacy level | % {n0} | method | ε (PLD) | accuracy {n0} | accuracy {n1} | gap {n0} − {n1} | "
            f"Δ DP | Δ EO | cos clipped {n0} / {n1} | cos noised {n0} / {n1} | seeds |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        cos = [" / ".join(_f(r.get(f"nonprivate_cos_{d}_{g}"), ".3f") for g in ("0", "1"))
               for d in ("clipped", "noised")]
        body.append(f"| {r['privacy_level']} | {100 * r['female_fraction']:g} | {r['method']} | "
                    f"{_f(r['epsilon_pld'])} | {ci(r, 'accuracy_0')} | {ci(r, 'accuracy_1')} | "
                    f"{ci(r, 'delta_accuracy')} | {ci(r, 'delta_demographic_parity', '.3f')} | "
                    f"{ci(r, 'delta_equal_opportunity', '.3f')} | {cos[0]} | {cos[1]} | {r['seeds']} |")
    return head + "\n".join(body) + "\n" + _note_text(note)


def figure_methods(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """The DP-fairness methods compared per group: accuracy of each group and the accuracy gap, per method (x),
    one column per privacy level, one colour per female fraction; non-DP runs as the last category."""
    if not has_methods(rows):
        return "the methods figure needs runs with a DP-fairness method (config.dp.method, configs/mitigations.py)"
    table = _with_gap_intervals(rows)
    levels = sorted({r["privacy_level"] for r in table if r["dp_enabled"]}, key=_level_rank)
    fractions = sorted({r["female_fraction"] for r in table})
    nondp = [r for r in table if not r["dp_enabled"]]
    plt = _plt()
    fig, axes = plt.subplots(2, len(levels), figsize=(max(7.5, 5.5 * len(levels)), 8), squeeze=False,
                             sharey="row")
    cmap = plt.get_cmap("viridis")
    labels = _group_labels(table)
    (_, n0), (_, n1) = labels
    for col, level in enumerate(levels):
        at = [r for r in table if r["privacy_level"] == level and r["dp_enabled"]]
        names = sorted({r["method"] for r in at}, key=_method_rank) + ([NONDP] if nondp else [])
        ticks = []
        for name in names:
            rs = nondp if name == NONDP else [r for r in at if r["method"] == name]
            eps = _mean(rs, "epsilon_pld")
            ticks.append(METHOD_LABELS.get(name, name) + ("" if math.isnan(eps) else f"\nε={eps:.3g}"))
        for i, ff in enumerate(fractions):
            color = cmap(i / max(len(fractions) - 1, 1))
            shift = 0.12 * (i - (len(fractions) - 1) / 2)
            for j, name in enumerate(names):
                rs = [r for r in (nondp if name == NONDP else at) if r["female_fraction"] == ff
                      and (name == NONDP or r["method"] == name)]
                if not rs:
                    continue
                for ax, keys in ((axes[0][col], ("accuracy_0", "accuracy_1")), (axes[1][col], ("delta_accuracy",))):
                    for k, key in enumerate(keys):
                        style = GROUP_STYLE[str(k)] if len(keys) == 2 else GROUP_STYLE["0"]
                        v, lo, hi = (_mean(rs, key), _mean(rs, f"{key}_ci_low"), _mean(rs, f"{key}_ci_high"))
                        e = _err(v, lo, hi)
                        ax.errorbar([j + shift + (0.04 * (2 * k - 1) if len(keys) == 2 else 0)], [v],
                                    yerr=[[e[0]], [e[1]]], color=color, marker=style["marker"],
                                    mfc=color if k == 0 else "white", ms=6, capsize=3, ls="none",
                                    label=f"{_pct_label(ff)} {n0}" if (j == 0 and k == 0 and col == 0) else None)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(ticks, fontsize=8)
            ax.set_xlim(-0.5, len(names) - 0.5)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"{level} privacy (z={_mean(at, 'noise_multiplier'):g})", fontsize=10)
        axes[1][col].axhline(0, color="0.5", lw=0.8)
    axes[0][0].set_ylabel(f"test accuracy (%): {n0} filled, {n1} hollow")
    axes[1][0].set_ylabel(f"Δ accuracy, {n0} − {n1} (pp)")
    for g, name in labels:
        axes[0][0].plot([], [], color="0.3", marker=GROUP_STYLE[g]["marker"], mfc="0.3" if g == "0" else "white",
                        ls="none", label=name)
    _figure_legend(fig, [axes[0][0]])
    _suptitle(fig, f"DP-fairness methods per group (mean over seeds; error bars: 95% CI, the gap's by Newcombe) — "
                   f"{_source_note(table)}", table)
    return _save(fig, path)


def _with_gap_intervals(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        r = dict(r)
        r.update({k: v for k, v in _gap_intervals(r).items() if k not in r})
        out.append(r)
    return out


def figure_misalignment(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path],
                        path: Path) -> Path | str:
    """Gradient misalignment over training (Esipova et al. 2023; a non-private diagnostic): per method (columns),
    the cosine between each group's mean unclipped gradient and the step's unclipped, clipped and noised batch
    gradient (rows), one colour per female fraction, group 0 solid, group 1 dashed; one privacy level (medium if
    present) and the first seed."""
    dp = [r for r in rows if r["dp_enabled"]]
    have = [r for r in dp if any(f"nonprivate_cos_clipped_{g}" in h for h in load_history(run_dirs[r["run"]])[:1]
                                 for g in ("0", "1"))]
    if not have:
        return ("the misalignment figure needs nonprivate_cos_* in the runs' histories, which private runs record "
                "with train.nonprivate_diagnostics=True and train.misalignment_examples_per_group > 0")
    level = next(lv for lv in ("medium", "low", "high", *sorted({r["privacy_level"] for r in have}))
                 if any(r["privacy_level"] == lv for r in have))
    at = [r for r in have if r["privacy_level"] == level]
    seed = min(int(r["seed"]) for r in at)
    at = [r for r in at if int(r["seed"]) == seed]
    names = sorted({r["method"] or "dpsgd" for r in at}, key=_method_rank)
    fractions = sorted({r["female_fraction"] for r in at})
    labels = _group_labels(at)
    plt = _plt()
    fig, axes = plt.subplots(len(MISALIGNMENT), len(names), figsize=(4.4 * len(names), 9), squeeze=False,
                             sharex=True, sharey=True, constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for col, name in enumerate(names):
        for i, ff in enumerate(fractions):
            color = cmap(i / max(len(fractions) - 1, 1))
            rs = [r for r in at if (r["method"] or "dpsgd") == name and r["female_fraction"] == ff]
            if not rs:
                continue
            hist = load_history(run_dirs[rs[0]["run"]])
            for row_i, direction in enumerate(MISALIGNMENT):
                ax = axes[row_i][col]
                for g, gname in labels:
                    ax.plot([h["step"] for h in hist], [_num(h.get(f"nonprivate_cos_{direction}_{g}")) for h in hist],
                            color=color, ls=GROUP_STYLE[g]["ls"], marker=GROUP_STYLE[g]["marker"], ms=3,
                            label=f"{_pct_label(ff)} {labels[0][1]}, {gname}")
        for row_i, direction in enumerate(MISALIGNMENT):
            ax = axes[row_i][col]
            ax.axhline(0, color="0.5", lw=0.8)
            ax.grid(alpha=0.3)
            if row_i == 0:
                ax.set_title(f"{METHOD_LABELS.get(name, name)}; non-private diagnostic", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"cos(group mean gradient,\n{direction} batch gradient)")
            if row_i == len(MISALIGNMENT) - 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(fontsize=7)
    _suptitle(fig, f"Gradient misalignment per group, a non-private diagnostic (training data without noise, not "
                   f"covered by ε): {level} privacy, seed {seed}\nunclipped → clipped: clipping's share; clipped → "
                   f"noised: the noise's ({labels[0][1]} solid, {labels[1][1]} dashed) — {_source_note(at)}", at)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(center: float, lo: float, hi: float) -> tuple[float, float]:
    if any(math.isnan(v) for v in (center, lo, hi)):
        return (0.0, 0.0)
    return (max(center - lo, 0.0), max(hi - center, 0.0))


def _abs_interval(d: float, lo: float, hi: float) -> tuple[float, float, float]:
    if lo <= 0.0 <= hi:
        return abs(d), 0.0, max(abs(lo), abs(hi))
    a, b = sorted((abs(lo), abs(hi)))
    return abs(d), a, b


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return path


def _pct_label(ff: float) -> str:
    return f"{100 * ff:g}%"


def _share_label(rows: Sequence[Mapping[str, Any]]) -> str:
    """The x-axis label of the imbalance axis (data.female_fraction is the share of group 0)."""
    return f"{group_names(rows)[0]} share of the data"


def _paper_comparable(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the paper's numbers describe the same question: smiling predicted, groups by Male."""
    return all((r.get("group_attribute") or "Male") == "Male" and (r.get("label_attribute") or "Smiling") == "Smiling"
               for r in rows)


def _paper_handle(ax: Any, rows: Sequence[Mapping[str, Any]] = ()) -> None:
    if _paper_comparable(rows):
        ax.plot([], [], color="0.4", ls=":", marker="o", mfc="none", label="paper (CelebA, ResNet18)")


def _plot_vs_category(ax: Any, rows: Sequence[Mapping[str, Any]], x_key: str, xs: Sequence[float],
                      value: str, *, scale: float = 1.0, absolute: bool = False, ls: str = "-",
                      marker: str = "o", label_suffix: str = "", paper_key: str | None = None,
                      paper_scale: float = 1.0, paper_ff: float | None = None, label: bool = True) -> None:
    """Mean over seeds of ``value`` per x category, one line per (privacy level, variant), CI error bars."""
    paper = paper_results()
    series = sorted(_group_by(rows, ("privacy_level", "variant")).items(),
                    key=lambda kv: _row_sort_key(kv[1][0]))
    for i, ((level, variant), rs) in enumerate(series):
        # Series side by side around each category, so overlapping error bars stay readable.
        pos = {x: j + 0.07 * (i - (len(series) - 1) / 2) for j, x in enumerate(xs)}
        color = PRIVACY_COLORS.get(level, "0.3")
        px, py, lo_err, hi_err = [], [], [], []
        for x, seed_rows in sorted(_group_by(rs, (x_key,)).items()):
            x = x[0]
            if x not in pos:
                continue
            vals = []
            for r in seed_rows:
                v, lo, hi = (_num(r.get(value)), _num(r.get(f"{value}_ci_low")),
                             _num(r.get(f"{value}_ci_high")))
                if absolute:
                    v, lo, hi = _abs_interval(v, lo, hi)
                vals.append((v * scale, lo * scale, hi * scale))
            if len(vals) > 1:
                ax.plot([pos[x]] * len(vals), [v[0] for v in vals], ".", color=color, alpha=0.3)
            v = sum(t[0] for t in vals) / len(vals)
            lo = sum(t[1] for t in vals) / len(vals)
            hi = sum(t[2] for t in vals) / len(vals)
            e = _err(v, lo, hi)
            px.append(pos[x])
            py.append(v)
            lo_err.append(e[0])
            hi_err.append(e[1])
        if not px:
            continue
        ax.errorbar(px, py, yerr=[lo_err, hi_err], color=color, ls=ls, marker=marker, ms=5, capsize=3,
                    label=(_series_label(level, variant, rs) + label_suffix) if label else None)
        if paper_key and not variant and _paper_comparable(rs):
            qx, qy = [], []
            for x in xs:
                ff = paper_ff if paper_ff is not None else x
                clip = x if x_key == "l2_clip_norm" else rs[0]["l2_clip_norm"]
                p = _paper_match(paper, level, ff, clip)
                if p is not None and p.get(paper_key) is not None:
                    qx.append(pos[x])
                    qy.append(abs(p[paper_key]) * paper_scale if absolute else p[paper_key] * paper_scale)
            if qx:
                ax.plot(qx, qy, color=color, ls=":", marker=marker, mfc="none", ms=6, lw=1, alpha=0.8)


def _figure_legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend under the panels (series, group line styles, the paper's style), never over the data."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(handles), 4), fontsize=8.5, frameon=False)


def _category_axis(ax: Any, xs: Sequence[float], labels: Sequence[str], xlabel: str) -> None:
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.4, len(xs) - 0.6)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _source_note(rows: Sequence[Mapping[str, Any]]) -> str:
    srcs = sorted({f"{r['data_source']} {r['image_size']}px" for r in rows})
    return f"ours: {', '.join(srcs)}"


def _suptitle(fig: Any, title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """The figure's title, with a second line when any of its runs' epsilon is void against seed-knowers."""
    reproducible = sum(r.get("reproducible") is True for r in rows)
    if reproducible:
        title += (f"\n{reproducible} of these {len(rows)} runs used dp.reproducible=True: their ε is no guarantee "
                  f"against anyone who knows train.seed")
    lines = title.count("\n") + 1
    if lines > 1 and not fig.get_constrained_layout():  # lift it clear of the panel titles
        fig.suptitle(title, fontsize=10, y=0.98 + 0.035 * (lines - 1))
    else:
        fig.suptitle(title, fontsize=10)


def figure_imbalance(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Paper Figure 1: per-group accuracy, and female - male accuracy gap, vs female share, per privacy level."""
    rows = _imbalance_rows(rows)
    xs = sorted({r["female_fraction"] for r in rows})
    if len(xs) < 2:
        return "Figure 1 needs runs at two or more female fractions"
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    (_, n0), (_, n1) = _group_labels(rows)
    _plot_vs_category(a, rows, "female_fraction", xs, "accuracy_0", paper_key="acc_female",
                      **GROUP_STYLE["0"], label_suffix="")
    _plot_vs_category(a, rows, "female_fraction", xs, "accuracy_1", paper_key="acc_male",
                      **GROUP_STYLE["1"], label=False)
    a.plot([], [], color="0.3", **GROUP_STYLE["0"], label=n0)
    a.plot([], [], color="0.3", **GROUP_STYLE["1"], label=n1)
    _paper_handle(a, rows)
    a.set_ylabel("test accuracy (%)")
    a.set_title("(a) accuracy per group")
    _category_axis(a, xs, [_pct_label(x) for x in xs], _share_label(rows))
    _plot_vs_category(b, rows, "female_fraction", xs, "delta_accuracy", paper_key="delta_acc")
    b.axhline(0, color="0.5", lw=0.8)
    b.set_ylabel(f"Δ accuracy, {n0} − {n1} (pp)")
    b.set_title("(b) accuracy gap (Figure 1)")
    _category_axis(b, xs, [_pct_label(x) for x in xs], _share_label(rows))
    _figure_legend(fig, (a, b))
    _suptitle(fig, f"Accuracy vs data imbalance at each privacy level — {_source_note(rows)}; error bars: "
                   f"95% CI", rows)
    return _save(fig, path)


def figure_clipping(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Paper Figure 2: accuracy per group and the gap vs the clip bound, per privacy level."""
    dp = [r for r in rows if r["dp_enabled"]]
    by_ff = _group_by(dp, ("female_fraction",))
    if not by_ff:
        return "Figure 2 needs DP runs"
    (ff,), rs = max(by_ff.items(), key=lambda kv: (len({r["l2_clip_norm"] for r in kv[1]}), -kv[0][0]))
    xs = sorted({r["l2_clip_norm"] for r in rs})
    if len(xs) < 2:
        return "Figure 2 needs DP runs at two or more clip bounds at one female fraction (configs/clipping.py)"
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    a, b = axes
    (_, n0), (_, n1) = _group_labels(rs)
    for group, style, name, paper_key in (("accuracy", "overall", "overall", "acc_overall"),
                                          ("accuracy_0", "0", n0, "acc_female"), ("accuracy_1", "1", n1, "acc_male")):
        _plot_vs_category(a, rs, "l2_clip_norm", xs, group, paper_key=paper_key, paper_ff=ff,
                          **GROUP_STYLE[style], label=style == "0")
        a.plot([], [], color="0.3", **GROUP_STYLE[style], label=name)
    _paper_handle(a, rs)
    a.set_ylabel("test accuracy (%)")
    a.set_title(f"(a) accuracy per group (overall / {n0} / {n1})")
    _category_axis(a, xs, [f"{x:g}" for x in xs], "L2 clip bound S")
    _plot_vs_category(b, rs, "l2_clip_norm", xs, "delta_accuracy", paper_key="delta_acc", paper_ff=ff)
    b.axhline(0, color="0.5", lw=0.8)
    b.set_ylabel(f"Δ accuracy, {n0} − {n1} (pp)")
    b.set_title("(b) accuracy gap")
    _category_axis(b, xs, [f"{x:g}" for x in xs], "L2 clip bound S")
    _figure_legend(fig, (a, b))
    _suptitle(fig, f"Accuracy vs gradient clip bound at {_pct_label(ff)} {n0} (Figure 2) — "
                   f"{_source_note(rs)}; error bars: 95% CI", rs)
    return _save(fig, path)


def _history_panel(ax: Any, run_dirs: Sequence[Path], title: str,
                   names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> None:
    hist = [load_history(d) for d in run_dirs]
    hist = [h for h in hist if h]
    if not hist:
        ax.set_title(title + " (no history)")
        return
    for key, style, name, color in (("accuracy", "overall", "overall", "black"),
                                    ("accuracy_0", "0", names[0], "#c44e52"),
                                    ("accuracy_1", "1", names[1], "#4c72b0")):
        steps = [r["step"] for r in hist[0]]
        n = min(len(h) for h in hist)
        ys = [sum(_num(h[i].get(key)) for h in hist) / len(hist) for i in range(n)]
        ax.plot(steps[:n], ys, color=color, ls=GROUP_STYLE[style]["ls"], label=name)
        lo = [sum(_num(h[i].get(f"{key}_ci_low")) for h in hist) / len(hist) for i in range(n)]
        hi = [sum(_num(h[i].get(f"{key}_ci_high")) for h in hist) / len(hist) for i in range(n)]
        if not any(math.isnan(v) for v in lo + hi):
            ax.fill_between(steps[:n], lo, hi, color=color, alpha=0.15, lw=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _dirs_of(run_dirs: Mapping[str, Path], rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    return [run_dirs[r["run"]] for r in rows]


def figure_training_by_privacy(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path],
                               path: Path) -> Path | str:
    """Paper Figure 3: accuracy by group vs training step, one panel per privacy level, least imbalance."""
    rows = _imbalance_rows(rows)
    if not rows:
        return "Figure 3 needs finished runs"
    ff = min(r["female_fraction"] for r in rows)
    panels = sorted(_group_by([r for r in rows if r["female_fraction"] == ff],
                            ("privacy_level", "variant")).items(), key=lambda kv: _row_sort_key(kv[1][0]))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, ((level, variant), rs) in zip(axes[0], panels, strict=True):
        _history_panel(ax, _dirs_of(run_dirs, rs), _series_label(level, variant, rs), group_names(rows))
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    _suptitle(fig, f"Accuracy by group during training at {_pct_label(ff)} {group_names(rows)[0]} (Figure 3); "
                   f"bands: 95% CI — {_source_note(rows)}", rows)
    return _save(fig, path)


def figure_training_by_imbalance(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path],
                                 path: Path) -> Path | str:
    """Paper Figure 4: accuracy by group vs training step, one panel per female fraction, medium privacy."""
    rows = _imbalance_rows(rows)
    levels = [lv for lv in ("medium", "low", "high") if any(r["privacy_level"] == lv for r in rows)]
    if not levels:
        return "Figure 4 needs DP runs"
    at = [r for r in rows if r["privacy_level"] == levels[0]]
    at = [r for r in at if r["variant"] == min(r["variant"] for r in at)]  # the plain series ("") when there is one
    panels = sorted(_group_by(at, ("female_fraction",)).items())
    if len(panels) < 2:
        return "Figure 4 needs DP runs at two or more female fractions"
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, ((ff,), rs) in zip(axes[0], panels, strict=True):
        _history_panel(ax, _dirs_of(run_dirs, rs), f"{_pct_label(ff)} {group_names(at)[0]}", group_names(at))
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    _suptitle(fig, f"Accuracy by group during training at each imbalance (Figure 4), "
                   f"{_series_label(levels[0], '', at)}; bands: 95% CI — {_source_note(at)}", at)
    return _save(fig, path)


def figure_fairness_gaps(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Paper Figure 5: |Δ demographic parity| and |Δ equal opportunity| vs female share, per privacy level."""
    rows = _imbalance_rows(rows)
    xs = sorted({r["female_fraction"] for r in rows})
    if len(xs) < 2:
        return "Figure 5 needs runs at two or more female fractions"
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, paper_key, title in (
            (a, "delta_demographic_parity", "delta_demp", "(a) |Δ demographic parity|"),
            (b, "delta_equal_opportunity", "delta_eo", "(b) |Δ equal opportunity| (TPR gap)")):
        _plot_vs_category(ax, rows, "female_fraction", xs, key, absolute=True, paper_key=paper_key)
        ax.set_title(title)
        ax.set_ylabel("absolute gap, {} vs {}".format(*group_names(rows)))
        _category_axis(ax, xs, [_pct_label(x) for x in xs], _share_label(rows))
    _paper_handle(a, rows)
    _figure_legend(fig, (a, b))
    _suptitle(fig, f"Fairness gaps vs data imbalance (Figure 5) — {_source_note(rows)}; error bars: 95% CI "
                   f"(Newcombe)", rows)
    return _save(fig, path)


def _history_mean(run_dir: Path, key: str) -> float:
    return _mean(load_history(run_dir), key)


def clip_stat_by_fraction(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path],
                          key: str) -> dict[float, float]:
    """Per female fraction: the mean over runs (seeds) of each run's mean of history column ``key``.

    ``run_dirs`` maps each row's ``run`` (its run name) to its directory (:func:`jaxdp_study.workdir.runs_by_name`).
    """
    return {ff: _nanmean(_history_mean(run_dirs[r["run"]], key) for r in seed_rows)
            for (ff,), seed_rows in _group_by(rows, ("female_fraction",)).items()}


def figure_clipping_diagnostics(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path],
                                path: Path) -> Path | str:
    """Per-group clipping: fraction of examples clipped and mean pre-clip gradient norm, vs imbalance and step.

    These are the runs' non-private diagnostics (``nonprivate_clip_fraction_g``, ``nonprivate_grad_norm_mean_g``
    of history.jsonl: statistics of the training data without noise, not covered by epsilon), and the figure's
    titles say so. Skipped when no run recorded them (``train.nonprivate_diagnostics=False``).
    """
    rows = [r for r in _imbalance_rows(rows) if r["dp_enabled"]]
    if not rows:
        return "clipping diagnostics need DP runs"
    labels = _group_labels(rows)
    (_, n0), (_, n1) = labels
    if not any(f"{key}_{g}" in r for r in rows for key in CLIP_DIAGNOSTICS for g in ("0", "1")):
        needed = " and ".join(f"{key}_0/1" for key in CLIP_DIAGNOSTICS)
        return (f"clipping per group (a non-private diagnostic) needs {needed} in the runs' results, which runs "
                f"record with train.nonprivate_diagnostics=True (runs written before these keys existed lack them too)")
    xs = sorted({r["female_fraction"] for r in rows})
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    pos = {x: i for i, x in enumerate(xs)}
    for col, (key, ylabel) in enumerate(zip(CLIP_DIAGNOSTICS, ("fraction of examples clipped",
                                                               "mean per-example gradient norm"), strict=True)):
        ax = axes[0][col]
        for (level, variant), rs in sorted(_group_by(rows, ("privacy_level", "variant")).items(),
                                           key=lambda kv: _row_sort_key(kv[1][0])):
            for g, _ in labels:
                pts = sorted((pos[ff], v) for ff, v in clip_stat_by_fraction(rs, run_dirs, f"{key}_{g}").items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=PRIVACY_COLORS.get(level, "0.3"),
                        ls=GROUP_STYLE[g]["ls"], marker=GROUP_STYLE[g]["marker"],
                        label=_series_label(level, variant, rs) if g == "0" else None)
        for g, name in labels:
            ax.plot([], [], color="0.3", ls=GROUP_STYLE[g]["ls"], marker=GROUP_STYLE[g]["marker"], label=name)
        _category_axis(ax, xs, [_pct_label(x) for x in xs], _share_label(rows))
        ax.set_ylabel(ylabel + "\n(mean over training)")
        ax.set_title(f"per {n0} share, mean over training; non-private diagnostic", fontsize=10)
        ax.legend(fontsize=7.5)
        level = next(lv for lv in ("medium", "low", "high", *sorted({r["privacy_level"] for r in rows}))
                     if any(r["privacy_level"] == lv for r in rows))
        ax = axes[1][col]
        cmap = plt.get_cmap("viridis")
        lv_rows = [r for r in rows if r["privacy_level"] == level]
        first_variant = min((r["variant"] for r in lv_rows), default="")  # the plain series ("") when there is one
        lv_rows = [r for r in lv_rows if r["variant"] == first_variant]
        first_seed = min((int(r["seed"]) for r in lv_rows), default=None)  # one seed's trajectories, named
        lv_rows = [r for r in lv_rows if int(r["seed"]) == first_seed]
        for i, ((ff,), rs) in enumerate(sorted(_group_by(lv_rows, ("female_fraction",)).items())):
            hist = load_history(run_dirs[rs[0]["run"]])
            color = cmap(i / max(len(xs) - 1, 1))
            for g, name in labels:
                ax.plot([h["step"] for h in hist], [_num(h.get(f"{key}_{g}")) for h in hist], color=color,
                        ls=GROUP_STYLE[g]["ls"], label=f"{_pct_label(ff)} {name}")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel + "\n(since previous evaluation)")
        ax.set_title(f"{level} privacy, per {n0} share (seed {lv_rows[0]['seed'] if lv_rows else '-'}); "
                     f"non-private diagnostic", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _suptitle(fig, f"Clipping per group, a non-private diagnostic (statistics of the training data without noise, "
                   f"not covered by ε)\nShare of training examples whose gradient was clipped, and their mean pre-clip "
                   f"L2 norm ({n0} solid, {n1} dashed) — {_source_note(rows)}", rows)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------- entry


def write_report(workdir: str | os.PathLike, *, figures: bool = True, verbose: bool = True) -> list[Path]:
    """Write summary.csv, table1.csv/.md, imbalance_drop.csv/.md and figures/*.png for ``workdir``; returns
    written paths."""
    root = Path(workdir)
    rows = summary_rows(root)
    run_dirs = runs_by_name(root)
    written: list[Path] = []
    (root / "summary.csv").write_text(_csv_text(rows))
    written.append(root / "summary.csv")
    note = reproducible_note(rows)
    t1, ff = table1(rows)
    (root / "table1.csv").write_text(_csv_text(t1))
    names = group_names(rows)
    (root / "table1.md").write_text(table1_markdown(t1, ff, note, names))
    written += [root / "table1.csv", root / "table1.md"]
    drop = imbalance_drop(rows)
    (root / "imbalance_drop.csv").write_text(_csv_text(drop))
    (root / "imbalance_drop.md").write_text(imbalance_drop_markdown(drop, note, names))
    written += [root / "imbalance_drop.csv", root / "imbalance_drop.md"]
    if has_methods(rows):
        comparison = methods_table(rows, run_dirs)
        (root / "methods.csv").write_text(_csv_text(comparison))
        (root / "methods.md").write_text(methods_markdown(comparison, note))
        written += [root / "methods.csv", root / "methods.md"]
    audited = audit_rows(rows)
    if audited:
        violations = audit_violations(rows)
        (root / "audit.csv").write_text(_csv_text(audited))
        (root / "audit.md").write_text(audit_markdown(audited, violations, note))
        written += [root / "audit.csv", root / "audit.md"]
        for line in violations:
            print(f"AUDIT FAILURE: {line}", file=sys.stderr)
    if figures and rows:
        fig_dir = root / "figures"
        fig_dir.mkdir(exist_ok=True)
        for result in (
                figure_imbalance(rows, fig_dir / "fig1_accuracy_vs_imbalance.png"),
                figure_clipping(rows, fig_dir / "fig2_accuracy_vs_clip.png"),
                figure_training_by_privacy(rows, run_dirs, fig_dir / "fig3_training_by_privacy.png"),
                figure_training_by_imbalance(rows, run_dirs, fig_dir / "fig4_training_by_imbalance.png"),
                figure_fairness_gaps(rows, fig_dir / "fig5_fairness_gaps_vs_imbalance.png"),
                figure_clipping_diagnostics(rows, run_dirs, fig_dir / "fig6_clipping_per_group.png"),
                figure_audit(rows, fig_dir / "fig7_privacy_audit.png"),
                figure_methods(rows, fig_dir / "fig8_methods_per_group.png"),
                figure_misalignment(rows, run_dirs, fig_dir / "fig9_misalignment.png")):
            if isinstance(result, Path):
                written.append(result)
            elif verbose:
                print(f"skipped: {result}")
    return written
