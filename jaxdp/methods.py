"""DP-fairness mitigations as options of the DP plan: DPSGD-F, DPSGD-Global and DPSGD-Global-Adapt.

``config.dp.method`` picks one of :data:`METHODS`; its parameters live in the config section of the same name
(``config.dp.dpsgd_f``, ``config.dp.dpsgd_global``, ``config.dp.dpsgd_global_adapt``), each ``None`` by default,
which means the reference value of :data:`PARAMETERS` (the papers' and their public code's defaults). A method is
a small object that :func:`jaxdp.plan.make_plan` builds once (:func:`from_config`) and that the training loop
runs through the plan, without a branch of its own:

* ``clip_rule`` and ``clip_args(state, groups)`` — each example's clip factor, given to
  :func:`jaxdp.clipped_grad` as a :class:`jaxdp.clipping.ClipRule` and per-example arguments, so every clipping
  strategy (``bookkeeping`` included) runs the method at its own speed;
* ``counts(norms, mask, groups, state)`` — the exact statistics of one chunk that the method releases with noise
  each step (summed over the step's chunks and devices before any noise);
* ``update(state, noisy_counts)`` — the method's state after the release (per-group bounds, a threshold): pure
  post-processing of released values, so it is public and covered by epsilon;
* ``noise_sensitivity(state)`` — the L2 sensitivity the gradient noise is scaled to, when it changes with the
  state (DPSGD-F); ``extra_noise_multipliers`` — the noise multipliers of the releases, for the
  :class:`jaxdp.accounting.PrivacyLedger`.

Timing of the releases. The counts of step ``t``'s batch are released in step ``t``; the bounds (DPSGD-F) or the
threshold (Global-Adapt) they produce are used from step ``t + 1`` on. For Global-Adapt this is the algorithm
(Esipova et al. update Z after the step). For DPSGD-F it is a one-step lag against Xu et al., whose step ``t``
clips with bounds computed from step ``t``'s own counts: that needs every example's norm of the whole step (all
chunks of a Poisson batch) before the first example is clipped, i.e. a second pass over each batch (one to
count, one to clip), which would roughly double the cost of a step. The privacy analysis is the same either way
(bounds chosen from released values); the lag only makes the bounds one step older.

Guarantees (add or remove one example; Poisson sampling with rate q):

* ``"dpsgd"`` — DP-SGD: each example contributes ``min(1, C / ||g_i||) g_i``, sensitivity ``C``; releases the
  noised sum. One step: ``PoissonSampled(q, Gaussian(z))``.
* ``"dpsgd_f"`` (Xu, Du & Wu 2021) — example ``i`` of group ``k`` contributes ``min(1, C_k / ||g_i||) g_i``,
  so the sum's sensitivity is ``max_k C_k``, and the gradient noise is ``N(0, (z max_k C_k)^2 I)``. Also released:
  the ``2K`` counts ``m_k = #{i in group k: ||g_i|| > C0}`` and ``o_k = #{i in group k: ||g_i|| <= C0}`` (a
  non-finite norm counts in ``m_k``) with ``N(0, sigma1^2)`` each; one example changes exactly one count by 1, so
  the count vector has L2 sensitivity 1 and noise multiplier ``sigma1``. The noisy counts are rounded down and
  clamped at 0 (the reference code's post-processing); ``b_k = m_k / (m_k + o_k)`` (1 when that is 0/0) and
  ``C_k = C0 (1 + b_k / mean_j b_j)`` (``C0`` when every ``b_k`` is 0), so ``C0 <= C_k <= (1 + K) C0``. Before
  the first release every ``b_k`` is 1 (no counts yet): ``C_k = 2 C0``. One step: the two Gaussians on the same batch,
  ``PoissonSampled(q, Gaussian(z_eff))`` with ``z_eff = (z^-2 + sigma1^-2)^-1/2``
  (:func:`jaxdp.accounting.combined_noise_multiplier`).
* ``"dpsgd_global"`` (Bu et al. 2021) — ``(C / Z) g_i`` if ``||g_i|| <= Z``, else 0 (dropped): sensitivity ``C``,
  noise ``N(0, (z C)^2 I)``, nothing else released. One step: ``PoissonSampled(q, Gaussian(z))``.
* ``"dpsgd_global_adapt"`` (Esipova, Ashari Ghomi, Luo & Cresswell 2023) — ``(C / Z) g_i`` if ``||g_i|| <= Z``,
  else ``min(1, C / ||g_i||) g_i`` (clipped to C instead of dropped): sensitivity ``C``, noise
  ``N(0, (z C)^2 I)``. Also released: ``d = #{i: ||g_i|| > tau Z}`` (non-finite norms count) with
  ``N(0, sigma_b^2)``, sensitivity 1; then ``Z <- Z exp(-eta_Z + d_noisy / B)`` with ``B`` the *public* expected
  batch size (the reference code divides by the realised batch size, which is private under Poisson sampling).
  One step: ``PoissonSampled(q, Gaussian((z^-2 + sigma_b^-2)^-1/2))``.

Every count's noise comes from the run's secret noise stream (:meth:`jaxdp.plan.DPPlan.release`: a separate
``fold_in`` of the secret noise key) through the tail-correct :func:`jaxdp.noise.gaussian`, or, with
``mechanism="lattice"``, as integers (:func:`release`). The
sensitivity of each clip rule is tested empirically on every clipping strategy (``tests/test_methods.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxdp import lattice, noise
from jaxdp.fairness import GROUPS

PyTree = Any

METHODS = ("dpsgd", "dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")
# How tables and figures name each method (short, for figure ticks); DPSGD-Global is Bu et al.'s global clipping.
DISPLAY_NAMES = {"dpsgd": "DP-SGD", "dpsgd_f": "DPSGD-F", "dpsgd_global": "Global",
                 "dpsgd_global_adapt": "Global-Adapt"}
NUM_GROUPS = len(GROUPS)  # jaxdp.fairness's groups 0 and 1 (jaxdp.data: the group attribute is binary)

# Each method's parameters (the keys of config.dp.<method>) and their reference values. None for DPSGD-F's C0
# means config.dp.l2_clip_norm (the reference code's C0 equals its clip bound, 1.0).
PARAMETERS: dict[str, dict[str, float | None]] = {
    "dpsgd": {},
    "dpsgd_f": {
        "base_clip_norm": None,  # C0: the bound the counts compare norms with; None: config.dp.l2_clip_norm
        "count_noise_multiplier": 10.0,  # sigma1: noise std on each of the 2K counts (sensitivity 1)
    },
    "dpsgd_global": {
        "threshold": 100.0,  # Z: examples with a larger norm are dropped, the others scaled by C / Z
    },
    "dpsgd_global_adapt": {
        "initial_threshold": 100.0,  # Z0
        "count_noise_multiplier": 10.0,  # sigma_b: noise std on the count of norms above tau Z (sensitivity 1)
        "threshold_learning_rate": 0.1,  # eta_Z (Esipova et al.: 0.1 for images, 0.01 for tabular data)
        "count_threshold_factor": 1.0,  # tau: the count is of norms above tau Z
    },
}

_TINY = float(jnp.finfo(jnp.float32).tiny)


class Method(Protocol):
    """What the plan and the training loop use of a method (see the module docstring)."""

    name: str
    clip_rule: Any  # a jaxdp.clipping.ClipRule, or None for min(1, C / norm)
    sensitivity: float  # the L2 bound on one example's contribution to the clipped sum (the largest, for DPSGD-F)
    uses_groups: bool  # whether each example's group id changes what the method does (its clip args or counts)
    extra_noise_multipliers: tuple[float, ...]
    count_noise_multiplier: float | None
    num_counts: int

    def init_state(self) -> PyTree: ...
    def clip_args(self, state: PyTree, groups: jax.Array) -> PyTree: ...
    def clip_bounds(self, state: PyTree, groups: jax.Array) -> jax.Array: ...
    def noise_sensitivity(self, state: PyTree) -> jax.Array | None: ...
    def counts(self, norms: jax.Array, mask: jax.Array, groups: jax.Array, state: PyTree) -> jax.Array: ...
    def update(self, state: PyTree, noisy_counts: jax.Array) -> PyTree: ...
    def public_state(self, state: PyTree) -> dict[str, float]: ...


class _NoRelease:
    """Methods that release nothing but the noised gradient."""

    uses_groups = False
    count_noise_multiplier = None
    num_counts = 0
    extra_noise_multipliers: tuple[float, ...] = ()

    def init_state(self) -> PyTree:
        return {}

    def counts(self, norms, mask, groups, state) -> jax.Array:
        return jnp.zeros((0,), jnp.float32)

    def update(self, state, noisy_counts) -> PyTree:
        return state

    def noise_sensitivity(self, state) -> None:
        return None

    def public_state(self, state) -> dict[str, float]:
        return {}


@dataclasses.dataclass(frozen=True)
class DPSGD(_NoRelease):
    """Plain DP-SGD: factor ``min(1, C / ||g_i||)`` (the default rule of :func:`jaxdp.clipped_grad`);
    sensitivity ``C`` under add/remove; releases only the noised gradient sum."""

    l2_clip_norm: float = math.inf
    name = "dpsgd"
    clip_rule = None

    @property
    def sensitivity(self) -> float:
        """The bound on one example's contribution to the clipped sum: ``C``."""
        return float(self.l2_clip_norm)

    def clip_args(self, state, groups) -> None:
        return None

    def clip_bounds(self, state, groups) -> jax.Array:
        return jnp.full(jnp.shape(groups), self.l2_clip_norm, jnp.float32)


