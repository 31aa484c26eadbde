"""Gaussian noise for DP-SGD as an optax transformation.

``optax.chain(dp_noise(...), optax.adam(5e-5))`` reads like the algorithm: the clipped sum of per-example
gradients (from :func:`jaxdp.clipped_grad`) goes in, ``(sum + N(0, (z C)^2 I)) / B`` comes out and is handed to
the optimiser.

The guarantee
-------------
For every coordinate of every leaf, ``dp_noise`` adds an independent draw of ``N(0, sigma^2)`` with
``sigma = noise_multiplier * sensitivity(l2_clip_norm)`` to the clipped sum, then divides by the *public*
``expected_batch_size`` (never by the realised batch size, which under Poisson sampling depends on the data).
This is the Gaussian mechanism with L2 sensitivity ``C`` under add-or-remove-one neighbours, so one step is
``GaussianDpEvent(noise_multiplier)`` in ``dp_accounting``'s terms, and the privacy of a run is that of the
batch sampling composed over the steps (see :mod:`jaxdp.accounting`). Each step draws fresh noise from a key
derived from the transformation's own state (``fold_in(key, step)``), so steps are independent and a run
resumed from a checkpoint of that state draws the same noise it would have drawn uninterrupted.

Post-processing by the optimiser (Adam, weight decay on the parameters, ...) does not change the guarantee.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp.clipping import sensitivity, validate_clip_norm


class DPNoiseState(NamedTuple):
    """``key``: raw uint32 key data (checkpointable as a plain array); ``count``: steps taken so far."""

    key: jax.Array
    count: jax.Array


def _key_data(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, dtype=jnp.uint32)


def dp_noise(
    noise_multiplier: float,
    l2_clip_norm: float | object,
    expected_batch_size: int,
    key: jax.Array,
) -> optax.GradientTransformation:
    """Adds ``N(0, (noise_multiplier * C)^2)`` to each coordinate of a clipped sum, then divides by the batch size.

    Args:
      noise_multiplier: ``z >= 0``; the noise standard deviation in units of the clipping bound. ``0`` gives
        clipping without privacy (allowed, e.g. to isolate the effect of clipping).
      l2_clip_norm: the bound used by :func:`jaxdp.clipped_grad` (a number, or the per-layer pytree, whose
        total sensitivity ``sqrt(sum C_l^2)`` is used).
      expected_batch_size: the public normaliser ``B`` (``sampling_prob * dataset_size`` under Poisson
        sampling, the batch size for fixed-size batches). The output's noise standard deviation is
        ``noise_multiplier * C / B``.
      key: a JAX PRNG key (typed or raw); the only source of this transformation's randomness.

    Example::

        opt = optax.chain(jaxdp.dp_noise(0.7, 5.0, 32, jax.random.key(0)), optax.adam(5e-5))
        updates, opt_state = opt.update(clipped_sum, opt_state, params)
    """
    validate_clip_norm(l2_clip_norm)
    noise_multiplier = float(noise_multiplier)
    if not np.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier}.")
    if int(expected_batch_size) != expected_batch_size or expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be an integer >= 1; got {expected_batch_size!r}.")
    stddev = noise_multiplier * sensitivity(l2_clip_norm)
    scale = 1.0 / float(expected_batch_size)
    key_data = _key_data(key)

    def init_fn(params: optax.Params) -> DPNoiseState:
        del params
        return DPNoiseState(key=key_data, count=jnp.zeros((), jnp.int32))

    def update_fn(updates: optax.Updates, state: DPNoiseState, params: optax.Params | None = None):
        del params
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(step_key, len(leaves))
        noised = [
            (g + (stddev * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)) * scale
            for g, k in zip(leaves, keys, strict=True)
        ]
        new_state = DPNoiseState(key=state.key, count=state.count + 1)
        return jax.tree_util.tree_unflatten(treedef, noised), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def noise_stddev(noise_multiplier: float, l2_clip_norm: float | object, expected_batch_size: int) -> float:
    """Standard deviation of the noise in the averaged gradient that ``dp_noise`` outputs: ``z C / B``."""
    return float(noise_multiplier) * sensitivity(l2_clip_norm) / float(expected_batch_size)


def secret_seed() -> int:  # placeholder until the noise branch lands
    import secrets

    return secrets.randbits(128)


def key_from_seed(seed: int) -> jax.Array:  # placeholder until the noise branch lands
    words = np.random.SeedSequence(int(seed)).generate_state(2, np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(words, jnp.uint32))
