"""The fast clipping strategies give the vmap strategy's results: clipped sum, norms, losses, masks, NaN."""

import functools

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from clipping_testlib import CONVNET_LOSS, ConvNet, assert_same, cross_entropy_loss, flat, normal, perturbed

import jaxdp
from jaxdp import clipping
from jaxdp.models import MLP, ResNet18, random_params

FAST = tuple(s for s in clipping.available_strategies() if s != "vmap")


@functools.cache
def _convnet_grad_fn(strategy):
    return jax.jit(jaxdp.clipped_grad(CONVNET_LOSS, 0.5, strategy=strategy, return_loss=True))


@pytest.fixture(scope="module")
def convnet():
    model = ConvNet()
    x = normal(0, (6, 9, 9, 3))
    x = x.at[3].set(jnp.nan)  # a poisoned example: must be zeroed, reported as non-finite
    y = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([True, True, True, True, True, False])  # the last example is padding
    params = perturbed(random_params(model, x[:1], seed=1))
    return CONVNET_LOSS, params, x, y, mask


@pytest.mark.parametrize("strategy", FAST)
def test_matches_vmap_on_conv_groupnorm_dense(convnet, strategy):
    _, params, x, y, mask = convnet
    ref = _convnet_grad_fn("vmap")(params, x, y, mask)
    out = _convnet_grad_fn(strategy)(params, x, y, mask)
    assert_same(out, ref)
    norms = np.asarray(out[1])
    assert not np.isfinite(norms[3]) and np.isfinite(np.delete(norms, 3)).all()
    assert int(jaxdp.clipping.count_nonfinite(out[1], mask)) == 1
    # Clip 0.5 is below every finite norm here, so the sum of the four live examples has norm <= 4 * 0.5.
    assert np.all(np.delete(norms, 3) > 0.5)
    total = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(out[0])))
    assert total <= 4 * 0.5 + 1e-5


@pytest.mark.parametrize("strategy", FAST)
def test_padding_contributes_nothing(convnet, strategy):
    _, params, x, y, mask = convnet
    garbage = x.at[5].set(1e6)  # the padding example's values must not matter, even huge ones
    a = _convnet_grad_fn(strategy)(params, x, y, mask)[0]
    b = _convnet_grad_fn(strategy)(params, garbage, y, mask)[0]
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


def test_microbatches_and_per_layer_bounds(convnet):
    loss_fn, params, x, y, mask = convnet
    bounds = {name: (0.3 if name.startswith("Conv") else 0.2) for name in params}
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, bounds, 4, return_loss=True))(params, x, y, mask)
    for strategy in FAST:
        out = jax.jit(jaxdp.clipped_grad(loss_fn, bounds, 4, strategy=strategy, return_loss=True))(
            params, x, y, mask)
        assert_same(out, ref)


def test_hand_computed_dense():
    import flax.linen as nn

    # loss = (x.w - y)^2 / 2 with w = 0 and y = -1: the example's gradient is x itself.
    model = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)
    params = {"kernel": jnp.zeros((2, 1))}

    def loss_fn(p, x, y):
        return jnp.mean((model.apply({"params": p}, x)[:, 0] - y) ** 2) / 2

    x = jnp.array([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]])
    y = -jnp.ones(3)
    mask = jnp.array([True, True, False])
    for strategy in FAST:
        clipped, norms = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0, strategy=strategy))(params, x, y, mask)
        # [3, 4] (norm 5) clipped to [0.6, 0.8]; [0.3, 0.4] (norm 0.5) kept; the padding one dropped.
        np.testing.assert_allclose(clipped["kernel"][:, 0], [0.9, 1.2], rtol=1e-6)
        np.testing.assert_allclose(norms, [5.0, 0.5, 50.0], rtol=1e-6)


@pytest.mark.slow
def test_resnet18_family_member_matches_vmap():
    # The paper's architecture (smaller): 7x7 stride-2 stem with padding 3, max-pool, a projection block.
    model = ResNet18(num_classes=2, stage_sizes=(1, 1), width=8, num_groups=4)
    x = normal(4, (3, 16, 16, 3))
    y = jnp.array([0, 1, 1])
    mask = jnp.array([True, True, False])
    params = perturbed(random_params(model, x[:1], seed=5))
    loss_fn = cross_entropy_loss(model)
    assert all(line.endswith("fast (conv)") or line.endswith("fast (dense)")
               for line in clipping.fast_path_report(loss_fn, params, x, y))
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0, return_loss=True))(params, x, y, mask)
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0, strategy="bookkeeping", return_loss=True))(params, x, y, mask)
    assert_same(out, ref)


