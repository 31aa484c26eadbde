"""Per-example gradients and clipping: the sensitivity-bounding half of DP-SGD.

The guarantee
-------------
``grad_fn = clipped_grad(loss_fn, l2_clip_norm=C)`` returns, for a batch with padding mask ``m``,

    clipped_sum = sum_i m_i * g_i * min(1, C / ||g_i||_2),      g_i = grad of loss_fn on example i alone,

so every real example contributes a vector of L2 norm at most ``C``. Hence, for any two batches that differ
by **adding or removing one example**, the clipped sums differ by at most ``C`` in L2 norm; for batches that
differ by **replacing one example**, by at most ``2 C``. This holds whatever the data, provided that
``loss_fn`` does not make examples interact (no BatchNorm on batch statistics, no batch-level losses): each
``g_i`` is computed with ``loss_fn`` applied to example ``i`` alone, so a model whose output for one example
depends on the others is evaluated differently here than in a batched forward pass, and its privacy analysis
is not the one this module gives.

With per-layer bounds (``l2_clip_norm`` a pytree of positive numbers that is a prefix of the parameter tree),
each group ``l`` of each example's gradient is clipped to ``C_l`` separately, and the bound above holds with
``C = sqrt(sum_l C_l^2)`` (see :func:`sensitivity`).

With a clip rule (``clipped_grad(..., clip_rule=rule)``, a :class:`ClipRule`), example ``i`` contributes
``factor_i * g_i`` with the rule's factor; the rule promises ``factor_i * norm_i <= S`` for the bound ``S`` its
caller declares, and the sensitivity is then ``S``. Every strategy passes the rule (and returns) an upper bound
of the norm of the vector it actually scales and sums, so the promise carries over to the sum.

Examples whose gradient contains NaN or infinity contribute exactly zero (they are never allowed to poison
the sum); their reported norm is the non-finite value, and :func:`count_nonfinite` counts them. Padding
examples (``mask`` False) contribute exactly zero whatever their values.

Strategies
----------
All compute the same clipped sum to float tolerance, each registered by its own module
(:func:`register_strategy`):

- ``"vmap"`` (:mod:`jaxdp.clipping.vmap`): per-example gradients by ``jax.vmap``, the reference.
- ``"vmap_matmul"`` (:mod:`jaxdp.clipping.matmul`): the same with small-map convolutions as patches x matmul.
- ``"bookkeeping"`` (:mod:`jaxdp.clipping.bookkeeping`): ghost norms and book-keeping, no per-example weight
  gradients; :func:`fast_path_report` says which layers it handles.
- ``"auto"`` (:mod:`jaxdp.clipping.auto`): one of the above, picked for the model by a rule from the benchmark
  (:func:`resolve_strategy` says which and why); the default of ``config.dp.clipping_strategy``.
"""

# The built-in strategies register themselves on import, in this order (available_strategies()).
from jaxdp.clipping import vmap  # noqa: I001  (registration order)
from jaxdp.clipping import bookkeeping, matmul
from jaxdp.clipping import auto  # after the strategies it chooses from
from jaxdp.clipping.auto import resolve_strategy
from jaxdp.clipping.bookkeeping import DEFAULT_MAX_PATCH_BYTES, fast_path_layers, fast_path_report
from jaxdp.clipping.core import (
    ClipRule,
    available_strategies,
    clip_and_sum,
    clipped_grad,
    count_nonfinite,
    get_strategy,
    register_strategy,
    sensitivity,
    validate_clip_norm,
)
from jaxdp.clipping.matmul import DEFAULT_MATMUL_MAX_PIXELS, matmul_convs

__all__ = [
    "DEFAULT_MATMUL_MAX_PIXELS",
    "DEFAULT_MAX_PATCH_BYTES",
    "ClipRule",
    "auto",
    "available_strategies",
    "bookkeeping",
    "clip_and_sum",
    "clipped_grad",
    "count_nonfinite",
    "fast_path_layers",
    "fast_path_report",
    "get_strategy",
    "matmul",
    "matmul_convs",
    "register_strategy",
    "resolve_strategy",
    "sensitivity",
    "validate_clip_norm",
    "vmap",
]
