"""Fast per-example clipping: ghost norms and book-keeping for Flax models, and convolutions as matmuls.

Every strategy here computes *exactly* what ``clipped_grad(..., strategy="vmap")`` computes (same clipped sum
and per-example norms, to float tolerance; the guarantee is the one stated in :mod:`jaxdp.clipping`), only
faster. They are selected with ``jaxdp.clipped_grad(loss_fn, C, strategy=NAME)``:

``"bookkeeping"`` (the fast one)
    Book-keeping DP-SGD (Bu et al. 2023) with mixed ghost norms (Li et al. 2021; Bu et al. 2022). One forward
    and one backward pass, like non-private training. While ``loss_fn`` runs, every ``flax.linen.Conv`` and
    ``flax.linen.Dense`` call is intercepted (``flax.linen.intercept_methods``): the layer is computed here,
    its input is kept, and a zero "tap" is added to its output, whose gradient is the layer's per-example
    output gradient ``dy_i``. The backward pass then only propagates gradients to the inputs of the layers;
    their weight gradients are never formed per example. Each example's squared weight-gradient norm
    ``||P_i^T dy_i||^2`` (``P_i``: the example's input patches, ``[T, K]``; ``dy_i``: ``[T, O]``) is computed
    per layer either from the "ghost" Gram form ``sum (P_i P_i^T) * (dy_i dy_i^T)`` (cost ``T^2 (K+O)``) or
    from the materialised ``P_i^T dy_i`` (cost ``T K O``), whichever is cheaper for that layer's shape. With
    the clip factors ``c_i`` known, each layer's clipped gradient is one ordinary matmul
    ``sum_i P_i^T (c_i dy_i)``. Parameters outside intercepted layers (GroupNorm scales and biases, anything
    else) get ordinary per-example gradients by ``jax.vmap``, which is cheap for small parameter sets.

    Memory: the patches ``P`` (``kh*kw`` times a layer's input) are formed from the kept layer inputs twice,
    for the norms and again for the clipped sum, each time for as many examples at a time as fit in
    ``max_patch_bytes`` (default :data:`DEFAULT_MAX_PATCH_BYTES`, 16 MiB; chunks run in a ``lax.fori_loop``).
    What the step holds beyond non-private backpropagation is then every layer's output gradient ``dy``
    (until the clip factors are known) and one chunk's patches. Measured on the GroupNorm ResNet18, 64x64,
    batch 256 (2-core CPU, 2026-11-29; ``python launch/bench.py --image-size 64 --batch-size 256 --strategies
    bookkeeping --rounds 1``): peak memory of the full DP step 1267 MB, 1.03x the non-private step's (before:
    2270 MB, 1.84x, with every layer's patches formed for the whole batch and kept from the norms to the
    clipped sum), and the step got faster too (54.0 against 48.1 examples/s side by side: a smaller working
    set). Forming the clipped sum of large-map layers as XLA's convolution weight gradient instead
    (``jax.linear_transpose`` of the convolution, no patches) was measured and was slower on this CPU: norms
    plus clipped sum at batch 256 took 1.0 s that way against 0.46 s with chunked patches for the 7x7 3->64
    stem, 0.64 s against 0.37 s for a 3x3 64->64 convolution on 16x16; so it is not used.

``"vmap_matmul"``
    The ``"vmap"`` strategy with convolutions on small feature maps computed as image patches times a weight
    matrix. XLA's CPU convolution is very slow on small maps with many channels (3x3 512->512 on a 2x2 map:
    1.6 GFLOP/s, see the benchmark), so this alone is a large speed-up on ResNets at 64x64 input. It still
    materialises per-example gradients (memory grows like ``batch * num_params``).

Requirements of ``loss_fn`` for ``"bookkeeping"`` (checked where possible, otherwise documented):

* It applies a Flax ``linen`` model to the parameters it is given, unchanged: ``model.apply({"params":
  params}, x)`` (or ``params`` being the whole variables dict). A layer is handled by the fast path when its
  parameters are found in ``params`` at the layer's module path (``params[...path...]["kernel"]``).
* A layer's parameters are used only by that layer and the layer is called once per example. A layer called
  twice (weight sharing), an unsupported configuration (grouped, dilated, masked, circular/reflect padded,
  1D/3D or non-float32 convolutions; custom ``dot_general``) and parameters whose location cannot be
  found fall back to per-example ``jax.vmap`` gradients: still correct, not faster.
* Examples are evaluated one at a time (each example is a batch of one for ``loss_fn``, as in ``"vmap"``),
  so the result is that of ``"vmap"`` even for models whose examples would interact in a batched call.

Example::

    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=5.0, strategy="bookkeeping"))
    clipped_sum, norms = grad_fn(params, images, labels, mask)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax import lax

from jaxdp import clipping

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

# Convolutions whose input map has at most this many pixels run as patches x matmul. 16 (4x4) is where the
# measured gain is (ResNet18 at 64x64: the last two stages); at larger maps the patch tensors cost more than
# XLA's convolution saves.
DEFAULT_MATMUL_MAX_PIXELS = 16

# "bookkeeping" forms a layer's image patches (with the per-example Gram / gradient matrices of its norms) for
# as many examples at a time as fit in this many bytes.
DEFAULT_MAX_PATCH_BYTES = 16 * 2**20


# --------------------------------------------------------------------------------------------------------
# Layer geometry: which Conv / Dense calls the fast path handles, and how.


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Static description of one intercepted ``nn.Conv`` / ``nn.Dense`` call."""

    path: tuple[str, ...]
    kind: str  # "conv" | "dense"
    use_bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[tuple[int, int], ...] = ((0, 0), (0, 0))
    precision: Any = None
    unsupported: str | None = None  # reason the fast path cannot handle this call


