#!/usr/bin/env python
"""Run the paper's study (or any sweep config) and write its results, tables and figures.

    python launch/sweep.py --config configs/demo.py                    # train + report, results/demo/
    python launch/sweep.py --config configs/medium.py --config.train.epochs=10
    python launch/sweep.py --config configs/paper.py --dry_run         # list the 26 runs and their state
    python launch/sweep.py --config configs/demo.py --seeds 0,1,2      # three replicates per cell (seed 0 reused)
    python launch/sweep.py --config configs/paper.py --launcher slurm --slurm_partition gpu --slurm_time_min 1440
    python launch/sweep.py report --workdir results/demo                # figures + tables, no training
    python launch/sweep.py --config configs/demo.py --record           # + the wall time as a dated record

Rerunning the same command skips finished runs and resumes interrupted ones from their checkpoints. A run
directory holding a different config is refused (choose another --workdir, or --overwrite to retrain it). Two
sweeps on one workdir share the work: each run is locked by the process training it, and the other skips it.

A mistake on the command line (an unknown key, a value of the wrong type, an override that a sweep axis
overwrites, a config file that does not load, a value no run can use) is refused with one line on stderr and
exit status 2, before anything is written. Ctrl-C (SIGINT) and SIGTERM print "stopped; rerun the same command to
resume" and exit with 130 and 143. The failure modes and what the sweep does in each: docs/failure-modes.md.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

_STOPPED = "stopped; rerun the same command to resume"


def _stop_while_starting(signum: int, frame: object) -> None:
    # Until main() installs jaxdp.runlog's handlers (imports take seconds): the line and the status, no traceback.
    sys.stderr.write(f"\n{_STOPPED}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stop_while_starting)

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_REPO))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Sweep config file, e.g. configs/demo.py; override values as --config.train.epochs=3.")
_MODE = flags.DEFINE_enum("mode", "run", ["run", "report"],
                          "run: train the unfinished runs, then write the report; report: only the report. "
                          "A positional `report` is the same as --mode=report.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Results directory (default results/<config name>/).")
_LAUNCHER = flags.DEFINE_string("launcher", "local",
                                "local (this process, runs in order) | slurm (one submitit job per run) | "
                                "submitit_local (one local subprocess job per run, to test the job path).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete and retrain run directories whose stored config differs from the new "
                               "one (without it such a sweep is refused).")
_SEEDS = flags.DEFINE_list("seeds", None, "Replicates, e.g. 0,1,2: adds a `seed` axis to every grid; each seed "
                           "sets train.seed and data.seed (a fresh subset and fresh training randomness). The "
                           "figures and Table 1 average the seeds.")
_RUNS = flags.DEFINE_string("runs", None, "Regular expression: only run the runs whose name matches.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and their state (new/partial/finished); "
                             "train nothing, write nothing.")
_REPORT = flags.DEFINE_bool("report", True, "Write summary.csv, Table 1 and figures after training.")
_FIGURES = flags.DEFINE_bool("figures", True, "Draw the figures (--nofigures: tables only, faster).")
_FRESH_START = flags.DEFINE_bool("fresh_start", False,
                                 "Start over a run with a secret seed whose checkpoints cannot be read (they are set "
                                 "aside in <run>/abandoned-<time>/, not deleted). Without it such a run is refused: "
                                 "training it again draws a new secret, a second release on the same data.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Print the Python traceback of a failed run instead of one line.")
_WAIT = flags.DEFINE_bool("wait", None, "submitit launchers: wait for the jobs, then write the report "
                          "(default: yes for submitit_local, no for slurm).")
_RECORD = flags.DEFINE_bool("record", False,
                             "Write the sweep's wall time and each trained run's time split as a dated measurement "
                             "record in docs/measurements/ (sweep-<config name>; jaxdp_study.measurements).")
_CACHE = flags.DEFINE_string("compilation_cache_dir", None,
                             "JAX persistent compilation cache (default <workdir>/.xla_cache); runs with the "
                             "same shapes reuse compiled programs from it.")
_S_PARTITION = flags.DEFINE_string("slurm_partition", None, "SLURM partition.")
_S_ACCOUNT = flags.DEFINE_string("slurm_account", None, "SLURM account.")
_S_QOS = flags.DEFINE_string("slurm_qos", None, "SLURM QOS.")
_S_CONSTRAINT = flags.DEFINE_string("slurm_constraint", None, "SLURM constraint, e.g. a GPU type.")
_S_TIME = flags.DEFINE_integer("slurm_time_min", 24 * 60, "Time limit per job, minutes.")
_S_NODES = flags.DEFINE_integer("slurm_nodes", 1, "Nodes per run (multi-host data parallelism).")
_S_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", 1, "GPUs per node.")
_S_TASKS = flags.DEFINE_integer("slurm_tasks_per_node", 1, "Tasks (processes) per node.")
_S_CPUS = flags.DEFINE_integer("slurm_cpus_per_task", 8, "CPUs per task (data loading).")
_S_MEM = flags.DEFINE_float("slurm_mem_gb", None, "Memory per node, GB.")
_S_ARRAY = flags.DEFINE_integer("slurm_array_parallelism", 64, "Most jobs of the array running at once.")

FLAGS = flags.FLAGS


def _die(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _one_line(text: str) -> str:
    """An exception's message on one line (absl and config_flags quote and escape theirs)."""
    text = str(text).replace("\\'", "'").replace("\\n", " ").strip("\"'")
    return " ".join(text.split())


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with the config file and override mistakes turned into one-line errors (each names the
    argument, the key and what is allowed) before absl sees them."""
    from jaxdp_study import grid, overrides

    path = _config_path(argv)
    if path is not None:
        file = path.split(":", 1)[0]
        if not os.path.isfile(file):
            _die(f"config file {file!r} does not exist (relative to {os.getcwd()}); "
                 f"pass one of {sorted(str(p.relative_to(_REPO)) for p in (_REPO / 'configs').glob('*.py'))}")
        try:
            config = overrides.load_config_file(path)
            overrides.check_overrides(config, overrides.parse_overrides(argv[1:]))
        except grid.SweepError as e:
            _die(str(e))
    elif overrides.parse_overrides(argv[1:]):
        _die(f"{overrides.parse_overrides(argv[1:])[0].arg}: give the config file first, e.g. --config "
             "configs/demo.py --config.train.epochs=3")
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _die(f"{_one_line(e)}; run `python launch/sweep.py --helpfull` for the flags")
    return []  # unreachable


def _parse_seeds(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        _die(f"--seeds={','.join(values)}: give integers >= 0 separated by commas, e.g. --seeds 0,1,2")
    return []  # unreachable


def _record(config, result, wall_time_s: float) -> None:
    """The sweep's wall time (this invocation: data preparation, compiles and reports included) and each trained
    run's final.json timings, as a record from which the docs' performance page is generated."""
    import json

    from jaxdp_study import measurements

    runs = []
    for status in result.statuses:
        final = status.run_dir / "final.json"
        if status.run.name in result.trained and final.exists():
            record = json.loads(final.read_text())
            runs.append({"name": status.run.name, "steps": record.get("steps"),
                         "wall_time_s": record.get("wall_time_s"), "time_split_s": record.get("time_split_s")})
    payload = {"config": str(config.name), "wall_time_s": wall_time_s, "runs_trained": len(result.trained),
               "runs_skipped": len(result.skipped), "runs": runs}
    path = measurements.write_record(f"sweep-{measurements.slug(str(config.name))}", payload,
                                     command=shlex.join(["python", "launch/sweep.py", *sys.argv[1:]]))
    print(f"recorded {path}")


def _stopped(signum: int) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"{_STOPPED}\n")
    sys.stderr.flush()
    sys.exit(128 + signum)


def main(argv: list[str]) -> None:
    from absl import logging

    from jaxdp import runlog

    runlog.install_stop_handlers()
    if not FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO; keep the run lines readable
        logging.set_verbosity(logging.WARNING)
    try:
        _main(argv)
    except runlog.Stopped as e:
        _stopped(e.signum)
    except KeyboardInterrupt:
        _stopped(signal.SIGINT)


def _write_report(workdir: str | os.PathLike) -> list[Path]:
    from jaxdp import runlog
    from jaxdp_study import grid, report

    try:
        return report.write_report(workdir, figures=_FIGURES.value)
    except grid.SweepError as e:
        _die(str(e))
    except OSError as e:
        _die(f"writing the report: {runlog.describe_os_error(e)}")
    return []  # unreachable


def _main(argv: list[str]) -> None:
    started = time.time()
    from jaxdp import runlog
    from jaxdp_study import grid, launchers, overrides
    from jaxdp_study import workdir as run_dirs

    mode = _MODE.value
    extra = argv[1:]
    if extra == ["report"]:
        mode = "report"
    elif extra:
        _die(f"unexpected arguments {extra}; the only positional argument is `report`")
    config = _CONFIG.value
    if config is None and mode == "run":
        _die("pass --config configs/<name>.py (e.g. --config configs/demo.py), or `report --workdir DIR`")
    workdir = _WORKDIR.value or os.path.join("results", str(config.name))
    if mode == "report":
        if not run_dirs.find_run_dirs(workdir):
            _die(f"{workdir!r} holds no sweep runs (no */{run_dirs.RUN_RECORD}); pass the --workdir a sweep "
                 f"wrote to")
        print("\n".join(f"wrote {p}" for p in _write_report(workdir)))
        return
    if _LAUNCHER.value not in launchers.LAUNCHERS:
        _die(f"unknown --launcher={_LAUNCHER.value!r}; choose one of {', '.join(launchers.LAUNCHERS)}")
    slurm = launchers.SlurmOptions(
        partition=_S_PARTITION.value, account=_S_ACCOUNT.value, qos=_S_QOS.value,
        constraint=_S_CONSTRAINT.value, time_min=_S_TIME.value, nodes=_S_NODES.value,
        gpus_per_node=_S_GPUS.value, tasks_per_node=_S_TASKS.value, cpus_per_task=_S_CPUS.value,
        mem_gb=_S_MEM.value, array_parallelism=_S_ARRAY.value)
    wait = _WAIT.value if _WAIT.value is not None else _LAUNCHER.value != "slurm"
    from ml_collections import config_flags

    from jaxdp.checkpoint import CheckpointsUnreadable

    try:
        if _SEEDS.value is not None:
            config = grid.with_seeds(config, _parse_seeds(_SEEDS.value))
        given = config_flags.get_override_values(FLAGS["config"])
        for warning in overrides.refuse_overwritten(config, given):
            sys.stderr.write(f"warning: {warning}\n")
        if _DRY_RUN.value:
            runs = grid.select_runs(grid.expand(config), _RUNS.value)
            statuses = run_dirs.prepare_workdir(workdir, runs, overwrite=_OVERWRITE.value, write=False)
            print(f"{len(statuses)} runs in {os.path.abspath(workdir)}")
            print(run_dirs.summarize_plan(statuses))
            try:  # what a real run would refuse before training, as a warning: the listing stands
                launchers.check_runs([s.run for s in statuses if s.state != "finished"], launchers.default_check)
            except grid.SweepError as e:
                sys.stderr.write("".join(f"warning: training would be refused: {line}\n"
                                         for line in str(e).splitlines()))
            return
        result = launchers.run_sweep(config, workdir, launcher=_LAUNCHER.value, overwrite=_OVERWRITE.value,
                                     cache_dir=_CACHE.value, slurm=slurm, wait=wait, run_filter=_RUNS.value,
                                     fresh_start=_FRESH_START.value)
    except grid.SweepError as e:
        _die(str(e))
    except CheckpointsUnreadable as e:
        _die(str(e))
    except OSError as e:  # a full disk, a read-only folder, missing or damaged data (DataUnavailable)
        if _TRACEBACK.value:
            raise
        _die(runlog.describe_os_error(e) if e.filename is not None else _one_line(e.strerror or e))
    except ValueError as e:  # a value only the run itself could check, e.g. data that does not match its checksum
        if _TRACEBACK.value:
            raise
        _die(f"{_one_line(e)} (--traceback shows where it was raised)")
    if not wait:
        print(f"jobs submitted; when they finish: python launch/sweep.py report --workdir {workdir}")
        return
    if _REPORT.value:
        written = _write_report(result.workdir)
        print(f"report: {len(written)} files in {result.workdir} (summary.csv, table1.md, imbalance_drop.md, "
              f"figures/)")
    if _RECORD.value and not result.failed:
        _record(config, result, time.time() - started)
    if result.failed:
        for name, err in result.failed.items():
            sys.stderr.write(f"run {name} failed: {err}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
