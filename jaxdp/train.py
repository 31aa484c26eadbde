"""The training loop: DP-SGD (or non-private training through the same plan), per-group evaluation, resume.

``train_and_evaluate(config, workdir)`` trains one run described by a config (schema: :mod:`jaxdp.config`) and
writes into ``workdir``:

- ``config.json`` — the resolved run config (including a calibrated noise multiplier, if one was calibrated);
- ``history.jsonl`` — one JSON object per evaluation: step, epoch, epsilon so far, every metric of
  :func:`jaxdp.fairness.group_metrics` on the test set and — unless ``config.train.nonprivate_diagnostics`` is
  False — statistics of the training data computed without noise since the previous evaluation (training loss,
  per-group example counts, fraction clipped, mean pre-clip gradient norm, and, for private runs, the gradient
  misalignment cosines of :func:`misalignment_cosines`), every one under a key starting with ``nonprivate_``:
  they are not covered by the run's epsilon. A run with a DP-fairness method (``config.dp.method``) also writes
  the method's state, which is post-processing of its noisy releases and so covered by epsilon:
  ``method_clip_norm_0/1`` (DPSGD-F's per-group bounds) or ``method_threshold`` (Global-Adapt's Z), as they are
  after the window's last step;
- ``final.json`` — written last and atomically, so its presence means the run finished: final metrics, epsilon
  under every accountant, steps, the padded widths its batches ran at (``chunk_widths``: public, a function of
  the public training-set size and q), the method and its noise multipliers, the groups' names
  (``group_names``, after ``config.data.group_attribute``), where the wall time went (``time_split_s``), and
  ``privacy_note`` when the epsilon is not a guarantee (``config.dp.reproducible``);
- ``checkpoints/`` — orbax checkpoints (parameters, optimiser and noise state, sampler position, privacy ledger,
  diagnostics, metric history, and the run's secret seed). Calling ``train_and_evaluate`` again on the same workdir
  resumes from the newest good checkpoint and ends exactly where an uninterrupted run ends. Checkpoints hold the
  secret that protects the run's privacy: keep them as private as the training data.

Privacy: the mechanism — sampler, clipped gradient and its sensitivity, noise, privacy events — is one
:class:`jaxdp.plan.DPPlan` built from the config; the loop runs it and records each step's event in a
:class:`jaxdp.accounting.PrivacyLedger`, so the reported epsilon describes what ran.

The step functions are module-level (as in the Flax ImageNet example): :func:`accumulate_step` adds one chunk's
clipped gradient sum and the exact counts the method releases (a Poisson batch larger than the chunk width takes
several chunks, never a truncation), :func:`update_step` adds the noise once, releases the method's noisy counts
and applies the optimiser; :func:`train_step`, the one compiled training program, is the two on a chunk (the
update kept only on a step's last chunk), and :func:`eval_step` predicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxdp import accounting, fairness, parallel
from jaxdp.checkpoint import Checkpointer
from jaxdp.config import differing_keys, resolve, validate_run_config
from jaxdp.plan import AUDIT_STREAM, DPPlan, child_seed, cross_entropy, make_plan, new_run_secret, normalize_images
from jaxdp.runlog import RunProgress, json_safe, write_json, write_jsonl

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]
NONPRIVATE_PREFIX = "nonprivate_"


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


@flax.struct.dataclass
class TrainState:
    """What a training step changes: the model's parameters and state, the optimiser's state (a pair: the plan's
    noise transformation's state, holding the secret noise key and its step count, and the optimiser's), and the
    DP method's state (:mod:`jaxdp.methods`: DPSGD-F's last released counts, Global-Adapt's threshold; empty for
    DP-SGD)."""

    params: Any
    model_state: Any
    opt_state: Any
    method_state: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation, method_state: Any = None) -> TrainState:
        params = variables["params"]
        model_state = {k: v for k, v in variables.items() if k != "params"}
        return cls(params=params, model_state=model_state, opt_state=tx.init(params),
                   method_state={} if method_state is None else method_state)


class Accumulator(NamedTuple):
    """What a step's chunks add up before the noise: the (clipped) gradient sum and the method's exact counts."""

    grad_sum: Any
    counts: jax.Array  # float32[num_counts] (empty for DP-SGD)


class Chunk(NamedTuple):
    """One chunk of a step's batch, each array with the chunk width as leading axis (padding: ``mask`` False)."""

    images: jax.Array  # uint8 [B, H, W, C]
    labels: jax.Array  # int32 [B]
    groups: jax.Array  # int32 [B]
    mask: jax.Array  # bool [B]
    indices: jax.Array  # int32 [B], into the training set (keys the random flips)


# --------------------------------------------------------------------------------------------------------------
# Step functions (jitted in train_and_evaluate with their keyword arguments bound).


