"""The ``"bookkeeping"`` strategy: ghost norms and book-keeping for Flax models, per-example gradients never formed.

Book-keeping DP-SGD (Bu et al. 2023) with mixed ghost norms (Li et al. 2021; Bu et al. 2022). One forward and
one backward pass, like non-private training. While ``loss_fn`` runs, every ``flax.linen.Conv`` and
``flax.linen.Dense`` call is intercepted (``flax.linen.intercept_methods``): the layer is computed here, its
input is kept, and a zero "tap" is added to its output, whose gradient is the layer's per-example output
gradient ``dy_i``. The backward pass then only propagates gradients to the inputs of the layers; their weight
gradients are never formed per example. Each example's squared weight-gradient norm ``||P_i^T dy_i||^2``
(``P_i``: the example's input patches, ``[T, K]``; ``dy_i``: ``[T, O]``) is computed per layer either from the
"ghost" Gram form ``sum (P_i P_i^T) * (dy_i dy_i^T)`` (cost ``T^2 (K+O)``) or from the materialised
``P_i^T dy_i`` (cost ``T K O``), whichever is cheaper for that layer's shape (the ghost form only where its
rounding-error bound stays tight, see below); a layer with one position (``T = 1``: a Dense layer on vectors, as
in an MLP) has the norm ``||P_i|| ||dy_i||``, computed as such. With the clip factors ``c_i``
known, each layer's clipped gradient is one ordinary matmul ``sum_i P_i^T (c_i dy_i)``. Parameters outside
intercepted layers (GroupNorm scales and biases, anything else) get ordinary per-example gradients by
``jax.vmap``, which is cheap for small parameter sets.

Small layers: layers whose ghost form is not cheaper have their per-example weight gradients formed once, as
long as those of all such layers of the chunk fit in ``max_stored_bytes`` together (default
:data:`DEFAULT_MAX_STORED_BYTES`, 192 MiB, in call order),
``P_i^T dy_i`` for ~1 MiB of patches at a time (cache-sized; output channels first), and kept: the norms are
those of the very vectors the clipped sum then adds (``sum_i c_i G_i``, one weighted sum, as in ``"vmap"``), and
the patches are never formed a second time. This is most layers of small models (all of the demo's model's
layers). Bias gradients (``sum_t dy_it``, ``[B, O]``) are always kept this way.

Memory: for the other layers, the patches ``P`` (``kh*kw`` times a layer's input) are formed from the kept layer
inputs twice, for the norms and again for the clipped sum, each time for as many examples at a time as fit in
``max_patch_bytes`` (default :data:`DEFAULT_MAX_PATCH_BYTES`, 16 MiB; chunks run in a ``lax.fori_loop``). What
the step holds beyond non-private backpropagation is then every layer's output gradient ``dy`` (until the clip
factors are known), the small layers' per-example gradients and one chunk's patches; ``launch/bench.py`` measures the
resulting peak memory (docs/performance.md).

Floating point: what each example adds is at most what its factor allows
--------------------------------------------------------------------------
For the small layers whose per-example gradients are kept (above), the norm is that of the vector added, as in
``"vmap"``. For the others, the norm an example is clipped with and the vector added for it come from
*different* contractions: the
norm from ``sum (P P^T) * (D D^T)`` (ghost) or ``||P^T D||`` (materialised), the vector from ``P^T (c D)``.
Under cancellation across positions (``P^T D`` much smaller than ``|P|^T |D|``) their rounding errors differ,
and a plain ghost norm can be far below the vector's norm, or a negative Gram sum can give a NaN norm (the
example is then dropped as non-finite). So each kernel's norm handed to the clip rule (and returned) is a
rigorous upper bound of the norm of what the clipped-sum contraction adds for the example per unit factor,
and a clip factor with ``factor * norm <= C`` keeps the example's contribution ``<= C``:

* Every contraction of the norms and of the clipped sums runs at ``precision=HIGHEST`` (float32; on GPUs and
  TPUs the default would use TF32 or bf16 passes, with errors thousands of times larger).
* With ``u = 2^-24``, ``gamma_n = n u / (1 - n u)`` (the bound on any ``n``-term dot product whatever the
  order of its additions: Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3) and
  ``M = sum_t ||P_t|| ||D_t||`` (which bounds ``|| |P|^T |D| ||_F``): the vector added is within
  ``(gamma_T + u) c M`` of ``c P^T D``, and the materialised norm within ``gamma_T M`` of ``||P^T D||``; both go
  into the bound. The ghost value gets a slack that bounds its rounding (the Grams' errors, ``gamma_K`` and
  ``gamma_O`` of the row-norm products, weighted by the other Gram; their product; the final sum of ``T^2``
  terms) and is clamped at 0 before the slack is added. Every quantity that enters a bound is widened for its
  own rounding.
* Where a ghost bound would be loose (slack above 2^-6 of the ghost value: cancellation), the layer's loose
  examples get the materialised bound instead (one ``lax.cond`` per layer; the per-example gradients are then
  formed ``max_patch_bytes`` at a time). A layer gets the ghost form only where its bound is expected to stay
  well within that tolerance.

What is assumed: float32 arithmetic with unit roundoff ``u`` in the contractions, and sums of squares (the norms
of the vectors above and of the per-example gradients of the other parameters) accurate to a small relative
error, as the ``"vmap"`` strategy also assumes. The margins are first order in ``u`` times ``M / ||P^T D||``
(ghost: in the squared norm), largest for layers with many positions; the norms returned are correspondingly
slightly above ``"vmap"``'s, and examples are clipped very slightly more.

What the fast path needs, and what happens otherwise (never a silently different gradient):

* A layer is handled by the fast path when its parameters are found in ``params`` at the layer's module path
  (``params[...path...]["kernel"]``, or below ``params["params"]``), the layer receives exactly those arrays
  (``model.apply({"params": params}, x)`` with ``params`` as given to ``loss_fn``), the call runs under
  ``loss_fn``'s own trace (not inside ``nn.remat``, ``nn.vmap``, ``nn.scan``, ``jax.checkpoint``, ...), the
  layer is called once per example, and its parameters are used nowhere else (no tied weights, no weight
  penalty in ``loss_fn``). All of this is checked on a trace of ``loss_fn`` (the last by the jaxpr: with the
  layer computed from stand-ins, the real parameters must be unused).
* Every other ``nn.Conv`` / ``nn.Dense`` call, and unsupported configurations (grouped, dilated, masked,
  circular/reflect padded, 1D/3D or non-float32 convolutions; custom ``dot_general``), fall back to per-example
  ``jax.vmap`` gradients for their parameters: still exact, not faster. :func:`fast_path_report` lists which
  layers take which path, and why.
* Examples are evaluated one at a time (each example is a batch of one for ``loss_fn``, as in ``"vmap"``), so
  the result is that of ``"vmap"`` even for models whose examples would interact in a batched call.

Example::

    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=5.0, strategy="bookkeeping"))
    clipped_sum, norms = grad_fn(params, images, labels, mask)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Var, get_opaque_trace_state

from jaxdp.clipping import core
from jaxdp.clipping.layers import (
    DEFAULT_MATMUL_MAX_PIXELS,
    Layer,
    describe,
    is_layer_call,
    layer_forward,
    layer_input,
    module_path,
    over_chunks,
    per_example_matrices,
    summed_kernel_grad,
)

PyTree = Any

# "bookkeeping" forms a layer's image patches (with the per-example Gram / gradient matrices of its norms) for
# as many examples at a time as fit in this many bytes.
DEFAULT_MAX_PATCH_BYTES = 16 * 2**20

# Layers (in call order, those that do not use the ghost form) whose per-example weight gradients for the chunk
# fit, all together, in this many bytes have them formed once: their norms are those of the very vectors their
# clipped sums add, and each clipped sum is one weighted sum of them, with no second pass over the patches (the
# small layers of the demo's model: the benchmark measured this twice as fast as two passes). 0 turns it off.
DEFAULT_MAX_STORED_BYTES = 192 * 2**20

# Patches for the stored per-example gradients are formed for as many examples at a time as fit in this many
# bytes: small enough to stay in the CPU's cache (on the demo's layers, one-off timings found this much faster than
# forming them for the whole batch at once, and 0.5 to 1 MiB the best size).
_STORED_PATCH_BYTES = 2**20


# --------------------------------------------------------------------------------------------------------
# Per-example weight-gradient norms of one layer.


# Unit roundoff of float32, the precision of every contraction below (precision=HIGHEST: no TF32 or bf16 passes).
_ROUNDOFF = 2.0**-24

# A ghost norm whose rounding-error bound could inflate the layer's squared norm by more than this fraction is
# replaced by the materialised norm (whose bound is first order in the roundoff, not square root). Layers are
# given the ghost form only where its bound is expected to stay 16 times below this (see _uses_ghost).
_GHOST_TOLERANCE = 2.0**-6

_HIGHEST = lax.Precision.HIGHEST


def _gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an ``n``-term dot product or sum,
    whatever the order of its additions (inf where the bound says nothing)."""
    return n * _ROUNDOFF / (1 - n * _ROUNDOFF) if n * _ROUNDOFF < 0.5 else float("inf")


