"""A config's training run against its own step (``launch/bench.py --config CONFIG --loop``): what the loop around
the step costs.

Each round trains the run with :func:`jaxdp.train.train_and_evaluate` and then times the benchmark's entry for what
it ran — the same compiled step (:mod:`jaxdp_study.bench.workloads`: the run config's plan and
:func:`jaxdp.steps.jit_train_step`, at the run's widest chunk width) — so the ratio of the two is the cost of
everything the run does besides its steps' compute: choosing and gathering batches, the ledger, waiting, and (in
``ratio_all``) evaluation and checkpoints.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import ml_collections

from jaxdp_study.bench import timing
from jaxdp_study.bench.step import jax_entry
from jaxdp_study.bench.workloads import ConfigWorkload


def loop_run_config(config: Any, run: str | None = None) -> tuple[Any, str]:
    """The run the loop benchmark trains, and its name: ``config`` itself (its sweep ignored), or with ``run``
    (a regular expression) the first run of ``config``'s sweep (:func:`jaxdp_study.grid.expand`) whose name
    matches. Raises ValueError naming the runs when none matches."""
    from jaxdp_study import grid

    if run is None:
        config = ml_collections.ConfigDict(config.to_dict())
        if "sweep" in config:
            del config["sweep"]
        return config, str(config.get("name", "run"))
    runs = grid.expand(config)
    match = next((r for r in runs if re.search(run, r.name)), None)
    if match is None:
        raise ValueError(f"run {run!r} matches none of the config's runs: {', '.join(r.name for r in runs)}")
    return match.config, match.name


def loop_step_entry(run_config: Any, final: dict) -> timing.Entry:
    """The benchmark's entry for the run whose ``final.json`` is ``final``: the run config's own step (its
    strategy, method, noise and diagnostics; non-private without DP) on its training set's size."""
    workload = ConfigWorkload(run_config, dataset_size=int(final["train_size"]))
    private = bool(run_config.dp.enabled)
    method = f" {final['method']}" if private and final["method"] != "dpsgd" else ""
    name = f"jax dp {final['clipping_strategy']}{method}" if private else "jax nonprivate"
    entry, _ = jax_entry(name, private, lambda: workload.jax_step(private))
    if entry.error:
        raise RuntimeError(f"the benchmark's step for this run failed to build: {entry.error}")
    return entry


def run_loop_benchmark(config: Any, *, run: str | None = None, epochs: float | None = None, rounds: int = 3,
                       steps_per_round: int = 10, settle_s: float = 1.0,
                       datasets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """How much slower a training run's steps are than the benchmark's step for the same config, side by side.

    Each round trains the run (:func:`loop_run_config`; ``epochs`` overrides ``config.train.epochs``) from
    scratch in a temporary directory with :func:`jaxdp.train.train_and_evaluate` — its own data (or
    ``datasets``), sampling, flips, diagnostics, evaluations and checkpoints — and then times the benchmark's step
    for it (:func:`loop_step_entry`) as the step benchmark does: ``settle_s`` pause, untimed warm-up steps,
    ``steps_per_round`` timed steps back to back. Each round's pair is close in time, so the machine's drifts hit
    both alike.

    Per round: ``run_step_s`` = the run's ``time_split_s.train_steps / steps`` (its steps, compiles excluded; a
    Poisson batch wider than the chunk counts as its several chunks), ``run_all_s`` = everything but compiling,
    initialising and loading data, per step (adds evaluation, checkpoints, accounting and the rest),
    ``bench_step_s`` = the median timed step; ``ratio`` = ``run_step_s / bench_step_s``, ``ratio_all`` =
    ``run_all_s / bench_step_s``. ``summary`` holds their medians over the rounds.

    The runs' outputs are deleted with the directory; only timings are returned. Before any training, raises
    ValueError for arguments out of range or a run that is not runnable, and :class:`jaxdp.data.DataUnavailable`
    (which says which files to put where) when the run's data is missing (:func:`jaxdp.train.check_runnable`).
    """
    from jaxdp import train

    if rounds < 1 or steps_per_round < 1 or not settle_s >= 0 or (epochs is not None and not epochs > 0):
        raise ValueError(f"Need rounds >= 1, steps_per_round >= 1, settle_s >= 0, epochs > 0; got rounds={rounds}, "
                         f"steps_per_round={steps_per_round}, settle_s={settle_s}, epochs={epochs}.")
    run_config, name = loop_run_config(config, run)
    if epochs is not None:
        run_config.train.epochs = float(epochs)
    run_config.train.progress = False
    if datasets is None:
        train.check_runnable(run_config)
    entry, rows, final = None, [], {}
    with tempfile.TemporaryDirectory(prefix="jaxdp-loop-bench-") as tmp:
        for r in range(rounds):
            final = train.train_and_evaluate(run_config, Path(tmp) / f"round{r}", datasets=datasets)
            if entry is None:
                entry = loop_step_entry(run_config, final)
            bench_s = statistics.median(timing.timed_round(entry, steps_per_round, settle_s))
            split, steps = final["time_split_s"], final["steps"]
            run_s = split["train_steps"] / steps
            run_all = (split["train_steps"] + split["evaluation"] + split["checkpoints"] + split["accounting"]
                       + split["other"]) / steps
            rows.append({"round": r, "run_steps": steps, "run_step_s": run_s, "run_all_s": run_all,
                         "bench_step_s": bench_s, "ratio": run_s / bench_s, "ratio_all": run_all / bench_s,
                         "run_time_split_s": split})
    summary = {key: statistics.median(row[key] for row in rows)
               for key in ("run_step_s", "run_all_s", "bench_step_s", "ratio", "ratio_all")}
    return {
        "config": {"run": name, "epochs": float(run_config.train.epochs), "rounds": rounds,
                   "steps_per_round": steps_per_round, "settle_s": settle_s,
                   "input_shape": list(ConfigWorkload(run_config, dataset_size=final["train_size"]).shape),
                   "chunk_widths": final["chunk_widths"], "clipping_strategy": final["clipping_strategy"],
                   "method": final["method"], "bench_entry": entry.name, "bench_compile_s": entry.compile_s},
        "environment": timing.environment(),
        "rounds": rows,
        "summary": summary,
    }
