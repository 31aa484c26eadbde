"""What a run writes and prints: atomic files, JSON that is always valid, and one progress line per run.

Every file jaxdp writes goes through :func:`atomic_writer` (write to a temporary file in the same directory,
then ``os.replace``), so a crash or a kill never leaves a half-written ``final.json``, ``history.jsonl``, cache or
generated archive behind: a reader sees the old file or the new one. JSON is written through :func:`json_safe`,
which turns NaN and infinities (not JSON) into ``null`` and NumPy scalars into Python numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
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


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file handle whose content replaces ``path`` atomically when the ``with`` block ends without error.

    The temporary file lives next to ``path`` (same file system, so ``os.replace`` is atomic) and is removed
    if the block raises. Files are created readable by everyone (0644), like ordinary files, not 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` (text or bytes) to ``path`` atomically; returns the path."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


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
