"""Tests of jaxdp.models: the ResNet18 layout and size, norms, the config factory, torchvision conversion."""

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.config import base_config
from jaxdp.models import (
    MLP,
    ResNet,
    ResNet18,
    convert_resnet18_state_dict,
    create_model,
    init_variables,
    load_torchvision_checkpoint,
    random_params,
)
from jaxdp.models import torchvision as tv
from jaxdp.models.pooling import max_pool
from jaxdp.models.resnet import group_count

TINY = dict(stage_sizes=(1, 1, 1, 1), width=8, num_groups=4)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def param_shapes(model, size=32):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


# --- layout and size ------------------------------------------------------------------------------------------


def test_resnet18_parameter_count_matches_torchvision_with_2_way_head():
    # torchvision resnet18: 11,689,512 parameters with the 1000-way head (512*1000 + 1000 = 513,000 of them);
    # with a 2-way head (512*2 + 2 = 1,026): 11,689,512 - 513,000 + 1,026 = 11,177,538.
    shapes = param_shapes(ResNet18(num_classes=2))
    assert n_params(shapes["params"]) == 11_177_538
    assert shapes["params"]["fc"]["kernel"].shape == (512, 2)
    assert shapes["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
    # Stride-2 projection shortcut in the first block of stages 2-4 only.
    assert shapes["params"]["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert "downsample_conv" not in shapes["params"]["layer1_0"]
    assert "downsample_conv" not in shapes["params"]["layer4_1"]
    blocks = sorted(k for k in shapes["params"] if k.startswith("layer"))
    assert blocks == ["layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1", "layer4_0", "layer4_1"]


def test_batchnorm_variant_has_same_params_plus_batch_stats_and_none_variant_has_conv_biases():
    batch = param_shapes(ResNet18(norm="batch"))
    assert n_params(batch["params"]) == 11_177_538
    assert n_params(batch["batch_stats"]) == 2 * 4800  # mean and var of the 4,800 normalised channels
    # norm="none": 20 convs get biases (64*5 + 128*5 + 256*5 + 512*5 = 4,800) and the 4,800 scale/bias pairs go.
    none = param_shapes(ResNet18(norm="none"))
    assert n_params(none["params"]) == 11_177_538 - 2 * 4800 + 4800


@pytest.fixture(scope="module")
def tiny_group_variables():
    # Initialised once, through init_variables. The "rbg" key compiles its samplers several times faster than the
    # default threefry (measured: 6 vs 28 CPU s for this model on the 2-core machine); the values do not matter.
    # Parameter shapes do not depend on the image size or the compute dtype, so every test below shares these.
    variables = init_variables(ResNet(**TINY), jax.random.key(0, impl="rbg"))
    assert set(variables) == {"params"}
    return variables


def batch_variables(group_variables):
    """Variables of the norm="batch" twin: same params, fresh running statistics (mean 0, var 1)."""
    stats = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(group_variables["params"])[0]:
        keys = [p.key for p in path]
        if keys[-1] == "scale":
            node = stats
            for k in keys[:-2]:
                node = node.setdefault(k, {})
            node[keys[-2]] = {"mean": jnp.zeros_like(leaf), "var": jnp.ones_like(leaf)}
    return {"params": group_variables["params"], "batch_stats": stats}


def test_batch_variables_helper_matches_real_init_structure(tiny_group_variables):
    real = jax.eval_shape(ResNet(norm="batch", **TINY).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    ours = batch_variables(tiny_group_variables)
    assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, real)


@pytest.mark.parametrize("size", [32, 47, 224])
def test_forward_any_input_size(size, tiny_group_variables):
    model = ResNet(**TINY)
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    logits = jax.jit(model.apply)(tiny_group_variables, images)
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_keeps_float32_logits(tiny_group_variables):
    model = ResNet(dtype=jnp.bfloat16, **TINY)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits = jax.jit(model.apply)(tiny_group_variables, images)
    assert logits.dtype == jnp.float32
    reference = jax.jit(ResNet(**TINY).apply)(tiny_group_variables, images)
    np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0))),
                                      ((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 2), (2, 1), ((1, 0), (0, 1)))])
