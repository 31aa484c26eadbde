"""The methods and audit sections: the DP-fairness methods side by side (methods.csv/.md, Figures 8-9) and the
privacy audit per group (audit.csv/.md, the AUDIT FAILURE flag, Figure 7)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdp.accounting import ACCOUNTANTS
from jaxdp.audit import DEFAULT_CONFIDENCE, epsilon_lower_bound
from jaxdp.methods import DISPLAY_NAMES, METHODS
from jaxdp_study.report import figures
from jaxdp_study.report.figures import (
    GROUP_STYLE,
    PRIVACY_COLORS,
    _category_axis,
    _err,
    _figure_legend,
    _pct_label,
    _plot_vs_category,
    _plt,
    _share_label,
    _source_note,
    _suptitle,
)
from jaxdp_study.report.summary import (
    GROUP_IDS,
    _f,
    _gap_intervals,
    _group_by,
    _group_labels,
    _history_mean,
    _imbalance_rows,
    _level_rank,
    _mean,
    _nanmean,
    _note_text,
    _num,
    group_names,
    imbalance_order,
    load_history,
)

# ------------------------------------------------------------------------------------------------ audit

AUDIT_BOUND = "nonprivate_epsilon_lower_bound"


def _reported_epsilon(row: Mapping[str, Any]) -> float:
    """The smallest epsilon the run reports (every accountant's is an upper bound; the tightest one counts)."""
    values = [_num(row.get(f"epsilon_{acc}")) for acc in ACCOUNTANTS]
    values = [v for v in values if not math.isnan(v)]
    return min(values) if values else math.inf


@dataclasses.dataclass(frozen=True)
class AuditTest:
    """One test of the AUDIT FAILURE flag: has the one-run audit of one group of one run refuted its reported ε?"""

    run: str
    group: str  # the group's name
    reported_epsilon: float
    bound: float  # the lower bound the run stored, at the run's own confidence (one test alone)
    confidence: float  # the run's config.audit.confidence
    counts: tuple[int, int, int] | None  # (k guesses, v correct, m canaries); None when final.json lacks them
    delta: float


def _audit_tests(rows: Sequence[Mapping[str, Any]]) -> list[AuditTest]:
    """Every (run, group) whose audit can refute the run's reported ε: a finite ε and a lower bound on it."""
    tests = []
    for r in rows:
        eps = _reported_epsilon(r)
        if math.isinf(eps):
            continue  # non-DP: nothing to refute
        for g, name in _group_labels([r]):
            bound = _num(r.get(f"{AUDIT_BOUND}_{g}"))
            if math.isnan(bound):
                continue
            counts = tuple(r.get(f"{AUDIT_BOUND}_{what}_{g}") for what in ("guesses", "correct", "canaries"))
            delta, confidence = _num(r.get("delta")), _num(r.get("audit_confidence"))
            known = not math.isnan(delta) and all(c is not None and not math.isnan(_num(c)) for c in counts)
            tests.append(AuditTest(r["run"], name, eps, bound,
                                   DEFAULT_CONFIDENCE if math.isnan(confidence) else confidence,
                                   tuple(int(c) for c in counts) if known else None, delta))
    return tests


def family_wise_alpha(rows: Sequence[Mapping[str, Any]]) -> float:
    """The false-alarm rate the AUDIT FAILURE flag keeps for a whole report: 1 - the runs' ``config.audit.confidence``
    (the strictest when they differ; :data:`jaxdp.audit.DEFAULT_CONFIDENCE` when no run states one)."""
    confidences = [c for c in (_num(r.get("audit_confidence")) for r in rows) if not math.isnan(c)]
    return 1.0 - max(confidences, default=DEFAULT_CONFIDENCE)


@functools.lru_cache(maxsize=65536)
def _lower_bound(k: int, v: int, delta: float, confidence: float, m: int) -> float:
    # Cached: a report's tests share few distinct (k, v, m), and each bound is a bisection of ~40 binomial tails.
    return epsilon_lower_bound(k, v, delta, confidence, num_canaries=m)


def audit_violations(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per run and group whose audit refutes the run's reported epsilon, corrected for the number of tests.

    Each audited group of each private run is one test (m of them in ``rows``). A flag is raised when the one-run
    lower bound (``jaxdp.audit.epsilon_lower_bound``), recomputed from the audit's stored counts (k guesses, v
    correct, m canaries) at confidence 1 - alpha/m, exceeds the reported epsilon: Bonferroni's correction, so
    that if every run's epsilon is true, the chance that *any* line is printed is at most alpha (1 - the runs'
    ``config.audit.confidence``, e.g. 5%) for the whole report. Flagging each test at its own 95% instead would
    raise a false alarm in up to 1 - 0.95^m of reports for independent tests (9.75% for one run's two groups,
    40% for a report of five runs). A line means a bug in jaxdp's mechanism or accounting, or an accident of
    probability at most alpha — never something to accept silently. A run whose final.json lacks the counts (or
    its delta) can only be tested at its own confidence: its line says so.
    """
    tests = _audit_tests(rows)
    alpha = family_wise_alpha(rows)
    confidence = 1.0 - alpha / max(len(tests), 1)
    lines = []
    for t in tests:
        start = f"{t.run}: the audit's lower bound for {t.group} examples"
        if t.counts is None:
            if t.bound > t.reported_epsilon:
                lines.append(f"{start}, {t.bound:.3f}, exceeds the reported epsilon {t.reported_epsilon:.3f} "
                             f"(at the run's own confidence {t.confidence:g}, not corrected for the report's "
                             f"{len(tests)} tests: its final.json lacks the audit's counts)")
            continue
        k, v, m = t.counts
        corrected = _lower_bound(k, v, t.delta, confidence, m)
        if corrected > t.reported_epsilon:
            lines.append(f"{start}, {corrected:.3f} at confidence {confidence:.6g} ({v} of {k} guesses right; "
                         f"Bonferroni over the report's {len(tests)} tests, family-wise false-alarm rate <= "
                         f"{alpha:g}), exceeds the reported epsilon {t.reported_epsilon:.3f}")
    return lines


def bonferroni_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the AUDIT FAILURE flag's correction is, in words, for the report's text."""
    tests, alpha = _audit_tests(rows), family_wise_alpha(rows)
    m, uncounted = len(tests), sum(t.counts is None for t in tests)
    missing = (f" {uncounted} of them lack the audit's counts in final.json and are tested at their run's own "
               "confidence only." if uncounted else "")
    return (f"The AUDIT FAILURE flag tests the {m} audited groups of private runs in this report together "
            f"(Bonferroni): each lower bound is recomputed from its counts at confidence 1 − {alpha:g}/{m} = "
            f"{1 - alpha / max(m, 1):.6g}, so the chance of any false alarm in the whole report is at most "
            f"{100 * alpha:g}% (each test at {100 * (1 - alpha):g}% alone would allow up to "
            f"{100 * (1 - (1 - alpha) ** m):.1f}% for independent tests)." + missing)


