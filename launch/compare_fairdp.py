#!/usr/bin/env python
"""fair-dp's Adult runs beside jaxdp's: per-group test accuracy, epsilon and wall time per run, as markdown.

Reads the record that fair-dp's driver writes (``fairdp_adult_<date>.json``: one entry per run of fair-dp's
``main.py`` with its per-group accuracies, epsilon and wall time) and the ``summary.csv`` of a jaxdp sweep of
``configs/adult_fairdp.py``, matches the five methods, and prints one table: each group's accuracy (mean ± sample SD
over seeds) on both sides, the difference jaxdp − fair-dp with its standard error (two-sample, pooled SD:
``s_p sqrt(1/n_j + 1/n_f)``, which a side with one seed enters with its value and no spread), epsilon, and the mean
wall time per run (jaxdp: each run's ``final.json`` ``wall_time_s``; fair-dp: the driver's time around the whole
``main.py`` process), with their ratio::

    python launch/compare_fairdp.py --fairdp docs/measurements/fairdp/fairdp_adult_2026-12-07.json \
        --summary docs/measurements/adult_fairdp-2026-12-07/summary.csv

**Paired mode** (``--paired S=SUMMARY``, once per fair-dp seed S): jaxdp's sweep of ``configs/adult_fairdp_paired.py``
on fair-dp's rows for its seed S (``config.data.split_file``) against fair-dp's single run of seed S, which trained
and tested on the same rows. Per method and group: jaxdp's mean over its n seeds minus fair-dp's value, with a
standard error for training noise only (the test rows are the same): ``s sqrt(1/n + 1)``, s jaxdp's seed SD on that
split, **assuming fair-dp's training SD equals jaxdp's** (one fair-dp run per split gives no SD of its own); then
the mean of the differences over the seeds S with ``sqrt(sum SE_S^2) / #S``. The summary's test-set group sizes
(``n_0``, ``n_1``) are checked against the split file ``fairdp_adult_split_seed<S>.json`` beside the record::

    python launch/compare_fairdp.py --fairdp docs/measurements/fairdp/fairdp_adult_2026-12-07.json \
        --paired 0=docs/measurements/adult_fairdp_paired_s0-2026-12-07/summary.csv \
        --paired 1=docs/measurements/adult_fairdp_paired_s1-2026-12-07/summary.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

# fair-dp's --method -> jaxdp's config.dp.method (None: non-private).
METHODS = {"regular": None, "dpsgd": "dpsgd", "dpsgd-f": "dpsgd_f", "dpsgd-global": "dpsgd_global",
           "dpsgd-global-adapt": "dpsgd_global_adapt"}
GROUPS = ("female", "male")


def _stats(values: list[float]) -> tuple[int, float, float | None]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return n, mean, sd


def difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """``mean(a) - mean(b)`` and its standard error from the pooled sample SD (None with < 3 values in all)."""
    (na, ma, sa), (nb, mb, sb) = _stats(a), _stats(b)
    df = na + nb - 2
    if df < 1:
        return ma - mb, None
    pooled = math.sqrt(((na - 1) * (sa or 0.0) ** 2 + (nb - 1) * (sb or 0.0) ** 2) / df)
    return ma - mb, pooled * math.sqrt(1 / na + 1 / nb)


def fairdp_runs(path: Path) -> dict[str | None, list[dict]]:
    """fair-dp's runs by jaxdp method name; accuracies in percent, groups by name."""
    out: dict[str | None, list[dict]] = {}
    for run in json.loads(path.read_text()).get("runs", []):
        per_group = run.get("test_accuracy_per_group") or {}
        if run.get("method") not in METHODS or not all(g in per_group for g in GROUPS):
            continue
        out.setdefault(METHODS[run["method"]], []).append(
            {"seed": run.get("seed"), "wall_s": run.get("wall_s"), "epsilon": run.get("epsilon"),
             **{g: 100 * float(per_group[g]) for g in GROUPS}})
    return out


