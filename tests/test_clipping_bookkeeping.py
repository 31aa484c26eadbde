"""The "bookkeeping" strategy: which layers take the fast path, its chunked norms and sums, and its exactness."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clipping_testlib import CONVNET_LOSS, ConvNet, assert_same, cross_entropy_loss, flat, normal, perturbed

import jaxdp
from jaxdp import clipping
from jaxdp.clipping import bookkeeping, layers
from jaxdp.clipping.layers import Layer, per_example_matrices
from jaxdp.models import random_params


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
# whole batch at once. max_stored_bytes 0: every layer's patches formed twice (norms, then clipped sum); the
# default: the small layers' per-example gradients formed once and kept.
@pytest.mark.parametrize("max_pixels, max_patch_bytes, max_stored_bytes", [
    (0, 1, 0), (10**6, 3000, 0), (0, clipping.DEFAULT_MAX_PATCH_BYTES, bookkeeping.DEFAULT_MAX_STORED_BYTES),
    (16, 3000, bookkeeping.DEFAULT_MAX_STORED_BYTES), (0, clipping.DEFAULT_MAX_PATCH_BYTES, 0)])
@pytest.mark.parametrize("net", ["convnet", "odd"])
def test_bookkeeping_paths_match_vmap(convnet, max_pixels, max_patch_bytes, max_stored_bytes, net):
    if net == "convnet":
        loss_fn, params, x, y, mask = convnet
    else:
        loss_fn = _ODD_LOSS
        x = normal(8, (7, 10, 10, 2))
        y = jnp.array([0, 1, 1, 0, 1, 0, 0])
        mask = jnp.array([True] * 6 + [False])
        params = perturbed(random_params(OddConvNet(), x[:1], seed=4))
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 0.5, return_loss=True))(params, x, y, mask)
    options = {"max_pixels": max_pixels, "max_patch_bytes": max_patch_bytes, "max_stored_bytes": max_stored_bytes}
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 0.5, None, strategy="bookkeeping", return_loss=True,
                                     strategy_options=options))(params, x, y, mask)
    assert_same(out, ref)


@pytest.mark.parametrize("max_stored_bytes, stored_patch_bytes",
                         [(0, None), (bookkeeping.DEFAULT_MAX_STORED_BYTES, None),
                          (bookkeeping.DEFAULT_MAX_STORED_BYTES, 8000)])
def test_removing_one_example_moves_the_conv_clipped_sum_by_at_most_c(max_stored_bytes, stored_patch_bytes,
                                                                     monkeypatch):
    # Both paths of the convolutions: per-example gradients kept (the default here) and formed twice (0). With
    # 8000-byte patch chunks the kept gradients go through the chunk loop (2 and 3 examples a chunk for the 3x3
    # convolutions, with a shorter last chunk), each chunk as two halves.
    if stored_patch_bytes is not None:
        monkeypatch.setattr(bookkeeping, "_STORED_PATCH_BYTES", stored_patch_bytes)
    params = perturbed(random_params(ConvNet(), normal(0, (1, 9, 9, 3)), seed=1))
    x, y, bound = normal(7, (8, 9, 9, 3)) * 3, jnp.asarray(np.arange(8) % 3), 0.5
    fn = jax.jit(jaxdp.clipped_grad(CONVNET_LOSS, bound, strategy="bookkeeping",
                                    strategy_options={"max_stored_bytes": max_stored_bytes}))
    full, norms = fn(params, x, y, jnp.ones(8, bool))
    assert np.sum(np.asarray(norms) > bound) >= 4  # most examples are clipped: their removal moves the sum by C
    for i in range(8):
        removed, _ = fn(params, x, y, jnp.arange(8) != i)
        moved = np.linalg.norm(flat(full) - flat(removed))
        assert moved <= bound * (1 + 1e-5)
        np.testing.assert_allclose(moved, min(bound, float(norms[i])), rtol=1e-4)


def _kernel_sq_norms(p, d):
    """The squared norms the strategy's bounds start from: the ghost form where the layer uses it."""
    _, t, k = p.shape
    if bookkeeping._uses_ghost(t, k, d.shape[-1]):
        return bookkeeping._ghost_sq_norms(p, d)
    return jnp.square(bookkeeping._materialised_norms(p, d))


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 10])
def test_chunked_layer_norms_and_sums(chunk):
    layer = Layer(("c",), "conv", False, (3, 3), (1, 1), ((1, 1), (1, 1)))
    x = normal(10, (5, 1, 6, 6, 4))
    dy = normal(11, (5, 1, 6, 6, 3))
    p, d = per_example_matrices(x, dy, layer)
    per_example = jnp.einsum("btk,bto->bko", p, d)
    got = jax.jit(lambda a, b: layers.over_chunks(
        lambda u, v: _kernel_sq_norms(*per_example_matrices(u, v, layer)), (a, b), chunk, reduce=False))(x, dy)
    np.testing.assert_allclose(got, jnp.sum(per_example**2, axis=(1, 2)), rtol=1e-5)
    got = jax.jit(lambda a, b: layers.summed_kernel_grad(a, b, layer, chunk))(x, dy)
    np.testing.assert_allclose(got, jnp.sum(per_example, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 50, 60), (2, 30, 3, 2)])  # ghost form, materialised form
