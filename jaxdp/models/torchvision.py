"""Initialising our Flax ResNet from a torchvision ResNet18 checkpoint saved locally (no download).

The paper fine-tunes an ImageNet-pretrained torchvision ``resnet18``. This module maps a torchvision state dict
(names such as ``conv1.weight``, ``layer2.0.downsample.1.bias``, ``fc.weight``) onto the parameter tree of
:class:`jaxdp.models.ResNet`:

* convolution weights ``[out, in, kh, kw]`` (OIHW) become Flax kernels ``[kh, kw, in, out]`` (HWIO);
* normalisation ``weight``/``bias`` become ``scale``/``bias``. For a GroupNorm model this is where an
  ImageNet BatchNorm checkpoint's affine parameters go; its running statistics (``running_mean``,
  ``running_var``, ``num_batches_tracked``) are dropped, because GroupNorm has none. A BatchNorm network's
  affine parameters under GroupNorm do **not** compute the same function: this is a warm start, as in the
  DP literature that swaps BatchNorm for GroupNorm, not an equivalent model. A torchvision ResNet18 built with
  ``norm_layer=lambda c: torch.nn.GroupNorm(32, c)`` (e.g. trained with Opacus) converts exactly: the Flax
  model then computes the same logits up to float rounding (checked against torchvision 0.29.1 / torch 2.14.1
  with random weights: largest logit difference 2.0e-6 at 32x32 and 1.4e-6 at 128x128; BatchNorm in evaluation
  mode with :func:`convert_resnet_batch_stats`: 3.0e-7 and 9.8e-7).
  :func:`convert_resnet_batch_stats` returns the running statistics for a ``norm="batch"`` model;
* ``fc.weight`` ``[classes, features]`` becomes ``fc/kernel`` ``[features, classes]``. If the checkpoint's
  head has a different number of classes (1000 for ImageNet) the head is freshly initialised, as our model
  initialises it (kernel U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias 0), from ``rng``.

A checkpoint is read from ``.npz`` (works everywhere) or ``.pth``/``.pt`` (needs PyTorch). To make the ``.npz``
on a machine that has torchvision::

    import numpy as np, torchvision
    sd = torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()
    np.savez("resnet18.npz", **{k: v.numpy() for k, v in sd.items()})

or from a saved state dict: ``sd = torch.load('resnet18.pth', map_location='cpu')`` in place of the model call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.models.resnet import DENSE_KERNEL_INIT

logger = logging.getLogger(__name__)

RESNET18_STAGE_SIZES = (2, 2, 2, 2)
_NORM_OPTIONAL = ("running_mean", "running_var", "num_batches_tracked")
_NPZ_RECIPE = (
    "python -c \"import numpy as np, torch; sd = torch.load('CHECKPOINT.pth', map_location='cpu'); "
    "np.savez('CHECKPOINT.npz', **{k: v.numpy() for k, v in sd.items()})\""
)

# One entry per torchvision layer: (torch prefix, Flax path, kind, torch weight shape as a function of width).
_Layer = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def resnet_layers(
    width: int = 64, stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES, in_channels: int = 3
) -> list[_Layer]:
    """The layers of torchvision's BasicBlock ResNet: ``(torch_prefix, flax_path, kind, torch_weight_shape)``.

    ``kind`` is ``"conv"`` (``prefix.weight``, OIHW) or ``"norm"`` (``prefix.weight``/``prefix.bias``, plus
    optional running statistics). The head ``fc`` is not listed (its class count is free).
    """
    layers: list[_Layer] = [
        ("conv1", ("conv1",), "conv", (width, in_channels, 7, 7)),
        ("bn1", ("norm1",), "norm", (width,)),
    ]
    in_features = width
    for k, blocks in enumerate(stage_sizes):
        features = width * 2**k
        for j in range(blocks):
            torch_block, flax_block = f"layer{k + 1}.{j}", f"layer{k + 1}_{j}"
            layers += [
                (f"{torch_block}.conv1", (flax_block, "conv1"), "conv", (features, in_features, 3, 3)),
                (f"{torch_block}.bn1", (flax_block, "norm1"), "norm", (features,)),
                (f"{torch_block}.conv2", (flax_block, "conv2"), "conv", (features, features, 3, 3)),
                (f"{torch_block}.bn2", (flax_block, "norm2"), "norm", (features,)),
            ]
            if (k > 0 and j == 0) or in_features != features:
                layers += [
                    (
                        f"{torch_block}.downsample.0",
                        (flax_block, "downsample_conv"),
                        "conv",
                        (features, in_features, 1, 1),
                    ),
                    (f"{torch_block}.downsample.1", (flax_block, "downsample_norm"), "norm", (features,)),
                ]
            in_features = features
    return layers


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor (possibly requiring grad)
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # torch.nn.DataParallel / DistributedDataParallel save every name under "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _check_keys(state_dict: Mapping[str, Any], width: int, stage_sizes: Sequence[int]) -> None:
    """Raises one ValueError listing every missing, unexpected and mis-shaped entry."""
    in_channels = _to_numpy(state_dict["conv1.weight"]).shape[1] if "conv1.weight" in state_dict else 3
    expected: dict[str, tuple[int, ...] | None] = {}  # None: any shape (optional statistics counter)
    optional: set[str] = set()
    for prefix, _, kind, shape in resnet_layers(width, stage_sizes, in_channels):
        if kind == "conv":
            expected[f"{prefix}.weight"] = shape
        else:
            expected[f"{prefix}.weight"] = shape
            expected[f"{prefix}.bias"] = shape
            for stat in _NORM_OPTIONAL:
                expected[f"{prefix}.{stat}"] = None if stat == "num_batches_tracked" else shape
                optional.add(f"{prefix}.{stat}")
    final_features = width * 2 ** (len(stage_sizes) - 1)
    missing = [k for k in expected if k not in optional and k not in state_dict]
    missing += [k for k in ("fc.weight", "fc.bias") if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in ("fc.weight", "fc.bias")]
    misshaped = []
    for key, shape in expected.items():
        if key in state_dict and shape is not None and _to_numpy(state_dict[key]).shape != shape:
            misshaped.append(f"{key}: {_to_numpy(state_dict[key]).shape}, expected {shape}")
    if "fc.weight" in state_dict:
        fc_shape = _to_numpy(state_dict["fc.weight"]).shape
        if len(fc_shape) != 2 or fc_shape[1] != final_features:
            misshaped.append(f"fc.weight: {fc_shape}, expected (num_classes, {final_features})")
        elif "fc.bias" in state_dict and _to_numpy(state_dict["fc.bias"]).shape != (fc_shape[0],):
            misshaped.append(f"fc.bias: {_to_numpy(state_dict['fc.bias']).shape}, expected ({fc_shape[0]},)")
    if missing or unexpected or misshaped:

        def listing(title: str, items: list[str]) -> str:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            return f"\n  {title} ({len(items)}): {shown}" if items else ""

        raise ValueError(
            f"The state dict is not a torchvision BasicBlock ResNet with stage_sizes={tuple(stage_sizes)} and "
            f"width={width} (inferred from conv1.weight):"
            + listing("missing", missing)
            + listing("unexpected", unexpected)
            + listing("mis-shaped", misshaped)
            + "\nPass a torchvision resnet18 state dict (torchvision.models.resnet18().state_dict()), "
            "saved as described in jaxdp/models/torchvision.py."
        )


def convert_resnet_state_dict(
    state_dict: Mapping[str, Any],
    num_classes: int = 2,
    *,
    stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES,
    rng: jax.Array | None = None,
) -> dict[str, Any]:
    """Converts a torchvision BasicBlock ResNet state dict to the ``params`` of :class:`jaxdp.models.ResNet`.

    Args:
      state_dict: torchvision names to arrays (numpy, jax or torch tensors); a ``module.`` prefix on every
        name (DataParallel) is removed. The width is read from ``conv1.weight``.
      num_classes: classes of the model's head. If ``fc.weight`` has this many rows it is kept (transposed);
        otherwise the head is freshly initialised from ``rng``.
      stage_sizes: BasicBlocks per stage, (2, 2, 2, 2) for resnet18, (3, 4, 6, 3) for resnet34.
      rng: key for a fresh head; ``None`` means ``jax.random.key(0)`` (deterministic).

    Returns:
      The ``params`` collection (nested dict of float32 jax arrays): use ``{"params": params}`` as the
      variables of a ``norm="group"`` model (add :func:`convert_resnet_batch_stats` for ``norm="batch"``).

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped entry. Running statistics are optional
        (a GroupNorm checkpoint has none) and dropped.
    """
    state_dict = _strip_module_prefix(state_dict)
    if "conv1.weight" not in state_dict:
        raise ValueError(
            "The state dict has no 'conv1.weight', so it is not a torchvision ResNet state dict; its first names "
            f"are {sorted(state_dict)[:5]}. Pass torchvision.models.resnet18().state_dict() (saved as .npz)."
        )
    width = int(_to_numpy(state_dict["conv1.weight"]).shape[0])
    _check_keys(state_dict, width, stage_sizes)

    params: dict[str, Any] = {}

    def put(path: tuple[str, ...], leaf: str, value: np.ndarray) -> None:
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value, dtype=jnp.float32)

    for prefix, path, kind, _ in resnet_layers(width, stage_sizes, _to_numpy(state_dict["conv1.weight"]).shape[1]):
        if kind == "conv":
            put(path, "kernel", np.transpose(_to_numpy(state_dict[f"{prefix}.weight"]), (2, 3, 1, 0)))
        else:
            put(path, "scale", _to_numpy(state_dict[f"{prefix}.weight"]))
            put(path, "bias", _to_numpy(state_dict[f"{prefix}.bias"]))

    fc_weight = _to_numpy(state_dict["fc.weight"])
    if fc_weight.shape[0] == num_classes:
        put(("fc",), "kernel", fc_weight.T)
        put(("fc",), "bias", _to_numpy(state_dict["fc.bias"]))
    else:
        logger.info(
            "Checkpoint head has %d classes, the model %d: initialising a fresh head.", fc_weight.shape[0], num_classes
        )
        rng = jax.random.key(0) if rng is None else rng
        put(("fc",), "kernel", DENSE_KERNEL_INIT(rng, (fc_weight.shape[1], num_classes), jnp.float32))
        put(("fc",), "bias", np.zeros((num_classes,), np.float32))
    return params


def convert_resnet18_state_dict(
    state_dict: Mapping[str, Any], num_classes: int = 2, *, rng: jax.Array | None = None
) -> dict[str, Any]:
    """Converts a torchvision ``resnet18`` state dict to our ResNet18's ``params``; see
    :func:`convert_resnet_state_dict` (OIHW -> HWIO, BatchNorm weight/bias -> GroupNorm scale/bias with the
    running statistics dropped, ``fc`` kept if it has ``num_classes`` rows else freshly initialised).

    Example::

        params = convert_resnet18_state_dict(dict(np.load("resnet18.npz")), num_classes=2)
        logits = jaxdp.models.ResNet18(num_classes=2).apply({"params": params}, images)
    """
    return convert_resnet_state_dict(state_dict, num_classes, stage_sizes=RESNET18_STAGE_SIZES, rng=rng)


def convert_resnet_batch_stats(
    state_dict: Mapping[str, Any], *, stage_sizes: Sequence[int] = RESNET18_STAGE_SIZES
) -> dict[str, Any]:
    """The ``batch_stats`` collection (``mean``/``var`` per norm layer) for a ``norm="batch"`` model.

    torchvision's ``running_var`` is the unbiased batch variance and Flax's BatchNorm uses its ``var`` the same
    way in evaluation, so the two networks agree in ``train=False`` mode.
    """
    state_dict = _strip_module_prefix(state_dict)
    width = int(_to_numpy(state_dict["conv1.weight"]).shape[0]) if "conv1.weight" in state_dict else 64
    _check_keys(state_dict, width, stage_sizes)
    stats: dict[str, Any] = {}
    for prefix, path, kind, _ in resnet_layers(width, stage_sizes, _to_numpy(state_dict["conv1.weight"]).shape[1]):
        if kind != "norm":
            continue
        if f"{prefix}.running_mean" not in state_dict or f"{prefix}.running_var" not in state_dict:
            raise ValueError(
                f"The checkpoint has no running statistics for {prefix} (a GroupNorm checkpoint?), so it cannot "
                "initialise a norm='batch' model; use norm='group'."
            )
        node = stats
        for name in path:
            node = node.setdefault(name, {})
        node["mean"] = jnp.asarray(_to_numpy(state_dict[f"{prefix}.running_mean"]), jnp.float32)
        node["var"] = jnp.asarray(_to_numpy(state_dict[f"{prefix}.running_var"]), jnp.float32)
    return stats


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a torchvision state dict from ``.npz`` (no torch needed) or ``.pth``/``.pt`` (needs torch).

    A ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` (common training checkpoints) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No checkpoint at {path!r}. Save a torchvision ResNet18 state dict there (see "
            "jaxdp/models/torchvision.py for the one-line .npz recipe), or unset model.pretrained_path."
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    if suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"Reading {path!r} needs PyTorch, which is not installed here. Convert it to .npz on a machine "
                f"that has torch, then point model.pretrained_path at the .npz:\n  {_NPZ_RECIPE}"
            ) from error
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path!r} holds a {type(loaded).__name__}, not a state dict (a mapping of names).")
        return {name: _to_numpy(value) for name, value in loaded.items()}
    raise ValueError(f"Checkpoint {path!r} has suffix {suffix!r}; expected .npz, or .pth/.pt with torch installed.")


def load_torchvision_checkpoint(
    path: str | os.PathLike[str], num_classes: int = 2, *, rng: jax.Array | None = None
) -> dict[str, Any]:
    """Reads a torchvision ResNet18 checkpoint (``.npz``, or ``.pth``/``.pt`` with torch) and converts it to
    our ResNet18's ``params`` (see :func:`convert_resnet18_state_dict`)."""
    return convert_resnet18_state_dict(read_state_dict(path), num_classes, rng=rng)
