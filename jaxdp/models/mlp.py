"""A multilayer perceptron for feature vectors (tabular data such as UCI Adult): Dense layers only.

Every layer is a ``flax.linen.Dense``, so the model is on the book-keeping fast path of :mod:`jaxdp.clipping`
(``"auto"`` picks ``"bookkeeping"``: each example's gradient norm from its inputs and output gradients, no
per-example gradient materialised). Parameters are initialised as PyTorch's ``nn.Linear`` (kernel and bias uniform
in ``+-1/sqrt(fan_in)``), the initialisation of fair-dp's Adult network (256-256, tanh), so that the two codes start
from the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh, "relu": nn.relu, "gelu": nn.gelu, "elu": nn.elu, "silu": nn.silu, "sigmoid": nn.sigmoid,
}


def _torch_uniform(fan_in: int) -> Callable:
    """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (its kaiming_uniform(a=sqrt(5)) kernel and
    its bias)."""
    bound = 1.0 / max(1, fan_in) ** 0.5

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class MLP(nn.Module):
    """``Dense(h_1) -> act -> ... -> Dense(h_k) -> act -> Dense(num_classes)`` on flattened inputs.

    Attributes:
      num_classes: outputs (logits).
      hidden_sizes: the hidden layers' widths, e.g. ``(256, 256)``; ``()`` is a linear model.
      activation: a name of :data:`ACTIVATIONS`.
    """

    num_classes: int = 2
    hidden_sizes: Sequence[int] = (256, 256)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # train: the classifiers' signature
        x = x.reshape((x.shape[0], -1))
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate((*self.hidden_sizes, self.num_classes)):
            init = _torch_uniform(x.shape[-1])
            x = nn.Dense(int(width), kernel_init=init, bias_init=init, name=f"dense{i}")(x)
            if i < len(self.hidden_sizes):
                x = act(x)
        return x
