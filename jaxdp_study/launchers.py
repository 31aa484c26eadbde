"""Launching a sweep: the unit of work (:func:`run_one`) and the launchers that run it.

``local`` trains the unfinished runs one after another in this process; ``submitit_local`` runs each as a
subprocess job through submitit (to test the job path); ``slurm`` submits one SLURM job per run, as a job
array. Every launcher uses the same working-directory layout and checks (:mod:`jaxdp_study.workdir`) and the
same :func:`run_one`, so a sweep can be started with one launcher and resumed with another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdp.runlog import RunProgress, hms
from jaxdp_study.grid import Run, SweepError, config_to_dict, expand, select_runs
from jaxdp_study.workdir import RunStatus, prepare_workdir

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


def run_one(config: ml_collections.ConfigDict | Mapping[str, Any], run_dir: str | os.PathLike, *,
            cache_dir: str | os.PathLike | None = None, train_fn: TrainFn | None = None,
            on_progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train (or resume, or return the finished result of) one run in ``run_dir``; returns final.json's dict.

    This is the unit of work of every launcher: the local launcher calls it in-process, the submitit
    launchers pickle it into a job. In a submitit job it first starts JAX's distributed runtime with
    :func:`jaxdp.parallel.initialize_distributed` (which does nothing unless the job has several tasks).
    """
    config = ml_collections.ConfigDict(
        config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
    # The sweep draws its own progress line (on_progress); the trainer's bar would duplicate it. Always off,
    # so the config the trainer stores is the same on every (re)invocation.
    config.train.progress = False
    if on_progress is None:
        on_progress = RunProgress(str(config.name), log_every_s=60.0)
    if "SUBMITIT_EXECUTOR" in os.environ:  # a submitit job: one process per SLURM task of this run
        _start_distributed()
    if cache_dir is not None:
        enable_compilation_cache(cache_dir)
    fn = train_fn or _default_train_fn()
    return fn(config, str(run_dir), on_progress=on_progress)


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


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, launcher: str = "local",
              overwrite: bool = False, train_fn: TrainFn | None = None,
              cache_dir: str | os.PathLike | None = None, executor: Any = None,
              slurm: SlurmOptions | None = None, wait: bool = True, run_filter: str | None = None,
              stream: Any = None, check_fn: Callable[[ml_collections.ConfigDict], None] | None = None
              ) -> SweepResult:
    """Expand ``config``, check the workdir, and train every unfinished run with ``launcher``.

    ``launcher``: ``"local"`` (in this process, one run after another), ``"submitit_local"`` (one subprocess
    job per run, via submitit; for testing the job path) or ``"slurm"`` (one SLURM job per run, as an array).
    ``executor`` replaces the submitit executor (any object with ``submit(fn, *args, **kwargs)``).
    ``wait=False`` returns right after submitting (submitit launchers). ``run_filter`` is a regular
    expression; only runs whose name matches are run. ``cache_dir`` defaults to ``<workdir>/.xla_cache``.
    A local run that raises stops the sweep (re-raised); finished runs stay finished and rerunning the same
    command resumes. Submitted jobs that fail are collected in ``SweepResult.failed``.

    Before anything is written but the workdir itself, every run still to train is checked with ``check_fn``
    (default: :func:`jaxdp.train.check_runnable` — config values, data on this machine, audit capacity — when
    ``train_fn`` is the real trainer; no check for a custom ``train_fn`` unless given): a missing dataset or an
    impossible setting stops the sweep with one :class:`SweepError` naming the runs, before any run starts.
    """
    out = stream or sys.stdout
    if launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    runs = select_runs(expand(config), run_filter)
    if check_fn is None and train_fn is None:
        from jaxdp.train import check_runnable as check_fn
    if check_fn is not None:
        inspected = prepare_workdir(workdir, runs, overwrite=overwrite, write=False)
        _check_runs([s.run for s in inspected if s.state != "finished"], check_fn)
    statuses = prepare_workdir(workdir, runs, overwrite=overwrite)
    root = statuses[0].run_dir.parent if statuses else Path(workdir).resolve()
    cache = str(cache_dir) if cache_dir is not None else str(root / ".xla_cache")
    todo = [s for s in statuses if s.state != "finished"]
    skipped = [s.run.name for s in statuses if s.state == "finished"]
    n = len(statuses)
    out.write(f"sweep '{config.get('name', 'sweep')}': {n} runs in {root} — {len(skipped)} finished "
              f"(skipped), {sum(s.state == 'partial' for s in todo)} to resume, "
              f"{sum(s.state == 'new' for s in todo)} new\n")
    out.flush()
    result = SweepResult(root, statuses, [], skipped, {}, {})
    if not todo:
        return result
    if launcher == "local":
        _run_local(todo, n, len(skipped), cache, train_fn, result, out)
    else:
        ex = executor if executor is not None else make_executor(
            launcher, root / "submitit", job_name=str(config.get("name", "jaxdp")), slurm=slurm)
        _run_submitit(ex, todo, n, len(skipped), cache, train_fn, result, wait, out)
    return result


def _check_runs(runs: Sequence[Run], check_fn: Callable[[ml_collections.ConfigDict], None]) -> None:
    """Runs ``check_fn`` on every run's config; one SweepError for all the problems (the same message once, with
    the runs it concerns)."""
    problems: dict[str, list[str]] = {}
    for run in runs:
        try:
            check_fn(run.config)
        except (ValueError, FileNotFoundError) as e:  # DataUnavailable is a FileNotFoundError
            problems.setdefault(str(e), []).append(run.name)
    if problems:
        raise SweepError("\n".join(f"{message}\n  (runs: {', '.join(names)})" for message, names in problems.items()))


def _run_local(todo: list[RunStatus], n: int, n_done: int, cache: str, train_fn: TrainFn | None,
               result: SweepResult, out: Any) -> None:
    t0 = time.monotonic()
    for i, st in enumerate(todo):
        k = n_done + i + 1
        elapsed = time.monotonic() - t0
        eta = elapsed / i * (len(todo) - i) if i else None
        out.write(f"[{k}/{n}] {st.run.name} ({'resuming' if st.state == 'partial' else 'new'})  "
                  f"sweep elapsed {hms(elapsed)}, ETA {hms(eta)}\n")
        out.flush()
        progress = RunProgress(f"[{k}/{n}] {st.run.name}", stream=out)
        try:
            final = run_one(st.run.config, st.run_dir, cache_dir=cache, train_fn=train_fn,
                            on_progress=progress)
        except BaseException:
            out.write(f"\nrun {st.run.name} stopped; rerun the same command to resume it from its last "
                      f"checkpoint ({st.run_dir})\n")
            out.flush()
            raise
        progress.done(final)
        result.trained.append(st.run.name)
    out.write(f"sweep done: {len(todo)} runs trained in {hms(time.monotonic() - t0)}\n")
    out.flush()


def _run_submitit(ex: Any, todo: list[RunStatus], n: int, n_done: int, cache: str,
                  train_fn: TrainFn | None, result: SweepResult, wait: bool, out: Any) -> None:
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
            jobs.append((st, ex.submit(run_one, config_to_dict(st.run.config), str(st.run_dir),
                                       cache_dir=cache, train_fn=train_fn)))
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
                job.result()
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