def _uses_ghost(t: int, k: int, o: int) -> bool:
    """Whether a layer's norms use the Gram ("ghost") form: where it is cheaper (``T^2 (K + O)`` multiply-adds
    against ``T K O``) and its error bound (:func:`_ghost_parts`, a few times ``gamma_{K+O+T^2+1}`` of the squared
    norm when positions do not cancel) can be expected to stay well within the tolerance."""
    return t * (k + o) < k * o and 16 * _gamma(k + o + t * t + 1) <= _GHOST_TOLERANCE


def _ghost_sq_norms(p: jax.Array, d: jax.Array) -> jax.Array:
    """``sum_ts (P P^T)_ts (D D^T)_ts`` per example: ``||P_i^T D_i||_F^2`` up to rounding (may come out < 0)."""
    gram_p = jnp.einsum("btk,bsk->bts", p, p, precision=_HIGHEST)
    gram_d = jnp.einsum("bto,bso->bts", d, d, precision=_HIGHEST)
    return jnp.sum(gram_p * gram_d, axis=(1, 2))


def _materialised_norms(p: jax.Array, d: jax.Array) -> jax.Array:
    """``||fl(P_i^T D_i)||_F`` per example, from the per-example weight gradients."""
    per_example = jnp.einsum("btk,bto->bko", p, d, precision=_HIGHEST)
    return jnp.sqrt(jnp.sum(jnp.square(per_example), axis=(1, 2)))


