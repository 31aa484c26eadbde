r"""Benchmark a full DP-SGD training step of the GroupNorm ResNet18: jaxdp's strategies vs non-private vs Opacus.

    python launch/bench.py --image-size 64 --batch-size 32 --compare-opacus --json bench_64.json

What is measured and how: see jaxdp_study/bench.py. On a GPU:

    python launch/bench.py --image-size 128 --batch-size 256 --strategies vmap,bookkeeping --rounds 5 \
        --json bench_gpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from jaxdp_study import bench  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--strategies", default=None,
                        help="comma-separated jaxdp clipping strategies (default: all available)")
    parser.add_argument("--compare-opacus", action="store_true",
                        help=f"also time PyTorch + Opacus, interleaved (needs `{bench.TORCH_INSTALL}`)")
    parser.add_argument("--opacus-modes", default=",".join(bench.OPACUS_MODES))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all entries (median is reported)")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--stage-sizes", default="2,2,2,2", help="BasicBlocks per stage (ResNet18: 2,2,2,2)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max-pixels", type=int, default=bench.fastclip.DEFAULT_MATMUL_MAX_PIXELS,
                        help="convolutions on maps of at most this many pixels run as patches x matmul")
    parser.add_argument("--no-noise-only", action="store_true",
                        help="skip the 'noise+adam only' entry (the cost breakdown of the DP step's noise)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to pause before each timed step so the previous entry's CPU thread pools "
                             "go idle (see jaxdp_study/bench.py)")
    parser.add_argument("--json", default=None, help="write the full result as JSON to this path")
    args = parser.parse_args(argv)

    try:
        result = bench.run_benchmark(
            args.image_size, args.batch_size,
            strategies=None if args.strategies is None else [s for s in args.strategies.split(",") if s],
            compare_opacus=args.compare_opacus,
            opacus_modes=[m for m in args.opacus_modes.split(",") if m],
            rounds=args.rounds, steps_per_round=args.steps_per_round,
            stage_sizes=tuple(int(s) for s in args.stage_sizes.split(",")), width=args.width,
            max_pixels=args.max_pixels, include_noise_only=not args.no_noise_only, settle_s=args.settle,
        )
    except (ImportError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(bench.format_table(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
