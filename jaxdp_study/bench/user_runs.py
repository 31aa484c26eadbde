"""Whole training runs as users write them, timed side by side: jaxdp's recommended API, the low-level script of
issue 25 "as written", and Opacus's ``make_private`` loop (``launch/bench.py --workload digits --loop``).

Each run trains the workload's model from scratch on its real data with its settings (digits: batch 64 Poisson of
1,400, C 1, z 1, Adam 3e-3, 15 epochs = 330 steps) and reports its wall time, its steps' times, its test accuracy
and its epsilon:

* ``jaxdp plan <strategy>`` (:func:`plan_run`), the recommended API: ``make_plan`` + ``plan.init`` + a loop of
  ``plan.gather(host arrays, plan.batch(step))`` and ``plan.train_step``; epsilon from ``plan.epsilon()`` (PLD).
* ``jaxdp as written <strategy>`` (:func:`as_written_run`), the script of issue 25 unchanged: ``jax.jit`` of
  ``jaxdp.clipped_grad`` called per chunk of ``sampler.batch(step)``, the chunks' sums added eagerly, then
  ``optax.chain(jaxdp.dp_noise(...), optax.adam(...)).update`` and ``optax.apply_updates`` called eagerly, outside
  ``jit``, as optax users usually write them; epsilon from a :class:`jaxdp.accounting.PrivacyLedger` (PLD).
* ``opacus make_private <mode>`` (:func:`jaxdp_study.bench.torch_side.opacus_run`): the same model in PyTorch,
  ``make_private`` with Poisson sampling, the DataLoader's epochs; epsilon from Opacus's accountant (PRV).

Timing: ``run_s`` is the wall time from building the plan (the model, for Opacus) to the end of the last step:
compiles, batch selection and every step included; evaluation and accounting excluded. ``step_s`` are the loop
iterations' wall times (a jaxdp step is dispatched asynchronously, so an iteration can end before its step does;
``run_s`` waits for the last one). Every round runs every entry once, in turn, after a ``settle_s`` pause, so slow
phases of a noisy machine hit all alike. Before each jaxdp run the process's in-memory caches are emptied
(:func:`fresh_process_caches`: JAX's compiled programs, including the eagerly dispatched operations' and the noise
draw's, and jaxdp's lattice samplers), so that every round is a script's first run in a new process (the imports
aside), not only the first round; with ``warm_cache`` the programs then come from the persistent compilation cache
on disk, as when a script is run again; the summary holds medians over rounds and ``speedup_vs_opacus`` = the
fastest Opacus entry's median ``run_s`` over this entry's (the issue's targets: the plan >= 2, as written >= 1/1.5).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxdp
from jaxdp import accounting, lattice, sampling
from jaxdp_study.bench import small_models, timing, torch_side
from jaxdp_study.bench.workloads import PlanWorkload


def fresh_process_caches() -> None:
    """Empties what a new process would not have: JAX's in-memory compilation and tracing caches (``jax.jit``
    programs, eagerly dispatched operations) and jaxdp's cached lattice samplers and tables (their tables are then
    read from the package, or built). The persistent compilation cache on disk, when on, is kept."""
    jax.clear_caches()
    for cached in (lattice.alias_table, lattice.integer_gaussian, lattice.lattice_noise):
        cached.cache_clear()


def _finish(started: float, step_s: list[float], state_or_params: Any) -> dict[str, Any]:
    jax.block_until_ready(state_or_params)
    return {"run_s": time.perf_counter() - started, "steps": len(step_s), "step_s": step_s,
            "median_step_s": statistics.median(step_s), "first_step_s": step_s[0],
            "slowest_later_step_s": max(step_s[1:], default=None)}


def plan_run(workload: PlanWorkload, strategy: str, *, max_steps: int | None = None) -> dict[str, Any]:
    """One run through the recommended API (module docstring); ``max_steps`` shortens it (tests)."""
    x, y = workload.data["x"], workload.data["y"]
    started = time.perf_counter()
    plan = workload.make_plan(True, strategy, steps=max_steps)
    state = plan.init(workload.params)
    step_s = []
    for step in range(plan.num_steps):
        start = time.perf_counter()
        batch, mask = plan.gather({"x": x, "y": y}, plan.batch(step))
        state, _ = plan.train_step(state, batch, mask)
        step_s.append(time.perf_counter() - start)
    result = _finish(started, step_s, state)
    result.update(test_accuracy=small_models.accuracy(workload.model, state.params, *workload.test),
                  epsilon=plan.epsilon(), accountant=plan.dp.accountant)
    return result


def as_written_run(workload: PlanWorkload, strategy: str, *, max_steps: int | None = None) -> dict[str, Any]:
    """One run of issue 25's low-level script, unchanged (module docstring)."""
    model, dp, x, y = workload.model, workload.dp, workload.data["x"], workload.data["y"]

    def loss_fn(params, inputs, labels):  # the mean loss clipped_grad takes
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, inputs), labels).mean()

    started = time.perf_counter()
    grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=dp.l2_clip_norm, strategy=strategy)
    clipped_sum = jax.jit(grad_fn)
    tx = optax.chain(jaxdp.dp_noise(dp.noise_multiplier, grad_fn.sensitivity, workload.batch_size,
                                    jaxdp.noise.secret_key()), workload.optimizer())
    params = jax.tree_util.tree_map(jnp.asarray, workload.params)
    opt_state = tx.init(params)
    sampler = sampling.PoissonSampler(len(y), expected_batch_size=workload.batch_size,
                                      seed=jaxdp.noise.secret_seed())
    num_steps = round(workload.epochs * sampler.steps_per_epoch) if max_steps is None else max_steps
    step_s = []
    for step in range(num_steps):
        start = time.perf_counter()
        batch, grads = sampler.batch(step), None
        for chunk in range(batch.n_chunks):
            indices = batch.indices[chunk]
            summed, _ = clipped_sum(params, x[indices], y[indices], batch.mask[chunk])
            grads = summed if grads is None else jax.tree_util.tree_map(jnp.add, grads, summed)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        step_s.append(time.perf_counter() - start)
    result = _finish(started, step_s, params)
    ledger = accounting.PrivacyLedger()
    ledger.record(sampler, dp.noise_multiplier, steps=num_steps)
    result.update(test_accuracy=small_models.accuracy(model, params, *workload.test),
                  epsilon=float(ledger.epsilon(dp.delta)), accountant="pld")
    return result


