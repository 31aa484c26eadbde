"""The paper's tables: Table 1 (overall accuracy per privacy level, ours vs the paper's) and the imbalance drop
(each group's accuracy lost to imbalance, and the minority's loss beyond non-DP's)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdp.accounting import ACCOUNTANTS
from jaxdp_study.paper import paper_results
from jaxdp_study.report.summary import (
    DEFAULT_GROUP_NAMES,
    _f,
    _group_by,
    _imbalance_rows,
    _mean,
    _nanmean,
    _note_text,
    _num,
    _paper_match,
    _row_sort_key,
)


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


