"""ResNet with BasicBlocks (ResNet18 and its smaller or deeper siblings) in Flax, GroupNorm by default.

The layout is torchvision's ``resnet18`` exactly, so that a torchvision checkpoint converts layer for layer
(:mod:`jaxdp.models.torchvision`): a 7x7 stride-2 convolution with padding 3, a 3x3 stride-2 max-pool with
padding 1, stages of two BasicBlocks with ``width * 2**k`` channels whose first block (from the second stage on)
has stride 2 and a 1x1 stride-2 projection shortcut, a global average pool and a dense head. Convolutions have
explicit symmetric padding (torch's), not ``"SAME"``: for stride 2 on an even-sized map ``"SAME"`` pads only on
the bottom/right and would shift every feature map by one pixel relative to the torchvision weights.

Normalisation (``norm``):

* ``"group"`` (default) -- GroupNorm, epsilon 1e-5 as ``torch.nn.GroupNorm``. It normalises each example on its
  own, so an example's gradient depends on that example only and per-example clipping bounds its influence:
  the setting DP-SGD needs. A layer with ``C`` channels has ``min(num_groups, C)`` groups, and ``C`` must be a
  multiple of that number (for widths that are powers of two this always holds; otherwise the model refuses
  to be built and says which width to choose).
* ``"batch"`` -- BatchNorm on batch statistics in training (``train=True``, with ``mutable=["batch_stats"]``)
  and running averages in evaluation, torchvision's momentum 0.1 and epsilon 1e-5 (the running variance is
  updated with the biased batch variance, torch's with the unbiased one: a factor n/(n-1)). Every example's gradient
  then depends on the rest of the batch, so per-example clipping no longer bounds one example's influence:
  :func:`jaxdp.models.create_model` refuses it for private training. For non-private baselines only.
* ``"none"`` -- no normalisation; the convolutions then get a bias.

Parameter names follow torchvision's so the correspondence is visible: ``conv1``, ``norm1`` (torchvision's
``bn1``), ``layer{k}_{j}`` (``layer{k}.{j}``) with ``conv1, norm1, conv2, norm2`` and, in projection blocks,
``downsample_conv, downsample_norm`` (``downsample.0, downsample.1``), and ``fc``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdp.models.pooling import max_pool

NORMS = ("group", "batch", "none")

# torchvision's initialisation: Kaiming-normal (fan_out, ReLU gain) for convolutions; for the head,
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the kernel as torch.nn.Linear (we start its bias at zero).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
NORM_EPSILON = 1e-5  # torch.nn.GroupNorm and BatchNorm2d default


def group_count(channels: int, num_groups: int) -> int:
    """Number of GroupNorm groups used on a layer of ``channels`` channels: ``min(num_groups, channels)``."""
    return min(num_groups, channels)


def _validate(stage_sizes: Sequence[int], width: int, norm: str, num_groups: int, num_classes: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS} ('group' for DP training).")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer (2 for smiling / not smiling), got {num_classes!r}.")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer (64 for ResNet18, e.g. 16 for a CPU demo), got {width!r}.")
    if (
        isinstance(stage_sizes, str)
        or not isinstance(stage_sizes, Sequence)
        or len(stage_sizes) == 0
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stage_sizes)
    ):
        raise ValueError(
            "stage_sizes must be a non-empty sequence of positive integers, the number of BasicBlocks per stage "
            f"((2, 2, 2, 2) for ResNet18, (1, 1, 1, 1) for a small demo), got {stage_sizes!r}."
        )
    if norm == "group":
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(
                f"num_groups must be a positive integer (32 as in the GroupNorm paper), got {num_groups!r}."
            )
        channels = [width * 2**k for k in range(len(stage_sizes))]
        bad = [c for c in channels if c % group_count(c, num_groups) != 0]
        if bad:
            raise ValueError(
                f"GroupNorm with num_groups={num_groups} uses min({num_groups}, C) groups on a layer of C channels, "
                f"which must divide C; width={width} gives stage channels {channels}, of which {bad} are not "
                f"divisible. Choose a width that is a multiple of {num_groups} (e.g. 32 or 64) or a power of two "
                "below it (e.g. 8 or 16), or change num_groups."
            )


def _norm(kind: str, channels: int, num_groups: int, dtype: Any, name: str) -> Callable[[jax.Array, bool], jax.Array]:
    """Builds (inside a compact method) the normalisation layer ``name``; returns ``f(x, train)``."""
    if kind == "group":
        layer = nn.GroupNorm(num_groups=group_count(channels, num_groups), epsilon=NORM_EPSILON, dtype=dtype, name=name)
        return lambda x, train: layer(x)
    if kind == "batch":
        # Flax's momentum is the weight of the old running average: torch's momentum=0.1 is Flax's 0.9.
        return lambda x, train: nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=NORM_EPSILON, dtype=dtype, name=name
        )(x)
    return lambda x, train: x


def _conv(features: int, kernel: int, stride: int, padding: int, use_bias: bool, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=CONV_INIT,
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016), torchvision's ``BasicBlock``."""

    features: int
    stride: int = 1
    norm: str = "group"
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bias = self.norm == "none"
        y = _conv(self.features, 3, self.stride, 1, bias, self.dtype, "conv1")(x)
        y = _norm(self.norm, self.features, self.num_groups, self.dtype, "norm1")(y, train)
        y = nn.relu(y)
        y = _conv(self.features, 3, 1, 1, bias, self.dtype, "conv2")(y)
        y = _norm(self.norm, self.features, self.num_groups, self.dtype, "norm2")(y, train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.stride, 0, bias, self.dtype, "downsample_conv")(x)
            shortcut = _norm(self.norm, self.features, self.num_groups, self.dtype, "downsample_norm")(shortcut, train)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """A ResNet of BasicBlocks in torchvision's layout; ``ResNet()`` is ResNet18 with a 2-way head.

    Attributes:
      num_classes: size of the output layer (2: not smiling / smiling).
      stage_sizes: BasicBlocks per stage; ``(2, 2, 2, 2)`` is ResNet18, ``(3, 4, 6, 3)`` ResNet34,
        ``(1, 1, 1, 1)`` a small demo model. Stage ``k`` has ``width * 2**k`` channels.
      width: channels of the stem and the first stage (64 in ResNet18).
      norm: ``"group"`` | ``"batch"`` | ``"none"`` (see the module docstring; only ``"group"`` and ``"none"``
        keep per-example gradients independent of the rest of the batch).
      num_groups: GroupNorm groups; a layer of ``C`` channels uses ``min(num_groups, C)``.
      dtype: computation dtype (parameters are always float32); the logits are returned in float32.

    Call ``model.apply(variables, images, train=...)`` with images ``float[N, H, W, C]`` already normalised
    (the paper maps uint8 pixels to ``(x / 255 - 0.5) / 0.5``); any H, W from 32 up works (the stem and four
    stride-2 stages reduce the map 32-fold before the global average pool). Returns logits ``float32[N,
    num_classes]``. ``train`` only matters for ``norm="batch"``.

    Example::

        model = ResNet(num_classes=2)                       # ResNet18, GroupNorm(32): 11,177,538 parameters
        variables = model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
        logits = model.apply(variables, images)
    """

    num_classes: int = 2
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    norm: str = "group"
    num_groups: int = 32
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _validate(self.stage_sizes, self.width, self.norm, self.num_groups, self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(
                f"ResNet expects a batch of images float[N, H, W, C] (NHWC), got an array of shape {x.shape}; "
                "add a leading batch axis for a single image."
            )
        bias = self.norm == "none"
        x = x.astype(self.dtype)
        x = _conv(self.width, 7, 2, 3, bias, self.dtype, "conv1")(x)
        x = _norm(self.norm, self.width, self.num_groups, self.dtype, "norm1")(x, train)
        x = nn.relu(x)
        # torch's MaxPool2d(3, 2, padding=1): the values and gradient of nn.max_pool, without its slow gradient.
        x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for k, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = BasicBlock(
                    features=self.width * 2**k,
                    stride=2 if (k > 0 and j == 0) else 1,
                    norm=self.norm,
                    num_groups=self.num_groups,
                    dtype=self.dtype,
                    name=f"layer{k + 1}_{j}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, kernel_init=DENSE_KERNEL_INIT, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


def ResNet18(
    num_classes: int = 2,
    *,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    width: int = 64,
    norm: str = "group",
    num_groups: int = 32,
    dtype: Any = jnp.float32,
) -> ResNet:
    """ResNet18 (GroupNorm(32) by default) as a :class:`ResNet`; smaller members change ``stage_sizes``/``width``.

    With ``num_classes=2`` and the defaults it has 11,177,538 parameters, the same count as torchvision's
    ``resnet18`` with a 2-way head (GroupNorm's scale/bias replace BatchNorm's weight/bias one for one).
    """
    return ResNet(
        num_classes=num_classes,
        stage_sizes=tuple(stage_sizes),
        width=width,
        norm=norm,
        num_groups=num_groups,
        dtype=dtype,
    )
