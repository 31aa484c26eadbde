"""Max pooling with the values and gradient of ``torch.nn.MaxPool2d``, as strided slices instead of ``reduce_window``.

``flax.linen.max_pool`` is ``lax.reduce_window``, whose gradient XLA's CPU backend runs as a select-and-scatter
(iotas, broadcasts and a scatter the size of the input times the window): on the demo's model it was the largest
single cost of a training step, and under ``jax.vmap`` (the per-example passes of the DP clipping strategies)
it grew several-fold. Here the forward pass is the maximum of the ``kh * kw`` strided slices of the
``-inf``-padded input, and the backward pass sends each output's gradient to the *first* maximal element of
its window in row-major window order, which is the element ``torch.nn.MaxPool2d`` and XLA's select-and-scatter
pick. So both the pooled values and the gradient are bitwise those of ``flax.linen.max_pool`` (ties included;
``tests/test_models.py`` checks both), only computed with slices, comparisons and pads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Pairs = tuple[tuple[int, int], tuple[int, int]]


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Pairs) -> jax.Array:
    """Max pooling of ``x`` ``[N, H, W, C]`` over ``window`` with ``strides`` and explicit ``padding``
    ``((top, bottom), (left, right))`` (padded with ``-inf``): ``flax.linen.max_pool(x, window, strides,
    padding)`` with the same values and the same gradient (see the module docstring)."""
    if x.ndim != 4:
        raise ValueError(f"max_pool expects float[N, H, W, C]; got shape {x.shape}.")
    window, strides = tuple(int(v) for v in window), tuple(int(v) for v in strides)
    padding = tuple(tuple(int(v) for v in pair) for pair in padding)
    return _max_pool(x, window, strides, padding)


def _padded(x: jax.Array, padding: Pairs) -> jax.Array:
    (top, bottom), (left, right) = padding
    return lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)])


def _windows(xp: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> list[jax.Array]:
    """The window's ``kh * kw`` strided slices of the padded input, in row-major window order. (Taking them as
    contiguous slices of the input reshaped into stride phases made the backward pass alone faster, but the
    whole model's gradient slower, in one-off timings on the demo's model.)"""
    (kh, kw), (sh, sw) = window, strides
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    return [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return functools.reduce(jnp.maximum, _windows(_padded(x, padding), window, strides))


def _forward(x, window, strides, padding):
    return _max_pool(x, window, strides, padding), (x,)


def _backward(window, strides, padding, residuals, g):
    (x,) = residuals
    xp = _padded(x, padding)
    # Each output's gradient goes to the first maximal element of its window (argmax returns the first). As a
    # reduction, the index is computed once; a select chain in its place was fused into, and recomputed by,
    # every term of the transpose below (several times slower in one-off timings).
    first = jnp.argmax(jnp.stack(_windows(xp, window, strides)), axis=0)
    zero = jnp.zeros((), g.dtype)
    routed = [jnp.where(first == k, g, zero) for k in range(window[0] * window[1])]
    gp = _transpose_windows(routed, window, strides, xp.shape)
    (top, bottom), (left, right) = padding
    return (gp[:, top:xp.shape[1] - bottom, left:xp.shape[2] - right, :],)


def _transpose_windows(routed: list[jax.Array], window: tuple[int, int], strides: tuple[int, int],
                       shape: tuple[int, ...]) -> jax.Array:
    """The transpose of :func:`_windows`: each slice's values added back where they came from, in a ``shape``
    array. Assembled stride phase by stride phase (``[N, H/sh, sh, W/sw, sw, C]``), where every slice is a
    contiguous block, so that XLA pads and adds whole blocks (the transpose JAX derives for strided slices
    pads every slice in between its elements, which was slower in one-off timings)."""
    (kh, kw), (sh, sw) = window, strides
    n, h, w, c = shape
    oh, ow = routed[0].shape[1:3]
    ph, pw = max(-(-h // sh), (kh - 1) // sh + oh), max(-(-w // sw), (kw - 1) // sw + ow)
    zero = jnp.zeros((), routed[0].dtype)
    rows = []
    for p in range(sh):
        row = []
        for q in range(sw):
            phase = jnp.zeros((n, ph, pw, c), routed[0].dtype)
            # In the order XLA's select-and-scatter adds (output positions in row-major order: an element's
            # later windows are those at smaller offsets), so that the sums are bitwise the same.
            for i in reversed(range(p, kh, sh)):
                for j in reversed(range(q, kw, sw)):
                    pads = [(0, 0, 0), (i // sh, ph - i // sh - oh, 0), (j // sw, pw - j // sw - ow, 0), (0, 0, 0)]
                    phase = phase + lax.pad(routed[i * kw + j], zero, pads)
            row.append(phase)
        rows.append(jnp.stack(row, axis=3))
    return jnp.stack(rows, axis=2).reshape(n, ph * sh, pw * sw, c)[:, :h, :w, :]


_max_pool.defvjp(_forward, _backward)
