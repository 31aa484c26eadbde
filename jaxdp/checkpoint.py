"""Checkpoints of a training run (orbax): arrays plus a JSON record, with corruption detection.

A checkpoint holds the training state pytree (parameters, optimiser state — which includes the noise key and
its step count —) and a JSON record (step, privacy ledger, accumulated diagnostics, history position, a
fingerprint of the arrays). Orbax writes each step to a temporary directory and renames it when complete, so
a run killed mid-save leaves no half-written step that looks finished. A step whose files were damaged after
the fact is caught on restore (orbax error, or a fingerprint mismatch) and the previous step is used.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def fingerprint(tree: Any) -> list[float]:
    """Two float64 sums over every leaf (plain and absolute); changes when any value changes in practice."""
    total, absolute = 0.0, 0.0
    for leaf in jax.tree_util.tree_leaves(tree):
        values = np.asarray(jax.device_get(leaf)).astype(np.float64)
        total += float(values.sum())
        absolute += float(np.abs(values).sum())
    return [total, absolute]


class Checkpointer:
    """Saves and restores ``(state, record)`` pairs under ``directory``, keeping the last ``max_to_keep``."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, record: dict) -> None:
        record = dict(record, fingerprint=fingerprint(state), step=int(step))
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )
        # Wait, so that a checkpoint reported as saved is on disk before training moves on.
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_record(self) -> dict | None:
        """The JSON record of the newest checkpoint whose record reads (arrays not restored), or None.

        For values that every checkpoint of a run shares, such as the run's secret seed, which is needed to
        build the structures that :meth:`restore_latest` restores into.
        """
        for step in reversed(self.steps()):
            try:
                return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
            except Exception:  # noqa: BLE001 - an unreadable record: try an older step
                continue
        return None

    def restore_latest(self, abstract_state: Any = None) -> tuple[int, Any, dict] | None:
        """The newest step that restores cleanly and matches its fingerprint, or None if there is none.

        ``abstract_state`` (a pytree of arrays or ShapeDtypeStructs) gives the structure to restore into;
        without it the state comes back as nested dicts of arrays.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
                    ),
                )
                state, record = restored["state"], restored["record"]
            except Exception as error:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
                self._quarantine(step, f"is unreadable ({error})")
                continue
            if not np.allclose(fingerprint(state), record.get("fingerprint", [np.nan, np.nan]), rtol=1e-9, atol=0):
                self._quarantine(step, "fails its fingerprint check")
                continue
            return step, state, record
        return None

    def _quarantine(self, step: int, why: str) -> None:
        """Moves a bad step out of the manager's view (kept for inspection, never reused or deleted)."""
        target = self.directory.parent / f"{self.directory.name}-corrupt" / f"{step}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()
        log.warning("Checkpoint %d in %s %s; moved to %s, trying an older one.", step, self.directory, why, target)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
