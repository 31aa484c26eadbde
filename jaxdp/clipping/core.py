"""What every clipping strategy shares: norms, clip factors, weighted sums, one microbatch builder, the registry.

A *strategy* turns ``loss_fn`` into a function that computes one chunk of examples' clipped sum, norms and losses
(:data:`ChunkFn`); :func:`clipped_grad` wraps it with microbatching and the output convention. A strategy module
registers its builder with :func:`register_strategy` when it is imported, so adding a strategy is one new module
(imported by ``jaxdp/clipping/__init__.py`` for the built-in ones).

The guarantee every strategy must keep is stated in :mod:`jaxdp.clipping`. The pieces here make it easy: a
strategy computes each example's squared norm per parameter leaf (an upper bound of the norm of the vector it
will add, see ``jaxdp/clipping/bookkeeping.py`` for a strategy where these differ) and calls
:func:`leaf_weights`, which masks padding, zeroes non-finite examples and applies the default rule or the
caller's :class:`ClipRule`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
# chunk(params, inputs, labels, mask, clip_args) -> (clipped_sum, per_example_norms, per_example_losses)
ChunkFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, PyTree], tuple[PyTree, jax.Array, jax.Array]]


class ClipRule(Protocol):
    """Per-example clip factors, for clipping methods other than ``min(1, C / norm)`` (DPSGD-F, global clipping).

    ``factors(norms, clip_args)`` gets ``float32[B]`` upper bounds of the L2 norms of the per-example vectors
    the strategy will scale and sum, and ``clip_args``, the pytree of per-example arrays (leading axis ``B``)
    given to ``grad_fn``, sliced like the batch; it returns ``float32[B]`` factors. Padding and non-finite
    examples are given norm 0 and their factors are discarded (set to 0), so the rule never has to handle them.

    Contract: ``0 <= factor_i`` and ``factor_i * norm_i <= S`` for every example, where ``S`` is the bound the
    caller declares as the sensitivity (adding or removing one example then moves the clipped sum by at most
    ``S``). The rule must treat examples independently.
    """

    def factors(self, norms: jax.Array, clip_args: PyTree) -> jax.Array: ...


# --------------------------------------------------------------------------------------------------------
# The registry.

_STRATEGIES: dict[str, Callable[..., ChunkFn]] = {}


def register_strategy(name: str, builder: Callable[..., ChunkFn]) -> None:
    """Makes ``clipped_grad(..., strategy=name)`` use ``builder``.

    ``builder(loss_fn, l2_clip_norm, clip_rule, **options) -> chunk`` where ``chunk(params, inputs, labels,
    mask, clip_args) -> (clipped_sum, per_example_norms, per_example_losses)`` for one chunk of examples;
    ``options`` are the strategy's own keyword arguments (``clipped_grad(..., strategy_options={...})``).
    """
    if name in _STRATEGIES and _STRATEGIES[name] is not builder:
        raise ValueError(f"A clipping strategy named {name!r} is already registered.")
    _STRATEGIES[name] = builder


def get_strategy(name: str) -> Callable[..., ChunkFn]:
    """The builder registered as ``name``; ValueError listing the registered names otherwise."""
    if name not in _STRATEGIES:
        raise ValueError(f"Unknown clipping strategy {name!r}; choose one of {list(available_strategies())}.")
    return _STRATEGIES[name]


def available_strategies() -> tuple[str, ...]:
    """Names accepted by ``clipped_grad(strategy=...)``, in registration order (``"vmap"`` first)."""
    return tuple(_STRATEGIES)


# --------------------------------------------------------------------------------------------------------
# Bounds and counts.


def sensitivity(l2_clip_norm: float | PyTree) -> float:
    """L2 sensitivity of the clipped sum to adding or removing one example, under the default rule.

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
        if isinstance(c, str | bytes | bool) or not isinstance(c, int | float | np.number | np.ndarray | jax.Array):
            raise TypeError(f"l2_clip_norm must be a number > 0 (or a pytree of them); got {c!r} of type "
                            f"{type(c).__name__}.")
        value = float(c)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"l2_clip_norm must be a finite number > 0 (or a pytree of them); got {value}.")


