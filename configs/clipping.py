"""The paper's clipping study (Figure 2): clip S = 1, 5, 10 at each private level, 70% female.

Privacy levels and clip bounds: jaxdp_study/paper.py; everything else is the paper's setting (jaxdp/config.py
defaults). Nine runs::

    python launch/sweep.py --config configs/clipping.py           # results in results/clipping/
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid
from jaxdp_study.paper import L2_CLIP_NORMS


def get_config():
    c = base_config()
    c.name = "clipping"
    c.data.female_fraction = 0.7
    c.sweep.clipping = grid({"privacy": ("high", "medium", "low"), "dp.l2_clip_norm": L2_CLIP_NORMS})
    return c
