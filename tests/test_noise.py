"""The Gaussian noise transformation: scale, independence, determinism, optax composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.noise import noise_stddev

N = 200_000  # coordinates; the sample std of N normals has relative standard error 1/sqrt(2N) = 0.16%


def zeros():
    return {"a": jnp.zeros((N // 2,)), "b": jnp.zeros((N // 4, 2))}


def flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("z,c,b", [(0.7, 5.0, 32), (1.5, 1.0, 256), (0.5, 10.0, 1)])
def test_noise_standard_deviation_is_z_c_over_b(z, c, b):
    tx = jaxdp.dp_noise(noise_multiplier=z, l2_clip_norm=c, expected_batch_size=b, key=jax.random.key(0))
    out, _ = jax.jit(tx.update)(zeros(), tx.init(zeros()))
    sample = flat(out)
    expected = z * c / b
    assert noise_stddev(z, c, b) == pytest.approx(expected)
    # 1% is 6 standard errors: a wrong scale (sqrt(B), missing z or C, 2C) fails by far more.
    assert np.std(sample) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(sample)) < 6 * expected / np.sqrt(N)


def test_fresh_independent_noise_every_step_and_every_leaf():
    tx = jaxdp.dp_noise(1.0, 1.0, 1, jax.random.key(3))
    state = tx.init(zeros())
    update = jax.jit(tx.update)
    first, state = update(zeros(), state)
    second, state = update(zeros(), state)
    a, b = flat(first), flat(second)
    # Correlation of independent standard normals: |r| < 6 / sqrt(N) with overwhelming probability.
    assert abs(np.corrcoef(a, b)[0, 1]) < 6 / np.sqrt(N)
    leaf_a = np.ravel(first["a"])
    leaf_b = np.ravel(first["b"])
    assert abs(np.corrcoef(leaf_a, leaf_b)[0, 1]) < 6 / np.sqrt(N // 2)
    assert int(state.count) == 2


def test_same_key_same_noise_and_resume_from_state():
    tx = jaxdp.dp_noise(1.0, 2.0, 4, jax.random.key(7))
    s0 = tx.init(zeros())
    out1, s1 = tx.update(zeros(), s0)
    out2, _ = tx.update(zeros(), s1)
    # A state restored from a checkpoint (plain arrays) continues with the same draws.
    restored = type(s1)(key=np.asarray(s1.key), count=np.asarray(s1.count))
    out2_resumed, _ = tx.update(zeros(), restored)
    np.testing.assert_array_equal(flat(out2), flat(out2_resumed))
    again, _ = jaxdp.dp_noise(1.0, 2.0, 4, jax.random.key(7)).update(zeros(), s0)
    np.testing.assert_array_equal(flat(out1), flat(again))


def test_zero_noise_divides_the_sum_by_the_expected_batch_size():
    grads = {"w": jnp.array([8.0, -4.0])}
    tx = optax.chain(jaxdp.dp_noise(0.0, 1.0, 4, jax.random.key(0)), optax.sgd(1.0))
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["w"], [-2.0, 1.0])


def test_per_layer_bounds_use_total_sensitivity():
    tx = jaxdp.dp_noise(1.0, {"a": 3.0, "b": 4.0}, 1, jax.random.key(0))
    out, _ = tx.update(zeros(), tx.init(zeros()))
    assert np.std(flat(out)) == pytest.approx(5.0, rel=0.01)


def test_invalid_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0; got -1.0"):
        jaxdp.dp_noise(-1.0, 1.0, 32, key)
    with pytest.raises(ValueError, match="expected_batch_size must be an integer >= 1; got 0"):
        jaxdp.dp_noise(1.0, 1.0, 0, key)
    with pytest.raises(ValueError, match="l2_clip_norm must be a finite number > 0"):
        jaxdp.dp_noise(1.0, float("inf"), 32, key)
