"""Per-example clipping checked against gradients known in closed form.

Model: linear regression, loss_i = (w.x_i + b - y_i)^2 / 2, so each example's gradient is
g_i = (r_i x_i, r_i) with residual r_i = w.x_i + b - y_i. With w = (1, 2), b = 0 the examples below have

  example  x           r      g_w             ||g||   factor min(1, 5/||g||)   clipped g_w
  0        (3, 4)      0.5    (1.5, 2)        2.5     1                        (1.5, 2)
  1        (0.6, 0.8)  5      (3, 4)          5       1   (exactly at C)       (3, 4)
  2        (3, 4)      4      (12, 16)        20      0.25                     (3, 4)
  3        (1, 0)     -10     (-10, 0)        10      0.5                      (-5, 0)

(for the flat-bound tests the bias is frozen out of the gradient by using a model without bias).
Sum of clipped gradients: (1.5 + 3 + 3 - 5, 2 + 4 + 4 + 0) = (2.5, 10).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp
from jaxdp import clipping

X = np.array([[3, 4], [0.6, 0.8], [3, 4], [1, 0]], np.float32)
W = np.array([1.0, 2.0], np.float32)
R = np.array([0.5, 5.0, 4.0, -10.0], np.float32)
Y = X @ W - R


def linear_loss(params, x, y):
    return jnp.mean(0.5 * (x @ params["w"] - y) ** 2)


def affine_loss(params, x, y):
    return jnp.mean(0.5 * (x @ params["w"] + params["b"] - y) ** 2)


def run(loss_fn, params, x, y, mask, **kwargs):
    fn = jax.jit(jaxdp.clipped_grad(loss_fn, **kwargs))
    return fn(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))


def test_flat_clipping_matches_hand_computed_values():
    clipped, norms = run(linear_loss, {"w": W}, X, Y, np.ones(4, bool), l2_clip_norm=5.0)
    np.testing.assert_allclose(norms, [2.5, 5.0, 20.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["w"], [2.5, 10.0], rtol=1e-6)
    assert norms.dtype == jnp.float32


def test_mask_removes_examples_exactly():
    mask = np.array([True, False, True, False])
    clipped, norms = run(linear_loss, {"w": W}, X, Y, mask, l2_clip_norm=5.0)
    np.testing.assert_allclose(clipped["w"], [1.5 + 3, 2 + 4], rtol=1e-6)
    # Norms are reported for every row; the caller masks them.
    np.testing.assert_allclose(norms, [2.5, 5.0, 20.0, 10.0], rtol=1e-6)
    clipped, _ = run(linear_loss, {"w": W}, X, Y, np.zeros(4, bool), l2_clip_norm=5.0)
    assert np.all(np.asarray(clipped["w"]) == 0.0)


def test_return_loss_gives_per_example_losses():
    _, _, losses = run(linear_loss, {"w": W}, X, Y, np.ones(4, bool), l2_clip_norm=5.0, return_loss=True)
    np.testing.assert_allclose(losses, 0.5 * R**2, rtol=1e-6)


@pytest.mark.parametrize("microbatch_size", [1, 3, 4, 8])
def test_microbatching_gives_the_same_result(microbatch_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 2)).astype(np.float32) * 3
    y = rng.normal(size=10).astype(np.float32)
    mask = rng.random(10) < 0.7
    full = run(linear_loss, {"w": W}, x, y, mask, l2_clip_norm=1.0)
    chunked = run(linear_loss, {"w": W}, x, y, mask, l2_clip_norm=1.0, microbatch_size=microbatch_size)
    np.testing.assert_allclose(chunked[0]["w"], full[0]["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked[1], full[1], rtol=1e-6)


def test_per_layer_clipping_hand_computed():
    # With bias b = 0 the bias gradient is r_i: (0.5, 5, 4, -10). Bounds: w -> 5, b -> 2.
    params = {"w": W, "b": np.float32(0.0)}
    clipped, norms = run(affine_loss, params, X, Y, np.ones(4, bool), l2_clip_norm={"w": 5.0, "b": 2.0})
    # w part is clipped exactly as in the flat test; b part: min(1, 2/|r|) * r = (0.5, 2, 2, -2) -> sum 2.5
    np.testing.assert_allclose(clipped["w"], [2.5, 10.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], 2.5, rtol=1e-6)
    # Reported norms are of the whole gradient (w and b together): |r| * sqrt(||x||^2 + 1).
    np.testing.assert_allclose(norms, np.abs(R) * np.sqrt((X**2).sum(1) + 1), rtol=1e-6)
    assert clipping.sensitivity({"w": 5.0, "b": 2.0}) == pytest.approx(np.sqrt(29.0))


def test_nonfinite_example_is_zeroed_and_counted():
    x = X.copy()
    x[2] = [np.nan, 1.0]
    y = Y.copy()
    y[3] = np.inf
    clipped, norms = run(linear_loss, {"w": W}, x, y, np.ones(4, bool), l2_clip_norm=5.0)
    np.testing.assert_allclose(clipped["w"], [1.5 + 3, 2 + 4], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(clipped["w"])))
    assert int(clipping.count_nonfinite(norms, jnp.ones(4, bool))) == 2
    assert int(clipping.count_nonfinite(norms, jnp.array([True, True, False, True]))) == 1


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


@pytest.mark.parametrize("bound", [0.05, 1.0, 100.0])
def test_sensitivity_bound_add_remove_and_replace(bound):
    """Removing one example moves the clipped sum by <= C; replacing one by <= 2C (checked for every i)."""
    rng = np.random.default_rng(1)
    params = {
        "w1": rng.normal(size=(5, 8)).astype(np.float32),
        "b1": np.zeros(8, np.float32),
        "w2": rng.normal(size=(8, 3)).astype(np.float32),
    }
    x = rng.normal(size=(12, 5)).astype(np.float32) * 4
    y = rng.integers(0, 3, size=12)
    fn = jax.jit(jaxdp.clipped_grad(mlp_loss, l2_clip_norm=bound))
    full, norms = fn(params, x, y, jnp.ones(12, bool))
    flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(t)])
    x_other = rng.normal(size=(12, 5)).astype(np.float32) * 4
    for i in range(12):
        mask = np.ones(12, bool)
        mask[i] = False
        removed, _ = fn(params, x, y, jnp.asarray(mask))
        moved = np.linalg.norm(flat(full) - flat(removed))
        assert moved <= bound * (1 + 1e-5)
        # The bound is attained exactly when the example's gradient is at least C long.
        np.testing.assert_allclose(moved, min(bound, float(norms[i])), rtol=1e-4)
        x_rep = x.copy()
        x_rep[i] = x_other[i]
        replaced, _ = fn(params, x_rep, y, jnp.ones(12, bool))
        assert np.linalg.norm(flat(full) - flat(replaced)) <= 2 * bound * (1 + 1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="l2_clip_norm must be a finite number > 0"):
        jaxdp.clipped_grad(linear_loss, l2_clip_norm=0.0)
    with pytest.raises(ValueError, match="l2_clip_norm must be a finite number > 0"):
        jaxdp.clipped_grad(linear_loss, l2_clip_norm={"w": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match="microbatch_size must be None or an integer >= 1"):
        jaxdp.clipped_grad(linear_loss, l2_clip_norm=1.0, microbatch_size=0)
    with pytest.raises(ValueError, match="Unknown clipping strategy 'magic'"):
        jaxdp.clipped_grad(linear_loss, l2_clip_norm=1.0, strategy="magic")


def test_a_strategy_registers_itself():
    from jaxdp.clipping import core, vmap

    def halved(loss_fn, l2_clip_norm, clip_rule):  # a strategy that clips to half the bound, via vmap's builder
        return vmap.vmap_strategy(loss_fn, l2_clip_norm / 2, clip_rule)

    clipping.register_strategy("test_halved", halved)
    try:
        assert "test_halved" in clipping.available_strategies()
        clipped, _ = run(linear_loss, {"w": W}, X, Y, np.ones(4, bool), l2_clip_norm=10.0, strategy="test_halved")
        np.testing.assert_allclose(clipped["w"], [2.5, 10.0], rtol=1e-6)  # the table above, C = 5
        with pytest.raises(ValueError, match="already registered"):
            clipping.register_strategy("test_halved", vmap.vmap_strategy)
    finally:
        core._STRATEGIES.pop("test_halved")