def _entries(workload: PlanWorkload, strategies: Sequence[str], opacus_modes: Sequence[str],
             max_steps: int | None) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """``(name, kind, run)`` per entry: the plan and the script as written per strategy, Opacus per mode."""
    entries = []
    for strategy in strategies:
        if strategy == "auto":  # the name says what ran; the as-written script takes the same strategy
            example = jax.tree_util.tree_map(lambda a: a[:1], workload.data)
            strategy = workload.make_plan(True).resolve_strategy(workload.params, example)[0]
        entries.append((f"jaxdp plan {strategy}", "plan",
                        lambda s=strategy: plan_run(workload, s, max_steps=max_steps)))
        entries.append((f"jaxdp as written {strategy}", "as written",
                        lambda s=strategy: as_written_run(workload, s, max_steps=max_steps)))
    if opacus_modes:
        spec = workload.torch_spec()
        data = (workload.data["x"], workload.data["y"], *workload.test)
        for mode in opacus_modes:
            entries.append((f"opacus make_private {mode}", "opacus", lambda m=mode: torch_side.opacus_run(
                spec, data, batch_size=workload.batch_size, epochs=int(workload.epochs), delta=workload.dp.delta,
                mode=m, max_steps=max_steps)))
    return entries


def run_user_loops(workload: PlanWorkload, *, strategies: Sequence[str] = ("auto",),
                   opacus_modes: Sequence[str] = ("hooks",), rounds: int = 3, settle_s: float = 1.0,
                   max_steps: int | None = None, torch_threads: int | None = None,
                   warm_cache: bool = False) -> dict[str, Any]:
    """Times whole runs of the workload (module docstring), ``rounds`` interleaved rounds; returns a JSON-ready dict
    with ``config``, ``environment``, ``runs`` (every round of every entry) and ``summary`` (medians per entry).

    ``opacus_modes`` empty: no Opacus entry (and no torch needed). ``max_steps`` shortens every run (tests).
    ``torch_threads``: torch's intra-op threads (:func:`jaxdp_study.bench.torch_side.set_threads`).
    ``warm_cache``: JAX's persistent compilation cache is on (the caller turned it on) and is filled first by a short
    untimed run of each jaxdp entry, so that every timed run loads its programs instead of compiling them: a user
    running a script again (compile times then show what a cold run adds).
    """
    if rounds < 1 or not settle_s >= 0 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"Need rounds >= 1, settle_s >= 0, max_steps >= 1; got rounds={rounds}, "
                         f"settle_s={settle_s}, max_steps={max_steps}.")
    if workload.test is None:
        raise ValueError(f"the {workload.name} workload has no test set to train and evaluate whole runs on")
    if opacus_modes:
        torch_side.set_threads(torch_threads)
    entries = _entries(workload, strategies, opacus_modes, max_steps)
    if warm_cache:
        for _, _, prime in _entries(workload, strategies, (), 2):
            prime()
    runs = []
    for r in range(rounds):
        for name, kind, run in entries:
            time.sleep(settle_s)
            if kind != "opacus":
                fresh_process_caches()
            result = run()
            if r:  # every step's time is kept for the first round only
                del result["step_s"]
            runs.append({"round": r, "name": name, "kind": kind, **result})
    summary = []
    for name, kind, _ in entries:
        mine = [row for row in runs if row["name"] == name]
        summary.append({"name": name, "kind": kind, "steps": mine[0]["steps"],
                        **{key: statistics.median(row[key] for row in mine)
                           for key in ("run_s", "median_step_s", "first_step_s", "test_accuracy", "epsilon")},
                        "accountant": mine[0]["accountant"]})
    opacus = [row["run_s"] for row in summary if row["kind"] == "opacus"]
    for row in summary:
        row["speedup_vs_opacus"] = min(opacus) / row["run_s"] if opacus else None
    environment = timing.environment()
    if opacus_modes:
        environment.update(torch_side.versions())
    config = dict(workload.settings(), title=workload.title, strategies=list(strategies),
                  opacus_modes=list(opacus_modes), rounds=rounds, settle_s=settle_s, max_steps=max_steps,
                  warm_compilation_cache=warm_cache)
    return {"config": config, "environment": environment, "runs": runs, "summary": summary}
