"""The paper's medium-privacy experiment: z = 0.7, clip S = 5, delta = 1e-6 (paper: epsilon = 4.98).

Female fraction 70%, 80%, 90%, 99%, 99.9% of a 30,000-image CelebA subset; ResNet18 (GroupNorm), 128x128,
batch 32, Adam 5e-5, 60 epochs (the schema defaults in jaxdp/config.py). Five runs::

    python launch/sweep.py --config configs/medium.py            # results in results/medium/

Batches are Poisson-sampled, which is what the accountants assume; the paper used shuffled fixed-size batches
(`--config.dp.sampling=fixed --config.dp.accountant=rdp_classic` reproduces that and the paper's epsilon
accounting, whose guarantee is then only nominal: the accountant assumes Poisson sampling).
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "medium"
    c.dp.enabled = True
    c.dp.privacy_level = "medium"
    c.dp.noise_multiplier = 0.7
    c.dp.l2_clip_norm = 5.0
    c.dp.delta = 1e-6
    c.sweep.imbalance = grid({"data.female_fraction": (0.7, 0.8, 0.9, 0.99, 0.999)})
    return c
