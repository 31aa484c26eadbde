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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fairdp", type=Path, required=True, help="fair-dp driver's record (JSON)")
    parser.add_argument("--summary", type=Path, required=True, help="summary.csv of a configs/adult_fairdp.py sweep")
    args = parser.parse_args()
    print(table(fairdp_runs(args.fairdp), jaxdp_runs(args.summary)), end="")


if __name__ == "__main__":
    main()