def jaxdp_runs(path: Path) -> dict[str | None, list[dict]]:
    """jaxdp's runs by method (None: non-private); the groups by the names the runs recorded."""
    out: dict[str | None, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            method = row["method"] or None if row["dp_enabled"] == "true" else None
            names = (row["group_0"], row["group_1"])
            out.setdefault(method, []).append(
                {"seed": int(row["seed"]), "wall_s": float(row["wall_time_s"]),
                 "epsilon": float(row["epsilon_rdp"]) if row["epsilon_rdp"] else None,
                 **{f"n_{name}": int(float(row[f"n_{g}"])) for g, name in enumerate(names) if row.get(f"n_{g}")},
                 **{name: float(row[f"accuracy_{g}"]) for g, name in enumerate(names)}})
    return out


def _pm(values: list[float]) -> str:
    n, mean, sd = _stats(values)
    return "–" if not n else f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def table(fairdp: dict[str | None, list[dict]], jaxdp: dict[str | None, list[dict]]) -> str:
    head = ("| method | seeds jaxdp / fair-dp | female: jaxdp | female: fair-dp | female: jaxdp − fair-dp ± SE | "
            "male: jaxdp | male: fair-dp | male: jaxdp − fair-dp ± SE | ε (RDP) jaxdp / fair-dp | wall s per run "
            "jaxdp / fair-dp | ratio |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for fair_name, method in METHODS.items():
        j, f = jaxdp.get(method, []), fairdp.get(method, [])
        cells = [fair_name, f"{len(j)} / {len(f)}"]
        for g in GROUPS:
            a, b = [r[g] for r in j], [r[g] for r in f]
            diff, se = difference(a, b) if a and b else (math.nan, None)
            spread = f" ± {se:.2f}" if se is not None else ""
            cells += [_pm(a), _pm(b), "–" if math.isnan(diff) else f"{diff:+.2f}{spread}"]
        eps = [_stats([r["epsilon"] for r in side if r["epsilon"] is not None])[1] for side in (j, f)]
        cells.append(" / ".join("–" if math.isnan(e) else f"{e:.2f}" for e in eps))
        wall = [_stats([r["wall_s"] for r in side if r["wall_s"] is not None])[1] for side in (j, f)]
        cells.append(" / ".join("–" if math.isnan(w) else f"{w:.1f}" for w in wall))
        cells.append("–" if math.isnan(wall[0]) or math.isnan(wall[1]) else f"1/{wall[1] / wall[0]:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def paired_difference(jaxdp_values: list[float], fairdp_value: float) -> tuple[float, float | None]:
    """``mean(jaxdp) - fairdp`` on the same rows and its training-noise SE ``s sqrt(1/n + 1)`` (s: jaxdp's sample SD;
    fair-dp's single run assumed to have the same SD); None with fewer than 2 jaxdp seeds."""
    n, mean, sd = _stats(jaxdp_values)
    return mean - fairdp_value, None if sd is None else sd * math.sqrt(1 / n + 1)


def check_split(summary: dict[str | None, list[dict]], split_file: Path, seed: int) -> None:
    """Refuses a summary whose test groups are not the split file's (a sweep of another seed's split, or unpaired)."""
    if not split_file.is_file():
        return
    counts = json.loads(split_file.read_text())["counts"]["test"]
    want = {g: counts[g][0] for g in GROUPS}
    for runs in summary.values():
        for run in runs:
            if {g: run.get(f"n_{g}") for g in GROUPS} != want:
                raise SystemExit(f"--paired {seed}=...: a run tested on {run.get('n_female')} women and "
                                 f"{run.get('n_male')} men, fair-dp's seed {seed} split on {want['female']} and "
                                 f"{want['male']} ({split_file}); is the summary of that split's sweep?")


def paired_table(fairdp: dict[str | None, list[dict]], paired: dict[int, dict[str | None, list[dict]]]) -> str:
    """Markdown: per method, each fair-dp seed's row (jaxdp mean ± SD over its seeds on that split, fair-dp's run,
    the difference ± training-noise SE) and the combination over the seeds."""
    head = ("| method | fair-dp seed (split) | jaxdp seeds | female: jaxdp | female: fair-dp | female: jaxdp − "
            "fair-dp ± SE | male: jaxdp | male: fair-dp | male: jaxdp − fair-dp ± SE |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for fair_name, method in METHODS.items():
        combined: dict[str, list[tuple[float, float | None]]] = {g: [] for g in GROUPS}
        for seed, jaxdp in sorted(paired.items()):
            j = jaxdp.get(method, [])
            f = [r for r in fairdp.get(method, []) if r["seed"] == seed]
            cells = [fair_name, str(seed), str(len(j))]
            for g in GROUPS:
                if not j or len(f) != 1:
                    cells += [_pm([r[g] for r in j]), _pm([r[g] for r in f]), "–"]
                    continue
                diff, se = paired_difference([r[g] for r in j], f[0][g])
                combined[g].append((diff, se))
                cells += [_pm([r[g] for r in j]), f"{f[0][g]:.2f}",
                          f"{diff:+.2f}" + (f" ± {se:.2f}" if se is not None else "")]
            lines.append("| " + " | ".join(cells) + " |")
        if len(paired) > 1:
            cells = [fair_name, "+".join(str(s) for s in sorted(paired)) + " combined", ""]
            for g in GROUPS:
                got = combined[g]
                if len(got) != len(paired):
                    cells += ["", "", "–"]
                    continue
                diff = sum(d for d, _ in got) / len(got)
                ses = [se for _, se in got]
                spread = (f" ± {math.sqrt(sum(se ** 2 for se in ses)) / len(got):.2f}"
                          if all(se is not None for se in ses) else "")
                cells += ["", "", f"**{diff:+.2f}{spread}**"]
            lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _paired_argument(text: str) -> tuple[int, Path]:
    seed, _, path = text.partition("=")
    if not seed.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"--paired {text!r}: expected SEED=SUMMARY_CSV, e.g. 0=results/s0/summary.csv")
    return int(seed), Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fairdp", type=Path, required=True, help="fair-dp driver's record (JSON)")
    parser.add_argument("--summary", type=Path, help="summary.csv of a configs/adult_fairdp.py sweep")
    parser.add_argument("--paired", type=_paired_argument, action="append", default=[],
                        help="SEED=SUMMARY: summary.csv of a configs/adult_fairdp_paired.py sweep on fair-dp's split "
                             "of its seed SEED (repeat per seed): prints the paired table instead")
    args = parser.parse_args()
    if bool(args.summary) == bool(args.paired):
        parser.error("give either --summary (unpaired) or --paired SEED=SUMMARY (paired), not both")
    if args.summary:
        print(table(fairdp_runs(args.fairdp), jaxdp_runs(args.summary)), end="")
        return
    paired = {}
    for seed, path in args.paired:
        paired[seed] = jaxdp_runs(path)
        check_split(paired[seed], args.fairdp.parent / f"fairdp_adult_split_seed{seed}.json", seed)
    print(paired_table(fairdp_runs(args.fairdp), paired), end="")


if __name__ == "__main__":
    main()
