"""The paper's figures (1-5) and the per-group clipping diagnostics, and the plotting helpers the methods and
audit figures share. Every figure is written by :func:`save_figure`."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdp.runlog import write_atomic
from jaxdp_study.paper import paper_results
from jaxdp_study.report.summary import (
    DEFAULT_GROUP_NAMES,
    GROUP_IDS,
    _abs_interval,
    _group_by,
    _group_labels,
    _history_mean,
    _imbalance_rows,
    _nanmean,
    _num,
    _paper_comparable,
    _paper_match,
    _row_sort_key,
    _series_label,
    group_names,
    imbalance_order,
    load_history,
)

PRIVACY_COLORS = {"high": "#d62728", "medium": "#ff7f0e", "low": "#2ca02c", "nondp": "#1f77b4"}
# Group 0 solid with circles, group 1 dashed with squares; the overall accuracy dotted.
GROUP_STYLE = {**dict(zip(GROUP_IDS, (dict(ls="-", marker="o"), dict(ls="--", marker="s")), strict=True)),
               "overall": dict(ls=":", marker="^")}
# History keys of the per-group clipping diagnostics (suffix _0 / _1): training-data statistics without noise.
CLIP_DIAGNOSTICS = ("nonprivate_clip_fraction", "nonprivate_grad_norm_mean")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(center: float, lo: float, hi: float) -> tuple[float, float]:
    if any(math.isnan(v) for v in (center, lo, hi)):
        return (0.0, 0.0)
    return (max(center - lo, 0.0), max(hi - center, 0.0))


def save_figure(fig: Any, path: Path) -> Path:
    """Renders ``fig`` in memory (format from the suffix of ``path``) and writes it with the one atomic writer,
    :func:`jaxdp.runlog.write_atomic`, so that a kill mid-write never leaves a truncated image; closes ``fig``."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight",
                    metadata={"Software": None})
    finally:
        _plt().close(fig)
    return write_atomic(path, buffer.getvalue())


def _pct_label(ff: float) -> str:
    return f"{100 * ff:g}%"


def _share_label(rows: Sequence[Mapping[str, Any]]) -> str:
    """The x-axis label of the imbalance axis (data.female_fraction is the share of group 0)."""
    return f"{group_names(rows)[0]} share of the data"


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


def _input_note(row: Mapping[str, Any]) -> str:
    """``"synthetic 32px"`` for images, ``"adult, 104 features"`` for feature vectors: from the shape the run
    recorded (final.json's ``input_shape``), else from ``data.image_size`` (runs before input_shape was recorded)."""
    shape = row.get("input_shape")
    if isinstance(shape, list | tuple) and len(shape) == 1:
        return f"{row['data_source']}, {shape[0]} features"
    if isinstance(shape, list | tuple) and len(shape) == 3:
        return f"{row['data_source']} {shape[0]}px" if shape[0] == shape[1] else \
            f"{row['data_source']} {shape[0]}x{shape[1]}px"
    if shape or row.get("image_size") is None:
        return str(row["data_source"])
    return f"{row['data_source']} {row['image_size']}px"


def _source_note(rows: Sequence[Mapping[str, Any]]) -> str:
    return f"ours: {', '.join(sorted({_input_note(r) for r in rows}))}"


