"""The paper's tables: Table 1 (overall accuracy per privacy level, ours vs the paper's), the imbalance drop (each
group's accuracy lost to imbalance, and the minority's loss beyond non-DP's), and each group's accuracy and true
positive rate per series and fraction, over seeds (the numbers behind Figure 1)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdp.accounting import ACCOUNTANTS
from jaxdp_study.paper import paper_results
from jaxdp_study.report.summary import (
    DEFAULT_GROUP_NAMES,
    GROUP_IDS,
    _f,
    _group_by,
    _imbalance_rows,
    _mean,
    _note_text,
    _num,
    _paper_comparable,
    _paper_match,
    _row_sort_key,
    imbalance_order,
)

# The historical column names of the imbalance drop: female_* is group 0's, male_* group 1's, whatever their names.
_DROP_PREFIX = dict(zip(GROUP_IDS, ("female", "male"), strict=True))


def table1(rows: Sequence[Mapping[str, Any]],
           female_fraction: float = 0.9) -> tuple[list[dict[str, Any]], float | None]:
    """Table 1: overall accuracy per privacy level and its change from non-DP, ours vs the paper.

    Uses the runs at ``female_fraction`` (the paper's 0.9; the nearest fraction present otherwise) and the
    reference clip bound (5 when present). Seeds are averaged. The paper's columns are filled where its published
    rows match the setting and the runs ask its question (Smiling, groups by Male). Returns (rows, fraction
    used).
    """
    rows = _imbalance_rows(rows)
    fractions = sorted({r["female_fraction"] for r in rows})
    if not fractions:
        return [], None
    ff = min(fractions, key=lambda f: (abs(f - female_fraction), f))
    at = [r for r in rows if r["female_fraction"] == ff]
    paper = paper_results() if _paper_comparable(at) else []  # the paper's numbers answer its question only
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


def table1_markdown(rows: Sequence[Mapping[str, Any]], ff: float | None, note: str | None = None,
                    names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> str:
    """Table 1 as markdown, ours next to the paper's (paper values at the same privacy level and fraction);
    ``note`` (e.g. :func:`reproducible_note`) is printed under the table."""
    compared = any(r.get("paper_accuracy") is not None for r in rows)
    versus = "ours vs Farrand et al. 2020" if compared else "no published row of Farrand et al. 2020 matches these runs"
    head = (f"**Table 1: overall test accuracy at {100 * (ff or 0):g}% {names[0]} and its change from the non-DP "
            f"baseline (percentage points); {versus}.**\n\n"
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


def _sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None (no spread to report) for fewer than two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _drop_stats(rs: Sequence[Mapping[str, Any]], nondp: Sequence[Mapping[str, Any]], g: str, lo_ff: float,
                hi_ff: float, private: bool) -> dict[str, Any]:
    """Group ``g``'s accuracy drop from ``lo_ff`` to ``hi_ff`` per seed, its mean and SD, and its excess over the
    non-DP drop of the same seeds, under the historical column names (``female_*``: group 0, ``male_*``: 1)."""

    def drops(runs: Sequence[Mapping[str, Any]]) -> dict[int, float]:
        at = {(r["female_fraction"], int(r["seed"])): _num(r.get(f"accuracy_{g}")) for r in runs}
        return {s: at[(lo_ff, s)] - at[(hi_ff, s)] for (ff, s) in at if ff == lo_ff and (hi_ff, s) in at}

    drop, base = drops(rs), drops(nondp)
    seeds = sorted(drop)
    excess = [drop[s] - base[s] for s in seeds if s in base] if private else []
    prefix = _DROP_PREFIX[g]
    return {"seeds": len(seeds), f"{prefix}_drop_per_seed": ";".join(f"{drop[s]:.2f}" for s in seeds),
            f"{prefix}_drop_mean": sum(drop.values()) / len(drop) if drop else math.nan,
            f"{prefix}_drop_sd": _sd([drop[s] for s in seeds]),
            f"{prefix}_drop_excess_vs_nondp_mean": sum(excess) / len(excess) if excess else None,
            f"{prefix}_drop_excess_vs_nondp_sd": _sd(excess) if excess else None}


def imbalance_drop(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's central comparison: how much accuracy each group loses as the data gets more imbalanced, per
    privacy level, and how much more (or less) the minority loses than without DP.

    Per series (privacy level, variant; the reference clip bound) and per fraction of group 0 more imbalanced than
    the least imbalanced one (:func:`~jaxdp_study.report.summary.imbalance_order`: the smallest female fraction in
    the paper's study, the largest when group 0 is the one made rarer), for every seed with runs at both fractions:
    drop = accuracy at the least imbalanced fraction minus accuracy at this one (percentage points; positive =
    lost), for each group (``female_*`` is group 0's, ``male_*`` group 1's, whatever their names;
    ``minority_group`` says which one the fractions make rarer). ``*_drop_excess_vs_nondp`` pairs each seed with
    the non-DP run of the same seed (same ``data.seed`` and so the same subsets under ``seed`` replicates) and
    averages drop(level) - drop(non-DP): positive for the minority means DP made it lose more to imbalance, the
    paper's claim. Spreads are sample standard deviations over seeds (None for one seed: then only the per-run
    test intervals in summary.csv speak to the uncertainty). The paper's values come from its published rows at
    the same level, clip and fractions, for runs that ask the paper's question (smiling, groups by Male).
    """
    rows = _imbalance_rows(rows)
    fractions, minority = imbalance_order(r["female_fraction"] for r in rows)
    if len(fractions) < 2:
        return []
    lo_ff = fractions[0]
    paper = paper_results() if _paper_comparable(rows) else []

    def paper_drop(level: str, clip: float | None, hi_ff: float) -> float | None:
        a, b = _paper_match(paper, level, lo_ff, clip), _paper_match(paper, level, hi_ff, clip)
        return a["acc_male"] - b["acc_male"] if a and b else None

    series = sorted(_group_by(rows, ("privacy_level", "variant")).items(), key=lambda kv: _row_sort_key(kv[1][0]))
    nondp = dict(series).get(("nondp", ""), [])
    out = []
    for (level, variant), rs in series:
        for hi_ff in fractions[1:]:
            male, female = (_drop_stats(rs, nondp, g, lo_ff, hi_ff, level != "nondp") for g in GROUP_IDS[::-1])
            if not male["seeds"]:
                continue
            clip = rs[0]["l2_clip_norm"]
            p, p_base = paper_drop(level, clip, hi_ff), paper_drop("nondp", None, hi_ff)
            out.append({
                "privacy_level": level, "variant": variant, "noise_multiplier": rs[0]["noise_multiplier"],
                "l2_clip_norm": clip, "from_female_fraction": lo_ff, "to_female_fraction": hi_ff,
                "minority_group": minority, **male, **female,
                "paper_male_drop": p,
                "paper_male_drop_excess_vs_nondp": p - p_base if p is not None and p_base is not None
                and level != "nondp" else None,
            })
    return out


def imbalance_drop_markdown(rows: Sequence[Mapping[str, Any]], note: str | None = None,
                            names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> str:
    """:func:`imbalance_drop` as markdown, the minority's drop first; ``note`` (e.g. :func:`reproducible_note`) is
    printed under it. ``names`` names group 0 and group 1 (whose columns are ``female_*`` and ``male_*``)."""
    g0 = names[0]
    if not rows:
        return f"No series has runs at two or more {g0} fractions.\n" + _note_text(note)
    lo = rows[0]["from_female_fraction"]
    minority = GROUP_IDS.index(str(rows[0].get("minority_group", GROUP_IDS[1])))
    rare, other = names[minority], names[1 - minority]
    m, o = _DROP_PREFIX[GROUP_IDS[minority]], _DROP_PREFIX[GROUP_IDS[1 - minority]]
    head = (f"**Accuracy lost from {100 * lo:g}% {g0} to each more imbalanced fraction (percentage points; "
            f"positive = lost), and the {rare} loss beyond non-DP's (same seeds paired); mean ± sample SD over "
            "seeds.**\n\n"
            f"| privacy level | z | clip | to % {g0} | seeds | {rare} drop per seed | {rare} drop | {other} drop | "
            f"{rare} drop − non-DP's | paper {rare} drop | paper − non-DP's |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")

    def pm(mean: Any, sd: Any, fmt: str) -> str:
        return _f(mean, fmt) + ("" if math.isnan(_num(sd)) else f" ± {_f(sd, '.2f')}")

    body = [f"| {r['privacy_level']}{' ' + r['variant'] if r['variant'] else ''} | "
            f"{_f(r['noise_multiplier'], 'g')} | {_f(r['l2_clip_norm'], 'g')} | {100 * r['to_female_fraction']:g} | "
            f"{r['seeds']} | "
            f"{r[f'{m}_drop_per_seed'].replace(';', ', ')} | {pm(r[f'{m}_drop_mean'], r[f'{m}_drop_sd'], '.2f')} | "
            f"{_f(r[f'{o}_drop_mean'])} | "
            f"{pm(r[f'{m}_drop_excess_vs_nondp_mean'], r[f'{m}_drop_excess_vs_nondp_sd'], '+.2f')} | "
            f"{_f(r['paper_male_drop'])} | {_f(r['paper_male_drop_excess_vs_nondp'], '+.2f')} |" for r in rows]
    return head + "\n".join(body) + "\n" + _note_text(note)


def group_accuracy(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each group's test accuracy and true positive rate per series (privacy level, variant) and fraction of group
    0, over the seeds: the mean, the sample SD between seeds (None for one seed) and the mean of the runs' own 95%
    intervals (test-sampling uncertainty of one run). Every run counts (every clip bound, every method: the variant
    names them), ordered like summary.csv."""
    out = []
    cells = _group_by(rows, ("privacy_level", "variant", "l2_clip_norm", "female_fraction"))
    for (level, variant, clip, ff), rs in sorted(cells.items(), key=lambda kv: _row_sort_key(kv[1][0])):
        row: dict[str, Any] = {"privacy_level": level, "variant": variant, "l2_clip_norm": clip,
                               "female_fraction": ff, "seeds": len(rs),
                               "epsilon_pld": _mean(rs, "epsilon_pld") if rs[0]["dp_enabled"] else None}
        for g in GROUP_IDS:
            for rate in ("accuracy", "tpr"):
                values = [_num(r.get(f"{rate}_{g}")) for r in rs]
                row[f"{rate}_{g}_mean"] = _mean(rs, f"{rate}_{g}")
                row[f"{rate}_{g}_sd"] = _sd([v for v in values if not math.isnan(v)])
                row[f"{rate}_{g}_ci_low"] = _mean(rs, f"{rate}_{g}_ci_low")
                row[f"{rate}_{g}_ci_high"] = _mean(rs, f"{rate}_{g}_ci_high")
        out.append(row)
    return out


def group_accuracy_markdown(rows: Sequence[Mapping[str, Any]], note: str | None = None,
                            names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> str:
    """:func:`group_accuracy` as markdown: accuracy (%) and TPR as ``mean ± SD over seeds [mean 95% CI]``."""
    head = (f"**Each group's test accuracy (%) and true positive rate per fraction of {names[0]}: mean ± sample SD "
            "over seeds [mean of the runs' 95% intervals].**\n\n"
            f"| privacy level | clip | ε (PLD) | % {names[0]} | seeds | accuracy {names[0]} | accuracy {names[1]} | "
            f"TPR {names[0]} | TPR {names[1]} |\n|---|---|---|---|---|---|---|---|---|\n")

    def cell(r: Mapping[str, Any], key: str, fmt: str) -> str:
        sd = "" if r[f"{key}_sd"] is None else f" ± {_f(r[f'{key}_sd'], fmt)}"
        return f"{_f(r[f'{key}_mean'], fmt)}{sd} [{_f(r[f'{key}_ci_low'], fmt)}, {_f(r[f'{key}_ci_high'], fmt)}]"

    body = [f"| {r['privacy_level']}{' ' + r['variant'] if r['variant'] else ''} | {_f(r['l2_clip_norm'], 'g')} | "
            f"{_f(r['epsilon_pld'])} | {100 * r['female_fraction']:g} | {r['seeds']} | "
            + " | ".join(cell(r, f"{rate}_{g}", ".2f" if rate == "accuracy" else ".3f")
                         for rate in ("accuracy", "tpr") for g in GROUP_IDS) + " |" for r in rows]
    return head + "\n".join(body) + "\n" + _note_text(note)
