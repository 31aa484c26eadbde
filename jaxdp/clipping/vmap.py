"""The ``"vmap"`` strategy: per-example gradients by ``jax.vmap`` of the single-example gradient.

The reference every other strategy is tested against. Each example is given to ``loss_fn`` as a batch of one, so
``loss_fn`` is written once, for batches. The per-example gradients are materialised (memory grows like
``batch * num_params``); their norms are the norms of the very vectors that are scaled and summed.
"""

from __future__ import annotations

import jax

from jaxdp.clipping import core


def vmap_strategy(loss_fn: core.LossFn, l2_clip_norm, clip_rule: core.ClipRule | None) -> core.ChunkFn:
    """Builder of the ``"vmap"`` strategy (see :func:`jaxdp.clipping.core.register_strategy`)."""

    def single_example(params, x, y):
        return jax.value_and_grad(loss_fn)(params, core.one_example(x), core.one_example(y))

    per_example = jax.vmap(single_example, in_axes=(None, 0, 0))

    def chunk(params, inputs, labels, mask, clip_args):
        losses, grads = per_example(params, inputs, labels)
        clipped, norms = core.clip_and_sum(grads, mask, l2_clip_norm, clip_rule, clip_args)
        return clipped, norms, losses

    return chunk


core.register_strategy("vmap", vmap_strategy)
