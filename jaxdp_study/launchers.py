"""Launching a sweep: the unit of work (:func:`run_one`) and the launchers that run it.

``local`` trains the unfinished runs one after another in this process; ``submitit_local`` runs each as a
subprocess job through submitit (to test the job path); ``slurm`` submits one SLURM job per run, as a job
array. Every launcher uses the same working-directory layout and checks (:mod:`jaxdp_study.workdir`) and the
same :func:`run_one`, so a sweep can be started with one launcher and resumed with another.

:func:`run_one` holds the run's lock (:class:`jaxdp_study.workdir.RunLock`) from deciding about the run's files to
the end of its training, so two sweeps on one workdir share the work: a run another process holds is skipped
(:class:`~jaxdp_study.workdir.RunBusy`) and the sweep goes on with the others. A run that fails before its first
step leaves nothing behind but its lock: the corrected command is not blocked by a record of the mistaken one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdp import runlog
from jaxdp.runlog import RunProgress, hms
from jaxdp_study.grid import Run, SweepError, config_to_dict, expand, select_runs
from jaxdp_study.workdir import (
    ABANDONED,
    CORRUPT,
    FINAL,
    LOCK,
    RUN_RECORD,
    RunBusy,
    RunLock,
    RunStatus,
    claim_run,
    clear_run_dir,
    prepare_workdir,
    read_json_object,
    restore_record,
    write_run_record,
)

LAUNCHERS = ("local", "submitit_local", "slurm")

TrainFn = Callable[..., dict]


def enable_compilation_cache(cache_dir: str | os.PathLike) -> str:
    """Turn on JAX's persistent compilation cache in ``cache_dir`` (every compiled program is kept).

    Runs that share shapes (same model, image size and batch size; only data or privacy differ) then load
    their executables instead of compiling again. If this process already uses a cache directory it is kept
    (JAX fixes the directory at the first compile); the directory in use is returned.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return str(cache_dir)


def _default_train_fn() -> TrainFn:
    from jaxdp.train import train_and_evaluate

    return train_and_evaluate


def _start_distributed() -> bool:
    """jaxdp.parallel's multi-process start-up (a no-op for one process), at most once per process."""
    import jax

    from jaxdp import parallel

    return jax.distributed.is_initialized() or parallel.initialize_distributed()


def default_check(config: ml_collections.ConfigDict) -> None:
    """Everything checkable before a run of the real trainer starts: :func:`jaxdp.train.check_runnable` (the
    config's values, including those that would otherwise fail only inside the run — epochs, optimiser, model,
    batch size against the data — the data on this machine, the audit's capacity)."""
    from jaxdp.train import check_runnable

    check_runnable(config)


def _checkpoint_steps(directory: Path) -> list[int]:
    """The steps orbax has written in ``directory`` (its step folders), without opening them."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _trained_before(run_dir: Path) -> str | None:
    """What shows that a run trained before (a final.json set aside as damaged, evaluations in history.jsonl), or
    None."""
    damaged = sorted(p.name for p in run_dir.glob(f"{FINAL}{CORRUPT}*"))
    if damaged:
        return f"its final.json was damaged and set aside ({damaged[-1]})"
    history = run_dir / "history.jsonl"
    rows = sum(1 for line in history.read_text(errors="replace").splitlines() if line.strip()) \
        if history.is_file() else 0
    return f"its history.jsonl records {rows} evaluation{'s' if rows > 1 else ''}" if rows else None


def _check_resumable(config: ml_collections.ConfigDict, run_dir: Path, fresh_start: bool) -> None:
    """A run whose randomness is a secret kept only in its checkpoints resumes only if a checkpoint record reads:
    otherwise it would draw a second secret (jaxdp.checkpoint.CheckpointsUnreadable), also when its checkpoints are
    gone (a finished run deletes them; a damaged final.json then cannot be recomputed). With ``fresh_start`` its
    files but the record are set aside in ``<run>/abandoned-<time>/`` instead (nothing is deleted) and it starts
    over. For jaxdp.train's checkpoint layout only (``train_fn`` None or declaring ``writes_jaxdp_checkpoints``)."""
    if not config.dp.enabled or config.dp.reproducible:
        return  # randomness from train.seed: restarting replays the same batches and noise
    from jaxdp.checkpoint import Checkpointer, CheckpointsUnreadable
    from jaxdp.train import SECRET_FOLDERS

    checkpoints, quarantined = (run_dir / name for name in SECRET_FOLDERS)
    if _checkpoint_steps(checkpoints) or quarantined.is_dir():
        checkpointer = Checkpointer(checkpoints)
        try:
            checkpointer.latest_record()
            return
        except CheckpointsUnreadable:
            if not fresh_start:
                raise
        finally:
            checkpointer.close()
    else:
        evidence = _trained_before(run_dir)
        if evidence is None:
            return
        if not fresh_start:
            raise CheckpointsUnreadable(checkpoints, f"there is none, but {evidence}; a finished run deletes its "
                                        "checkpoints")
    target = run_dir / f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(mode=0o700)
    for entry in run_dir.iterdir():
        if entry.name not in (LOCK, RUN_RECORD) and not entry.name.startswith(ABANDONED):
            shutil.move(str(entry), str(target / entry.name))
    sys.stderr.write(f"warning: --fresh_start: set the files of {run_dir} aside in {target} (its checkpoints cannot "
                     "be read); the run starts over with a new secret\n")