def _sum_error(t: int) -> float:
    """Relative-to-``|| |P|^T |D| ||`` error of what the clipped sum adds for an example, ``fl(P^T fl(c D))``
    against ``c P^T D``: the contraction over ``T`` positions and the rounding of ``c D``."""
    return _gamma(t) * (1 + _ROUNDOFF) + _ROUNDOFF


def _abs_norms(p: jax.Array, d: jax.Array) -> jax.Array:
    """Per example, an upper bound of ``|| |P|^T |D| ||_F``: ``sum_t ||P_t|| ||D_t||`` (the triangle inequality over
    the positions' outer products), widened by the relative error of its own float32 computation."""
    _, t, k = p.shape
    o = d.shape[-1]
    rows = jnp.sqrt(jnp.sum(jnp.square(p), axis=2)) * jnp.sqrt(jnp.sum(jnp.square(d), axis=2))
    return jnp.sum(rows, axis=1) * (1 + _gamma(k + o + t + 4))


def _materialised_bounds(p: jax.Array, d: jax.Array) -> jax.Array:
    """Per example, an upper bound of ``||fl(P^T fl(c D))|| / c`` from the materialised weight gradient:
    ``||P^T D|| <= ||fl(P^T D)|| + gamma_T || |P|^T |D| ||``, plus the clipped sum's own error."""
    t = p.shape[1]
    return _materialised_norms(p, d) + (_gamma(t) + _sum_error(t)) * _abs_norms(p, d)


