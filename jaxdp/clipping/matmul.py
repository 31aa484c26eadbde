"""The ``"vmap_matmul"`` strategy and :func:`matmul_convs`: small-map convolutions as image patches x matmul.

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
from jaxdp.clipping.layers import DEFAULT_MATMUL_MAX_PIXELS, describe, is_layer_call, layer_forward, layer_input


def matmul_convs(loss_fn: core.LossFn, max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS) -> core.LossFn:
    """``loss_fn`` (any function that applies Flax models) with every supported ``nn.Conv`` whose input map has
    ``<= max_pixels`` pixels computed as image patches x weight matrix (same value to float tolerance; gradients
    flow as usual, so those layers' weight gradients are matmuls too).

    jaxdp's non-private runs use it (:func:`jaxdp.plan.make_plan`), because XLA's CPU convolution, forward and
    weight gradient, is slow on small maps with many channels; ``launch/bench.py``'s "matmul conv" entry times it
    against plain Flax (docs/performance.md). Used by the ``"vmap_matmul"`` strategy.
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
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(intercept):
            return loss_fn(*args, **kwargs)

    return wrapped


def vmap_matmul_strategy(loss_fn: core.LossFn, l2_clip_norm, clip_rule: core.ClipRule | None, *,
                         max_pixels: int = DEFAULT_MATMUL_MAX_PIXELS) -> core.ChunkFn:
    """Builder of the ``"vmap_matmul"`` strategy (option: ``max_pixels``)."""
    fast_loss = matmul_convs(loss_fn, max_pixels)

    def single_example(params, x, y):
        return jax.value_and_grad(fast_loss)(params, core.one_example(x), core.one_example(y))

    per_example = jax.vmap(single_example, in_axes=(None, 0, 0))

    def chunk(params, inputs, labels, mask, clip_args):
        losses, grads = per_example(params, inputs, labels)
        clipped, norms = core.clip_and_sum(grads, mask, l2_clip_norm, clip_rule, clip_args)
        return clipped, norms, losses

    return chunk


core.register_strategy("vmap_matmul", vmap_matmul_strategy)
