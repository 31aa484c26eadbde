"""The mitigations at demo scale (configs/demo.py's setting), on a CPU.

Plain DP-SGD and the three DP-fairness methods of jaxdp.methods (DPSGD-F, DPSGD-Global, DPSGD-Global-Adapt, each
with its reference parameters) at high and medium privacy, at 70% and 99% female, with the non-private runs as the
baseline: 4 x 2 x 2 + 2 = 18 runs, on the demo's generated data, model, batch and epochs (configs/demo.py). The
DP-SGD and non-private runs carry configs/demo.py's run names (``--workdir results/demo`` reuses those six runs of a
demo trained with this version).

Why this grid: the two levels are where the demo's DP runs are furthest from non-private training for the minority
at 70% female (docs/results.md: the demo's three seeds), i.e. where a mitigation has most to recover; the two
fractions are the ends of the demo's imbalance axis (3,600 and 120 men in training).

The reference parameters are the papers' and have not been tuned to this model: Global's Z = 100 lies far above
the demo's per-example gradient norms (means of about 10-30 at clip 1), so Global scales every example by
C/Z = 0.01 and its signal is a hundredth of DP-SGD's against the same noise; Global-Adapt starts at Z = 100 and
moves Z towards the norms from its noisy counts (by at most e^-0.1 per step downwards). Run it with::

    python launch/sweep.py --config configs/demo_mitigations.py     # results in results/demo_mitigations/
"""

from pathlib import Path

from jaxdp_study.grid import grid, load_config

METHODS = ("dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")


def get_config():
    c = load_config(Path(__file__).with_name("demo.py"))
    c.name = "demo_mitigations"
    del c.sweep["imbalance"]
    c.sweep.dpsgd = grid({"privacy": ("high", "medium", "nondp"), "data.female_fraction": (0.7, 0.99)})
    c.sweep.methods = grid({"privacy": ("high", "medium"), "data.female_fraction": (0.7, 0.99), "dp.method": METHODS})
    return c