@dataclasses.dataclass(frozen=True)
class GroupBoundRule:
    """Clip rule of DPSGD-F: ``factor_i = min(1, bound_i / ||g_i||)`` with ``clip_args`` each example's bound
    ``C_k(i)``; contract ``factor_i ||g_i|| <= bound_i <= max_k C_k``."""

    def factors(self, norms: jax.Array, bounds: jax.Array) -> jax.Array:
        return jnp.minimum(1.0, bounds / jnp.maximum(norms, _TINY))


@dataclasses.dataclass(frozen=True)
class DPSGDF:
    """DPSGD-F (Xu, Du & Wu 2021): per-group bounds adapted from privately counted clip fractions.

    Guarantee (add or remove one example): the clipped sum moves by at most ``max_k C_k`` (the noise's scale);
    the ``2K`` counts by 1 in L2 (noise ``sigma1``). State: the last released counts ``[m_0..m_{K-1},
    o_0..o_{K-1}]`` (rounded down, clamped at 0), from which the bounds follow (module docstring).
    """

    base_clip_norm: float
    count_noise_multiplier: float
    num_groups: int = NUM_GROUPS
    name = "dpsgd_f"
    clip_rule = GroupBoundRule()
    uses_groups = True

    @property
    def extra_noise_multipliers(self) -> tuple[float, ...]:
        return (self.count_noise_multiplier,)

    @property
    def num_counts(self) -> int:
        return 2 * self.num_groups

    @property
    def sensitivity(self) -> float:
        """The largest bound the clipped sum can have: ``max_k C_k <= (1 + K) C0``; each step's own bound is
        :meth:`noise_sensitivity`."""
        return float((1 + self.num_groups) * self.base_clip_norm)

    def init_state(self) -> PyTree:
        return {"counts": jnp.zeros((self.num_counts,), jnp.float32)}

    def group_bounds(self, state: PyTree) -> jax.Array:
        """``C_k = C0 (1 + b_k / mean_j b_j)`` with ``b_k = m_k / (m_k + o_k)``, 1 where that is 0/0."""
        counts = state["counts"]
        above, below = counts[: self.num_groups], counts[self.num_groups:]
        total = above + below
        b = jnp.where(total > 0, above / jnp.where(total > 0, total, 1.0), 1.0)
        mean = jnp.mean(b)
        # mean is 0 only when no group's released count above C0 is positive: then b_k / mean is taken as 0 and
        # every bound is C0, as in the reference code (which divides by mean + 1e-8).
        ratio = jnp.where(mean > 0, b / jnp.where(mean > 0, mean, 1.0), 0.0)
        return (self.base_clip_norm * (1.0 + ratio)).astype(jnp.float32)

    def clip_args(self, state, groups) -> jax.Array:
        return self.group_bounds(state)[groups]

    def clip_bounds(self, state, groups) -> jax.Array:
        return self.clip_args(state, groups)

    def noise_sensitivity(self, state) -> jax.Array:
        return jnp.max(self.group_bounds(state))

    def counts(self, norms, mask, groups, state) -> jax.Array:
        within = jnp.isfinite(norms) & (norms <= self.base_clip_norm)
        real = jnp.asarray(mask, bool)
        above = [jnp.sum(real & (groups == k) & ~within) for k in range(self.num_groups)]
        below = [jnp.sum(real & (groups == k) & within) for k in range(self.num_groups)]
        return jnp.stack(above + below).astype(jnp.float32)

    def update(self, state, noisy_counts) -> PyTree:
        return {"counts": jnp.maximum(jnp.floor(noisy_counts), 0.0).astype(jnp.float32)}

    def public_state(self, state) -> dict[str, float]:
        bounds = jax.device_get(self.group_bounds(state))
        return {f"method_clip_norm_{k}": float(bounds[k]) for k in range(self.num_groups)}


