"""The configuration schema of a jaxdp training run, and its validation.

Every experiment file in ``configs/`` starts from :func:`base_config` and overrides what it changes, so a
reader sees one schema. A *run* config has no ``sweep`` entries left; ``launch/sweep.py`` expands a sweep
config into run configs by setting the dotted keys listed in ``config.sweep``.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The paper's setting (Farrand et al. 2020) as the defaults: medium privacy, 70% female."""
    c = ml_collections.ConfigDict()
    c.name = "base"

    c.data = ml_collections.ConfigDict()
    c.data.source = "celeba"  # "celeba" (the five files placed locally) | "synthetic" (generated)
    c.data.female_fraction = 0.7
    c.data.total = 30_000
    c.data.split_scheme = "paper"  # "paper" | "official"
    c.data.test_fraction = 0.2
    c.data.image_size = 128
    c.data.seed = 0
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.synthetic_num_images = 4_000  # used when source == "synthetic"

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.stage_sizes = (2, 2, 2, 2)  # ResNet18; smaller family members shrink this
    c.model.width = 64  # channels of the first stage; doubled at each later stage
    c.model.norm = "group"  # "group" | "batch" (refused under DP) | "none"
    c.model.num_groups = 32
    c.model.num_classes = 2
    c.model.pretrained_path = ml_collections.FieldReference(None, field_type=str)

    c.dp = ml_collections.ConfigDict()
    c.dp.enabled = True
    c.dp.privacy_level = "medium"  # label only: "high" | "medium" | "low" | "nondp" | free text
    c.dp.noise_multiplier = 0.7
    c.dp.l2_clip_norm = 5.0
    c.dp.delta = 1e-6
    c.dp.sampling = "poisson"  # "poisson" (what the accountants assume) | "fixed" (paper's shuffled batches)
    c.dp.accountant = "pld"  # the accountant shown in progress and used for calibration
    c.dp.clipping_strategy = "vmap"
    c.dp.microbatch_size = ml_collections.FieldReference(None, field_type=int)
    c.dp.target_epsilon = ml_collections.FieldReference(None, field_type=float)  # set: calibrate noise

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # any optax optimiser name taking learning_rate
    c.optim.learning_rate = 5e-5
    c.optim.weight_decay = 5e-4  # coupled L2 as torch.optim.Adam(weight_decay=...) in the paper

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # expected batch size under Poisson sampling
    c.train.epochs = 60
    c.train.seed = 0
    c.train.random_flip = True
    c.train.eval_every_steps = 750
    c.train.checkpoint_every_steps = 750
    c.train.eval_batch_size = 256
    c.train.progress = True

    # Sweep axes: dotted config key -> list of values; the runs are their Cartesian product.
    c.sweep = ml_collections.ConfigDict()
    return c
