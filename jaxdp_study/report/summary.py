"""Reading a sweep's runs: summary rows (one per finished run), summary.csv, and the helpers every table and
figure shares (grouping runs, group names, the paper's matching rows, number formatting)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdp.accounting import ACCOUNTANTS
from jaxdp.data.core import DEFAULT_GROUP_ATTRIBUTE, DEFAULT_LABEL_ATTRIBUTE, group_names_of
from jaxdp.fairness import GROUPS
from jaxdp_study import grid
from jaxdp_study.paper import L2_CLIP_NORM, PRIVACY_ORDER
from jaxdp_study.workdir import FINAL, read_run_record, runs_by_name

# The suffixes of per-group keys ("accuracy_0", "nonprivate_cos_clipped_1"): jaxdp.fairness's group ids.
GROUP_IDS = tuple(str(g) for g in GROUPS)
# Names for rows that carry neither group names nor a group attribute (hand-made rows, runs older than both).
DEFAULT_GROUP_NAMES = group_names_of(DEFAULT_GROUP_ATTRIBUTE)
# The gaps a paper figure plots, with the two per-group rates whose intervals give the gap's interval.
GAPS = {"delta_accuracy": "accuracy", "delta_demographic_parity": "demographic_parity",
        "delta_equal_opportunity": "tpr", "delta_fpr": "fpr"}
_FIRST_METRICS = ("accuracy", "accuracy_0", "accuracy_1", "delta_accuracy", "delta_demographic_parity",
                  "delta_equal_opportunity", "delta_fpr")
# Axes with their own summary column; any other swept axis gets a column of its own.
_KNOWN_AXES = ("privacy", "data.female_fraction", "dp.l2_clip_norm", "train.seed", "seed", "dp.privacy_level",
               "dp.method")


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


def _row_group_names(row: Mapping[str, Any]) -> tuple[str, str]:
    if row.get("group_0") is not None and row.get("group_1") is not None:
        return str(row["group_0"]), str(row["group_1"])
    return group_names_of(row.get("group_attribute") or DEFAULT_GROUP_ATTRIBUTE)


def group_names(rows: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """The names of group 0 and group 1 of summary ``rows``: the names their runs recorded (``final.json``'s
    ``group_names``, columns ``group_0`` and ``group_1``; e.g. ``("female", "male")``, ``("not Young", "Young")``
    or ``("white", "non-white")``), else :func:`jaxdp.data.core.group_names_of` their ``group_attribute``;
    ``("group 0", "group 1")`` when the runs name their groups differently."""
    names = {_row_group_names(r) for r in rows}
    if len(names) > 1:
        return "group 0", "group 1"
    return names.pop() if names else DEFAULT_GROUP_NAMES


def _group_labels(rows: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``((id of group 0, its name), (id of group 1, its name))``, ids as in :data:`GROUP_IDS`."""
    return tuple(zip(GROUP_IDS, group_names(rows), strict=True))


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


def _finished_runs(workdir: str | os.PathLike) -> list[tuple[dict, dict]]:
    """``(run record, final.json)`` of every finished run in ``workdir``, by run name."""
    dirs = runs_by_name(workdir)
    return [(read_run_record(dirs[name]), _read_json(dirs[name] / FINAL)) for name in sorted(dirs)
            if (dirs[name] / FINAL).exists()]


