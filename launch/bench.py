r"""Benchmark jaxdp's training step, and whole training runs, side by side with PyTorch and Opacus.

The step benchmark times the plan's training step, the very program training runs, for non-private training,
each clipping strategy and (``--methods``) each DP-fairness method, and with ``--compare-opacus`` the same model in
PyTorch and each Opacus mode. Pick what to benchmark with ``--workload`` (default ``resnet18``) or ``--config``:

    python launch/bench.py                                    # ResNet18 at 64x64, batch 32, every strategy
    python launch/bench.py --workload resnet18 --image-size 128 --strategies bookkeeping --compare-opacus
    python launch/bench.py --workload demo                    # configs/demo.py's model (= --config configs/demo.py)
    python launch/bench.py --workload digits --compare-opacus     # the GroupNorm CNN on sklearn's digits, batch 64
    python launch/bench.py --workload adult-mlp --compare-opacus  # fair-dp's Adult MLP, batch 256
    python launch/bench.py --config configs/demo.py --methods all # any run config; + DPSGD-F, Global, Global-Adapt
    python launch/bench.py --config configs/demo.py --strategies vmap,bookkeeping   # flags override the config
    python launch/bench.py --strategies bookkeeping --mechanisms gaussian    # the lattice noise's cost in a step

Workloads: ``resnet18`` and ``demo`` are run configs (``--image-size``, ``--batch-size``, ``--stage-sizes``,
``--width``, ``--num-groups`` and ``--dataset-size`` override them), benchmarked through
``jaxdp.steps.plan_from_config`` + ``jaxdp.steps.jit_train_step``, as ``train_and_evaluate`` runs them; ``digits``
and ``adult-mlp`` are a user's Flax model and loss on ``jaxdp.plan.make_plan(...).train_step``.

``--loop`` times whole training runs instead of steps:

    python launch/bench.py --workload digits --loop           # 330-step runs: the plan, issue 25's script as
                                                              # written, Opacus make_private; accuracy and epsilon
    python launch/bench.py --workload digits --loop --strategies auto,vmap --opacus-modes hooks,ghost
    python launch/bench.py --config configs/demo.py --loop --run medium-ff0.9   # a config's run vs its step

What is measured and how: jaxdp_study/bench/ (timing.py for the method). Each invocation also writes its result,
with this command, the date, the package versions and the machine, as a record in docs/measurements/
(jaxdp_study.measurements; --no-record skips it), from which the docs' performance tables are generated.
The Opacus side needs ``pip install torch==2.13.0 opacus`` (the 'bench' extra); the digits data needs scikit-learn.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from jaxdp_study import bench, grid, measurements  # noqa: E402

# Flags that change a run config's settings (config workloads only), and where each goes in the config.
CONFIG_FLAGS = {"image_size": "data.image_size", "batch_size": "train.batch_size",
                "stage_sizes": "model.stage_sizes", "width": "model.width", "num_groups": "model.num_groups"}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [s for s in text.split(",") if s]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to benchmark")
    what.add_argument("--workload", choices=bench.WORKLOADS, default=None, help="default resnet18 (without --config)")
    what.add_argument("--config", default=None, help="a run config (e.g. configs/demo.py): its model, data shape, "
                      "batch, DP settings, optimiser and clipping strategy; the flags below override it")
    for flag, help_text in (("--image-size", "data.image_size"), ("--batch-size", "train.batch_size"),
                            ("--width", "model.width"), ("--num-groups", "model.num_groups (GroupNorm groups)"),
                            ("--dataset-size", "the training set's size (default: the config's data's)")):
        what.add_argument(flag, type=int, default=None, help=f"config workloads: {help_text}")
    what.add_argument("--stage-sizes", type=_ints, default=None, help="config workloads: model.stage_sizes, "
                      "BasicBlocks per stage (2,2,2,2: ResNet18)")
    what.add_argument("--strategies", default=None, help="comma-separated clipping strategies (default: the "
                      "config's; every one for resnet18, digits and adult-mlp; auto with --loop)")
    what.add_argument("--methods", default="", help="comma-separated DP-fairness methods (dpsgd_f, dpsgd_global, "
                      "dpsgd_global_adapt) or 'all': one more entry per strategy and method")
    what.add_argument("--mechanisms", default=None, help="comma-separated noise mechanisms to time besides the "
                      "workload's own (lattice, the default, or gaussian): one more DP entry per strategy each")
    what.add_argument("--compare-opacus", action="store_true",
                      help=f"also time PyTorch + Opacus, interleaved (needs `{bench.TORCH_INSTALL}`)")
    what.add_argument("--opacus-modes", default=None, help=f"default {','.join(bench.OPACUS_MODES)} (hooks, the "
                      "make_private default, with --loop; '' for no Opacus run)")
    what.add_argument("--torch-threads", type=int, default=None, help="torch's intra-op threads (default: "
                      "torch's, one per core; 1 on a machine other work shares, where waiting threads slow torch)")
    what.add_argument("--no-noise-only", action="store_true",
                      help="skip the 'noise+update only' entry (the part of a DP step no clipping strategy removes)")
    how = parser.add_argument_group("how")
    how.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all entries (medians reported)")
    how.add_argument("--steps-per-round", type=int, default=None, help="timed steps per round (default 1; 10 for "
                     "a config's --loop)")
    how.add_argument("--settle", type=float, default=1.0, help="seconds to pause before each entry's round so the "
                     "previous entry's CPU thread pools go idle (jaxdp_study/bench/timing.py)")
    how.add_argument("--warmup", type=float, default=bench.WARMUP_S, help="seconds of untimed steps after each "
                     f"settle pause before the timed ones (default {bench.WARMUP_S:g}; jaxdp_study/bench/timing.py)")
    loop = parser.add_argument_group("--loop")
    loop.add_argument("--loop", action="store_true", help="time whole training runs (module docstring)")
    loop.add_argument("--run", default=None, help="with --config: a regular expression picking a run of the "
                      "config's sweep (e.g. medium-ff0.9); default: the config itself")
    loop.add_argument("--epochs", type=float, default=None, help="with --config: override config.train.epochs")
    loop.add_argument("--compilation-cache", default=None, help="with --workload digits --loop: turn on JAX's "
                      "persistent compilation cache in this folder and fill it before the timed runs (a script run "
                      "again: programs are loaded, not compiled)")
    loop.add_argument("--max-steps", type=int, default=None, help="with --workload digits: stop each run after this "
                      "many steps (a quick check; the targets are for whole runs)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, help="write the full result as JSON to this path")
    out.add_argument("--no-record", action="store_true", help="do not write the result as a dated record in "
                     f"docs/measurements/ (or ${measurements.DIR_ENV})")
    out.add_argument("--record-name", default=None, help="the record's name (default: from what is measured, e.g. "
                     "step-cpu-resnet18-64px-b32)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "launch/bench.py", *argv])
    if args.config is not None and args.workload is not None:
        parser.exit(2, "error: give --workload or --config, not both\n")
    args.workload = args.workload or (None if args.config else "resnet18")
    try:
        if args.loop:
            return _loop(parser, args)
        if args.run is not None or args.epochs is not None or args.max_steps is not None:
            parser.exit(2, "error: --run, --epochs and --max-steps apply to --loop only\n")
        workload = _workload(parser, args)
        result = bench.run_benchmark(
            workload, strategies=_names(args.strategies), methods=_methods(args.methods),
            compare_opacus=args.compare_opacus, opacus_modes=_names(args.opacus_modes) or bench.OPACUS_MODES,
            rounds=args.rounds, steps_per_round=args.steps_per_round or 1, settle_s=args.settle,
            warmup_s=args.warmup,
            include_noise_only=not args.no_noise_only, torch_threads=args.torch_threads,
            mechanisms=_names(args.mechanisms) or ())
    except (ImportError, ValueError, FileNotFoundError, grid.SweepError) as error:
        parser.exit(2, f"error: {error}\n")
    return _report(result, bench.format_table(result), args, _step_record_name)


def _methods(text: str) -> list[str]:
    return list(bench.METHOD_NAMES) if text == "all" else _names(text)


def _config_overrides(args: argparse.Namespace) -> dict:
    return {key: getattr(args, flag) for flag, key in CONFIG_FLAGS.items() if getattr(args, flag) is not None}


def _workload(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The workload the flags describe: a run config (flags override it) or a named user workload."""
    if args.workload in bench.PLAN_WORKLOADS:
        given = [f"--{f.replace('_', '-')}" for f in (*CONFIG_FLAGS, "dataset_size") if getattr(args, f) is not None]
        if given:
            parser.exit(2, f"error: {', '.join(given)} apply to config workloads only; {args.workload} is a user "
                           "model with fixed settings (jaxdp_study/bench/workloads.py)\n")
        return bench.PLAN_WORKLOADS[args.workload]()
    config = grid.load_config(args.config) if args.config else bench.named_config(args.workload)
    for key, value in _config_overrides(args).items():
        section, name = key.split(".")
        config[section][name] = value
    # Without --config, resnet18 compares every strategy (the benchmark's default before configs existed).
    strategies = bench.ALL_STRATEGIES if args.workload == "resnet18" else None
    return bench.ConfigWorkload(config, dataset_size=args.dataset_size, strategies=strategies)