def _ghost_parts(p: jax.Array, d: jax.Array) -> jax.Array:
    """Per example ``[ghost bound of ||P^T D||, loose (1.0 or 0.0), bound of || |P|^T |D| ||]``, shape ``[B, 3]``.

    The ghost value ``sum_ts G_ts H_ts`` (``G = P P^T``, ``H = D D^T``, each computed with error at most
    ``gamma_K r_t r_s`` and ``gamma_O q_t q_s``, where ``r_t = ||P_t||``, ``q_t = ||D_t||``) is within ``slack`` of
    ``||P^T D||^2``: the Grams' errors weighted by the other Gram, their product, and the final sum of ``T^2``
    terms (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3). Every term of ``slack`` is a sum of
    non-negative values, widened for its own rounding.
    """
    _, t, k = p.shape
    o = d.shape[-1]
    gram_p = jnp.einsum("btk,bsk->bts", p, p, precision=_HIGHEST)
    gram_d = jnp.einsum("bto,bso->bts", d, d, precision=_HIGHEST)
    ghost_sq = jnp.sum(gram_p * gram_d, axis=(1, 2))
    r = jnp.sqrt(jnp.sum(jnp.square(p), axis=2))
    q = jnp.sqrt(jnp.sum(jnp.square(d), axis=2))
    outer = lambda v: v[:, :, None] * v[:, None, :]
    gamma_k, gamma_o = _gamma(k), _gamma(o)
    abs_norms = jnp.sum(r * q, axis=1)  # >= || |P|^T |D| ||
    slack = (gamma_k * jnp.sum(outer(r) * jnp.abs(gram_d), axis=(1, 2))
             + gamma_o * jnp.sum(outer(q) * jnp.abs(gram_p), axis=(1, 2))
             + 3 * gamma_k * gamma_o * jnp.square(abs_norms)
             + _gamma(t * t + 1) * jnp.sum(jnp.abs(gram_p * gram_d), axis=(1, 2)))
    slack = slack * (1 + 2 * _gamma(k + o + t * t + 8))
    loose = slack > _GHOST_TOLERANCE * ghost_sq  # cancellation: the bound would be far above the norm
    ghost = jnp.sqrt(jnp.maximum(ghost_sq, 0.0) + slack)
    return jnp.stack([ghost, loose.astype(ghost.dtype), abs_norms * (1 + _gamma(k + o + t + 4))], axis=1)


def _rank_one_bounds(p: jax.Array, d: jax.Array) -> jax.Array:
    """Per example, an upper bound of ``||fl(P^T fl(c D))|| / c`` for a layer with one position (``T = 1``: a
    Dense layer on vectors). Then ``P_i^T D_i = p d^T`` has norm ``||p|| ||d||`` exactly, which
    :func:`_abs_norms` bounds from above (there is no cancellation across positions to guard against, so no
    Gram form and no materialised fallback); each entry the clipped sum adds is ``fl(p_k fl(c d_o))``, within
    :func:`_sum_error` ``(1)`` of ``c p_k d_o``; ``2 u`` more covers the rounding of the final product."""
    return _abs_norms(p, d) * np.float32(1 + _sum_error(1) + 2 * _ROUNDOFF)


def _layer_kernel_norm_bounds(x: jax.Array, dy: jax.Array, layer: Layer, chunk: int,
                              fallback_chunk: int) -> jax.Array:
    """Per example, an upper bound of ``||S_i|| / c_i`` where ``S_i = fl(P_i^T fl(c_i dy_i))`` is what the
    clipped-sum contraction adds for the example with factor ``c_i`` (see the module docstring), for ``chunk``
    examples at a time. Examples whose ghost bound is loose get the materialised bound instead, computed for
    ``fallback_chunk`` examples at a time (one ``lax.cond`` per layer, outside the chunk loop)."""
    p, d = jax.eval_shape(lambda a, b: per_example_matrices(a[:1], b[:1], layer), x, dy)
    t, k, o = p.shape[1], p.shape[2], d.shape[2]
    if t == 1:  # one position: the norm is a product of two vector norms, computed directly
        return over_chunks(lambda a, b: _rank_one_bounds(*per_example_matrices(a, b, layer)), (x, dy), chunk,
                           reduce=False)
    if not _uses_ghost(t, k, o):
        return over_chunks(lambda a, b: _materialised_bounds(*per_example_matrices(a, b, layer)), (x, dy), chunk,
                           reduce=False)
    parts = over_chunks(lambda a, b: _ghost_parts(*per_example_matrices(a, b, layer)), (x, dy), chunk,
                        reduce=False)
    ghost, loose, abs_norm = parts[:, 0], parts[:, 1] > 0, parts[:, 2]

    def materialised():
        norms = over_chunks(lambda a, b: _materialised_norms(*per_example_matrices(a, b, layer)), (x, dy),
                            fallback_chunk, reduce=False)
        return jnp.where(loose, norms + _gamma(t) * abs_norm, ghost)

    return lax.cond(jnp.any(loose), materialised, lambda: ghost) + _sum_error(t) * abs_norm


