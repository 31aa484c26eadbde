"""Beyond the paper: the DP-fairness mitigations at the paper's scale, for a GPU machine.

The paper's question — how DP-SGD treats the minority as the data gets more imbalanced — asked again of three
methods built to reduce that disparity (jaxdp.methods): DPSGD-F (Xu, Du & Wu 2021: per-group clip bounds from
privately counted clip fractions), DPSGD-Global (Bu et al. 2021: norms up to Z scaled by C/Z, the rest dropped) and
DPSGD-Global-Adapt (Esipova et al. 2023: the rest clipped to C, Z adapted from a private count), each with the
reference parameters (jaxdp.methods.PARAMETERS), next to plain DP-SGD and non-private training:

- "dpsgd": the paper's imbalance grid (4 privacy levels incl. non-DP x 5 female fractions, 20 runs), under the
  same run names as configs/paper.py, so ``--workdir results/paper`` reuses those runs;
- "methods": the three methods x high / medium / low privacy x the 5 fractions (45 runs).

65 runs of the paper's setting (ResNet18 with GroupNorm, 128x128, batch 32, 60 epochs, clip 5, delta 1e-6; a DP run
took 20 hours on four K80s in the paper). The methods' epsilons are the composition of the gradient and the counts'
Gaussian on each batch: DPSGD-F and Global-Adapt report a slightly larger epsilon than DP-SGD at the same noise
multiplier (the counts' sigma = 10); Global releases nothing else. Every private run records the gradient
misalignment per group (nonprivate_cos_*), and the report adds methods.md and figures 8-9::

    python launch/sweep.py --config configs/mitigations.py --launcher slurm --slurm_partition gpu
    python launch/sweep.py report --workdir results/mitigations
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid
from jaxdp_study.paper import FEMALE_FRACTIONS, PRIVACY_ORDER

METHODS = ("dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")


def get_config():
    c = base_config()
    c.name = "mitigations"
    c.sweep.dpsgd = grid({"privacy": PRIVACY_ORDER, "data.female_fraction": FEMALE_FRACTIONS})
    c.sweep.methods = grid({"privacy": ("high", "medium", "low"), "data.female_fraction": FEMALE_FRACTIONS,
                            "dp.method": METHODS})
    return c
