"""The study's training and evaluation steps: a Flax classifier on a config, through the public DP plan.

Everything :func:`jaxdp.train.train_and_evaluate` and the benchmark (``launch/bench.py``) compile comes from here,
so the benchmark times the very step that training runs:

* :func:`plan_from_config` — the run config's ``dp`` / ``train`` / ``optim`` sections as a :class:`jaxdp.DPConfig`,
  an :class:`jaxdp.ExecutionConfig` and an optax optimiser, and the classifier's loss, handed to
  :func:`jaxdp.make_plan`;
* :func:`train_step` — one chunk of a training step as one compiled program, the same for every chunk of every
  step: the chunk's inputs as the model sees them (normalised images, random flips; features as they are), the
  plan's chunk (:meth:`jaxdp.DPPlan.chunk_fn`: the clipped sum added to the step's, and on the step's last chunk
  the noise once, the method's release and the optimiser), and the chunk's non-private statistics for the
  diagnostics; :func:`jit_train_step` compiles it with a run config's settings, for the training loop and the
  benchmark alike;
* :func:`eval_step` (predicted classes), :func:`loss_step` (per-example losses, the audit's attack input) and
  :func:`unclipped_sum_step` (the misalignment diagnostics' unclipped gradients).

A step's examples are a list of :class:`StepBatch` chunks (:func:`step_batches` builds it from a split and the
sampler's :class:`jaxdp.sampling.Batch`); nearly every Poisson step is one chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdp import diagnostics, parallel
from jaxdp.plan import Accumulator, DPConfig, DPPlan, ExecutionConfig, TrainState, make_plan


class StepBatch(NamedTuple):
    """One chunk of a step's examples, every array ``[width, ...]`` (padding: ``mask`` False)."""

    inputs: jax.Array  # uint8 images [width, H, W, C] or float features [width, D]
    labels: jax.Array  # int32
    groups: jax.Array  # int32
    mask: jax.Array  # bool
    indices: jax.Array  # int32, into the training set (keys the random flips)


def step_batches(mesh: Any, split: Any, indices: np.ndarray, mask: np.ndarray) -> list[StepBatch]:
    """The examples ``indices`` (``[n_chunks, width]``, or ``[width]`` for one chunk) of ``split`` (arrays
    ``inputs``/``images``, ``label``, ``group``) as chunks on the mesh, each chunk's examples split over its
    devices."""
    indices, mask = np.asarray(indices, np.int32), np.asarray(mask, bool)
    if indices.ndim == 1:
        indices, mask = indices[None], mask[None]
    inputs, labels, groups = inputs_of(split), np.asarray(split.label), np.asarray(split.group)
    return [StepBatch(*(parallel.shard_batch(mesh, a) for a in (
        inputs[i], labels[i].astype(np.int32), groups[i].astype(np.int32), m, i))) for i, m in zip(indices, mask,
                                                                                                  strict=True)]


def inputs_of(split: Any) -> np.ndarray:
    """A split's examples: ``inputs`` (any :class:`jaxdp.data.GroupedSplit`) or ``images`` (older objects)."""
    inputs = getattr(split, "inputs", None)
    return np.asarray(split.images if inputs is None else inputs)


# --------------------------------------------------------------------------------------------------------------
# The classifier on a config.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 with mean 0.5 / std 0.5 normalisation, as the paper."""
    return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def normalize_inputs(inputs: jax.Array) -> jax.Array:
    """uint8 images as :func:`normalize_images`; floating-point features as they are (float32)."""
    return normalize_images(inputs) if inputs.dtype == jnp.uint8 else inputs.astype(jnp.float32)


