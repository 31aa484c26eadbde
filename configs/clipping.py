"""The paper's clipping study (Figure 2): clip S = 1, 5, 10 at each privacy level, 70% female.

Privacy levels high / medium / low are z = 1.5 / 0.7 / 0.5 (jaxdp.sweep.PRIVACY_LEVELS); everything else is
the paper's setting (jaxdp/config.py defaults). Nine runs::

    python launch/sweep.py --config configs/clipping.py           # results in results/clipping/
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "clipping"
    c.data.female_fraction = 0.7
    c.sweep.clipping = grid({"privacy": ("high", "medium", "low"), "dp.l2_clip_norm": (1.0, 5.0, 10.0)})
    return c