def test_max_pool_has_the_values_and_gradient_of_flax_max_pool_ties_included(geometry):
    # The model's max pool (strided slices; the gradient to the first maximum of each window) must be bitwise
    # nn.max_pool (reduce_window), forward and backward: on continuous inputs, after a ReLU (windows of tied
    # zeros), on constant inputs (every window tied), in bfloat16, and per example under vmap as the DP
    # strategies run it.
    import flax.linen as nn

    window, strides, padding = geometry
    ref = lambda a: nn.max_pool(a, window, strides=strides, padding=padding)
    ours = lambda a: max_pool(a, window, strides, padding)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 9, 8, 4)).astype(np.float32))
    for a in (x, jnp.maximum(x, 0), jnp.ones_like(x), jnp.round(x), x.astype(jnp.bfloat16)):
        np.testing.assert_array_equal(jax.jit(ours)(a), ref(a))
        weights = jnp.asarray(rng.standard_normal(ref(a).shape)).astype(a.dtype)
        grad = lambda f, w=weights: jax.grad(lambda b: jnp.sum((f(b) * w).astype(jnp.float32)))
        np.testing.assert_array_equal(jax.jit(grad(ours))(a), grad(ref)(a))
        per_example = lambda f: jax.vmap(
            lambda b, w: jax.grad(lambda c: jnp.sum((f(c[None])[0] * w).astype(jnp.float32)))(b))
        np.testing.assert_array_equal(jax.jit(per_example(ours))(a, weights), per_example(ref)(a, weights))
    assert int(jnp.sum(jax.grad(lambda b: jnp.sum(ours(b)))(jnp.ones_like(x)) != 0)) > 0
    with pytest.raises(ValueError, match=r"float\[N, H, W, C\]"):
        max_pool(x[0], window, strides, padding)


def test_group_count_rule_and_invalid_widths():
    assert group_count(64, 32) == 32
    assert group_count(16, 32) == 16  # narrow layers: one channel per group
    ResNet(stage_sizes=(1, 1, 1, 1), width=16)  # 16, 32, 64, 128 channels: 16, 32, 32, 32 groups
    with pytest.raises(ValueError, match=r"width=24 gives stage channels \[24, 48, 96, 192\], of which \[48\]"):
        ResNet(width=24)  # min(32, 48) = 32 does not divide 48
    with pytest.raises(ValueError, match="stage_sizes"):
        ResNet(stage_sizes=())
    with pytest.raises(ValueError, match="width must be a positive integer"):
        ResNet(width=0)
    with pytest.raises(ValueError, match=r"norm='layer' .*'group'"):
        ResNet(norm="layer")


def test_images_without_batch_axis_are_refused():
    model = ResNet(**TINY)
    with pytest.raises(ValueError, match="NHWC"):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_groupnorm_keeps_examples_independent_and_batchnorm_does_not(tiny_group_variables):
    # The DP argument: with GroupNorm, example 0's output (hence gradient) does not depend on example 1.
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    changed = images.at[1].multiply(5.0)
    group = jax.jit(ResNet(**TINY).apply)
    np.testing.assert_allclose(
        group(tiny_group_variables, images)[0], group(tiny_group_variables, changed)[0], rtol=1e-6, atol=1e-6
    )
    batch = jax.jit(partial(ResNet(norm="batch", **TINY).apply, train=True, mutable=["batch_stats"]))
    vb = batch_variables(tiny_group_variables)
    out, _ = batch(vb, images)
    out_changed, _ = batch(vb, changed)
    assert float(jnp.max(jnp.abs(out[0] - out_changed[0]))) > 1e-3


