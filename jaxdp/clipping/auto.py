"""The ``"auto"`` strategy: the fastest exact strategy for the model, picked by a rule from the benchmark.

:func:`resolve_strategy` traces ``loss_fn`` once on one example (no compile, no timing) and picks:

* ``"bookkeeping"`` when every ``nn.Conv`` / ``nn.Dense`` call of the model is on its fast path
  (:func:`jaxdp.clipping.fast_path_report`): with ``launch/bench.py``, the fastest strategy on every model the
  docs' performance page (docs/performance.md) measures (the demo's model; ResNet18 at 64x64 and 128x128).
* ``"vmap_matmul"`` otherwise, when the model has convolutions (small-map convolutions as matmuls; per-example
  gradients as in ``"vmap"``), and ``"vmap"`` for models without convolutions: a layer that falls back in
  ``"bookkeeping"`` is computed there by per-example ``vmap`` anyway, with the book-keeping passes on top.

Every strategy computes the same clipped sum under the guarantee of :mod:`jaxdp.clipping`, so the choice changes
speed and memory, never what is released. ``clipped_grad(..., strategy="auto")`` resolves at trace time;
``jaxdp.train`` records the pick in ``final.json`` (``clipping_strategy``).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np

from jaxdp.clipping import bookkeeping, core

PyTree = Any


def resolve_strategy(loss_fn: core.LossFn, params: PyTree, inputs: Any, labels: Any) -> tuple[str, str]:
    """``(strategy, reason)``: what ``"auto"`` runs for ``loss_fn`` on batches shaped like ``inputs``/``labels``.

    ``params``, ``inputs`` and ``labels`` may be arrays or ``jax.ShapeDtypeStruct`` s (only shapes are used).
    """
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
    layers = bookkeeping.fast_path_layers(loss_fn, specs, inputs, labels)
    slow = [f"{'/'.join(layer.path) or '<root>'} ({why})" for layer, why in layers if why is not None]
    if not layers:  # e.g. a Flax NNX or plain-JAX model: nothing to book-keep, every gradient would be vmap'd
        return "vmap", "no flax.linen Conv/Dense layer to book-keep (per-example gradients by vmap)"
    if not slow:
        return "bookkeeping", "every Conv/Dense layer is on the book-keeping fast path"
    name = "vmap_matmul" if any(layer.kind == "conv" for layer, _ in layers) else "vmap"
    return name, f"{len(slow)} of {len(layers)} layers fall back in bookkeeping: " + "; ".join(slow[:3])


def auto_strategy(loss_fn: core.LossFn, l2_clip_norm, clip_rule: core.ClipRule | None,
                  **options: Any) -> core.ChunkFn:
    """Builder of ``"auto"``: resolves on the first call (at trace time) and delegates; ``options`` go to the
    strategy picked, those it does not take are dropped."""
    built: dict[str, core.ChunkFn] = {}

    def chunk(params, inputs, labels, mask, clip_args):
        if "fn" not in built:
            name, _ = resolve_strategy(loss_fn, params, inputs, labels)
            builder = core.get_strategy(name)
            accepted = {p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY}
            kept = {k: v for k, v in options.items() if k in accepted}
            built["fn"] = builder(loss_fn, l2_clip_norm, clip_rule, **kept)
        return built["fn"](params, inputs, labels, mask, clip_args)

    return chunk


core.register_strategy("auto", auto_strategy)