def model_inputs(batch: StepBatch, step: jax.Array, flip_key: jax.Array | None) -> jax.Array:
    """The chunk's inputs as the model sees them in training: normalised, and images randomly flipped."""
    x = normalize_inputs(batch.inputs)
    if flip_key is not None and x.ndim == 4:  # [width, H, W, C]
        # Keyed by (step, example index): the same flips whatever the chunking, padding or device count.
        step_key = jax.random.fold_in(flip_key, step)
        flips = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(step_key, i)))(batch.indices)
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def classifier_loss(model: Any, *, batch_stats: bool = False):
    """``loss_fn(params, batch) -> per-example cross-entropy`` of a Flax classifier on ``{"inputs", "labels"}``
    (training mode); with ``batch_stats`` (non-private BatchNorm), ``loss_fn(params, batch, model_state) ->
    (losses, new model state)``."""
    if batch_stats:
        def stateful_loss(params, batch, model_state):
            logits, new_state = model.apply({"params": params, **model_state}, batch["inputs"], train=True,
                                            mutable=["batch_stats"])
            return cross_entropy(logits, batch["labels"]), new_state

        return stateful_loss

    def loss_fn(params, batch):
        return cross_entropy(model.apply({"params": params}, batch["inputs"], train=True), batch["labels"])

    return loss_fn


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimiser that follows the DP noise (or the averaging, without DP).

    ``config.optim.weight_decay`` is coupled L2 (added to the gradient before the optimiser), as
    ``torch.optim.Adam(weight_decay=...)`` in the paper's code. It touches only the parameters, never the
    data, so it is post-processing for privacy.
    """
    name = config.optim.name
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"config.optim.name={name!r} is not an optax optimiser (e.g. 'adam', 'sgd', 'adamw').")
    parts = []
    if config.optim.weight_decay:
        parts.append(optax.add_decayed_weights(float(config.optim.weight_decay)))
    parts.append(factory(learning_rate=float(config.optim.learning_rate)))
    return optax.chain(*parts)


def dp_config_from(config: ml_collections.ConfigDict) -> DPConfig | None:
    """``config.dp`` as a :class:`jaxdp.DPConfig` (None for ``dp.enabled=False``)."""
    from jaxdp import methods

    p = config.dp
    if not p.enabled:
        return None
    target = p.target_epsilon
    return DPConfig(l2_clip_norm=float(p.l2_clip_norm), delta=float(p.delta),
                    noise_multiplier=None if target is not None else float(p.noise_multiplier),
                    target_epsilon=None if target is None else float(target), sampling=p.sampling,
                    accountant=p.accountant, method=p.method, method_params=methods.resolved_parameters(p),
                    noise_mechanism=p.get("noise_mechanism", "gaussian"), secure_noise=bool(p.secure_noise),
                    reproducible=bool(p.reproducible))


def execution_config_from(config: ml_collections.ConfigDict) -> ExecutionConfig:
    """The performance-only settings of a run config."""
    return ExecutionConfig(clipping_strategy=config.dp.clipping_strategy, microbatch_size=config.dp.microbatch_size,
                           num_chunk_widths=int(config.train.num_chunk_widths))


def plan_from_config(config: ml_collections.ConfigDict, model: Any, dataset_size: int, *, secret: int | None,
                     mesh: Any = None, public_size: int | None = None, num_params: int | None = None) -> DPPlan:
    """The plan of a run: its config's settings and ``model``'s cross-entropy through :func:`jaxdp.make_plan`.

    ``secret`` is the run's (restored from its checkpoint on resume; ignored when ``config.dp.reproducible``);
    ``public_size`` the size of the public training set when ``dataset_size`` counts secret canaries;
    ``num_params`` the model's parameter count (the accounting of the noise sampler's own delta).
    """
    dp = dp_config_from(config)
    batch_stats = dp is None and config.model.get("norm") == "batch"
    return make_plan(dp, classifier_loss(model, batch_stats=batch_stats), dataset_size=dataset_size,
                     batch_size=int(config.train.batch_size), optimizer=make_optimizer(config),
                     epochs=float(config.train.epochs), execution=execution_config_from(config),
                     sampling_scheme=config.dp.sampling, public_seed=int(config.train.seed), secret=secret,
                     mesh=mesh, public_size=public_size, has_model_state=batch_stats, num_params=num_params)


# --------------------------------------------------------------------------------------------------------------
# Step functions (jitted by their callers with the keyword arguments bound).


def train_step(state: TrainState, stats: dict, acc: Accumulator, batch: StepBatch, step: jax.Array,
               first: jax.Array, last: jax.Array, *, plan: DPPlan, flip_key: jax.Array | None, diagnostics_on: bool,
               return_update: bool = False) -> tuple[TrainState, dict, Accumulator, Any]:
    """One chunk of a training step of the study: the plan's chunk (:meth:`jaxdp.DPPlan.chunk_fn`: ``first`` starts
    the step's sum, ``last`` ends the step with the noise and the update) on the chunk's model inputs, plus its
    non-private statistics added to ``stats`` (when ``diagnostics_on``). Returns ``(state, stats, acc, update)``,
    ``update`` the step's pair ``(clipped sum, noised gradient)`` with ``return_update`` (the misalignment
    diagnostics; meaningful on the last chunk), else None."""
    inputs = {"inputs": model_inputs(batch, step, flip_key), "labels": batch.labels}
    bounds = plan.method.clip_bounds(state.method_state, batch.groups) if plan.private else None
    state, acc, out = plan.chunk_fn(state, acc, inputs, batch.mask, batch.groups, first, last,
                                    return_update=return_update)
    if diagnostics_on:
        stats = diagnostics.add_stats(stats, out.norms, out.losses, batch.mask, batch.groups, bounds)
    return state, stats, acc, out.update


def flip_key(config: ml_collections.ConfigDict) -> jax.Array | None:
    """The public key of a run's random flips (``config.train.random_flip``), or None without flips."""
    return jax.random.fold_in(jax.random.key(int(config.train.seed)), 2) if config.train.random_flip else None


