"""The step benchmark: a workload's jaxdp training steps (non-private, each clipping strategy, each DP-fairness
method), side by side with PyTorch and Opacus on the same model, timed in interleaved rounds.

Entries (:func:`run_benchmark`):

* ``jax nonprivate``: the plan's step with DP disabled (plain gradient sum, small-map convolutions as patch
  matmuls, the optimiser): the baseline of "vs JAX non-private", the honest measure of DP's cost;
* ``jax dp <strategy>``: the plan's DP-SGD step with that clipping strategy (``auto`` is named after the strategy
  it picks);
* ``jax dp <strategy> <method>`` (``methods=``): a DP-fairness method's step (:mod:`jaxdp.methods`): its clip rule
  and per-example arguments (30% of the batch in group 1), its counts, the gradient noise scaled to its
  sensitivity, the noisy release of its counts and its state update, with the methods' reference parameters;
  ``vs_dpsgd`` compares it with the same strategy's DP-SGD step;
* ``jax dp <strategy> [<mechanism>]`` (``mechanisms=``): the DP-SGD step with another noise mechanism than the
  workload's (:data:`jaxdp.noise.MECHANISMS`: ``lattice``, the default, or ``gaussian``); ``vs_dpsgd`` compares it
  with the same strategy's step under the workload's mechanism: the cost of the mechanism in a whole step;
* ``jax dp noise+update only`` (a breakdown, not a training step): the plan's own update
  (:meth:`jaxdp.plan.DPPlan.apply_update`: noise, the method's release, the optimiser) on a zero gradient sum: the
  part of a DP step that no clipping strategy can remove;
* with ``compare_opacus``: ``torch nonprivate`` and ``opacus <mode>`` for each Opacus grad-sample mode (``hooks``,
  ``ghost`` = fast gradient clipping, ``functorch``, ``ew``) on the same model, batch, loss and optimiser.

How each figure is measured: :mod:`jaxdp_study.bench.timing`. What each workload's step is:
:mod:`jaxdp_study.bench.workloads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdp import clipping, methods, noise
from jaxdp_study.bench import timing, torch_side
from jaxdp_study.bench.workloads import ALL_STRATEGIES, JaxStep, Workload

METHOD_NAMES = methods.METHODS[1:]  # the DP-fairness methods (plain DP-SGD is every strategy's "jax dp" entry)


def _check(strategies: Sequence[str], method_names: Sequence[str], opacus_modes: Sequence[str], rounds: int,
           steps_per_round: int, settle_s: float) -> None:
    if rounds < 1 or steps_per_round < 1 or not settle_s >= 0:
        raise ValueError(f"Need rounds >= 1, steps_per_round >= 1, settle_s >= 0; got rounds={rounds}, "
                         f"steps_per_round={steps_per_round}, settle_s={settle_s}.")
    unknown = [s for s in strategies if s not in clipping.available_strategies()]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; choose from {list(clipping.available_strategies())}.")
    unknown = [m for m in opacus_modes if m not in torch_side.OPACUS_MODES]
    if unknown:
        raise ValueError(f"Unknown Opacus modes {unknown}; choose from {list(torch_side.OPACUS_MODES)}.")
    unknown = [m for m in method_names if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(METHOD_NAMES)} (plain DP-SGD is every "
                         "strategy's 'jax dp <strategy>' entry).")


def jax_entry(name: str, private: bool, build, baseline: str | None = None) -> tuple[timing.Entry, JaxStep | None]:
    """An entry whose step ``build()`` makes (a :class:`JaxStep`), with its compile time and memory."""
    entry, built = timing.Entry(name, "jax", private, _baseline=baseline), {}

    def make():
        built["step"] = step = build()
        entry.compile_s, entry.peak_memory_bytes = step.compile_s, step.accelerator_memory
        return step.run

    timing.guarded(entry, make)
    return entry, built.get("step")


def noise_only(step: JaxStep) -> timing.Entry:
    """The breakdown entry: the plan's update (noise, method release, optimiser) on a zero gradient sum."""
    plan = step.plan
    entry = timing.Entry("jax dp noise+update only", "jax", True, breakdown=True)

    def make():
        def update(state):
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            counts = jnp.zeros((plan.method.num_counts,), jnp.float32)
            return plan.apply_update(state, zeros, counts, state.model_state)[0]

        jitted = jax.jit(update, donate_argnums=(0,))
        holder = {"state": jax.tree_util.tree_map(jnp.copy, step.state())}
        compiled = jitted.lower(holder["state"]).compile()
        entry.peak_memory_bytes = timing.accelerator_memory(compiled)

        def run():
            holder["state"] = jitted(holder["state"])
            jax.block_until_ready(holder["state"])

        return run

    return timing.guarded(entry, make)


