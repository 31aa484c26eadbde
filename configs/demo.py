"""The demo: the paper's study shrunk to about ten minutes on 2 CPU cores, on generated CelebA-format data.

Every privacy level (high / medium / low / non-DP) x three female fractions (70%, 90%, 99%) = 12 runs. What is
smaller than the paper, and why:
- data.source = "synthetic": CelebA-format images generated on the first run (no download); switch to real
  CelebA with --config.data.source=celeba (same code path).
- 32x32 images and a 2,000-image subset (1,600 train), so a DP epoch takes seconds on a CPU; the test set
  is balanced (split_scheme "official") so minority accuracy is measured on 200 men, not 4.
- model.stage_sizes = (1, 1, 1, 1), width 16: the smallest member of the ResNet family (ResNet10 layout,
  GroupNorm); the paper's ResNet18 is stage_sizes (2, 2, 2, 2), width 64.
- batch 64, learning rate 2e-3 and 8 epochs (200 steps) instead of 32, 5e-5 and 60 epochs, so the small
  model learns in the time.
Run it with::

    python launch/sweep.py --config configs/demo.py              # results and figures in results/demo/
"""

from jaxdp.config import base_config
from jaxdp.sweep import grid


def get_config():
    c = base_config()
    c.name = "demo"
    c.data.source = "synthetic"
    c.data.image_size = 32
    c.data.total = 2_000
    # Balanced test set (400 images, 200 men) from the generator's test partition, so the minority's accuracy
    # is measured to about +-7 pp at every imbalance; training keeps the imbalance exactly.
    c.data.split_scheme = "official"
    c.data.synthetic_num_images = 4_000  # the smallest pool holding 99%-female training cells of 1,600
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 16
    c.model.num_groups = 8
    c.optim.learning_rate = 2e-3
    c.train.epochs = 8  # 200 steps of expected batch 64
    c.train.batch_size = 64
    c.train.eval_every_steps = 25
    c.train.checkpoint_every_steps = 100
    c.sweep.imbalance = grid({
        "privacy": ("high", "medium", "low", "nondp"),
        "data.female_fraction": (0.7, 0.9, 0.99),
    })
    return c