def chunk_inputs(chunk: Chunk, step: jax.Array, flip_key: jax.Array | None) -> jax.Array:
    """The chunk's images as the model sees them in training: normalised and randomly flipped."""
    x = normalize_images(chunk.images)
    if flip_key is not None:
        # Keyed by (step, example index): the same flips whatever the chunking, padding or device count.
        step_key = jax.random.fold_in(flip_key, step)
        flips = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(step_key, i)))(chunk.indices)
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def accumulate_step(state: TrainState, acc: Accumulator, stats: dict, chunk: Chunk, step: jax.Array, *,
                    plan: DPPlan, mesh: Any, flip_key: jax.Array | None,
                    diagnostics: bool) -> tuple[Accumulator, dict, Any]:
    """Adds one chunk's (clipped) gradient sum and the method's exact counts to ``acc``, and its non-private
    statistics to ``stats``.

    Returns ``(acc, stats, model_state)``. The chunk is split over the mesh's devices; each computes its share's
    sum and the shares are added (``psum``), so the result does not depend on the device count beyond float
    summation order. The method's counts are integers summed over the whole chunk (every device's share), so
    they are exact whatever the chunking and the device count.
    """
    x = chunk_inputs(chunk, step, flip_key)
    clip_args = plan.clip_args(state.method_state, chunk.groups)

    def local(params, model_state, x, y, mask, clip_args):
        grad_sum, norms, losses, model_state = plan.grad_fn(params, model_state, x, y, mask, clip_args)
        grad_sum = jax.lax.psum(grad_sum, parallel.DATA_AXIS)
        model_state = jax.lax.pmean(model_state, parallel.DATA_AXIS)
        return grad_sum, norms, losses, model_state

    data = P(parallel.DATA_AXIS)
    grad_sum, norms, losses, model_state = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), data, data, data, data), out_specs=(P(), data, data, P()),
        check_vma=False,
    )(state.params, state.model_state, x, chunk.labels, chunk.mask, clip_args)
    counts = plan.release_counts(norms, chunk.mask, chunk.groups, state.method_state)
    acc = Accumulator(jax.tree_util.tree_map(jnp.add, acc.grad_sum, grad_sum), acc.counts + counts)
    if diagnostics:
        bounds = plan.method.clip_bounds(state.method_state, chunk.groups) if plan.private else None
        stats = _add_stats(stats, norms, losses, chunk.mask, chunk.groups, bounds)
    return acc, stats, model_state


def update_step(state: TrainState, acc: Accumulator, model_state: Any, step: jax.Array, *, plan: DPPlan,
                optimizer: optax.GradientTransformation,
                return_update: bool = False) -> tuple[TrainState, Accumulator] | tuple[TrainState, Accumulator, tuple]:
    """Noise (once per step, scaled to the method's sensitivity), division by the expected batch size, the
    method's release of its noisy counts, and the optimiser; returns the new state and a zeroed accumulator for
    the next step (and, with ``return_update``, the pair ``(clipped sum, noised gradient)`` of this step for the
    misalignment diagnostics).

    ``state.opt_state`` is the state of ``optax.chain(plan.noise, optimizer)``; the two links are applied here one
    after the other, as the chain would, so that the noised gradient can be returned.
    """
    noise_state, optimizer_state = state.opt_state
    sensitivity = plan.noise_sensitivity(state.method_state)
    extra = {} if sensitivity is None else {"l2_clip_norm": sensitivity}
    noised, noise_state = plan.noise.update(acc.grad_sum, noise_state, state.params, **extra)
    updates, optimizer_state = optimizer.update(noised, optimizer_state, state.params)
    params = optax.apply_updates(state.params, updates)
    method_state = plan.release(state.method_state, acc.counts, step, noise_state)
    new_state = TrainState(params=params, model_state=model_state, opt_state=(noise_state, optimizer_state),
                           method_state=method_state)
    zeros = Accumulator(jax.tree_util.tree_map(jnp.zeros_like, acc.grad_sum), jnp.zeros_like(acc.counts))
    if return_update:
        return new_state, zeros, (acc.grad_sum, noised)
    return new_state, zeros


def train_step(state: TrainState, acc: Accumulator, stats: dict, chunk: Chunk, step: jax.Array, last: jax.Array, *,
               plan: DPPlan, mesh: Any, flip_key: jax.Array | None, diagnostics: bool,
               optimizer: optax.GradientTransformation, return_update: bool = False) -> tuple:
    """One chunk of a step: :func:`accumulate_step`, then, if ``last`` (the step's last chunk; a step whose Poisson
    batch fits one chunk, nearly every step, is one call), :func:`update_step`; else ``state`` and the new ``acc``
    are kept as they are, for the next chunk.

    One program for both cases (``last`` is an argument, not a constant): a run compiles its gradient once, and
    the noise and the optimiser run as soon as their inputs are ready, in the gradient's shadow. On an earlier
    chunk the update is computed and discarded, nothing of it leaves the program (the pair below is zeros), and
    the noise it drew is drawn again, the same, on the last chunk: the noise state only advances with a kept
    update. (Two outputs carrying the same noise on different sums would cancel it.) Returns
    ``(state, acc, stats)``, plus, with ``return_update``, the pair ``(clipped sum, noised gradient)`` of the step
    (zeros on an earlier chunk).
    """
    acc, stats, model_state = accumulate_step(state, acc, stats, chunk, step, plan=plan, mesh=mesh,
                                              flip_key=flip_key, diagnostics=diagnostics)
    updated, zeros, *update = update_step(state, acc, model_state, step, plan=plan, optimizer=optimizer,
                                          return_update=return_update)
    keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(last, new, old))
    update = [keep(pair, jax.tree_util.tree_map(jnp.zeros_like, pair)) for pair in update]
    return (keep(updated, state), keep(zeros, acc), stats, *update)


