"""Expanding a sweep config into runs, naming them, resuming them, and launching them.

A sweep config is a run config (:func:`jaxdp.config.base_config`) plus ``config.sweep``: a ConfigDict of
*named grids*. Each grid holds axes; an axis is a config path (written nested, like the config itself) whose
leaf is a tuple of values, or one of two special axes: ``privacy``, whose values name a row of
:data:`PRIVACY_LEVELS`, and ``seed``, whose value is a replicate: it sets both ``train.seed`` (initialisation,
Poisson batches, noise, flips) and ``data.seed`` (which images form the subset), so seeds differ in everything
random. The runs of a grid are the Cartesian product of its axes; the runs of the sweep are the
union of its grids, with duplicates (same resolved config) run once::

    c.sweep.imbalance = grid({"privacy": ("high", "medium", "low", "nondp"),
                              "data.female_fraction": (0.7, 0.8, 0.9, 0.99, 0.999)})
    c.sweep.clipping = grid({"privacy": ("high", "medium", "low"), "dp.l2_clip_norm": (1.0, 5.0, 10.0)})
    # 20 + 9 - 3 shared = 26 runs, the paper's whole grid.

Axes are overridable from the command line like any config value:
``--config.sweep.imbalance.data.female_fraction="(0.7,0.99)"``; ``launch/sweep.py --seeds 0,1,2`` adds a
``seed`` axis to every grid (:func:`with_seeds`).

Layout of a sweep working directory (the same for every launcher)::

    <workdir>/<run name>/          one directory per run, e.g. medium-ff0.99-clip5-seed0
        sweep_run.json             written here: run name, grids, axis values and the resolved run config
        config.json, history.jsonl, final.json, checkpoints/   written by jaxdp.train.train_and_evaluate
    <workdir>/summary.csv, table1.csv, table1.md, figures/*.png   written by jaxdp.report
    <workdir>/.xla_cache/          JAX persistent compilation cache shared by the runs (unless moved)
    <workdir>/submitit/            job scripts and logs of the submitit launchers

Resume guarantee: a run whose directory holds ``final.json`` is never trained again; a run directory without
it is handed back to ``train_and_evaluate``, which resumes from its latest checkpoint. A run directory is only
reused when its stored resolved config equals the new one (ignoring :data:`jaxdp.config.RESULT_NEUTRAL_KEYS`); otherwise
:func:`prepare_workdir` raises :class:`SweepError` before any work starts, unless ``overwrite=True``, which
deletes that run's directory (and so its results) and trains it from scratch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdp.config import differing_keys, flatten, validate_run_config
from jaxdp.runlog import RunProgress, hms, write_atomic

# Paper settings (Farrand et al. 2020, Sec. 4): noise multiplier z per privacy level; clip S = 5, delta = 1e-6.
PRIVACY_LEVELS: dict[str, dict[str, Any]] = {
    "high": {"dp.enabled": True, "dp.privacy_level": "high", "dp.noise_multiplier": 1.5},
    "medium": {"dp.enabled": True, "dp.privacy_level": "medium", "dp.noise_multiplier": 0.7},
    "low": {"dp.enabled": True, "dp.privacy_level": "low", "dp.noise_multiplier": 0.5},
    "nondp": {"dp.enabled": False, "dp.privacy_level": "nondp"},
}
PRIVACY_ORDER = ("high", "medium", "low", "nondp")
LAUNCHERS = ("local", "submitit_local", "slurm")

RUN_RECORD = "sweep_run.json"
FINAL = "final.json"
# Axes that every run name spells out (so they are not appended again as extra axes).
_NAMED_AXES = frozenset({"privacy", "dp.privacy_level", "data.female_fraction", "dp.l2_clip_norm",
                         "train.seed", "seed"})
# The config keys the special axis "seed" sets; a grid may not sweep them next to it.
SEED_KEYS = ("train.seed", "data.seed")

TrainFn = Callable[..., dict]


class SweepError(ValueError):
    """A sweep config, workdir or launcher choice that cannot be run; the message says what to change."""


@dataclasses.dataclass
class Run:
    """One run of a sweep: its directory name, the grids it belongs to, its axis values, its config."""

    name: str
    grids: list[str]
    axes: dict[str, Any]
    config: ml_collections.ConfigDict

    def record(self) -> dict[str, Any]:
        """The JSON content of ``sweep_run.json``."""
        return {"name": self.name, "grids": list(self.grids), "axes": _jsonable(self.axes),
                "config": config_to_dict(self.config)}


# ----------------------------------------------------------------------------------------------- expansion


def grid(axes: Mapping[str, Sequence[Any]]) -> ml_collections.ConfigDict:
    """A sweep grid from ``{"dotted.config.path": values}``; ``"privacy"`` takes PRIVACY_LEVELS names and
    ``"seed"`` replicate numbers (each sets ``train.seed`` and ``data.seed``).

    >>> grid({"data.female_fraction": (0.7, 0.99)}).data.female_fraction
    (0.7, 0.99)
    """
    g = ml_collections.ConfigDict()
    for path, values in axes.items():
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise SweepError(f"sweep axis {path!r}: give a tuple of values, got {values!r}")
        node = g
        *parents, leaf = path.split(".")
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = tuple(values)
    return g


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), as stored in ``sweep_run.json``."""
    return json.loads(config.to_json(sort_keys=True))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _get_path(config: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def _axis_values(sweep_name: str, grid_name: str, path: str, values: Any) -> tuple:
    where = f"config.sweep.{grid_name}.{path}"
    if isinstance(values, str) or not isinstance(values, Sequence):
        # --config.sweep.g.x=0.9 on a tuple field already arrives as (0.9,); anything else is a mistake.
        raise SweepError(f"{where} in sweep '{sweep_name}' must be a tuple of values, got {values!r}; "
                         f"e.g. --config.sweep.{grid_name}.{path}=\"(0.7,0.9)\"")
    if len(values) == 0:
        raise SweepError(f"{where} in sweep '{sweep_name}' is empty: give at least one value")
    return tuple(values)


def _bad_seeds(values: Sequence[Any]) -> list[Any]:
    """The values that are not seeds (integers >= 0; a bool is not one)."""
    return [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]


def expand(config: ml_collections.ConfigDict) -> list[Run]:
    """The runs of a sweep config, in a stable order (privacy level, female fraction, clip, seed, name).

    Every returned config has ``sweep`` emptied and ``name`` set to the run name. Raises SweepError for an
    axis that is not a config key, an unknown privacy level, a value of the wrong type, or two different
    configs that would share one run name.
    """
    sweep_name = str(config.get("name", "sweep"))
    sweep = config.get("sweep")
    base = copy.deepcopy(config)
    with base.unlocked():
        base.sweep = ml_collections.ConfigDict()
    grids = dict(sweep.items()) if sweep else {}
    if not grids:
        grids = {"single": ml_collections.ConfigDict()}
    runs: dict[str, Run] = {}
    for grid_name, g in grids.items():
        if not isinstance(g, ml_collections.ConfigDict):
            raise SweepError(
                f"config.sweep.{grid_name} in sweep '{sweep_name}' must be a grid (a ConfigDict of axes, "
                f"e.g. jaxdp.sweep.grid({{'data.female_fraction': (0.7, 0.9)}})), got {g!r}")
        axes = {p: _axis_values(sweep_name, grid_name, p, v) for p, v in flatten(g).items()}
        for path in axes:
            if path == "privacy":
                unknown = [v for v in axes[path] if v not in PRIVACY_LEVELS]
                if unknown:
                    raise SweepError(f"config.sweep.{grid_name}.privacy: unknown level(s) {unknown}; "
                                     f"choose from {list(PRIVACY_LEVELS)}")
                continue
            if path == "seed":
                bad = _bad_seeds(axes[path])
                if bad:
                    raise SweepError(f"config.sweep.{grid_name}.seed: seeds must be integers >= 0, got {bad}")
                clash = [k for k in SEED_KEYS if k in axes]
                if clash:
                    raise SweepError(f"config.sweep.{grid_name}: the axis 'seed' sets {' and '.join(SEED_KEYS)}; "
                                     f"do not also sweep {', '.join(clash)} in the same grid")
                continue
            if path.split(".")[0] in ("sweep", "name"):
                raise SweepError(f"config.sweep.{grid_name}.{path}: '{path}' cannot be a sweep axis")
            try:
                current = _get_path(base, path)
            except KeyError:
                raise SweepError(
                    f"config.sweep.{grid_name}.{path}: '{path}' is not a key of the config "
                    f"(see jaxdp/config.py base_config for the schema)") from None
            if isinstance(current, ml_collections.ConfigDict):
                raise SweepError(f"config.sweep.{grid_name}.{path}: '{path}' is a section, not a value")
        paths = list(axes)
        for combo in itertools.product(*(axes[p] for p in paths)):
            values = dict(zip(paths, combo, strict=True))
            run_config = copy.deepcopy(base)
            if "privacy" in values:
                for k, v in PRIVACY_LEVELS[values["privacy"]].items():
                    _set_path(run_config, k, v)
            for path, value in values.items():
                if path == "privacy":
                    continue
                if path == "seed":
                    for key in SEED_KEYS:
                        _set_path(run_config, key, value)
                    continue
                try:
                    _set_path(run_config, path, value)
                except (TypeError, ValueError) as e:
                    raise SweepError(f"config.sweep.{grid_name}.{path}: value {value!r} does not fit the "
                                     f"config field ({e})") from None
            name = run_name(run_config, values)
            with run_config.unlocked():
                run_config.name = name
            try:
                validate_run_config(run_config)
            except ValueError as e:
                raise SweepError(f"run {name} of grid '{grid_name}' in sweep '{sweep_name}': {e}") from None
            if name in runs:
                if config_to_dict(runs[name].config) != config_to_dict(run_config):
                    raise SweepError(
                        f"two different runs of sweep '{sweep_name}' would share the directory name {name!r} "
                        f"(grids {runs[name].grids} and '{grid_name}'); make their axes differ in the "
                        f"named settings (privacy, female fraction, clip, seed) or sweep the differing key")
                runs[name].grids.append(grid_name)
                runs[name].axes.update(values)
            else:
                runs[name] = Run(name=name, grids=[grid_name], axes=dict(values), config=run_config)
    return sorted(runs.values(), key=_run_sort_key)


def with_seeds(config: ml_collections.ConfigDict, seeds: Sequence[int]) -> ml_collections.ConfigDict:
    """A copy of sweep ``config`` whose every grid also sweeps the replicate axis ``seed`` over ``seeds``.

    A config without grids gets one grid, ``seeds``. Raises SweepError for an empty or negative seed list,
    repeated seeds, or a grid that already sweeps ``seed``, ``train.seed`` or ``data.seed``.
    """
    seeds = tuple(seeds)
    if not seeds or _bad_seeds(seeds):
        raise SweepError(f"--seeds: give integers >= 0, e.g. --seeds 0,1,2 (got {list(seeds)})")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds: {list(seeds)} repeats a seed")
    out = copy.deepcopy(config)
    with out.unlocked():
        grids = out.get("sweep")
        if not grids:
            out.sweep = ml_collections.ConfigDict({"seeds": grid({"seed": seeds})})
            return out
        for grid_name, g in grids.items():
            if not isinstance(g, ml_collections.ConfigDict):
                continue  # expand() names the malformed grid
            swept = [k for k in ("seed", *SEED_KEYS) if k in flatten(g)]
            if swept:
                raise SweepError(f"--seeds: grid '{grid_name}' already sweeps {', '.join(swept)}; drop --seeds or "
                                 f"that axis")
            g.seed = seeds
    return out


def _run_sort_key(run: Run) -> tuple:
    c = run.config
    level = c.dp.privacy_level
    rank = PRIVACY_ORDER.index(level) if level in PRIVACY_ORDER else len(PRIVACY_ORDER)
    return (rank, str(level), float(c.data.female_fraction), float(c.dp.l2_clip_norm), int(c.train.seed),
            run.name)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "x".join(_fmt(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", str(value))


def run_name(config: ml_collections.ConfigDict, axes: Mapping[str, Any] | None = None) -> str:
    """The directory name of a run, e.g. ``medium-ff0.99-clip5-seed0`` or ``nondp-ff0.7-seed0``.

    It always spells out the privacy level, female fraction, clip bound (DP runs) and seed; a noise
    multiplier that differs from the level's paper value (``-z0.8``), a target epsilon (``-eps3``) and any
    other swept axis (``-learning_rate0.001``, by the key's last part) are appended.
    """
    dp = config.dp
    level = _fmt(dp.privacy_level) if dp.enabled else "nondp"
    parts = [level, f"ff{_fmt(float(config.data.female_fraction))}"]
    if dp.enabled:
        parts.append(f"clip{_fmt(float(dp.l2_clip_norm))}")
        preset = PRIVACY_LEVELS.get(str(dp.privacy_level), {})
        if dp.get("target_epsilon") is not None:
            parts.append(f"eps{_fmt(float(dp.target_epsilon))}")
        elif preset.get("dp.noise_multiplier") != dp.noise_multiplier:
            parts.append(f"z{_fmt(float(dp.noise_multiplier))}")
    parts.append(f"seed{int(config.train.seed)}")
    for path, value in (axes or {}).items():
        if path not in _NAMED_AXES and path not in ("dp.noise_multiplier", "dp.enabled",
                                                     "dp.target_epsilon"):
            parts.append(f"{path.split('.')[-1]}{_fmt(value)}")
    return "-".join(parts)


# ------------------------------------------------------------------------------------------------ workdir


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


# ------------------------------------------------------------------------------------------- running one


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


def run_one(config: ml_collections.ConfigDict | Mapping[str, Any], run_dir: str | os.PathLike, *,
            cache_dir: str | os.PathLike | None = None, train_fn: TrainFn | None = None,
            on_progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train (or resume, or return the finished result of) one run in ``run_dir``; returns final.json's dict.

    This is the unit of work of every launcher: the local launcher calls it in-process, the submitit
    launchers pickle it into a job. Under a multi-task SLURM job it initialises jax.distributed first.
    """
    config = ml_collections.ConfigDict(
        config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
    # The sweep draws its own progress line (on_progress); the trainer's bar would duplicate it. Always off,
    # so the config the trainer stores is the same on every (re)invocation.
    config.train.progress = False
    if on_progress is None:
        on_progress = RunProgress(str(config.name), log_every_s=60.0)
    if cache_dir is not None:
        enable_compilation_cache(cache_dir)
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SUBMITIT_EXECUTOR" in os.environ:
        import jax

        with contextlib.suppress(RuntimeError):  # already initialised in this process
            jax.distributed.initialize()
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
              stream: Any = None) -> SweepResult:
    """Expand ``config``, check the workdir, and train every unfinished run with ``launcher``.

    ``launcher``: ``"local"`` (in this process, one run after another), ``"submitit_local"`` (one subprocess
    job per run, via submitit; for testing the job path) or ``"slurm"`` (one SLURM job per run, as an array).
    ``executor`` replaces the submitit executor (any object with ``submit(fn, *args, **kwargs)``).
    ``wait=False`` returns right after submitting (submitit launchers). ``run_filter`` is a regular
    expression; only runs whose name matches are run. ``cache_dir`` defaults to ``<workdir>/.xla_cache``.
    A local run that raises stops the sweep (re-raised); finished runs stay finished and rerunning the same
    command resumes. Submitted jobs that fail are collected in ``SweepResult.failed``.
    """
    out = stream or sys.stdout
    if launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    runs = select_runs(expand(config), run_filter)
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


def select_runs(runs: Sequence[Run], run_filter: str | None) -> list[Run]:
    """The runs whose name matches the regular expression ``run_filter`` (all when it is None or empty)."""
    if not run_filter:
        return list(runs)
    try:
        pattern = re.compile(run_filter)
    except re.error as e:
        raise SweepError(f"--runs={run_filter!r} is not a regular expression ({e})") from None
    chosen = [r for r in runs if pattern.search(r.name)]
    if not chosen:
        raise SweepError(f"--runs={run_filter!r} matches none of the sweep's run names; list them with "
                         f"--dry_run")
    return chosen


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


def find_run_dirs(workdir: str | os.PathLike) -> list[Path]:
    """Run directories (holding ``sweep_run.json``) directly under ``workdir``, sorted by name."""
    return sorted(p.parent for p in Path(workdir).glob(f"*/{RUN_RECORD}"))


def summarize_plan(statuses: Iterable[RunStatus]) -> str:
    """A table of run name, state and grids, for ``--dry_run``."""
    rows = [f"{'run':44s} {'state':9s} grids"]
    rows += [f"{s.run.name:44s} {s.state:9s} {','.join(s.run.grids)}" for s in statuses]
    return "\n".join(rows)
