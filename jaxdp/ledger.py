"""The privacy ledger: the record of every DP-SGD step that ran, from which epsilon is computed at any time.

A step is recorded from the batch sampler that selected it (:class:`SamplerLike`), so the sampling scheme that
is accounted is always the one that ran; epsilon, the sampling schemes and the samplers' own delta are
:mod:`jaxdp.accounting`'s (whose names ``PrivacyLedger``, ``LedgerEntry`` and ``SamplerLike`` still resolve to
these).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import dp_accounting

from jaxdp import noise as _noise
from jaxdp.accounting import (
    DEFAULT_NUM_PARAMS,
    _check_accountant,
    _check_delta,
    _check_num_params,
    _check_steps,
    _check_supported,
    _neighboring_relation,
    _smallest_advice,
    _spend_sampler_deltas,
    combined_noise_multiplier,
    step_event,
    truncation_delta,
)


class SamplerLike(Protocol):
    """What the ledger reads from a batch sampler (see :mod:`jaxdp.sampling`)."""

    scheme: str
    sampling_prob: float
    dataset_size: int


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """A run of ``steps`` identical DP-SGD steps.

    ``noise_multiplier`` is the gradient's; ``extra_noise_multipliers`` those of the other sensitivity-1
    Gaussian releases each step makes on the same batch (none for plain DP-SGD). A step is accounted as one
    sampled Gaussian with :func:`~jaxdp.accounting.combined_noise_multiplier` of the two. ``mechanism``: the noise
    sampler that ran (``"gaussian"`` or ``"lattice"``), ``num_params``: the coordinates it noised per step (None:
    unknown, :data:`~jaxdp.accounting.DEFAULT_NUM_PARAMS`), for the sampler's own delta
    (:func:`jaxdp.accounting.epsilon`).
    """

    scheme: str
    sampling_prob: float
    noise_multiplier: float
    dataset_size: int
    steps: int
    extra_noise_multipliers: tuple[float, ...] = ()
    mechanism: str = "gaussian"
    num_params: int | None = None

    def same_step(self, other: LedgerEntry) -> bool:
        return dataclasses.replace(self, steps=0) == dataclasses.replace(other, steps=0)

    @property
    def effective_noise_multiplier(self) -> float:
        """The noise multiplier the step is accounted with (:func:`~jaxdp.accounting.combined_noise_multiplier`)."""
        return combined_noise_multiplier(self.noise_multiplier, self.extra_noise_multipliers)

    def step_event(self) -> dp_accounting.DpEvent:
        return step_event(self.scheme, self.sampling_prob, self.effective_noise_multiplier, self.dataset_size)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``extra_noise_multipliers``, ``mechanism`` and ``num_params`` only when they are not
        the defaults (plain DP-SGD's form is unchanged)."""
        out = dataclasses.asdict(self)
        out["extra_noise_multipliers"] = list(self.extra_noise_multipliers)
        for key, default in (("extra_noise_multipliers", []), ("mechanism", "gaussian"), ("num_params", None)):
            if out[key] == default:
                del out[key]
        return out

    @property
    def version(self) -> int:
        """The ledger format version this entry needs (see ``_LEDGER_VERSION``)."""
        if self.mechanism != "gaussian" or self.num_params is not None:
            return _LEDGER_VERSION_MECHANISM
        return _LEDGER_VERSION_EXTRA if self.extra_noise_multipliers else _LEDGER_VERSION


_LEDGER_FORMAT = "jaxdp.PrivacyLedger"
# Version 1: plain DP-SGD entries. Version 2 (written only when some entry has extra releases): entries may carry
# "extra_noise_multipliers". Version 3 (only when some entry names its "mechanism" or "num_params"). A jaxdp that
# reads only older versions refuses a newer ledger instead of silently dropping what it does not know (which would
# understate epsilon); this one reads all three.
_LEDGER_VERSION = 1
_LEDGER_VERSION_EXTRA = 2
_LEDGER_VERSION_MECHANISM = 3
_LEDGER_VERSIONS = (_LEDGER_VERSION, _LEDGER_VERSION_EXTRA, _LEDGER_VERSION_MECHANISM)


