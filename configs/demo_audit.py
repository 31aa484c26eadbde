"""The privacy audit at demo scale: how much each group's training data leaks, per privacy level and imbalance.

The demo's model, data generator and training settings (configs/demo.py) with the audit on (jaxdp.audit, run at the
end of every run): membership inference per group — 250 members (training examples) against 250 non-members
(held-out examples of the same group, never trained on), loss-threshold attack and its calibration by the initial
model — and the one-run audit (Steinke et al. 2023) with 100 canaries per group from the held-out examples, each
in training by a secret fair coin; its 95% lower bound on epsilon must stay below the reported epsilon.

What differs from the demo, and why:
- 6,400 images (6,000 training) and female fractions 70% and 95%: held-out examples must be left over in the
  30,000-image pool for every group, and 250 members of each group must exist in training (at 95% female there
  are 300 men; at 99% there would be 60).
- 8 epochs (188 steps) instead of 3: membership inference needs something to infer, and non-private training
  memorises more the longer it runs.
- The canaries that come up "in" join training (about 50 per group: the minority at 95% gets about 350 examples
  instead of 300); q, the step count and epsilon are those of the 6,000 training images alone.

Run it with::

    python launch/sweep.py --config configs/demo_audit.py        # results/demo_audit/: audit.md, figures/fig7_*
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "demo_audit"
    c.data.source = "synthetic"
    c.data.image_size = 32
    c.data.total = 6_400
    c.data.test_fraction = 1 / 16
    c.data.split_scheme = "official"
    c.data.synthetic_num_images = 30_000  # the demo's pool: generated once for both
    c.model.stage_sizes = (1, 1, 1)
    c.model.width = 8
    c.model.num_groups = 8
    c.optim.learning_rate = 5e-3
    c.train.epochs = 8  # 188 steps of expected batch 256
    c.train.batch_size = 256
    c.train.eval_every_steps = 50
    c.train.checkpoint_every_steps = 50
    c.dp.l2_clip_norm = 1.0
    c.dp.clipping_strategy = "bookkeeping"
    c.audit.enabled = True
    c.audit.mia_examples_per_group = 250
    c.audit.canaries_per_group = 100
    c.sweep.imbalance = grid({
        "privacy": ("high", "medium", "low", "nondp"),
        "data.female_fraction": (0.7, 0.95),
    })
    return c