def _stored_kernel_grads(x: jax.Array, dy: jax.Array, layer: Layer, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Every example's weight gradient, transposed, ``G_i = fl(D_i^T P_i)`` ``[B, O, K]`` (output channels first:
    faster than ``[B, K, O]`` on XLA's CPU backend in one-off timings), and its squared norm ``[B]``, for ``chunk``
    examples at a time. An example whose squared norm is not finite (NaN or inf in ``G_i``, or an overflow) has
    its ``G_i`` returned as zeros, so that a weighted sum with weight 0 for it is exact without masking the whole
    array again; its norm stays non-finite, which excludes it (:func:`core.leaf_weights`). Both are computed while
    the chunk is in the cache.

    Each chunk is computed as two independent halves: XLA's CPU runtime runs the iterations of the chunk loop
    one after the other, each op on one thread, and the first layer's loop (whose output gradient comes last in
    the backward pass) ran alone at the end of the step; with two independent chains per iteration it can use a
    second thread."""

    def half(a, b):
        p, d = per_example_matrices(a, b, layer)
        g = jnp.einsum("bto,btk->bok", d, p, precision=_HIGHEST)
        sq = jnp.sum(jnp.square(g), axis=(1, 2))
        return core.batch_where(jnp.isfinite(sq), g), sq

    def part(a, b):
        h = a.shape[0] // 2
        if h == 0:
            return half(a, b)
        (g1, sq1), (g2, sq2) = half(a[:h], b[:h]), half(a[h:], b[h:])
        return jnp.concatenate([g1, g2]), jnp.concatenate([sq1, sq2])

    return over_chunks(part, (x, dy), chunk, reduce=False)


def _dims(x: jax.Array, layer: Layer, out_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(T, K, O)`` of one example's ``P_i`` ``[T, K]`` and ``D_i`` ``[T, O]`` for a layer with input ``x``."""
    t = max(1, int(np.prod(out_shape[:-1])))
    k = x.shape[-1] * (layer.kernel_size[0] * layer.kernel_size[1] if layer.kind == "conv" else 1)
    return t, k, out_shape[-1]


def _stored_bytes(x: jax.Array, layer: Layer, out_shape: tuple[int, ...]) -> int | None:
    """Bytes of a layer's per-example weight gradients for the chunk ``x``, or None where the ghost form is
    cheaper (those layers are never stored; see DEFAULT_MAX_STORED_BYTES)."""
    t, k, o = _dims(x, layer, out_shape)
    return None if _uses_ghost(t, k, o) else 4 * x.shape[0] * k * o


def _patch_bytes(x: jax.Array, layer: Layer, out_shape: tuple[int, ...], materialised: bool = False,
                 patches_only: bool = False) -> int:
    """Bytes of one example's patches ``P_i`` plus (unless ``patches_only``) its Gram or (``materialised``)
    weight-gradient matrix."""
    t, k, o = _dims(x, layer, out_shape)
    if patches_only:
        return 4 * t * k
    return 4 * (t * k + (t * t if _uses_ghost(t, k, o) and not materialised else k * o))


# --------------------------------------------------------------------------------------------------------
# Which layer calls take the fast path, and where their parameters are among params' leaves.


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_index(params: PyTree) -> dict[tuple[str, ...], int]:
    paths = [tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {p: i for i, p in enumerate(paths)}


def _find(index: dict[tuple[str, ...], int], path: tuple[str, ...], name: str) -> int | None:
    for candidate in (path + (name,), ("params",) + path + (name,)):
        if candidate in index:
            return index[candidate]
    return None


_SHARED = "parameters not found at the module path, or layer called twice"
_TRANSFORMED = ("its parameters are not the leaves of params that loss_fn was given (transformed on the way, e.g. "
                "by nn.WeightNorm or by loss_fn itself)")
_LIFTED = "called inside a transform (nn.remat, nn.vmap, nn.scan, jax.checkpoint, ...)"
_USED_ELSEWHERE = "its parameters are also used outside the layer call (e.g. tied weights, a weight penalty)"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Every Conv/Dense call of ``loss_fn`` in call order, and for each where its parameters are among
    ``params``' leaves when it takes the fast path, or why it does not."""

    layers: tuple[Layer, ...]
    kernel_leaf: tuple[int | None, ...]  # per call: leaf index of its kernel (None: not on the fast path)
    bias_leaf: tuple[int | None, ...]
    out_shapes: tuple[tuple[int, ...], ...]  # per call: output shape for one example
    fallback: tuple[str | None, ...]  # per call: why it falls back to per-example vmap (None: fast)

    @property
    def fast(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kernel_leaf) if k is not None)