def _is_layer_call(context: Any) -> bool:
    return context.method_name == "__call__" and type(context.module) in (nn.Conv, nn.Dense)


def _describe(module: nn.Module, inputs: jax.Array) -> _Layer:
    path = tuple(str(p) for p in module.scope.path)
    kind = "conv" if type(module) is nn.Conv else "dense"
    reasons = []
    if inputs.dtype != jnp.float32 or module.param_dtype != jnp.float32 or module.dtype not in (None, jnp.float32):
        reasons.append("not float32")
    if kind == "dense":
        if module.dot_general is not None or module.dot_general_cls is not None:
            reasons.append("custom dot_general")
        return _Layer(path, kind, module.use_bias, precision=module.precision,
                      unsupported=", ".join(reasons) or None)

    kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)

    def broadcast(v: Any) -> tuple[int, ...]:
        v = 1 if v is None else v
        return (v,) * len(kernel_size) if isinstance(v, int) else tuple(v)

    if len(kernel_size) != 2 or inputs.ndim < 4:
        reasons.append("not a 2D convolution on [N, H, W, C] inputs")
    if any(d != 1 for d in broadcast(module.input_dilation) + broadcast(module.kernel_dilation)):
        reasons.append("dilated")
    if module.feature_group_count != 1:
        reasons.append("grouped")
    if module.mask is not None:
        reasons.append("masked")
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
        reasons.append("custom conv_general_dilated")
    if reasons:
        return _Layer(path, kind, module.use_bias, unsupported=", ".join(reasons))
    strides = broadcast(module.strides)
    padding = canonicalize_padding(module.padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return _Layer(path, kind, module.use_bias, unsupported=f"padding {padding}")
        pads = tuple(lax.padtype_to_pads(inputs.shape[-3:-1], kernel_size, strides, padding))
    else:
        pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _Layer(path, kind, module.use_bias, tuple(kernel_size), tuple(strides), pads, module.precision)


def _patches(x: jax.Array, layer: _Layer) -> jax.Array:
    """Image patches ``[N, Ho, Wo, kh*kw*C]`` of ``x`` ``[N, H, W, C]``, ordered as ``kernel.reshape(-1, O)``.

    Built from strided slices (not ``conv_general_dilated_patches``) so that its transpose in the backward
    pass is padding and addition, never a convolution.
    """
    (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*layer.pads[0], 0), (*layer.pads[1], 0), (0, 0, 0)])
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    if (kh, kw) == (1, 1):
        return x[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw, :]
    cols = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


