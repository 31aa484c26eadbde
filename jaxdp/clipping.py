"""Per-example gradients and clipping: the sensitivity-bounding half of DP-SGD.

The guarantee
-------------
``grad_fn = clipped_grad(loss_fn, l2_clip_norm=C)`` returns, for a batch with padding mask ``m``,

    clipped_sum = sum_i m_i * g_i * min(1, C / ||g_i||_2),      g_i = grad of loss_fn on example i alone,

so every real example contributes a vector of L2 norm at most ``C``. Hence, for any two batches that differ
by **adding or removing one example**, the clipped sums differ by at most ``C`` in L2 norm; for batches that
differ by **replacing one example**, by at most ``2 C``. This holds whatever the data, provided that
``loss_fn`` does not make examples interact (no BatchNorm on batch statistics, no batch-level losses): each
``g_i`` is computed with ``loss_fn`` applied to example ``i`` alone, so a model whose output for one example
depends on the others is evaluated differently here than in a batched forward pass, and its privacy analysis
is not the one this module gives.

With per-layer bounds (``l2_clip_norm`` a pytree of positive numbers that is a prefix of the parameter tree),
each group ``l`` of each example's gradient is clipped to ``C_l`` separately, and the bound above holds with
``C = sqrt(sum_l C_l^2)`` (see :func:`sensitivity`).

Examples whose gradient contains NaN or infinity contribute exactly zero (they are never allowed to poison
the sum); their reported norm is the non-finite value, and :func:`count_nonfinite` counts them. Padding
examples (``mask`` False) contribute exactly zero whatever their values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

STRATEGIES = ("vmap",)  # more are registered by jaxdp.fastclip (see available_strategies())


def sensitivity(l2_clip_norm: float | PyTree) -> float:
    """L2 sensitivity of the clipped sum to adding or removing one example.

    ``C`` for flat clipping; ``sqrt(sum_l C_l^2)`` for per-layer bounds. Replacing one example moves the
    clipped sum by at most twice this.

    >>> sensitivity(5.0)
    5.0
    >>> sensitivity({"dense": 3.0, "head": 4.0})
    5.0
    """
    leaves = jax.tree_util.tree_leaves(l2_clip_norm)
    if not leaves:
        raise ValueError("l2_clip_norm is an empty pytree; give a positive number or a tree of them.")
    return float(np.sqrt(sum(float(c) ** 2 for c in leaves)))


def validate_clip_norm(l2_clip_norm: float | PyTree) -> None:
    """Raises ValueError unless every bound is a finite number > 0."""
    leaves = jax.tree_util.tree_leaves(l2_clip_norm)
    if not leaves:
        raise ValueError("l2_clip_norm is an empty pytree; give a positive number or a tree of them.")
    for c in leaves:
        value = float(c)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"l2_clip_norm must be a finite number > 0 (or a pytree of them); got {value}.")


def count_nonfinite(per_example_norms: jax.Array, mask: jax.Array) -> jax.Array:
    """Number of real (unmasked) examples whose gradient was NaN/inf and was therefore zeroed."""
    return jnp.sum(jnp.logical_and(mask, jnp.logical_not(jnp.isfinite(per_example_norms))))


def _per_example_sq_norms(grads: PyTree) -> jax.Array:
    """Squared L2 norm of each example's gradient over all leaves of ``grads`` (leading axis = example)."""
    leaves = jax.tree_util.tree_leaves(grads)
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1) for g in leaves)


def _weighted_sum(weights: jax.Array, grads: PyTree, finite: jax.Array) -> PyTree:
    """sum_i weights_i * g_i, with non-finite examples replaced by exact zeros first (NaN * 0 is NaN)."""

    def one(g: jax.Array) -> jax.Array:
        keep = finite.reshape((-1,) + (1,) * (g.ndim - 1))
        g = jnp.where(keep, g, jnp.zeros((), g.dtype))
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1)

    return jax.tree_util.tree_map(one, grads)


def _clip_factors(norms: jax.Array, bound: float) -> jax.Array:
    # min(1, C/||g||); a zero gradient keeps factor 1 (nothing to scale) without dividing by zero.
    return jnp.minimum(1.0, bound / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))


def _is_flat(l2_clip_norm: float | PyTree) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(l2_clip_norm))


def clip_and_sum(per_example_grads: PyTree, mask: jax.Array, l2_clip_norm: float | PyTree) -> tuple[PyTree, jax.Array]:
    """Clips stacked per-example gradients (leading axis = example) and sums them under ``mask``.

    Returns ``(clipped_sum, per_example_norms)`` with the guarantee stated in the module docstring. Used by
    every clipping strategy that materialises per-example gradients.
    """
    norms = jnp.sqrt(_per_example_sq_norms(per_example_grads))
    finite = jnp.isfinite(norms)
    if _is_flat(l2_clip_norm):
        bound = float(jax.tree_util.tree_leaves(l2_clip_norm)[0])
        weights = jnp.where(mask & finite, _clip_factors(norms, bound), 0.0)
        return _weighted_sum(weights, per_example_grads, finite), norms

    # Per-layer clipping: each subtree below a leaf of the l2_clip_norm tree has its own bound.
    live = (mask & finite).astype(jnp.float32)

    def clip_group(bound: float, group: PyTree) -> PyTree:
        group_norms = jnp.sqrt(_per_example_sq_norms(group))
        weights = live * _clip_factors(group_norms, float(bound))
        return _weighted_sum(weights, group, finite)

    clipped = jax.tree_util.tree_map(clip_group, l2_clip_norm, per_example_grads)
    return clipped, norms


