"""Convolutions as image patches x matmul: the ``"vmap_matmul"`` strategy, :func:`matmul_convs` (small-map
convolutions in the forward pass) and :func:`matmul_weight_grads` (every convolution's weight gradient in the
backward pass, for non-private training).

XLA's CPU convolution is very slow on small feature maps with many channels (the benchmark, ``launch/bench.py``,
shows it: a 3x3 512->512 convolution on a 2x2 map runs at a small fraction of the CPU's matmul speed), so
computing those convolutions as patches times a weight matrix is a large speed-up on ResNets at 64x64 input.
``"vmap_matmul"`` is the ``"vmap"`` strategy with this change: it still materialises per-example gradients
(memory grows like ``batch * num_params``) and its norms are those of the vectors it sums.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxdp.clipping import core
from jaxdp.clipping.layers import (
    DEFAULT_MATMUL_MAX_PIXELS,
    Layer,
    conv_forward,
    describe,
    is_layer_call,
    layer_forward,
    layer_input,
    summed_kernel_grad,
)

# matmul_weight_grads forms a layer's image patches for as many examples at a time as fit in this many bytes, or
# in 32 times the layer's kernel if that is more (measured on CPU, 3x3 convolutions: on the demo's 8-32 channel
# layers at batch 256, 1 MiB chunks beat XLA's weight gradient by 1.2-1.5x and 4-16 MiB chunks; on ResNet18's
# 64-channel 16x16 layer at batch 32, 4 MiB chunks beat it by 1.3x, 1 MiB ones lost).
DEFAULT_WEIGHT_GRAD_PATCH_BYTES = 2**20
# Convolutions with more output channels keep XLA's weight gradient: on ResNet18's 128- and 256-channel layers
# (8x8 and 4x4 maps, batch 32) it was 1.3-2x faster than the patches matmul at any chunk size.
DEFAULT_WEIGHT_GRAD_MAX_CHANNELS = 64


def matmul_convs(loss_fn: core.LossFn, max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS) -> core.LossFn:
    """``loss_fn`` with every supported ``nn.Conv`` whose input map has ``<= max_pixels`` pixels computed as
    image patches x weight matrix (same value to float tolerance; gradients flow as usual).

    Useful on its own for fast non-private training on CPU; used by the ``"vmap_matmul"`` strategy.
    """

    def intercept(next_fun, args, kwargs, context):
        if not is_layer_call(context) or type(context.module) is not nn.Conv:
            return next_fun(*args, **kwargs)
        x = layer_input(args, kwargs)
        layer = describe(context.module, x)
        if layer.unsupported is not None or x.shape[-3] * x.shape[-2] > max_pixels:
            return next_fun(*args, **kwargs)
        variables = context.module.variables["params"]
        return layer_forward(x, variables["kernel"], variables.get("bias"), layer, max_pixels)

    @functools.wraps(loss_fn)
    def wrapped(params, inputs, labels):
        with nn.intercept_methods(intercept):
            return loss_fn(params, inputs, labels)

    return wrapped


def _patch_bytes_per_example(x: jax.Array, layer: Layer) -> int:
    return 4 * x.shape[-3] * x.shape[-2] * x.shape[-1] * layer.kernel_size[0] * layer.kernel_size[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: jax.Array, kernel: jax.Array, layer: Layer, max_pixels: int, max_patch_bytes: int) -> jax.Array:
    return conv_forward(x, kernel, layer, max_pixels)


def _conv_fwd(x, kernel, layer, max_pixels, max_patch_bytes):
    return conv_forward(x, kernel, layer, max_pixels), (x, kernel)


def _conv_bwd(layer, max_pixels, max_patch_bytes, residuals, dy):
    x, kernel = residuals
    _, input_grad = jax.vjp(lambda a: conv_forward(a, kernel, layer, max_pixels), x)
    flat_x, flat_dy = x.reshape((-1,) + x.shape[-3:]), dy.reshape((-1,) + dy.shape[-3:])
    chunk_bytes = max(max_patch_bytes, 32 * 4 * kernel.size)
    chunk = max(1, chunk_bytes // _patch_bytes_per_example(flat_x, layer))
    kernel_grad = summed_kernel_grad(flat_x, flat_dy, layer, chunk).reshape(kernel.shape)
    return input_grad(dy)[0], kernel_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def matmul_weight_grads(fn: core.LossFn, max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS,
                        max_patch_bytes: int = DEFAULT_WEIGHT_GRAD_PATCH_BYTES,
                        max_channels: int = DEFAULT_WEIGHT_GRAD_MAX_CHANNELS) -> core.LossFn:
    """``fn`` (any function that applies a Flax model) with the weight gradient of every supported ``nn.Conv``
    of at most ``max_channels`` output channels computed as image patches x output gradient, one matmul per
    ``max_patch_bytes`` of patches (or 32 kernels' worth, if more), instead of by XLA's convolution; input
    gradients and everything else are differentiated as usual.

    For non-private training: ``jax.grad(matmul_weight_grads(loss))`` is ``jax.grad(loss)`` to float tolerance
    (the same sums in another order, at ``precision=HIGHEST``), for any model, BatchNorm included. On CPU, XLA's
    convolution weight gradient is the slow part of a ResNet's backward pass (the benchmark shows it:
    ``launch/bench.py``, entry "jax nonprivate (matmul weight grads)"). Small-map convolutions (``<= max_pixels``
    pixels) also run as matmuls in the forward pass, as in :func:`matmul_convs`. Unsupported convolutions
    (grouped, dilated, ...; see :func:`jaxdp.clipping.layers.describe`) and ``nn.Dense`` are left to XLA.
    """

    def intercept(next_fun, args, kwargs, context):
        if not is_layer_call(context) or type(context.module) is not nn.Conv:
            return next_fun(*args, **kwargs)
        x = layer_input(args, kwargs)
        layer = describe(context.module, x)
        if layer.unsupported is not None:
            return next_fun(*args, **kwargs)
        variables = context.module.variables["params"]
        if context.module.features > max_channels:  # as matmul_convs: XLA's gradient, small maps as matmuls
            return layer_forward(x, variables["kernel"], variables.get("bias"), layer, max_pixels)
        y = _conv(x, variables["kernel"], layer, max_pixels, max_patch_bytes)
        return y if variables.get("bias") is None else y + variables["bias"]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(intercept):
            return fn(*args, **kwargs)

    return wrapped


def vmap_matmul_strategy(loss_fn: core.LossFn, l2_clip_norm, clip_rule: core.ClipRule | None, *,
                         max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS) -> core.ChunkFn:
    """Builder of the ``"vmap_matmul"`` strategy (option: ``max_pixels``)."""
    fast_loss = matmul_convs(loss_fn, max_pixels)

    def single_example(params, x, y):
        return jax.value_and_grad(fast_loss)(params, x[None], y[None])

    per_example = jax.vmap(single_example, in_axes=(None, 0, 0))

    def chunk(params, inputs, labels, mask, clip_args):
        losses, grads = per_example(params, inputs, labels)
        clipped, norms = core.clip_and_sum(grads, mask, l2_clip_norm, clip_rule, clip_args)
        return clipped, norms, losses

    return chunk


core.register_strategy("vmap_matmul", vmap_matmul_strategy)