def jax_entries(workload: Workload, strategies: Sequence[str], method_names: Sequence[str],
                include_noise_only: bool, mechanisms: Sequence[str] = ()) -> tuple[list[timing.Entry], int | None]:
    """The workload's jaxdp entries (module docstring), each the plan's training step, and the chunk width they
    run at (the widest of the plans' sampler; None if no step could be built)."""
    entry, step = jax_entry("jax nonprivate", False, lambda: workload.jax_step(False))
    entries, width = [entry], None if step is None else int(step.plan.sampler.chunk_widths[-1])
    first_dp, seen = None, set()
    for strategy in strategies:
        # Built once under the requested name; "auto" is then named after the strategy it picked.
        entry, step = jax_entry(f"jax dp {strategy}", True, lambda s=strategy: workload.jax_step(True, s))
        if step is not None:
            entry.name = f"jax dp {step.strategy}"
            first_dp = first_dp or step
        if entry.name in seen:  # e.g. "auto" and the strategy it picks
            continue
        seen.add(entry.name)
        entries.append(entry)
        for method in method_names:
            entries.append(jax_entry(f"{entry.name} {method}", True,
                                      lambda s=strategy, m=method: workload.jax_step(True, s, m),
                                      baseline=entry.name)[0])
        for mechanism in mechanisms:
            entries.append(jax_entry(f"{entry.name} [{mechanism}]", True,
                                     lambda s=strategy, k=mechanism: workload.jax_step(True, s, mechanism=k),
                                     baseline=entry.name)[0])
    if include_noise_only and first_dp is not None:
        entries.append(noise_only(first_dp))
    if width is None and first_dp is not None:
        width = int(first_dp.plan.sampler.chunk_widths[-1])
    return entries, width


def run_benchmark(
    workload: Workload,
    *,
    strategies: Sequence[str] | None = None,
    methods: Sequence[str] = (),
    compare_opacus: bool = False,
    opacus_modes: Sequence[str] = torch_side.OPACUS_MODES,
    rounds: int = 3,
    steps_per_round: int = 1,
    settle_s: float = 1.0,
    warmup_s: float = timing.WARMUP_S,
    include_noise_only: bool = True,
    torch_threads: int | None = None,
    mechanisms: Sequence[str] = (),
) -> dict[str, Any]:
    """Benchmarks the workload's training steps (module docstring); returns a JSON-ready dict with ``config``
    (the workload's settings and the benchmark's), ``environment`` and ``results`` (one per entry).

    ``strategies`` defaults to the workload's (a config's own ``dp.clipping_strategy``), else every strategy of
    :func:`jaxdp.clipping.available_strategies` but "auto". An entry that fails to build or run (e.g. an Opacus
    mode that does not support a layer) is reported with its ``error`` and no speed. ``torch_threads`` sets torch's
    intra-op threads (:func:`jaxdp_study.bench.torch_side.set_threads`; None: torch's default). ``mechanisms``:
    noise mechanisms to time besides the workload's own, one more entry per strategy and mechanism.
    """
    strategies = list(strategies if strategies is not None else (workload.strategies or ALL_STRATEGIES))
    method_names = list(methods)
    _check(strategies, method_names, opacus_modes if compare_opacus else (), rounds, steps_per_round, settle_s)
    if not warmup_s >= 0:
        raise ValueError(f"Need warmup_s >= 0; got {warmup_s}.")
    unknown = [m for m in mechanisms if m not in noise.MECHANISMS]
    if unknown:
        raise ValueError(f"Unknown noise mechanisms {unknown}; choose from {list(noise.MECHANISMS)}.")
    if compare_opacus:
        torch_side.set_threads(torch_threads)  # fails before the long JAX compiles when torch is missing
        spec = workload.torch_spec()
    entries, width = jax_entries(workload, strategies, method_names, include_noise_only, mechanisms)
    if compare_opacus:
        entries += torch_side.step_entries(spec, opacus_modes)
    timing.run_rounds(entries, rounds, steps_per_round, settle_s, workload.batch_size, warmup_s)
    timing.add_ratios(entries)
    environment = timing.environment()
    if compare_opacus:
        environment.update(torch_side.versions())
    config = dict(workload.settings(), chunk_width=width, strategies=strategies, rounds=rounds,
                  steps_per_round=steps_per_round, settle_s=settle_s, warmup_s=warmup_s,
                  compare_opacus=compare_opacus,
                  opacus_modes=list(opacus_modes) if compare_opacus else [], title=workload.title)
    if method_names:
        config["methods"] = method_names
    if mechanisms:
        config["mechanisms"] = list(mechanisms)
    return {"config": config, "environment": environment, "results": [e.result() for e in entries]}

