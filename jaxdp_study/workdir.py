"""The layout of a sweep's working directory, and the checks and locks that make rerunning a sweep safe.

Layout (the same for every launcher)::

    <workdir>/<run name>/          one directory per run, e.g. medium-ff0.99-clip5-seed0
        .lock                      the run's lock (see below); never deleted
        sweep_run.json             the run record (jaxdp_study.grid.Run.record): run name, grids, axis values and
                                   the resolved run config; the report reads a run's settings from it
        config.json, history.jsonl, final.json, checkpoints/   written by jaxdp.train.train_and_evaluate
    <workdir>/summary.csv, table1.csv, table1.md, imbalance_drop.*, figures/*.png   written by jaxdp_study.report
    <workdir>/.xla_cache/          JAX persistent compilation cache shared by the runs (unless moved)
    <workdir>/submitit/            job scripts and logs of the submitit launchers

Resume guarantee: a run whose directory holds ``final.json`` is never trained again; a run directory without
it is handed back to ``train_and_evaluate``, which resumes from its latest checkpoint. A run directory is only
reused when its stored resolved config equals the new one (ignoring :data:`jaxdp.config.RESULT_NEUTRAL_KEYS`);
otherwise :func:`prepare_workdir` raises :class:`~jaxdp_study.grid.SweepError` before any work starts, unless
``overwrite=True``, which deletes that run's files (and so its results) and trains it from scratch.

**One process per run.** Whoever decides about a run's files, creates, trains or deletes them holds the run's
lock, an exclusive ``fcntl.flock`` on ``<run>/.lock`` (:class:`RunLock`), which the operating system releases
when the process ends, however it ends. A second sweep on the same workdir (a second SLURM submission while the
first still runs) finds the lock taken, skips that run with "being trained by pid N on HOST" (:class:`RunBusy`)
and goes on with the others: the two share the work. So a run is never trained twice at once, never deleted
under a process training it, and a run with a secret seed never draws two secrets. ``flock`` works across the
machines of a cluster on NFSv4 and on Lustre mounted with ``-o flock``.

**Damaged files.** The writes are atomic, but disks and copies can still damage a file. A ``final.json`` or
``sweep_run.json`` that is not a JSON object is named on stderr and moved aside (``final.json.corrupt-<time>``),
never deleted: a run without a readable ``final.json`` is unfinished and resumes from its checkpoints; a run
without a readable record is checked against its ``config.json`` instead, and gets its record back. Temporary
files of our own writer (``.sweep_run.json.<random>.tmp``, left by a kill between writing and renaming) and the
lock never make a directory "not written by a sweep".
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from jaxdp.config import differing_keys, resolve
from jaxdp.runlog import temporary_target, write_atomic
from jaxdp_study.grid import Run, SweepError, config_to_dict

RUN_RECORD = "sweep_run.json"
FINAL = "final.json"
RUN_CONFIG = "config.json"  # written by jaxdp.train: the resolved config that ran
LOCK = ".lock"
CORRUPT = ".corrupt-"  # <file>.corrupt-<time>: a damaged file, moved aside
ABANDONED = "abandoned-"  # abandoned-<time>/: a run's files set aside by a fresh start (launchers.run_one)


@dataclasses.dataclass
class RunStatus:
    run: Run
    run_dir: Path
    state: str  # "finished" | "partial" (resumes from its checkpoint) | "new" | "conflict" (dry run only)
    note: str = ""  # why a conflict, or what is damaged
    holder: str | None = None  # "pid N on HOST" while another process holds the run's lock


class RunBusy(Exception):
    """Another process holds the run's lock: it is training (or deciding about) that run right now."""

    def __init__(self, run_dir: str | os.PathLike, holder: str):
        super().__init__(str(run_dir), holder)
        self.run_dir, self.holder = str(run_dir), holder

    def __str__(self) -> str:
        return f"{self.run_dir} is being trained by {self.holder}"


# ------------------------------------------------------------------------------------------------- locking


def _holder_of(handle: IO) -> str:
    """Who holds a lock, from the lock file's content ("pid N on HOST"); it is written just after locking, so a
    reader may come too early and find it empty: it looks again a few times."""
    for _ in range(20):
        handle.seek(0)
        text = handle.read().strip()
        if text:
            return text
        time.sleep(0.05)
    return "another process"