def _fractions_needed(what: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Why a figure is skipped: it needs runs at two or more fractions of group 0."""
    return f"{what} at two or more {group_names(rows)[0]} fractions (data.female_fraction)"


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
    xs, _ = imbalance_order(r["female_fraction"] for r in rows)
    if len(xs) < 2:
        return _fractions_needed("Figure 1 needs runs", rows)
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    (_, n0), (_, n1) = _group_labels(rows)
    _plot_vs_category(a, rows, "female_fraction", xs, "accuracy_0", paper_key="acc_female",
                      **GROUP_STYLE[GROUP_IDS[0]], label_suffix="")
    _plot_vs_category(a, rows, "female_fraction", xs, "accuracy_1", paper_key="acc_male",
                      **GROUP_STYLE[GROUP_IDS[1]], label=False)
    a.plot([], [], color="0.3", **GROUP_STYLE[GROUP_IDS[0]], label=n0)
    a.plot([], [], color="0.3", **GROUP_STYLE[GROUP_IDS[1]], label=n1)
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
    return save_figure(fig, path)


def figure_clipping(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Paper Figure 2: accuracy per group and the gap vs the clip bound, per privacy level."""
    dp = [r for r in rows if r["dp_enabled"]]
    by_ff = _group_by(dp, ("female_fraction",))
    if not by_ff:
        return "Figure 2 needs DP runs"
    (ff,), rs = max(by_ff.items(), key=lambda kv: (len({r["l2_clip_norm"] for r in kv[1]}), -kv[0][0]))
    xs = sorted({r["l2_clip_norm"] for r in rs})
    if len(xs) < 2:
        return (f"Figure 2 needs DP runs at two or more clip bounds at one {group_names(rs)[0]} fraction "
                "(configs/clipping.py)")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    a, b = axes
    (_, n0), (_, n1) = _group_labels(rs)
    for group, style, name, paper_key in (("accuracy", "overall", "overall", "acc_overall"),
                                          ("accuracy_0", GROUP_IDS[0], n0, "acc_female"),
                                          ("accuracy_1", GROUP_IDS[1], n1, "acc_male")):
        _plot_vs_category(a, rs, "l2_clip_norm", xs, group, paper_key=paper_key, paper_ff=ff,
                          **GROUP_STYLE[style], label=style == GROUP_IDS[0])
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
    return save_figure(fig, path)


def _history_panel(ax: Any, run_dirs: Sequence[Path], title: str,
                   names: tuple[str, str] = DEFAULT_GROUP_NAMES) -> None:
    hist = [load_history(d) for d in run_dirs]
    hist = [h for h in hist if h]
    if not hist:
        ax.set_title(title + " (no history)")
        return
    for key, style, name, color in (("accuracy", "overall", "overall", "black"),
                                    ("accuracy_0", GROUP_IDS[0], names[0], "#c44e52"),
                                    ("accuracy_1", GROUP_IDS[1], names[1], "#4c72b0")):
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
    ff = imbalance_order(r["female_fraction"] for r in rows)[0][0]  # the least imbalanced
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
    return save_figure(fig, path)


def figure_training_by_imbalance(rows: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path],
                                 path: Path) -> Path | str:
    """Paper Figure 4: accuracy by group vs training step, one panel per female fraction, medium privacy."""
    rows = _imbalance_rows(rows)
    levels = [lv for lv in ("medium", "low", "high") if any(r["privacy_level"] == lv for r in rows)]
    if not levels:
        return "Figure 4 needs DP runs"
    at = [r for r in rows if r["privacy_level"] == levels[0]]
    at = [r for r in at if r["variant"] == min(r["variant"] for r in at)]  # the plain series ("") when there is one
    order, _ = imbalance_order(r["female_fraction"] for r in at)
    panels = sorted(_group_by(at, ("female_fraction",)).items(), key=lambda kv: order.index(kv[0][0]))
    if len(panels) < 2:
        return _fractions_needed("Figure 4 needs DP runs", at)
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, ((ff,), rs) in zip(axes[0], panels, strict=True):
        _history_panel(ax, _dirs_of(run_dirs, rs), f"{_pct_label(ff)} {group_names(at)[0]}", group_names(at))
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    _suptitle(fig, f"Accuracy by group during training at each imbalance (Figure 4), "
                   f"{_series_label(levels[0], '', at)}; bands: 95% CI — {_source_note(at)}", at)
    return save_figure(fig, path)


def figure_fairness_gaps(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | str:
    """Paper Figure 5: |Δ demographic parity| and |Δ equal opportunity| vs female share, per privacy level."""
    rows = _imbalance_rows(rows)
    xs, _ = imbalance_order(r["female_fraction"] for r in rows)
    if len(xs) < 2:
        return _fractions_needed("Figure 5 needs runs", rows)
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
    return save_figure(fig, path)


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
    if not any(f"{key}_{g}" in r for r in rows for key in CLIP_DIAGNOSTICS for g in GROUP_IDS):
        needed = " and ".join(f"{key}_0/1" for key in CLIP_DIAGNOSTICS)
        return (f"clipping per group (a non-private diagnostic) needs {needed} in the runs' results, which runs "
                f"record with train.nonprivate_diagnostics=True (runs written before these keys existed lack them too)")
    xs, _ = imbalance_order(r["female_fraction"] for r in rows)
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
                        label=_series_label(level, variant, rs) if g == GROUP_IDS[0] else None)
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
    return save_figure(fig, path)