def _report(result: dict, table: str, args: argparse.Namespace, record_name: Callable[[dict], str]) -> dict:
    print(table)
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    if not args.no_record:
        path = measurements.write_record(args.record_name or record_name(result), result, command=args.command)
        print(f"recorded {path}")
    return result


def _step_record_name(result: dict) -> str:
    """What the step benchmark measured, as a record name: backend, workload, + methods/mechanisms/Opacus."""
    c = result["config"]
    return "-".join(["step", result["environment"]["backend"], c["workload"]]
                    + (["methods"] if c.get("methods") else []) + (["mechanisms"] if c.get("mechanisms") else [])
                    + (["opacus"] if c["compare_opacus"] else []))


def _loop(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    step_flags = ("image_size", "batch_size", "stage_sizes", "width", "num_groups", "dataset_size", "methods",
                  "compare_opacus", "no_noise_only", "steps_per_round" if args.workload else "max_steps")
    given = [f"--{k.replace('_', '-')}" for k in step_flags if getattr(args, k) not in (None, False, "")]
    if given:
        parser.exit(2, f"error: {', '.join(given)} do not apply to --loop: the runs are the workload's own "
                       "(a config's run benchmarks the step it ran)\n")
    if args.workload is None:  # a config's run against its step
        if args.strategies is not None or args.opacus_modes is not None:
            parser.exit(2, "error: --strategies and --opacus-modes do not apply to a config's --loop\n")
        result = bench.run_loop_benchmark(
            grid.load_config(args.config), run=args.run, epochs=args.epochs, rounds=args.rounds,
            steps_per_round=args.steps_per_round or 10, settle_s=args.settle)
        return _report(result, bench.format_loop_table(result), args, _loop_record_name)
    if args.run is not None or args.epochs is not None:
        parser.exit(2, "error: --run and --epochs apply to a config's --loop (--config CONFIG --loop)\n")
    if args.workload not in bench.LOOP_WORKLOADS:
        parser.exit(2, f"error: --workload {args.workload} --loop: whole user runs are written for "
                       f"{', '.join(bench.LOOP_WORKLOADS)} (real data with a test set); for a config's run use "
                       "--config CONFIG --loop\n")
    modes = ["hooks"] if args.opacus_modes is None else _names(args.opacus_modes)
    if args.compilation_cache is not None:
        from jaxdp_study.launchers import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)
    workload = bench.PLAN_WORKLOADS[args.workload]()
    result = bench.run_user_loops(workload, strategies=_names(args.strategies) or ["auto"], opacus_modes=modes,
                                  rounds=args.rounds, settle_s=args.settle, max_steps=args.max_steps,
                                  torch_threads=args.torch_threads, warm_cache=args.compilation_cache is not None)
    return _report(result, bench.format_runs_table(result), args, _runs_record_name)


def _loop_record_name(result: dict) -> str:
    """What the loop benchmark measured, as a record name: backend and the run."""
    return "-".join(["loop", result["environment"]["backend"], measurements.slug(result["config"]["run"])])


def _runs_record_name(result: dict) -> str:
    """Whole user runs, as a record name: backend and the workload."""
    warm = ["warm-cache"] if result["config"].get("warm_compilation_cache") else []
    return "-".join(["runs", result["environment"]["backend"], result["config"]["workload"], *warm])


if __name__ == "__main__":
    main()
