"""The demo: the paper's study shrunk to about ten minutes on 2 CPU cores, on generated CelebA-format data.

Every privacy level (high / medium / low / non-DP) x three female fractions (70%, 90%, 99%) = 12 runs. What is
smaller than the paper, and why:
- data.source = "synthetic": CelebA-format images generated on the first run (no download); switch to real
  CelebA with --config.data.source=celeba (same code path).
- 32x32 images and a 2,400-image subset: 1,600 training images at the set female fraction (480 / 160 / 16
  men at 70 / 90 / 99% female), so a DP epoch takes seconds on a CPU, and a balanced 800-image test set
  (split_scheme "official", test_fraction 1/3) from the test partition of 8,000 generated images, so that
  minority accuracy is measured on 400 men at every level (95% intervals of about +-4 pp), not on 16.
- model.stage_sizes = (1, 1, 1), width 8 (about 20k parameters): a three-stage member of the ResNet family
  (BasicBlocks, GroupNorm); the paper's ResNet18 is stage_sizes (2, 2, 2, 2), width 64 (11M). DP-SGD's noise
  norm grows with sqrt(#parameters) while the clipped signal does not, so at this data size a small model is
  what lets the DP runs learn at all (width 16 / four stages: high-privacy runs stayed at chance).
- Poisson batch 256 (q = 0.16), clip 1, Adam lr 5e-3, 16 epochs (96 steps) instead of batch 32, clip 5,
  lr 5e-5, 60 epochs: the larger batch shrinks the noise z*C/B relative to the mean clipped gradient. The
  noise multipliers are the paper's (1.5 / 0.7 / 0.5), but with q = 0.16 the epsilons are larger than the
  paper's: 6.5 / 25 / 51 (PLD, delta 1e-6). Non-DP runs use the same settings without clipping or noise.
- clipping_strategy "bookkeeping" (same clipped sums as "vmap", fewer passes).

Measured 2026-11-29 from an empty workdir and data directory (python launch/sweep.py --config
configs/demo.py --workdir /tmp/demo_full --config.data.data_dir=/tmp/demo_full_data; the package was already
installed), while another job kept the 2-core machine at load 3-3.5: 7 min 46 s wall (generating and preparing
the 8,000 images and compiling included; the first run took 2 min 50 s of it), 8 min 43 s user + 1 min 03 s
system CPU. A second run from scratch at load 3.5-3.8 gave the same numbers in every column of summary.csv (10 min
14 s wall, 9 min 15 s user + 1 min 02 s system); a quiet machine was not available to time it. Test accuracy
(%, 400 test images per gender, 95% Wilson intervals about +-3 (women) and +-4 (men)), female fraction 0.7 ->
0.9 -> 0.99:

    high   (eps 6.5)  F 86.3 / 88.0 / 86.8    M 73.0 / 68.5 / 69.8    gap F-M 13.3 / 19.5 / 17.0
    medium (eps 25)   F 90.0 / 90.8 / 91.3    M 79.5 / 75.8 / 75.0    gap     10.5 / 15.0 / 16.3
    low    (eps 51)   F 92.0 / 92.3 / 92.0    M 82.3 / 77.0 / 76.5    gap      9.8 / 15.3 / 15.5
    non-DP            F 92.8 / 95.3 / 94.8    M 83.0 / 79.3 / 75.3    gap      9.8 / 16.0 / 19.5

What this shows, read honestly: DP costs accuracy, more at stronger privacy, and the cost falls mostly on the
minority (at 70% female, high privacy loses 6.5 pp for women and 10 for men against non-DP); men are served worse
than women at every level, and male accuracy falls as the data gets more imbalanced at every level (non-DP by 7.8
pp, 83.0 [79.0, 86.4] -> 75.3 [70.8, 79.2], intervals just apart; DP by 3-6 pp, intervals overlapping), so the
female-minus-male gap grows with imbalance everywhere. It does NOT show the paper's central claim: here men lose
at least as much to imbalance without DP as with it (paper: non-DP 87.7 -> 83.6, medium DP 78.6 -> 70.9). Three
seeds (--seeds 0,1,2; imbalance_drop.md), male points lost from 70% to 99% female, mean +- SD: non-DP 6.3 +- 1.3,
high 2.8 +- 2.9, medium 1.9 +- 2.3, low 6.0 +- 1.9; DP minus non-DP, paired by seed: high -3.4 +- 2.8, medium -4.3
+- 1.0, low -0.3 +- 2.2. Scratch runs of the same generator on 4,000 images (200 test men), two seeds each, showed
the same pattern: from 70% to 99% female, non-DP men dropped 8 and 6 pp, medium-DP men 2 and 0.5, low-DP men 7.5
and 2. Neither the paper's batch 32 (800 steps) nor 4,800 training images changed that (README, "What the demo
shows"). Under DP, men's gradients are larger and clipped more often than women's (summary.csv,
figures/fig6_clipping_per_group.png), the paper's proposed mechanism; with 96 steps the DP runs barely learn
anything male-specific even from 480 men, so they have little to lose when men become rare. The paper's configs
(configs/*.py, real CelebA, ResNet18, 60 epochs), with several seeds, are what can test the claim.

Run it with::

    python launch/sweep.py --config configs/demo.py              # results and figures in results/demo/
    python launch/sweep.py --config configs/demo.py --seeds 0,1,2   # + two more replicates (about 10 more minutes)
"""

from jaxdp.config import base_config
from jaxdp.sweep import grid


def get_config():
    c = base_config()
    c.name = "demo"
    c.data.source = "synthetic"
    c.data.image_size = 32
    # 2,400 images: 1,600 train at the set female fraction and a balanced 800-image test set (400 men) from the
    # generator's test partition, so the minority's accuracy is measured to about +-4.5 pp at every imbalance.
    c.data.total = 2_400
    c.data.test_fraction = 1 / 3
    c.data.split_scheme = "official"
    c.data.synthetic_num_images = 8_000  # the smallest pool with 200 test images per gender x smiling cell
    c.model.stage_sizes = (1, 1, 1)
    c.model.width = 8
    c.model.num_groups = 8
    c.optim.learning_rate = 5e-3
    c.train.epochs = 16  # 96 steps of expected batch 256
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
