"""The configuration schema of a jaxdp training run, and its validation.

Every experiment file in ``configs/`` starts from :func:`base_config` and overrides what it changes, so a
reader sees one schema. A *run* config has no ``sweep`` entries left; ``launch/sweep.py`` expands a sweep
config into run configs by setting the dotted keys listed in ``config.sweep``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxdp import methods, noise
from jaxdp.accounting import ACCOUNTANTS, SAMPLING_SCHEMES
from jaxdp.data import available_sources

# Keys that do not change what a run computes (only how it is run or shown): a run directory may be resumed, and
# a sweep's stored run reused, with other values of these. Every other key is part of the run's identity.
RESULT_NEUTRAL_KEYS = frozenset({
    "train.progress",  # printing only
    "train.keep_checkpoints",  # what is kept once the run has finished
    "train.num_devices",  # data parallelism: the same sums, up to float summation order
    "train.eval_batch_size",  # evaluation padding: examples are evaluated independently
    "train.num_chunk_widths",  # training padding: the same batches and sums, up to float summation order
})


def base_config() -> ml_collections.ConfigDict:
    """The paper's setting (Farrand et al. 2020) as the defaults: medium privacy, 70% female."""
    c = ml_collections.ConfigDict()
    c.name = "base"

    c.data = _data_section()
    c.model = _model_section()
    c.dp = _dp_section()
    c.optim = _optim_section()
    c.train = _train_section()
    c.audit = _audit_section()
    # Sweep axes: dotted config key -> list of values; the runs are their Cartesian product.
    c.sweep = ml_collections.ConfigDict()
    return c


def _data_section() -> ml_collections.ConfigDict:
    """``config.data``: which examples, from which source (:mod:`jaxdp.data`)."""
    data = ml_collections.ConfigDict()
    # A registered source: "celeba" (the five files placed locally) | "synthetic" (generated CelebA-format images) |
    # "adult" (UCI Adult's adult.data and adult.test placed locally) | "adult_synthetic" (generated Adult-format rows).
    data.source = "celeba"
    data.label_attribute = "Smiling"  # the CelebA attribute to predict; "income" (> 50K) for Adult
    # The attribute that defines the groups: a CelebA attribute (group 1 has it), or for Adult "sex" (group 0:
    # female) or "race" (group 0: non-white).
    data.group_attribute = "Male"
    data.female_fraction = 0.7  # fraction of group 0 (without the group attribute: women for Male and for sex)
    data.total = 30_000
    data.split_scheme = "paper"  # "paper" | "official"
    data.test_fraction = 0.2
    data.image_size = 128
    data.seed = 0
    data.data_dir = ml_collections.FieldReference(None, field_type=str)
    data.manual_dir = ml_collections.FieldReference(None, field_type=str)
    data.synthetic_num_images = 4_000  # images (source "synthetic") or rows (source "adult_synthetic") generated
    data.synthetic_seed = 0  # seed of the generated images (data.seed picks the subset)
    return data


def _model_section() -> ml_collections.ConfigDict:
    """``config.model``: the network (:mod:`jaxdp.models`)."""
    model = ml_collections.ConfigDict()
    model.name = "resnet18"  # "resnet18" (its family: stage_sizes, width, norm) | "mlp" (hidden_sizes, activation)
    model.stage_sizes = (2, 2, 2, 2)  # ResNet18; smaller family members shrink this
    model.width = 64  # channels of the first stage; doubled at each later stage
    model.norm = "group"  # "group" | "batch" (refused under DP) | "none"
    model.num_groups = 32
    model.num_classes = 2
    model.hidden_sizes = (256, 256)  # the MLP's hidden layers (fair-dp's Adult network: 256-256, tanh)
    model.activation = "tanh"  # the MLP's activation: jaxdp.models.mlp.ACTIVATIONS
    model.pretrained_path = ml_collections.FieldReference(None, field_type=str)
    return model