def count_nonfinite(per_example_norms: jax.Array, mask: jax.Array) -> jax.Array:
    """Number of real (unmasked) examples whose gradient was NaN/inf and was therefore zeroed."""
    return jnp.sum(jnp.logical_and(mask, jnp.logical_not(jnp.isfinite(per_example_norms))))


def is_flat(l2_clip_norm: float | PyTree) -> bool:
    """True for one bound on the whole gradient, False for a pytree of per-layer bounds."""
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(l2_clip_norm))


# --------------------------------------------------------------------------------------------------------
# Norms, factors, sums.


def per_example_sq_norms(grads: PyTree) -> jax.Array:
    """Squared L2 norm of each example's gradient over all leaves of ``grads`` (leading axis = example)."""
    return sum(leaf_sq_norms(grads))


def leaf_sq_norms(grads: PyTree) -> list[jax.Array]:
    """Each leaf's per-example squared L2 norm ``[B]``, in leaf order."""
    return [jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
            for g in jax.tree_util.tree_leaves(grads)]


def default_clip_factors(norms: jax.Array, bound: float | jax.Array) -> jax.Array:
    """``min(1, bound / norm)``; a zero norm keeps factor 1 (nothing to scale) without dividing by zero."""
    return jnp.minimum(1.0, bound / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))


def clip_factors(norms: jax.Array, live: jax.Array, bound: float, clip_rule: ClipRule | None,
                 clip_args: PyTree) -> jax.Array:
    """Per-example factors of flat clipping: the rule's (default ``min(1, bound / norm)``), 0 where not live."""
    safe = jnp.where(live, norms, 0.0)  # the rule never sees NaN, inf or a padding example's norm
    if clip_rule is None:
        factors = default_clip_factors(safe, bound)
    else:
        factors = jnp.asarray(clip_rule.factors(safe, clip_args))
        if factors.shape != norms.shape:
            raise ValueError(f"clip_rule.factors returned shape {factors.shape}; expected {norms.shape} "
                             "(one factor per example).")
    return jnp.where(live, factors.astype(jnp.float32), 0.0)


def leaf_weights(sq_norms: list[jax.Array], treedef: Any, mask: jax.Array, l2_clip_norm: float | PyTree,
                 clip_rule: ClipRule | None = None, clip_args: PyTree = None):
    """Per-leaf per-example weights ``mask_i * finite_i * factor_i`` and each example's whole norm.

    ``sq_norms``: each parameter leaf's per-example squared norm ``[B]`` (of the vector that will be scaled and
    summed, or an upper bound of it), in leaf order of ``treedef``. Flat clipping gives every leaf the same
    weight; per-layer bounds (``l2_clip_norm`` a prefix tree of the parameters) clip each group to its bound.
    Returns ``(weights, norms, live)``: a list of ``[B]`` weights in leaf order, ``sqrt(sum of sq_norms)``
    and the examples that count (unmasked and finite).
    """
    norms = jnp.sqrt(sum(sq_norms))
    live = mask & jnp.isfinite(norms)
    if is_flat(l2_clip_norm):
        bound = float(jax.tree_util.tree_leaves(l2_clip_norm)[0])
        return [clip_factors(norms, live, bound, clip_rule, clip_args)] * len(sq_norms), norms, live
    if clip_rule is not None:
        raise ValueError("A clip_rule works with one flat l2_clip_norm, not with per-layer bounds.")
    sq_tree = jax.tree_util.tree_unflatten(treedef, sq_norms)

    def group(bound: float, sub: PyTree) -> PyTree:
        weight = clip_factors(jnp.sqrt(sum(jax.tree_util.tree_leaves(sub))), live, float(bound), None, None)
        return jax.tree_util.tree_map(lambda _: weight, sub)

    return jax.tree_util.tree_leaves(jax.tree_util.tree_map(group, l2_clip_norm, sq_tree)), norms, live


