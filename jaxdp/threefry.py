"""Random bits for the noise mechanisms: Threefry-4x32-20 in ``jax.numpy``, keys as four words, chunked drawing.

Threefry-4x32-20 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the counter-based
generator of Random123, checked against its known-answer vectors in ``tests/test_noise.py``) is written here in
``jax.numpy``, so that the bits are the same on every backend and JAX version. A key is 128 bits (four uint32
words); a counter is four uint32 words, of which the last names the use (:data:`BITS`, :data:`STEP`,
:data:`LATTICE`), so the uses of one key never share a block. Both :mod:`jaxdp.noise` (the Gaussian mechanism)
and :mod:`jaxdp.lattice` (the lattice mechanism) draw from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((10, 26), (11, 21), (13, 27), (23, 5), (6, 20), (17, 11), (25, 10), (18, 20))
_PARITY = np.uint32(0x1BD11BDA)

# The fourth counter word: Gaussian random bits (0), a step's key (1), the lattice mechanism's bits (2).
BITS, STEP, LATTICE = 0, 1, 2

MAX_DRAW = 2**32  # a draw's value index is one uint32 counter word


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry4x32(key: Sequence, counter: Sequence) -> list[jax.Array]:
    """Threefry-4x32 with 20 rounds (Random123): four uint32 key words and four counter words -> four words.

    Counter words broadcast against each other (arrays or scalars); the key words are scalars.
    """
    k = [jnp.asarray(w, jnp.uint32) for w in key]
    schedule = k + [k[0] ^ k[1] ^ k[2] ^ k[3] ^ _PARITY]
    x = [jnp.asarray(c, jnp.uint32) + schedule[i] for i, c in enumerate(counter)]
    for r in range(20):
        a, b = _ROTATIONS[r % 8]
        if r % 2 == 0:
            x[0] = x[0] + x[1]
            x[1] = _rotate_left(x[1], a) ^ x[0]
            x[2] = x[2] + x[3]
            x[3] = _rotate_left(x[3], b) ^ x[2]
        else:
            x[0] = x[0] + x[3]
            x[3] = _rotate_left(x[3], a) ^ x[0]
            x[2] = x[2] + x[1]
            x[1] = _rotate_left(x[1], b) ^ x[2]
        if r % 4 == 3:
            s = r // 4 + 1
            x = [x[i] + schedule[(s + i) % 5] for i in range(4)]
            x[3] = x[3] + np.uint32(s)
    return x


def derive(words: jax.Array, data, domain: int) -> jax.Array:
    """A new 128-bit key from ``words`` and an integer (a step count)."""
    out = threefry4x32(list(jnp.asarray(words, jnp.uint32)), [jnp.asarray(data).astype(jnp.uint32), 0, 0, domain])
    return jnp.stack(out)


def key_words(key: jax.Array) -> jax.Array:
    """The key's data as four uint32 words (shorter keys, e.g. a 64-bit Threefry-2x32 key, are zero-padded)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape:
            raise ValueError(f"Expected a single PRNG key; got an array of keys with shape {key.shape}.")
        key = jax.random.key_data(key)
    words = jnp.ravel(jnp.asarray(key)).astype(jnp.uint32)
    if words.size > 4:
        raise ValueError(f"A key holds at most 4 uint32 words (128 bits); got {words.size}.")
    return jnp.concatenate([words, jnp.zeros(4 - words.size, jnp.uint32)])


def check_draw_size(size: int) -> None:
    if size >= MAX_DRAW:
        raise ValueError(f"A noise draw holds fewer than 2**32 values (one counter word indexes them); got {size}.")


def computed_once(words: jax.Array, make: Callable[[], Any]) -> Any:
    """``make()`` (a traced computation of the draw keyed by ``words``), computed once and kept.

    It runs inside a ``lax.cond`` whose two branches are this same computation and whose predicate depends on
    ``words`` (so XLA cannot fold it): XLA keeps a conditional's result as a buffer and does not fuse it into its
    consumers. Fused, the integer-only generator counts as cheap and would be recomputed in every consumer (Adam's
    two moments and the update, for each leaf), which multiplies the compile time and the work. Inside the branch
    an element-wise draw is one loop that XLA's CPU backend can split over its threads, where a loop over chunks
    of the draw (``lax.scan``, jaxdp's earlier way) writes each chunk in place on one thread (CHANGELOG). Either
    branch gives the same values and takes the same time."""
    words = jnp.asarray(words, jnp.uint32)
    opaque = words[0] != words[1] + np.uint32(1)
    return jax.lax.cond(opaque, make, make)


def draw_values(values_of: Callable[[jax.Array], jax.Array], size: int, dtype, words: jax.Array) -> jax.Array:
    """``values_of(index)`` (a uint32 vector of value indices -> one value each) for indices ``0 .. size - 1``,
    computed once and kept (:func:`computed_once`; ``words``: the draw's key words, traced). Value ``i`` depends
    only on ``i``, so the values are those of any earlier version of this function."""
    check_draw_size(size)
    if size == 0:
        return jnp.zeros((0,), dtype)
    return computed_once(words, lambda: values_of(jax.lax.iota(jnp.uint32, size)).astype(dtype))
