"""The paper's whole grid: 4 privacy levels x 5 female fractions, plus clip 1 / 5 / 10 x 3 levels at 70%.

The two grids share the three clip-5, 70%-female runs, which run once: 20 + 9 - 3 = 26 runs, one per row of
jaxdp_study/resources/paper_results.csv. At the paper's cost (a DP run took 20 hours on four K80s) this is a cluster
job::

    python launch/sweep.py --config configs/paper.py --launcher slurm --slurm_partition gpu
    python launch/sweep.py report --workdir results/paper        # figures once the jobs are done
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "paper"
    c.sweep.imbalance = grid({
        "privacy": ("high", "medium", "low", "nondp"),
        "data.female_fraction": (0.7, 0.8, 0.9, 0.99, 0.999),
    })
    c.sweep.clipping = grid({
        "privacy": ("high", "medium", "low"),
        "data.female_fraction": (0.7,),
        "dp.l2_clip_norm": (1.0, 5.0, 10.0),
    })
    return c