def measures_misalignment(config: ml_collections.ConfigDict, plan: DPPlan) -> bool:
    """Whether a run measures gradient misalignment (private, with non-private diagnostics and a sample size):
    its step then hands back its clipped sum and noised gradient at every call (one compiled step, not two)."""
    return bool(config.train.nonprivate_diagnostics and plan.private
                and int(config.train.misalignment_examples_per_group) > 0)


def jit_train_step(config: ml_collections.ConfigDict, plan: DPPlan) -> Callable:
    """The compiled training step of a run: :func:`train_step` with the config's flips, diagnostics and
    misalignment settings bound, its state and statistics donated. Called once per chunk as
    ``step(state, stats, acc, chunk, step, first, last)`` (:func:`run_step` calls it for a step's chunks);
    :func:`jaxdp.train.train_and_evaluate` runs it, and the benchmark (``launch/bench.py``) times it."""
    return jax.jit(functools.partial(train_step, plan=plan, flip_key=flip_key(config),
                                     diagnostics_on=bool(config.train.nonprivate_diagnostics),
                                     return_update=measures_misalignment(config, plan)),
                   donate_argnums=(0, 1))


def run_step(step_fn: Callable, plan: DPPlan, state: TrainState, stats: dict, chunks: list[StepBatch],
             step: int) -> tuple[TrainState, dict, Any]:
    """A whole training step: ``step_fn`` (:func:`jit_train_step`) on each chunk, the first starting the sum and
    the last applying the update. Returns ``(state, stats, update)``."""
    acc, update = plan.zero_accumulator(state.params), None
    for i, chunk in enumerate(chunks):
        state, stats, acc, update = step_fn(state, stats, acc, chunk, np.int32(step), np.bool_(i == 0),
                                            np.bool_(i == len(chunks) - 1))
    return state, stats, update


def unclipped_sum_step(state: TrainState, total: Any, batch: StepBatch, step: jax.Array, *, plan: DPPlan,
                       flip_key: jax.Array | None) -> Any:
    """``total`` plus the sum of the chunk's real examples' unclipped gradients (inputs as in training)."""
    inputs = {"inputs": model_inputs(batch, step, flip_key), "labels": batch.labels}
    grads, _ = plan.plain_grads(state.params, state.model_state, inputs, batch.mask)
    return jax.tree_util.tree_map(jnp.add, total, grads)


def eval_step(state: TrainState, inputs: jax.Array, *, model: Any) -> jax.Array:
    """Predicted classes of a batch (evaluation mode)."""
    variables = {"params": state.params, **state.model_state}
    return jnp.argmax(model.apply(variables, normalize_inputs(inputs), train=False), axis=-1)


def loss_step(state: TrainState, inputs: jax.Array, labels: jax.Array, *, model: Any) -> jax.Array:
    """Each example's cross-entropy under the model (evaluation mode, no flips): the audit's attack input."""
    variables = {"params": state.params, **state.model_state}
    return cross_entropy(model.apply(variables, normalize_inputs(inputs), train=False), labels)