def test_batchnorm_train_updates_running_stats_with_torch_momentum(tiny_group_variables):
    model = ResNet(norm="batch", **TINY)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) + 3.0
    variables = batch_variables(tiny_group_variables)
    _, state = jax.jit(
        partial(model.apply, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True)
    )(variables, images)
    stem = state["intermediates"]["conv1"]["__call__"][0]  # the stem convolution's output, input of norm1
    # One step from (mean 0, var 1): 0.9 * old + 0.1 * batch statistic, i.e. torch's momentum 0.1
    # (Flax updates with the biased batch variance, torch with the unbiased one: a factor n/(n-1) = 1024/1023 here).
    np.testing.assert_allclose(
        state["batch_stats"]["norm1"]["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        state["batch_stats"]["norm1"]["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # Evaluation mode leaves the statistics alone.
    _, unchanged = jax.jit(partial(model.apply, train=False, mutable=["batch_stats"]))(variables, images)
    np.testing.assert_array_equal(unchanged["batch_stats"]["norm1"]["mean"], np.zeros(8))


# --- the config factory ---------------------------------------------------------------------------------------


def test_create_model_from_base_config_is_resnet18_groupnorm():
    model = create_model(base_config().model, private=True)
    assert isinstance(model, ResNet)
    assert (model.stage_sizes, model.width, model.norm, model.num_groups, model.num_classes) == (
        (2, 2, 2, 2),
        64,
        "group",
        32,
        2,
    )


def test_create_model_refuses_batchnorm_under_dp_and_allows_it_without():
    config = base_config().model
    config.norm = "batch"
    with pytest.raises(ValueError, match=r"(?s)depend on the other examples.*DP.*guarantee is void.*norm='group'"):
        create_model(config, private=True)
    assert create_model(config, private=False).norm == "batch"


def test_create_model_names_unknown_values():
    config = base_config().model
    config.name = "vgg16"
    with pytest.raises(ValueError, match=r"'vgg16'.*resnet18"):
        create_model(config, private=True)
    config = base_config().model
    config.norm = "instance"
    with pytest.raises(ValueError, match=r"'instance'.*'group', 'batch', 'none'"):
        create_model(config, private=False)
    config = base_config().model
    config.stage_sizes = (1, 1, 1, 1)
    config.width = 16
    small = create_model(config, private=True)
    assert n_params(param_shapes(small)["params"]) < 1_000_000


# --- the MLP --------------------------------------------------------------------------------------------------


def mlp_config(**kwargs):
    config = base_config().model
    config.name = "mlp"
    for key, value in kwargs.items():
        config[key] = value
    return config


def test_mlp_has_fairdps_layout_and_size():
    model = create_model(mlp_config(), private=True)
    assert isinstance(model, MLP) and (model.hidden_sizes, model.activation, model.num_classes) == ((256, 256),
                                                                                                   "tanh", 2)
    # 99 inputs (jaxdp's Adult features): 99*256 + 256 + 256*256 + 256 + 256*2 + 2 = 91,906. fair-dp's 98 inputs
    # give its 91,650 (256 fewer).
    for inputs, count in ((99, 91_906), (98, 91_650)):
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, inputs)))["params"]
        assert n_params(params) == count
    assert [params[f"dense{i}"]["kernel"].shape for i in range(3)] == [(98, 256), (256, 256), (256, 2)]


def test_mlp_initialisation_is_pytorchs_linear_default():
    params = init_variables(create_model(mlp_config(), private=True), jax.random.key(1), input_shape=(99,))["params"]
    for name, fan_in in (("dense0", 99), ("dense1", 256), ("dense2", 256)):
        bound = 1 / np.sqrt(fan_in)  # nn.Linear: kernel and bias uniform in +-1/sqrt(fan_in)
        for leaf in (params[name]["kernel"], params[name]["bias"]):
            leaf = np.asarray(leaf)
            assert np.abs(leaf).max() <= bound
            if leaf.size >= 256:  # enough draws to reach the ends and centre on 0
                assert np.abs(leaf).max() > 0.95 * bound and abs(leaf.mean()) < 0.1 * bound