def batch_where(keep: jax.Array, a: jax.Array) -> jax.Array:
    """``a`` with the examples (leading axis) where ``keep`` is False replaced by exact zeros (NaN * 0 is NaN)."""
    return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))


def weighted_sum(weights: jax.Array, grads: jax.Array, live: jax.Array) -> jax.Array:
    """``sum_i weights_i * g_i`` over the leading axis, with examples not ``live`` zeroed first."""
    g = batch_where(live, grads)
    return jnp.tensordot(weights.astype(g.dtype), g, axes=1)


def clip_and_sum(per_example_grads: PyTree, mask: jax.Array, l2_clip_norm: float | PyTree,
                 clip_rule: ClipRule | None = None, clip_args: PyTree = None) -> tuple[PyTree, jax.Array]:
    """Clips stacked per-example gradients (leading axis = example) and sums them under ``mask``.

    Returns ``(clipped_sum, per_example_norms)`` with the guarantee stated in :mod:`jaxdp.clipping`. Used by
    every strategy that materialises per-example gradients: the norms are those of the very vectors summed.
    """
    leaves, treedef = jax.tree_util.tree_flatten(per_example_grads)
    weights, norms, live = leaf_weights(leaf_sq_norms(per_example_grads), treedef, mask, l2_clip_norm,
                                        clip_rule, clip_args)
    clipped = [weighted_sum(w, g, live) for w, g in zip(weights, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, clipped), norms


# --------------------------------------------------------------------------------------------------------
# Microbatching and the public builder.


def one_example(batch: PyTree) -> PyTree:
    """Example ``i`` of a batch as a batch of one: every leaf gets a leading axis of 1 (``None`` stays ``None``).

    Inside ``jax.vmap`` over the example axis, this is how each strategy hands ``loss_fn`` one example: inputs and
    labels may be arrays or any pytrees of arrays (e.g. ``{"x": features, "weight": w}``) whose leading axis is the
    example axis.
    """
    return jax.tree_util.tree_map(lambda a: a[None], batch)


def microbatched(chunk_fn: ChunkFn, size: int, params: PyTree, inputs: jax.Array, labels: jax.Array,
                 mask: jax.Array, clip_args: PyTree = None):
    """Runs ``chunk_fn`` over consecutive chunks of ``size`` examples with ``lax.scan``, summing the clipped sums.

    Every leaf of ``inputs``, ``labels``, ``mask`` and ``clip_args`` is sliced alike. A batch that is not a
    multiple of ``size`` is padded with masked examples, which contribute nothing. Peak memory holds one
    chunk's per-example quantities instead of the whole batch's.
    """
    batch = mask.shape[0]
    num_chunks = -(-batch // size)
    pad = num_chunks * size - batch

    def split(a):
        a = jnp.asarray(a)
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a
        return a.reshape((num_chunks, size) + a.shape[1:])

    xs = jax.tree_util.tree_map(split, (inputs, labels, mask, clip_args))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)

    def body(total, chunk):
        clipped, norms, losses = chunk_fn(params, *chunk)
        return jax.tree_util.tree_map(jnp.add, total, clipped), (norms, losses)

    total, (norms, losses) = jax.lax.scan(body, zero, xs)
    return total, norms.reshape(-1)[:batch], losses.reshape(-1)[:batch]


def _check_clip_args(clip_args: PyTree, batch: int) -> None:
    for leaf in jax.tree_util.tree_leaves(clip_args):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(f"clip_args must be per-example arrays with leading axis {batch} (the batch); got a "
                             f"leaf of shape {jnp.shape(leaf)}.")


class ClippedGrad:
    """The per-example clipped gradient sum of :func:`clipped_grad`, carrying its own sensitivity.

    ``grad_fn(params, inputs, labels, mask, clip_args=None)`` computes the clipped sum (see :func:`clipped_grad` for
    what it returns); ``grad_fn.sensitivity`` is the L2 bound on how far adding or removing one example can move
    that sum (the clip norm for flat clipping, ``sqrt(sum_l C_l^2)`` for per-layer bounds, the bound the caller
    declared for a clip rule). Hand it to the noise, so that the clip norm is given once:
    ``jaxdp.dp_noise(noise_multiplier, grad_fn.sensitivity, batch_size, key)``.
    """

    def __init__(self, fn: Callable[..., tuple], sensitivity: float, l2_clip_norm: float | PyTree,
                 strategy: str) -> None:
        self._fn = fn
        self.sensitivity = float(sensitivity)
        self.l2_clip_norm = l2_clip_norm
        self.strategy = strategy
        functools.update_wrapper(self, fn)

    def __call__(self, params: PyTree, inputs: Any, labels: Any, mask: jax.Array, clip_args: PyTree = None):
        return self._fn(params, inputs, labels, mask, clip_args)

    def __repr__(self) -> str:
        return f"ClippedGrad(strategy={self.strategy!r}, sensitivity={self.sensitivity})"


def _check_mask(mask: Any, inputs: Any) -> int:
    """The batch size, after checking that ``mask`` is a boolean vector with one entry per example."""
    shape, dtype = jnp.shape(mask), getattr(mask, "dtype", None)
    leaves = jax.tree_util.tree_leaves(inputs)
    expected = f"bool[{jnp.shape(leaves[0])[0]}] (one entry per example of inputs)" if leaves and jnp.ndim(
        leaves[0]) else "a bool vector with one entry per example"
    if len(shape) != 1 or dtype is None or jnp.dtype(dtype) != jnp.bool_:
        raise ValueError(f"mask must be {expected}: True for real examples, False for padding; got "
                         f"{jnp.dtype(dtype) if dtype is not None else type(mask).__name__}{list(shape)}.")
    for leaf in leaves:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != shape[0]:
            raise ValueError(f"mask has {shape[0]} entries but an inputs leaf has shape {jnp.shape(leaf)}: the "
                             "leading axis of every input must be the example axis, as long as the mask.")
    return int(shape[0])


def clipped_grad(
    loss_fn: LossFn,
    l2_clip_norm: float | PyTree,
    microbatch_size: int | None = None,
    *,
    strategy: str = "vmap",
    return_loss: bool = False,
    clip_rule: ClipRule | None = None,
    rule_sensitivity: float | None = None,
    strategy_options: Mapping[str, Any] | None = None,
) -> ClippedGrad:
    """Builds ``grad_fn(params, inputs, labels, mask, clip_args=None) -> (clipped_sum, per_example_norms)``.

    Args:
      loss_fn: ``loss_fn(params, inputs, labels) -> scalar``, the mean loss over the examples it is given.
        It must treat examples independently (see :mod:`jaxdp.clipping`). ``inputs`` and ``labels`` may be
        arrays or pytrees of arrays whose leading axis is the example axis (``labels`` may be ``None``).
      l2_clip_norm: the bound ``C`` on each example's whole (flattened) gradient, or a pytree of bounds that
        is a prefix of the parameter tree for per-layer clipping. With a ``clip_rule`` it must be one number
        and the rule's own bounds apply. Required: there is no default bound.
      microbatch_size: if set, per-example gradients are computed ``microbatch_size`` examples at a time
        (bounding memory); the result equals the unchunked one up to float summation order.
      strategy: ``"vmap"`` (``jax.vmap`` of the single-example gradient) or a faster strategy from
        :func:`available_strategies`; all give the same result to float tolerance.
      return_loss: also return each example's loss (``float32[B]``).
      clip_rule: ``None`` for ``min(1, C / norm)``, or a :class:`ClipRule` giving each example's factor from
        its norm and its slice of ``clip_args``.
      rule_sensitivity: with a ``clip_rule``, the bound ``S`` its factors promise (``factor_i * norm_i <= S``):
        the returned function's ``sensitivity``. Default: ``l2_clip_norm``.
      strategy_options: keyword options of the strategy (e.g. ``{"max_patch_bytes": 2**22}`` for
        ``"bookkeeping"``).

    Returns:
      A :class:`ClippedGrad`: a function, to be called under ``jax.jit``, returning

      - ``clipped_sum``: pytree like ``params``, ``sum_i mask_i * factor_i * g_i``, by default
        ``factor_i = min(1, C / ||g_i||)``;
      - ``per_example_norms``: ``float32[B]``, the norm each example's factor was computed from (an upper bound
        of ``||g_i||``, equal to it up to float rounding; NaN/inf for an example whose gradient was non-finite
        and was zeroed);
      - ``per_example_loss`` (with ``return_loss=True``);

      and carrying ``.sensitivity``, the bound below.

    Guarantee: with the default rule, adding or removing one example moves ``clipped_sum`` by at most
    ``grad_fn.sensitivity`` (:func:`sensitivity` of the bounds) in L2 norm (replacing one: twice that); with a
    rule, by at most the rule's bound; up to float32 rounding of the norms and the sum (``docs/threat-model.md``).
    Matrix products are traced at ``jax.default_matmul_precision("highest")`` (full float32 on accelerators
    whose default is TF32); a model that asks for a lower ``precision=`` itself, or computes in bfloat16, gets
    what it asks for, and its per-example norms are then correspondingly less exact.

    Example::

        def loss_fn(params, x, y):
            return jnp.mean((x @ params["w"] - y) ** 2) / 2
        grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0)
        clipped_sum, norms = jax.jit(grad_fn)(params, x, y, jnp.ones(len(x), bool))
        noise = jaxdp.dp_noise(1.0, grad_fn.sensitivity, len(x), jaxdp.noise.secret_key())
    """
    validate_clip_norm(l2_clip_norm)
    if microbatch_size is not None and (isinstance(microbatch_size, bool) or not isinstance(
            microbatch_size, int | np.integer) or microbatch_size < 1):
        raise ValueError(f"microbatch_size must be None or an integer >= 1; got {microbatch_size!r}.")
    if clip_rule is not None and not is_flat(l2_clip_norm):
        raise ValueError("A clip_rule works with one flat l2_clip_norm, not with per-layer bounds.")
    if clip_rule is not None and not callable(getattr(clip_rule, "factors", None)):
        raise ValueError("clip_rule must have a method factors(norms, clip_args) -> per-example factors.")
    if rule_sensitivity is not None:
        if clip_rule is None:
            raise ValueError("rule_sensitivity is the bound of a clip_rule; without one the sensitivity is "
                             "l2_clip_norm's (jaxdp.clipping.sensitivity).")
        validate_clip_norm(rule_sensitivity)
    chunk = get_strategy(strategy)(loss_fn, l2_clip_norm, clip_rule, **dict(strategy_options or {}))

    def grad_fn(params, inputs, labels, mask, clip_args=None):
        batch = _check_mask(mask, inputs)
        _check_clip_args(clip_args, batch)
        # Full float32 products while tracing the per-example norms and the clipped sum: an accelerator's default
        # (TF32 on recent NVIDIA GPUs) would compute them with a 10-bit mantissa, and an example's contribution
        # could then exceed the bound by ~1e-3 relative. An explicit precision= in the user's model still wins.
        with jax.default_matmul_precision("highest"):
            if microbatch_size is None or microbatch_size >= batch:
                clipped, norms, losses = chunk(params, inputs, labels, mask, clip_args)
            else:
                clipped, norms, losses = microbatched(chunk, microbatch_size, params, inputs, labels, mask,
                                                      clip_args)
        return (clipped, norms, losses) if return_loss else (clipped, norms)

    bound = sensitivity(l2_clip_norm) if rule_sensitivity is None else float(rule_sensitivity)
    return ClippedGrad(grad_fn, bound, l2_clip_norm, strategy)
