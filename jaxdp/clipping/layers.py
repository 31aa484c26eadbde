"""Flax ``nn.Conv`` / ``nn.Dense`` calls described statically and computed as image patches x weight matrix.

Shared by the ``"bookkeeping"`` strategy (which needs each example's patches for its norms and clipped sums) and
the ``"vmap_matmul"`` strategy (which runs small-map convolutions as matmuls).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

# Convolutions whose input map has at most this many pixels run as patches x matmul. 16 (4x4) is where the
# benchmark measured the gain (ResNet18 at 64x64: the last two stages); at larger maps the patch tensors cost
# more than XLA's convolution saves.
DEFAULT_MATMUL_MAX_PIXELS = 16


@dataclasses.dataclass(frozen=True)
class Layer:
    """Static description of one intercepted ``nn.Conv`` / ``nn.Dense`` call."""

    path: tuple[str, ...]
    kind: str  # "conv" | "dense"
    use_bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[tuple[int, int], ...] = ((0, 0), (0, 0))
    precision: Any = None
    unsupported: str | None = None  # reason the patches x matmul form cannot compute this call


def is_layer_call(context: Any) -> bool:
    """Whether an interceptor's ``context`` is the ``__call__`` of a plain ``nn.Conv`` or ``nn.Dense``."""
    return context.method_name == "__call__" and type(context.module) in (nn.Conv, nn.Dense)


def layer_input(args: tuple, kwargs: dict) -> jax.Array:
    """The ``inputs`` argument of an intercepted layer call."""
    return args[0] if args else kwargs["inputs"]


def module_path(module: nn.Module) -> tuple[str, ...]:
    return tuple(str(p) for p in module.scope.path)


def describe(module: nn.Module, inputs: jax.Array) -> Layer:
    """The call's geometry, or why the patches x matmul form does not handle it (``Layer.unsupported``)."""
    path = module_path(module)
    kind = "conv" if type(module) is nn.Conv else "dense"
    reasons = []
    if inputs.dtype != jnp.float32 or module.param_dtype != jnp.float32 or module.dtype not in (None, jnp.float32):
        reasons.append("not float32")
    if kind == "dense":
        if module.dot_general is not None or module.dot_general_cls is not None:
            reasons.append("custom dot_general")
        return Layer(path, kind, module.use_bias, precision=module.precision, unsupported=", ".join(reasons) or None)

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
        return Layer(path, kind, module.use_bias, unsupported=", ".join(reasons))
    strides = broadcast(module.strides)
    padding = canonicalize_padding(module.padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return Layer(path, kind, module.use_bias, unsupported=f"padding {padding}")
        pads = tuple(lax.padtype_to_pads(inputs.shape[-3:-1], kernel_size, strides, padding))
    else:
        pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    return Layer(path, kind, module.use_bias, tuple(kernel_size), tuple(strides), pads, module.precision)


def patches(x: jax.Array, layer: Layer) -> jax.Array:
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


def conv_forward(x: jax.Array, kernel: jax.Array, layer: Layer, max_pixels: int) -> jax.Array:
    """The convolution of ``nn.Conv`` (no bias): as patches x matmul on small maps, else XLA's convolution."""
    batch_shape = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    if x.shape[1] * x.shape[2] <= max_pixels:
        y = jnp.einsum("nhwk,ko->nhwo", patches(x, layer), kernel.reshape(-1, kernel.shape[-1]),
                       precision=layer.precision)
    else:
        y = lax.conv_general_dilated(x, kernel, layer.strides, layer.pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=layer.precision)
    return y.reshape(batch_shape + y.shape[1:])


def layer_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, layer: Layer,
                  max_pixels: int) -> jax.Array:
    """What the intercepted ``nn.Conv`` / ``nn.Dense`` call computes, from the given kernel and bias."""
    if layer.kind == "conv":
        y = conv_forward(x, kernel, layer, max_pixels)
    else:
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
    return y if bias is None else y + bias


