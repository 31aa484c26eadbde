"""The "bookkeeping" strategy: which layers take the fast path, its chunked norms and sums, and its exactness."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clipping_testlib import CONVNET_LOSS, ConvNet, assert_same, cross_entropy_loss, normal, perturbed

import jaxdp
from jaxdp import clipping
from jaxdp.bench import random_params
from jaxdp.clipping import bookkeeping
from jaxdp.clipping.layers import Layer, per_example_matrices


@pytest.fixture(scope="module")
def convnet():
    model = ConvNet()
    x = normal(0, (6, 9, 9, 3))
    x = x.at[3].set(jnp.nan)  # a poisoned example: must be zeroed, reported as non-finite
    y = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([True, True, True, True, True, False])  # the last example is padding
    params = perturbed(random_params(model, x[:1], seed=1))
    return CONVNET_LOSS, params, x, y, mask


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
    x = normal(2, (3, 8, 8, 2))
    y = jnp.array([0, 1, 1])
    mask = jnp.ones(3, bool)
    params = perturbed(random_params(model, x[:1], seed=3))
    loss_fn = cross_entropy_loss(model)
    report = clipping.fast_path_report(loss_fn, params, x, y)
    assert report == [
        "Conv_0: per-example vmap fallback (dilated)",
        "Conv_1: per-example vmap fallback (grouped)",
        "Dense_0: per-example vmap fallback (parameters not found at the module path, or layer called twice)",
        "Dense_0: per-example vmap fallback (parameters not found at the module path, or layer called twice)",
        "Dense_1: fast (dense)",
    ]
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 0.1, return_loss=True))(params, x, y, mask)
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 0.1, strategy="bookkeeping", return_loss=True))(params, x, y, mask)
    assert_same(out, ref)


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


_ODD_LOSS = cross_entropy_loss(OddConvNet())


# max_pixels 0: every convolution by XLA; 10**6: every convolution as patches x matmul. max_patch_bytes 1:
# patches for one example at a time; 3000: a few examples at a time, the last chunk shorter; the default: the
# whole batch at once.
@pytest.mark.parametrize("max_pixels, max_patch_bytes", [
    (0, 1), (10**6, 3000), (0, clipping.DEFAULT_MAX_PATCH_BYTES), (16, 3000)])
@pytest.mark.parametrize("net", ["convnet", "odd"])
def test_bookkeeping_paths_match_vmap(convnet, max_pixels, max_patch_bytes, net):
    if net == "convnet":
        loss_fn, params, x, y, mask = convnet
    else:
        loss_fn = _ODD_LOSS
        x = normal(8, (7, 10, 10, 2))
        y = jnp.array([0, 1, 1, 0, 1, 0, 0])
        mask = jnp.array([True] * 6 + [False])
        params = perturbed(random_params(OddConvNet(), x[:1], seed=4))
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 0.5, return_loss=True))(params, x, y, mask)
    options = {"max_pixels": max_pixels, "max_patch_bytes": max_patch_bytes}
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 0.5, None, strategy="bookkeeping", return_loss=True,
                                     strategy_options=options))(params, x, y, mask)
    assert_same(out, ref)


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 10])
def test_chunked_layer_norms_and_sums(chunk):
    layer = Layer(("c",), "conv", False, (3, 3), (1, 1), ((1, 1), (1, 1)))
    x = normal(10, (5, 1, 6, 6, 4))
    dy = normal(11, (5, 1, 6, 6, 3))
    p, d = per_example_matrices(x, dy, layer)
    per_example = jnp.einsum("btk,bto->bko", p, d)
    got = jax.jit(lambda a, b: bookkeeping._layer_kernel_sq_norms(a, b, layer, chunk))(x, dy)
    np.testing.assert_allclose(got, jnp.sum(per_example**2, axis=(1, 2)), rtol=1e-5)
    got = jax.jit(lambda a, b: bookkeeping._patch_kernel_grad(a, b, layer, chunk))(x, dy)
    np.testing.assert_allclose(got, jnp.sum(per_example, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 50, 60), (2, 30, 3, 2)])  # ghost form, materialised form
def test_kernel_norm_forms(shape):
    batch, t, k, o = shape
    p = normal(6, (batch, t, k))
    d = normal(7, (batch, t, o))
    explicit = jnp.sum(jnp.einsum("btk,bto->bko", p, d) ** 2, axis=(1, 2))
    np.testing.assert_allclose(bookkeeping._kernel_sq_norms(p, d), explicit, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Never the gradient of a different function: parameters used elsewhere or transformed, lifted transforms.
# On 4aca0b8 each of these was reported "fast": the tied, weight-normed and rescaled cases returned clipped sums
# off by 67%, 33% and 32% (relative L2 error against vmap), the remat and vmap cases raised UnexpectedTracerError.


class TiedAutoencoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        encoder = nn.Dense(4)
        return jnp.tanh(encoder(x)) @ encoder.variables["params"]["kernel"].T  # decoder: the encoder's kernel


class WeightNormed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.WeightNorm(nn.Dense(4))(x)))


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


class Rematted(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.remat(nn.Dense)(4)(x)))


class Vmapped(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [n, 2, 5]; one Dense applied to both positions through nn.vmap
        dense = nn.vmap(nn.Dense, in_axes=1, out_axes=1, variable_axes={"params": None},
                        split_rngs={"params": False})(4)
        return nn.Dense(3)(jnp.tanh(dense(x)).reshape(x.shape[0], -1))


def _softmax_loss(model, rescale=False):
    def loss_fn(params, x, y):
        if rescale:  # transforms params before apply: the layers see 2 * params
            params = jax.tree_util.tree_map(lambda p: 2.0 * p, params)
        return cross_entropy_loss(model)(params, x, y)

    return loss_fn


def _reconstruction_loss(model):
    return lambda params, x, y: jnp.mean((model.apply({"params": params}, x) - x) ** 2)


_TRANSFORMED = ("per-example vmap fallback (its parameters are not the leaves of params that loss_fn was given "
                "(transformed on the way, e.g. by nn.WeightNorm or by loss_fn itself))")
_LIFTED = "per-example vmap fallback (called inside a transform (nn.remat, nn.vmap, nn.scan, jax.checkpoint, ...))"


@pytest.mark.parametrize("case, expected_report", [
    ("tied", ["Dense_0: per-example vmap fallback (its parameters are also used outside the layer call (e.g. tied "
              "weights, a weight penalty))"]),
    ("weightnorm", [f"Dense_1: {_TRANSFORMED}", "Dense_0: fast (dense)"]),
    ("rescaled", [f"Dense_1: {_TRANSFORMED}", f"Dense_0: {_TRANSFORMED}"]),
    ("remat", [f"CheckpointDense_0: {_LIFTED}", "Dense_0: fast (dense)"]),
    ("vmap", [f"VmapDense_0: {_LIFTED}", "Dense_0: fast (dense)"]),
    ("plain", ["Dense_1: fast (dense)", "Dense_0: fast (dense)"]),
])
def test_parameters_used_elsewhere_or_transformed_fall_back_and_stay_exact(case, expected_report):
    model, shape = {"tied": (TiedAutoencoder(), (6, 5)), "weightnorm": (WeightNormed(), (6, 5)),
                    "rescaled": (TwoDense(), (6, 5)), "remat": (Rematted(), (6, 5)), "vmap": (Vmapped(), (6, 2, 5)),
                    "plain": (TwoDense(), (6, 5))}[case]
    loss_fn = _reconstruction_loss(model) if case == "tied" else _softmax_loss(model, rescale=case == "rescaled")
    x = normal(20, shape)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([True] * 5 + [False])
    params = perturbed(random_params(model, x[:1], seed=6))
    assert clipping.fast_path_report(loss_fn, params, x, y) == expected_report
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 0.1, return_loss=True))(params, x, y, mask)
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 0.1, strategy="bookkeeping", return_loss=True))(params, x, y, mask)
    assert_same(out, ref)