def audit_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The audited runs' per-group empirical privacy next to their reported epsilon (the rows of audit.csv).

    ``nonprivate_epsilon_lower_bound_bonferroni_g`` is the lower bound recomputed from the audit's counts at the
    confidence the AUDIT FAILURE flag uses (:func:`audit_violations`: 1 - alpha/m over the report's m tests); it
    changes when runs are added to the workdir, as a family-wise correction must.
    """
    tests = {(t.run, t.group): t for t in _audit_tests(rows)}
    confidence = 1.0 - family_wise_alpha(rows) / max(len(tests), 1)
    out = []
    for r in rows:
        if not any(k.startswith("nonprivate_mia_") or k.startswith(AUDIT_BOUND) for k in r):
            continue
        row: dict[str, Any] = {k: r.get(k) for k in ("run", "privacy_level", "female_fraction", "seed", "group_0",
                                                     "group_1")}
        row["epsilon_reported"] = None if math.isinf(_reported_epsilon(r)) else _reported_epsilon(r)
        for g, name in _group_labels([r]):
            test = tests.get((r["run"], name))
            for key in (f"{AUDIT_BOUND}_{g}", f"{AUDIT_BOUND}_max_{g}", f"{AUDIT_BOUND}_guesses_{g}",
                        f"{AUDIT_BOUND}_correct_{g}", f"{AUDIT_BOUND}_canaries_{g}"):
                row[key] = r.get(key)
            row[f"{AUDIT_BOUND}_bonferroni_{g}"] = _lower_bound(*test.counts[:2], test.delta, confidence,
                                                                test.counts[2]) if test and test.counts else None
            for key in (f"nonprivate_mia_auc_{g}", f"nonprivate_mia_auc_{g}_ci_low", f"nonprivate_mia_auc_{g}_ci_high",
                        f"nonprivate_mia_cal_auc_{g}", f"nonprivate_mia_cal_auc_{g}_ci_low",
                        f"nonprivate_mia_cal_auc_{g}_ci_high", f"nonprivate_mia_cal_tpr_at_fpr_0.01_{g}"):
                row[key] = r.get(key)
        out.append(row)
    return out


def audit_markdown(rows: Sequence[Mapping[str, Any]], violations: Sequence[str], note: str | None = None,
                   correction: str | None = None) -> str:
    """:func:`audit_rows` as markdown, with the verdict of :func:`audit_violations` and ``correction`` (what the
    flag corrects for: :func:`bonferroni_note`) under the table."""
    head = ("# Empirical privacy per group (privacy audit)\n\n"
            "Non-private statistics of the training data: the audit's results are computed without noise. "
            "Lower bound: one-run audit (Steinke et al. 2023), at the run's delta and its own confidence (95% "
            "unless config.audit.confidence says otherwise), then corrected for the number of tests; it must stay "
            "below the reported epsilon. MIA: loss-threshold attack calibrated by the initial model, AUC with 95% "
            "interval (0.5 = chance).\n\n")
    n0, n1 = group_names(rows)
    lines = [f"| run | epsilon reported | lower bound {n0} / {n1} (most provable) | corrected for all tests | "
             f"MIA AUC {n0} | MIA AUC {n1} |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for g in GROUP_IDS:
            lo, hi = r.get(f"nonprivate_mia_cal_auc_{g}_ci_low"), r.get(f"nonprivate_mia_cal_auc_{g}_ci_high")
            cells.append(f"{_f(r.get(f'nonprivate_mia_cal_auc_{g}'), '.3f')} [{_f(lo, '.3f')}, {_f(hi, '.3f')}]")
        bounds = " / ".join(_f(r.get(f"{AUDIT_BOUND}_{g}"), ".3f") for g in GROUP_IDS)
        most = " / ".join(_f(r.get(f"{AUDIT_BOUND}_max_{g}"), ".2f") for g in GROUP_IDS)
        corrected = " / ".join(_f(r.get(f"{AUDIT_BOUND}_bonferroni_{g}"), ".3f") for g in GROUP_IDS)
        lines.append(f"| {r['run']} | {_f(r['epsilon_reported'])} | {bounds} ({most}) | {corrected} | {cells[0]} | "
                     f"{cells[1]} |")
    verdict = ("\n**AUDIT FAILURE** — a lower bound above the reported epsilon (a bug, or an accident whose chance "
               "in the whole report is the family-wise rate below):\n"
               + "\n".join(f"- {v}" for v in violations) + "\n") if violations else \
        "\nNo lower bound exceeds its run's reported epsilon (corrected for the number of tests).\n"
    return head + "\n".join(lines) + "\n" + verdict + _note_text(correction) + _note_text(note)


def figure_audit(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Empirical privacy per group vs imbalance and privacy level: the audit's lower bound beside the reported
    epsilon, and the calibrated membership-inference AUC."""
    rows = [r for r in _imbalance_rows(rows) if f"{AUDIT_BOUND}_0" in r or "nonprivate_mia_cal_auc_0" in r]
    xs, _ = imbalance_order(r["female_fraction"] for r in rows)
    if not xs:
        return "the audit figure needs audited runs (config.audit.enabled, e.g. configs/demo_audit.py)"
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = _group_labels(rows)
    for g, _ in labels:
        _plot_vs_category(a, rows, "female_fraction", xs, f"{AUDIT_BOUND}_{g}", **GROUP_STYLE[g],
                          label=g == GROUP_IDS[0])
        _plot_vs_category(b, rows, "female_fraction", xs, f"nonprivate_mia_cal_auc_{g}", **GROUP_STYLE[g],
                          label=False)
    for (level,), rs in _group_by([r for r in rows if r["dp_enabled"]], ("privacy_level",)).items():
        eps = _nanmean(_reported_epsilon(r) for r in rs)
        a.axhline(eps, color=PRIVACY_COLORS.get(level, "0.3"), ls="-.", lw=1)
    a.plot([], [], color="0.3", ls="-.", label="reported ε (per level)")
    for g, name in labels:
        a.plot([], [], color="0.3", **GROUP_STYLE[g], label=name)
    a.set_yscale("symlog", linthresh=1.0)
    a.set_ylabel(f"ε lower bound ({100 * (1 - family_wise_alpha(rows)):g}% per test), one-run audit")
    a.set_title("(a) empirical ε per group, reported ε dash-dotted")
    _category_axis(a, xs, [_pct_label(x) for x in xs], _share_label(rows))
    b.axhline(0.5, color="0.5", lw=0.8)
    b.set_ylabel("membership-inference AUC (calibrated)")
    b.set_title("(b) membership inference per group (0.5 = chance)")
    _category_axis(b, xs, [_pct_label(x) for x in xs], _share_label(rows))
    _figure_legend(fig, (a, b))
    _suptitle(fig, f"Privacy audit (non-private statistics of the training data) — {_source_note(rows)}", rows)
    return figures.save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ methods

NONDP = "non-DP"
# Misalignment cosines a history row carries (jaxdp.train.misalignment_cosines): non-private diagnostics.
MISALIGNMENT = ("unclipped", "clipped", "noised")
_METHOD_METRICS = ("accuracy", "accuracy_0", "accuracy_1", "delta_accuracy", "delta_demographic_parity",
                   "delta_equal_opportunity")


def _method_rank(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS) + (method == NONDP)


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
                for g in (*GROUP_IDS, "all"):
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
        cos = [" / ".join(_f(r.get(f"nonprivate_cos_{d}_{g}"), ".3f") for g in GROUP_IDS)
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
            ticks.append(DISPLAY_NAMES.get(name, name) + ("" if math.isnan(eps) else f"\nε={eps:.3g}"))
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
                        style = GROUP_STYLE[GROUP_IDS[k]] if len(keys) == 2 else GROUP_STYLE[GROUP_IDS[0]]
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
        axes[0][0].plot([], [], color="0.3", marker=GROUP_STYLE[g]["marker"],
                        mfc="0.3" if g == GROUP_IDS[0] else "white", ls="none", label=name)
    _figure_legend(fig, [axes[0][0]])
    _suptitle(fig, f"DP-fairness methods per group (mean over seeds; error bars: 95% CI, the gap's by Newcombe) — "
                   f"{_source_note(table)}", table)
    return figures.save_figure(fig, path)


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
                                 for g in GROUP_IDS)]
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
                ax.set_title(f"{DISPLAY_NAMES.get(name, name)}; non-private diagnostic", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"cos(group mean gradient,\n{direction} batch gradient)")
            if row_i == len(MISALIGNMENT) - 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(fontsize=7)
    _suptitle(fig, f"Gradient misalignment per group, a non-private diagnostic (training data without noise, not "
                   f"covered by ε): {level} privacy, seed {seed}\nunclipped → clipped: clipping's share; clipped → "
                   f"noised: the noise's ({labels[0][1]} solid, {labels[1][1]} dashed) — {_source_note(at)}", at)
    return figures.save_figure(fig, path)


