"""Expanding a sweep config into runs and naming them.

A sweep config is a run config (:func:`jaxdp.config.base_config`) plus ``config.sweep``: a ConfigDict of
*named grids*. Each grid holds axes; an axis is a config path (written nested, like the config itself) whose
leaf is a tuple of values, or one of two special axes: ``privacy``, whose values name a row of
:data:`jaxdp_study.paper.PRIVACY_LEVELS`, and ``seed``, whose value is a replicate: it sets both
``train.seed`` (initialisation, Poisson batches, noise, flips) and ``data.seed`` (which images form the
subset), so seeds differ in everything random. The runs of a grid are the Cartesian product of its axes; the
runs of the sweep are the union of its grids, with duplicates (same resolved config) run once::

    c.sweep.imbalance = grid({"privacy": ("high", "medium", "low", "nondp"),
                              "data.female_fraction": (0.7, 0.8, 0.9, 0.99, 0.999)})
    c.sweep.clipping = grid({"privacy": ("high", "medium", "low"), "dp.l2_clip_norm": (1.0, 5.0, 10.0)})
    # 20 + 9 - 3 shared = 26 runs, the paper's whole grid.

Axes are overridable from the command line like any config value:
``--config.sweep.imbalance.data.female_fraction="(0.7,0.99)"``; ``launch/sweep.py --seeds 0,1,2`` adds a
``seed`` axis to every grid (:func:`with_seeds`).

Each run is a :class:`Run`: its name (:func:`run_name`, also its directory name), the grids it belongs to, its
axis values and its resolved config; :meth:`Run.record` is what :mod:`jaxdp_study.workdir` stores as the run's
``sweep_run.json``, and what :mod:`jaxdp_study.report` reads a run's settings from.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdp.config import flatten, validate_run_config
from jaxdp_study.paper import PRIVACY_LEVELS, PRIVACY_ORDER, privacy_settings

# Axes that every run name spells out (so they are not appended again as extra axes).
_NAMED_AXES = frozenset({"privacy", "dp.privacy_level", "data.female_fraction", "dp.l2_clip_norm",
                         "train.seed", "seed"})
# Axes that a run name shows before its seed when they matter (-z0.8, -eps3), never as extra axes.
_NAMED_DP_AXES = frozenset({"dp.noise_multiplier", "dp.enabled", "dp.target_epsilon"})
# The config keys the special axis "seed" sets; a grid may not sweep them next to it.
SEED_KEYS = ("train.seed", "data.seed")


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


def axis_sets(axis: str) -> tuple[str, ...]:
    """The config keys that sweep axis ``axis`` sets in each run: the key itself, or for the special axes those of
    ``privacy`` (:func:`jaxdp_study.paper.privacy_settings`, over every level) and ``seed`` (:data:`SEED_KEYS`).

    >>> axis_sets("privacy")
    ('dp.enabled', 'dp.noise_multiplier', 'dp.privacy_level')
    """
    if axis == "privacy":
        return tuple(sorted({k for level in PRIVACY_LEVELS for k in privacy_settings(level)}))
    if axis == "seed":
        return SEED_KEYS
    return (axis,)


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
                f"e.g. jaxdp_study.grid.grid({{'data.female_fraction': (0.7, 0.9)}})), got {g!r}")
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
                for k, v in privacy_settings(values["privacy"]).items():
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
        if dp.get("target_epsilon") is not None:
            parts.append(f"eps{_fmt(float(dp.target_epsilon))}")
        elif PRIVACY_LEVELS.get(str(dp.privacy_level)) != dp.noise_multiplier:
            parts.append(f"z{_fmt(float(dp.noise_multiplier))}")
    parts.append(f"seed{int(config.train.seed)}")
    extra = variant(axes or {})
    return "-".join([*parts, extra] if extra else parts)


def variant(axes: Mapping[str, Any]) -> str:
    """The swept axes a run name spells out after its seed, e.g. ``learning_rate0.001`` ("" when none).

    Computed from a run's axis values (``Run.axes``, or the ``axes`` of its stored run record), so it does not
    depend on what its directory is called. Runs of one privacy level with the same variant form one series of
    the report (their female fractions, clip bounds and seeds differ).

    >>> variant({"privacy": "medium", "optim.learning_rate": 0.001, "seed": 1})
    'learning_rate0.001'
    """
    return "-".join(f"{path.split('.')[-1]}{_fmt(value)}" for path, value in axes.items()
                    if path not in _NAMED_AXES and path not in _NAMED_DP_AXES)


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


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of an experiment config file (``configs/*.py``), e.g. to build one config on another."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"config file {str(path)!r} does not exist (relative to {os.getcwd()})")
    spec = importlib.util.spec_from_file_location(f"jaxdp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
