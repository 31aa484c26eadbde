"""The ``"bookkeeping"`` strategy: ghost norms and book-keeping for Flax models, per-example gradients never formed.

Book-keeping DP-SGD (Bu et al. 2023) with mixed ghost norms (Li et al. 2021; Bu et al. 2022). One forward and
one backward pass, like non-private training. While ``loss_fn`` runs, every ``flax.linen.Conv`` and
``flax.linen.Dense`` call is intercepted (``flax.linen.intercept_methods``): the layer is computed here, its
input is kept, and a zero "tap" is added to its output, whose gradient is the layer's per-example output
gradient ``dy_i``. The backward pass then only propagates gradients to the inputs of the layers; their weight
gradients are never formed per example. Each example's squared weight-gradient norm ``||P_i^T dy_i||^2``
(``P_i``: the example's input patches, ``[T, K]``; ``dy_i``: ``[T, O]``) is computed per layer either from the
"ghost" Gram form ``sum (P_i P_i^T) * (dy_i dy_i^T)`` (cost ``T^2 (K+O)``) or from the materialised
``P_i^T dy_i`` (cost ``T K O``), whichever is cheaper for that layer's shape. With the clip factors ``c_i``
known, each layer's clipped gradient is one ordinary matmul ``sum_i P_i^T (c_i dy_i)``. Parameters outside
intercepted layers (GroupNorm scales and biases, anything else) get ordinary per-example gradients by
``jax.vmap``, which is cheap for small parameter sets.

Memory: the patches ``P`` (``kh*kw`` times a layer's input) are formed from the kept layer inputs twice, for
the norms and again for the clipped sum, each time for as many examples at a time as fit in
``max_patch_bytes`` (default :data:`DEFAULT_MAX_PATCH_BYTES`, 16 MiB; chunks run in a ``lax.fori_loop``). What
the step holds beyond non-private backpropagation is then every layer's output gradient ``dy`` (until the clip
factors are known) and one chunk's patches; the README's performance section has the measurements.

Requirements of ``loss_fn`` (checked where possible, otherwise documented):

* It applies a Flax ``linen`` model to the parameters it is given, unchanged: ``model.apply({"params":
  params}, x)`` (or ``params`` being the whole variables dict). A layer is handled by the fast path when its
  parameters are found in ``params`` at the layer's module path (``params[...path...]["kernel"]``).
* A layer's parameters are used only by that layer and the layer is called once per example. A layer called
  twice (weight sharing), an unsupported configuration (grouped, dilated, masked, circular/reflect padded,
  1D/3D or non-float32 convolutions; custom ``dot_general``) and parameters whose location cannot be found
  fall back to per-example ``jax.vmap`` gradients: still correct, not faster. :func:`fast_path_report` lists
  which layers take which path, and why.
* Examples are evaluated one at a time (each example is a batch of one for ``loss_fn``, as in ``"vmap"``), so
  the result is that of ``"vmap"`` even for models whose examples would interact in a batched call.

Example::

    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=5.0, strategy="bookkeeping"))
    clipped_sum, norms = grad_fn(params, images, labels, mask)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdp.clipping import core
from jaxdp.clipping.layers import (
    DEFAULT_MATMUL_MAX_PIXELS,
    Layer,
    describe,
    is_layer_call,
    layer_forward,
    layer_input,
    module_path,
    per_example_matrices,
)

PyTree = Any

# "bookkeeping" forms a layer's image patches (with the per-example Gram / gradient matrices of its norms) for
# as many examples at a time as fit in this many bytes.
DEFAULT_MAX_PATCH_BYTES = 16 * 2**20


# --------------------------------------------------------------------------------------------------------
# Per-example weight-gradient norms of one layer.


def _uses_ghost(t: int, k: int, o: int) -> bool:
    """Whether the Gram ("ghost") form is cheaper: ``T^2 (K + O)`` multiply-adds against ``T K O``."""
    return t * (k + o) < k * o


def _kernel_sq_norms(p: jax.Array, d: jax.Array) -> jax.Array:
    """``||P_i^T D_i||_F^2`` per example, by the cheaper of the ghost (Gram) and the materialised form."""
    _, t, k = p.shape
    if _uses_ghost(t, k, d.shape[-1]):
        gram_p = jnp.einsum("btk,bsk->bts", p, p)
        gram_d = jnp.einsum("bto,bso->bts", d, d)
        return jnp.sum(gram_p * gram_d, axis=(1, 2))
    per_example = jnp.einsum("btk,bto->bko", p, d)
    return jnp.sum(jnp.square(per_example), axis=(1, 2))


def _over_chunks(fn: Callable, arrays: Sequence[jax.Array], chunk: int, reduce: bool) -> jax.Array:
    """``fn`` applied to consecutive chunks of ``chunk`` examples of ``arrays`` (sliced in place, one chunk
    alive at a time, by ``lax.fori_loop``; a shorter last chunk is one more call). ``reduce``: sum the
    results; else concatenate them along the example axis."""
    batch = arrays[0].shape[0]
    full, rest = divmod(batch, chunk)
    tail = [a[full * chunk:] for a in arrays] if rest else None
    if full <= 1:
        parts = ([fn(*[a[:chunk] for a in arrays])] if full else []) + ([fn(*tail)] if rest else [])
        return sum(parts[1:], parts[0]) if reduce else jnp.concatenate(parts)
    shape = jax.eval_shape(fn, *[a[:chunk] for a in arrays])

    def body(n, acc):
        out = fn(*[lax.dynamic_slice_in_dim(a, n * chunk, chunk) for a in arrays])
        return acc + out if reduce else lax.dynamic_update_slice_in_dim(acc, out, n * chunk, 0)

    init = jnp.zeros(shape.shape if reduce else (full * chunk,) + shape.shape[1:], shape.dtype)
    result = lax.fori_loop(0, full, body, init)
    if rest:
        result = result + fn(*tail) if reduce else jnp.concatenate([result, fn(*tail)])
    return result


def _layer_kernel_sq_norms(x: jax.Array, dy: jax.Array, layer: Layer, chunk: int) -> jax.Array:
    """Per-example ``||P_i^T dy_i||^2`` of one layer, for ``chunk`` examples at a time, so that only one
    chunk's patches (and per-example Gram or gradient matrices) exist at once. ``x`` / ``dy``: the layer's
    inputs / output gradients with a leading example axis."""
    return _over_chunks(lambda a, b: _kernel_sq_norms(*per_example_matrices(a, b, layer)), (x, dy), chunk,
                        reduce=False)


def _patch_kernel_grad(x: jax.Array, g: jax.Array, layer: Layer, chunk: int) -> jax.Array:
    """``sum_i P_i^T g_i`` (``[K, O]``), for ``chunk`` examples at a time."""

    def part(a, b):
        p, d = per_example_matrices(a, b, layer)
        return jnp.einsum("btk,bto->ko", p, d)

    return _over_chunks(part, (x, g), chunk, reduce=True)


def _patch_bytes(x: jax.Array, layer: Layer, out_shape: tuple[int, ...]) -> int:
    """Bytes of one example's patches ``P_i`` plus its Gram or weight-gradient matrix in the norm."""
    t = max(1, int(np.prod(out_shape[:-1])))
    k = x.shape[-1] * (layer.kernel_size[0] * layer.kernel_size[1] if layer.kind == "conv" else 1)
    o = out_shape[-1]
    return 4 * (t * k + (t * t if _uses_ghost(t, k, o) else k * o))


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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Every Conv/Dense call of ``loss_fn`` in call order, and for each where its parameters are among
    ``params``' leaves when it takes the fast path."""

    layers: tuple[Layer, ...]
    kernel_leaf: tuple[int | None, ...]  # per call: leaf index of its kernel (None: not on the fast path)
    bias_leaf: tuple[int | None, ...]
    out_shapes: tuple[tuple[int, ...], ...]  # per call: output shape for one example

    @property
    def fast(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kernel_leaf) if k is not None)