def _dp_section() -> ml_collections.ConfigDict:
    """``config.dp``: the privacy mechanism, its accounting and the DP-SGD variant."""
    dp = ml_collections.ConfigDict()
    dp.enabled = True
    dp.privacy_level = "medium"  # label only: "high" | "medium" | "low" | "nondp" | free text
    dp.noise_multiplier = 0.7
    dp.l2_clip_norm = 5.0
    dp.delta = 1e-6
    dp.sampling = "poisson"  # "poisson" (what the accountants assume) | "fixed" (paper's shuffled batches)
    dp.accountant = "pld"  # the accountant shown in progress and used for calibration
    # "auto": the fastest exact strategy for the model (jaxdp.clipping.auto; final.json records the pick), or
    # one of jaxdp.clipping.available_strategies(): "vmap" (the reference), "vmap_matmul", "bookkeeping".
    dp.clipping_strategy = "auto"
    dp.microbatch_size = ml_collections.FieldReference(None, field_type=int)
    dp.target_epsilon = ml_collections.FieldReference(None, field_type=float)  # set: calibrate noise
    # False (default): batch sampling and noise come from a secret 128-bit seed drawn from the OS when the run
    # starts and kept only in its checkpoints. True: they come from train.seed, so anyone who knows the config
    # can replay them and the reported epsilon is no guarantee against them (tests, exact replication).
    dp.reproducible = False
    # True: each noise value is the sum of four independent tail-correct normals, halved (as Opacus's secure mode),
    # against floating-point attacks on one Gaussian sample (jaxdp.noise.dp_noise says what it does not cover).
    dp.secure_noise = False
    # How the noise is drawn (jaxdp.noise.MECHANISMS): "lattice" quantises the clipped sum to a fixed lattice and adds
    # integer noise (jaxdp.lattice: no floating-point holes in the output's support, for a sensitivity 2^-10 larger);
    # "gaussian": float32 tail-correct Gaussian noise added to the float sum (the output's support has holes where
    # float rounding depends on the sum; see docs/threat-model.md).
    dp.noise_mechanism = "lattice"
    # The DP-SGD variant (jaxdp.methods): "dpsgd" (plain), "dpsgd_f" (Xu et al. 2021: per-group bounds from noisy
    # clip counts), "dpsgd_global" (Bu et al. 2021: norms <= Z scaled by C/Z, the rest dropped), "dpsgd_global_adapt"
    # (Esipova et al. 2023: the rest clipped to C, Z adapted from a noisy count). Each method's parameters are in
    # the section of its name; None means the reference value (jaxdp.methods.PARAMETERS), written into the run's
    # config.json. Setting a parameter of another method than the chosen one is refused.
    dp.method = "dpsgd"
    dp.dpsgd_f = _method_section("dpsgd_f")
    dp.dpsgd_global = _method_section("dpsgd_global")
    dp.dpsgd_global_adapt = _method_section("dpsgd_global_adapt")
    return dp


def _optim_section() -> ml_collections.ConfigDict:
    """``config.optim``: the optax optimiser."""
    optim = ml_collections.ConfigDict()
    optim.name = "adam"  # any optax optimiser name taking learning_rate
    optim.learning_rate = 5e-5
    optim.weight_decay = 5e-4  # coupled L2 as torch.optim.Adam(weight_decay=...) in the paper
    return optim


def _train_section() -> ml_collections.ConfigDict:
    """``config.train``: the training loop, its batches, checkpoints and diagnostics."""
    train = ml_collections.ConfigDict()
    train.batch_size = 32  # expected batch size under Poisson sampling
    train.epochs = 60.0
    train.seed = 0
    train.random_flip = True
    train.eval_every_steps = 750
    train.checkpoint_every_steps = 750
    train.eval_batch_size = 256
    train.progress = True
    train.num_devices = ml_collections.FieldReference(None, field_type=int)  # None: all devices
    # Poisson batches are padded to a chunk width (jaxdp.sampling.chunk_widths). 1: one width, one compiled step.
    # 2: a narrower width too, for the batches it holds: about 7% (demo) to 18% (paper) less padded compute per
    # step, for one more compiled step (seconds on a CPU): worth it in runs of more than a few hundred steps.
    train.num_chunk_widths = 1
    # Statistics of the training data computed without noise (training loss, per-group clipping counts and
    # norms): written with keys starting "nonprivate_". Not covered by epsilon; False for a model to release.
    train.nonprivate_diagnostics = True
    # Checkpoints hold the run's secret (its seed, and the noise key in the optimiser state): whoever reads them can
    # replay the run and undo its privacy. False (default): deleted once the run has finished and written its
    # publishable model (params.msgpack, model.json). True: kept (to extend or inspect the run), with a warning.
    train.keep_checkpoints = False
    # Gradient misalignment (a non-private diagnostic of private runs, jaxdp.train.misalignment_cosines), once per
    # evaluation window: each group's mean unclipped gradient over a fixed sample of this many of its training
    # examples (drawn from train.seed) against the step's unclipped, clipped and noised batch gradient. 0: off.
    train.misalignment_examples_per_group = 256
    return train


