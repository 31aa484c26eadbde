"""The layout of a sweep's working directory, and the checks that make rerunning a sweep safe.

Layout (the same for every launcher)::

    <workdir>/<run name>/          one directory per run, e.g. medium-ff0.99-clip5-seed0
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
``overwrite=True``, which deletes that run's directory (and so its results) and trains it from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jaxdp.config import differing_keys
from jaxdp.runlog import write_atomic
from jaxdp_study.grid import Run, SweepError, config_to_dict

RUN_RECORD = "sweep_run.json"
FINAL = "final.json"


@dataclasses.dataclass
class RunStatus:
    run: Run
    run_dir: Path
    state: str  # "finished" | "partial" (resumes from its checkpoint) | "new" | "conflict" (dry run only)


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


def prepare_workdir(workdir: str | os.PathLike, runs: Sequence[Run], *, overwrite: bool = False,
                    write: bool = True) -> list[RunStatus]:
    """Check every run directory against its new config and write ``sweep_run.json`` for new runs.

    Nothing is trained here. All conflicts are collected and raised together (SweepError) before anything is
    written, so a refused sweep leaves the workdir untouched. With ``overwrite=True`` a conflicting run's
    directory is deleted instead. ``write=False`` only inspects (for ``--dry_run``).
    """
    root = check_workdir_writable(workdir) if write else Path(workdir).expanduser().resolve()
    statuses: list[RunStatus] = []
    conflicts: list[str] = []
    to_delete: list[Path] = []
    for run in runs:
        run_dir = root / run.name
        record_path = run_dir / RUN_RECORD
        state = "new"
        if record_path.exists():
            stored = json.loads(record_path.read_text())
            diff = differing_keys(stored.get("config", {}), config_to_dict(run.config))
            if diff:
                conflicts.append(f"  {run_dir}:\n    " + "\n    ".join(diff[:8])
                                 + ("\n    ..." if len(diff) > 8 else ""))
                to_delete.append(run_dir)
                state = "conflict"
            else:
                state = "finished" if (run_dir / FINAL).exists() else "partial"
        elif run_dir.exists() and any(run_dir.iterdir()):
            conflicts.append(f"  {run_dir}: exists, is not empty and has no {RUN_RECORD} "
                             f"(not written by a sweep)")
            to_delete.append(run_dir)
            state = "conflict"
        statuses.append(RunStatus(run, run_dir, state))
    if not write:
        return statuses
    if conflicts and not overwrite:
        raise SweepError(
            f"{len(conflicts)} run director{'y' if len(conflicts) == 1 else 'ies'} in {root} hold results "
            f"of a different config:\n" + "\n".join(conflicts) + "\nChoose another --workdir to keep them, "
            "or pass --overwrite to delete those runs and train them again.")
    for d in to_delete:
        shutil.rmtree(d)
    for st in statuses:
        if st.state == "conflict":
            st.state = "new"
    for st in statuses:
        st.run_dir.mkdir(parents=True, exist_ok=True)
        if not (st.run_dir / RUN_RECORD).exists():
            write_atomic(st.run_dir / RUN_RECORD, json.dumps(st.run.record(), indent=2) + "\n")
    return statuses



def find_run_dirs(workdir: str | os.PathLike) -> list[Path]:
    """Run directories (holding ``sweep_run.json``) directly under ``workdir``, sorted by name."""
    return sorted(p.parent for p in Path(workdir).glob(f"*/{RUN_RECORD}"))


def summarize_plan(statuses: Iterable[RunStatus]) -> str:
    """A table of run name, state and grids, for ``--dry_run``."""
    rows = [f"{'run':44s} {'state':9s} grids"]
    rows += [f"{s.run.name:44s} {s.state:9s} {','.join(s.run.grids)}" for s in statuses]
    return "\n".join(rows)


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run record (``sweep_run.json``) of a run directory: ``name``, ``grids``, ``axes``, ``config``."""
    return json.loads((Path(run_dir) / RUN_RECORD).read_text())


def runs_by_name(workdir: str | os.PathLike) -> dict[str, Path]:
    """The run directories under ``workdir`` keyed by the run name in their record, not by their own name.

    A directory can be renamed or moved within the workdir without changing what the report says about it.
    SweepError if two directories hold records of the same run (e.g. a copy kept as a backup).
    """
    out: dict[str, Path] = {}
    for run_dir in find_run_dirs(workdir):
        name = read_run_record(run_dir)["name"]
        if name in out:
            raise SweepError(f"{out[name]} and {run_dir} both hold run {name!r} (their {RUN_RECORD}); move one "
                             f"of them out of {Path(workdir)}")
        out[name] = run_dir
    return out