def test_kernel_norm_forms(shape):
    batch, t, k, o = shape
    p = normal(6, (batch, t, k))
    d = normal(7, (batch, t, o))
    explicit = jnp.sum(jnp.einsum("btk,bto->bko", p, d) ** 2, axis=(1, 2))
    np.testing.assert_allclose(_kernel_sq_norms(p, d), explicit, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Never the gradient of a different function: parameters used elsewhere or transformed, lifted transforms.
# On ea63356 each of these was reported "fast": the tied, weight-normed and rescaled cases returned clipped sums
# off by 71%, 193% and 37% (relative L2 error against vmap), the remat and vmap cases raised UnexpectedTracerError.


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


# --------------------------------------------------------------------------------------------------------
# Floating point: the norm each example is clipped with bounds what the clipped-sum contraction adds for it.


class TwoPositions(nn.Module):
    """A bias-free Dense on two positions whose outputs nearly cancel: z = h_0 - (1 - eps) h_1."""

    @nn.compact
    def __call__(self, x, eps):
        h = nn.Dense(16, use_bias=False)(x)  # x: [n, 2, 16]; 2 positions, 16 -> 16: the ghost form
        return h[:, 0] - (1 - eps[:, None]) * h[:, 1]


def _cancellation_case(batch=24):
    rng = np.random.default_rng(30)
    x0 = rng.uniform(-1e5, 1e5, (batch, 16)).astype(np.float32)
    x = np.stack([x0, x0 * (1 + rng.normal(0, 1e-6, (batch, 16)))], axis=1).astype(np.float32)
    eps = (10.0 ** np.linspace(-7, -1, batch)).astype(np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32))}}
    return params, jnp.asarray(x), jnp.asarray(eps)


def _cancellation_loss(params, x, eps):
    return jnp.mean(jnp.sum(TwoPositions().apply({"params": params}, x, eps), axis=-1))


@pytest.mark.parametrize("strategy", clipping.available_strategies())
def test_no_example_contributes_more_than_the_clip_norm_under_cancellation(strategy):
    # On ea63356 "bookkeeping" failed: one example contributed 1.37 C and 6 examples more than C (1 + 1e-5), and
    # 6 finite examples got a NaN ghost norm (a negative Gram sum) and were counted non-finite.
    params, x, eps = _cancellation_case()
    batch = len(eps)
    fn = jax.jit(jaxdp.clipped_grad(_cancellation_loss, 1.0, strategy=strategy))
    _, norms = fn(params, x, eps, jnp.ones(batch, bool))
    assert np.isfinite(np.asarray(norms)).all()
    assert int(clipping.count_nonfinite(norms, jnp.ones(batch, bool))) == 0
    contributions = []
    for i in range(batch):  # each example's contribution: the clipped sum with only that example unmasked
        alone, _ = fn(params, x, eps, jnp.arange(batch) == i)
        contributions.append(np.linalg.norm(flat(alone)))
    assert max(contributions) <= 1.0 * (1 + 1e-5)
    assert max(contributions) >= 0.999  # not vacuous: examples with gradients longer than C contribute C