def _audit_section() -> ml_collections.ConfigDict:
    """``config.audit``: the privacy audit at the end of training (:mod:`jaxdp.audit`)."""
    # Privacy audit at the end of training (jaxdp.audit): membership inference per group (members: a random subset
    # of the group's training examples; non-members: as many held-out examples of the group, never trained on) and
    # the one-run audit (canaries from the held-out examples, each included in training by a secret fair coin).
    # Its results are statistics of the training data computed without noise (final.json's audit.nonprivate).
    audit = ml_collections.ConfigDict()
    audit.enabled = False
    audit.mia_examples_per_group = 500  # members and, as many, non-members per group (0: no membership inference)
    audit.canaries_per_group = 500  # one-run audit canaries per group (0: no one-run audit)
    # "flipped": canaries carry the opposite label (mislabelled examples, which a model that memorises shows most
    # clearly: the usual choice of audits); "true": their own label (natural examples, a weaker audit).
    audit.canary_labels = "flipped"
    audit.num_guess_in = ml_collections.FieldReference(None, field_type=int)  # k+ per group; None: 5% of canaries
    audit.num_guess_out = ml_collections.FieldReference(None, field_type=int)  # k- per group; None: 5%
    audit.confidence = 0.95
    return audit


def _method_section(method: str) -> ml_collections.ConfigDict:
    """``config.dp.<method>``: each parameter of the method, None (its reference value) by default."""
    return ml_collections.ConfigDict({key: ml_collections.FieldReference(None, field_type=float)
                                      for key in methods.PARAMETERS[method]})


