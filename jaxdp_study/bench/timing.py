"""How the benchmark measures: timed rounds that interleave entries, settle pauses, the untimed memory step.

Every figure the benchmark prints is one of these:

* ``examples_per_s``: the (expected) batch size / the median wall time of an entry's timed steps, each ended with
  ``block_until_ready`` (a torch step is synchronous). Timed steps are taken in *rounds* that visit every entry in
  turn (JAX and torch interleaved), so slow phases of a noisy machine hit all entries alike. In each round an entry
  gets a pause of ``settle_s`` (XLA's and PyTorch's CPU thread pools keep spinning for a while after a step; without
  the pause each entry competes with the previous entry's idle threads), then one untimed step, which measures the
  memory and brings the heap and caches back to the state of a training loop, then more untimed steps until
  ``warmup_s`` has passed since that first step began (at least the one), then ``steps_per_round`` timed steps back
  to back, as a training loop runs them. The warm-up is there because after the pause a step runs slower for a
  while (the CPU's threads and clocks back up to speed), JAX's and torch's alike and not equally for every entry:
  timing the first steps of a millisecond-scale model measures the pause, not the step (CHANGELOG).
* ``compile_s``: the wall time of ``step.lower(...).compile()`` of the jitted step (JAX only); the jitted step then
  runs that executable (JAX's jit reuses it: no second compile).
* ``peak_memory_bytes``: the largest growth of the process's resident memory during one step, over the rounds'
  untimed steps: before each such step free heap memory is returned to the OS (``malloc_trim``), the kernel's
  peak-RSS counter is reset (``/proc/self/clear_refs``) and ``VmHWM - VmRSS(before)`` is read afterwards. It
  counts the step's temporaries (activations, per-example quantities, patches), not the parameters and optimiser
  state that persist between steps (donated, in JAX). Same method for JAX and torch; Linux only (None elsewhere).
  On CPU XLA's ``compiled.memory_analysis()`` is not used: it reports no temporaries there. On a GPU/TPU the JAX
  entries report device memory from that analysis instead: ``temp + argument + output - alias`` bytes of the
  compiled step (parameters and optimiser state included, so those ratios do not compare with the CPU ones).
* ratios (:func:`add_ratios`): ``vs_jax_nonprivate`` = examples/s over the JAX non-private entry's;
  ``vs_fastest_opacus`` = over the fastest Opacus mode's; ``vs_dpsgd`` (method entries) = over the same
  strategy's DP-SGD entry; ``memory_vs_nonprivate`` = peak memory over the same framework's non-private entry's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

# Seconds of untimed steps an entry runs after each settle pause before its timed steps (module docstring).
WARMUP_S = 0.5


@dataclasses.dataclass
class Entry:
    """One benchmarked training step and its measurements (``run`` does one step and waits for it)."""

    name: str
    framework: str  # "jax" | "torch"
    private: bool
    step_s: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    peak_memory_bytes: int | None = None
    error: str | None = None
    examples_per_s: float | None = None
    vs_jax_nonprivate: float | None = None
    vs_fastest_opacus: float | None = None
    memory_vs_nonprivate: float | None = None
    vs_dpsgd: float | None = None
    breakdown: bool = False  # a part of a step (not a training step): never a baseline, never compared
    _baseline: str | None = dataclasses.field(default=None, repr=False)  # the entry vs_dpsgd compares with
    _run: Callable[[], None] | None = dataclasses.field(default=None, repr=False)

    def result(self) -> dict[str, Any]:
        """The entry as JSON-ready data (its private fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}


def guarded(entry: Entry, build: Callable[[], Callable[[], None]]) -> Entry:
    """``entry`` with ``build()``'s step as its ``run``, after one warm-up call; a step that fails to build or run
    (e.g. an Opacus mode that does not support a layer) is reported in ``entry.error`` while the others still run."""
    try:
        run = build()
        run()  # warm-up
        entry._run = run
    except Exception as error:  # noqa: BLE001 - a failing entry is reported, the others still run
        message = str(error).splitlines()[0] if str(error) else ""
        entry.error = f"{type(error).__name__}: {message}"
    return entry


