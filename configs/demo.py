"""The demo: the paper's study shrunk to fit a laptop CPU, on generated CelebA-format data.

Every privacy level (high / medium / low / non-DP) x three female fractions (70%, 90%, 99%) = 12 runs. What is
smaller than the paper, and why:
- data.source = "synthetic": CelebA-format images generated on the first run (no download; 30,000 faces, about
  0.7 GB on disk with the prepared copies); switch to real CelebA with --config.data.source=celeba (same code path).
- 32x32 images and a 12,800-image subset: 12,000 training images at the set female fraction (half the paper's
  24,000; 3,600 / 1,200 / 120 men at 70 / 90 / 99% female) and a balanced 800-image test set (split_scheme
  "official", test_fraction 1/16) from the generator's test partition, so that minority accuracy is measured on
  400 men at every level (95% intervals of about +-4 pp), not on 8 (the paper's test set keeps the imbalance).
- model.stage_sizes = (1, 1, 1), width 8 (20,650 parameters): a three-stage member of the ResNet family
  (BasicBlocks, GroupNorm); the paper's ResNet18 is stage_sizes (2, 2, 2, 2), width 64 (11M). DP-SGD's noise
  norm grows with sqrt(#parameters) while the clipped signal does not, so a small model is what lets the DP runs
  learn in a few epochs (earlier, on 1,600 images, width 16 / four stages left high privacy at chance).
- Poisson batch 256 (q = 0.021), clip 1, Adam lr 5e-3, 3 epochs (141 steps) instead of batch 32, clip 5,
  lr 5e-5, 60 epochs: the larger batch shrinks the noise z*C/B relative to the mean clipped gradient. The noise
  multipliers are the paper's (1.5 / 0.7 / 0.5), and so, nearly, are the epsilons: 0.92 / 5.33 / 13.3 (PLD,
  delta 1e-6) against the paper's 1.15 / 4.98 / 16.2. Non-DP runs use the same settings without clipping or noise.
- clipping_strategy "auto" (the default): "bookkeeping" on this model, the fastest exact strategy.

What it shows: docs/results.md (the tables this sweep writes); its wall time: docs/performance.md.

Run it with::

    python launch/sweep.py --config configs/demo.py              # results and figures in results/demo/
    python launch/sweep.py --config configs/demo.py --seeds 0,1,2   # + two more replicates
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "demo"
    c.data.source = "synthetic"
    c.data.image_size = 32
    # 12,800 images: 12,000 train at the set female fraction (the paper's 24,000 halved) and a balanced 800-image
    # test set (400 men) from the generator's test partition, so the minority's accuracy is measured to about
    # +-4 pp at every imbalance.
    c.data.total = 12_800
    c.data.test_fraction = 1 / 16
    c.data.split_scheme = "official"
    # 30,000: a round pool whose training partition holds the 11,880 women the 99% run needs (about 12,000).
    c.data.synthetic_num_images = 30_000
    c.model.stage_sizes = (1, 1, 1)
    c.model.width = 8
    c.model.num_groups = 8
    c.optim.learning_rate = 5e-3
    c.train.epochs = 3  # 141 steps of expected batch 256
    c.train.batch_size = 256
    c.train.eval_every_steps = 50
    c.train.checkpoint_every_steps = 50
    c.dp.l2_clip_norm = 1.0
    c.dp.clipping_strategy = "auto"  # resolves to "bookkeeping" on this model (final.json says so)
    c.sweep.imbalance = grid({
        "privacy": ("high", "medium", "low", "nondp"),
        "data.female_fraction": (0.7, 0.9, 0.99),
    })
    return c