def _make_plan(loss_fn: core.LossFn, params: PyTree, inputs: jax.Array, labels: jax.Array) -> _Plan:
    layers: list[Layer] = []
    out_shapes: list[tuple[int, ...]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if is_layer_call(context):
            layers.append(describe(context.module, layer_input(args, kwargs)))
            out_shapes.append(tuple(out.shape))
        return out

    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    # A fresh function object each time: eval_shape caches traces by function, and a cached trace would not
    # run the interceptor.
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, a, b: loss_fn(p, a, b),
                       jax.tree_util.tree_map(spec, params), spec(inputs[:1]), spec(labels[:1]))

    leaves = jax.tree_util.tree_leaves(params)
    index = _leaf_index(params)
    calls_per_path: dict[tuple[str, ...], int] = {}
    for layer in layers:
        calls_per_path[layer.path] = calls_per_path.get(layer.path, 0) + 1
    kernel_leaf: list[int | None] = []
    bias_leaf: list[int | None] = []
    for layer in layers:
        k = _find(index, layer.path, "kernel")
        b = _find(index, layer.path, "bias") if layer.use_bias else None
        ok = (layer.unsupported is None and calls_per_path[layer.path] == 1 and k is not None
              and (b is not None or not layer.use_bias) and leaves[k].ndim == (4 if layer.kind == "conv" else 2))
        kernel_leaf.append(k if ok else None)
        bias_leaf.append(b if ok else None)
    return _Plan(tuple(layers), tuple(kernel_leaf), tuple(bias_leaf), tuple(out_shapes))