def test_cancellation_falls_back_to_materialised_norms():
    # The ghost norm's error bound is ~sqrt(roundoff) x (sum of |terms|): far above the norm under cancellation.
    # The materialised norm's bound is first order in the roundoff, so the bound clipped with stays near the norm.
    params, x, eps = _cancellation_case()
    mask = jnp.ones(len(eps), bool)
    ref = np.asarray(jax.jit(jaxdp.clipped_grad(_cancellation_loss, 1.0))(params, x, eps, mask)[1], np.float64)
    got = np.asarray(jax.jit(jaxdp.clipped_grad(_cancellation_loss, 1.0, strategy="bookkeeping"))(
        params, x, eps, mask)[1], np.float64)
    moderate = np.asarray(eps) >= 1e-4  # below, vmap's own norm is mostly rounding error
    assert np.all(got[moderate] <= ref[moderate] * 1.01)
    assert np.all(got[moderate] >= ref[moderate] * (1 - 1e-4))


# ghost, materialised, ghost, one position (a Dense layer on vectors: the product of two norms)
@pytest.mark.parametrize("shape", [(3, 4, 50, 60), (3, 30, 3, 2), (3, 6, 72, 16), (5, 1, 99, 256)])
@pytest.mark.parametrize("cancel", [False, True])
def test_kernel_norm_bounds_bound_the_summed_vector(shape, cancel):
    batch, t, k, o = shape
    p = np.asarray(normal(12, (batch, t, k)))
    d = np.asarray(normal(13, (batch, t, o)))
    if cancel:  # every position's input nearly equal, output gradients summing to nearly zero
        p = np.broadcast_to(p[:, :1] * 1e4, p.shape) + 1e-2 * p
        d = d - d.mean(axis=1, keepdims=True) * (1 - 1e-3)
    p, d = np.asarray(p, np.float32), np.asarray(d, np.float32)
    dense = Layer(("d",), "dense", False)  # P and D as a Dense layer's inputs and output gradients on T positions
    bounds = np.asarray(jax.jit(lambda a, b: bookkeeping._layer_kernel_norm_bounds(a, b, dense, 2, 1))(p, d),
                        np.float64)
    exact = np.linalg.norm(np.einsum("btk,bto->bko", p.astype(np.float64), d.astype(np.float64)), axis=(1, 2))
    summed = np.asarray(jax.jit(lambda a, b: jax.vmap(lambda u, v: jnp.einsum(
        "tk,to->ko", u, v, precision=jax.lax.Precision.HIGHEST))(a, b))(p, d), np.float64)
    assert np.all(bounds >= exact)
    assert np.all(bounds >= np.linalg.norm(summed, axis=(1, 2)))
    if not cancel:
        assert np.all(bounds <= exact * (1 + 1e-4))


def test_kept_gradients_of_nonfinite_or_overflowing_examples_add_nothing():
    # Kept per-example gradients (a Dense layer: T=1, not the ghost form) are summed without masking the
    # whole array again: an example whose squared norm is not finite must have its gradient zeroed while its
    # norm stays non-finite. Example 1's gradient is finite (about 1e20) but its squared norm overflows; example
    # 2 is NaN and padding; example 3 is NaN and live. Only example 0 may count, as under "vmap".
    model = nn.Dense(1)
    x = jnp.array([[0.5, -1.0, 2.0], [1e10, 1e10, 1e10], [jnp.nan, 0.0, 0.0], [0.0, jnp.nan, 1.0]])
    y = jnp.zeros((4, 1))
    mask = jnp.array([True, True, False, True])
    params = {"params": model.init(jax.random.key(0), x[:1])["params"]}

    def loss_fn(p, xb, yb):
        return jnp.mean(jnp.square(model.apply(p, xb) - yb)) / 2

    assert clipping.fast_path_report(loss_fn, params, x, y) == ["<root>: fast (dense)"]
    kept, sq = bookkeeping._stored_kernel_grads(x[:, None], x[:, None] * 1e10, Layer((), "dense", False), 2)
    assert np.isfinite(np.asarray(kept)).all() and not np.isfinite(np.asarray(sq)[1:]).any()
    np.testing.assert_array_equal(np.asarray(kept)[1:], 0.0)
    out = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0, strategy="bookkeeping"))(params, x, y, mask)
    ref = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0))(params, x, y, mask)
    only_first = jax.jit(jaxdp.clipped_grad(loss_fn, 1.0))(params, x, y, jnp.array([True, False, False, False]))
    for got in (out, ref):
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(got[0]))
        assert int(clipping.count_nonfinite(got[1], mask)) == 2
        for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(only_first[0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