@dataclasses.dataclass(frozen=True)
class GlobalRule:
    """Clip rule of global clipping: ``C / Z`` for norms ``<= Z``; above ``Z``, 0 (``adapt=False``) or
    ``min(1, C / norm)`` (``adapt=True``). ``Z`` is static (``threshold``) or each example's ``clip_args``.
    Contract: ``factor_i ||g_i|| <= C``."""

    l2_clip_norm: float
    threshold: float | None = None
    adapt: bool = False

    def factors(self, norms: jax.Array, clip_args: PyTree) -> jax.Array:
        z = jnp.maximum(self.threshold if self.threshold is not None else clip_args, _TINY)
        above = (jnp.minimum(1.0, self.l2_clip_norm / jnp.maximum(norms, _TINY)) if self.adapt
                 else jnp.zeros_like(norms))
        return jnp.where(norms <= z, self.l2_clip_norm / z, above)


@dataclasses.dataclass(frozen=True)
class DPSGDGlobal(_NoRelease):
    """DPSGD-Global (Bu et al. 2021): ``(C / Z) g_i`` for ``||g_i|| <= Z``, examples above ``Z`` dropped.

    Guarantee (add or remove one example): the clipped sum moves by at most ``C``; noise ``N(0, (z C)^2 I)``;
    nothing else is released.
    """

    l2_clip_norm: float
    threshold: float
    name = "dpsgd_global"

    @property
    def sensitivity(self) -> float:
        """``C``: every kept example is scaled to at most ``(C / Z) Z``."""
        return float(self.l2_clip_norm)

    @property
    def clip_rule(self) -> GlobalRule:
        return GlobalRule(self.l2_clip_norm, self.threshold)

    def clip_args(self, state, groups) -> None:
        return None

    def clip_bounds(self, state, groups) -> jax.Array:
        return jnp.full(jnp.shape(groups), self.threshold, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DPSGDGlobalAdapt:
    """DPSGD-Global-Adapt (Esipova et al. 2023): global clipping whose examples above ``Z`` are clipped to ``C``,
    with ``Z`` adapted from a privately counted fraction of norms above ``tau Z``.

    Guarantee (add or remove one example): the clipped sum moves by at most ``C`` (noise ``N(0, (z C)^2 I)``),
    the count by 1 (noise ``sigma_b``). State: the threshold ``Z`` (module docstring).
    """

    l2_clip_norm: float
    initial_threshold: float
    count_noise_multiplier: float
    threshold_learning_rate: float
    count_threshold_factor: float
    expected_batch_size: float
    name = "dpsgd_global_adapt"
    num_counts = 1
    uses_groups = False

    @property
    def sensitivity(self) -> float:
        """``C``: below ``Z`` examples are scaled by ``C / Z``, above it clipped to ``C``."""
        return float(self.l2_clip_norm)

    @property
    def clip_rule(self) -> GlobalRule:
        return GlobalRule(self.l2_clip_norm, None, adapt=True)

    @property
    def extra_noise_multipliers(self) -> tuple[float, ...]:
        return (self.count_noise_multiplier,)

    def init_state(self) -> PyTree:
        return {"threshold": jnp.asarray(self.initial_threshold, jnp.float32)}

    def clip_args(self, state, groups) -> jax.Array:
        return jnp.broadcast_to(state["threshold"], jnp.shape(groups)).astype(jnp.float32)

    def clip_bounds(self, state, groups) -> jax.Array:
        return self.clip_args(state, groups)

    def noise_sensitivity(self, state) -> None:
        return None

    def counts(self, norms, mask, groups, state) -> jax.Array:
        within = jnp.isfinite(norms) & (norms <= self.count_threshold_factor * state["threshold"])
        return jnp.sum(jnp.asarray(mask, bool) & ~within, keepdims=True).astype(jnp.float32)

    def update(self, state, noisy_counts) -> PyTree:
        factor = jnp.exp(-self.threshold_learning_rate + noisy_counts[0] / self.expected_batch_size)
        return {"threshold": jnp.maximum(state["threshold"] * factor, _TINY).astype(jnp.float32)}

    def public_state(self, state) -> dict[str, float]:
        return {"method_threshold": float(jax.device_get(state["threshold"]))}


def release(method: Method, state: PyTree, counts: jax.Array, key: jax.Array, *,
            mechanism: str = "gaussian") -> PyTree:
    """Adds noise of standard deviation ``sigma = method.count_noise_multiplier`` to each of a step's exact counts,
    keyed by ``key`` (which must be secret and fresh for every step), and returns the method's next state; the
    identity for methods that release nothing else.

    ``mechanism="gaussian"``: ``counts + sigma Z`` in float32, ``Z`` from the tail-correct
    :func:`jaxdp.noise.gaussian`. ``mechanism="lattice"``: ``counts + N`` with integer ``N`` within total variation
    :data:`jaxdp.lattice.TV_PER_DRAW` of ``round(N(0, sigma^2))`` (:func:`jaxdp.lattice.noised_counts`): counts are
    integers already, so this is the lattice mechanism with lattice step 1 and unchanged sensitivity 1, and the
    released values are integers (no floating-point holes, no truncation at 9.155 sigma). Either way one compiled
    program per call, also outside ``jit``.
    """
    if method.num_counts == 0:
        return state
    return _release(method, state, counts, key, mechanism=noise.check_mechanism(mechanism))


@functools.partial(jax.jit, static_argnames=("method", "mechanism"))
def _release(method: Method, state: PyTree, counts: jax.Array, key: jax.Array, *, mechanism: str) -> PyTree:
    if mechanism == "lattice":
        noisy = lattice.noised_counts(counts, key, method.count_noise_multiplier)
    else:
        # The std as a float32 never below sigma (a float64 constant rounded to nearest could fall below it).
        noisy = counts + noise.stddev_at_least(method.count_noise_multiplier) * noise.gaussian(key, counts.shape)
    return method.update(state, noisy)


# --------------------------------------------------------------------------------------------------------------
# From the config.


def _section(dp_config: Any, name: str) -> Mapping[str, Any]:
    section = dp_config.get(name) if hasattr(dp_config, "get") else None
    if section is None:
        return {}
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def resolved_parameters(dp_config: Any) -> dict[str, float]:
    """The chosen method's parameters with every None replaced by its reference value (:data:`PARAMETERS`).

    >>> from jaxdp.config import base_config
    >>> c = base_config().dp
    >>> c.method = "dpsgd_f"
    >>> resolved_parameters(c)
    {'base_clip_norm': 5.0, 'count_noise_multiplier': 10.0}
    """
    method = str(dp_config.get("method", "dpsgd"))
    given = _section(dp_config, method)
    out: dict[str, float] = {}
    for key, default in PARAMETERS[method].items():
        value = given.get(key)
        if value is None:
            value = float(dp_config.l2_clip_norm) if default is None else default
        out[key] = float(value)
    return out


def check_config(dp_config: Any) -> list[str]:
    """What is wrong with the method settings of ``config.dp`` (empty when nothing is): an unknown method, a
    parameter set for a method other than the chosen one, an unknown parameter, or an out-of-range value."""
    method = dp_config.get("method", "dpsgd")
    if method not in METHODS:
        return [f"config.dp.method={method!r} is not a method; choose one of {', '.join(map(repr, METHODS))}."]
    errors = []
    if method != "dpsgd" and not dp_config.enabled:
        errors.append(f"config.dp.method={method!r} is a DP method; it needs config.dp.enabled=True (non-private "
                      "training has no method: leave config.dp.method='dpsgd').")
    allowed = ", ".join(f"config.dp.{method}.{k}" for k in PARAMETERS[method]) or "none"
    for name in METHODS[1:]:
        for key, value in _section(dp_config, name).items():
            if key not in PARAMETERS[name]:
                errors.append(f"config.dp.{name}.{key} is not a parameter of {name!r}; its parameters are "
                              f"{', '.join(f'config.dp.{name}.{k}' for k in PARAMETERS[name])}.")
            elif name != method and value is not None:
                errors.append(f"config.dp.{name}.{key}={value!r} is a parameter of dp.method={name!r}, but "
                              f"config.dp.method={method!r} (whose parameters are: {allowed}); set it back to None "
                              f"or choose config.dp.method={name!r}.")
    if errors:
        return errors
    params = resolved_parameters(dp_config)
    positive = {"base_clip_norm", "count_noise_multiplier", "threshold", "initial_threshold",
                "count_threshold_factor"}
    for key, value in params.items():
        ok = value > 0 if key in positive else value >= 0
        if not (math.isfinite(value) and ok):
            relation = ">" if key in positive else ">="
            errors.append(f"config.dp.{method}.{key}={value!r} must be a finite number {relation} 0.")
    return errors


def from_params(name: str, l2_clip_norm: float, params: Mapping[str, float | None],
                expected_batch_size: float) -> Method:
    """The method ``name`` with ``params`` (missing or None: the reference values of :data:`PARAMETERS`).

    ``expected_batch_size`` is the *public* normaliser of DPSGD-Global-Adapt's count (``q`` times the public
    training-set size), never a realised or secret-dependent size.
    """
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not a method; choose one of {', '.join(map(repr, METHODS))}.")
    unknown = sorted(set(params) - set(PARAMETERS[name]))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a parameter of method {name!r}; its parameters are "
                         f"{', '.join(map(repr, PARAMETERS[name])) or 'none'}.")
    p = {key: float(l2_clip_norm if default is None else default) if params.get(key) is None
         else float(params[key]) for key, default in PARAMETERS[name].items()}
    c = float(l2_clip_norm)
    if name == "dpsgd":
        return DPSGD(c)
    if name == "dpsgd_f":
        return DPSGDF(p["base_clip_norm"], p["count_noise_multiplier"])
    if name == "dpsgd_global":
        return DPSGDGlobal(c, p["threshold"])
    return DPSGDGlobalAdapt(c, p["initial_threshold"], p["count_noise_multiplier"], p["threshold_learning_rate"],
                            p["count_threshold_factor"], float(expected_batch_size))


def from_config(dp_config: Any, expected_batch_size: float) -> Method:
    """The method of a validated ``config.dp`` (:func:`jaxdp.config.validate_run_config`)."""
    method = str(dp_config.get("method", "dpsgd"))
    return from_params(method, float(dp_config.l2_clip_norm), resolved_parameters(dp_config), expected_batch_size)
