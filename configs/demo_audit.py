"""The privacy audit at demo scale: how much each group's training data leaks, per privacy level and imbalance.

The demo's model and data generator (configs/demo.py) with the audit on (jaxdp.audit, run at the end of every run):
membership inference per group — 100 members (training examples) against 100 non-members (held-out examples of the
same group, never trained on), loss-threshold attack and its calibration by the initial model — and the one-run audit
(Steinke et al. 2023) with 100 mislabelled canaries per group from the held-out examples, each in training by a secret
fair coin, 10 guessed "in" and 10 "out" per group; its 95% lower bound on epsilon must stay below the reported
epsilon, and can show up to 1.82 — above the high level's 1.15, so that level's audit could catch a broken mechanism.

What differs from the demo, and why:
- 2,250 training images (2,400 with the test set) for 30 epochs (264 steps of batch 256), at 70% and 90% female:
  membership inference needs something to infer, and a 20,650-parameter model memorises only when it sees each
  example many times (on 6,000 images for 8 epochs neither the members nor the mislabelled canaries of a
  non-private run were distinguishable from held-out examples).
- Privacy levels by their epsilon, not their noise multiplier: q = 256/2,250 over 264 steps would turn the paper's
  z = 1.5 / 0.7 / 0.5 into far larger epsilons than the paper's, so each level's noise is calibrated
  (dp.target_epsilon) to the paper's 1.15 / 4.98 / 16.2 (PLD, delta 1e-6).
- The canaries that come up "in" join training (about 50 per group); q, the step count and epsilon are those of the
  2,250 training images alone.

Run it with::

    python launch/sweep.py --config configs/demo_audit.py        # results/demo_audit/: audit.md, figures/fig7_*
"""

from pathlib import Path

from jaxdp_study.grid import grid, load_config
from jaxdp_study.paper import PAPER_EPSILONS

FEMALE_FRACTIONS = (0.7, 0.9)


def get_config():
    c = load_config(Path(__file__).with_name("demo.py"))  # the demo's data generator, model and training settings
    c.name = "demo_audit"
    c.data.total = 2_400
    c.train.epochs = 30  # 264 steps of expected batch 256
    c.train.eval_every_steps = 88
    c.train.checkpoint_every_steps = 88
    c.audit.enabled = True
    c.audit.mia_examples_per_group = 100
    c.audit.canaries_per_group = 100
    c.audit.num_guess_in = 10
    c.audit.num_guess_out = 10
    del c.sweep["imbalance"]
    for level, epsilon in PAPER_EPSILONS.items():
        c.sweep[level] = grid({"privacy": (level,), "dp.target_epsilon": (epsilon,),
                               "data.female_fraction": FEMALE_FRACTIONS})
    c.sweep.nondp = grid({"privacy": ("nondp",), "data.female_fraction": FEMALE_FRACTIONS})
    return c
