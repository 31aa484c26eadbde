"""Measurements as files: dated JSON records that the benchmark (and a sweep, on request) writes, and the docs'
tables generated from them.

A figure about speed or time belongs in a record, never in prose: :func:`write_record` stores what a command
measured together with the command itself, when it ran, the versions of the packages that ran it and the machine,
as ``docs/measurements/<name>-<YYYY-MM-DD>-<HHMMSS>.json`` (UTC), written atomically through
:func:`jaxdp.runlog.write_json`. The docs build (``docs/hooks/measurements.py``) replaces each placeholder

    <!-- measurement: NAME | COMMAND -->

in a page by the newest record named ``NAME`` rendered as a table, or, when there is none, by a line saying that
nothing has been recorded yet and which ``COMMAND`` records it. The tables therefore cannot drift from the files.

A record's ``name`` says what kind of measurement it is, so that records of one kind replace each other in the
docs (``step-cpu-resnet18-64px-b32-opacus``, ``loop-cpu-medium-ff0.9-clip1-seed0``, ``runs-cpu-digits-cnn-b64``,
``sweep-demo``); the part before the first ``-`` picks the renderer (:data:`RENDERERS`). Records are never
overwritten: a second record of one name in the same second gets a numeric suffix.

``$JAXDP_MEASUREMENTS_DIR`` replaces the default directory (the test suite points it at a temporary one, so that
tests never add records to the repository).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "docs" / "measurements"
DIR_ENV = "JAXDP_MEASUREMENTS_DIR"
# The packages whose versions a record carries (those not installed are left out).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "dp-accounting", "torch", "opacus")
# Renderers by the name's first part: "module:function" taking the payload and returning markdown (imported only
# when a record of that kind is rendered). Each is the function that prints the same result on the command line.
RENDERERS = {
    "step": "jaxdp_study.bench.reports:format_table",
    "loop": "jaxdp_study.bench.reports:format_loop_table",
    "runs": "jaxdp_study.bench.reports:format_runs_table",
    "sweep": "jaxdp_study.measurements:format_sweep_table",
}
PLACEHOLDER = re.compile(r"<!--\s*measurement:\s*(?P<name>[A-Za-z0-9._-]+)\s*\|\s*(?P<command>.+?)\s*-->")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def measurements_dir() -> Path:
    """Where records are written and read: ``$JAXDP_MEASUREMENTS_DIR``, else ``docs/measurements/``."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def slug(text: str) -> str:
    """``text`` reduced to the characters a record name may hold (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def package_versions() -> dict[str, str]:
    """The installed versions of :data:`PACKAGES`, read from the package metadata (nothing is imported)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``, else ``lscpu``, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name", "cpu model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or None


def machine() -> dict[str, Any]:
    """The machine a measurement ran on: platform, CPU model, cores (all, and those this process may use),
    memory, and JAX's backend and devices."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import jax

    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    return info


def write_record(name: str, payload: Mapping[str, Any], *, command: str, directory: str | os.PathLike | None = None,
                 now: datetime.datetime | None = None) -> Path:
    """Writes ``payload`` as a dated measurement record and returns its path.

    Args:
      name: what kind of measurement this is (letters, digits, ``.``, ``_``, ``-``; see the module docstring).
      payload: the measurement (JSON-ready: what the command printed, as data). NaN and infinities are written as
        null (:func:`jaxdp.runlog.json_safe`).
      command: the exact command line that measured it, so that anyone can measure it again.
      directory: where to write (default :func:`measurements_dir`; created if missing).
      now: the time to date the record with (default: now, UTC).

    The record holds ``name``, ``date`` (ISO 8601, UTC), ``command``, ``versions`` (:func:`package_versions`),
    ``machine`` (:func:`machine`) and ``payload``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"measurement name {name!r}: use letters, digits, '.', '_' and '-' only (jaxdp_study."
                         f"measurements.slug makes one from any text)")
    if not command or not command.strip():
        raise ValueError("a measurement record needs the command that measured it (command='python ...')")
    now = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    directory = Path(directory) if directory is not None else measurements_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "date": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
              "command": command.strip(), "versions": package_versions(), "machine": machine(),
              "payload": dict(payload)}
    from jaxdp import runlog  # here, not at the top: the docs build reads records without importing JAX

    stem = f"{name}-{now:%Y-%m-%d-%H%M%S}"
    path, n = directory / f"{stem}.json", 1
    while path.exists():  # never overwrite a record
        path, n = directory / f"{stem}-{n}.json", n + 1
    return runlog.write_json(path, record)


