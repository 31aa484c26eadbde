"""The paper's non-private baseline: the same five female fractions, no clipping and no noise.

Female fraction 70%, 80%, 90%, 99%, 99.9% of a 30,000-image CelebA subset; ResNet18 (GroupNorm), 128x128,
batch 32, Adam 5e-5, 60 epochs. Five runs::

    python launch/sweep.py --config configs/nondp.py              # results in results/nondp/
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "nondp"
    c.dp.enabled = False
    c.dp.privacy_level = "nondp"
    c.sweep.imbalance = grid({"data.female_fraction": (0.7, 0.8, 0.9, 0.99, 0.999)})
    return c