def fast_path_report(loss_fn: core.LossFn, params: PyTree, inputs: jax.Array, labels: jax.Array) -> list[str]:
    """One line per ``nn.Conv`` / ``nn.Dense`` call of ``loss_fn``: whether ``"bookkeeping"`` handles it
    with ghost norms, and if not, why (so a user can see which layers fall back to per-example vmap)."""
    plan = _make_plan(loss_fn, params, inputs, labels)
    lines = []
    for layer, kernel in zip(plan.layers, plan.kernel_leaf, strict=True):
        name = "/".join(layer.path) or "<root>"
        if kernel is not None:
            lines.append(f"{name}: fast ({layer.kind})")
        else:
            why = layer.unsupported or "parameters not found at the module path, or layer called twice"
            lines.append(f"{name}: per-example vmap fallback ({why})")
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
                       *, max_pixels: int, max_patch_bytes: int):
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
            loss = loss_fn(jax.tree_util.tree_unflatten(treedef, merged), x[None], y[None])
        return loss, kept_inputs

    slow_params = [leaves[j] for j in slow_ids]
    taps = [jnp.zeros(plan.out_shapes[i], jnp.float32) for i in fast]
    per_example = jax.vmap(jax.value_and_grad(single_example, argnums=(0, 1), has_aux=True),
                           in_axes=(None, None, 0, 0))
    (losses, layer_inputs), (slow_grads, out_grads) = per_example(slow_params, taps, inputs, labels)

    # Per-example squared norms of every parameter leaf, in leaf order. A layer's patches are formed twice (for
    # its norms, then for its clipped sum), each time for as many examples at a time as fit in max_patch_bytes:
    # they never live from the norms to the clipped sum, and a large layer's never exist for the whole batch.
    batch = inputs.shape[0]
    chunks = {i: max(1, max_patch_bytes // _patch_bytes(layer_inputs[n], plan.layers[i], plan.out_shapes[i]))
              for n, i in enumerate(fast)}
    sq = [None] * len(leaves)
    for j, g in zip(slow_ids, slow_grads, strict=True):
        sq[j] = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
    for n, i in enumerate(fast):
        layer, dy = plan.layers[i], out_grads[n]
        sq[plan.kernel_leaf[i]] = _layer_kernel_sq_norms(layer_inputs[n], dy, layer, chunks[i])
        if layer.use_bias:
            d = dy.reshape(batch, -1, dy.shape[-1])
            sq[plan.bias_leaf[i]] = jnp.sum(jnp.square(jnp.sum(d, axis=1)), axis=1)
    weights, norms, live = core.leaf_weights(sq, treedef, mask, l2_clip_norm, clip_rule, clip_args)

    clipped = [None] * len(leaves)
    for j, g in zip(slow_ids, slow_grads, strict=True):
        clipped[j] = core.weighted_sum(weights[j], g, live)
    for n, i in enumerate(fast):
        layer = plan.layers[i]
        x, dy = core.batch_where(live, layer_inputs[n]), core.batch_where(live, out_grads[n])
        k = plan.kernel_leaf[i]
        # Book-keeping: the clipped sum of the layer's per-example weight gradients as one matmul of patches
        # and per-example scaled output gradients, ``sum_i P_i^T (c_i dy_i)`` (chunk by chunk for a large layer).
        scaled = dy * weights[k].reshape((-1,) + (1,) * (dy.ndim - 1))
        clipped[k] = _patch_kernel_grad(x, scaled, layer, chunks[i]).reshape(leaves[k].shape)
        if layer.use_bias:
            b = plan.bias_leaf[i]
            clipped[b] = jnp.einsum("bto,b->o", dy.reshape(batch, -1, dy.shape[-1]), weights[b]).reshape(
                leaves[b].shape)
    return jax.tree_util.tree_unflatten(treedef, clipped), norms, losses


def bookkeeping_strategy(loss_fn: core.LossFn, l2_clip_norm: float | PyTree, clip_rule: core.ClipRule | None, *,
                         max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS,
                         max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> core.ChunkFn:
    """Builder of the ``"bookkeeping"`` strategy. Options: ``max_pixels`` (convolutions on maps of at most this
    many pixels run as patches x matmul in the forward pass) and ``max_patch_bytes`` (see the module docstring)."""

    def chunk(params, inputs, labels, mask, clip_args):
        return _bookkeeping_chunk(loss_fn, l2_clip_norm, clip_rule, params, inputs, labels, mask, clip_args,
                                  max_pixels=max_pixels, max_patch_bytes=max_patch_bytes)

    return chunk


core.register_strategy("bookkeeping", bookkeeping_strategy)