def _summary_row(record: Mapping[str, Any], final: Mapping[str, Any], extra_axes: Sequence[str]) -> dict[str, Any]:
    c = record["config"]
    dp, data = c["dp"], c["data"]
    eps = final.get("epsilon") or {}
    level = dp["privacy_level"] if dp["enabled"] else "nondp"
    row: dict[str, Any] = {
        "run": record["name"], "grids": ";".join(record.get("grids", [])), "privacy_level": level,
        "dp_enabled": bool(dp["enabled"]),
        # The z that ran: final.json's (calibrated when dp.target_epsilon is set), not the record's request.
        "noise_multiplier": final.get("noise_multiplier", dp["noise_multiplier"]) if dp["enabled"] else None,
        "l2_clip_norm": dp["l2_clip_norm"] if dp["enabled"] else None,
        "female_fraction": data["female_fraction"], "seed": c["train"]["seed"],
        "variant": grid.variant(record.get("axes", {})),
        "method": dp.get("method", "dpsgd") if dp["enabled"] else None,
    }
    for axis in extra_axes:
        row[axis] = record.get("axes", {}).get(axis)
    group_attribute = data.get("group_attribute", DEFAULT_GROUP_ATTRIBUTE)
    # The names the run recorded (its data source's), else those of its attribute (runs before final.json had them).
    names = final.get("group_names") or group_names_of(group_attribute)
    row.update({"data_source": data["source"], "image_size": data["image_size"],
                "input_shape": final.get("input_shape"),
                "label_attribute": data.get("label_attribute", DEFAULT_LABEL_ATTRIBUTE),
                "group_attribute": group_attribute, "group_0": names[0], "group_1": names[1],
                "sampling": final.get("sampling", dp.get("sampling")), "delta": final.get("delta"),
                "steps": final.get("steps"), "epochs": c["train"]["epochs"]})
    for acc in ACCOUNTANTS:
        row[f"epsilon_{acc}"] = eps.get(acc)
    row["reproducible"] = final.get("reproducible")
    row["privacy_note"] = final.get("privacy_note")
    row["wall_time_s"] = final.get("wall_time_s")
    audit = final.get("audit") or {}
    if audit:  # the confidence the audit ran at (final.json), else the one its config asked for
        row["audit_confidence"] = (audit.get("settings") or {}).get("confidence",
                                                                    (c.get("audit") or {}).get("confidence"))
    # The audit's results are statistics of the training data without noise: labelled like the diagnostics.
    for k, v in (audit.get("nonprivate") or {}).items():
        row[f"nonprivate_{k}"] = v
    metrics = dict(final.get("metrics", {}))
    metrics.update(_gap_intervals(metrics))
    for k in _FIRST_METRICS:
        if k in metrics:
            row[k] = metrics[k]
    for k in sorted(metrics):
        if k not in row:
            row[k] = metrics[k]
    return row


def summary_rows(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per finished run in ``workdir`` (the rows of summary.csv), sorted like the sweep.

    Everything about a run's settings comes from its run record (``sweep_run.json``: name, grids, axis values,
    resolved config), its results from ``final.json`` (also the names of its groups, ``group_names``, which its
    data source gave: columns ``group_0`` and ``group_1``); directory names are never read.
    """
    runs = _finished_runs(workdir)
    axes_seen = list(dict.fromkeys(axis for record, _ in runs for axis in record.get("axes", {})))
    extra_axes = [a for a in axes_seen if a not in _KNOWN_AXES]
    return sorted((_summary_row(record, final, extra_axes) for record, final in runs), key=_row_sort_key)


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


def imbalance_order(fractions: Iterable[float]) -> tuple[list[float], str]:
    """The fractions of group 0 (``data.female_fraction``) from the least to the most imbalanced, and the id of the
    group they make rarer (:data:`GROUP_IDS`).

    Group 1 when every fraction is at least 1/2 (the paper's study: 70% to 99.9% female, men ever rarer), group 0
    when every fraction is at most 1/2 (e.g. women in Adult, 33% down to 1%); runs on both sides of 1/2 are
    ordered as the paper's.

    >>> imbalance_order([0.99, 0.7, 0.9]), imbalance_order([0.05, 0.33, 0.2])
    (([0.7, 0.9, 0.99], '1'), ([0.33, 0.2, 0.05], '0'))
    """
    xs = sorted(set(fractions))
    if xs and xs[-1] <= 0.5 and xs[0] < 0.5:
        return xs[::-1], GROUP_IDS[0]
    return xs, GROUP_IDS[1]


def _series_label(level: str, variant: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if level == "nondp":
        label = "non-DP"
    else:
        eps = _mean(rows, "epsilon_pld")
        z = _mean(rows, "noise_multiplier")
        label = f"{level} (z={z:g}" + (f", ε={eps:.3g})" if not math.isnan(eps) else ")")
    return f"{label} {variant}".strip()


# ---------------------------------------------------------------------------------- shared helpers


def _f(v: Any, fmt: str = ".2f") -> str:
    v = _num(v)
    return "–" if math.isnan(v) else format(v, fmt)


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


def _abs_interval(d: float, lo: float, hi: float) -> tuple[float, float, float]:
    if lo <= 0.0 <= hi:
        return abs(d), 0.0, max(abs(lo), abs(hi))
    a, b = sorted((abs(lo), abs(hi)))
    return abs(d), a, b


def _paper_comparable(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the paper's numbers describe the same question: smiling predicted, groups by Male."""
    return all((r.get("group_attribute") or DEFAULT_GROUP_ATTRIBUTE) == DEFAULT_GROUP_ATTRIBUTE
               and (r.get("label_attribute") or DEFAULT_LABEL_ATTRIBUTE) == DEFAULT_LABEL_ATTRIBUTE for r in rows)


def _history_mean(run_dir: Path, key: str) -> float:
    return _mean(load_history(run_dir), key)

