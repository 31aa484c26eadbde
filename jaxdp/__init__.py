"""jaxdp: fast differentially private deep learning in JAX/Flax.

What a user of the library imports from here:

* the DP plan (:mod:`jaxdp.plan`): :class:`DPConfig` (the privacy settings), :class:`ExecutionConfig` (speed and
  memory only), :func:`make_plan` (your loss, dataset size, batch size and optax optimiser in; a
  :class:`DPPlan` out: sampler, jitted training step, epsilon), :class:`TrainState`, :class:`StepOutput`;
* accounting and sampling: :class:`PrivacyLedger`, :class:`PoissonSampler`, :class:`ShuffledSampler`;
* the two halves of DP-SGD on their own: :func:`clipped_grad` (per-example clipping, carrying its
  ``sensitivity``) and :func:`dp_noise` (the Gaussian noise as an optax transformation);
* :func:`group_metrics` (per-group accuracy and fairness gaps with confidence intervals);
* :func:`train_and_evaluate`, the study's config-driven training loop (imported on first use: it brings in
  checkpointing and the data sources, which a user of the plan alone does not need).

``docs/library.md`` shows them on your own model, loss, data and loop; ``examples/`` has scripts to copy.
"""

from jaxdp import accounting, clipping, fairness, lattice, ledger, noise, sampling
from jaxdp.clipping import clipped_grad
from jaxdp.fairness import group_metrics
from jaxdp.ledger import PrivacyLedger
from jaxdp.noise import dp_noise
from jaxdp.plan import DPConfig, DPPlan, ExecutionConfig, StepOutput, TrainState, make_plan
from jaxdp.sampling import PoissonSampler, ShuffledSampler

# Names resolved on first access (module __getattr__), so that `import jaxdp` does not pay for them.
_LAZY = {"train_and_evaluate": "jaxdp.train"}

__all__ = [
    "DPConfig",
    "DPPlan",
    "ExecutionConfig",
    "PoissonSampler",
    "PrivacyLedger",
    "ShuffledSampler",
    "StepOutput",
    "TrainState",
    "accounting",
    "clipped_grad",
    "clipping",
    "dp_noise",
    "fairness",
    "group_metrics",
    "lattice",
    "ledger",
    "make_plan",
    "noise",
    "sampling",
    "train_and_evaluate",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jaxdp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