def read_records(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every record in ``directory`` (default :func:`measurements_dir`), each with ``path`` added, oldest first.

    Raises ValueError naming the file when a ``.json`` file there is not a record (so a damaged file fails the
    docs build instead of silently dropping a table).
    """
    directory = Path(directory) if directory is not None else measurements_dir()
    records = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); delete it or measure again") from error
        missing = [k for k in ("name", "date", "command", "versions", "machine", "payload") if k not in record]
        if not isinstance(record, dict) or missing:
            raise ValueError(f"{path}: not a measurement record (missing {missing}); records are written by "
                             f"jaxdp_study.measurements.write_record")
        records.append({**record, "path": path})
    return sorted(records, key=lambda r: (r["date"], r["path"].name))


def newest(records: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The newest record named ``name`` (by its date), or None."""
    matching = [r for r in records if r["name"] == name]
    return max(matching, key=lambda r: (r["date"], r["path"].name)) if matching else None


def _renderer(name: str) -> Callable[[Any], str] | None:
    target = RENDERERS.get(name.split("-", 1)[0])
    if target is None:
        return None
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def describe(record: Mapping[str, Any]) -> str:
    """One line saying when, where and with what a record was measured."""
    m, v = record["machine"], record["versions"]
    cores = m.get("cpus_usable") or m.get("cpu_count")
    where = ", ".join(str(x) for x in (m.get("cpu_model"), f"{cores} cores" if cores else None,
                                        ", ".join(m.get("jax_devices") or [])) if x)
    versions = ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v)
    return f"Measured {record['date']} on {where}; {versions}."


def render_record(record: Mapping[str, Any], link: str | None = None) -> str:
    """A record as markdown: the command, when and where it ran, and its table (the renderer of its kind, else
    the payload as JSON)."""
    render = _renderer(record["name"])
    body = render(record["payload"]) if render else "```json\n" + json.dumps(record["payload"], indent=2) + "\n```"
    source = f" Record: [`{Path(record['path']).name}`]({link})." if link else ""
    return f"`{record['command']}`\n\n{describe(record)}{source}\n\n{body}\n"


def fill_placeholders(markdown: str, records: list[dict[str, Any]],
                      link: Callable[[Mapping[str, Any]], str | None] = lambda record: None) -> str:
    """``markdown`` with every measurement placeholder (module docstring) replaced by the newest record of its name
    (:func:`render_record`, linked through ``link``), or by the command that would record it."""

    def replace(match: re.Match) -> str:
        name, command = match["name"], match["command"]
        record = newest(records, name)
        if record is None:
            return f"*No measurement recorded yet; run `{command}`.*\n"
        return render_record(record, link(record))

    return PLACEHOLDER.sub(replace, markdown)


def format_sweep_table(payload: Mapping[str, Any]) -> str:
    """A markdown table of a sweep record (``launch/sweep.py --record``): the sweep's wall time and each run's."""
    from jaxdp import runlog

    lines = [f"Sweep `{payload['config']}`: {payload['runs_trained']} runs trained, {payload['runs_skipped']} "
             f"already finished; wall time {runlog.hms(payload['wall_time_s'])} ({payload['wall_time_s']:.0f} s).",
             "", "| run | steps | wall s | compile s | train steps s | evaluation s |", "|---|---|---|---|---|---|"]
    for run in payload["runs"]:
        split = run.get("time_split_s") or {}

        def sec(key, split=split):
            return "" if split.get(key) is None else f"{split[key]:.1f}"

        lines.append(f"| {run['name']} | {run.get('steps', '')} | {run['wall_time_s']:.1f} | {sec('compile')} | "
                     f"{sec('train_steps')} | {sec('evaluation')} |")
    return "\n".join(lines)