def _conv_forward(x: jax.Array, kernel: jax.Array, layer: _Layer, max_pixels: int) -> jax.Array:
    """The convolution of ``nn.Conv`` (no bias): as patches x matmul on small maps, else XLA's convolution."""
    batch_shape = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    if x.shape[1] * x.shape[2] <= max_pixels:
        y = jnp.einsum("nhwk,ko->nhwo", _patches(x, layer), kernel.reshape(-1, kernel.shape[-1]),
                       precision=layer.precision)
    else:
        y = lax.conv_general_dilated(x, kernel, layer.strides, layer.pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=layer.precision)
    return y.reshape(batch_shape + y.shape[1:])


def _layer_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, layer: _Layer,
                   max_pixels: int) -> jax.Array:
    if layer.kind == "conv":
        y = _conv_forward(x, kernel, layer, max_pixels)
    else:
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
    return y if bias is None else y + bias


def _per_example_matrices(x: jax.Array, dy: jax.Array, layer: _Layer) -> tuple[jax.Array, jax.Array]:
    """Per-example layer inputs ``P`` ``[B, T, K]`` and output gradients ``D`` ``[B, T, O]``: the example's
    weight gradient is ``P_i^T D_i``. ``x`` and ``dy`` have a leading example axis."""
    batch = x.shape[0]
    if layer.kind == "conv":
        x = _patches(x.reshape((-1,) + x.shape[-3:]), layer)
    return x.reshape(batch, -1, x.shape[-1]), dy.reshape(batch, -1, dy.shape[-1])


def _kernel_sq_norms(p: jax.Array, d: jax.Array) -> jax.Array:
    """``||P_i^T D_i||_F^2`` per example, by the cheaper of the ghost (Gram) and the materialised form."""
    _, t, k = p.shape
    o = d.shape[-1]
    if t * (k + o) < k * o:  # ghost: B T^2 (K + O) multiply-adds instead of B T K O
        gram_p = jnp.einsum("btk,bsk->bts", p, p)
        gram_d = jnp.einsum("bto,bso->bts", d, d)
        return jnp.sum(gram_p * gram_d, axis=(1, 2))
    per_example = jnp.einsum("btk,bto->bko", p, d)
    return jnp.sum(jnp.square(per_example), axis=(1, 2))


# --------------------------------------------------------------------------------------------------------
# Locating each layer's parameters in the user's params pytree.


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_index(params: PyTree) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], int]]:
    paths = [tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return paths, {p: i for i, p in enumerate(paths)}


def _find(index: dict[tuple[str, ...], int], path: tuple[str, ...], name: str) -> int | None:
    for candidate in (path + (name,), ("params",) + path + (name,)):
        if candidate in index:
            return index[candidate]
    return None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which layer calls take the fast path, and where their parameters are among ``params``' leaves."""

    layers: tuple[_Layer, ...]  # every Conv/Dense call, in call order
    kernel_leaf: tuple[int | None, ...]  # per call: leaf index of its kernel (None: not on the fast path)
    bias_leaf: tuple[int | None, ...]
    out_shapes: tuple[tuple[int, ...], ...]  # per call: output shape for one example

    @property
    def fast(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kernel_leaf) if k is not None)


def _make_plan(loss_fn: LossFn, params: PyTree, inputs: jax.Array, labels: jax.Array) -> _Plan:
    layers: list[_Layer] = []
    out_shapes: list[tuple[int, ...]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _is_layer_call(context):
            x = args[0] if args else kwargs["inputs"]
            layers.append(_describe(context.module, x))
            out_shapes.append(tuple(out.shape))
        return out

    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    # A fresh function object each time: eval_shape caches traces by function, and a cached trace would not
    # run the interceptor.
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, a, b: loss_fn(p, a, b),
                       jax.tree_util.tree_map(spec, params), spec(inputs[:1]), spec(labels[:1]))

    leaves = jax.tree_util.tree_leaves(params)
    _, index = _leaf_index(params)
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


