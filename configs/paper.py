"""The paper's whole grid: 4 privacy levels x 5 female fractions, plus clip 1 / 5 / 10 x 3 levels at 70%.

The two grids share the three clip-5, 70%-female runs, which run once: 20 + 9 - 3 = 26 runs, one per row of
jaxdp_study/resources/paper_results.csv. At the paper's cost (a DP run took 20 hours on four K80s) this is a cluster
job::

    python launch/sweep.py --config configs/paper.py --launcher slurm --slurm_partition gpu
    python launch/sweep.py report --workdir results/paper        # figures once the jobs are done
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid
from jaxdp_study.paper import FEMALE_FRACTIONS, L2_CLIP_NORMS, PRIVACY_ORDER


def get_config():
    c = base_config()
    c.name = "paper"
    c.sweep.imbalance = grid({
        "privacy": PRIVACY_ORDER,
        "data.female_fraction": FEMALE_FRACTIONS,
    })
    c.sweep.clipping = grid({
        "privacy": ("high", "medium", "low"),
        "data.female_fraction": (0.7,),
        "dp.l2_clip_norm": L2_CLIP_NORMS,
    })
    return c