def eval_step(state: TrainState, images: jax.Array, *, model: Any) -> jax.Array:
    """Predicted classes of a batch of uint8 images (evaluation mode)."""
    variables = {"params": state.params, **state.model_state}
    return jnp.argmax(model.apply(variables, normalize_images(images), train=False), axis=-1)


def loss_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: Any) -> jax.Array:
    """Each example's cross-entropy under the model (evaluation mode, no flips): the audit's attack input."""
    variables = {"params": state.params, **state.model_state}
    return cross_entropy(model.apply(variables, normalize_images(images), train=False), labels)


# --------------------------------------------------------------------------------------------------------------
# Non-private diagnostics: sums over the examples seen since the last evaluation.


def _zero_stats(diagnostics: bool) -> dict:
    if not diagnostics:
        return {}
    return {"loss_sum": jnp.zeros((), jnp.float32), "n": jnp.zeros((), jnp.float32),
            **fairness.zero_clip_diagnostics()}


def _add_stats(stats: dict, norms, losses, mask, groups, bounds) -> dict:
    """``bounds``: each example's bound under the method (``C``; DPSGD-F's ``C_k``; the global methods' ``Z``),
    None without DP: an example counts as clipped when its norm is above its bound."""
    new = dict(stats)
    sums = fairness.clip_diagnostics(norms, mask, groups, jnp.inf)
    if bounds is not None:
        # fairness.clip_diagnostics compares with one scalar bound; the methods' bounds are per example.
        above = mask & jnp.isfinite(norms) & (norms > bounds)
        sums.update({f"clipped_{g}": jnp.sum(above & (groups == g), dtype=jnp.int32) for g in fairness.GROUPS})
    for key, value in sums.items():
        new[key] = stats[key] + value
    new["loss_sum"] = stats["loss_sum"] + jnp.sum(jnp.where(mask, losses, 0.0))
    new["n"] = stats["n"] + jnp.sum(mask, dtype=jnp.float32)
    return new


def _finalize_stats(stats: dict, private: bool) -> dict:
    """The ``nonprivate_*`` entries of a history row (empty when diagnostics are off)."""
    if not stats:
        return {}
    n = float(stats["n"])
    diag = fairness.finalize_clip_diagnostics(stats)
    out = {"train_loss": float(stats["loss_sum"]) / n if n else math.nan}
    for g in fairness.GROUPS:
        out[f"clip_fraction_{g}"] = diag[f"clip_fraction_{g}"] if private else math.nan
        out[f"grad_norm_mean_{g}"] = diag[f"grad_norm_mean_{g}"] if private else math.nan
        out[f"train_examples_{g}"] = diag[f"n_{g}"]
        out[f"nonfinite_examples_{g}"] = diag[f"nonfinite_{g}"] if private else 0
    return {NONPRIVATE_PREFIX + k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Gradient misalignment (Esipova et al. 2023): non-private diagnostics, once per evaluation window.

_MISALIGNMENT_STREAM = 3  # the public sample's stream under train.seed
MISALIGNMENT_DIRECTIONS = ("unclipped", "clipped", "noised")


def unclipped_sum_step(state: TrainState, total: Any, chunk: Chunk, step: jax.Array, *, plan: DPPlan,
                       flip_key: jax.Array | None) -> Any:
    """``total`` plus the sum of the chunk's real examples' unclipped gradients (inputs as in training)."""
    grads = plan.unclipped_grad_fn(state.params, state.model_state, chunk_inputs(chunk, step, flip_key),
                                   chunk.labels, chunk.mask)
    return jax.tree_util.tree_map(jnp.add, total, grads)


def _cosine(a: Any, b: Any) -> jax.Array:
    dot = sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
              for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    norm_a = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(a)))
    norm_b = jnp.sqrt(sum(jnp.vdot(y, y) for y in jax.tree_util.tree_leaves(b)))
    return dot / (norm_a * norm_b)


def misalignment_cosines(group_sums: Any, group_counts: jax.Array, group_weights: jax.Array,
                         directions: dict[str, Any]) -> dict[str, jax.Array]:
    """Cosines between each group's mean unclipped gradient and the directions a DP step takes.

    ``group_sums``: per group, the sum of the unclipped gradients of a sample of that group's training examples
    (a list of pytrees, one per group), ``group_counts`` their numbers; the overall reference is the mean
    gradient of the training set, ``sum_k group_weights[k] * group_sums[k] / group_counts[k]``. ``directions``:
    e.g. ``{"unclipped": batch sum, "clipped": clipped batch sum, "noised": clipped sum plus noise}``, all of one
    step at the same parameters. Returns ``cos_<direction>_<g>`` for each group ``g`` and ``cos_<direction>_all``
    (NaN where a group has no example): what Esipova et al. call cos(g_D,k, g_B), cos(g_D,k, bar g_B) and, with
    noise, the update's direction. The drop from ``unclipped`` to ``clipped`` is clipping's share of the
    misalignment, from ``clipped`` to ``noised`` the noise's.
    """
    means = [jax.tree_util.tree_map(lambda x, n=n: x / jnp.maximum(n, 1.0), g)
             for g, n in zip(group_sums, group_counts, strict=True)]
    overall = jax.tree_util.tree_map(lambda *xs: sum(w * x for w, x in zip(group_weights, xs, strict=True)), *means)
    out = {}
    for name, direction in directions.items():
        for g, mean in enumerate(means):
            out[f"cos_{name}_{g}"] = jnp.where(group_counts[g] > 0, _cosine(mean, direction), jnp.nan)
        out[f"cos_{name}_all"] = _cosine(overall, direction)
    return out