class PrivacyLedger:
    """The record of every DP-SGD step that ran, from which epsilon is computed at any time.

    Steps are recorded *from the sampler that selected the batches*, so the sampling scheme that is
    accounted is always the one that ran::

        ledger = PrivacyLedger()
        ledger.record(sampler, noise_multiplier=0.7)         # after each step (or steps=k at once)
        ledger.epsilon(delta=1e-6, accountant="pld")
        ledger.save("run/privacy_ledger.json"); PrivacyLedger.load("run/privacy_ledger.json") == ledger

    Consecutive identical steps are stored as one entry with a count, so 45,000 steps cost one entry and
    epsilon is computed by self-composition. Two ledgers are equal when their entries are.

    A step that releases more than the noised gradient on the same batch (DPSGD-F's noisy per-group counts,
    Global-Adapt's noisy count, :mod:`jaxdp.methods`) is recorded with those releases' noise multipliers, e.g.
    ``ledger.record(sampler, 0.7, extra_noise_multipliers=(10.0,))``, and accounted as one sampled Gaussian with
    :func:`~jaxdp.accounting.combined_noise_multiplier`: its epsilon is never below plain DP-SGD's at the same
    ``z``.
    """

    def __init__(self, entries: Sequence[LedgerEntry] = ()) -> None:
        self._entries: list[LedgerEntry] = []
        for entry in entries:
            self._append(entry)

    def _append(self, entry: LedgerEntry) -> None:
        if entry.steps == 0:
            return
        if self._entries and self._entries[-1].same_step(entry):
            last = self._entries[-1]
            self._entries[-1] = dataclasses.replace(last, steps=last.steps + entry.steps)
        else:
            self._entries.append(entry)

    def record(self, sampler: SamplerLike, noise_multiplier: float, steps: int = 1,
               extra_noise_multipliers: Sequence[float] = (), *, mechanism: str = "gaussian",
               num_params: int | None = None) -> None:
        """Records ``steps`` steps with batches from ``sampler`` and Gaussian noise ``noise_multiplier``.

        ``extra_noise_multipliers``: the noise multipliers of the other Gaussian releases each step makes on the
        same batch, each of L2 sensitivity 1 under add/remove (e.g. ``(10.0,)`` for DPSGD-F's noisy counts with
        sigma 10); the step is then accounted with :func:`~jaxdp.accounting.combined_noise_multiplier`.
        ``mechanism`` (the noise sampler, ``"gaussian"`` or ``"lattice"``) and ``num_params`` (all coordinates it
        noised per step: the gradient's and the counts') set the sampler's own delta
        (:func:`jaxdp.accounting.epsilon`).
        """
        try:
            scheme, q, n = sampler.scheme, sampler.sampling_prob, sampler.dataset_size
        except AttributeError as e:
            raise TypeError(
                f"record() takes the batch sampler that selected the batches (a jaxdp.sampling "
                f"PoissonSampler or ShuffledSampler), got {type(sampler).__name__}: {e}"
            ) from None
        steps = _check_steps(steps)
        extras = tuple(float(s) for s in extra_noise_multipliers)
        step_event(scheme, q, combined_noise_multiplier(noise_multiplier, extras), n)  # validates every field
        _noise.check_mechanism(mechanism)
        num_params = None if num_params is None else _check_num_params(num_params)
        if self._entries and self._entries[-1].scheme != scheme:
            _neighboring_relation({scheme, self._entries[-1].scheme})
        self._append(LedgerEntry(scheme, float(q), float(noise_multiplier), int(n), steps, extras, mechanism,
                                 num_params))

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(e.steps for e in self._entries)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp_accounting event of everything recorded, e.g. to hand to another accountant.

        One entry: ``SelfComposedDpEvent(step_event, steps)``; several: a ``ComposedDpEvent`` of those;
        none: ``NoOpDpEvent``. For "fixed" entries the Gaussian's noise multiplier is z/2 (replace-one
        sensitivity 2C, :mod:`jaxdp.accounting`'s docstring); use an accountant with
        ``NeighboringRelation.REPLACE_ONE``.
        """
        events = [dp_accounting.SelfComposedDpEvent(e.step_event(), e.steps) for e in self._entries]
        if not events:
            return dp_accounting.NoOpDpEvent()
        return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)

    def epsilon(
        self, delta: float, accountant: str = "pld", *, pld_value_discretization: float | None = None
    ) -> float:
        """Epsilon of all recorded steps at ``delta``; the scheme is the recorded one (see :mod:`jaxdp.accounting`)."""
        delta = _check_delta(delta)
        accountant = _check_accountant(accountant)
        if not self._entries:
            return 0.0
        neighboring = _neighboring_relation({e.scheme for e in self._entries})
        _check_supported(accountant, neighboring)
        truncation, lattice_draws = 0.0, 0
        for e in self._entries:
            d = DEFAULT_NUM_PARAMS if e.num_params is None else e.num_params
            if e.mechanism == "gaussian":
                truncation += truncation_delta(e.effective_noise_multiplier, e.sampling_prob, e.steps, num_params=d,
                                               sampling=e.scheme)
            else:
                lattice_draws += e.steps * d
        advice = ""
        if len(self._entries) == 1:
            e = self._entries[0]
            advice = _smallest_advice(truncation, e.sampling_prob, e.steps, delta, e.scheme,
                                      DEFAULT_NUM_PARAMS if e.num_params is None else e.num_params)
        return _spend_sampler_deltas(self.dp_event(), delta, accountant, neighboring, pld_value_discretization,
                                     min(1.0, truncation), lattice_draws, f"the ledger's {self.steps} steps", advice)

    # -- serialisation ------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _LEDGER_FORMAT,
                "version": max((e.version for e in self._entries), default=_LEDGER_VERSION),
                "entries": [e.to_dict() for e in self._entries],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _LEDGER_FORMAT:
            raise ValueError("Not a jaxdp privacy ledger (missing 'format': 'jaxdp.PrivacyLedger').")
        if data.get("version") not in _LEDGER_VERSIONS:
            raise ValueError(
                f"Privacy ledger version {data.get('version')!r} is not supported by this jaxdp "
                f"(reads versions {', '.join(map(str, _LEDGER_VERSIONS))})."
            )
        ledger = cls()
        for raw in data["entries"]:
            entry = LedgerEntry(
                scheme=str(raw["scheme"]),
                sampling_prob=float(raw["sampling_prob"]),
                noise_multiplier=float(raw["noise_multiplier"]),
                dataset_size=int(raw["dataset_size"]),
                steps=_check_steps(raw["steps"]),
                extra_noise_multipliers=tuple(float(x) for x in raw.get("extra_noise_multipliers", ())),
                mechanism=_noise.check_mechanism(str(raw.get("mechanism", "gaussian"))),
                num_params=None if raw.get("num_params") is None else _check_num_params(raw["num_params"]),
            )
            entry.step_event()  # validates
            ledger._append(entry)
        if ledger._entries:
            _neighboring_relation({e.scheme for e in ledger._entries})
        return ledger

    def save(self, path: str | os.PathLike) -> None:
        """Writes the ledger as JSON, atomically (a crash never leaves a half-written ledger)."""
        from jaxdp.runlog import write_atomic

        write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrivacyLedger:
        with open(path) as f:
            return cls.from_json(f.read())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivacyLedger) and self._entries == other._entries

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"PrivacyLedger({self._entries!r})"
