"""The typed settings of a DP plan: :class:`DPConfig` (privacy) and :class:`ExecutionConfig` (speed and memory only).

Both are frozen dataclasses validated on construction (as jax_privacy's configs are): a value out of range is
refused with its name and the allowed range, before anything is built. The privacy settings are kept apart from
the performance-only ones, so that a change of the latter can never change what is released (beyond float
summation order).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxdp import accounting, clipping, methods, noise


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = True,
            hi_open: bool = True, optional: bool = False) -> float | None:
    """``value`` as a float after checking it is a real number in the stated range (errors name the field)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"DPConfig.{name}={value!r} must be a number; got {type(value).__name__}.")
    value = float(value)
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and (value >= hi if hi_open else value > hi)
    if bad:
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        high = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        allowed = " and ".join(p for p in (low, high) if p) or "finite"
        raise ValueError(f"DPConfig.{name}={value!r} must be a finite number {allowed}.")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(map(repr, allowed))}.")
    return value


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """The privacy settings of a run: everything the guarantee depends on, validated on construction.

    Attributes:
      l2_clip_norm: C, the bound on each example's gradient norm (required: there is no default bound).
      delta: the delta of the reported (epsilon, delta); use ``< 1 / dataset_size``.
      noise_multiplier: z; the noise std on the clipped sum is ``z * sensitivity``. Give exactly one of this and
        ``target_epsilon``.
      target_epsilon: calibrate z so that the run's epsilon (at ``delta``, under ``accountant``) is at most this.
      sampling: ``"poisson"`` (what the accountants assume; add-or-remove-one neighbours) or ``"fixed"``
        (shuffled fixed-size batches, accounted as sampling without replacement; see :mod:`jaxdp.accounting`).
      accountant: ``"pld"``, ``"rdp"`` or ``"rdp_classic"``: what :meth:`DPPlan.epsilon` and calibration use.
      method: ``"dpsgd"`` or a DP-fairness method of :mod:`jaxdp.methods`; ``method_params`` its parameters (None
        or missing: the reference values of :data:`jaxdp.methods.PARAMETERS`).
      noise_mechanism: ``"lattice"`` (default): the clipped sum is quantised to a fixed lattice and integer noise
        added, so the output's support is the same for neighbouring datasets (:mod:`jaxdp.lattice`; the sensitivity
        grows by at most 2^-10); ``"gaussian"``: float32 Gaussian noise on the float sum, whose rounding leaves holes
        in the output's support (:func:`jaxdp.dp_noise`).
      secure_noise: Opacus-style secure Gaussian sampling (:func:`jaxdp.dp_noise`'s ``secure``; gaussian only).
      reproducible: derive sampling and noise from the public ``public_seed`` of :func:`make_plan` instead of a
        secret (tests, exact replication): the epsilon is then no guarantee (:data:`REPRODUCIBLE_NOTE`).
    """

    l2_clip_norm: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    sampling: str = "poisson"
    accountant: str = "pld"
    method: str = "dpsgd"
    method_params: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    noise_mechanism: str = "lattice"
    secure_noise: bool = False
    reproducible: bool = False

    def __post_init__(self) -> None:
        clipping.validate_clip_norm(self.l2_clip_norm)
        if not clipping.core.is_flat(self.l2_clip_norm) and self.method != "dpsgd":
            raise ValueError(f"DPConfig.method={self.method!r} takes one flat l2_clip_norm, not per-layer bounds.")
        _number("delta", self.delta, lo=0.0, hi=1.0)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "DPConfig needs exactly one of noise_multiplier (z > 0) and target_epsilon (calibrates z); got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}.")
        _number("noise_multiplier", self.noise_multiplier, lo=0.0, optional=True)
        _number("target_epsilon", self.target_epsilon, lo=0.0, optional=True)
        _choice("DPConfig.sampling", self.sampling, accounting.SAMPLING_SCHEMES)
        _choice("DPConfig.accountant", self.accountant, accounting.ACCOUNTANTS)
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError("DPConfig.accountant='pld' cannot count sampling='fixed' (dp-accounting's PLD "
                             "accountant has no event for sampling without replacement); use accountant='rdp'.")
        _choice("DPConfig.method", self.method, methods.METHODS)
        _choice("DPConfig.noise_mechanism", self.noise_mechanism, noise.MECHANISMS)
        if self.secure_noise and self.noise_mechanism == "lattice":
            raise ValueError("DPConfig.secure_noise=True draws float Gaussian noise; the lattice mechanism's noise is "
                             "integer (exact alias tables): use noise_mechanism='gaussian' with secure_noise.")
        for name in ("secure_noise", "reproducible"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DPConfig.{name}={getattr(self, name)!r} must be True or False.")
        params = dict(self.method_params or {})
        # Validates names and ranges with the methods' own checks (one owner for what a parameter allows).
        errors = methods.check_config(_MethodSection(self.method, float(jax.tree_util.tree_leaves(
            self.l2_clip_norm)[0]), params))
        if errors:
            raise ValueError(" ".join(e.replace("config.dp.", "DPConfig.") for e in errors))
        object.__setattr__(self, "method_params", types.MappingProxyType(params))


class _MethodSection(dict):
    """``config.dp``-shaped view of a DPConfig's method settings, for :func:`jaxdp.methods.check_config`."""

    def __init__(self, method: str, l2_clip_norm: float, params: Mapping[str, Any]) -> None:
        super().__init__(method=method, enabled=True, l2_clip_norm=l2_clip_norm, **{method: dict(params)})
        self.l2_clip_norm = l2_clip_norm
        self.enabled = True


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """Settings that change speed and memory only, never what is released (beyond float summation order).

    Attributes:
      clipping_strategy: ``"auto"`` (the fastest exact strategy for the model, :func:`jaxdp.clipping.
        resolve_strategy`) or one of :func:`jaxdp.clipping.available_strategies`.
      microbatch_size: per-example gradients of this many examples at a time (bounds memory; None: the chunk).
      physical_batch_size: the chunk width a step's batch is padded to (None: :func:`jaxdp.sampling.
        default_physical_batch_size`, which a Poisson batch exceeds with probability about 1%: it then takes
        several chunks, never a truncation).
      num_chunk_widths: 1, or 2 for a narrower second width (less padding, one more compiled step).
      strategy_options: keyword options of the clipping strategy.
    """

    clipping_strategy: str = "auto"
    microbatch_size: int | None = None
    physical_batch_size: int | None = None
    num_chunk_widths: int = 1
    strategy_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("ExecutionConfig.clipping_strategy", self.clipping_strategy, clipping.available_strategies())
        for name in ("microbatch_size", "physical_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                      or value < 1):
                raise ValueError(f"ExecutionConfig.{name}={value!r} must be None or an integer >= 1.")
        if self.num_chunk_widths not in (1, 2):
            raise ValueError(f"ExecutionConfig.num_chunk_widths={self.num_chunk_widths!r} must be 1 or 2.")
        object.__setattr__(self, "strategy_options", types.MappingProxyType(dict(self.strategy_options or {})))
