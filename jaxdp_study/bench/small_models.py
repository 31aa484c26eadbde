"""The small models DP-fairness research trains, written as a jaxdp user writes them (Flax, optax, a per-example
loss), and their data: the GroupNorm CNN on scikit-learn's bundled digits and fair-dp's Adult MLP.

Their PyTorch twins (the same layers, for Opacus) are in :mod:`jaxdp_study.bench.torch_side`.

* :class:`DigitsCNN`: conv 3x3 16 -> GroupNorm(4) -> ReLU -> conv 3x3 stride 2 32 -> GroupNorm(8) -> ReLU -> dense 32
  -> ReLU -> dense 10, 21,642 parameters, on 8x8 grey images. :func:`digits` is the data: sklearn's 1,797 bundled
  digits (no download), pixels / 16, shuffled with a fixed seed, the first :data:`DIGITS_TRAIN` for training and
  the other 397 for testing.
* :class:`MLP`: fair-dp's tabular network (Esipova et al. 2023, ``config/tabular.py``): dense 256 -> tanh -> dense
  256 -> tanh -> dense 2. Its input width :data:`ADULT_FEATURES` is that of fair-dp's one-hot encoding of UCI Adult
  (its ``data_dim``; jaxdp's own ``"adult"`` source has 99, :mod:`jaxdp.data.adult`). :func:`adult_shaped` draws
  random features of that shape: a step's time does not depend on the values, and the benchmark then runs where
  the UCI files are absent.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

DIGITS_TRAIN = 1_400  # 22 Poisson steps of expected batch 64 per epoch: 15 epochs are 330 steps
# fair-dp's Adult features after its one-hot encoding (data_dim printed by its main.py on adult.data/adult.test).
ADULT_FEATURES = 98
# UCI adult.data records without a missing value ("?"): the training set fair-dp's preprocessing starts from.
ADULT_TRAIN = 30_162


class DigitsCNN(nn.Module):
    """A small GroupNorm CNN for 8x8 grey digits (module docstring)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3))(x)))
        x = nn.relu(nn.GroupNorm(num_groups=8)(nn.Conv(32, (3, 3), strides=2)(x)))
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class MLP(nn.Module):
    """fair-dp's MLP: ``hidden`` tanh layers, then a dense head of ``num_classes``."""

    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.tanh(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def per_example_loss(model: nn.Module):
    """``loss_fn(params, batch) -> per-example cross-entropy`` on ``{"x": inputs, "y": integer labels}``: the loss a
    user hands to :func:`jaxdp.plan.make_plan`."""

    def loss_fn(params: Any, batch: dict) -> jax.Array:
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn


def accuracy(model: nn.Module, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of ``x`` that ``model`` classifies as ``y``."""
    logits = jax.jit(model.apply)({"params": params}, x)
    return float(np.mean(np.asarray(logits).argmax(-1) == y))


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: sklearn's bundled digits as float32 ``[N, 8, 8, 1]`` in [0, 1] and
    int32 labels; :data:`DIGITS_TRAIN` training examples, the rest for testing (a fixed shuffle by ``seed``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits workload needs scikit-learn (its bundled digits): pip install scikit-learn, "
                          "or pip install -e '.[examples]'") from error
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:]


def adult_shaped(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features, labels, groups)`` of ``n`` random examples shaped like fair-dp's Adult: standard normal float32
    ``[n, ADULT_FEATURES]``, 0/1 labels, and about a third in group 1 (Adult's share of women)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, ADULT_FEATURES), dtype=np.float32)
    return features, rng.integers(0, 2, n).astype(np.int32), (rng.random(n) < 1 / 3).astype(np.int32)