def test_mlp_activation_and_depth_follow_the_config():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    linear = create_model(mlp_config(hidden_sizes=(), activation="relu"), private=True)
    p = random_params(linear, x)  # numpy draws: no random-number program to compile
    np.testing.assert_allclose(linear.apply({"params": p}, x), x @ p["dense0"]["kernel"] + p["dense0"]["bias"],
                               rtol=1e-5, atol=1e-6)
    relu = create_model(mlp_config(hidden_sizes=(5,), activation="relu"), private=True)
    p = random_params(relu, x)
    hidden = np.maximum(0, x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
    np.testing.assert_allclose(relu.apply({"params": p}, x), hidden @ p["dense1"]["kernel"] + p["dense1"]["bias"],
                               rtol=1e-5, atol=1e-6)
    images = jnp.zeros((2, 4, 4, 3))  # any example shape is flattened
    shapes = jax.eval_shape(create_model(mlp_config(hidden_sizes=(3,)), private=True).init, jax.random.key(0), images)
    assert shapes["params"]["dense0"]["kernel"].shape == (48, 3)


@pytest.mark.parametrize("setting, message", [
    ({"hidden_sizes": (256, 0)}, r"hidden_sizes=\(256, 0\) must be a tuple of layer widths >= 1"),
    ({"activation": "swish"}, r"activation='swish'; choose one of 'tanh', 'relu'"),
    ({"norm": "batch"}, "the MLP has no normalisation layer"),
    ({"num_classes": 1}, "num_classes=1 must be an integer >= 2"),
])
def test_mlp_settings_out_of_range_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        create_model(mlp_config(**setting), private=False)


def test_mlp_needs_the_input_shape_to_initialise():
    with pytest.raises(ValueError, match=r"needs input_shape= .*jaxdp.data.input_shape"):
        init_variables(create_model(mlp_config(), private=True), jax.random.key(0))


# --- torchvision conversion -----------------------------------------------------------------------------------

# torchvision resnet18's convolutions (out, in, kh, kw), written out by hand from torchvision/models/resnet.py.
TORCHVISION_RESNET18_CONVS = {
    "conv1": (64, 3, 7, 7),
    "layer1.0.conv1": (64, 64, 3, 3),
    "layer1.0.conv2": (64, 64, 3, 3),
    "layer1.1.conv1": (64, 64, 3, 3),
    "layer1.1.conv2": (64, 64, 3, 3),
    "layer2.0.conv1": (128, 64, 3, 3),
    "layer2.0.conv2": (128, 128, 3, 3),
    "layer2.0.downsample.0": (128, 64, 1, 1),
    "layer2.1.conv1": (128, 128, 3, 3),
    "layer2.1.conv2": (128, 128, 3, 3),
    "layer3.0.conv1": (256, 128, 3, 3),
    "layer3.0.conv2": (256, 256, 3, 3),
    "layer3.0.downsample.0": (256, 128, 1, 1),
    "layer3.1.conv1": (256, 256, 3, 3),
    "layer3.1.conv2": (256, 256, 3, 3),
    "layer4.0.conv1": (512, 256, 3, 3),
    "layer4.0.conv2": (512, 512, 3, 3),
    "layer4.0.downsample.0": (512, 256, 1, 1),
    "layer4.1.conv1": (512, 512, 3, 3),
    "layer4.1.conv2": (512, 512, 3, 3),
}
# Each conv is followed by a norm of its output channels: conv1->bn1, convK->bnK, downsample.0->downsample.1.
TORCHVISION_RESNET18_NORMS = {
    name.replace("conv", "bn").replace("downsample.0", "downsample.1"): shape[0]
    for name, shape in TORCHVISION_RESNET18_CONVS.items()
}


def torchvision_state_dict(num_classes=1000, seed=0, running_stats=True) -> dict:
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in TORCHVISION_RESNET18_CONVS.items():
        sd[f"{name}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))).astype(
            np.float32
        )
    for name, channels in TORCHVISION_RESNET18_NORMS.items():
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
        if running_stats:
            sd[f"{name}.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
            sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
            sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)
    sd["fc.weight"] = rng.normal(0, 0.05, (num_classes, 512)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.05, num_classes).astype(np.float32)
    return sd


def test_generated_state_dict_has_torchvision_key_count():
    # 20 convs + 20 BatchNorms x 5 entries + fc weight/bias = 122 keys, as torchvision.models.resnet18().state_dict()
    assert len(torchvision_state_dict()) == 122
    assert len(tv.resnet_layers()) == 40


def test_conversion_puts_each_tensor_in_its_leaf_with_the_right_transpose():
    sd = torchvision_state_dict(num_classes=2)
    params = convert_resnet18_state_dict(sd, num_classes=2)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, param_shapes(ResNet18())["params"])
    w = sd["layer3.0.downsample.0.weight"]  # OIHW (256, 128, 1, 1)
    k = np.asarray(params["layer3_0"]["downsample_conv"]["kernel"])  # HWIO (1, 1, 128, 256)
    assert k[0, 0, 5, 200] == w[200, 5, 0, 0]
    w = sd["conv1.weight"]  # (64, 3, 7, 7)
    k = np.asarray(params["conv1"]["kernel"])  # (7, 7, 3, 64)
    assert k[1, 6, 2, 10] == w[10, 2, 1, 6]  # row 1, column 6 of input channel 2 into output 10
    np.testing.assert_array_equal(params["layer4_1"]["norm2"]["scale"], sd["layer4.1.bn2.weight"])
    np.testing.assert_array_equal(params["layer2_0"]["downsample_norm"]["bias"], sd["layer2.0.downsample.1.bias"])
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(params["fc"]["bias"], sd["fc.bias"])


