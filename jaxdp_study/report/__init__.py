"""Tables and figures of a sweep working directory, with the paper's published numbers alongside.

:func:`write_report` reads every run directory under a workdir (``sweep_run.json`` + ``final.json`` +
``history.jsonl``) and writes, without training anything:

- ``summary.csv``: one row per finished run — swept axes, privacy level, noise multiplier, clip bound, the
  names of its groups (``group_0``, ``group_1``), epsilon under each accountant, ``reproducible`` and
  ``privacy_note`` (from final.json), every final test metric with its 95% confidence interval, and the run's
  last non-private diagnostics (columns ``nonprivate_*``, as the trainer names them: training-data statistics
  without noise, not covered by epsilon) when it recorded them;
- ``table1.csv`` / ``table1.md``: the paper's Table 1 (overall accuracy per privacy level and its drop from the
  non-DP baseline at 90% female), ours next to the paper's;
- ``imbalance_drop.csv`` / ``imbalance_drop.md``: the paper's central comparison — per privacy level, each
  group's accuracy lost from the least imbalanced fraction to each more imbalanced one, and the minority's loss
  beyond non-DP's, per seed and as mean ± SD over seeds (:func:`imbalance_drop`);
- ``group_accuracy.csv`` / ``group_accuracy.md``: each group's test accuracy and true positive rate per series
  and fraction, mean ± SD over seeds and the mean of the runs' 95% intervals (:func:`group_accuracy`; the numbers
  behind Figure 1, and the TPR, which shows what accuracy hides when a group's base rate is far from 1/2);
- ``methods.csv`` / ``methods.md`` (when any run used a DP-fairness method, ``config.dp.method``): the methods
  side by side per privacy level and fraction — each group's accuracy, the gaps, epsilon, 95% intervals, and the
  mean misalignment cosines (non-private) — with the non-DP runs as a baseline (:func:`methods_table`);
- ``audit.csv`` / ``audit.md`` (when any run was audited, ``config.audit.enabled``): each group's one-run lower
  bound on epsilon next to the reported epsilon, and the membership-inference AUC. A lower bound above the
  reported epsilon is flagged ("AUDIT FAILURE", also on stderr) after a Bonferroni correction over the report's
  audited groups of private runs (:func:`audit_violations`): the chance of any false alarm in the whole report
  is at most 1 - ``config.audit.confidence`` (5%), and the tables say so (:func:`bonferroni_note`);
- ``figures/``: Figure 1 (per-group accuracy and its gap vs imbalance), Figure 2 (clip bound), Figures 3-4
  (accuracy by group vs training step, per privacy level / per imbalance), Figure 5 (demographic-parity and
  equal-opportunity gaps vs imbalance), the per-group clipping diagnostics (non-private, and titled so), the
  privacy audit, the methods per group (Figure 8) and the gradient misalignment over training (Figure 9,
  non-private, titled so). The paper's values (:func:`jaxdp_study.paper.paper_results`) are drawn as hollow
  markers on dotted lines where the setting (privacy level, clip bound, female fraction) matches one of ours.
  Figures needing data the workdir lacks (e.g. Figure 2 with one clip bound) are skipped, and the reason is
  printed.

When any run was trained with ``dp.reproducible=True`` (its batches and noise derived from the public
``train.seed``), the tables say so under them (:func:`reproducible_note`) and the figures in their titles.

Groups: group 0 and group 1 of jaxdp.fairness (``GROUPS``), named as each run's ``final.json`` records them
(``group_names``, given by its data source: female and male for CelebA's default ``Male``, e.g. "not Young" and
"Young" for another attribute, white and non-white for a tabular source grouped by race; runs recorded before
``group_names`` existed are named after their ``config.data.group_attribute`` by
:func:`jaxdp.data.core.group_names_of`). The columns keep their historical names: ``accuracy_female``,
``male_drop_*`` are group 0's and group 1's; gaps are group 0 minus group 1, and the paper's numbers are shown
only for runs that predict Smiling by Male groups. Methods are named by :data:`jaxdp.methods.DISPLAY_NAMES`. Error
bars are the per-group 95% intervals of jaxdp.fairness; a gap's interval combines its two groups' intervals by
Newcombe's square-and-add method (Newcombe 1998, method 10), which is what a researcher would compute by hand.
Runs that differ only in seed are averaged in the figures: a point is the mean over seeds, its error bar the
mean of the seeds' intervals (one run's test-sampling uncertainty, not the spread between seeds), and each
seed's own value is drawn faintly beside it; ``imbalance_drop`` gives the between-seed standard deviation.
The tables are byte-identical when regenerated from the same workdir, also after its run directories have been
renamed: a run's settings are read from its run record (``sweep_run.json``), never from its directory's name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxdp.runlog import write_atomic
from jaxdp_study.report.figures import (
    clip_stat_by_fraction,
    figure_clipping,
    figure_clipping_diagnostics,
    figure_fairness_gaps,
    figure_imbalance,
    figure_training_by_imbalance,
    figure_training_by_privacy,
)
from jaxdp_study.report.methods_audit import (
    audit_markdown,
    audit_rows,
    audit_violations,
    bonferroni_note,
    family_wise_alpha,
    figure_audit,
    figure_methods,
    figure_misalignment,
    has_methods,
    methods_markdown,
    methods_table,
)
from jaxdp_study.report.summary import (
    _csv_text,
    group_names,
    imbalance_order,
    load_history,
    newcombe_interval,
    reproducible_note,
    summary_rows,
)
from jaxdp_study.report.tables import (
    group_accuracy,
    group_accuracy_markdown,
    imbalance_drop,
    imbalance_drop_markdown,
    table1,
    table1_markdown,
)
from jaxdp_study.workdir import runs_by_name

__all__ = [
    "audit_markdown", "audit_rows", "audit_violations", "bonferroni_note", "clip_stat_by_fraction",
    "family_wise_alpha", "figure_audit", "figure_clipping", "figure_clipping_diagnostics", "figure_fairness_gaps",
    "figure_imbalance", "figure_methods", "figure_misalignment", "figure_training_by_imbalance",
    "figure_training_by_privacy", "group_accuracy", "group_accuracy_markdown", "group_names", "has_methods",
    "imbalance_drop", "imbalance_drop_markdown", "imbalance_order", "load_history", "methods_markdown",
    "methods_table", "newcombe_interval", "reproducible_note", "summary_rows", "table1", "table1_markdown",
    "write_report",
]


def _write(path: Path, text: str) -> Path:
    """``text`` as UTF-8 into ``path`` through the one atomic writer: a kill leaves the old file or the new one."""
    return write_atomic(path, text.encode("utf-8"))


def _write_tables(root: Path, rows: list[dict], run_dirs: dict[str, Path]) -> list[Path]:
    note = reproducible_note(rows)
    names = group_names(rows)
    t1, ff = table1(rows)
    drop = imbalance_drop(rows)
    written = [_write(root / "summary.csv", _csv_text(rows)),
               _write(root / "table1.csv", _csv_text(t1)),
               _write(root / "table1.md", table1_markdown(t1, ff, note, names)),
               _write(root / "imbalance_drop.csv", _csv_text(drop)),
               _write(root / "imbalance_drop.md", imbalance_drop_markdown(drop, note, names))]
    by_group = group_accuracy(rows)
    written += [_write(root / "group_accuracy.csv", _csv_text(by_group)),
                _write(root / "group_accuracy.md", group_accuracy_markdown(by_group, note, names))]
    if has_methods(rows):
        comparison = methods_table(rows, run_dirs)
        written += [_write(root / "methods.csv", _csv_text(comparison)),
                     _write(root / "methods.md", methods_markdown(comparison, note))]
    audited = audit_rows(rows)
    if audited:
        violations = audit_violations(rows)
        written += [_write(root / "audit.csv", _csv_text(audited)),
                    _write(root / "audit.md", audit_markdown(audited, violations, note, bonferroni_note(rows)))]
        for line in violations:
            print(f"AUDIT FAILURE: {line}", file=sys.stderr)
    return written


def _write_figures(root: Path, rows: list[dict], run_dirs: dict[str, Path], verbose: bool) -> list[Path]:
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
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


def write_report(workdir: str | os.PathLike, *, figures: bool = True, verbose: bool = True) -> list[Path]:
    """Write summary.csv, table1.csv/.md, imbalance_drop.csv/.md, methods.csv/.md and audit.csv/.md (when there
    are such runs) and figures/*.png for ``workdir``; returns the written paths.

    Every file goes through :func:`jaxdp.runlog.write_atomic` (figures are rendered in memory first): a report
    killed or failing midway leaves each file either as it was or complete, never half-written.
    """
    root = Path(workdir)
    rows = summary_rows(root)
    run_dirs = runs_by_name(root)
    written = _write_tables(root, rows, run_dirs)
    if figures and rows:
        written += _write_figures(root, rows, run_dirs, verbose)
    return written
