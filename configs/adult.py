"""The paper's study on real people: UCI Adult (census income > 50K), women as the group made rarer, on a CPU.

Farrand et al. ask whether DP-SGD costs a minority more accuracy as it gets rarer, and more than non-private
training does. Here the minority is women (group 0, ``female_fraction``) in UCI Adult (jaxdp.data.adult: UCI's
two files pooled, rows with a missing value dropped, 99 features, label income > 50K): the paper's three privacy
levels and non-private training x the female fraction of the training set x 3 seeds = 60 runs.

- Data: 24,000 training rows at each female fraction (natural 32.5%, then 20, 10, 5, 1%: 7,800 down to 240
  women) and one test set of 6,000 rows with Adult's natural composition (1,950 women, 4,050 men; each group at
  its natural income rate), the same at every fraction of a seed; ``--seeds``-style replicates come from the
  ``seed`` axis (data.seed and train.seed: other rows, other training randomness). The numerical features are
  standardised with the test set's statistics, not the training rows' (jaxdp.data.adult says why).
- Model: fair-dp's Adult network, an MLP 99-256-256-2 with tanh (91,906 parameters), all Dense layers:
  clipping_strategy "auto" runs "bookkeeping".
- Privacy levels by their epsilon: the noise of each level is calibrated (dp.target_epsilon, PLD, delta 1e-6) to
  the paper's 1.15 / 4.98 / 16.2 on these 24,000 rows, q and steps (the paper's z = 1.5 / 0.7 / 0.5 would mean
  other epsilons here). Poisson sampling, clip C = 0.5 (fair-dp's).
- Training: TRAINING below (batch, epochs, optimiser) is what fits 60 runs in 10 minutes on 2 CPU cores; the
  measured time and the load it was measured under are in docs/adult.md.

The mitigations (DPSGD-F, DPSGD-Global, DPSGD-Global-Adapt) on the same data: configs/adult_mitigations.py.
Run it with (the folder holding adult.data and adult.test; https://archive.ics.uci.edu/dataset/2/adult)::

    python launch/sweep.py --config configs/adult.py --config.data.manual_dir=PATH    # results/adult/
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid
from jaxdp_study.paper import PAPER_EPSILONS

# The natural female fraction (14,695 of Adult's 45,222 complete rows), then ever rarer women.
FEMALE_FRACTIONS = (0.325, 0.2, 0.1, 0.05, 0.01)
SEEDS = (0, 1, 2)


def adult_base():
    """The Adult data and fair-dp's network on jaxdp's defaults (shared with configs/adult_mitigations.py)."""
    c = base_config()
    c.data.source = "adult"
    c.data.label_attribute = "income"
    c.data.group_attribute = "sex"
    c.data.total = 30_000  # 24,000 train + 6,000 test
    c.data.test_fraction = 0.2
    c.model.name = "mlp"
    c.model.hidden_sizes = (256, 256)
    c.model.activation = "tanh"
    c.dp.l2_clip_norm = 0.5
    c.dp.clipping_strategy = "auto"  # "bookkeeping" on the MLP (final.json says so)
    c.train.random_flip = False  # images only; said here so the config reads true
    return c


def get_config():
    c = adult_base()
    c.name = "adult"
    c.optim.name = "adam"
    c.optim.learning_rate = 2e-3
    c.optim.weight_decay = 0.0
    c.train.batch_size = 512
    c.train.epochs = 5
    c.train.eval_every_steps = 10**9  # one evaluation, at the end: every run's time goes into training
    c.train.checkpoint_every_steps = 10**9  # one checkpoint, at the end
    for level, epsilon in PAPER_EPSILONS.items():
        c.sweep[level] = grid({"privacy": (level,), "dp.target_epsilon": (epsilon,),
                               "data.female_fraction": FEMALE_FRACTIONS, "seed": SEEDS})
    c.sweep.nondp = grid({"privacy": ("nondp",), "data.female_fraction": FEMALE_FRACTIONS, "seed": SEEDS})
    return c