def resolve(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run config as a dict with every value a run fills in from a default: the chosen method's parameters
    (:func:`jaxdp.methods.resolved_parameters`). What a run writes as ``config.json`` (with, in addition, a
    calibrated noise multiplier)."""
    out = config.to_dict()
    method = str(config.dp.get("method", "dpsgd"))
    if method in methods.PARAMETERS and methods.PARAMETERS[method]:
        out["dp"][method] = methods.resolved_parameters(config.dp)
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"dotted.key": value}`` of a (nested) config or dict; tuples and lists are leaves."""
    if isinstance(node, ml_collections.ConfigDict):
        node = node.to_dict()
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def differing_keys(old: Any, new: Any) -> list[str]:
    """``"key: stored X != new Y"`` for every dotted key whose value differs, ignoring RESULT_NEUTRAL_KEYS.

    ``old`` / ``new``: configs or their dicts (e.g. a stored ``config.json``); tuples and lists compare equal.
    """
    def norm(v: Any) -> Any:
        return [norm(x) for x in v] if isinstance(v, list | tuple) else v

    a, b = flatten(old), flatten(new)
    keys = sorted((set(a) | set(b)) - RESULT_NEUTRAL_KEYS)
    missing = "<absent>"
    return [f"{k}: stored {a.get(k, missing)!r} != new {b.get(k, missing)!r}"
            for k in keys if norm(a.get(k, missing)) != norm(b.get(k, missing))]


def _choices(names: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_run_config(config: ml_collections.ConfigDict) -> None:
    """Checks the values a run depends on before any work starts; errors name the value and the allowed range.

    Data-specific checks (pool sizes, files) happen in :mod:`jaxdp.data`; accounting arguments in
    :mod:`jaxdp.accounting`; the model refuses BatchNorm under DP in :func:`jaxdp.models.create_model`.
    """
    d, m, p, o, t = config.data, config.model, config.dp, config.optim, config.train
    _require(d.source in available_sources(),
             f"config.data.source={d.source!r}; choose one of {', '.join(map(repr, available_sources()))}.")
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
    _require(isinstance(p.reproducible, bool), f"config.dp.reproducible={p.reproducible!r} must be True or False.")
    _require(isinstance(p.secure_noise, bool), f"config.dp.secure_noise={p.secure_noise!r} must be True or False.")
    _require(p.get("noise_mechanism", "gaussian") in noise.MECHANISMS,
             f"config.dp.noise_mechanism={p.get('noise_mechanism')!r}; choose {_choices(noise.MECHANISMS)}.")
    _require(not (p.secure_noise and p.get("noise_mechanism") == "lattice"),
             "config.dp.secure_noise=True draws float Gaussian noise; with config.dp.noise_mechanism='lattice' the "
             "noise is integer (exact alias tables, no float sampling to attack): set one of them.")
    _require(isinstance(t.get("keep_checkpoints", False), bool),
             f"config.train.keep_checkpoints={t.get('keep_checkpoints')!r} must be True or False.")
    _require(isinstance(t.nonprivate_diagnostics, bool),
             f"config.train.nonprivate_diagnostics={t.nonprivate_diagnostics!r} must be True or False.")
    _require(isinstance(t.misalignment_examples_per_group, int) and t.misalignment_examples_per_group >= 0,
             f"config.train.misalignment_examples_per_group={t.misalignment_examples_per_group!r} must be an integer "
             ">= 0 (0 turns the misalignment diagnostic off).")
    from jaxdp.clipping import available_strategies

    _require(p.clipping_strategy in available_strategies(),
             f"config.dp.clipping_strategy={p.clipping_strategy!r}; choose one of "
             f"{', '.join(map(repr, available_strategies()))}.")
    method_errors = methods.check_config(p)
    _require(not method_errors, " ".join(method_errors))
    if p.enabled:
        _require(
            p.target_epsilon is not None or float(p.noise_multiplier) > 0.0,
            f"config.dp.noise_multiplier={p.noise_multiplier} must be > 0 under DP (noise 0 has no finite epsilon);"
            " for non-private training set config.dp.enabled=False.",
        )
        _require(float(p.l2_clip_norm) > 0.0, f"config.dp.l2_clip_norm={p.l2_clip_norm} must be > 0.")
        _require(0.0 < float(p.delta) < 1.0, f"config.dp.delta={p.delta} must be in (0, 1).")
        _require(p.sampling in SAMPLING_SCHEMES,
                 f"config.dp.sampling={p.sampling!r}; choose {_choices(SAMPLING_SCHEMES)}.")
        _require(p.accountant in ACCOUNTANTS,
                 f"config.dp.accountant={p.accountant!r}; choose {_choices(ACCOUNTANTS)}.")
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
    _require(t.num_chunk_widths in (1, 2), f"config.train.num_chunk_widths={t.num_chunk_widths!r} must be 1 or 2.")
    _validate_audit(config)
    from jaxdp import checks  # values that would otherwise fail only inside a run

    checks.check_epochs(config)
    checks.check_optimizer(config)
    checks.check_microbatch_size(config)


def _validate_audit(config: ml_collections.ConfigDict) -> None:
    a = config.audit
    _require(isinstance(a.enabled, bool), f"config.audit.enabled={a.enabled!r} must be True or False.")
    if not a.enabled:
        return
    for key in ("mia_examples_per_group", "canaries_per_group"):
        value = a[key]
        _require(isinstance(value, int) and value >= 0, f"config.audit.{key}={value!r} must be an integer >= 0.")
    _require(a.mia_examples_per_group > 0 or a.canaries_per_group > 0,
             "config.audit.enabled=True audits nothing with mia_examples_per_group=0 and canaries_per_group=0.")
    for key in ("num_guess_in", "num_guess_out"):
        value = a[key]
        _require(value is None or 0 <= int(value) <= a.canaries_per_group,
                 f"config.audit.{key}={value!r} must be None or in [0, config.audit.canaries_per_group="
                 f"{a.canaries_per_group}].")
    _require(0.0 < float(a.confidence) < 1.0, f"config.audit.confidence={a.confidence} must be in (0, 1).")
    _require(a.canary_labels in ("flipped", "true"),
             f"config.audit.canary_labels={a.canary_labels!r}; choose 'flipped' or 'true'.")
    _require(
        config.dp.sampling == "poisson",
        f"config.audit needs config.dp.sampling='poisson' (got {config.dp.sampling!r}): under fixed-size batches a "
        "canary left out must be replaced by another example for the audit to match the reported epsilon.",
    )
    _require(
        bool(config.train.nonprivate_diagnostics),
        "config.audit.enabled=True with config.train.nonprivate_diagnostics=False: the audit's results are "
        "statistics of the training data computed without noise; allow non-private diagnostics for an audited run.",
    )