def test_matmul_convs_same_value(convnet):
    loss_fn, params, x, y, _ = convnet
    x, y = x[:3], y[:3]
    fast = clipping.matmul_convs(loss_fn, max_pixels=100)
    np.testing.assert_allclose(jax.jit(fast)(params, x, y), jax.jit(loss_fn)(params, x, y), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(jax.grad(fast))(params, x, y)),
                    jax.tree_util.tree_leaves(jax.jit(jax.grad(loss_fn))(params, x, y)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class _Grouped(nn.Module):
    """A grouped convolution: outside bookkeeping's fast path."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), feature_group_count=2)(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


class _Tied(nn.Module):
    """One Dense layer applied twice: its parameters are used by two calls."""

    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(x.shape[-1])
        return layer(nn.relu(layer(x)))[..., :2]


def test_auto_picks_by_model_and_matches_vmap(convnet):
    loss_fn, params, x, y, mask = convnet
    assert clipping.resolve_strategy(loss_fn, params, x, y)[0] == "bookkeeping"
    grouped_x, flat_x = normal(1, (4, 6, 6, 2)), normal(2, (4, 3))
    labels = jnp.array([0, 1, 1, 0])
    for model, inputs, expected in [(_Grouped(), grouped_x, "vmap_matmul"), (_Tied(), flat_x, "vmap")]:
        model_loss = cross_entropy_loss(model)
        model_params = perturbed(random_params(model, inputs[:1], seed=3))
        name, reason = clipping.resolve_strategy(model_loss, model_params, inputs, labels)
        assert name == expected and "fall back" in reason
        # Shapes are enough.
        specs = jax.ShapeDtypeStruct((9, *inputs.shape[1:]), inputs.dtype), jax.ShapeDtypeStruct((9,), jnp.int32)
        assert clipping.resolve_strategy(model_loss, model_params, *specs)[0] == expected
        mask4 = jnp.ones(4, bool)
        ref = jax.jit(jaxdp.clipped_grad(model_loss, 0.5, return_loss=True))(model_params, inputs, labels, mask4)
        auto = jaxdp.clipped_grad(model_loss, 0.5, strategy="auto", return_loss=True)
        assert_same(jax.jit(auto)(model_params, inputs, labels, mask4), ref)


def test_strategies_registered():
    assert set(FAST) == {"bookkeeping", "vmap_matmul", "auto"}
    assert clipping.available_strategies()[0] == "vmap"
    with pytest.raises(ValueError, match="l2_clip_norm"):
        jaxdp.clipped_grad(lambda p, x, y: 0.0, -1.0, strategy="bookkeeping")


@functools.cache
def _mlp_grad_fn(strategy):
    return jax.jit(jaxdp.clipped_grad(cross_entropy_loss(MLP(num_classes=2, hidden_sizes=(8, 8))), _MLP_BOUND,
                                      strategy=strategy))


_MLP_BOUND = 1.9  # between these examples' gradient norms (0.8 to 3.7): some are clipped, some are not


def test_auto_picks_bookkeeping_for_the_mlp():
    model = MLP(num_classes=2, hidden_sizes=(8, 8))
    x = normal(3, (4, 6))
    name, reason = clipping.resolve_strategy(cross_entropy_loss(model), random_params(model, x[:1]), x,
                                             jnp.zeros(4, jnp.int32))
    assert (name, reason) == ("bookkeeping", "every Conv/Dense layer is on the book-keeping fast path")


@pytest.mark.parametrize("strategy", clipping.available_strategies())
def test_removing_one_example_moves_the_mlp_clipped_sum_by_at_most_c(strategy):
    # The Adult network's shape in small (tanh, Dense only): under add-or-remove-one neighbours the clipped sum's
    # sensitivity is C, attained when the removed example's gradient is at least C long.
    model, bound = MLP(num_classes=2, hidden_sizes=(8, 8)), _MLP_BOUND
    x, y = normal(5, (8, 6)) * 3, jnp.asarray(np.arange(8) % 2)
    params = perturbed(random_params(model, x[:1], seed=2))
    fn = _mlp_grad_fn(strategy)
    full, norms = fn(params, x, y, jnp.ones(8, bool))
    assert np.sum(np.asarray(norms) > bound) >= 3 and np.sum(np.asarray(norms) < bound) >= 3
    for i in range(8):
        removed, _ = fn(params, x, y, jnp.arange(8) != i)
        moved = np.linalg.norm(flat(full) - flat(removed))
        assert moved <= bound * (1 + 1e-5)
        np.testing.assert_allclose(moved, min(bound, float(norms[i])), rtol=1e-4)


@pytest.mark.parametrize("strategy", ["vmap", "bookkeeping"])
def test_clipped_grad_traces_its_products_at_full_float32_precision(strategy):
    # An accelerator's default matmul precision (TF32 on recent NVIDIA GPUs) would compute the norms and the sum
    # with a 10-bit mantissa: clipped_grad asks for full precision, whatever the caller's default.
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    x, y = jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p, xs, ys):
        logits = model.apply({"params": p}, xs)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ys[:, None], axis=1).mean()

    grad_fn = jaxdp.clipped_grad(loss_fn, 1.0, strategy=strategy)
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(grad_fn)(params, x, y, jnp.ones(4, bool))

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    found = list(dots(jaxpr.jaxpr))
    assert found
    for eqn in found:
        assert str(eqn.params["precision"]) in ("(Precision.HIGHEST, Precision.HIGHEST)", "Precision.HIGHEST"), \
            eqn.params["precision"]
