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
    c.data.synthetic_seed = 0  # seed of the generated images (data.seed picks the subset)

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
    c.train.epochs = 60.0
    c.train.seed = 0
    c.train.random_flip = True
    c.train.eval_every_steps = 750
    c.train.checkpoint_every_steps = 750
    c.train.eval_batch_size = 256
    c.train.progress = True
    c.train.num_devices = ml_collections.FieldReference(None, field_type=int)  # None: all devices

    # Sweep axes: dotted config key -> list of values; the runs are their Cartesian product.
    c.sweep = ml_collections.ConfigDict()
    return c


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_run_config(config: ml_collections.ConfigDict) -> None:
    """Checks the values a run depends on before any work starts; errors name the value and the allowed range.

    Data-specific checks (pool sizes, files) happen in :mod:`jaxdp.data`; accounting arguments in
    :mod:`jaxdp.accounting`; the model refuses BatchNorm under DP in :func:`jaxdp.models.create_model`.
    """
    d, m, p, o, t = config.data, config.model, config.dp, config.optim, config.train
    _require(d.source in ("celeba", "synthetic"), f"config.data.source={d.source!r}; choose 'celeba' or 'synthetic'.")
    _require(
        0.0 < float(d.female_fraction) < 1.0, f"config.data.female_fraction={d.female_fraction} must be in (0, 1)."
    )
    _require(
        d.split_scheme in ("paper", "official"),
        f"config.data.split_scheme={d.split_scheme!r}; choose 'paper' or 'official'.",
    )
    _require(0.0 < float(d.test_fraction) < 1.0, f"config.data.test_fraction={d.test_fraction} must be in (0, 1).")
    _require(int(d.image_size) >= 16, f"config.data.image_size={d.image_size} must be >= 16 (the paper uses 128).")
    _require(int(d.total) >= 2, f"config.data.total={d.total} must be >= 2.")
    _require(int(m.num_classes) >= 2, f"config.model.num_classes={m.num_classes} must be >= 2.")
    _require(isinstance(p.enabled, bool), f"config.dp.enabled={p.enabled!r} must be True or False.")
    if p.enabled:
        _require(float(p.noise_multiplier) >= 0.0, f"config.dp.noise_multiplier={p.noise_multiplier} must be >= 0.")
        _require(float(p.l2_clip_norm) > 0.0, f"config.dp.l2_clip_norm={p.l2_clip_norm} must be > 0.")
        _require(0.0 < float(p.delta) < 1.0, f"config.dp.delta={p.delta} must be in (0, 1).")
        _require(p.sampling in ("poisson", "fixed"), f"config.dp.sampling={p.sampling!r}; choose 'poisson' or 'fixed'.")
        _require(
            p.accountant in ("pld", "rdp", "rdp_classic"),
            f"config.dp.accountant={p.accountant!r}; choose 'pld', 'rdp' or 'rdp_classic'.",
        )
        _require(
            not (p.sampling == "fixed" and p.accountant == "pld"),
            "config.dp.accountant='pld' cannot count config.dp.sampling='fixed' (dp-accounting's PLD accountant has "
            "no event for sampling without replacement); set config.dp.accountant='rdp' (or 'rdp_classic').",
        )
        if p.target_epsilon is not None:
            _require(float(p.target_epsilon) > 0.0, f"config.dp.target_epsilon={p.target_epsilon} must be > 0.")
    _require(float(o.learning_rate) > 0.0, f"config.optim.learning_rate={o.learning_rate} must be > 0.")
    _require(float(o.weight_decay) >= 0.0, f"config.optim.weight_decay={o.weight_decay} must be >= 0.")
    _require(int(t.batch_size) >= 1, f"config.train.batch_size={t.batch_size} must be >= 1.")
    _require(float(t.epochs) > 0.0, f"config.train.epochs={t.epochs} must be > 0.")
    _require(int(t.eval_every_steps) >= 1, f"config.train.eval_every_steps={t.eval_every_steps} must be >= 1.")
    _require(
        int(t.checkpoint_every_steps) >= 1,
        f"config.train.checkpoint_every_steps={t.checkpoint_every_steps} must be >= 1.",
    )
    _require(int(t.eval_batch_size) >= 1, f"config.train.eval_batch_size={t.eval_batch_size} must be >= 1.")