class _MisalignmentSample:
    """A fixed sample of the training set: up to ``config.train.misalignment_examples_per_group`` examples of each
    group, drawn once from the public ``train.seed``, in padded chunks of the training chunk width (so that the
    batch's unclipped sum and the sample's share one compiled function), flipped as in training."""

    def __init__(self, config: ml_collections.ConfigDict, train_set: Any, mesh: Any, width: int) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([int(config.train.seed), _MISALIGNMENT_STREAM]))
        per_group = int(config.train.misalignment_examples_per_group)
        groups = np.asarray(train_set.group)
        self.counts = np.zeros(len(fairness.GROUPS), np.float32)
        self.weights = np.array([np.mean(groups == g) for g in fairness.GROUPS], np.float32)
        self.chunks: list[list[Chunk]] = []
        for g in fairness.GROUPS:
            members = np.flatnonzero(groups == g)
            chosen = np.sort(rng.choice(members, min(per_group, len(members)), replace=False))
            self.counts[g] = len(chosen)
            chunks = []
            for start in range(0, len(chosen), width):
                idx = chosen[start:start + width]
                mask = np.zeros(width, bool)
                mask[:len(idx)] = True
                chunks.append(_chunk(mesh, train_set, np.pad(idx, (0, width - len(idx))), mask))
            self.chunks.append(chunks)

    def group_sums(self, sum_step: Callable, state: TrainState, zeros: Callable, step: int) -> list[Any]:
        """Per group, the sum of the sample's unclipped gradients at ``state``."""
        sums = []
        for chunks in self.chunks:
            total = zeros(state.params)
            for chunk in chunks:
                total = sum_step(state, total, chunk, np.int32(step))
            sums.append(total)
        return sums


# --------------------------------------------------------------------------------------------------------------
# Host side.


class _Clock:
    """Wall time per phase of a run (``final.json``'s ``time_split_s``), summing to the run's wall time.

    - ``compile``: every second XLA spent tracing, lowering and compiling (or reading the persistent compilation
      cache), wherever it happened; it is subtracted from the phase it happened in, so no second is counted twice.
    - ``data``: loading the data, and on the host selecting each step's batch and gathering and transferring its
      examples; the next step's batch is prepared while the device computes the current step, so this time
      overlaps ``train_steps``' device time rather than adding to it.
    - ``train_steps``: dispatching the steps and waiting for the device to finish them (one wait per step).
    - ``init``, ``evaluation`` (including the misalignment diagnostics and the audit), ``accounting`` (including
      the noise calibration), ``checkpoints``: as named.
    - ``other``: the rest of the wall time (building the model and the step functions, writing the history).
    """

    _COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                       "/jax/core/compile/backend_compile_duration")
    _compile_s = 0.0
    _listening = False
    PHASES = ("compile", "init", "data", "train_steps", "evaluation", "accounting", "checkpoints", "other")

    def __init__(self) -> None:
        if not _Clock._listening:
            jax.monitoring.register_event_duration_secs_listener(_Clock._on_event)
            _Clock._listening = True
        self._start, self._compile_start = time.perf_counter(), _Clock._compile_s
        self._phases = dict.fromkeys(self.PHASES[1:-1], 0.0)

    @staticmethod
    def _on_event(event: str, duration: float, **_: Any) -> None:
        if event in _Clock._COMPILE_EVENTS:
            _Clock._compile_s += duration

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, compiled = time.perf_counter(), _Clock._compile_s
        try:
            yield
        finally:
            self._phases[name] += max(0.0, time.perf_counter() - start - (_Clock._compile_s - compiled))

    @property
    def split(self) -> dict[str, float]:
        """Seconds per phase so far (``PHASES``, in that order)."""
        compile_s = _Clock._compile_s - self._compile_start
        other = time.perf_counter() - self._start - compile_s - sum(self._phases.values())
        return {"compile": compile_s, **self._phases, "other": max(0.0, other)}


def _misalignment_sums(misaligned: dict, state: TrainState, chunks: list[Chunk], step: int,
                       zeros_like: Callable) -> tuple[list[Any], Any]:
    """The first half of a step's misalignment (:func:`misalignment_cosines`), before the step's update: the
    sample's group sums and the batch's unclipped sum at the parameters the step's gradient is computed at."""
    sum_step = misaligned["unclipped_sum"]
    group_sums = misaligned["sample"].group_sums(sum_step, state, zeros_like, step)
    unclipped = zeros_like(state.params)
    for chunk in chunks:
        unclipped = sum_step(state, unclipped, chunk, np.int32(step))
    return group_sums, unclipped


