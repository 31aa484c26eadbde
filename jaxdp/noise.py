"""Noise for DP-SGD: tail-correct normals, secret keys, and the noise step as an optax transformation.

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
derived from the transformation's own state (the key and the step count), so steps are independent and a run
resumed from a checkpoint of that state draws the same noise it would have drawn uninterrupted.

Two conditions belong to the guarantee and are easy to break:

* **The key must be secret.** Noise that an adversary can regenerate is no noise: from the initial parameters
  and the released model they subtract it, and training becomes a deterministic function of the data, which
  tells neighbouring datasets apart with certainty (epsilon = infinity). Draw the key from the operating
  system's entropy with :func:`secret_key` (or keep the seed of :func:`secret_seed` in the checkpoint and
  rebuild the key with :func:`key_from_seed`); never derive it from a seed written in a config or a log.
* **The tails must be Gaussian.** ``jax.random.normal`` in float32 is ``sqrt(2) erfinv(u)`` with ``u`` on a
  ``2^-23`` grid, so its support is only about ``[-5.42, 5.22]`` standard deviations; an output beyond the
  support the neighbouring dataset allows reveals membership outright, which the accounting's delta does not
  cover. :func:`gaussian` resolves each tail's probability to ``2^-64``, correct beyond 9 standard
  deviations (``P(N > 9) ~ 1.1e-19 ~ 2^-63``). Its support still ends at 9.155 standard deviations: the
  accountant charges that to delta (:func:`jaxdp.accounting.truncation_delta`) and refuses noise multipliers
  for which it would take half of delta or more.

What floating point still breaks: the release ``fl(fl(g + fl(s Z)) / B)`` in float32 has holes in its support
(which outputs can occur depends on ``g``), so an adversary who knows a neighbour's value of one coordinate can,
on some outputs, tell the datasets apart with certainty (Mironov 2012). ``dp_noise(..., mechanism="lattice")``
(:mod:`jaxdp.lattice`) removes this: it quantises the sum exactly to a lattice, adds integer noise and converts
to float only afterwards, so its output is a post-processing of a Gaussian mechanism's.

Post-processing by the optimiser (Adam, weight decay on the parameters, ...) does not change the guarantee.

Randomness
----------
All randomness here comes from Threefry-4x32-20 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the counter-based generator of Random123, checked against its known-answer vectors), implemented in
``jax.numpy`` (:mod:`jaxdp.threefry`) so that it is the same on every backend and JAX version. Its key is 128
bits, all of which :func:`key_from_seed` fills from a 128-bit seed. Each normal takes one block (the counter is
the value's index): 128 random bits, folded to the 64 that :func:`gaussian` uses by XOR of the block's two halves.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import lattice, threefry
from jaxdp.clipping import sensitivity, validate_clip_norm

SEED_BITS = 128

# The random bits (Threefry-4x32-20, keys as four words) live in jaxdp.threefry, shared with jaxdp.lattice.
_threefry4x32, _derive, _key_words = threefry.threefry4x32, threefry.derive, threefry.key_words
_BITS, _STEP = threefry.BITS, threefry.STEP

MECHANISMS = ("gaussian", "lattice")

# What the accountant needs to know of gaussian()'s distribution (its docstring; tests/test_noise.py checks them):
# each tail's probabilities are multiples of 2^-64 and the largest magnitude is Q(2^-65), where Q(u) = Phi^-1(1 - u)
# is evaluated with relative error below QUANTILE_RELATIVE_ERROR at u rounded to float32 (UNIFORM_RELATIVE_ERROR).
TAIL_PROBABILITY_GRID = 2.0**-64
QUANTILE_RELATIVE_ERROR = 4e-7
UNIFORM_RELATIVE_ERROR = 2.0**-24


# --- Standard normals with correct tails --------------------------------------------------------------------

# erfinv(x) = p(t) * x with w = -log(1 - x^2). For w < 5 (t = w - 2.5) and 5 <= w < 16 (t = sqrt(w) - 3):
# M. Giles, "Approximating the erfinv function" (GPU Computing Gems, 2011), single precision, as in XLA; those two
# are accurate only up to w ~ 16 (|N| ~ 5.4), the float32 limit of their inputs. For w >= 16 (t = sqrt(w) - 4):
# a near-minimax (Lawson) fit to erfinv(x) / x over sqrt(w) in [3.95, 7] (w <= 49; gaussian needs w <= 43.7),
# relative error 1.3e-9 in float64, 1.2e-7 evaluated in float32.
_ERFINV_COEFFICIENTS = np.array([
    [2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
     -0.00417768164, 0.246640727, 1.50140941],
    [-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
     0.00943887047, 1.00167406, 2.83297682],
    [1.4088912791976327e-07, -2.237478838651441e-06, 1.6614681953797117e-05, -8.032417827052996e-05,
     0.0002965008025057614, -0.0008595678955316544, 0.0012581482296809554, 1.009493350982666,
     3.8397839069366455],
], np.float32)


def _upper_quantile(u: jax.Array) -> jax.Array:
    """``Q(u) = Phi^-1(1 - u)`` for float32 ``u`` in ``[1.3e-22, 1/2]`` (the fit's range), to a few float32 ulps.

    Computed as ``sqrt(2) erfinv(x)`` with ``x = 1 - 2u``, but with ``w = -log(1 - x^2)`` taken from ``u``
    (``1 - x^2 = 2u (1 + x)``), so that tiny tail probabilities keep all their bits.
    """
    x = 1.0 - 2.0 * u
    w = -jnp.log(2.0 * u * (1.0 + x))
    central, middle = w < 5.0, w < 16.0
    root = jnp.sqrt(w)
    t = jnp.where(central, w - 2.5, jnp.where(middle, root - 3.0, root - 4.0))
    coefficients = jnp.asarray(_ERFINV_COEFFICIENTS)
    p = None
    for c in coefficients.T:
        c_t = jnp.where(central, c[0], jnp.where(middle, c[1], c[2]))
        p = c_t if p is None else c_t + p * t
    return np.float32(math.sqrt(2.0)) * p * x


def _normal_from_bits(high: jax.Array, low: jax.Array) -> jax.Array:
    """Standard normals from 64 random bits each (two uint32 words): see :func:`gaussian`."""
    magnitude = high & np.uint32(0x7FFFFFFF)
    # u = (m + 1/2) 2^-64 with m the 63-bit integer (high & 0x7fffffff, low), rounded to float32.
    u = magnitude.astype(jnp.float32) * np.float32(2.0**-32) + (low.astype(jnp.float32) + 0.5) * np.float32(2.0**-64)
    q = _upper_quantile(u)
    return jnp.where(high >> np.uint32(31) == 1, q, -q)


def _draw(words: jax.Array, size: int, *, secure: bool = False) -> jax.Array:
    """``size`` float32 standard normals from the 128-bit key ``words``: value ``i`` takes the block at counter
    ``(i, stream, 0, 0)`` (:func:`jaxdp.threefry.draw_values`). ``secure``: the sum of
    the four streams' normals, halved (see :func:`dp_noise`). One block per value: XLA evaluates a block once
    per output word, so two values per block would cost twice as much."""

    def normals(index):
        z = []
        for stream in range(4 if secure else 1):
            x0, x1, x2, x3 = _threefry4x32(list(words), [index, stream, 0, _BITS])
            z.append(_normal_from_bits(x0 ^ x2, x1 ^ x3))
        return sum(z) * 0.5 if secure else z[0]

    return threefry.draw_values(normals, size, jnp.float32, words)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _gaussian(key: jax.Array, *, shape: tuple[int, ...], dtype) -> jax.Array:
    return _draw(_key_words(key), math.prod(shape)).reshape(shape).astype(dtype)


def gaussian(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Standard normal draws whose tails are correct beyond 9 standard deviations, in both directions.

    Each value takes 64 random bits (one Threefry-4x32-20 block folded in half, see the module docstring) keyed
    by ``key``'s data (up to 128 bits, e.g. from :func:`key_from_seed`; a 64-bit ``jax.random.key`` is
    zero-padded): the top bit is the sign, the other 63 form an integer ``m``, and the value is
    ``±Q((m + 1/2) 2^-64)`` where ``Q(u) = Phi^-1(1 - u)`` is the upper quantile of ``N(0, 1)``. So

    * each tail is resolved on a ``2^-64`` grid of probabilities: ``P(X >= x)`` equals the Gaussian's
      ``Phi(-x)`` rounded to a multiple of ``2^-64`` (error at most ``2^-65``), for every ``x``;
    * the largest magnitude is ``Q(2^-65) = 9.155``; the Gaussian's mass beyond it, ``2^-65`` per side, is the
      only part that is missing (for comparison, ``P(N > 9) = 1.1e-19 = 2^-63``);
    * ``u`` is rounded to float32 and ``Q`` is evaluated in float32 (an erfinv in three polynomial pieces,
      relative error below ``4e-7`` against ``scipy.special.ndtri`` over the whole range, tested), so values
      are float32 numbers and a tail probability ``P(X >= x)`` carries a relative error of about
      ``x^2 * 4e-7`` (``3e-5`` at 9 sigma); the bulk is as accurate as ``jax.random.normal``'s (the same
      polynomial, on a finer grid).

    Values are computed in float32 and cast to ``dtype`` (a floating type). The random bits are the same on
    every backend (the float32 values may differ in the last bit where backends' ``log`` differ); value ``i``
    of the flattened array depends only on the key and ``i``; different keys give independent draws.

    Example::

        z = jaxdp.noise.gaussian(jaxdp.noise.secret_key(), (3, 4))
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"gaussian draws floating-point values; got dtype {dtype}.")
    shape = tuple(int(d) for d in shape)
    threefry.check_draw_size(math.prod(shape))
    # One compiled program per call, also outside jit (the draw is many small operations).
    return _gaussian(key, shape=shape, dtype=dtype)


# --- Secret seeds and keys ----------------------------------------------------------------------------------


def secret_seed() -> int:
    """A 128-bit seed from the operating system's entropy (:mod:`secrets`): an int in ``[0, 2**128)``.

    Keep it only where the model's parameters are kept private (the checkpoint): whoever knows it can
    regenerate the noise and undo the privacy of the run (see the module docstring).
    """
    return secrets.randbits(SEED_BITS)


def key_from_seed(seed: int) -> jax.Array:
    """The JAX key that :func:`gaussian` and :func:`dp_noise` use for a 128-bit ``seed``; deterministic.

    The key keeps **all 128 bits** of the seed: its data is the seed's four 32-bit words (most significant
    first), which :func:`gaussian` and :func:`dp_noise` use as the 128-bit key of Threefry-4x32. (A default
    ``jax.random.key`` holds 64 bits: Threefry-2x32's key.) It is a typed key of JAX's ``"rbg"``
    implementation, whose key is 128 bits in every supported JAX version; the other ``jax.random`` functions
    accept it (and then draw with XLA's RngBitGenerator, which may differ across backends), but only
    :func:`gaussian` and :func:`dp_noise` are tail-correct and use the 128 bits the same way everywhere.

    >>> words = jax.random.key_data(key_from_seed(2**96 + 5))
    >>> [int(w) for w in words]
    [1, 0, 0, 5]
    """
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < 2**SEED_BITS:
        raise ValueError(f"seed must be an integer in [0, 2**{SEED_BITS}); got {seed!r}.")
    seed = int(seed)
    words = np.array([(seed >> (32 * i)) & 0xFFFFFFFF for i in (3, 2, 1, 0)], np.uint32)
    return jax.random.wrap_key_data(words, impl="rbg")


def secret_key() -> jax.Array:
    """``key_from_seed(secret_seed())``: a fresh secret 128-bit key (the seed is not kept anywhere)."""
    return key_from_seed(secret_seed())


# --- The noise step -----------------------------------------------------------------------------------------


class DPNoiseState(NamedTuple):
    """``key``: the 128-bit key as four uint32 words; ``count``: steps taken so far. Both are plain arrays, so
    the state is checkpointable as is."""

    key: jax.Array
    count: jax.Array


# A noise standard deviation must never fall below the one the accountant was told (z * C): rounding it to the
# nearest float32 may lose up to a relative 2^-24. Constants are computed in float64 and rounded up; a std
# computed in float32 from traced values (a per-step sensitivity) is scaled by 1 + 2^-16 first, more than the
# roundings before it (the conversion of z, the squares, sums and square root of the sensitivity, the product:
# each at most 2^-24, and far fewer than 256 of them) can take away.
_TRACED_STDDEV_MARGIN = 1.0 + 2.0**-16


def stddev_at_least(value: float) -> np.float32:
    """The smallest float32 that is >= ``value`` (a float64 >= 0, slightly enlarged, by ``1 + 2^-40``, to cover
    the rounding of the float64 product that gave it): a noise standard deviation never below the accounted one.

    >>> float(stddev_at_least(0.7)) > 0.7 > float(np.float32(0.7))
    True
    """
    value = float(value) * (1.0 + 2.0**-40)
    rounded = np.float32(value)
    return rounded if float(rounded) >= value else np.nextafter(rounded, np.float32(np.inf))


def _traced_sensitivity(l2_clip_norm) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(l2_clip_norm)
    if not leaves:
        raise ValueError("l2_clip_norm is an empty pytree; give a positive number or a tree of them.")
    return jnp.sqrt(sum(jnp.square(jnp.asarray(c, jnp.float32)) for c in leaves))


@functools.partial(jax.jit, static_argnames=("secure",))
def _gaussian_step(updates, key, count, stddev, noise_multiplier, l2_clip_norm, scale, *, secure):
    """One step of the Gaussian mechanism, compiled as one program (also when ``update`` is called eagerly)."""
    if l2_clip_norm is not None:
        stddev = (noise_multiplier * _traced_sensitivity(l2_clip_norm)) * np.float32(_TRACED_STDDEV_MARGIN)
    # One draw for all leaves (each coordinate its own counter), fresh at every step.
    z = _draw(_derive(key, count, _STEP), _num_coordinates(updates), secure=secure)
    return _per_leaf(updates, z, lambda g, zg: _gaussian_release(g, zg, stddev, scale)), count + 1


def _num_coordinates(updates) -> int:
    return sum(math.prod(np.shape(g)) for g in jax.tree_util.tree_leaves(updates))


def _per_leaf(updates, flat_noise: jax.Array, release):
    """``release(leaf, its noise)`` for every leaf of ``updates``, each taking its slice of ``flat_noise`` (one draw
    for the whole tree, in leaf order) reshaped like it."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    noised, offset = [], 0
    for g in leaves:
        noised.append(release(g, flat_noise[offset:offset + g.size].reshape(g.shape)))
        offset += g.size
    return jax.tree_util.tree_unflatten(treedef, noised)


def _gaussian_release(g: jax.Array, z: jax.Array, stddev, scale) -> jax.Array:
    """What the Gaussian mechanism releases for one leaf ``g`` and its standard normals ``z``."""
    return (g + (stddev * z).astype(g.dtype)) * scale


@functools.partial(jax.jit, static_argnames=("mechanism",))
def _lattice_step(updates, key, count, l2_clip_norm, scale, *, mechanism: lattice.LatticeNoise):
    """One step of the lattice mechanism (:mod:`jaxdp.lattice`): quantise each coordinate of the sum, add integer
    noise, then scale the integers; one compiled program per call."""
    sampler, multiplier, allowed = mechanism.sampler, None, True
    if sampler is not None and l2_clip_norm is not None:
        multiplier, allowed = lattice.outer_multiplier(
            sampler, mechanism.required_stddev(_traced_sensitivity(l2_clip_norm)))
    size = _num_coordinates(updates)
    if sampler is None:
        noise = jnp.zeros((size,), jnp.int32)
    else:
        noise = sampler.draw(_derive(key, count, _STEP), size, outer_multiplier=multiplier)
    # y * gamma / B: a function of the integers y alone. A per-step sensitivity above the one the tables were
    # built for would need more noise than they can make: the step's output is then NaN (never a leak).
    release = functools.partial(_lattice_release, exponent=mechanism.exponent, scale=scale, allowed=allowed)
    return _per_leaf(updates, noise, release), count + 1


def _lattice_release(g: jax.Array, noise: jax.Array, exponent: int, scale, allowed=True) -> jax.Array:
    """What the lattice mechanism releases for one leaf ``g`` and its integer noise: a function of ``k + noise``."""
    to_output = np.float32(2.0**-exponent) * jnp.asarray(scale, jnp.float32)
    y = lattice.quantise(g, exponent) + noise
    return jnp.where(allowed, y.astype(jnp.float32) * to_output, jnp.nan).astype(g.dtype)


def check_mechanism(mechanism: str) -> str:
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r} is not a noise mechanism; choose one of {MECHANISMS}: 'gaussian' "
                         "(float32 Gaussian noise) or 'lattice' (integer noise on a lattice, jaxdp.lattice).")
    return mechanism


