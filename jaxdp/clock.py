"""Where a run's wall time goes: ``final.json``'s ``time_split_s``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax


class RunClock:
    """Wall time per phase of a run (``final.json``'s ``time_split_s``), summing to the run's wall time.

    - ``compile``: every second XLA spent tracing, lowering and compiling (or reading the persistent compilation
      cache), wherever it happened; it is subtracted from the phase it happened in, so no second is counted twice.
    - ``data``: loading the data, and on the host selecting each step's batch and gathering and transferring its
      examples; the next step's batch is prepared while the device computes the current step, so this time
      overlaps ``train_steps``' device time rather than adding to it.
    - ``train_steps``: dispatching the steps and waiting for the device to finish them (one wait per step).
    - ``init``, ``evaluation`` (including the misalignment diagnostics and the audit), ``accounting`` (including
      the noise calibration), ``checkpoints``: as named.
    - ``other``: the rest of the wall time (building the model and the step functions, writing the history).
    """

    _COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                       "/jax/core/compile/backend_compile_duration")
    _compile_s = 0.0
    _listening = False
    PHASES = ("compile", "init", "data", "train_steps", "evaluation", "accounting", "checkpoints", "other")

    def __init__(self) -> None:
        if not RunClock._listening:
            jax.monitoring.register_event_duration_secs_listener(RunClock._on_event)
            RunClock._listening = True
        self._start, self._compile_start = time.perf_counter(), RunClock._compile_s
        self._phases = dict.fromkeys(self.PHASES[1:-1], 0.0)

    @staticmethod
    def _on_event(event: str, duration: float, **_: Any) -> None:
        if event in RunClock._COMPILE_EVENTS:
            RunClock._compile_s += duration

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, compiled = time.perf_counter(), RunClock._compile_s
        try:
            yield
        finally:
            self._phases[name] += max(0.0, time.perf_counter() - start - (RunClock._compile_s - compiled))

    @property
    def split(self) -> dict[str, float]:
        """Seconds per phase so far (``PHASES``, in that order)."""
        compile_s = RunClock._compile_s - self._compile_start
        other = time.perf_counter() - self._start - compile_s - sum(self._phases.values())
        return {"compile": compile_s, **self._phases, "other": max(0.0, other)}
