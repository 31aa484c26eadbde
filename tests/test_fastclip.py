"""The fast clipping strategies give the vmap strategy's results: clipped sum, norms, losses, masks, NaN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import fastclip
from jaxdp.models import ResNet18
from jaxdp_study.bench import random_params

FAST = tuple(fastclip.STRATEGIES)


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


def _normal(seed, shape):
    # numpy, not jax.random: each jax.random call compiles a threefry graph (seconds on a loaded CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _perturbed(params):
    """Random non-zero biases and non-unit scales too, so that every parameter has a real gradient."""
    rng = np.random.default_rng(9)
    return jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape, dtype=np.float32), params)


def _cross_entropy_loss(model):
    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

    return loss_fn


@functools.cache
def _convnet_grad_fn(strategy):
    return jax.jit(jaxdp.clipped_grad(_CONVNET_LOSS, 0.5, strategy=strategy, return_loss=True))


_CONVNET_LOSS = _cross_entropy_loss(ConvNet())


@pytest.fixture(scope="module")
def convnet():
    model = ConvNet()
    x = _normal(0, (6, 9, 9, 3))
    x = x.at[3].set(jnp.nan)  # a poisoned example: must be zeroed, reported as non-finite
    y = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([True, True, True, True, True, False])  # the last example is padding
    params = _perturbed(random_params(model, x[:1], seed=1))
    return _CONVNET_LOSS, params, x, y, mask


def _assert_same(out, ref, rtol=1e-4, atol=1e-6):
    clipped, norms, losses = out
    ref_clipped, ref_norms, ref_losses = ref
    assert jax.tree_util.tree_structure(clipped) == jax.tree_util.tree_structure(ref_clipped)
    for a, b in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(ref_clipped), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.isfinite(norms), np.isfinite(ref_norms))
    finite = np.isfinite(ref_norms)
    np.testing.assert_allclose(np.asarray(norms)[finite], np.asarray(ref_norms)[finite], rtol=rtol)
    np.testing.assert_allclose(np.asarray(losses)[finite], np.asarray(ref_losses)[finite], rtol=rtol)


@pytest.mark.parametrize("strategy", FAST)
def test_matches_vmap_on_conv_groupnorm_dense(convnet, strategy):
    _, params, x, y, mask = convnet
    ref = _convnet_grad_fn("vmap")(params, x, y, mask)
    out = _convnet_grad_fn(strategy)(params, x, y, mask)
    _assert_same(out, ref)
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
        _assert_same(out, ref)


def test_hand_computed_dense():
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


class Fallbacks(nn.Module):
    """Layers the fast path does not handle: dilated and grouped convs, and a Dense applied twice."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), kernel_dilation=2)(x)
        x = nn.Conv(4, (3, 3), feature_group_count=2)(x)
        shared = nn.Dense(4)
        x = shared(shared(jnp.mean(x, axis=(1, 2))))
        return nn.Dense(2)(x)


def test_unsupported_layers_fall_back_and_stay_exact():
    model = Fallbacks()
    x = _normal(2, (3, 8, 8, 2))
    y = jnp.array([0, 1, 1])
    mask = jnp.ones(3, bool)
    params = _perturbed(random_params(model, x[:1], seed=3))
    loss_fn = _cross_entropy_loss(model)
    report = fastclip.fast_path_report(loss_fn, params, x, y)
    assert report == [
        "Conv_0: per-example vmap fallback (dilated)",
        "Conv_1: per-example vmap fallback (grouped)",
        "Dense_0: per-example vmap fallback (parameters not found at the module path, or layer called twice)",
        "Dense_0: per-example vmap fallback (parameters not found at the module path, or layer called twice)",
        "Dense_1: fast (dense)",
    ]
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 0.1, return_loss=True))(params, x, y, mask)
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 0.1, strategy="bookkeeping", return_loss=True))(params, x, y, mask)
    _assert_same(out, ref)


@pytest.mark.slow
def test_resnet18_family_member_matches_vmap():
    # The paper's architecture (smaller): 7x7 stride-2 stem with padding 3, max-pool, a projection block.
    model = ResNet18(num_classes=2, stage_sizes=(1, 1), width=8, num_groups=4)
    x = _normal(4, (3, 16, 16, 3))
    y = jnp.array([0, 1, 1])
    mask = jnp.array([True, True, False])
    params = _perturbed(random_params(model, x[:1], seed=5))
    loss_fn = _cross_entropy_loss(model)
    assert all(line.endswith("fast (conv)") or line.endswith("fast (dense)")
               for line in fastclip.fast_path_report(loss_fn, params, x, y))
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0, return_loss=True))(params, x, y, mask)
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0, strategy="bookkeeping", return_loss=True))(params, x, y, mask)
    _assert_same(out, ref)


