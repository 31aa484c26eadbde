"""Checkpoints of a training run (orbax): arrays plus a JSON record, with corruption detection.

A checkpoint holds the training state pytree (parameters, optimiser state — which includes the noise key and
its step count —) and a JSON record (step, privacy ledger, accumulated diagnostics, history position, a
fingerprint of the arrays). Orbax writes each step to a temporary directory and renames it when complete, so
a run killed mid-save leaves no half-written step that looks finished. A step whose files were damaged after
the fact is caught on restore (orbax error, or a fingerprint mismatch) and the previous step is used.

Failures say what happened, once:

* **Nothing readable.** When checkpoint steps exist (or were moved aside as damaged) but no record can be read,
  :meth:`Checkpointer.latest_record` raises :class:`CheckpointsUnreadable` instead of answering "no checkpoint":
  a run whose batches and noise come from a secret seed kept only in its checkpoints would otherwise draw a new
  secret and train again, a second, differently randomised release on the same data. Starting afresh is the
  caller's explicit choice (:meth:`Checkpointer.start_fresh`; ``launch/sweep.py --fresh_start``).
* **A save that cannot be written** (disk full, read-only or unwritable folder) raises
  :class:`CheckpointWriteError`, an OSError with one line saying what to do; saves are synchronous, so the error
  comes from :meth:`Checkpointer.save` itself, and orbax's own tracebacks from its writer threads are not
  printed for it. The partial step it leaves is removed; the previous steps stay.

Checkpoints hold the run's secret: every file is created owner-only (0600, folders 0700), whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdp.runlog import describe_os_error

log = logging.getLogger(__name__)

_CORRUPT_SUFFIX = "-corrupt"  # <checkpoints>-corrupt/<step>-<time>: damaged steps, kept for inspection


class CheckpointsUnreadable(RuntimeError):
    """Checkpoints of a run exist but none can be read: the run cannot resume (and a run with a secret seed cannot
    recover its secret). ``directory`` is the checkpoint folder."""

    def __init__(self, directory: str | os.PathLike, detail: str):
        self.directory = str(directory)
        super().__init__(
            f"no checkpoint in {self.directory} can be read ({detail}): the run cannot resume, and a run whose "
            "batches and noise come from a secret seed cannot recover it. Training it again draws a new secret: a "
            "second, differently randomised release of the mechanism on the same data. If nothing of this run was "
            "released, start it afresh: rerun the sweep with --fresh_start (library: Checkpointer.start_fresh()).")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or unwritable folder); ``errno`` says which. The
    message is one line saying what to do; the checkpoints written before are intact."""

    def __str__(self) -> str:
        return str(self.strerror)


def _error_code(error: BaseException) -> int | None:
    """The errno behind a failed save: orbax raises OSErrors from Python writers, and ValueErrors carrying the
    operating system's message from TensorStore's."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
    text = str(error)
    for code, needle in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                         (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                         (errno.EPERM, "Operation not permitted")):
        if needle in text:
            return code
    return None


@contextlib.contextmanager
def _owner_only() -> Iterator[None]:
    """Files and folders created inside are owner-only (umask 077). The umask is the process's: this is held only
    while a checkpoint is created, saved or moved, when nothing else of the run writes files."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _restrict(path: Path) -> None:
    """chmod 0700 / 0600 over ``path`` (whatever created it): the guarantee does not rest on the umask alone."""
    if not path.exists():
        return
    path.chmod(0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


class _HeldRecords(logging.Handler):
    """Collects orbax's log records of one save, so that a failure is reported once (by the raised error), not as
    tracebacks from each of its writer threads; a save that succeeds lets them through afterwards."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in record.pathname and record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _hold_orbax_errors() -> Iterator[_HeldRecords]:
    held = _HeldRecords()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for logger in loggers:
        logger.addFilter(held)
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeFilter(held)


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
        self._max_to_keep = max_to_keep
        self._manager = self._open()

    def _open(self) -> Any:
        # Synchronous saves: save() waits for the write anyway, and an error then surfaces here, once.
        options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        with _owner_only():
            manager = ocp.CheckpointManager(self.directory, options=options)
        # Owner-only, also for a folder made by an older version; never adds a permission the owner took away.
        self.directory.chmod(self.directory.stat().st_mode & 0o700)
        return manager

    @property
    def corrupt_directory(self) -> Path:
        """Where damaged steps are moved (:meth:`restore_latest`): ``<directory>-corrupt``."""
        return self.directory.parent / f"{self.directory.name}{_CORRUPT_SUFFIX}"

    def save(self, step: int, state: Any, record: dict) -> None:
        """Writes step ``step``; returns when it is on disk. CheckpointWriteError when it cannot be written."""
        record = dict(record, fingerprint=fingerprint(state), step=int(step))
        try:
            with _owner_only(), _hold_orbax_errors() as held:
                self._manager.save(
                    int(step),
                    args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
                    force=True,
                )
                self._manager.wait_until_finished()
        except Exception as error:
            code = _error_code(error)
            if code is None:  # not the file system: a bug, shown in full with orbax's own account of it
                for r in held.records:
                    logging.getLogger("absl").handle(r)
                raise
            for partial in self.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)  # frees the space the failed write took
            message = describe_os_error(OSError(code, os.strerror(code)), f"checkpoint {int(step)} in {self.directory}")
            raise CheckpointWriteError(code, message) from None
        for r in held.records:  # errors logged by a save that still succeeded (e.g. a retried write)
            logging.getLogger("absl").handle(r)
        _restrict(self.directory / str(int(step)))

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_record(self) -> dict | None:
        """The JSON record of the newest checkpoint whose record reads (arrays not restored); None when the run has
        no checkpoint (never had one, or :meth:`start_fresh` was called).

        For values that every checkpoint of a run shares, such as the run's secret seed, which is needed to
        build the structures that :meth:`restore_latest` restores into. Raises :class:`CheckpointsUnreadable`
        when steps exist but no record reads, or when every step was moved aside as damaged: never "no
        checkpoint" for a run that had some.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
            except Exception:  # noqa: BLE001 - an unreadable record: try an older step
                continue
        damaged = sorted(p.name for p in self.corrupt_directory.glob("*")) if self.corrupt_directory.is_dir() else []
        if steps or damaged:
            parts = [f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} unreadable"] if steps else []
            if damaged:
                parts.append(f"damaged steps moved to {self.corrupt_directory}: {', '.join(damaged)}")
            raise CheckpointsUnreadable(self.directory, "; ".join(parts))
        return None

    def start_fresh(self) -> Path | None:
        """Sets every existing step (and the damaged ones moved aside before) aside in
        ``<directory>-abandoned-<time>/``, so that the run starts from nothing: the explicit choice that
        :class:`CheckpointsUnreadable` asks for. Returns that folder (None when there was nothing). Nothing is
        deleted."""
        steps = self.steps()
        corrupt = self.corrupt_directory
        if not steps and not corrupt.is_dir():
            return None
        target = self.directory.parent / f"{self.directory.name}-abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        with _owner_only():
            target.mkdir(mode=0o700)
            for step in steps:
                shutil.move(str(self.directory / str(step)), str(target / str(step)))
            if corrupt.is_dir():
                shutil.move(str(corrupt), str(target / corrupt.name))
        self._manager.reload()
        log.warning("Set the checkpoints of %s aside in %s; the run starts afresh.", self.directory, target)
        return target

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
        target = self.corrupt_directory / f"{step}-{int(time.time())}"
        with _owner_only():
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()
        log.warning("Checkpoint %d in %s %s; moved to %s, trying an older one.", step, self.directory, why, target)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