def _misalignment(misaligned: dict, sums: tuple[list[Any], Any], update: tuple[Any, Any]) -> dict:
    """The cosines from :func:`_misalignment_sums` and the step's ``(clipped sum, noised gradient)``."""
    sample: _MisalignmentSample = misaligned["sample"]
    (group_sums, unclipped), (clipped, noised) = sums, update
    cosines = misaligned["cosines"](group_sums, jnp.asarray(sample.counts), jnp.asarray(sample.weights),
                                    {"unclipped": unclipped, "clipped": clipped, "noised": noised})
    return {k: float(v) for k, v in jax.device_get(cosines).items()}


def _evaluate(predict, state, mesh, test, batch_size: int) -> dict:
    batch_size = parallel.round_up_to_devices(batch_size, mesh)
    preds = []
    n = len(test.label)
    for start in range(0, n, batch_size):
        images = test.images[start : start + batch_size]
        real = len(images)
        if real < batch_size:  # pad to the fixed shape so predict compiles once
            images = np.concatenate([images, np.zeros((batch_size - real,) + images.shape[1:], images.dtype)])
        out = predict(state, parallel.shard_batch(mesh, images))
        preds.append(np.asarray(jax.device_get(_gather(out)))[:real])
    y_pred = np.concatenate(preds) if preds else np.zeros(0, np.int32)
    return fairness.group_metrics(test.label, y_pred, test.group)


def _gather(array: jax.Array) -> jax.Array:
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array, tiled=True)


def _epsilons(plan: DPPlan, ledger: accounting.PrivacyLedger, delta: float) -> dict:
    out: dict[str, float | None] = {}
    for name in accounting.ACCOUNTANTS:
        if not plan.private:
            out[name] = None
            continue
        try:
            out[name] = float(ledger.epsilon(delta, accountant=name))
        except (ValueError, NotImplementedError) as error:  # e.g. an accountant that cannot count this sampling
            log.info("epsilon under %s not available: %s", name, error)
            out[name] = None
    return out


def _check_workdir_config(workdir: Path, resolved: dict) -> None:
    path = workdir / "config.json"
    diff = differing_keys(json.loads(path.read_text()), json_safe(resolved)) if path.exists() else []
    if diff:
        raise ValueError(
            f"{path} holds a different config than this run's; a workdir belongs to one config "
            f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}). "
            "Use another workdir, or delete this one to start over."
        )


def _chunk(mesh, train_set, indices: np.ndarray, mask: np.ndarray) -> Chunk:
    return Chunk(*(parallel.shard_batch(mesh, a) for a in (
        train_set.images[indices], train_set.label[indices].astype(np.int32),
        train_set.group[indices].astype(np.int32), mask, indices.astype(np.int32))))


def check_runnable(config: ml_collections.ConfigDict) -> None:
    """Everything about a run that can be checked before it starts, without training: the config's values, that
    its data is on this machine (:func:`jaxdp.data.check_available`) and that its audit fits the data.

    Raises ValueError, or :class:`jaxdp.data.DataUnavailable` (whose message says which files to put where), with
    a message that names the value and what would work. ``launch/sweep.py`` calls it for every run of a sweep
    before the first run starts.
    """
    from jaxdp import data

    validate_run_config(config)
    data.check_available(config.data)
    if config.audit.enabled:
        _check_audit_capacity(config, data.holdout_capacity(config.data), data.group_names(config.data))


def _check_audit_capacity(config, capacity: dict[int, int], names: tuple[str, str]) -> int:
    """Held-out examples per group the audit needs (non-members + canaries); refuses, with the numbers that would
    work, when the data has fewer."""
    a = config.audit
    need = int(a.mia_examples_per_group) + int(a.canaries_per_group)
    have = min(capacity.values())
    if need > have:
        raise ValueError(
            f"config.audit needs {a.mia_examples_per_group} non-members + {a.canaries_per_group} canaries = {need} "
            f"held-out examples per group, but config.data leaves {capacity[0]} ({names[0]}) and {capacity[1]} "
            f"({names[1]}) outside its training and test sets: set config.audit.mia_examples_per_group + "
            f"config.audit.canaries_per_group <= {have}, or enlarge the pool (e.g. config.data.synthetic_num_images)."
        )
    return need


