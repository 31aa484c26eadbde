"""What a run writes and prints: atomic files, JSON that is always valid, one progress line per run, clean stops.

Every file jaxdp writes goes through :func:`atomic_writer` (write to a temporary file in the same directory,
flush it to disk, then ``os.replace``), so a crash, a kill or a full disk never leaves a half-written
``final.json``, ``history.jsonl``, report file, cache or generated archive behind: a reader sees the old file or
the new one. Text (CSV, markdown, JSON) and bytes (a PNG that matplotlib drew into a buffer, or straight into
the handle) both go through it. JSON is written through :func:`json_safe`, which turns NaN and infinities (not
JSON) into ``null`` and NumPy scalars into Python numbers. :func:`describe_os_error` turns a failed write
(disk full, read-only folder, no permission) into one line saying what to do.

Stopping (SIGINT, SIGTERM): :func:`install_stop_handlers` makes either signal raise :class:`Stopped`, which a
command line turns into "stopped; rerun the same command to resume" and exit status 128 + the signal number
(130, 143). Code that can stop at a better place than wherever the signal lands (the training loop, after a
checkpoint) runs inside :func:`deferred_stops` and polls :func:`stop_requested` once per step::

    with runlog.deferred_stops():
        for step in range(start, total):
            ...
            if (signum := runlog.stop_requested()) is not None:
                save_checkpoint(step + 1)
                raise runlog.Stopped(signum)
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None and NumPy scalars by Python ones (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.floating | np.integer | np.bool_):
        return json_safe(value.item())
    return value


_TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file handle whose content replaces ``path`` atomically when the ``with`` block ends without error.

    ``mode``: ``"w"`` (text, UTF-8) or ``"wb"`` (bytes; e.g. ``fig.savefig(handle, format="png")``). The
    temporary file, ``.<name>.<random>.tmp`` (:func:`temporary_target` recognises it), lives next to ``path``
    (same file system, so ``os.replace`` is atomic); its content is flushed to disk before the rename, so the
    new file is complete even after a power cut; it is removed if the block raises (a full disk, a bug in the
    writer), and ``path`` keeps its previous content. Files are created readable by everyone (0644), like
    ordinary files, not 0600.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode={mode!r}: use 'w' (text) or 'wb' (bytes).")
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as error:
        ours = error.filename is None or temporary_target(os.path.basename(str(error.filename))) == path.name
        if error.errno in _OS_ERROR_ADVICE and (ours or str(error.filename) == str(path.parent)):
            # Name the file being written, not our temporary one: "cannot write .../final.json: no space ...".
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if absent) for the block, so that parallel processes do a
    one-time job (generating or preparing data) once; the OS releases it if the process dies."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` (text or bytes) to ``path`` atomically; returns the path.

    For a matplotlib figure: ``buffer = io.BytesIO(); fig.savefig(buffer, format="png"); write_atomic(path,
    buffer.getvalue())`` (or ``with atomic_writer(path, "wb") as f: fig.savefig(f, format="png")``).
    """
    with atomic_writer(path, "wb" if isinstance(data, bytes | bytearray | memoryview) else "w") as f:
        f.write(data)
    return Path(path)


def temporary_target(name: str) -> str | None:
    """The file name that ``name`` is a temporary file of :func:`atomic_writer` for (``".final.json.ab12cd.tmp"``
    -> ``"final.json"``), or None when ``name`` is not one. A kill between creating it and renaming it leaves
    one behind: it is garbage, never a user's file."""
    if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
        return None
    target, dot, random = name[1:-len(_TEMP_SUFFIX)].rpartition(".")
    return target if dot and target and random and random.replace("_", "").isalnum() else None


# What to do about a failed write, by errno: one owner for the advice every writer's error carries.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free space on that file system (or choose a directory on a "
                   "larger one)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (or choose a directory on another "
                   "file system)"),
    errno.EROFS: ("the file system is read-only", "choose a directory on a writable file system"),
    errno.EACCES: ("permission denied", "make it writable for you (e.g. chmod u+w) or choose another directory"),
    errno.EPERM: ("operation not permitted", "make it writable for you (e.g. chmod u+w) or choose another "
                  "directory"),
}