def _is_leader(distributed: bool) -> bool:
    if not distributed:
        return True
    import jax

    return jax.process_index() == 0


def _agree(distributed: bool, code: int) -> int:
    """Process 0's ``code`` on every process of a multi-process run (the others pass any value)."""
    if not distributed:
        return code
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return code
    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


_PROCEED, _BUSY, _FINISHED, _REFUSED = 0, 1, 2, 3


def run_one(config: ml_collections.ConfigDict | Mapping[str, Any], run_dir: str | os.PathLike, *,
            cache_dir: str | os.PathLike | None = None, train_fn: TrainFn | None = None,
            on_progress: Callable[[int, int, dict], None] | None = None, run: Run | None = None,
            overwrite: bool = False, fresh_start: bool = False,
            on_claim: Callable[[str], None] | None = None) -> dict:
    """Train (or resume, or return the finished result of) one run in ``run_dir``; returns final.json's dict.

    This is the unit of work of every launcher: the local launcher calls it in-process, the submitit
    launchers pickle it into a job. In a submitit job it first starts JAX's distributed runtime with
    :func:`jaxdp.parallel.initialize_distributed` (which does nothing unless the job has several tasks).

    Holding the run's lock (process 0 of a multi-process run, which tells the others what it decided): the
    directory is claimed (:func:`jaxdp_study.workdir.claim_run`: damaged files set aside, another config's files
    cleared with ``overwrite``), a run with a secret seed is checked to be resumable (``fresh_start`` sets its
    unreadable checkpoints aside), the run record of ``run`` is written, and the run is trained. Raises
    :class:`~jaxdp_study.workdir.RunBusy` when another process holds the lock. If training fails before its first
    step in a directory this call created the record of, the directory is emptied (but for its lock).
    ``on_claim(state)`` is told what the claim found: "finished" (e.g. by another process since the sweep
    looked), "partial" or "new".
    """
    config = ml_collections.ConfigDict(
        config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
    # The sweep draws its own progress line (on_progress); the trainer's bar would duplicate it. Always off,
    # so the config the trainer stores is the same on every (re)invocation.
    config.train.progress = False
    if on_progress is None:
        on_progress = RunProgress(str(config.name), log_every_s=60.0)
    distributed = "SUBMITIT_EXECUTOR" in os.environ and _start_distributed()
    if cache_dir is not None:
        enable_compilation_cache(cache_dir)
    fn = train_fn or _default_train_fn()
    run_dir = Path(run_dir)
    run = run or Run(name=run_dir.name, grids=[], axes={}, config=config)
    lock = RunLock(run_dir)
    leader = _is_leader(distributed)
    code, state, holder = _PROCEED, "partial", ""
    if leader:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            state = claim_run(run, run_dir, overwrite=overwrite).state
            if state == "finished":
                code = _FINISHED
            else:
                if train_fn is None or getattr(train_fn, "writes_jaxdp_checkpoints", False):
                    _check_resumable(config, run_dir, fresh_start)
                write_run_record(run, run_dir)
        except RunBusy as e:
            code, holder = _BUSY, e.holder
            _agree(distributed, code)
            raise
        except BaseException:
            lock.release()
            _agree(distributed, _REFUSED)
            raise
    code = _agree(distributed, code)
    if on_claim is not None and code in (_PROCEED, _FINISHED):
        on_claim("finished" if code == _FINISHED else state)
    if code == _BUSY:
        raise RunBusy(run_dir, holder or "process 0 of another job")
    if code == _REFUSED:
        raise SweepError(f"process 0 refused run {run_dir}; its log says why")
    try:
        if code == _FINISHED:
            return read_json_object(run_dir / FINAL) or fn(config, str(run_dir), on_progress=on_progress)
        stepped = []

        def progress(step: int, total: int, info: dict) -> None:
            stepped.append(step)
            on_progress(step, total, info)

        try:
            return fn(config, str(run_dir), on_progress=progress)
        except BaseException:
            no_step = not stepped and max(_checkpoint_steps(run_dir / "checkpoints"), default=0) == 0
            if leader and state == "new" and no_step:
                # Nothing ran: nothing of this attempt may block the next command (files set aside before stay).
                clear_run_dir(run_dir, keep_set_aside=True)
            raise
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------- launching


@dataclasses.dataclass
class SlurmOptions:
    """submitit/SLURM job settings for ``--launcher=slurm`` (one job per run, submitted as a job array)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 24 * 60
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float | None = None
    array_parallelism: int = 64
    additional: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_executor(launcher: str, folder: str | os.PathLike, *, job_name: str = "jaxdp",
                  slurm: SlurmOptions | None = None) -> Any:
    """A submitit executor: ``"slurm"`` (SlurmExecutor via AutoExecutor) or ``"submitit_local"``.

    The local one runs each job as a subprocess on this machine; it exists to test the job path.
    """
    import submitit

    if launcher not in ("slurm", "submitit_local"):
        raise SweepError(f"launcher {launcher!r} has no submitit executor; choose 'slurm' or "
                         f"'submitit_local'")
    slurm = slurm or SlurmOptions()
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm" if launcher == "slurm" else "local")
    params: dict[str, Any] = {"name": job_name, "timeout_min": slurm.time_min}
    if launcher == "slurm":
        params.update(nodes=slurm.nodes, gpus_per_node=slurm.gpus_per_node,
                      tasks_per_node=slurm.tasks_per_node, cpus_per_task=slurm.cpus_per_task,
                      slurm_array_parallelism=slurm.array_parallelism)
        for key, value in (("slurm_partition", slurm.partition), ("slurm_account", slurm.account),
                           ("slurm_qos", slurm.qos), ("slurm_constraint", slurm.constraint),
                           ("mem_gb", slurm.mem_gb)):
            if value is not None:
                params[key] = value
        if slurm.additional:
            params["slurm_additional_parameters"] = dict(slurm.additional)
    else:
        params.update(nodes=1, tasks_per_node=1, gpus_per_node=0)
    ex.update_parameters(**params)
    return ex


@dataclasses.dataclass
class SweepResult:
    workdir: Path
    statuses: list[RunStatus]
    trained: list[str]
    skipped: list[str]
    failed: dict[str, str]
    job_ids: dict[str, str]
    busy: dict[str, str] = dataclasses.field(default_factory=dict)  # run -> "pid N on HOST" that held its lock


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, launcher: str = "local",
              overwrite: bool = False, train_fn: TrainFn | None = None,
              cache_dir: str | os.PathLike | None = None, executor: Any = None,
              slurm: SlurmOptions | None = None, wait: bool = True, run_filter: str | None = None,
              stream: Any = None, check_fn: Callable[[ml_collections.ConfigDict], None] | None = None,
              fresh_start: bool = False) -> SweepResult:
    """Expand ``config``, check the workdir, and train every unfinished run with ``launcher``.

    ``launcher``: ``"local"`` (in this process, one run after another), ``"submitit_local"`` (one subprocess
    job per run, via submitit; for testing the job path) or ``"slurm"`` (one SLURM job per run, as an array).
    ``executor`` replaces the submitit executor (any object with ``submit(fn, *args, **kwargs)``).
    ``wait=False`` returns right after submitting (submitit launchers). ``run_filter`` is a regular
    expression; only runs whose name matches are run. ``cache_dir`` defaults to ``<workdir>/.xla_cache``.
    A local run that raises stops the sweep (re-raised); finished runs stay finished and rerunning the same
    command resumes. Submitted jobs that fail are collected in ``SweepResult.failed``. A run that another
    process is training (its lock is taken) is skipped and listed in ``SweepResult.busy``; the sweep goes on
    with the others. ``fresh_start``: a secret-seed run whose checkpoints cannot be read starts over (see
    :func:`run_one`) instead of being refused.

    Before anything is written but the workdir itself, every run still to train is checked with ``check_fn``
    (default, when ``train_fn`` is the real trainer: :func:`jaxdp.train.check_runnable` and
    :func:`jaxdp.checks.check_run` — config values, data on this machine, audit capacity, the batch against the
    training set's size, the optimiser; no check for a custom ``train_fn`` unless given): a missing dataset or an
    impossible setting stops the sweep with one :class:`SweepError` naming the runs, before any run starts.
    """
    out = stream or sys.stdout
    if launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    runs = select_runs(expand(config), run_filter)
    if check_fn is None and train_fn is None:
        check_fn = default_check
    if check_fn is not None:
        inspected = prepare_workdir(workdir, runs, overwrite=overwrite, write=False)
        check_runs([s.run for s in inspected if s.state != "finished"], check_fn)
    statuses = prepare_workdir(workdir, runs, overwrite=overwrite)
    root = statuses[0].run_dir.parent if statuses else Path(workdir).resolve()
    cache = str(cache_dir) if cache_dir is not None else str(root / ".xla_cache")
    todo = [s for s in statuses if s.state != "finished"]
    skipped = [s.run.name for s in statuses if s.state == "finished"]
    for s in statuses:
        if s.state == "finished":
            restore_record(s.run, s.run_dir)  # a damaged record: set aside, written again
    n = len(statuses)
    busy = sum(s.holder is not None for s in todo)
    out.write(f"sweep '{config.get('name', 'sweep')}': {n} runs in {root} — {len(skipped)} finished "
              f"(skipped), {sum(s.state == 'partial' for s in todo)} to resume, "
              f"{sum(s.state == 'new' for s in todo)} new"
              + (f" ({busy} being trained by other processes)" if busy else "") + "\n")
    out.flush()
    result = SweepResult(root, statuses, [], skipped, {}, {})
    if not todo:
        return result
    options = dict(cache_dir=cache, train_fn=train_fn, overwrite=overwrite, fresh_start=fresh_start)
    if launcher == "local":
        _run_local(todo, n, len(skipped), options, result, out)
    else:
        ex = executor if executor is not None else make_executor(
            launcher, root / "submitit", job_name=str(config.get("name", "jaxdp")), slurm=slurm)
        _run_submitit(ex, todo, n, len(skipped), options, result, wait, out)
    if result.busy:
        out.write(f"{len(result.busy)} run(s) were being trained by other processes and were skipped here: "
                  + ", ".join(f"{name} ({holder})" for name, holder in result.busy.items())
                  + ". Their results join the report when they finish (python launch/sweep.py report "
                  f"--workdir {root}).\n")
        out.flush()
    return result


def check_runs(runs: Sequence[Run], check_fn: Callable[[ml_collections.ConfigDict], None]) -> None:
    """Runs ``check_fn`` on every run's config; one SweepError for all the problems: a line per problem, with the
    runs it concerns."""
    problems: dict[str, list[str]] = {}
    for run in runs:
        try:
            check_fn(run.config)
        except (ValueError, FileNotFoundError) as e:  # DataUnavailable is a FileNotFoundError
            problems.setdefault(" ".join(str(e).split()), []).append(run.name)
    if problems:
        def which(names: list[str]) -> str:
            if len(names) == len(runs) > 1:
                return f"all {len(runs)} runs"
            return f"run{'s' if len(names) > 1 else ''}: {', '.join(names)}"

        raise SweepError("\n".join(f"{message} ({which(names)})" for message, names in problems.items()))


def _poll_stop() -> None:
    """Between runs: a stop asked for during the last one (after its last poll) stops the sweep here."""
    signum = runlog.stop_requested()
    if signum is not None:
        raise runlog.Stopped(signum)


def _run_local(todo: list[RunStatus], n: int, n_done: int, options: dict, result: SweepResult, out: Any) -> None:
    t0 = time.monotonic()
    for i, st in enumerate(todo):
        _poll_stop()
        k = n_done + i + 1
        elapsed = time.monotonic() - t0
        eta = elapsed / i * (len(todo) - i) if i else None
        out.write(f"[{k}/{n}] {st.run.name} ({'resuming' if st.state == 'partial' else 'new'})  "
                  f"sweep elapsed {hms(elapsed)}, ETA {hms(eta)}\n")
        out.flush()
        progress = RunProgress(f"[{k}/{n}] {st.run.name}", stream=out)
        claimed = []
        try:
            final = run_one(st.run.config, st.run_dir, on_progress=progress, run=st.run, on_claim=claimed.append,
                            **options)
        except RunBusy as e:
            out.write(f"[{k}/{n}] {st.run.name} is being trained by {e.holder}: skipped, this sweep goes on with "
                      "the others\n")
            out.flush()
            result.busy[st.run.name] = e.holder
            continue
        except (runlog.Stopped, KeyboardInterrupt):
            out.write(f"\nrun {st.run.name} stopped; rerun the same command to resume it from its last "
                      f"checkpoint ({st.run_dir})\n")
            out.flush()
            raise
        except BaseException as e:
            kept = any(p.name != ".lock" for p in st.run_dir.iterdir()) if st.run_dir.is_dir() else False
            out.write(f"\nrun {st.run.name} failed ({type(e).__name__}); "
                      + (f"its files are kept in {st.run_dir}\n" if kept else "nothing of it was kept\n"))
            out.flush()
            raise
        if claimed == ["finished"]:
            out.write(f"[{k}/{n}] {st.run.name} was finished by another process meanwhile: skipped\n")
            out.flush()
            result.skipped.append(st.run.name)
            continue
        progress.done(final)
        result.trained.append(st.run.name)
    _poll_stop()
    out.write(f"sweep done: {len(result.trained)} runs trained in {hms(time.monotonic() - t0)}\n")
    out.flush()


def run_job(config: Mapping[str, Any], run_dir: str, record: Mapping[str, Any], **options: Any) -> dict:
    """:func:`run_one` as a submitit job: a run another process holds returns ``{"busy": holder}`` (a job that
    found its run busy has not failed)."""
    run = Run(name=str(record["name"]), grids=list(record.get("grids", [])), axes=dict(record.get("axes", {})),
              config=ml_collections.ConfigDict(dict(config)))
    try:
        return run_one(config, run_dir, run=run, **options)
    except RunBusy as e:
        return {"busy": e.holder}


def _run_submitit(ex: Any, todo: list[RunStatus], n: int, n_done: int, options: dict, result: SweepResult,
                  wait: bool, out: Any) -> None:
    # Jobs unpickle run_one by importing jaxdp: make this very checkout importable there even when it is not
    # pip-installed (submitit's local jobs and sbatch both inherit this environment).
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if package_root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_root, *[p for p in paths if p]])
    jobs = []
    batch = getattr(ex, "batch", None)
    ctx = batch() if batch is not None else contextlib.nullcontext()
    with ctx:
        for st in todo:
            jobs.append((st, ex.submit(run_job, config_to_dict(st.run.config), str(st.run_dir), st.run.record(),
                                       **options)))
    for st, job in jobs:
        result.job_ids[st.run.name] = str(job.job_id)
    out.write(f"submitted {len(jobs)} jobs: " + ", ".join(f"{st.run.name}={job.job_id}" for st, job in jobs)
              + "\n")
    out.flush()
    if not wait:
        return
    t0 = time.monotonic()
    pending = list(jobs)
    k = n_done
    while pending:
        still = []
        for st, job in pending:
            if not job.done():
                still.append((st, job))
                continue
            k += 1
            try:
                final = job.result()
                if isinstance(final, dict) and set(final) == {"busy"}:
                    result.busy[st.run.name] = str(final["busy"])
                    status = f"being trained by {final['busy']}: skipped"
                else:
                    result.trained.append(st.run.name)
                    status = "done"
            except Exception as e:  # a failed job is reported, the others still count
                result.failed[st.run.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
                status = f"FAILED (log: {getattr(job, 'paths', None) and job.paths.stderr})"
            elapsed = time.monotonic() - t0
            finished = k - n_done
            eta = elapsed / finished * (len(jobs) - finished) if finished else None
            out.write(f"[{k}/{n}] {st.run.name} {status}  sweep elapsed {hms(elapsed)}, ETA {hms(eta)}\n")
            out.flush()
        pending = still
        if pending:
            time.sleep(1.0)