# --------------------------------------------------------------------------------------------------------
# Clip factors (flat or per-layer bounds), shared by the strategies.


def _leaf_weights(sq_norms: list[jax.Array], treedef: Any, mask: jax.Array, l2_clip_norm: float | PyTree):
    """Per-leaf per-example weights ``mask_i * finite_i * min(1, C_l / ||g_i^(l)||)`` and the whole norms.

    ``sq_norms``: each parameter leaf's per-example squared gradient norm ``[B]``, in leaf order.
    """
    norms = jnp.sqrt(sum(sq_norms))
    live = mask & jnp.isfinite(norms)
    if clipping._is_flat(l2_clip_norm):
        bound = float(jax.tree_util.tree_leaves(l2_clip_norm)[0])
        weight = jnp.where(live, clipping._clip_factors(norms, bound), 0.0)
        return [weight] * len(sq_norms), norms, live
    sq_tree = jax.tree_util.tree_unflatten(treedef, sq_norms)

    def group(bound: float, sub: PyTree) -> PyTree:
        group_norm = jnp.sqrt(sum(jax.tree_util.tree_leaves(sub)))
        weight = jnp.where(live, clipping._clip_factors(group_norm, float(bound)), 0.0)
        return jax.tree_util.tree_map(lambda _: weight, sub)

    weights = jax.tree_util.tree_leaves(jax.tree_util.tree_map(group, l2_clip_norm, sq_tree))
    return weights, norms, live


def _batch_where(keep: jax.Array, a: jax.Array) -> jax.Array:
    return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))


# --------------------------------------------------------------------------------------------------------
# Strategies.


def _interceptor(plan: _Plan, on_layer: Callable) -> Callable:
    """A Flax method interceptor calling ``on_layer(call_index, layer, module, x, next_fun)`` for every
    ``nn.Conv`` / ``nn.Dense`` call, in the order recorded by the plan."""
    counter = [0]

    def intercept(next_fun, args, kwargs, context):
        if not _is_layer_call(context):
            return next_fun(*args, **kwargs)
        i = counter[0]
        counter[0] += 1
        path = tuple(str(p) for p in context.module.scope.path)
        if i >= len(plan.layers) or plan.layers[i].path != path:
            raise RuntimeError(
                f"loss_fn called its layers in a different order than when it was first traced (call {i} is "
                f"{'/'.join(path)}). The fast clipping strategies need a loss_fn whose layer calls do not "
                "depend on data; use strategy='vmap'."
            )
        x = args[0] if args else kwargs["inputs"]
        return on_layer(i, plan.layers[i], context.module, x, lambda: next_fun(*args, **kwargs))

    return intercept


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


def _layer_kernel_sq_norms(x: jax.Array, dy: jax.Array, layer: _Layer, chunk: int) -> jax.Array:
    """Per-example ``||P_i^T dy_i||^2`` of one layer, for ``chunk`` examples at a time, so that only one
    chunk's patches (and per-example Gram or gradient matrices) exist at once. ``x`` / ``dy``: the layer's
    inputs / output gradients with a leading example axis."""
    return _over_chunks(lambda a, b: _kernel_sq_norms(*_per_example_matrices(a, b, layer)), (x, dy), chunk,
                        reduce=False)


def _patch_kernel_grad(x: jax.Array, g: jax.Array, layer: _Layer, chunk: int) -> jax.Array:
    """``sum_i P_i^T g_i`` (``[K, O]``), for ``chunk`` examples at a time."""

    def part(a, b):
        p, d = _per_example_matrices(a, b, layer)
        return jnp.einsum("btk,bto->ko", p, d)

    return _over_chunks(part, (x, g), chunk, reduce=True)


def _patch_bytes(x: jax.Array, layer: _Layer, out_shape: tuple[int, ...]) -> int:
    """Bytes of one example's patches ``P_i`` plus its Gram or weight-gradient matrix in the norm."""
    t = max(1, int(np.prod(out_shape[:-1])))
    k = x.shape[-1] * (layer.kernel_size[0] * layer.kernel_size[1] if layer.kind == "conv" else 1)
    o = out_shape[-1]
    return 4 * (t * k + (t * t if t * (k + o) < k * o else k * o))


