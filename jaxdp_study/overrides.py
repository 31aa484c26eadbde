"""Command-line overrides of a sweep config (``--config.train.epochs=3``), checked before absl applies them.

absl's ``config_flags`` reports a misspelt key, a value of the wrong type and a config file that does not load
as Python tracebacks or as one message blaming every override on the line. :func:`load_config_file` and
:func:`check_overrides` find each mistake first and say it in one line: the key, the value, what is allowed.
:func:`overridden_by_axes` finds overrides that a sweep axis would overwrite in every run (silently ignored
otherwise): ``--config.dp.noise_multiplier=1.0`` on a grid with a ``privacy`` axis.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from jaxdp.config import flatten
from jaxdp_study.grid import SweepError, axis_sets


@dataclasses.dataclass(frozen=True)
class Override:
    """One ``--config.<key>=<value>`` of a command line (``value`` None for ``--config.<key>`` alone, a boolean)."""

    key: str
    value: str | None
    arg: str


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file given as ``path`` or ``path:argument`` (as ``--config`` takes it).

    A file that does not load is one SweepError line with ``file:line``: a syntax error, an exception in
    ``get_config`` (the line of the file it came from), no ``get_config``, or a result that is not a ConfigDict.
    """
    path, _, argument = spec.partition(":")
    if not os.path.isfile(path):
        raise SweepError(f"config file {path!r} does not exist (relative to {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location(f"jaxdp_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise SweepError(f"{path}: defines no get_config(); a config file defines get_config() returning a "
                             "ConfigDict (see configs/demo.py)")
        config = module.get_config(*([argument] if argument else []))
    except SweepError:
        raise
    except SyntaxError as e:
        text = f": {e.text.strip()}" if e.text else ""
        raise SweepError(f"{e.filename or path}:{e.lineno}: {e.msg}{text}; fix the config file") from None
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if os.path.abspath(f.filename) == os.path.abspath(path)), None)
        where = f"{path}:{line}" if line is not None else path
        message = " ".join(str(e).split())
        raise SweepError(f"{where}: loading the config failed: {type(e).__name__}: {message}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise SweepError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def parse_overrides(argv: Sequence[str], name: str = "config") -> list[Override]:
    """The ``--<name>.<key>[=value]`` arguments of ``argv`` (``--no<name>.<key>`` is ``key=false``), in order."""
    out = []
    args = list(argv)
    for i, arg in enumerate(args):
        for prefix, negated in ((f"--{name}.", False), (f"-{name}.", False), (f"--no{name}.", True)):
            if arg.startswith(prefix):
                key, eq, value = arg[len(prefix):].partition("=")
                if negated:
                    out.append(Override(key, "false", arg))
                elif eq:
                    out.append(Override(key, value, arg))
                elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                    out.append(Override(key, args[i + 1], f"{arg} {args[i + 1]}"))
                else:
                    out.append(Override(key, None, arg))
                break
    return out


def _node_keys(node: Any) -> list[str]:
    return list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []


def _unknown_key(config: ml_collections.ConfigDict, key: str, override: Override) -> str | None:
    """The message for a key that is not in ``config`` (None when it is)."""
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            parent = ".".join(parts[:depth])
            return f"{override.arg}: config.{parent} is a value, not a section: it has no key {part!r}"
        if part not in node:
            parent = ".".join(parts[:depth])
            section = f"config.{parent}" if parent else "the config"
            keys = _node_keys(node)
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
            hint = (f". Did you mean {' or '.join(f'{c!r}' for c in close)}?".replace("'", '"') if close
                    else f" (its keys: {', '.join(keys)})")
            return f"cannot apply config override {override.arg}: no such key {part!r} in {section}{hint}"
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        keys = _node_keys(node)
        return (f"{override.arg}: config.{key} is a section, not a value; set one of its keys "
                f"({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}), e.g. --config.{key}.{keys[0]}=..."
                if keys else f"{override.arg}: config.{key} is an empty section")
    return None


_EXPECTED = {int: "expected an integer", float: "expected a number, e.g. 0.5, 1e-3 or inf",
             bool: "expected true or false"}
_PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser()}


def _type_of(config: ml_collections.ConfigDict, key: str) -> type | None:
    from ml_collections.config_flags import config_path

    try:
        return config_path.get_type(key, config)
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


def check_overrides(config: ml_collections.ConfigDict, overrides: Sequence[Override]) -> None:
    """SweepError (one line) for the first override whose key is not in ``config`` or whose value cannot be
    parsed as the key's type (an integer, a number, a boolean): the argument, the key and what is allowed."""
    for o in overrides:
        message = _unknown_key(config, o.key, o)
        if message:
            raise SweepError(message)
        kind = _type_of(config, o.key)
        value = "true" if o.value is None and kind is bool else o.value
        if kind in _PARSERS:
            if value is None:
                raise SweepError(f"{o.arg}: config.{o.key} needs a value: --config.{o.key}=...; "
                                 f"{_EXPECTED[kind]}")
            try:
                _PARSERS[kind].parse(value)
            except (ValueError, TypeError):
                raise SweepError(f"config.{o.key}={value}: {_EXPECTED[kind]}; the config's value is "
                                 f"{_current(config, o.key)!r}") from None


def _current(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def overridden_by_axes(config: ml_collections.ConfigDict, keys: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{key: {grid name: "config.sweep.<grid>.<axis>"}}`` for each of ``keys`` that an axis of a grid sets in
    every run of that grid (:func:`jaxdp_study.grid.axis_sets`); keys under ``sweep`` are the axes themselves."""
    grids = {name: g for name, g in (config.get("sweep") or {}).items() if isinstance(g, ml_collections.ConfigDict)}
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        if key.split(".")[0] in ("sweep", "name"):
            continue
        for grid_name, g in grids.items():
            for axis in flatten(g):
                if key in axis_sets(axis):
                    out.setdefault(key, {})[grid_name] = f"config.sweep.{grid_name}.{axis}"
    return out


def refuse_overwritten(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> list[str]:
    """SweepError for an override that every grid of the sweep overwrites (it would be ignored in every run),
    naming the axis to set instead. Returns warnings for those that some grids overwrite and others keep."""
    grids = [name for name, g in (config.get("sweep") or {}).items() if isinstance(g, ml_collections.ConfigDict)]
    warnings = []
    for key, axes in overridden_by_axes(config, list(overrides)).items():
        value = overrides[key]
        axis = next(iter(axes.values()))
        if set(axes) == set(grids):
            if axis.endswith(".privacy"):
                instead = (f"choose the privacy levels with --{axis}=... (each level sets dp.enabled, "
                           f"dp.privacy_level and dp.noise_multiplier; see jaxdp_study/paper.py PRIVACY_LEVELS), or "
                           f"make {key} an axis of the grid in a config file")
            elif axis.endswith(".seed"):
                instead = f"give the replicates with --seeds or --{axis}=..."
            else:
                instead = f"set the axis instead, e.g. --{axis}=\"({value!r},)\""
            named = (f"the sweep axis {axis} sets" if len(axes) == 1
                     else f"the sweep axes {', '.join(axes.values())} set")
            raise SweepError(f"--config.{key}={value} would be ignored: {named} {key} in every run; {instead}")
        kept = [g for g in grids if g not in axes]
        warnings.append(f"--config.{key}={value} applies to grid(s) {', '.join(kept)} only: "
                        + ", ".join(f"{a} sets it in grid {g}" for g, a in axes.items()))
    return warnings