def per_example_matrices(x: jax.Array, dy: jax.Array, layer: Layer) -> tuple[jax.Array, jax.Array]:
    """Per-example layer inputs ``P`` ``[B, T, K]`` and output gradients ``D`` ``[B, T, O]``: the example's
    weight gradient is ``P_i^T D_i``. ``x`` and ``dy`` have a leading example axis."""
    batch = x.shape[0]
    if layer.kind == "conv":
        x = patches(x.reshape((-1,) + x.shape[-3:]), layer)
    return x.reshape(batch, -1, x.shape[-1]), dy.reshape(batch, -1, dy.shape[-1])


def over_chunks(fn: Callable, arrays: Sequence[jax.Array], chunk: int, reduce: bool) -> Any:
    """``fn`` applied to consecutive chunks of ``chunk`` examples of ``arrays`` (sliced in place, one chunk
    alive at a time, by ``lax.fori_loop``; a shorter last chunk is one more call). ``reduce``: sum the
    results; else concatenate them along the example axis. ``fn`` may return an array or a pytree of them."""
    batch = arrays[0].shape[0]
    full, rest = divmod(batch, chunk)
    tail = [a[full * chunk:] for a in arrays] if rest else None
    tmap = jax.tree_util.tree_map

    def join(parts):
        if reduce:
            return functools.reduce(lambda a, b: tmap(jnp.add, a, b), parts)
        return tmap(lambda *leaves: jnp.concatenate(leaves), *parts)

    if full <= 1:
        return join(([fn(*[a[:chunk] for a in arrays])] if full else []) + ([fn(*tail)] if rest else []))
    shape = jax.eval_shape(fn, *[a[:chunk] for a in arrays])

    def body(n, acc):
        out = fn(*[lax.dynamic_slice_in_dim(a, n * chunk, chunk) for a in arrays])
        if reduce:
            return tmap(jnp.add, acc, out)
        return tmap(lambda a, o: lax.dynamic_update_slice_in_dim(a, o, n * chunk, 0), acc, out)

    init = tmap(lambda s: jnp.zeros(s.shape if reduce else (full * chunk,) + s.shape[1:], s.dtype), shape)
    result = lax.fori_loop(0, full, body, init)
    return join([result, fn(*tail)]) if rest else result


def examples_contracted(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x^T g`` (``[K, O]`` from ``x`` ``[B, K]`` and ``g`` ``[B, O]``: summed over the examples), at
    ``precision=HIGHEST``.

    On CPU ``x^T`` is first made an array of its own (``lax.optimization_barrier`` keeps XLA from folding the
    transpose into the product): XLA's CPU backend then runs a row-major product in its multi-threaded YNNPACK
    kernels, where a product contracting both operands' first axis went to a single-threaded kernel (the Adult
    MLP's DP step, CHANGELOG). On other backends the product reads the operands as they are."""
    if jax.default_backend() == "cpu":
        return jnp.dot(lax.optimization_barrier(x.T), g, precision=lax.Precision.HIGHEST)
    return jnp.einsum("bk,bo->ko", x, g, precision=lax.Precision.HIGHEST)


def summed_kernel_grad(x: jax.Array, g: jax.Array, layer: Layer, chunk: int) -> jax.Array:
    """``sum_i P_i^T g_i`` (``[K, O]``: the layer's weight gradient, summed over the examples), for ``chunk``
    examples at a time, at ``precision=HIGHEST``."""

    def part(a, b):
        p, d = per_example_matrices(a, b, layer)
        if p.shape[1] == 1:  # one position (a Dense layer on vectors)
            return examples_contracted(p[:, 0], d[:, 0])
        # Output channels first: faster than "btk,bto->ko" on XLA's CPU backend in one-off timings.
        return jnp.einsum("bto,btk->ok", d, p, precision=lax.Precision.HIGHEST).T

    return over_chunks(part, (x, g), chunk, reduce=True)