class RunLock:
    """The exclusive lock of one run directory (``<run>/.lock``), held by at most one process at a time.

    ``acquire()`` never waits: :class:`RunBusy` (naming the holder) when another process has it. The lock file is
    never deleted (a process that opened it must lock the same file as everyone else), and the operating system
    releases the lock when the process dies.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._handle: IO | None = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+")
        for attempt in range(10):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                if handle.read().strip() or attempt == 9:  # a holder that wrote its name: it is training
                    holder = _holder_of(handle)
                    handle.close()
                    raise RunBusy(self.run_dir, holder) from None
                # No name yet: a holder just starting, or just ending, or lock_holder() glancing: look again.
                time.sleep(0.02)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.truncate(0)
            self._handle.close()  # closing the file releases the lock
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """"pid N on HOST" when another process holds the run's lock now, else None (reads; creates nothing)."""
    path = Path(run_dir) / LOCK
    try:
        handle = open(path)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_of(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# ------------------------------------------------------------------------------------------- damaged files


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``; None when the file is absent or does not hold one (damaged)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def _damaged(path: Path, required: Sequence[str] = ()) -> bool:
    """``path`` exists but is not a JSON object with the ``required`` keys."""
    if not path.exists():
        return False
    value = read_json_object(path)
    return value is None or any(k not in value for k in required)


def set_aside(path: str | os.PathLike, consequence: str) -> Path | None:
    """Moves a damaged file to ``<name>.corrupt-<time>`` (never deletes it) and says so on stderr; returns the
    new path (None if another process moved it first)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}{CORRUPT}{stamp}")
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}{CORRUPT}{stamp}-{k}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(f"{path} is damaged (not a JSON object) and could not be moved aside ({e.strerror}); {consequence}")
        return None
    _warn(f"{path} is damaged (not a JSON object); moved it to {target.name}; {consequence}")
    return target


_RECORD_KEYS = ("name", "config")


def set_aside_damaged(run_dir: str | os.PathLike) -> None:
    """Moves a damaged ``sweep_run.json``, ``final.json`` or ``config.json`` of a run aside, saying what follows."""
    run_dir = Path(run_dir)
    if _damaged(run_dir / RUN_RECORD, _RECORD_KEYS):
        set_aside(run_dir / RUN_RECORD, "the run is checked against its config.json instead, and the sweep writes "
                  "its record again")
    if _damaged(run_dir / FINAL):
        set_aside(run_dir / FINAL, "the run counts as unfinished: it resumes from its checkpoints, if it has any")
    if _damaged(run_dir / RUN_CONFIG):
        set_aside(run_dir / RUN_CONFIG, "the run's sweep_run.json says which config it holds")


def _is_own(name: str) -> bool:
    """Files a sweep leaves in a run directory that hold no results: the lock, temporary files of our atomic
    writer, damaged files moved aside, files set aside by a fresh start."""
    return (name == LOCK or temporary_target(name) is not None or CORRUPT in name or name.startswith(ABANDONED))


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Deletes our writer's temporary files left in ``run_dir`` by a kill (hold the run's lock: a live writer's
    temporary file is never touched)."""
    for entry in Path(run_dir).iterdir():
        if entry.is_file() and temporary_target(entry.name) is not None:
            entry.unlink(missing_ok=True)


def clear_run_dir(run_dir: str | os.PathLike, *, keep_set_aside: bool = False) -> None:
    """Deletes everything in ``run_dir`` but its lock (hold the lock: see :class:`RunLock`) and, with
    ``keep_set_aside``, the damaged files and abandoned checkpoints moved aside earlier."""
    for entry in Path(run_dir).iterdir():
        if entry.name == LOCK or (keep_set_aside and _is_own(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ------------------------------------------------------------------------------------------------ checking


def check_workdir_writable(workdir: str | os.PathLike) -> Path:
    """Create ``workdir`` if needed and prove it writable; SweepError naming the path otherwise."""
    path = Path(workdir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SweepError(f"workdir {str(path)!r} is not writable ({e.strerror or e}); choose another "
                         f"--workdir (a directory you can create files in)") from None
    return path


def _config_json_diff(stored: dict, config: Any) -> list[str]:
    """Differences between a run's ``config.json`` (the resolved config that ran) and the config it would run now.
    A noise multiplier calibrated from ``dp.target_epsilon`` is the run's own result, not a difference."""
    new = json.loads(json.dumps(resolve(config), default=str))
    diff = differing_keys(stored, new)
    if config.dp.get("target_epsilon") is not None:
        diff = [d for d in diff if not d.startswith("dp.noise_multiplier:")]
    return diff


def inspect_run(run: Run, run_dir: str | os.PathLike, *, check_lock: bool = True) -> RunStatus:
    """The state of ``run``'s directory; reads, never writes. ``conflict`` when it holds another config's results
    or files not written by a sweep (``note`` says which); damaged files are reported in ``note``."""
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir) if check_lock else None
    if not run_dir.is_dir():
        return RunStatus(run, run_dir, "new", holder=holder)
    notes = []
    record = read_json_object(run_dir / RUN_RECORD)
    record_damaged = (run_dir / RUN_RECORD).exists() and (record is None or any(k not in record
                                                                                   for k in _RECORD_KEYS))
    had_record = record_damaged or any(p.name.startswith(RUN_RECORD + CORRUPT) for p in run_dir.iterdir())
    if record_damaged:
        notes.append(f"{RUN_RECORD} damaged")
        record = None
    results = [p.name for p in run_dir.iterdir() if not _is_own(p.name) and p.name != RUN_RECORD]
    if record is not None:
        diff = differing_keys(record.get("config", {}), config_to_dict(run.config))
    elif had_record and read_json_object(run_dir / RUN_CONFIG) is not None:
        diff = _config_json_diff(read_json_object(run_dir / RUN_CONFIG), run.config)
    elif had_record and results:
        return RunStatus(run, run_dir, "conflict", f"its {RUN_RECORD} is damaged and it has no readable "
                         f"{RUN_CONFIG}: which config it holds cannot be told", holder)
    elif results:
        return RunStatus(run, run_dir, "conflict", f"exists, is not empty and has no {RUN_RECORD} "
                         f"(not written by a sweep)", holder)
    else:
        return RunStatus(run, run_dir, "new", "; ".join(notes), holder)
    if diff:
        return RunStatus(run, run_dir, "conflict", "\n    ".join(diff[:8]) + ("\n    ..." if len(diff) > 8 else ""),
                         holder)
    if _damaged(run_dir / FINAL):
        notes.append(f"{FINAL} damaged: resumes from its checkpoints")
    elif (run_dir / FINAL).exists():
        return RunStatus(run, run_dir, "finished", "; ".join(notes), holder)
    return RunStatus(run, run_dir, "partial", "; ".join(notes), holder)


def prepare_workdir(workdir: str | os.PathLike, runs: Sequence[Run], *, overwrite: bool = False,
                    write: bool = True) -> list[RunStatus]:
    """Checks every run directory against its new config; creates the workdir (``write``). Nothing else is written:
    each run's directory is claimed (locked, cleared for ``overwrite``, given its record) by :func:`claim_run` when
    its turn comes.

    All conflicts are collected and raised together (SweepError), so a refused sweep leaves the workdir
    untouched. With ``overwrite=True`` conflicting runs are reported as "new": :func:`claim_run` deletes their
    files. ``write=False`` only inspects (for ``--dry_run``), and reports conflicts as state "conflict".
    """
    root = check_workdir_writable(workdir) if write else Path(workdir).expanduser().resolve()
    statuses = [inspect_run(run, root / run.name) for run in runs]
    if not write:
        return statuses
    conflicts = [f"  {s.run_dir}:\n    {s.note}" for s in statuses if s.state == "conflict"]
    if conflicts and not overwrite:
        raise SweepError(
            f"{len(conflicts)} run director{'y' if len(conflicts) == 1 else 'ies'} in {root} hold results "
            f"of a different config:\n" + "\n".join(conflicts) + "\nChoose another --workdir to keep them, "
            "or pass --overwrite to delete those runs and train them again.")
    for s in statuses:
        if s.state == "conflict":
            s.state = "new"
    return statuses


def claim_run(run: Run, run_dir: str | os.PathLike, *, overwrite: bool = False) -> RunStatus:
    """Decides what to do with ``run``'s directory; call it holding the run's :class:`RunLock`.

    Removes our writer's stale temporary files, moves damaged files aside (:func:`set_aside_damaged`), and
    returns the run's state: "finished", "partial" or "new". A directory holding another config's results is
    cleared with ``overwrite`` (its lock kept), else refused with SweepError: another sweep, with another config,
    claimed it after this one checked the workdir.
    """
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir)
    set_aside_damaged(run_dir)
    status = inspect_run(run, run_dir, check_lock=False)
    if status.state == "conflict":
        if not overwrite:
            raise SweepError(f"{run_dir} holds results of a different config (written after this sweep started, "
                             f"by another one):\n    {status.note}\nChoose another --workdir, or pass --overwrite "
                             f"to delete them and train this run again.")
        clear_run_dir(run_dir)
        status = RunStatus(run, run_dir, "new")
    return status


def write_run_record(run: Run, run_dir: str | os.PathLike) -> None:
    """Writes ``sweep_run.json`` unless the run has one (hold the run's lock; write it only once the run's checks
    passed, so that a refused run leaves no record that would block the corrected command)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.exists():
        write_atomic(path, json.dumps(run.record(), indent=2) + "\n")


def restore_record(run: Run, run_dir: str | os.PathLike) -> bool:
    """Gives a finished run whose record is damaged or missing (checked against its ``config.json``) its record
    back, under its lock; False when another process holds the lock (it will)."""
    run_dir = Path(run_dir)
    if read_json_object(run_dir / RUN_RECORD) is not None:
        return True
    try:
        with RunLock(run_dir):
            if claim_run(run, run_dir).state == "finished":
                write_run_record(run, run_dir)
    except RunBusy:
        return False
    return True


# -------------------------------------------------------------------------------------------------- reading


def find_run_dirs(workdir: str | os.PathLike) -> list[Path]:
    """Run directories (holding ``sweep_run.json``) directly under ``workdir``, sorted by name."""
    return sorted(p.parent for p in Path(workdir).glob(f"*/{RUN_RECORD}"))


def summarize_plan(statuses: Iterable[RunStatus]) -> str:
    """A table of run name, state and grids, for ``--dry_run``."""
    rows = [f"{'run':44s} {'state':9s} grids"]
    for s in statuses:
        extra = [f"being trained by {s.holder}"] if s.holder else []
        extra += [s.note.splitlines()[0]] if s.note and s.state != "conflict" else []
        rows.append(f"{s.run.name:44s} {s.state:9s} {','.join(s.run.grids)}"
                    + (f"  ({'; '.join(extra)})" if extra else ""))
    return "\n".join(rows)


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run record (``sweep_run.json``) of a run directory: ``name``, ``grids``, ``axes``, ``config``.

    SweepError naming the file when it is damaged (:func:`runs_by_name` moves damaged records aside first)."""
    path = Path(run_dir) / RUN_RECORD
    record = read_json_object(path)
    if record is None or any(k not in record for k in _RECORD_KEYS):
        raise SweepError(f"{path} is damaged (not a run record); move it aside and rerun the sweep, which writes it "
                         "again")
    return record


def runs_by_name(workdir: str | os.PathLike) -> dict[str, Path]:
    """The run directories under ``workdir`` keyed by the run name in their record, not by their own name.

    A directory can be renamed or moved within the workdir without changing what the report says about it.
    A damaged record or ``final.json`` is named on stderr and moved aside (:func:`set_aside`): the run is left
    out of the report, or counted as unfinished, until the sweep is rerun. SweepError if two directories hold
    records of the same run (e.g. a copy kept as a backup).
    """
    out: dict[str, Path] = {}
    for run_dir in find_run_dirs(workdir):
        if _damaged(run_dir / RUN_RECORD, _RECORD_KEYS):
            set_aside(run_dir / RUN_RECORD, "the report leaves this run out; rerun the sweep to write its record "
                      "again")
            continue
        if _damaged(run_dir / FINAL):
            set_aside(run_dir / FINAL, "the run counts as unfinished: rerun the sweep to finish it from its "
                      "checkpoints")
        name = read_run_record(run_dir)["name"]
        if name in out:
            raise SweepError(f"{out[name]} and {run_dir} both hold run {name!r} (their {RUN_RECORD}); move one "
                             f"of them out of {Path(workdir)}")
        out[name] = run_dir
    return out
