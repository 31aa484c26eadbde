"""Models and helpers shared by the clipping tests (test_clipping_*.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class ConvNet(nn.Module):
    """Every convolution form the fast path handles: strided SAME, explicit pads, 1x1 stride-2 projection,
    VALID, with and without bias; GroupNorm; a Dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3), strides=2, padding="SAME")(x)))
        shortcut = nn.Conv(16, (1, 1), strides=2, use_bias=False)(x)
        x = nn.Conv(16, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=4)(x) + shortcut)
        x = nn.Conv(16, (2, 2), padding="VALID")(x)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def normal(seed, shape):
    # numpy, not jax.random: each jax.random call compiles a threefry graph (seconds on a loaded CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def perturbed(params):
    """Random non-zero biases and non-unit scales too, so that every parameter has a real gradient."""
    rng = np.random.default_rng(9)
    return jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape, dtype=np.float32), params)


def cross_entropy_loss(model):
    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

    return loss_fn


CONVNET_LOSS = cross_entropy_loss(ConvNet())


def assert_same(out, ref, rtol=1e-4, atol=1e-6):
    clipped, norms, losses = out
    ref_clipped, ref_norms, ref_losses = ref
    assert jax.tree_util.tree_structure(clipped) == jax.tree_util.tree_structure(ref_clipped)
    for a, b in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(ref_clipped), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.isfinite(norms), np.isfinite(ref_norms))
    finite = np.isfinite(ref_norms)
    np.testing.assert_allclose(np.asarray(norms)[finite], np.asarray(ref_norms)[finite], rtol=rtol)
    np.testing.assert_allclose(np.asarray(losses)[finite], np.asarray(ref_losses)[finite], rtol=rtol)


def flat(tree):
    """All leaves of a pytree as one float64 vector (to measure distances between clipped sums)."""
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(tree)])
