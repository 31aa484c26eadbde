"""jaxdp: fast differentially private deep learning in JAX/Flax."""

from jaxdp import accounting, clipping, fairness, lattice, noise, sampling
from jaxdp.clipping import clipped_grad
from jaxdp.noise import dp_noise

__all__ = ["accounting", "clipping", "clipped_grad", "dp_noise", "fairness", "lattice", "noise", "sampling"]
__version__ = "0.1.0"