def test_imagenet_head_is_replaced_by_a_fresh_one():
    sd = torchvision_state_dict(num_classes=1000)
    a = convert_resnet18_state_dict(sd, num_classes=2, rng=jax.random.key(3))
    b = convert_resnet18_state_dict(sd, num_classes=2, rng=jax.random.key(3))
    assert a["fc"]["kernel"].shape == (512, 2)
    np.testing.assert_array_equal(a["fc"]["bias"], np.zeros(2))
    np.testing.assert_array_equal(a["fc"]["kernel"], b["fc"]["kernel"])
    # U(-1/sqrt(512), 1/sqrt(512)) = U(-0.0442, 0.0442), as torch.nn.Linear.
    assert float(jnp.max(jnp.abs(a["fc"]["kernel"]))) <= 1 / np.sqrt(512)


def test_bad_state_dicts_are_refused_with_every_problem_listed():
    sd = torchvision_state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["layer5.0.conv1.weight"] = np.zeros((1,))
    sd["layer2.0.bn1.weight"] = np.zeros((64,), np.float32)
    with pytest.raises(ValueError) as error:
        convert_resnet18_state_dict(sd)
    message = str(error.value)
    assert "missing (1): layer1.0.conv1.weight" in message
    assert "unexpected (1): layer5.0.conv1.weight" in message
    assert "layer2.0.bn1.weight: (64,), expected (128,)" in message
    with pytest.raises(ValueError, match="no 'conv1.weight'"):
        convert_resnet18_state_dict({"features.0.weight": np.zeros(3)})


def test_data_parallel_prefix_and_groupnorm_checkpoints_without_running_stats_convert():
    sd = torchvision_state_dict(num_classes=2, running_stats=False)
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    params = convert_resnet18_state_dict(wrapped, num_classes=2)
    np.testing.assert_array_equal(params["norm1"]["scale"], sd["bn1.weight"])


