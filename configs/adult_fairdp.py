"""fair-dp's Adult experiment (Esipova et al. 2023, experiment_scripts/adult_script.sh) run by jaxdp, side by side.

Five methods x 5 seeds = 25 runs, with adult_script.sh's settings: non-private training, DP-SGD, DPSGD-F,
DPSGD-Global and DPSGD-Global-Adapt; plain SGD (no momentum, no weight decay), learning rate 0.01 (0.2 for the two
global methods), batch 256, 20 epochs, clip C = 0.5, noise multiplier z = 1, delta 1e-6; DPSGD-F's count noise
sigma1 = 10 (C0 = C); Global's Z = 50; Global-Adapt's Z0 = 50, eta_Z = 0.1, tau = 1, count noise 10. The network is
fair-dp's (MLP 99-256-256-2, tanh, PyTorch's default initialisation). The data: fair-dp keeps every woman and
about 48% of the men, then splits 80/20, which gives 23,484 training rows (half women) and a test set of 5,871 for
its seed 0; here the same sizes, exactly half women in training (data.female_fraction 0.5).

What jaxdp does differently on purpose (each keeps the reported epsilon true; docs/fairdp-comparison.md measures
what they change):

- Batches: Poisson sampling with q = 256 / 23,484 for every DP method, and the noised sum divided by the public
  expected batch size 256. fair-dp (Opacus 1.1) also samples by Poisson (q = 1/92) but divides by int(n q) = 255;
  the same 92 steps an epoch, 1,840 in all. Non-private runs take shuffled batches of exactly 256 here
  (dp.sampling "fixed"), as fair-dp's (whose last batch of an epoch is smaller).
- Accounting: each step's gradient and the method's count release on the same batch are composed as one event
  (jaxdp.methods); fair-dp's Opacus accountant records them as separate steps, and DPSGD-F counts (and accounts
  for) its counts twice per step. dp.accountant "rdp" is fair-dp's (RDP); final.json has PLD and classic RDP too.
- DPSGD-F: the gradient noise is z max_k C_k over the groups (fair-dp: over the batch's examples, a data-dependent
  scale), and a step clips with the bounds released at the step before (jaxdp.methods says why).
- Global-Adapt: Z's update divides the noisy count by the public expected batch size (fair-dp: by the realised,
  private batch size).
- Data: the test set has Adult's natural composition (1,908 women of 5,871; fair-dp's is about half women), so
  compare per-group accuracies (overall accuracy weighs the groups differently); the numerical features are
  standardised with the test set's statistics (fair-dp: all 45,222 rows', training rows included, without noise);
  the one-hot layout is adult.names' (99 features; fair-dp's 98 lack Never-worked, which no complete row has).

Run it with (the folder holding adult.data and adult.test; https://archive.ics.uci.edu/dataset/2/adult)::

    python launch/sweep.py --config configs/adult_fairdp.py --config.data.manual_dir=PATH    # results/adult_fairdp/
"""

from pathlib import Path

from jaxdp_study.grid import grid, load_config

SEEDS = (0, 1, 2, 3, 4)
# adult_script.sh's learning rates, and its Z / Z0 (50, where jaxdp.methods' reference is 100). Its other method
# parameters are jaxdp.methods.PARAMETERS' reference values, which every run's config.json writes out: DPSGD-F's
# sigma1 = 10 and C0 = C; Global-Adapt's eta_Z = 0.1, tau = 1 and count noise 10.
LEARNING_RATE, GLOBAL_LEARNING_RATE = 0.01, 0.2
THRESHOLD = 50.0


def get_config():
    c = load_config(Path(__file__).with_name("adult.py"))  # the Adult data and fair-dp's network
    c.name = "adult_fairdp"
    c.sweep = type(c.sweep)()
    c.data.total = 29_355  # fair-dp's seed 0: 23,484 training + 5,871 test rows
    c.data.test_fraction = 0.2
    c.data.female_fraction = 0.5
    c.optim.name = "sgd"
    c.optim.learning_rate = LEARNING_RATE
    c.optim.weight_decay = 0.0
    c.train.batch_size = 256
    c.train.epochs = 20  # 92 steps an epoch, 1,840 steps
    c.train.eval_every_steps = 92  # fair-dp evaluates on the test set after every epoch
    c.dp.privacy_level = "fairdp"
    c.dp.target_epsilon = None
    c.dp.noise_multiplier = 1.0
    c.dp.l2_clip_norm = 0.5
    c.dp.delta = 1e-6
    c.dp.accountant = "rdp"
    c.sweep.nondp = grid({"dp.enabled": (False,), "dp.sampling": ("fixed",), "seed": SEEDS})
    c.sweep.dpsgd = grid({"dp.method": ("dpsgd", "dpsgd_f"), "seed": SEEDS})
    c.sweep.dpsgd_global = grid({"dp.method": ("dpsgd_global",), "dp.dpsgd_global.threshold": (THRESHOLD,),
                                 "optim.learning_rate": (GLOBAL_LEARNING_RATE,), "seed": SEEDS})
    c.sweep.dpsgd_global_adapt = grid({"dp.method": ("dpsgd_global_adapt",),
                                       "dp.dpsgd_global_adapt.initial_threshold": (THRESHOLD,),
                                       "optim.learning_rate": (GLOBAL_LEARNING_RATE,), "seed": SEEDS})
    return c