def _bookkeeping_chunk(loss_fn: LossFn, l2_clip_norm: float | PyTree, params: PyTree, inputs: jax.Array,
                       labels: jax.Array, mask: jax.Array, *, max_pixels: int, max_patch_bytes: int):
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
            out = _layer_forward(layer_x, merged[plan.kernel_leaf[i]], bias, layer, max_pixels)
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
    weights, norms, live = _leaf_weights(sq, treedef, mask, l2_clip_norm)

    clipped = [None] * len(leaves)
    for j, g in zip(slow_ids, slow_grads, strict=True):
        clipped[j] = jnp.tensordot(weights[j], _batch_where(live, g), axes=1)
    for n, i in enumerate(fast):
        layer, x, dy = plan.layers[i], _batch_where(live, layer_inputs[n]), _batch_where(live, out_grads[n])
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


def _vmap_matmul_chunk(loss_fn: LossFn, l2_clip_norm: float | PyTree, params: PyTree, inputs: jax.Array,
                       labels: jax.Array, mask: jax.Array, *, max_pixels: int, max_patch_bytes: int):
    del max_patch_bytes  # per-example gradients are formed here, not patches alone
    fast_loss = matmul_convs(loss_fn, max_pixels)

    def single_example(p, x, y):
        return jax.value_and_grad(fast_loss)(p, x[None], y[None])

    losses, grads = jax.vmap(single_example, in_axes=(None, 0, 0))(params, inputs, labels)
    clipped, norms = clipping.clip_and_sum(grads, mask, l2_clip_norm)
    return clipped, norms, losses


def matmul_convs(loss_fn: LossFn, max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS) -> LossFn:
    """``loss_fn`` with every supported ``nn.Conv`` whose input map has ``<= max_pixels`` pixels computed as
    image patches x weight matrix (same value to float tolerance; gradients flow as usual).

    Useful on its own for fast non-private training on CPU; used by the ``"vmap_matmul"`` strategy.
    """

    def intercept(next_fun, args, kwargs, context):
        if not _is_layer_call(context) or type(context.module) is not nn.Conv:
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        layer = _describe(context.module, x)
        if layer.unsupported is not None or x.shape[-3] * x.shape[-2] > max_pixels:
            return next_fun(*args, **kwargs)
        variables = context.module.variables["params"]
        return _layer_forward(x, variables["kernel"], variables.get("bias"), layer, max_pixels)

    @functools.wraps(loss_fn)
    def wrapped(params, inputs, labels):
        with nn.intercept_methods(intercept):
            return loss_fn(params, inputs, labels)

    return wrapped


def _builder(chunk_fn: Callable) -> Callable:
    def build(loss_fn: LossFn, l2_clip_norm: float | PyTree = 5.0, microbatch_size: int | None = None,
              return_loss: bool = False, *, max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS,
              max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> Callable:
        clipping.validate_clip_norm(l2_clip_norm)
        chunk = functools.partial(chunk_fn, loss_fn, l2_clip_norm, max_pixels=max_pixels,
                                  max_patch_bytes=max_patch_bytes)

        def grad_fn(params, inputs, labels, mask):
            if microbatch_size is None or microbatch_size >= mask.shape[0]:
                clipped, norms, losses = chunk(params, inputs, labels, mask)
            else:
                clipped, norms, losses = clipping._microbatched(chunk, microbatch_size, params, inputs,
                                                                labels, mask)
            return (clipped, norms, losses) if return_loss else (clipped, norms)

        return grad_fn

    return build


STRATEGIES: dict[str, Callable[..., Callable]] = {
    "bookkeeping": _builder(_bookkeeping_chunk),
    "vmap_matmul": _builder(_vmap_matmul_chunk),
}


def fast_path_report(loss_fn: LossFn, params: PyTree, inputs: jax.Array, labels: jax.Array) -> list[str]:
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


__all__: Sequence[str] = ("STRATEGIES", "DEFAULT_MATMUL_MAX_PIXELS", "fast_path_report", "matmul_convs")
