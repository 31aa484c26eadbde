r"""Benchmark a full DP-SGD training step of the GroupNorm ResNet18: jaxdp's strategies vs non-private vs Opacus.

    python launch/bench.py --image-size 64 --batch-size 32 --compare-opacus --json bench_64.json
    python launch/bench.py --config configs/demo.py           # the model, image size, batch and clipping of a config
    python launch/bench.py --config configs/demo.py --strategies vmap,bookkeeping   # flags override the config
    python launch/bench.py --config configs/demo.py --methods all    # + DPSGD-F, Global, Global-Adapt steps
    python launch/bench.py --config configs/demo.py --loop --run medium-ff0.9   # a run's steps vs the step

What is measured and how: see jaxdp_study/bench.py. Each invocation also writes its result, with this command,
the date, the package versions and the machine, as a record in docs/measurements/ (jaxdp_study.measurements;
--no-record skips it), from which the docs' performance tables are generated. On a GPU:

    python launch/bench.py --image-size 128 --batch-size 256 --strategies vmap,bookkeeping --rounds 5 \
        --json bench_gpu.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from jaxdp_study import bench, grid, measurements  # noqa: E402

# What the benchmark runs without --config (and what a flag left out keeps): the paper's ResNet18 at 64x64.
DEFAULTS = dict(image_size=64, batch_size=32, strategies=None, stage_sizes=(2, 2, 2, 2), width=64, num_groups=32)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="experiment config (e.g. configs/demo.py): benchmark its model, image size, batch size, "
                             "clipping strategy, clip bound, noise multiplier and learning rate; the flags below "
                             "override it")
    parser.add_argument("--image-size", type=int, default=None, help=f"default {DEFAULTS['image_size']}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated jaxdp clipping strategies (default: the config's, else all available)")
    parser.add_argument("--methods", default="",
                        help="comma-separated DP-fairness methods (dpsgd_f, dpsgd_global, dpsgd_global_adapt) or "
                             "'all': one more entry per strategy and method, compared with that strategy's DP-SGD")
    parser.add_argument("--compare-opacus", action="store_true",
                        help=f"also time PyTorch + Opacus, interleaved (needs `{bench.TORCH_INSTALL}`)")
    parser.add_argument("--opacus-modes", default=",".join(bench.OPACUS_MODES))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all entries (median is reported)")
    parser.add_argument("--steps-per-round", type=int, default=None, help="default 1 (10 with --loop)")
    parser.add_argument("--loop", action="store_true",
                        help="with --config: train the config's run (or --run's) in each round and compare its "
                             "steps with the benchmark's step for what it ran, side by side "
                             "(jaxdp_study.bench.run_loop_benchmark)")
    parser.add_argument("--run", default=None,
                        help="with --loop: regular expression picking a run of the config's sweep (e.g. "
                             "medium-ff0.9); default: the config itself")
    parser.add_argument("--epochs", type=float, default=None, help="with --loop: override config.train.epochs")
    parser.add_argument("--stage-sizes", type=_ints, default=None,
                        help="BasicBlocks per stage (default 2,2,2,2: ResNet18)")
    parser.add_argument("--width", type=int, default=None, help=f"default {DEFAULTS['width']}")
    parser.add_argument("--num-groups", type=int, default=None,
                        help=f"GroupNorm groups (default {DEFAULTS['num_groups']})")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="convolutions on maps of at most this many pixels run as patches x matmul in the "
                             "'matmul conv' entry (default: jaxdp's)")
    parser.add_argument("--no-noise-only", action="store_true",
                        help="skip the 'noise+adam only' entry (the cost breakdown of the DP step's noise)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to pause before each timed step so the previous entry's CPU thread pools "
                             "go idle (see jaxdp_study/bench.py)")
    parser.add_argument("--json", default=None, help="write the full result as JSON to this path")
    parser.add_argument("--no-record", action="store_true",
                        help="do not write the result as a dated record in docs/measurements/ (or "
                             f"${measurements.DIR_ENV})")
    parser.add_argument("--record-name", default=None,
                        help="the record's name (default: from what is measured, e.g. step-cpu-resnet18-64px-b32)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "launch/bench.py", *argv])
    if args.loop:
        return _loop(parser, args)
    if args.run is not None or args.epochs is not None:
        parser.exit(2, "error: --run and --epochs apply to --loop only\n")
    args.steps_per_round = 1 if args.steps_per_round is None else args.steps_per_round

    try:
        settings = dict(DEFAULTS)
        if args.config is not None:
            settings.update(bench.settings_from_config(grid.load_config(args.config)))
        explicit = dict(image_size=args.image_size, batch_size=args.batch_size, stage_sizes=args.stage_sizes,
                        width=args.width, num_groups=args.num_groups,
                        strategies=None if args.strategies is None else [s for s in args.strategies.split(",") if s])
        settings.update({k: v for k, v in explicit.items() if v is not None})
        if args.max_pixels is not None:
            settings["max_pixels"] = args.max_pixels
        result = bench.run_benchmark(
            **settings, compare_opacus=args.compare_opacus,
            opacus_modes=[m for m in args.opacus_modes.split(",") if m],
            rounds=args.rounds, steps_per_round=args.steps_per_round,
            include_noise_only=not args.no_noise_only, settle_s=args.settle,
            methods=bench.METHOD_NAMES if args.methods == "all" else [m for m in args.methods.split(",") if m],
        )
    except (ImportError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    return _report(result, bench.format_table(result), args, _step_record_name)


def _model_name(stage_sizes, width: int) -> str:
    return ("resnet18" if (tuple(stage_sizes), width) == (DEFAULTS["stage_sizes"], DEFAULTS["width"])
            else f"resnet-s{''.join(map(str, stage_sizes))}-w{width}")


def _step_record_name(result: dict) -> str:
    """What the step benchmark measured, as a record name: backend, model, image size, batch, + methods/Opacus."""
    c = result["config"]
    return "-".join(["step", result["environment"]["backend"], _model_name(c["stage_sizes"], c["width"]),
                     f"{c['image_size']}px", f"b{c['batch_size']}"]
                    + (["methods"] if c.get("methods") else []) + (["opacus"] if c["compare_opacus"] else []))


def _report(result: dict, table: str, args: argparse.Namespace, record_name: Callable[[dict], str]) -> dict:
    print(table)
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    if not args.no_record:
        path = measurements.write_record(args.record_name or record_name(result), result, command=args.command)
        print(f"recorded {path}")
    return result


def _loop(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    if args.config is None:
        parser.exit(2, "error: --loop needs --config (the experiment whose run is trained)\n")
    step_flags = ("image_size", "batch_size", "strategies", "methods", "compare_opacus", "stage_sizes", "width",
                  "num_groups", "max_pixels", "no_noise_only")
    given = [f"--{k.replace('_', '-')}" for k in step_flags if getattr(args, k) not in (None, False, "")]
    if given:
        parser.exit(2, f"error: {', '.join(given)} do not apply to --loop: the step benchmarked is the one the run "
                       "ran (its model, strategy, method and chunk width)\n")
    try:
        result = bench.run_loop_benchmark(
            grid.load_config(args.config), run=args.run, epochs=args.epochs, rounds=args.rounds,
            steps_per_round=10 if args.steps_per_round is None else args.steps_per_round, settle_s=args.settle)
    except (ValueError, FileNotFoundError) as error:  # FileNotFoundError: jaxdp.data.DataUnavailable
        parser.exit(2, f"error: {error}\n")
    return _report(result, bench.format_loop_table(result), args, _loop_record_name)


def _loop_record_name(result: dict) -> str:
    """What the loop benchmark measured, as a record name: backend and the run."""
    return "-".join(["loop", result["environment"]["backend"], measurements.slug(result["config"]["run"])])


if __name__ == "__main__":
    main()
