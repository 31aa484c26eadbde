"""The demo: the paper's study shrunk to about ten minutes on 2 CPU cores, on generated CelebA-format data.

Every privacy level (high / medium / low / non-DP) x three female fractions (70%, 90%, 99%) = 12 runs. What is
smaller than the paper, and why:
- data.source = "synthetic": CelebA-format images generated on the first run (no download); switch to real
  CelebA with --config.data.source=celeba (same code path).
- 32x32 images and a 2,000-image subset (1,600 train), so a DP epoch takes seconds on a CPU; the test set
  is balanced (split_scheme "official") so minority accuracy is measured on 200 men, not 4.
- model.stage_sizes = (1, 1, 1), width 8 (about 20k parameters): a three-stage member of the ResNet family
  (BasicBlocks, GroupNorm); the paper's ResNet18 is stage_sizes (2, 2, 2, 2), width 64 (11M). DP-SGD's noise
  norm grows with sqrt(#parameters) while the clipped signal does not, so at this data size a small model is
  what lets the DP runs learn at all (width 16 / four stages: high-privacy runs stayed at chance).
- Poisson batch 256 (q = 0.16), clip 1, Adam lr 5e-3, 16 epochs (100 steps) instead of batch 32, clip 5,
  lr 5e-5, 60 epochs: the larger batch shrinks the noise z*C/B relative to the mean clipped gradient. The
  noise multipliers are the paper's (1.5 / 0.7 / 0.5), but with q = 0.16 the epsilons are larger than the
  paper's: 6.5 / 25 / 51 (PLD, delta 1e-6). Non-DP runs use the same settings without clipping or noise.
- clipping_strategy "bookkeeping" (same clipped sums as "vmap", fewer passes).

Measured (python launch/sweep.py --config configs/demo.py, 2026-11-29, 2 shared CPU cores at load 2-6):
7 min 03 s wall, 392 s user + 90 s system CPU, with the generated files already cached; generating them adds
about 1-1.5 min on the first run. On an idle 2-core machine expect roughly 5 min (an estimate from CPU time).
Test accuracy, female / male (%, 200 test images each, +-7 pp), female fraction 0.7 -> 0.9 -> 0.99:

    high   (eps 6.5)  F 67.0 / 69.0 / 71.0    M 57.5 / 54.5 / 53.5
    medium (eps 25)   F 80.0 / 80.0 / 87.0    M 62.5 / 55.5 / 59.0
    low    (eps 51)   F 87.0 / 89.5 / 89.5    M 62.0 / 56.0 / 55.5
    non-DP            F 93.5 / 96.5 / 94.5    M 61.5 / 55.5 / 57.0

What this shows, read honestly: DP costs accuracy, most for the stronger privacy (overall 62 / 68-73 / 72-75 /
76-78 for high / medium / low / non-DP), and as the data gets more imbalanced women gain while men lose
(every level's male accuracy is lower at 0.99 than at 0.7). The male drops (2-7 pp) are within one seed's
+-7 pp interval, and at this size non-DP men are no better than DP men, so the demo does not show the paper's
"DP hurts the minority more" gap; run the paper's configs (configs/*.py, real CelebA, ResNet18) for that.

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
    c.model.stage_sizes = (1, 1, 1)
    c.model.width = 8
    c.model.num_groups = 8
    c.optim.learning_rate = 5e-3
    c.train.epochs = 16  # 100 steps of expected batch 256
    c.train.batch_size = 256
    c.train.eval_every_steps = 50
    c.train.checkpoint_every_steps = 100
    c.dp.l2_clip_norm = 1.0
    c.dp.clipping_strategy = "bookkeeping"  # same clipped sums as "vmap", faster on CPU (jaxdp/fastclip.py)
    c.sweep.imbalance = grid({
        "privacy": ("high", "medium", "low", "nondp"),
        "data.female_fraction": (0.7, 0.9, 0.99),
    })
    return c