@dataclasses.dataclass
class _AuditSets:
    """The examples of a run's privacy audit: members (training examples), non-members and canaries (held out).

    Canaries join the training pool by fair coins drawn from the run's secret (from ``train.seed`` when
    ``dp.reproducible``); the coins are never written anywhere (they follow from the secret in the checkpoints).
    Which training examples serve as members is public (``train.seed``): it is part of the evaluation, not of
    training.
    """

    members: Any  # split (images, label, group): training examples
    nonmembers: Any
    canaries: Any
    coins: np.ndarray  # bool per canary: included in training

    @classmethod
    def build(cls, config, train_set, holdout, secret: int | None) -> _AuditSets:
        from jaxdp import audit

        if holdout is None:
            raise ValueError("config.audit.enabled=True needs held-out examples: let train_and_evaluate load "
                             "config.data, or pass datasets=(train, test, holdout).")
        a = config.audit
        m, c = int(a.mia_examples_per_group), int(a.canaries_per_group)
        public = np.random.default_rng(np.random.SeedSequence([int(config.train.seed), AUDIT_STREAM]))
        members, nonmembers, canaries = [], [], []
        for g in fairness.GROUPS:
            in_train = np.flatnonzero(np.asarray(train_set.group) == g)
            in_holdout = public.permutation(np.flatnonzero(np.asarray(holdout.group) == g))
            if m > len(in_train) or m + c > len(in_holdout):
                raise ValueError(
                    f"config.audit needs {m} members of group {g} (the training set has {len(in_train)}) and "
                    f"{m} + {c} held-out examples (there are {len(in_holdout)}): lower "
                    f"config.audit.mia_examples_per_group / canaries_per_group.")
            members.append(public.choice(in_train, m, replace=False))
            nonmembers.append(in_holdout[:m])
            canaries.append(in_holdout[m:m + c])
        rng = (np.random.default_rng(child_seed(secret, AUDIT_STREAM)) if secret is not None
               else np.random.default_rng(np.random.SeedSequence([int(config.train.seed), AUDIT_STREAM, 1])))
        canary_idx = np.concatenate(canaries)
        canary_set = _take(holdout, canary_idx)
        if a.canary_labels == "flipped":  # mislabelled canaries: what a memorising model gives away most clearly
            canary_set = canary_set._replace(label=1 - canary_set.label)
        return cls(_take(train_set, np.concatenate(members)), _take(holdout, np.concatenate(nonmembers)),
                   canary_set, audit.draw_canary_coins(len(canary_idx), rng))

    def training_pool(self, train_set) -> Any:
        """The training set followed by the canaries whose coin came up "in"."""
        included = _take(self.canaries, np.flatnonzero(self.coins))
        return _Split(*(np.concatenate([getattr(train_set, f), getattr(included, f)])
                        for f in ("images", "label", "group")))

    def run(self, config, losses_fn, state, initial, mesh, delta: float) -> dict:
        """The audit's results: ``settings`` and, computed from training data without noise, ``nonprivate``."""
        from jaxdp import audit

        a = config.audit
        batch = int(config.train.eval_batch_size)
        result: dict[str, Any] = {}
        if int(a.mia_examples_per_group):
            candidates = _concat(self.members, self.nonmembers)
            is_member = np.arange(len(candidates.label)) < len(self.members.label)
            loss = _losses(losses_fn, state, mesh, candidates, batch)
            reference = _losses(losses_fn, initial, mesh, candidates, batch)
            result.update(audit.membership_inference_metrics(loss, candidates.group, is_member,
                                                             reference_loss=reference,
                                                             confidence=float(a.confidence)))
        if int(a.canaries_per_group):
            loss = _losses(losses_fn, state, mesh, self.canaries, batch)
            reference = _losses(losses_fn, initial, mesh, self.canaries, batch)
            result.update(audit.one_run_audit(audit.calibrated_scores(loss, reference), self.coins,
                                              self.canaries.group, delta=delta, num_guess_in=a.num_guess_in,
                                              num_guess_out=a.num_guess_out, confidence=float(a.confidence)))
        settings = {"mia_examples_per_group": int(a.mia_examples_per_group),
                    "canaries_per_group": int(a.canaries_per_group), "canary_labels": a.canary_labels,
                    "confidence": float(a.confidence),
                    "attack": "loss threshold; calibrated by the initial model's loss (mia_cal_, one-run audit)"}
        return {"settings": settings, "nonprivate": json_safe(result)}


class _Split(NamedTuple):
    images: np.ndarray
    label: np.ndarray
    group: np.ndarray


def _take(split, idx: np.ndarray) -> _Split:
    return _Split(np.asarray(split.images)[idx], np.asarray(split.label)[idx], np.asarray(split.group)[idx])


def _concat(a, b) -> _Split:
    return _Split(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in ("images", "label", "group")))


