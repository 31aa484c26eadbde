"""Building the model a config asks for, and its initial variables (optionally from a torchvision checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.models import torchvision
from jaxdp.models.resnet import NORMS, ResNet

MODEL_NAMES = ("resnet18", "resnet")


def create_model(model_config: Any, *, private: bool) -> ResNet:
    """The Flax model described by ``config.model`` (see :func:`jaxdp.config.base_config`).

    ``name`` is ``"resnet18"`` or its synonym ``"resnet"``: the BasicBlock ResNet whose depth and width are
    ``stage_sizes`` and ``width`` (ResNet18 at the defaults; smaller members for CPU demos).

    Raises:
      ValueError: for ``norm="batch"`` when ``private`` -- BatchNorm on batch statistics voids DP (see the
        message); and for an unknown name or norm, or invalid sizes, naming the value and what is allowed.
    """
    name = str(model_config.name).lower()
    if name not in MODEL_NAMES:
        raise ValueError(f"config.model.name={model_config.name!r} is not a known model; choose one of {MODEL_NAMES}.")
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


def init_variables(
    model: ResNet,
    rng: jax.Array,
    *,
    pretrained_path: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
) -> dict[str, Any]:
    """Initial variables of ``model`` (``params``, plus ``batch_stats`` for ``norm="batch"``).

    Parameter shapes do not depend on the image size, so initialisation traces a 32x32 image. With
    ``pretrained_path`` (a torchvision resnet18 checkpoint, see :mod:`jaxdp.models.torchvision`) the
    parameters, and the running statistics of a BatchNorm model, come from the checkpoint; a head of a
    different class count is freshly initialised from ``rng``.

    Raises:
      ValueError: when the checkpoint does not fit the model (not a ResNet18 layout of this width, or
        ``norm="none"`` which has no place for the checkpoint's normalisation parameters).
    """
    init_rng, head_rng = jax.random.split(rng)
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