def _make_plan(loss_fn: core.LossFn, params: PyTree, inputs: jax.Array, labels: jax.Array) -> _Plan:
    """Traces ``loss_fn`` on one example and decides, per Conv/Dense call, whether the fast path is exact.

    The fast path computes a layer from the leaves of ``params`` found at its module path and takes their
    gradient from the layer's output gradient alone. That is the gradient of ``loss_fn`` only if (a) the layer
    receives exactly those leaves (no transformation between ``params`` and the layer: checked by identity of
    the traced values the layer receives), (b) the call runs under ``loss_fn``'s own trace, not inside a
    lifted or JAX transform, and (c) the leaves are used nowhere else: the trace computes every candidate
    layer from stand-in copies of its leaves, and the jaxpr must then not use the real leaves at all.
    A call that fails any check falls back to per-example ``jax.vmap`` gradients, with the reason recorded.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    index = _leaf_index(params)
    calls: list[dict] = []

    def traced(real, stand_in, x, y):
        top = get_opaque_trace_state(convention="flax")

        def record(next_fun, args, kwargs, context):
            if not is_layer_call(context):
                return next_fun(*args, **kwargs)
            module, x_in = context.module, layer_input(args, kwargs)
            layer = describe(module, x_in)
            k = _find(index, layer.path, "kernel")
            b = _find(index, layer.path, "bias") if layer.use_bias else None
            received = module.variables.get("params", {})
            why = layer.unsupported
            if why is None and get_opaque_trace_state(convention="flax") != top:
                why = _LIFTED
            if why is None and (k is None or (layer.use_bias and b is None)
                                or leaves[k].ndim != (4 if layer.kind == "conv" else 2)):
                why = _SHARED
            if why is None and (received.get("kernel") is not real[k]
                                or (layer.use_bias and received.get("bias") is not real[b])):
                why = _TRANSFORMED
            if why is None:  # computed from the stand-ins: any use of real[k] / real[b] left is a use elsewhere
                out = layer_forward(x_in, stand_in[k], None if b is None else stand_in[b], layer, 0)
            else:
                out = next_fun(*args, **kwargs)
            calls.append(dict(layer=layer, kernel=k, bias=b, why=why, out_shape=tuple(out.shape)))
            return out

        with nn.intercept_methods(record):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, real), x, y)

    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    # Arrays or shape specs, or pytrees of them (a batch may be any pytree with the example axis first).
    one = functools.partial(jax.tree_util.tree_map,
                            lambda a: jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype))
    specs = [spec(leaf) for leaf in leaves]
    # A fresh function object each time, so that no cached trace skips the interceptor.
    jaxpr = jax.make_jaxpr(lambda *a: traced(*a))(specs, specs, one(inputs), one(labels)).jaxpr
    real_vars = jaxpr.invars[: len(leaves)]
    used = {v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, Var)}
    used |= {v for v in jaxpr.outvars if isinstance(v, Var)}
    used_leaves = {j for j, v in enumerate(real_vars) if v in used}

    calls_per_path: dict[tuple[str, ...], int] = {}
    for call in calls:
        calls_per_path[call["layer"].path] = calls_per_path.get(call["layer"].path, 0) + 1
    for call in calls:
        if call["why"] is None and calls_per_path[call["layer"].path] > 1:
            call["why"] = _SHARED
        if call["why"] is None and {call["kernel"], call["bias"]} & used_leaves:
            call["why"] = _USED_ELSEWHERE
    fast = [call["why"] is None for call in calls]
    return _Plan(
        layers=tuple(call["layer"] for call in calls),
        kernel_leaf=tuple(call["kernel"] if ok else None for call, ok in zip(calls, fast, strict=True)),
        bias_leaf=tuple(call["bias"] if ok else None for call, ok in zip(calls, fast, strict=True)),
        out_shapes=tuple(call["out_shape"] for call in calls),
        fallback=tuple(call["why"] for call in calls),
    )


def fast_path_layers(loss_fn: core.LossFn, params: PyTree, inputs: Any, labels: Any) -> list[tuple[Layer, str | None]]:
    """Every ``nn.Conv`` / ``nn.Dense`` call of ``loss_fn`` in call order, with why it falls back to per-example
    vmap in ``"bookkeeping"`` (None: on the fast path). ``params``, ``inputs``, ``labels`` may be arrays or
    ``jax.ShapeDtypeStruct`` s."""
    plan = _make_plan(loss_fn, params, inputs, labels)
    return list(zip(plan.layers, plan.fallback, strict=True))


def fast_path_report(loss_fn: core.LossFn, params: PyTree, inputs: jax.Array, labels: jax.Array) -> list[str]:
    """One line per ``nn.Conv`` / ``nn.Dense`` call of ``loss_fn``: whether ``"bookkeeping"`` handles it
    with ghost norms, and if not, why (so a user can see which layers fall back to per-example vmap)."""
    lines = []
    for layer, why in fast_path_layers(loss_fn, params, inputs, labels):
        name = "/".join(layer.path) or "<root>"
        lines.append(f"{name}: fast ({layer.kind})" if why is None else f"{name}: per-example vmap fallback ({why})")
    return lines


# --------------------------------------------------------------------------------------------------------
# The strategy.


def _interceptor(plan: _Plan, on_layer: Callable) -> Callable:
    """A Flax method interceptor calling ``on_layer(call_index, layer, module, x, next_fun)`` for every
    ``nn.Conv`` / ``nn.Dense`` call, in the order recorded by the plan."""
    counter = [0]

    def intercept(next_fun, args, kwargs, context):
        if not is_layer_call(context):
            return next_fun(*args, **kwargs)
        i = counter[0]
        counter[0] += 1
        path = module_path(context.module)
        if i >= len(plan.layers) or plan.layers[i].path != path:
            raise RuntimeError(
                f"loss_fn called its layers in a different order than when it was first traced (call {i} is "
                f"{'/'.join(path)}). The fast clipping strategies need a loss_fn whose layer calls do not "
                "depend on data; use strategy='vmap'."
            )
        x = layer_input(args, kwargs)
        return on_layer(i, plan.layers[i], context.module, x, lambda: next_fun(*args, **kwargs))

    return intercept


def _bookkeeping_chunk(loss_fn: core.LossFn, l2_clip_norm: float | PyTree, clip_rule: core.ClipRule | None,
                       params: PyTree, inputs: jax.Array, labels: jax.Array, mask: jax.Array, clip_args: PyTree,
                       *, max_pixels: int, max_patch_bytes: int, max_stored_bytes: int):
    plan = _make_plan(loss_fn, params, inputs, labels)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    fast = plan.fast
    fast_leaves = {plan.kernel_leaf[i] for i in fast} | {plan.bias_leaf[i] for i in fast if plan.layers[i].use_bias}
    slow_ids = [j for j in range(len(leaves)) if j not in fast_leaves]

    def single_example(slow_params, taps, x, y):
        merged = list(leaves)
        for j, leaf in zip(slow_ids, slow_params, strict=True):
            merged[j] = leaf
        kept_inputs = []

        def on_layer(i, layer, module, layer_x, call_original):
            if plan.kernel_leaf[i] is None:
                return call_original()
            bias = merged[plan.bias_leaf[i]] if layer.use_bias else None
            out = layer_forward(layer_x, merged[plan.kernel_leaf[i]], bias, layer, max_pixels)
            kept_inputs.append(layer_x)
            return out + taps[fast.index(i)]

        with nn.intercept_methods(_interceptor(plan, on_layer)):
            loss = loss_fn(jax.tree_util.tree_unflatten(treedef, merged), core.one_example(x), core.one_example(y))
        return loss, kept_inputs

    slow_params = [leaves[j] for j in slow_ids]
    taps = [jnp.zeros(plan.out_shapes[i], jnp.float32) for i in fast]
    per_example = jax.vmap(jax.value_and_grad(single_example, argnums=(0, 1), has_aux=True),
                           in_axes=(None, None, 0, 0))
    (losses, layer_inputs), (slow_grads, out_grads) = per_example(slow_params, taps, inputs, labels)

    # Per-example squared norms of every parameter leaf, in leaf order. A small layer's per-example weight
    # gradients are formed once and kept (its norms are then those of the very vectors summed). A larger layer's
    # patches are formed twice (for its norms, then for its clipped sum), each time for as many examples at a
    # time as fit in max_patch_bytes: they never live from the norms to the clipped sum, and a large layer's
    # never exist for the whole batch. Bias gradients (sums of dy over positions) are always kept: [B, O].
    batch = mask.shape[0]
    sq = [None] * len(leaves)
    stored, bias_grads, stored_total, chunks = {}, {}, 0, {}
    for j, g in zip(slow_ids, slow_grads, strict=True):
        sq[j] = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
    for n, i in enumerate(fast):
        layer, x, dy = plan.layers[i], layer_inputs[n], out_grads[n]
        size = _stored_bytes(x, layer, plan.out_shapes[i])
        if size is not None and stored_total + size <= max_stored_bytes:  # all kept layers within the budget
            stored_total += size
            chunk = max(1, _STORED_PATCH_BYTES // _patch_bytes(x, layer, plan.out_shapes[i], patches_only=True))
            stored[i], sq[plan.kernel_leaf[i]] = _stored_kernel_grads(x, dy, layer, chunk)
        else:
            # Upper bounds of the norms of what the clipped-sum contractions below add per unit factor (see the
            # module docstring), so that no example contributes more than its factor allows.
            chunks[i] = max(1, max_patch_bytes // _patch_bytes(x, layer, plan.out_shapes[i]))
            fallback_chunk = max(1, max_patch_bytes // _patch_bytes(x, layer, plan.out_shapes[i], materialised=True))
            bounds = _layer_kernel_norm_bounds(x, dy, layer, chunks[i], fallback_chunk)
            sq[plan.kernel_leaf[i]] = jnp.square(bounds)
        if layer.use_bias:
            bias_grads[i] = jnp.sum(dy.reshape(batch, -1, dy.shape[-1]), axis=1)
            sq[plan.bias_leaf[i]] = jnp.sum(jnp.square(bias_grads[i]), axis=1)
    weights, norms, live = core.leaf_weights(sq, treedef, mask, l2_clip_norm, clip_rule, clip_args)

    clipped = [None] * len(leaves)
    for j, g in zip(slow_ids, slow_grads, strict=True):
        clipped[j] = core.weighted_sum(weights[j], g, live)
    for n, i in enumerate(fast):
        layer, k = plan.layers[i], plan.kernel_leaf[i]
        if i in stored:
            # Examples not live have weight 0 and finite (zeroed where not) stored gradients: no mask needed.
            clipped[k] = jnp.tensordot(weights[k], stored[i], axes=1).T.reshape(leaves[k].shape)
        else:
            x, dy = core.batch_where(live, layer_inputs[n]), core.batch_where(live, out_grads[n])
            # Book-keeping: the clipped sum of the layer's per-example weight gradients as one matmul of patches
            # and per-example scaled output gradients, ``sum_i P_i^T (c_i dy_i)`` (chunk by chunk).
            scaled = dy * weights[k].reshape((-1,) + (1,) * (dy.ndim - 1))
            clipped[k] = summed_kernel_grad(x, scaled, layer, chunks[i]).reshape(leaves[k].shape)
        if layer.use_bias:
            b = plan.bias_leaf[i]
            clipped[b] = core.weighted_sum(weights[b], bias_grads[i], live).reshape(leaves[b].shape)
    return jax.tree_util.tree_unflatten(treedef, clipped), norms, losses


def bookkeeping_strategy(loss_fn: core.LossFn, l2_clip_norm: float | PyTree, clip_rule: core.ClipRule | None, *,
                         max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS,
                         max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
                         max_stored_bytes: int = DEFAULT_MAX_STORED_BYTES) -> core.ChunkFn:
    """Builder of the ``"bookkeeping"`` strategy. Options: ``max_pixels`` (convolutions on maps of at most this
    many pixels run as patches x matmul in the forward pass), ``max_patch_bytes`` and ``max_stored_bytes`` (see
    the module docstring)."""

    def chunk(params, inputs, labels, mask, clip_args):
        return _bookkeeping_chunk(loss_fn, l2_clip_norm, clip_rule, params, inputs, labels, mask, clip_args,
                                  max_pixels=max_pixels, max_patch_bytes=max_patch_bytes,
                                  max_stored_bytes=max_stored_bytes)

    return chunk


core.register_strategy("bookkeeping", bookkeeping_strategy)