def describe_os_error(error: OSError, what: str = "") -> str:
    """One line for a failed write: what failed, where, why, and what to do (by ``error.errno``: disk full, quota,
    read-only file system, no permission); other errors are named with their file.

    >>> describe_os_error(OSError(errno.EROFS, "Read-only file system", "/w/final.json"))
    'cannot write /w/final.json: the file system is read-only (EROFS); choose a directory on a writable file system'
    """
    where = what or error.filename or "a file"
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    if error.errno in _OS_ERROR_ADVICE:
        reason, advice = _OS_ERROR_ADVICE[error.errno]
        return f"cannot write {where}: {reason} ({code}); {advice}"
    detail = error.strerror or str(error)
    return f"{where}: {detail}" + (f" ({code})" if code else "")


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as indented, key-sorted JSON (through :func:`json_safe`), written atomically."""
    return write_atomic(path, json.dumps(json_safe(payload), indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line (``history.jsonl``), written atomically as a whole."""
    return write_atomic(path, "".join(json.dumps(json_safe(dict(r)), sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file, in order (blank lines skipped); [] if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hms(seconds: float | None) -> str:
    """``H:MM:SS`` of a duration, ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class RunProgress:
    """One status line per run: step, loss, per-group accuracy, epsilon, speed and ETA.

    Call it as ``progress(step, total_steps, info)``; ``info`` may hold ``loss``, ``accuracy_0``, ``accuracy_1``
    (shown under ``group_names``' initials, "F" / "M" by default) and ``epsilon``, and ``loss_label`` (how the loss
    is named: a training loss computed without noise is not covered by the run's epsilon, and the line says so).

    The line changes only once a window of ``window_steps`` steps has completed (and at the last step), and its
    speed is that window's: a step's duration shows the size of its (Poisson) batch, which the reported epsilon
    does not cover, so no output resolves single steps. On a terminal the line is rewritten in place; in a log file
    a new line is written at most every ``log_every_s`` seconds, so logs of long runs stay readable.
    """

    def __init__(self, label: str, stream: Any = None, log_every_s: float = 30.0, window_steps: int = 20):
        self.label = label
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every_s = log_every_s
        self.window_steps = max(1, int(window_steps))
        self.t0 = time.monotonic()
        self.window: tuple[int, float] | None = None  # (step, time) where the current window began
        self.rate: float | None = None  # steps/s over the last completed window
        self.last_print = -float("inf")
        self.line = ""

    def __call__(self, step: int, total_steps: int, info: Mapping[str, Any]) -> None:
        now = time.monotonic()
        if self.window is None:  # the first report, after compilation: windows start here
            self.window = (step, now)
            if step < total_steps:
                return
        start, began = self.window
        if step - start < self.window_steps and step < total_steps:
            return
        if step > start and now > began:
            self.rate = (step - start) / (now - began)
        self.window = (step, now)
        eta = (total_steps - step) / self.rate if self.rate else None
        bits = [f"{self.label} step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
        if info.get("loss") is not None:
            bits.append(f"{info.get('loss_label', 'loss')} {float(info['loss']):.3f}")
        if info.get("accuracy_0") is not None and info.get("accuracy_1") is not None:
            a, b = (str(name)[:1].upper() for name in info.get("group_names") or ("female", "male"))
            bits.append(f"acc {a} {float(info['accuracy_0']):.1f} / {b} {float(info['accuracy_1']):.1f}")
        if info.get("epsilon") is not None:
            bits.append(f"eps {float(info['epsilon']):.2f}")
        if info.get("note"):
            bits.append(str(info["note"]))
        if self.rate:
            bits.append(f"{self.rate:.2f} steps/s")
        bits.append(f"ETA {hms(eta)}")
        self.line = "  ".join(bits)
        if self.tty:
            self.stream.write("\r" + self.line + "\x1b[K")
            self.stream.flush()
        elif now - self.last_print >= self.log_every_s or step >= total_steps:
            self.stream.write(self.line + "\n")
            self.stream.flush()
            self.last_print = now

    def done(self, result: Mapping[str, Any]) -> None:
        m = result.get("metrics", {}) if isinstance(result, Mapping) else {}
        eps = (result.get("epsilon") or {}) if isinstance(result, Mapping) else {}
        bits = [f"{self.label} done in {hms(time.monotonic() - self.t0)}"]
        if "accuracy" in m:
            bits.append(f"acc {m['accuracy']:.2f} (F {m.get('accuracy_0', float('nan')):.2f} / "
                        f"M {m.get('accuracy_1', float('nan')):.2f})")
        if eps.get("pld") is not None:
            bits.append(f"eps_pld {eps['pld']:.2f}")
        if isinstance(result, Mapping) and result.get("privacy_note"):
            bits.append(str(result["privacy_note"]))
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write("  ".join(bits) + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------- stopping


class Stopped(BaseException):
    """The process was asked to stop (SIGINT: Ctrl-C; SIGTERM: what SLURM sends before it kills a job).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it. A command
    line prints "stopped; rerun the same command to resume" and exits with :attr:`exit_code` (130 for SIGINT, 143
    for SIGTERM). Raised by the handlers of :func:`install_stop_handlers`, or by code that polls
    :func:`stop_requested` once it has saved what it can.
    """

    def __init__(self, signum: int):
        super().__init__(int(signum))
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        return f"stopped by {name}"


_stop_request: int | None = None  # the signal number of a stop that deferred code has not acted on yet
_deferring = 0  # nesting depth of deferred_stops()


def _on_stop_signal(signum: int, frame: Any) -> None:
    global _stop_request
    if _deferring and _stop_request is None:
        _stop_request = signum  # the code inside deferred_stops() stops at its next poll
        return
    raise Stopped(signum)  # no one polls, or a second signal: stop now


def install_stop_handlers(signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Makes SIGINT and SIGTERM stop the process with :class:`Stopped` (call it from the main thread).

    Outside :func:`deferred_stops` the exception is raised wherever the signal lands, as KeyboardInterrupt would
    be (files are still never half-written: every writer is atomic). Inside, the first signal only records the
    request, for :func:`stop_requested`; a second one raises at once.
    """
    for signum in signums:
        signal.signal(signum, _on_stop_signal)


def stop_requested() -> int | None:
    """The signal number of a pending stop request (SIGINT or SIGTERM received inside :func:`deferred_stops`),
    or None. Poll it where stopping is clean (once per training step), save a checkpoint, then raise
    ``Stopped(signum)``."""
    return _stop_request


def clear_stop_request() -> None:
    """Forgets a pending stop request (for a process that handled it and goes on, e.g. a test)."""
    global _stop_request
    _stop_request = None


@contextlib.contextmanager
def deferred_stops() -> Iterator[None]:
    """Inside: a stop signal waits for the code to poll :func:`stop_requested` (a second signal stops at once).

    If a request is still pending when the outermost block ends without an exception (the signal came after the
    last poll), :class:`Stopped` is raised on leaving it: a process asked to stop never starts further work.
    """
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _stop_request is not None:
        raise Stopped(_stop_request)