def _vmap_grad_fn(loss_fn: LossFn, l2_clip_norm, microbatch_size: int | None, return_loss: bool):
    def single_example(params, x, y):
        # The example is given to loss_fn as a batch of one, so loss_fn is written once for batches.
        return jax.value_and_grad(loss_fn)(params, x[None], y[None])

    per_example = jax.vmap(single_example, in_axes=(None, 0, 0))

    def chunk(params, inputs, labels, mask):
        losses, grads = per_example(params, inputs, labels)
        clipped, norms = clip_and_sum(grads, mask, l2_clip_norm)
        return clipped, norms, losses

    def grad_fn(params, inputs, labels, mask):
        batch = mask.shape[0]
        if microbatch_size is None or microbatch_size >= batch:
            clipped, norms, losses = chunk(params, inputs, labels, mask)
        else:
            clipped, norms, losses = _microbatched(chunk, microbatch_size, params, inputs, labels, mask)
        return (clipped, norms, losses) if return_loss else (clipped, norms)

    return grad_fn


def _microbatched(chunk_fn, size: int, params, inputs, labels, mask):
    """Runs ``chunk_fn`` over consecutive chunks of ``size`` examples with lax.scan, summing the results.

    A batch that is not a multiple of ``size`` is padded with masked examples, which contribute nothing.
    Peak memory holds one chunk's per-example gradients instead of the whole batch's.
    """
    batch = mask.shape[0]
    num_chunks = -(-batch // size)
    pad = num_chunks * size - batch

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a
        return a.reshape((num_chunks, size) + a.shape[1:])

    xs = (split(inputs), split(labels), split(mask))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)

    def body(total, chunk):
        clipped, norms, losses = chunk_fn(params, *chunk)
        return jax.tree_util.tree_map(jnp.add, total, clipped), (norms, losses)

    total, (norms, losses) = jax.lax.scan(body, zero, xs)
    return total, norms.reshape(-1)[:batch], losses.reshape(-1)[:batch]


def available_strategies() -> tuple[str, ...]:
    """Names accepted by ``clipped_grad(strategy=...)``."""
    try:
        from jaxdp import fastclip
    except ImportError:  # pragma: no cover - fastclip ships with jaxdp
        return STRATEGIES
    return STRATEGIES + tuple(name for name in fastclip.STRATEGIES if name not in STRATEGIES)


def clipped_grad(
    loss_fn: LossFn,
    l2_clip_norm: float | PyTree = 5.0,
    microbatch_size: int | None = None,
    *,
    strategy: str = "vmap",
    return_loss: bool = False,
) -> Callable[..., tuple]:
    """Builds ``grad_fn(params, inputs, labels, mask) -> (clipped_sum, per_example_norms)``.

    Args:
      loss_fn: ``loss_fn(params, inputs, labels) -> scalar``, the mean loss over the examples it is given.
        It must treat examples independently (see the module docstring).
      l2_clip_norm: the bound ``C`` on each example's whole (flattened) gradient, or a pytree of bounds that
        is a prefix of the parameter tree for per-layer clipping.
      microbatch_size: if set, per-example gradients are computed ``microbatch_size`` examples at a time
        (bounding memory); the result equals the unchunked one up to float summation order.
      strategy: ``"vmap"`` (``jax.vmap`` of the single-example gradient) or a faster strategy from
        :func:`available_strategies`; all give the same result to float tolerance.
      return_loss: also return each example's loss (``float32[B]``).

    Returns:
      A function, to be called under ``jax.jit``, returning

      - ``clipped_sum``: pytree like ``params``, ``sum_i mask_i * g_i * min(1, C / ||g_i||)``;
      - ``per_example_norms``: ``float32[B]``, each example's pre-clip gradient norm (NaN/inf for an
        example whose gradient was non-finite and was zeroed);
      - ``per_example_loss`` (with ``return_loss=True``).

    Guarantee: adding or removing one example moves ``clipped_sum`` by at most :func:`sensitivity` in L2
    norm (replacing one: twice that).

    Example::

        def loss_fn(params, x, y):
            return jnp.mean((x @ params["w"] - y) ** 2) / 2
        grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0))
        clipped_sum, norms = grad_fn(params, x, y, jnp.ones(len(x), bool))
    """
    validate_clip_norm(l2_clip_norm)
    if microbatch_size is not None and (int(microbatch_size) != microbatch_size or microbatch_size < 1):
        raise ValueError(f"microbatch_size must be None or an integer >= 1; got {microbatch_size!r}.")
    if strategy == "vmap":
        return _vmap_grad_fn(loss_fn, l2_clip_norm, microbatch_size, return_loss)
    names = available_strategies()
    if strategy not in names:
        raise ValueError(f"Unknown clipping strategy {strategy!r}; choose one of {list(names)}.")
    from jaxdp import fastclip

    return fastclip.STRATEGIES[strategy](loss_fn, l2_clip_norm, microbatch_size, return_loss)