class OddConvNet(nn.Module):
    """Asymmetric SAME padding (even map, stride 2), a non-square kernel with unequal strides, a 4x4 SAME kernel
    (pads 1 and 2), explicit asymmetric pads."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(6, (3, 2), strides=(2, 1), padding="SAME", use_bias=False)(x))
        x = nn.relu(nn.Conv(5, (4, 4), padding="SAME")(x))
        x = nn.Conv(4, (2, 3), padding=((0, 1), (2, 0)))(x)
        return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


_ODD_LOSS = _cross_entropy_loss(OddConvNet())


# max_pixels 0: every convolution by XLA; 10**6: every convolution as patches x matmul. max_patch_bytes 1:
# patches for one example at a time; 3000: a few examples at a time, the last chunk shorter; the default: the
# whole batch at once.
@pytest.mark.parametrize("max_pixels, max_patch_bytes", [
    (0, 1), (10**6, 3000), (0, fastclip.DEFAULT_MAX_PATCH_BYTES), (16, 3000)])
@pytest.mark.parametrize("net", ["convnet", "odd"])
def test_bookkeeping_paths_match_vmap(convnet, max_pixels, max_patch_bytes, net):
    if net == "convnet":
        loss_fn, params, x, y, mask = convnet
    else:
        loss_fn = _ODD_LOSS
        x = _normal(8, (7, 10, 10, 2))
        y = jnp.array([0, 1, 1, 0, 1, 0, 0])
        mask = jnp.array([True] * 6 + [False])
        params = _perturbed(random_params(OddConvNet(), x[:1], seed=4))
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 0.5, return_loss=True))(params, x, y, mask)
    build = fastclip.STRATEGIES["bookkeeping"]
    out = jax.jit(build(loss_fn, 0.5, None, True, max_pixels=max_pixels, max_patch_bytes=max_patch_bytes))(
        params, x, y, mask)
    _assert_same(out, ref)


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 10])
def test_chunked_layer_norms_and_sums(chunk):
    layer = fastclip._Layer(("c",), "conv", False, (3, 3), (1, 1), ((1, 1), (1, 1)))
    x = _normal(10, (5, 1, 6, 6, 4))
    dy = _normal(11, (5, 1, 6, 6, 3))
    p, d = fastclip._per_example_matrices(x, dy, layer)
    per_example = jnp.einsum("btk,bto->bko", p, d)
    got = jax.jit(lambda a, b: fastclip._layer_kernel_sq_norms(a, b, layer, chunk))(x, dy)
    np.testing.assert_allclose(got, jnp.sum(per_example**2, axis=(1, 2)), rtol=1e-5)
    got = jax.jit(lambda a, b: fastclip._patch_kernel_grad(a, b, layer, chunk))(x, dy)
    np.testing.assert_allclose(got, jnp.sum(per_example, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 50, 60), (2, 30, 3, 2)])  # ghost form, materialised form
def test_kernel_norm_forms(shape):
    batch, t, k, o = shape
    p = _normal(6, (batch, t, k))
    d = _normal(7, (batch, t, o))
    explicit = jnp.sum(jnp.einsum("btk,bto->bko", p, d) ** 2, axis=(1, 2))
    np.testing.assert_allclose(fastclip._kernel_sq_norms(p, d), explicit, rtol=1e-5)


def test_matmul_convs_same_value(convnet):
    loss_fn, params, x, y, _ = convnet
    x, y = x[:3], y[:3]
    fast = fastclip.matmul_convs(loss_fn, max_pixels=100)
    np.testing.assert_allclose(jax.jit(fast)(params, x, y), jax.jit(loss_fn)(params, x, y), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(jax.grad(fast))(params, x, y)),
                    jax.tree_util.tree_leaves(jax.jit(jax.grad(loss_fn))(params, x, y)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_strategies_registered():
    assert set(FAST) <= set(jaxdp.clipping.available_strategies())
    with pytest.raises(ValueError, match="l2_clip_norm"):
        fastclip.STRATEGIES["bookkeeping"](lambda p, x, y: 0.0, -1.0)