def _torch_semantics_forward(sd: dict, images_nchw: jax.Array, num_groups: int = 32) -> jax.Array:
    """ResNet18 with GroupNorm written directly in torch's conventions (NCHW, OIHW, explicit padding)."""

    def conv(x, name, stride, padding):
        return jax.lax.conv_general_dilated(
            x, jnp.asarray(sd[f"{name}.weight"]), (stride, stride), [(padding, padding)] * 2,
            dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip

    def group_norm(x, name):
        n, c, h, w = x.shape
        g = x.reshape(n, num_groups, c // num_groups, h, w)
        g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / jnp.sqrt(g.var(axis=(2, 3, 4), keepdims=True) + 1e-5)
        return g.reshape(n, c, h, w) * sd[f"{name}.weight"][:, None, None] + sd[f"{name}.bias"][:, None, None]

    x = jax.nn.relu(group_norm(conv(jnp.asarray(images_nchw), "conv1", 2, 3), "bn1"))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)])
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            y = jax.nn.relu(group_norm(conv(x, f"{p}.conv1", stride, 1), f"{p}.bn1"))
            y = group_norm(conv(y, f"{p}.conv2", 1, 1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = group_norm(conv(x, f"{p}.downsample.0", stride, 0), f"{p}.downsample.1")
            x = jax.nn.relu(y + x)
    return x.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


def test_converted_resnet18_computes_the_torch_layout_forward():
    # The one full ResNet18 forward of this file (32x32, run op by op): our Flax model with converted weights
    # against an independent torch-convention implementation; catches transposes, padding and shortcut errors.
    sd = torchvision_state_dict(num_classes=2, seed=1)
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    params = convert_resnet18_state_dict(sd, num_classes=2)
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(ResNet18().apply)({"params": params}, jnp.transpose(images, (0, 2, 3, 1)))
        reference = jax.jit(_torch_semantics_forward)(sd, images)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-4, atol=1e-4)


def test_matches_real_torchvision_when_installed():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2, norm_layer=lambda c: torch.nn.GroupNorm(32, c)).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.GroupNorm):  # non-trivial affine parameters
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(images).numpy()
    params = convert_resnet18_state_dict(net.state_dict(), num_classes=2)
    with jax.default_matmul_precision("highest"):
        ours = ResNet18().apply({"params": params}, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-4)
    # BatchNorm in evaluation mode with the running statistics.
    bn_net = torchvision.models.resnet18(num_classes=2).eval()
    with torch.no_grad():
        for module in bn_net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        expected = bn_net(images).numpy()
    state_dict = bn_net.state_dict()
    variables = {
        "params": convert_resnet18_state_dict(state_dict, num_classes=2),
        "batch_stats": tv.convert_resnet_batch_stats(state_dict),
    }
    with jax.default_matmul_precision("highest"):
        ours = ResNet18(norm="batch").apply(variables, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-4)


def test_load_npz_checkpoint_and_init_variables(tmp_path):
    sd = torchvision_state_dict(num_classes=1000)
    path = tmp_path / "resnet18.npz"
    np.savez(path, **sd)
    params = load_torchvision_checkpoint(path, num_classes=2)
    np.testing.assert_array_equal(
        params["layer1_1"]["conv2"]["kernel"], np.transpose(sd["layer1.1.conv2.weight"], (2, 3, 1, 0))
    )
    variables = init_variables(ResNet18(norm="batch"), jax.random.key(0), pretrained_path=path)
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer4_0"]["downsample_norm"]["var"], sd["layer4.0.downsample.1.running_var"]
    )
    np.testing.assert_array_equal(variables["params"]["norm1"]["bias"], sd["bn1.bias"])
    with pytest.raises(ValueError, match=r"width=8.*stage_sizes=\(2, 2, 2, 2\)"):
        init_variables(ResNet(**TINY), jax.random.key(0), pretrained_path=path)


def test_checkpoint_file_errors_tell_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="No checkpoint at .*pretrained_path"):
        load_torchvision_checkpoint(tmp_path / "absent.npz")
    pth = tmp_path / "resnet18.pth"
    pth.write_bytes(b"not really a torch file")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without PyTorch
    with pytest.raises(ImportError, match=r"(?s)needs PyTorch.*np\.savez"):
        load_torchvision_checkpoint(pth)
    other = tmp_path / "resnet18.ckpt"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_torchvision_checkpoint(other)


def test_load_pth_checkpoint_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torchvision_state_dict(num_classes=2)
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save(tensors, tmp_path / "plain.pth")
    torch.save({"epoch": 3, "state_dict": tensors}, tmp_path / "wrapped.pt")  # a training checkpoint
    for name in ("plain.pth", "wrapped.pt"):
        params = load_torchvision_checkpoint(tmp_path / name, num_classes=2)
        np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