def timed_round(entry: Entry, steps: int, settle_s: float, warmup_s: float = WARMUP_S) -> list[float]:
    """One round of ``entry`` (module docstring): a pause of ``settle_s``, one untimed step that measures the
    memory, more untimed steps until ``warmup_s`` has passed since it began, then ``steps`` timed steps back to
    back; returns their wall times."""
    time.sleep(settle_s)
    started = time.perf_counter()
    before = _start_peak_rss()
    entry._run()
    growth = _peak_rss_growth(before)
    if growth is not None and (entry.framework == "torch" or jax.default_backend() == "cpu"):
        entry.peak_memory_bytes = max(entry.peak_memory_bytes or 0, growth)
    while time.perf_counter() - started < warmup_s:
        entry._run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        entry._run()
        times.append(time.perf_counter() - start)
    return times


def run_rounds(entries: Sequence[Entry], rounds: int, steps_per_round: int, settle_s: float,
               batch_size: float, warmup_s: float = WARMUP_S) -> None:
    """Times every runnable entry in ``rounds`` interleaved rounds and sets its ``examples_per_s``."""
    for _ in range(rounds):
        for entry in entries:
            if entry._run is not None:
                entry.step_s += timed_round(entry, steps_per_round, settle_s, warmup_s)
    for entry in entries:
        if entry.step_s:
            entry.examples_per_s = batch_size / statistics.median(entry.step_s)


def add_ratios(entries: Sequence[Entry]) -> None:
    """Sets each entry's ratios (module docstring) from the measured speeds and memories."""

    def best(predicate):
        speeds = [e.examples_per_s for e in entries if predicate(e) and e.examples_per_s and not e.breakdown]
        return max(speeds) if speeds else None

    jax_nonprivate = best(lambda e: e.framework == "jax" and not e.private)
    fastest_opacus = best(lambda e: e.framework == "torch" and e.private)
    baseline_memory = {framework: next((e.peak_memory_bytes for e in entries
                                        if e.framework == framework and not e.private and not e.breakdown), None)
                       for framework in ("jax", "torch")}
    by_name = {e.name: e for e in entries}
    for entry in entries:
        if entry.examples_per_s and jax_nonprivate:
            entry.vs_jax_nonprivate = entry.examples_per_s / jax_nonprivate
        if entry.examples_per_s and fastest_opacus and not entry.breakdown:
            entry.vs_fastest_opacus = entry.examples_per_s / fastest_opacus
        if entry.peak_memory_bytes and baseline_memory[entry.framework]:
            entry.memory_vs_nonprivate = entry.peak_memory_bytes / baseline_memory[entry.framework]
        baseline = by_name.get(entry._baseline)
        if entry.examples_per_s and baseline is not None and baseline.examples_per_s:
            entry.vs_dpsgd = entry.examples_per_s / baseline.examples_per_s


def accelerator_memory(compiled: Any) -> int | None:
    """Device memory of a compiled JAX step on an accelerator (module docstring); None on CPU."""
    if jax.default_backend() == "cpu":
        return None
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes)


def environment() -> dict[str, Any]:
    """What ran the benchmark (the measurement record adds versions and the machine)."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "memory_method": ("rss growth per step" if jax.default_backend() == "cpu"
                          else "xla memory_analysis temp+argument+output-alias (jax); rss growth (torch)"),
        # Runnable processes averaged over 1, 5 and 15 minutes when the measurement ended: above the core count,
        # other work shared the machine, and absolute times (less so ratios) are inflated.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _start_peak_rss() -> int | None:
    """The current RSS after trimming the heap and resetting the peak-RSS counter (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _peak_rss_growth(before: int | None) -> int | None:
    peak = _proc_status_bytes("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)
