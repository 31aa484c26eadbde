"""Non-private diagnostics of a run: per-group training statistics and gradient misalignment.

Everything here is computed from the training data without noise, so it is not covered by the run's epsilon: the
training loop writes it only under keys starting with ``nonprivate_`` (and only with
``config.train.nonprivate_diagnostics``).

* Statistics (:func:`zero_stats`, :func:`add_stats`, :func:`finalize_stats`): sums over the examples seen since the
  last evaluation — training loss, per-group example counts, fraction clipped, mean pre-clip gradient norm,
  examples with a non-finite gradient.
* Gradient misalignment (Esipova et al. 2023; :func:`misalignment_cosines`): once per evaluation window, each
  group's mean unclipped gradient over a fixed public sample of its training examples (:class:`MisalignmentSample`)
  against the step's unclipped, clipped and noised batch gradient.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdp import fairness

NONPRIVATE_PREFIX = "nonprivate_"
_MISALIGNMENT_STREAM = 3  # the public sample's stream under train.seed
MISALIGNMENT_DIRECTIONS = ("unclipped", "clipped", "noised")


def zero_stats(diagnostics: bool) -> dict:
    """The empty sums (``{}`` when diagnostics are off)."""
    if not diagnostics:
        return {}
    return {"loss_sum": jnp.zeros((), jnp.float32), "n": jnp.zeros((), jnp.float32),
            **fairness.zero_clip_diagnostics()}


def add_stats(stats: dict, norms, losses, mask, groups, bounds) -> dict:
    """``stats`` plus the sums of a step's examples (any shape, e.g. ``[n_chunks, width]``). ``bounds``: each
    example's bound under the method (``C``; DPSGD-F's ``C_k``; the global methods' ``Z``),
    None without DP: an example counts as clipped when its norm is above its bound."""
    new = dict(stats)
    norms, losses, mask, groups = (jnp.ravel(a) for a in (norms, losses, mask, groups))
    bounds = None if bounds is None else jnp.ravel(bounds)
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


def finalize_stats(stats: dict, private: bool) -> dict:
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


class MisalignmentSample:
    """A fixed sample of the training set: up to ``config.train.misalignment_examples_per_group`` examples of each
    group, drawn once from the public ``train.seed``, as chunks (:class:`jaxdp.steps.StepBatch`) of the training
    chunk width per group, flipped as in training."""

    def __init__(self, config: ml_collections.ConfigDict, train_set: Any, mesh: Any, width: int) -> None:
        from jaxdp.steps import step_batches

        rng = np.random.default_rng(np.random.SeedSequence([int(config.train.seed), _MISALIGNMENT_STREAM]))
        per_group = int(config.train.misalignment_examples_per_group)
        groups = np.asarray(train_set.group)
        self.counts = np.zeros(len(fairness.GROUPS), np.float32)
        self.weights = np.array([np.mean(groups == g) for g in fairness.GROUPS], np.float32)
        self.chunks = []
        for g in fairness.GROUPS:
            members = np.flatnonzero(groups == g)
            chosen = np.sort(rng.choice(members, min(per_group, len(members)), replace=False))
            self.counts[g] = len(chosen)
            n_chunks = max(1, -(-len(chosen) // width))
            indices = np.zeros(n_chunks * width, np.int32)
            mask = np.zeros(n_chunks * width, bool)
            indices[:len(chosen)], mask[:len(chosen)] = chosen, True
            self.chunks.append(step_batches(mesh, train_set, indices.reshape(n_chunks, width),
                                            mask.reshape(n_chunks, width)))

    def sums(self, sum_step: Any, zeros: Any, state: Any, chunks: list, step: int) -> tuple[list[Any], Any]:
        """The first half of a step's misalignment, at the parameters the step's gradient is computed at (before
        its update): each group's sum of the sample's unclipped gradients, and the batch's (``chunks``) unclipped
        sum. ``sum_step(state, total, chunk, step)`` adds a chunk's (:func:`jaxdp.steps.unclipped_sum_step`),
        starting from ``zeros``."""

        def total(chunk_list):
            out = zeros
            for chunk in chunk_list:
                out = sum_step(state, out, chunk, np.int32(step))
            return out

        return [total(group) for group in self.chunks], total(chunks)

    def cosines(self, cosines_fn: Any, sums: tuple[list[Any], Any], update: tuple[Any, Any]) -> dict:
        """:func:`misalignment_cosines` from :meth:`sums` and the step's ``(clipped sum, noised gradient)``."""
        (group_sums, unclipped), (clipped, noised) = sums, update
        out = cosines_fn(group_sums, jnp.asarray(self.counts), jnp.asarray(self.weights),
                         {"unclipped": unclipped, "clipped": clipped, "noised": noised})
        return {k: float(v) for k, v in jax.device_get(out).items()}