def _losses(losses_fn, state, mesh, split, batch_size: int) -> np.ndarray:
    """Per-example losses of ``split`` under ``state``, in fixed-shape padded batches."""
    batch_size = parallel.round_up_to_devices(batch_size, mesh)
    state = parallel.replicate(mesh, jax.device_get(state))
    out = []
    n = len(split.label)
    for start in range(0, n, batch_size):
        images = np.asarray(split.images[start:start + batch_size])
        labels = np.asarray(split.label[start:start + batch_size]).astype(np.int32)
        real = len(labels)
        if real < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - real,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros(batch_size - real, np.int32)])
        loss = losses_fn(state, parallel.shard_batch(mesh, images), parallel.shard_batch(mesh, labels))
        out.append(np.asarray(jax.device_get(_gather(loss)))[:real])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_progress: ProgressFn | None = None,
    datasets: tuple[Any, Any] | None = None,
) -> dict:
    """Trains and evaluates one run; resumable. Returns the content of ``final.json``.

    Args:
      config: a run config (schema :func:`jaxdp.config.base_config`; ``config.sweep`` is ignored).
      workdir: where the run's files go (see the module docstring).
      on_progress: called as ``on_progress(step, total_steps, info)`` after every step; ``info`` holds
        ``epsilon``, after evaluations ``accuracy_0/1``, with non-private diagnostics on the training loss as
        ``loss`` (``loss_label`` names it as non-private), and ``note`` when the epsilon is not a guarantee.
      datasets: ``(train, test)`` to use instead of ``config.data`` — any objects with arrays ``images``
        (uint8 ``[N, H, W, C]``), ``label`` (0/1) and ``group`` (0/1), e.g. your own data. ``config.data`` is
        then only recorded, not loaded.
    """
    from jaxdp import data, models

    config = ml_collections.ConfigDict(config.to_dict())
    if "sweep" in config:
        del config["sweep"]
    check_runnable(config) if datasets is None else validate_run_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    final_path = workdir / "final.json"
    if final_path.exists():
        return json.loads(final_path.read_text())
    started = time.time()
    clock = _Clock()

    audit_on = bool(config.audit.enabled)
    with clock.phase("data"):
        if datasets is not None:
            train_set, test_set, holdout = (*datasets, None)[:3]
        else:
            holdout_per_group = 0
            if audit_on:
                holdout_per_group = _check_audit_capacity(config, data.holdout_capacity(config.data),
                                                          data.group_names(config.data))
            train_set, test_set, holdout = data.load_splits(config.data, holdout_per_group=holdout_per_group)
    mesh = parallel.make_mesh(config.train.num_devices)
    model = models.create_model(config.model, private=bool(config.dp.enabled))
    checkpointer = Checkpointer(workdir / "checkpoints")
    # An "rbg" key for initialisation only: with the default threefry key, XLA takes several times longer to
    # compile model.init on CPU.
    init_key = jax.random.key(int(config.train.seed), impl="rbg")
    with clock.phase("init"):
        variables = models.init_variables(model, init_key, pretrained_path=config.model.pretrained_path)
    private = bool(config.dp.enabled)
    secret, fresh_secret = None, False
    if private and not config.dp.reproducible:
        with clock.phase("checkpoints"):
            record = checkpointer.latest_record() or {}
        secret = int(record["run_secret"], 16) if "run_secret" in record else None
        if secret is None:
            secret, fresh_secret = new_run_secret(), True
    public_size = len(train_set.label)
    audit_sets = None
    if audit_on:
        audit_sets = _AuditSets.build(config, train_set, holdout, secret)
        train_set = audit_sets.training_pool(train_set)
    with clock.phase("accounting"):  # calibrates the noise multiplier when dp.target_epsilon asks for it
        plan = make_plan(config, model, len(train_set.label), secret=secret, num_devices=mesh.size,
                         public_size=public_size, input_shape=tuple(train_set.images.shape[1:]))
    optimizer = make_optimizer(config)
    tx = optax.chain(plan.noise, optimizer)

    resolved = resolve(config)
    if plan.noise_multiplier is not None:
        resolved["dp"]["noise_multiplier"] = plan.noise_multiplier
    _check_workdir_config(workdir, resolved)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", resolved)

    state = TrainState.create(variables, tx, plan.init_method_state())
    ledger = accounting.PrivacyLedger()
    history: list[dict] = []
    diagnostics = bool(config.train.nonprivate_diagnostics)
    stats = _zero_stats(diagnostics)
    start_step = 0
    with clock.phase("checkpoints"):
        restored = checkpointer.restore_latest(jax.tree_util.tree_map(np.asarray, state))
    if restored is not None:
        start_step, state, record = restored
        ledger = accounting.PrivacyLedger.from_json(record["ledger"])
        history = record["history"]
        stats = {k: jnp.asarray(v, stats[k].dtype) for k, v in record["stats"].items()} if diagnostics else {}
        log.info("Resumed %s from step %d.", workdir, start_step)
    def save_checkpoint(step: int) -> None:
        with clock.phase("checkpoints"):
            record = {"ledger": ledger.to_json(), "history": history,
                      "stats": {k: np.asarray(v).item() for k, v in stats.items()}, "sampler_step": step}
            if secret is not None:
                record["run_secret"] = f"{secret:032x}"
            checkpointer.save(step, jax.tree_util.tree_map(np.asarray, jax.device_get(state)), record)

    if fresh_secret:
        # The secret is kept before any step runs: a run killed before its first regular checkpoint restarts
        # with the same secret, so it replays the same batches and noise instead of releasing a second,
        # differently randomised run of the mechanism.
        save_checkpoint(0)
    # Everything the step functions carry from call to call lives on the mesh from the start, so that the first
    # call and the later ones (fed the previous call's outputs) share one compiled program.
    state = parallel.replicate(mesh, state)
    stats = parallel.replicate(mesh, stats)
    if jax.process_index() == 0:
        write_jsonl(workdir / "history.jsonl", history)

    flip_key = jax.random.fold_in(jax.random.key(int(config.train.seed)), 2) if config.train.random_flip else None
    # Gradient misalignment, once per evaluation window (private runs with non-private diagnostics). The step
    # then always hands back its clipped sum and noised gradient: one compiled step, not two.
    misaligned = None
    if diagnostics and plan.private and int(config.train.misalignment_examples_per_group) > 0:
        misaligned = dict(
            sample=_MisalignmentSample(config, train_set, mesh, plan.sampler.physical_batch_size),
            unclipped_sum=jax.jit(functools.partial(unclipped_sum_step, plan=plan, flip_key=flip_key),
                                  donate_argnums=(1,)),
            cosines=jax.jit(misalignment_cosines),
        )
    step_fn = jax.jit(functools.partial(train_step, plan=plan, mesh=mesh, flip_key=flip_key, diagnostics=diagnostics,
                                        optimizer=optimizer, return_update=misaligned is not None),
                      donate_argnums=(0, 1, 2))
    predict = jax.jit(functools.partial(eval_step, model=model))
    zeros_like = jax.jit(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p), out_shardings=parallel.replicated(mesh))
    acc = Accumulator(zeros_like(state.params),
                      parallel.replicate(mesh, np.zeros((plan.method.num_counts if plan.private else 0,), np.float32)))

    delta = float(config.dp.delta)
    eval_every = max(1, int(config.train.eval_every_steps))
    ckpt_every = max(1, int(config.train.checkpoint_every_steps))
    total = plan.total_steps
    progress = RunProgress(workdir.name) if bool(config.train.progress) and jax.process_index() == 0 else None
    note = "reproducible seed: eps is no guarantee" if plan.privacy_note else None
    last_info: dict = {"note": note}
    def prepare(step: int) -> list[Chunk]:
        if step >= total:
            return []
        batch = plan.sampler.batch(step)
        return [_chunk(mesh, train_set, batch.indices[c], batch.mask[c]) for c in range(batch.n_chunks)]

    try:
        with clock.phase("data"):
            next_chunks = prepare(start_step)
        for step in range(start_step, total):
            chunks = next_chunks
            done = step + 1
            evaluating = done % eval_every == 0 or done == total
            measuring = misaligned is not None and evaluating
            if measuring:
                with clock.phase("evaluation"):  # waited for here, so that its time is not the step's
                    sums = jax.block_until_ready(_misalignment_sums(misaligned, state, chunks, step, zeros_like))
            with clock.phase("train_steps"):
                for i, chunk in enumerate(chunks):  # more than one: a Poisson batch wider than the chunk width
                    state, acc, stats, *update = step_fn(state, acc, stats, chunk, np.int32(step),
                                                         np.bool_(i == len(chunks) - 1))
            # The steps above run asynchronously: the host selects and gathers the next step's batch meanwhile,
            # then waits, so that each step's device time is counted in train_steps.
            with clock.phase("data"):
                next_chunks = prepare(done)
            with clock.phase("train_steps"):
                jax.block_until_ready((state, acc))
            if measuring:
                with clock.phase("evaluation"):
                    misalignment = _misalignment(misaligned, sums, update[0])
            plan.record_step(ledger)
            if evaluating:
                row: dict[str, Any] = {"step": done, "epoch": done / plan.sampler.steps_per_epoch,
                                       "wall_time_s": time.time() - started}
                row.update(_finalize_stats(stats, private))
                if misaligned is not None:
                    row.update({NONPRIVATE_PREFIX + k: v for k, v in misalignment.items()})
                if private:
                    row.update(plan.method.public_state(state.method_state))
                with clock.phase("accounting"):
                    row["epsilon"] = float(ledger.epsilon(delta, accountant=config.dp.accountant)) if private else None
                with clock.phase("evaluation"):
                    row.update(_evaluate(predict, state, mesh, test_set, int(config.train.eval_batch_size)))
                history.append(json_safe(row))
                stats = parallel.replicate(mesh, _zero_stats(diagnostics))
                if jax.process_index() == 0:
                    write_jsonl(workdir / "history.jsonl", history)
                last_info = {k: row.get(k) for k in ("accuracy", "accuracy_0", "accuracy_1", "epsilon")}
                last_info["note"] = note
                if diagnostics:
                    last_info.update(loss=row["nonprivate_train_loss"], loss_label="nonprivate loss")
            if done % ckpt_every == 0 or done == total:
                save_checkpoint(done)
            if progress is not None:
                progress(done, total, last_info)
            if on_progress is not None:
                on_progress(done, total, last_info)
    finally:
        checkpointer.close()

    with clock.phase("accounting"):
        epsilons = _epsilons(plan, ledger, delta)
    audit_result = None
    if audit_sets is not None:
        with clock.phase("evaluation"):
            audit_result = audit_sets.run(config, jax.jit(functools.partial(loss_step, model=model)), state,
                                        TrainState.create(variables, tx), mesh, delta)
    final = {
        "metrics": history[-1],
        "epsilon": epsilons,
        "delta": delta,
        "noise_multiplier": plan.noise_multiplier,
        "method": plan.method.name if private else None,
        "clipping_strategy": plan.clipping_strategy,
        "clipping_strategy_reason": plan.clipping_strategy_reason,
        "extra_noise_multipliers": list(plan.method.extra_noise_multipliers) if private else [],
        "group_names": list(data.group_names(config.data)),
        "steps": total,
        "sampling": plan.sampler.scheme,
        "sampling_prob": plan.sampler.sampling_prob,
        "chunk_widths": list(plan.sampler.chunk_widths),
        "train_size": public_size,
        "test_size": int(len(test_set.label)),
        "devices": int(mesh.size),
        "reproducible": bool(config.dp.reproducible),
        "privacy_note": plan.privacy_note,
        "wall_time_s": time.time() - started,
        "time_split_s": {k: round(v, 3) for k, v in clock.split.items()},
    }
    if audit_result is not None:
        final["audit"] = audit_result
    if jax.process_index() == 0:
        write_json(final_path, final)
    return json.loads(json.dumps(json_safe(final)))