def dp_noise(
    noise_multiplier: float,
    l2_clip_norm: float | object,
    expected_batch_size: int,
    key: jax.Array,
    *,
    secure: bool = False,
    mechanism: str = "gaussian",
) -> optax.GradientTransformationExtraArgs:
    """Adds ``N(0, (noise_multiplier * C)^2)`` to each coordinate of a clipped sum, then divides by the batch size.

    The noise comes from :func:`gaussian` (tails correct beyond 9 standard deviations): one draw per step for
    all leaves, keyed by ``key`` and the step count kept in the state. The standard deviation it is scaled by is
    a float32 never below ``noise_multiplier * C`` (:func:`stddev_at_least`; a per-step ``l2_clip_norm`` is
    scaled by ``1 + 2^-16`` to outweigh the float32 roundings of computing it): more noise than accounted for
    is safe, less would not be.

    **The key must be secret** (see the module docstring): whoever knows it can regenerate the noise, and known
    noise makes training deterministic, so replaying it under two neighbouring datasets tells them apart
    (epsilon = infinity). Get one with ``jaxdp.noise.secret_key()``; to resume a run, keep the state (or the
    seed of ``jaxdp.noise.secret_seed()``) in the checkpoint, never in a config or a log.

    **Two mechanisms.** ``mechanism="gaussian"`` (the default) releases ``fl(fl(g + fl(s Z)) / B)`` in float32.
    With ``s`` not a power of two, which float32 outputs can occur near a value depends on the value of the sum:
    knowing the neighbour's value of one coordinate, some outputs are possible under one dataset and impossible
    under the other (Mironov 2012; see :mod:`jaxdp.lattice`), which no accountant covers. It also ends at
    9.155 standard deviations, which the accountant charges to delta
    (:func:`jaxdp.accounting.truncation_delta`). ``mechanism="lattice"`` quantises the sum to a power-of-two
    lattice ``gamma Z`` (exactly), adds integer noise that is, per coordinate, within total variation
    :data:`jaxdp.lattice.TV_PER_DRAW` of ``round(N(0, sigma^2))`` with ``sigma`` at least ``noise_multiplier``
    times the lattice's sensitivity ``C + gamma sqrt(d)`` (:func:`jaxdp.lattice.effective_sensitivity`,
    ``<= C (1 + 2^-10)``), and only then converts to float: the output is a post-processing of the Gaussian
    mechanism's, so the accountant's epsilon holds for it up to the small delta of
    :func:`jaxdp.accounting.lattice_delta` (its guarantee, and what floating point still does not cover, are in
    :mod:`jaxdp.lattice`). Its noise is up to ``2^-10`` larger (relative) than the Gaussian's at the same
    ``noise_multiplier``; the lattice and tables depend on the number of coordinates ``d``, so they are built
    when ``update`` first sees the gradient (about a second, then cached).

    Args:
      noise_multiplier: ``z >= 0``; the noise standard deviation in units of the clipping bound. ``0`` gives
        clipping without privacy (allowed, e.g. to isolate the effect of clipping).
      l2_clip_norm: the bound used by :func:`jaxdp.clipped_grad` (a number, or the per-layer pytree, whose
        total sensitivity ``sqrt(sum C_l^2)`` is used).
      expected_batch_size: the public normaliser ``B`` (``sampling_prob * dataset_size`` under Poisson
        sampling, the batch size for fixed-size batches). The output's noise standard deviation is
        ``noise_multiplier * C / B``.
      key: a secret JAX PRNG key (typed or raw; its data, up to 128 bits, keys the noise): the only source of
        this transformation's randomness.
      secure: also resist the floating-point attacks on Gaussian sampling (Holohan & Braghin, "Secure random
        sampling in differential privacy", ESORICS 2021; Jin et al., "Are we there yet? Timing and
        floating-point attacks on differential privacy systems", IEEE S&P 2022), as Opacus's ``secure_mode``
        does: each coordinate's noise is ``(N1 + N2 + N3 + N4) / 2`` of four independent :func:`gaussian`
        draws, still exactly ``N(0, 1)`` in distribution. One draw's float32 output is close to a function of
        few random inputs, so an attacker can search for the inputs consistent with an output; Holohan &
        Braghin put the work of that search at ``2^(p (2n - 1))`` for a sum of ``2n`` draws with ``p``
        mantissa bits: ``2^72`` here (float32, ``2n = 4``; Opacus computes in float64, ``2^159``). It draws four
        times the random bits and quantiles of the default. What it does **not** protect against: the
        rounding of ``sum + noise`` (and of the division by ``B``) to float32, where which outputs can occur
        near a value depends on the binary exponent of the unnoised sum (Mironov's 2012 attack on the
        floating-point Laplace mechanism works this way; ``mechanism="lattice"`` removes it); timing (neither
        mode has a data-dependent branch or loop, so drawing the noise takes the same time whatever its values,
        but a step's duration reveals the size of its batch); and the generator, Threefry-4x32-20, which has no
        known attack but is not a standardised cryptographic generator (Opacus's secure mode uses torchcsprng's
        AES-128 in counter mode). Only for ``mechanism="gaussian"``: the lattice mechanism's guarantee is about
        the exact distribution of its integers, so there is nothing for such a search to find.
      mechanism: ``"gaussian"`` or ``"lattice"`` (above).

    The returned transformation's ``update(updates, state, params=None, *, l2_clip_norm=None)`` takes an optional
    per-step sensitivity: a (traced) number, or a pytree of per-layer bounds, that replaces ``l2_clip_norm``
    for this step, so the noise standard deviation is ``noise_multiplier * l2_clip_norm`` (for DPSGD-F, whose
    sensitivity ``max_k C_k`` changes every step). It is not validated (it may be traced); it must be the bound
    the clipping of this step enforced. With ``mechanism="lattice"`` it must not exceed the ``l2_clip_norm``
    given here (the largest per-step one: the lattice and tables are built for it); a larger one makes the
    step's output NaN. The noise standard deviation then exceeds the required one by at most one step of the
    sampler's outer multiplier (``jaxdp.lattice.IntegerGaussian.inner_stddev``, about 0.4% of the noise at the
    largest sensitivity). Other keyword arguments passed down an ``optax.chain`` are ignored.

    ``update`` runs one compiled program per call, also when called outside ``jit`` (and inside a ``jit`` it
    is part of the caller's program).

    Example::

        opt = optax.chain(jaxdp.dp_noise(0.7, 5.0, 32, jaxdp.noise.secret_key()), optax.adam(5e-5))
        updates, opt_state = opt.update(clipped_sum, opt_state, params)
        updates, opt_state = opt.update(clipped_sum, opt_state, params, l2_clip_norm=max_group_bound)
    """
    if key is None:
        raise TypeError("dp_noise: key is None; pass a secret key: jaxdp.noise.secret_key() (or "
                        "jaxdp.noise.key_from_seed(seed) with a seed kept as secret as the model).")
    if isinstance(noise_multiplier, str | bytes | bool):
        raise TypeError(f"noise_multiplier must be a number >= 0; got the {type(noise_multiplier).__name__} "
                        f"{noise_multiplier!r}.")
    validate_clip_norm(l2_clip_norm)
    check_mechanism(mechanism)
    noise_multiplier = float(noise_multiplier)
    if not np.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier}.")
    if int(expected_batch_size) != expected_batch_size or expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be an integer >= 1; got {expected_batch_size!r}.")
    if secure and mechanism == "lattice":
        raise ValueError("secure=True applies to mechanism='gaussian' (a defence for float32 Gaussian sampling); "
                         "the lattice mechanism's guarantee covers its exact integer distribution: leave secure=False.")
    total_sensitivity = sensitivity(l2_clip_norm)
    default_stddev = stddev_at_least(noise_multiplier * total_sensitivity)
    scale = 1.0 / float(expected_batch_size)
    key_words = _key_words(key)

    def init_fn(params: optax.Params) -> DPNoiseState:
        del params
        return DPNoiseState(key=key_words, count=jnp.zeros((), jnp.int32))

    def update_fn(updates: optax.Updates, state: DPNoiseState, params: optax.Params | None = None, *,
                  l2_clip_norm=None, **extra_args):
        del params, extra_args
        if mechanism == "lattice":
            setup = lattice.lattice_noise(noise_multiplier, total_sensitivity, _num_coordinates(updates))
            noised, count = _lattice_step(updates, state.key, state.count, l2_clip_norm, scale, mechanism=setup)
        else:
            noised, count = _gaussian_step(updates, state.key, state.count, default_stddev, noise_multiplier,
                                           l2_clip_norm, scale, secure=secure)
        return noised, DPNoiseState(key=state.key, count=count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def noise_stddev(noise_multiplier: float, l2_clip_norm: float | object, expected_batch_size: int, *,
                 mechanism: str = "gaussian", num_params: int | None = None) -> float:
    """Standard deviation of the noise in the averaged gradient that ``dp_noise`` outputs: ``z C / B``; for
    ``mechanism="lattice"`` (which needs ``num_params``, the number of noised coordinates) ``z`` times the
    lattice's effective sensitivity, over ``B`` (a lower bound: the sampler's is larger by ``2^-14``, relative)."""
    c = sensitivity(l2_clip_norm)
    if check_mechanism(mechanism) == "lattice":
        if num_params is None:
            raise ValueError("noise_stddev(mechanism='lattice') needs num_params, the number of noised coordinates.")
        c = lattice.effective_sensitivity(c, num_params, noise_multiplier)
    return float(noise_multiplier) * c / float(expected_batch_size)
