"""Building the model a config asks for, and its initial variables (optionally from a torchvision checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.models import torchvision
from jaxdp.models.mlp import ACTIVATIONS, MLP
from jaxdp.models.resnet import NORMS, ResNet

MODEL_NAMES = ("resnet18", "resnet", "mlp")


def create_model(model_config: Any, *, private: bool) -> ResNet | MLP:
    """The Flax model described by ``config.model`` (see :func:`jaxdp.config.base_config`).

    ``name`` is ``"resnet18"`` or its synonym ``"resnet"``: the BasicBlock ResNet whose depth and width are
    ``stage_sizes`` and ``width`` (ResNet18 at the defaults; smaller members for CPU demos); or ``"mlp"``: the
    multilayer perceptron of :mod:`jaxdp.models.mlp` with ``hidden_sizes`` and ``activation`` (for feature
    vectors; ``norm`` does not apply to it: it has no normalisation layer).

    Raises:
      ValueError: for ``norm="batch"`` when ``private`` -- BatchNorm on batch statistics voids DP (see the
        message); and for an unknown name or norm, or invalid sizes, naming the value and what is allowed.
    """
    name = str(model_config.name).lower()
    if name not in MODEL_NAMES:
        raise ValueError(f"config.model.name={model_config.name!r} is not a known model; choose one of {MODEL_NAMES}.")
    if name == "mlp":
        return _mlp(model_config)
    norm = model_config.norm
    if norm not in NORMS:
        raise ValueError(f"config.model.norm={norm!r} is not supported; choose one of {NORMS}.")
    if private and norm == "batch":
        raise ValueError(
            "config.model.norm='batch' cannot be used with DP training (config.dp.enabled=True): BatchNorm on "
            "batch statistics makes each example's gradient depend on the other examples of the batch, so "
            "clipping per-example gradients no longer bounds one example's influence on the update and the DP "
            "guarantee is void. Set config.model.norm='group' (GroupNorm, per-example; the default) or 'none'."
        )
    stage_sizes = model_config.stage_sizes
    if isinstance(stage_sizes, (list, tuple)):
        stage_sizes = tuple(stage_sizes)
    return ResNet(
        num_classes=model_config.num_classes,
        stage_sizes=stage_sizes,
        width=model_config.width,
        norm=norm,
        num_groups=model_config.num_groups,
    )


def _mlp(model_config: Any) -> MLP:
    hidden = model_config.get("hidden_sizes", (256, 256))
    hidden = tuple(hidden) if isinstance(hidden, list | tuple) else hidden
    if not isinstance(hidden, tuple) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"config.model.hidden_sizes={model_config.get('hidden_sizes')!r} must be a tuple of layer "
                         "widths >= 1, e.g. (256, 256) (fair-dp's Adult network); () is a linear model.")
    activation = model_config.get("activation", "tanh")
    if activation not in ACTIVATIONS:
        raise ValueError(f"config.model.activation={activation!r}; choose one of {', '.join(map(repr, ACTIVATIONS))}.")
    if model_config.get("pretrained_path") is not None:
        raise ValueError("config.model.pretrained_path is a torchvision ResNet checkpoint; the MLP has none: set it "
                         "to None.")
    if model_config.get("norm") == "batch":
        raise ValueError("config.model.norm='batch' with config.model.name='mlp': the MLP has no normalisation "
                         "layer; leave config.model.norm at 'group' (the default; it applies to ResNets only).")
    if isinstance(model_config.num_classes, bool) or int(model_config.num_classes) < 2:
        raise ValueError(f"config.model.num_classes={model_config.num_classes!r} must be an integer >= 2.")
    return MLP(num_classes=int(model_config.num_classes), hidden_sizes=hidden, activation=activation)


def init_variables(
    model: ResNet | MLP,
    rng: jax.Array,
    *,
    pretrained_path: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Initial variables of ``model`` (``params``, plus ``batch_stats`` for ``norm="batch"``).

    ``input_shape`` is one example's shape (:func:`jaxdp.data.input_shape`), which an MLP's first layer depends
    on (required for it). A ResNet's parameter shapes do not depend on the image size, so its initialisation traces
    a 32x32 image (of ``input_shape``'s channels when given, else ``in_channels``). With
    ``pretrained_path`` (a torchvision resnet18 checkpoint, see :mod:`jaxdp.models.torchvision`) the
    parameters, and the running statistics of a BatchNorm model, come from the checkpoint; a head of a
    different class count is freshly initialised from ``rng``.

    Raises:
      ValueError: when the checkpoint does not fit the model (not a ResNet18 layout of this width, or
        ``norm="none"`` which has no place for the checkpoint's normalisation parameters).
    """
    init_rng, head_rng = jax.random.split(rng)
    if isinstance(model, MLP):
        if input_shape is None:
            raise ValueError("init_variables(MLP, ...) needs input_shape= (one example's shape, e.g. (99,) for "
                             "Adult: jaxdp.data.input_shape(config.data)).")
        return dict(jax.jit(model.init)(init_rng, jnp.zeros((1, *input_shape), jnp.float32)))
    if input_shape is not None:
        in_channels = int(input_shape[-1])
    dummy = jnp.zeros((1, 32, 32, in_channels), jnp.float32)
    if pretrained_path is None:
        return dict(jax.jit(model.init)(init_rng, dummy))
    if model.norm == "none":
        raise ValueError(
            "A torchvision checkpoint cannot initialise a model with norm='none': its normalisation parameters "
            "have no place there. Use norm='group' (or 'batch' for non-private training)."
        )
    # Only the shapes are needed to check the checkpoint: no random initialisation of 11M parameters.
    variables = dict(jax.eval_shape(model.init, init_rng, dummy))
    state_dict = torchvision.read_state_dict(pretrained_path)
    misfit = (
        f"The checkpoint {os.fspath(pretrained_path)!r} does not fit the model (stage_sizes="
        f"{tuple(model.stage_sizes)}, width={model.width}, {in_channels} input channels): a torchvision resnet18 "
        "needs config.model.stage_sizes=(2, 2, 2, 2) and config.model.width=64."
    )
    try:
        params = torchvision.convert_resnet_state_dict(
            state_dict, model.num_classes, stage_sizes=tuple(model.stage_sizes), rng=head_rng
        )
        stats = None
        if model.norm == "batch":
            stats = torchvision.convert_resnet_batch_stats(state_dict, stage_sizes=tuple(model.stage_sizes))
    except ValueError as error:
        raise ValueError(f"{misfit}\n{error}") from error
    if _shapes(params) != _shapes(variables["params"]):
        raise ValueError(misfit)
    variables["params"] = params
    if stats is not None:
        if _shapes(stats) != _shapes(variables["batch_stats"]):
            raise ValueError(misfit)
        variables["batch_stats"] = stats
    return variables


def _shapes(tree: Mapping[str, Any]) -> Any:
    return jax.tree.map(lambda x: tuple(np.shape(x)), dict(tree))


def random_params(model: Any, example_inputs: jax.Array, seed: int = 0) -> Any:
    """He-normal kernels, zero biases, unit scales, drawn with numpy from the model's parameter shapes.

    The speed of a step does not depend on the weights' values; ``model.init`` would compile a random-number
    graph per parameter (tens of seconds on a small CPU) before the benchmark even starts.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), example_inputs)["params"]

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if len(leaf.shape) < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) * np.sqrt(2.0 / fan_in))

    return jax.tree_util.tree_map_with_path(draw, shapes)
