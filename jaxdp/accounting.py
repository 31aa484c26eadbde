"""Privacy accounting for DP-SGD: epsilon and noise calibration; the ledger of what actually ran builds on it
(:mod:`jaxdp.ledger`, its names re-exported here).

What happened and how it is counted are kept apart, as in Google's ``dp_accounting`` (on which this module
stands): every training step is a *DP event* fixed by the batch-selection scheme, the sampling probability
and the noise multiplier; an *accountant* turns the composition of those events into an (epsilon, delta)
guarantee.

The guarantee, per sampling scheme (C is the per-example L2 clip norm, z the noise multiplier, so the
noise added to the clipped sum is N(0, (z*C)^2) per coordinate):

* ``"poisson"`` — each example joins each step's batch independently with probability q. Neighbouring
  datasets differ by **adding or removing one example**; the clipped sum then moves by at most C, so each
  step is the Poisson-subsampled Gaussian mechanism with noise multiplier z
  (``PoissonSampledDpEvent(q, GaussianDpEvent(z))``). This is what the PLD and RDP accountants were built
  for, and what :class:`jaxdp.sampling.PoissonSampler` delivers.
* ``"fixed"`` — every step uses a batch of exactly ``b = q * dataset_size`` examples. The dataset size is
  public and neighbouring datasets differ by **replacing one example**; the clipped sum then moves by at
  most 2C, so the Gaussian event has noise multiplier z/2 relative to that sensitivity. It is accounted
  as sampling *without replacement*, independently at each step, of b out of dataset_size
  (``SampledWithoutReplacementDpEvent(dataset_size, b, GaussianDpEvent(z/2))``, Wang, Balle and
  Kasiviswanathan 2019, Theorem 27), which only the RDP accountants implement. dp_accounting 0.6.0 applies
  that theorem with the Gaussian event's noise multiplier taken relative to the replace-one sensitivity
  without doubling it (google/differential-privacy issue #378), hence the explicit z/2; a check refuses
  to run if an installed dp_accounting changes that convention.

  What this number does *not* cover: :class:`jaxdp.sampling.ShuffledSampler` (and the paper) draw a fresh
  permutation each epoch and cut it into batches, so each example is used exactly once per epoch. That is
  not independent sampling without replacement at each step, and no tight analysis of shuffle-and-iterate
  is known (Chua et al. 2024, "How Private are DP-SGD Implementations?", show shuffled batches can leak
  more than the Poisson analysis suggests); the ``"fixed"`` epsilon is the standard stand-in, not a proof
  about shuffled batches. Only Poisson sampling with ``"poisson"`` accounting gives a guarantee that
  matches the algorithm exactly.

  Expect large numbers: in the paper's setting (q = 32/24000, 45,000 steps, delta 1e-6) ``"fixed"`` with
  ``"rdp"`` gives 5.33 / 570 / 156,800 for z = 1.5 / 0.7 / 0.5, against 0.97 / 4.31 / 15.0 for
  ``"poisson"``: each step's Gaussian has sigma z/2 relative to the sensitivity, and the
  without-replacement bound grows like exp(4 / z^2) at small z.

Accountants:

* ``"pld"`` — dp_accounting's ``PLDAccountant`` (privacy loss distributions, the tightest of the three).
  Its discretisation is pessimistic, so the result is always an upper bound on the true epsilon; the
  interval is chosen per call from the RDP estimate (see :func:`pld_discretization`).
* ``"rdp"`` — dp_accounting's ``RdpAccountant`` with its default orders (1.1 ... 1024) and its improved
  RDP-to-DP conversion (Canonne, Kamath, Steinke 2020, Prop. 12).
* ``"rdp_classic"`` — RDP at :data:`PAPER_RDP_ORDERS` converted with the classic
  ``eps = min_alpha [RDP(alpha) + log(1/delta) / (alpha - 1)]`` (Mironov 2017, Prop. 3): the computation
  behind the published 1.15 / 4.98 / 16.2 of Farrand et al. 2020, kept so results can be compared. It
  gives 1.1470 / 4.9803 / 16.2574 for z = 1.5 / 0.7 / 0.5 (``mechanism=None``, below): the paper's numbers
  rounded to two decimals, the last printed as 16.2 rather than 16.26 (or 16.3).

What the samplers add. The accountants describe the ideal Gaussian mechanism; jaxdp's noise comes from a sampler,
whose own delta is spent out of the configured one, so the reported (epsilon, delta) covers what ran (``mechanism``
of :func:`epsilon`, :func:`calibrate_noise` and :meth:`PrivacyLedger.record`):

* ``"gaussian"`` (:func:`jaxdp.noise.gaussian`): its draws end at 9.155 standard deviations; an output beyond
  what the neighbouring dataset can produce reveals membership. :func:`truncation_delta` bounds that
  probability (about ``steps * q * Phi(-(9.155 - 1/z))``, plus ``1e-19`` per noised coordinate and step); epsilon
  is computed at ``delta - delta_trunc`` and refused (:class:`SamplerDeltaError`, naming the smallest noise
  multiplier allowed) when ``delta_trunc >= delta / 2``: z < 0.285 in the paper's setting. What it does not
  cover: the float32 rounding of the release (holes in the output's support, :mod:`jaxdp.lattice`) and the
  sampler's other deviations from N(0, 1) (:func:`jaxdp.noise.gaussian`).
* ``"lattice"`` (:mod:`jaxdp.lattice`): the output is a post-processing of a Gaussian mechanism's up to a total
  variation of ``jaxdp.lattice.TV_PER_DRAW`` per draw; :func:`lattice_delta` (``(1 + e^epsilon) n tau``) is
  spent the same way. It has no truncation term, and it is a proof, under the assumptions stated there.
* ``None``: the ideal mechanism, to compare with published analyses and other libraries.

Both terms grow with the coordinates noised per step (``num_params``); unknown, they are taken as the largest
draw jaxdp makes (:data:`DEFAULT_NUM_PARAMS`), which is conservative.

Example::

    >>> from jaxdp import accounting
    >>> round(accounting.epsilon(0.7, 32 / 24_000, 45_000, 1e-6, accountant="rdp_classic", mechanism=None), 2)
    4.98
    >>> round(accounting.epsilon(0.7, 32 / 24_000, 45_000, 1e-6, accountant="rdp_classic",
    ...                          num_params=11_200_000), 2)
    4.98
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from scipy import special

from jaxdp import lattice, threefry
from jaxdp import noise as _noise


class _DropNonConvergedOrders(logging.Filter):
    """Drops dp_accounting's per-order "_compute_log_a_frac failed to converge" warnings.

    At large sampling rates and small noise, the RDP series for some fractional orders does not converge and
    dp_accounting excludes those orders from the minimum over orders. Excluding orders can only make the
    reported epsilon larger (a valid, more conservative bound), so the warning carries no risk; printed once
    per order per epsilon evaluation, it buried training logs under hundreds of identical lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNonConvergedOrders())

ACCOUNTANTS = ("pld", "rdp", "rdp_classic")
SAMPLING_SCHEMES = ("poisson", "fixed")

# The RDP orders of Opacus <= 0.x (`DEFAULT_ALPHAS`), with which the paper's epsilons were computed.
PAPER_RDP_ORDERS: tuple[float, ...] = (
    (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5)
    + tuple(float(a) for a in range(5, 64))
    + (128.0, 256.0, 512.0)
)

_NEIGHBORING = {
    "poisson": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "fixed": dp_accounting.NeighboringRelation.REPLACE_ONE,
}

# PLD value-discretisation grid: finer is tighter but slower (time grows roughly as epsilon / interval).
_PLD_FINEST = 1e-4
_PLD_COARSEST = 1e-3
_PLD_STEPS_PER_EPSILON = 10_000


# ----------------------------------------------------------------------------------------------------
# Validation


def _check_noise_multiplier(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} is not allowed: it must be a finite number > 0 (the "
            "noise standard deviation divided by l2_clip_norm). Training without noise has no finite "
            "epsilon; turn DP off (config.dp.enabled = False) instead of setting the noise to 0."
        )
    return z


def _check_sampling_prob(sampling_prob: float) -> float:
    q = float(sampling_prob)
    if not (0 < q <= 1):
        raise ValueError(
            f"sampling_prob={sampling_prob!r} is outside (0, 1]: it is the probability that one example "
            "is in a step's batch, i.e. expected batch size / dataset size (e.g. 32 / 24000)."
        )
    return q


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not (0 < d < 1):
        raise ValueError(
            f"delta={delta!r} is outside (0, 1); use a value well below 1 / dataset size, e.g. 1e-6 "
            "for 24,000 training examples."
        )
    return d


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(f"steps={steps!r} must be a whole number of training steps (>= 0).")
    if steps < 0:
        raise ValueError(f"steps={steps!r} is negative; the number of training steps must be >= 0.")
    return int(steps)


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is unknown; choose one of {ACCOUNTANTS}.")
    return accountant


def _check_scheme(sampling: str) -> str:
    if sampling not in SAMPLING_SCHEMES:
        raise ValueError(
            f"sampling={sampling!r} is unknown; choose 'poisson' (each example independently with "
            "probability sampling_prob) or 'fixed' (batches of exactly sampling_prob * dataset_size)."
        )
    return sampling


def _fixed_batch_size(sampling_prob: float, dataset_size: int | None) -> int:
    """The batch size of a fixed-size scheme; sampling_prob * dataset_size must be a whole number."""
    if dataset_size is None:
        raise ValueError(
            "sampling='fixed' needs dataset_size (the number of training examples, which is public "
            "under the replace-one relation): pass e.g. dataset_size=24000."
        )
    if isinstance(dataset_size, bool) or int(dataset_size) != dataset_size or dataset_size < 1:
        raise ValueError(f"dataset_size={dataset_size!r} must be a whole number >= 1.")
    batch = sampling_prob * dataset_size
    batch_size = round(batch)
    if batch_size < 1 or abs(batch - batch_size) > 1e-6 * max(1.0, batch):
        raise ValueError(
            f"sampling='fixed' needs sampling_prob * dataset_size to be a whole batch size, got "
            f"{sampling_prob!r} * {dataset_size} = {batch!r}; pass sampling_prob=batch_size/dataset_size."
        )
    return batch_size


# ----------------------------------------------------------------------------------------------------
# Events


def step_event(
    sampling: str, sampling_prob: float, noise_multiplier: float, dataset_size: int | None = None
) -> dp_accounting.DpEvent:
    """The dp_accounting event of one DP-SGD step (see the module docstring for the guarantee).

    ``"poisson"``: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (add-or-remove-one neighbours).
    ``"fixed"``: ``SampledWithoutReplacementDpEvent(n, q*n, GaussianDpEvent(z/2))`` (replace-one neighbours;
    z/2 because the replace-one sensitivity of the clipped sum is 2C).
    """
    sampling = _check_scheme(sampling)
    q = _check_sampling_prob(sampling_prob)
    z = _check_noise_multiplier(noise_multiplier)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    batch_size = _fixed_batch_size(q, dataset_size)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        int(dataset_size), batch_size, dp_accounting.GaussianDpEvent(z / 2)
    )


@functools.cache
def _check_replace_one_convention() -> None:
    # Under replace-one, a Gaussian with noise multiplier 1 relative to the sensitivity has RDP
    # alpha / 2 = 1 at alpha = 2. dp_accounting 0.6.0 computes exactly that from GaussianDpEvent(1.0); if
    # a later version doubles the sensitivity itself (it would return 4), our z/2 would count it twice.
    acc = dp_accounting.rdp.RdpAccountant([2.0], dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(4, 4, dp_accounting.GaussianDpEvent(1.0)))
    if not math.isclose(float(acc.rdp[0]), 1.0, rel_tol=1e-9):
        raise RuntimeError(
            f"The installed dp_accounting ({getattr(dp_accounting, '__version__', '?')}) changed how it "
            "treats the Gaussian sensitivity under REPLACE_ONE (google/differential-privacy#378): RDP at "
            f"order 2 of GaussianDpEvent(1.0) is {acc.rdp[0]}, expected 1.0. jaxdp.accounting.step_event "
            "must be updated before fixed-size accounting can be trusted; pin dp-accounting==0.6.0."
        )


def _neighboring_relation(schemes: set[str]) -> dp_accounting.NeighboringRelation:
    if len(schemes) > 1:
        raise ValueError(
            f"The ledger mixes sampling schemes {sorted(schemes)}, whose guarantees hold under different "
            "neighbouring relations (add-or-remove vs replace-one); account for one scheme per run."
        )
    (scheme,) = schemes
    if scheme == "fixed":
        _check_replace_one_convention()
    return _NEIGHBORING[scheme]


# ----------------------------------------------------------------------------------------------------
# Accountants


def pld_discretization(rdp_epsilon: float) -> float:
    """The PLD value-discretisation interval used for an event whose RDP epsilon is ``rdp_epsilon``.

    epsilon / 10,000, rounded down to 1, 2 or 5 times a power of ten and clipped to [1e-4, 1e-3]. The
    PLD's size, hence its cost, grows with epsilon / interval, so scaling the interval with epsilon keeps
    the cost bounded while the error stays a small fraction of epsilon. Discretisation is pessimistic in
    dp_accounting, so any interval gives an upper bound. Paper setting (q = 32/24000, 45,000 steps,
    delta 1e-6), this choice vs a fixed 1e-4: z=1.5: 0.8948 (same interval); z=0.7: 3.7818 vs 3.7811;
    z=0.5: 13.4363 vs 13.4274.
    """
    if not math.isfinite(rdp_epsilon):
        return _PLD_COARSEST
    target = rdp_epsilon / _PLD_STEPS_PER_EPSILON
    grid = [m * 10.0**e for e in range(-4, -2) for m in (1, 2, 5)] + [_PLD_COARSEST]
    below = [g for g in grid if g <= target * (1 + 1e-9)]
    return max(_PLD_FINEST, min(_PLD_COARSEST, below[-1] if below else _PLD_FINEST))


def _rdp_classic_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    eps = rdp + math.log(1 / delta) / (orders - 1)
    return float(max(0.0, np.min(eps)))


def _check_supported(accountant: str, neighboring: dp_accounting.NeighboringRelation) -> None:
    if accountant == "pld" and neighboring != dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE:
        raise ValueError(
            "accountant='pld' cannot account for sampling='fixed' (dp_accounting's PLD accountant has no "
            "sampling-without-replacement event); use accountant='rdp' (or 'rdp_classic' to compare with "
            "published numbers) for fixed-size batches, or Poisson sampling with accountant='pld'."
        )


# Epsilons already computed in this process, by the event's full description: a sweep's runs at one privacy level
# and dataset size have identical ledgers at every evaluation (PLD costs up to a second or two per call).
_EPSILON_CACHE: dict[tuple, float] = {}


def _event_epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: str,
    neighboring: dp_accounting.NeighboringRelation,
    pld_value_discretization: float | None = None,
) -> float:
    key = (repr(event), float(delta), accountant, neighboring.name, pld_value_discretization)
    if key not in _EPSILON_CACHE:
        if len(_EPSILON_CACHE) > 4096:
            _EPSILON_CACHE.clear()
        _EPSILON_CACHE[key] = _compute_event_epsilon(event, delta, accountant, neighboring, pld_value_discretization)
    return _EPSILON_CACHE[key]


def _compute_event_epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: str,
    neighboring: dp_accounting.NeighboringRelation,
    pld_value_discretization: float | None,
) -> float:
    if accountant == "rdp_classic":
        acc = dp_accounting.rdp.RdpAccountant(list(PAPER_RDP_ORDERS), neighboring)
        acc.compose(event)
        return _rdp_classic_epsilon(acc.rdp, acc.orders, delta)
    _check_supported(accountant, neighboring)
    rdp_acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=neighboring)
    rdp_acc.compose(event)
    rdp_eps = float(rdp_acc.get_epsilon(delta))
    if accountant == "rdp":
        return rdp_eps
    interval = pld_value_discretization or pld_discretization(rdp_eps)
    pld = dp_accounting.pld.PLDAccountant(neighboring, value_discretization_interval=interval)
    pld.compose(event)
    return float(pld.get_epsilon(delta))


# ----------------------------------------------------------------------------------------------------
# What the samplers add to delta


class SamplerDeltaError(ValueError):
    """The noise sampler's own delta (tails, total variation) would take half of delta or more."""


MECHANISMS = _noise.MECHANISMS
# Coordinates noised per step when the caller does not say: the largest draw jaxdp makes (one counter word).
DEFAULT_NUM_PARAMS = threefry.MAX_DRAW - 1


@functools.cache
def _gaussian_tail_constants() -> tuple[float, float, float, float]:
    """``(T_low, T2, c, per_coordinate)`` for :func:`truncation_delta` (see there)."""
    rho = _noise.QUANTILE_RELATIVE_ERROR
    top = -float(special.ndtri(_noise.TAIL_PROBABILITY_GRID / 2))  # Q(2^-65) = 9.1554
    t_low = top * (1 - rho)
    c = 1 / (1 + rho)
    t2 = c * t_low
    y0 = (t2 - math.sqrt(t2 * t2 - 4)) / 2  # below it, Phi(-(t2 - sqrt(t))) is not convex in t
    per_coordinate = (1 + 2 * _noise.UNIFORM_RELATIVE_ERROR) * special.ndtr(y0 - t2) + _noise.TAIL_PROBABILITY_GRID / 2
    return t_low, t2, c, per_coordinate


def _truncation_per_step(noise_multiplier: float, sampling: str, num_params: int) -> float:
    t_low, t2, c, per_coordinate = _gaussian_tail_constants()
    shift = (2.0 if sampling == "fixed" else 1.0) / noise_multiplier  # sensitivity / std: 1/z, 2/z replace-one
    if c * shift >= t2 - (t2 - math.sqrt(t2 * t2 - 4)) / 2:
        return 1.0  # beyond the convex range: the shift reaches the sampler's end, nothing is bounded
    head = (1 + 2 * _noise.UNIFORM_RELATIVE_ERROR) * special.ndtr(c * shift - t2)
    return min(1.0, head + num_params * per_coordinate)


def truncation_delta(noise_multiplier: float, sampling_prob: float, steps: int, *, num_params: int | None = None,
                     sampling: str = "poisson") -> float:
    """The delta that the end of :func:`jaxdp.noise.gaussian`'s support costs ``steps`` Gaussian-mechanism steps.

    The sampler's values end at ``T = Q(2^-65) = 9.155`` standard deviations (each tail's probabilities are
    multiples of ``2^-64``). When the example that tells the datasets apart is in the batch (probability ``q``)
    and shifts coordinate ``j`` by ``x_j`` standard deviations, an output beyond ``T - x_j`` there is impossible
    under the neighbouring dataset: membership revealed, which the Gaussian accountant's delta does not cover.
    Per step its probability is at most ``q`` times

        ``(1 + 2^-23) Phi(-(T2 - a)) + d ((1 + 2^-23) Phi(-(T2 - y0)) + 2^-65)``

    with ``a = (1 + rho)^-1 / noise_multiplier`` (``2 /`` for replace-one) the largest shift of all coordinates
    together, ``T2 = T (1 - rho) / (1 + rho)`` (``rho = 4e-7``, the quantile's tested relative error),
    ``y0 = 1/T2`` nearly, and ``d`` the coordinates noised per step: ``P(N > t) <= (1 + 2^-23) Phi(-t / (1 +
    rho)) + 2^-65`` for the sampler, and ``sum_j Phi(-(T2 - y_j))`` over ``sum_j y_j^2 <= a^2`` is at most
    ``d Phi(-(T2 - y0)) + Phi(-(T2 - a))`` because ``Phi(-(T2 - sqrt(t)))`` is convex in ``t`` above ``y0^2``
    (a chord bound). The steps add (a union bound). ``noise_multiplier`` is the step's combined one
    (:func:`combined_noise_multiplier`: the gradient and the method's counts), ``num_params`` all the noised
    coordinates of a step (default :data:`DEFAULT_NUM_PARAMS`, the largest draw, about ``4e-10`` per step).

    The lattice mechanism (:mod:`jaxdp.lattice`) has no such term: its integer noise reaches 12.5 standard
    deviations and the mass beyond is in its total variation (:func:`lattice_delta`).

    >>> f"{truncation_delta(0.25, 32 / 24_000, 45_000, num_params=11_200_000):.3g}"   # the paper, z = 0.25
    '7.6e-06'
    """
    z = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    sampling = _check_scheme(sampling)
    d = DEFAULT_NUM_PARAMS if num_params is None else _check_num_params(num_params)
    return min(1.0, steps * q * _truncation_per_step(z, sampling, d))


def lattice_delta(epsilon: float, steps: int, *, num_params: int | None = None) -> float:
    """``(1 + e^epsilon) n tau``: what the lattice sampler's distance from its ideal costs delta over a run.

    ``tau`` = :data:`jaxdp.lattice.TV_PER_DRAW` (total variation of one integer draw from ``round(N(0,
    sigma^2))``) and ``n = steps * num_params`` draws. Coupling every draw with an ideal one, the real run's
    output equals the ideal run's except with probability ``n tau``; so if the ideal run is (epsilon,
    delta)-DP, the real one is (epsilon, delta + (1 + e^epsilon) n tau)-DP. Negligible up to epsilon of about 30.

    >>> f"{lattice_delta(4.0, 45_000, num_params=11_200_000):.2g}"
    '4.7e-21'
    """
    draws = _check_steps(steps) * (DEFAULT_NUM_PARAMS if num_params is None else _check_num_params(num_params))
    growth = math.exp(epsilon) if epsilon < 700 else math.inf
    return (1 + growth) * draws * lattice.TV_PER_DRAW


def _check_num_params(num_params: int) -> int:
    if isinstance(num_params, bool) or int(num_params) != num_params or not 0 <= num_params <= DEFAULT_NUM_PARAMS:
        raise ValueError(f"num_params={num_params!r} must be the number of noised coordinates per step, a whole "
                         f"number in [0, {DEFAULT_NUM_PARAMS}].")
    return int(num_params)


def _smallest_noise_multiplier(sampling_prob: float, steps: int, delta: float, sampling: str, num_params: int) -> float:
    """The smallest z (to 1e-4) whose truncation delta is below delta / 2, or inf."""
    def fits(z):
        return steps * sampling_prob * _truncation_per_step(z, sampling, num_params) < delta / 2
    lo, hi = 1e-3, 1e3
    if not fits(hi):
        return math.inf
    while hi - lo > 1e-4 * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _smallest_advice(truncation: float, q: float, steps: int, delta: float, sampling: str, num_params: int) -> str:
    if truncation < delta / 2:
        return ""
    smallest = _smallest_noise_multiplier(q, steps, delta, sampling, num_params)
    if not math.isfinite(smallest):
        return "No noise multiplier is large enough at this many coordinates. "
    return f"The smallest noise multiplier allowed here is {smallest:.4g}. "


def _spend_sampler_deltas(event: dp_accounting.DpEvent, delta: float, accountant: str,
                          neighboring: dp_accounting.NeighboringRelation, pld_value_discretization: float | None,
                          truncation: float, lattice_draws: int, run: str, advice: str = "") -> float:
    """Epsilon at ``delta`` minus the samplers' deltas, so that the total stays ``delta``; refuses when they take
    half of it or more (``run`` says which run, ``advice`` what to do)."""
    if truncation >= delta / 2:
        raise SamplerDeltaError(
            f"{run}: the Gaussian sampler's draws end at 9.155 standard deviations, and an output beyond what the "
            f"neighbouring dataset can produce costs delta_trunc = {truncation:.3g} (jaxdp.accounting."
            f"truncation_delta), at least half of delta = {delta:g}. {advice}Raise the noise, take fewer steps or "
            "a smaller sampling rate, or pass num_params if it was left at its conservative default.")
    rest = delta - truncation
    if not lattice_draws:
        return _event_epsilon(event, rest, accountant, neighboring, pld_value_discretization)
    bound = _event_epsilon(event, rest / 2, "rdp" if accountant == "pld" else accountant, neighboring)
    for _ in range(3):  # bound >= the epsilon reported, so (1 + e^eps) n tau <= lattice
        lattice_cost = (1 + (math.exp(bound) if bound < 700 else math.inf)) * lattice_draws * lattice.TV_PER_DRAW
        if lattice_cost >= rest / 2:
            raise SamplerDeltaError(
                f"{run}: the lattice sampler's distance from the ideal rounded Gaussian (total variation "
                f"{lattice.TV_PER_DRAW:.2g} per draw, {lattice_draws:.3g} draws) costs (1 + e^{bound:.3g}) * "
                f"{lattice_draws * lattice.TV_PER_DRAW:.3g} = {lattice_cost:.3g}, at least half of the delta left "
                f"({rest:g}): an epsilon this large cannot be certified with it; add noise, or use "
                "noise_mechanism='gaussian' (float noise, whose output support has holes: docs/threat-model.md).")
        eps = _event_epsilon(event, rest - lattice_cost, accountant, neighboring, pld_value_discretization)
        if eps <= bound:
            return eps
        bound = eps
    raise AssertionError("the lattice delta did not settle")


def epsilon(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
    *,
    pld_value_discretization: float | None = None,
    mechanism: str | None = "gaussian",
    num_params: int | None = None,
) -> float:
    """The epsilon of ``steps`` DP-SGD steps at the given delta (an upper bound for every accountant).

    Args:
      noise_multiplier: z > 0; the noise std on the clipped sum is z * l2_clip_norm.
      sampling_prob: q in (0, 1]: expected batch size / dataset size ("poisson"), or batch size /
        dataset size ("fixed").
      steps: number of steps >= 0 (0 steps -> 0.0).
      delta: in (0, 1).
      accountant: "pld" | "rdp" | "rdp_classic" (module docstring). "pld" refuses sampling="fixed".
      sampling: "poisson" (add-or-remove-one neighbours) | "fixed" (replace-one neighbours; accounted as
        independent sampling without replacement each step — see the module docstring for what that
        does and does not cover for shuffled batches).
      dataset_size: number of training examples; required for sampling="fixed".
      pld_value_discretization: override :func:`pld_discretization` (smaller is tighter and slower).
      mechanism: the noise sampler that ran, whose own delta is spent out of ``delta`` (so the total stays
        ``delta``): ``"gaussian"`` (:func:`jaxdp.noise.gaussian`, whose tails end at 9.155 standard deviations:
        :func:`truncation_delta`; refused with :class:`SamplerDeltaError`, naming the smallest noise multiplier
        allowed, when that is half of ``delta`` or more), ``"lattice"`` (:mod:`jaxdp.lattice`:
        :func:`lattice_delta`), or None: the ideal Gaussian mechanism, as in published analyses (the paper's
        numbers, other libraries).
      num_params: the coordinates noised per step (the model's parameters, plus a method's counts), for the
        samplers' deltas; default :data:`DEFAULT_NUM_PARAMS` (the largest draw: conservative).

    The cost does not grow with ``steps`` (the steps are one self-composed event).
    """
    z = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    sampling = _check_scheme(sampling)
    event = step_event(sampling, q, z, dataset_size)
    neighboring = _neighboring_relation({sampling})
    _check_supported(accountant, neighboring)
    if mechanism is not None:
        _noise.check_mechanism(mechanism)
    d = DEFAULT_NUM_PARAMS if num_params is None else _check_num_params(num_params)
    if steps == 0:
        return 0.0
    truncation = truncation_delta(z, q, steps, num_params=d, sampling=sampling) if mechanism == "gaussian" else 0.0
    run = f"noise_multiplier={z} (q={q:.4g}, {steps} steps, {d} coordinates noised per step)"
    return _spend_sampler_deltas(
        dp_accounting.SelfComposedDpEvent(event, steps), delta, accountant, neighboring, pld_value_discretization,
        truncation, steps * d if mechanism == "lattice" else 0, run, _smallest_advice(truncation, q, steps, delta,
                                                                                       sampling, d))


def calibrate_noise(
    target_epsilon: float,
    sampling_prob: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
    tol: float = 1e-3,
    *,
    max_noise_multiplier: float = 1000.0,
    pld_value_discretization: float | None = None,
    mechanism: str | None = "gaussian",
    num_params: int | None = None,
) -> float:
    """The smallest noise multiplier z (to relative tolerance ``tol``) with epsilon(z) <= target_epsilon.

    Bisection on z between a value whose epsilon exceeds the target and one that meets it. The returned
    z always satisfies ``epsilon(z, ...) <= target_epsilon`` exactly as computed by :func:`epsilon` with
    the same arguments (``pld_value_discretization``, ``mechanism`` and ``num_params`` included), and
    z * (1 - tol) does not. Raises if even ``max_noise_multiplier`` does not reach the target, and
    :class:`SamplerDeltaError` if the target needs less noise than the sampler allows (:func:`epsilon`).

    For the paper setting (target 4.98, q = 32/24000, 45,000 steps, delta 1e-6) it gives z = 0.70044
    (rdp_classic), 0.66938 (rdp) and 0.64448 (pld).
    """
    # A pure function of its arguments, and seconds of PLD work per call: a sweep calibrating many runs of one
    # setting (every female fraction and seed of a privacy level) computes it once per process.
    key = tuple(repr(a) for a in (target_epsilon, sampling_prob, steps, delta, accountant, sampling, dataset_size,
                                  tol, max_noise_multiplier, pld_value_discretization, mechanism, num_params))
    if key not in _CALIBRATION_CACHE:
        if len(_CALIBRATION_CACHE) > 1024:
            _CALIBRATION_CACHE.clear()
        _CALIBRATION_CACHE[key] = _calibrate_noise(
            target_epsilon, sampling_prob, steps, delta, accountant, sampling, dataset_size, tol,
            max_noise_multiplier=max_noise_multiplier, pld_value_discretization=pld_value_discretization,
            mechanism=mechanism, num_params=num_params)
    return _CALIBRATION_CACHE[key]


_CALIBRATION_CACHE: dict[tuple[str, ...], float] = {}


def _calibrate_noise(target_epsilon: float, sampling_prob: float, steps: int, delta: float, accountant: str,
                     sampling: str, dataset_size: int | None, tol: float, *, max_noise_multiplier: float,
                     pld_value_discretization: float | None, mechanism: str | None,
                     num_params: int | None) -> float:
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be a finite number > 0.")
    if not (0 < tol < 1):
        raise ValueError(f"tol={tol!r} is the relative tolerance on the noise multiplier; use (0, 1).")
    _check_steps(steps)
    if steps == 0:
        raise ValueError("steps=0 spends no privacy; there is no noise multiplier to calibrate.")

    refused: dict[float, SamplerDeltaError] = {}

    def eps(z: float, mechanism: str | None = mechanism) -> float:
        try:
            return epsilon(z, sampling_prob, steps, delta, accountant, sampling, dataset_size,
                           pld_value_discretization=pld_value_discretization, mechanism=mechanism,
                           num_params=num_params)
        except SamplerDeltaError as e:  # less noise than the sampler allows: as if epsilon were infinite
            refused[z] = e
            return math.inf

    hi = 1.0
    while eps(hi) > target:
        if hi >= max_noise_multiplier:
            raise ValueError(
                f"target_epsilon={target} is not reachable with noise_multiplier <= "
                f"{max_noise_multiplier} (q={sampling_prob}, steps={steps}, delta={delta}, "
                f"{accountant}/{sampling}); raise target_epsilon or lower steps or sampling_prob."
            )
        hi = min(2 * hi, max_noise_multiplier)
    lo = hi / 2
    while eps(lo) <= target:
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            # Epsilon is still <= target with almost no noise, which only happens for huge targets.
            return hi
    while hi - lo > tol * hi:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    if lo in refused and eps(lo, None) <= target:
        # The sampler, not the target, bounded the search: a silently noisier run would misreport the target.
        raise SamplerDeltaError(
            f"target_epsilon={target} needs less noise than the {mechanism} sampler allows: {refused[lo]} The "
            f"smallest noise multiplier it allows here is about {hi:.4g}, whose epsilon is {eps(hi):.4g}; lower "
            "target_epsilon to that, or take fewer steps or a smaller sampling rate.")
    return hi


# ----------------------------------------------------------------------------------------------------
# Several Gaussian releases on one batch


def combined_noise_multiplier(noise_multiplier: float, extra_noise_multipliers: Sequence[float] = ()) -> float:
    """The noise multiplier of one Gaussian mechanism equivalent to several released on the same batch.

    A DP-SGD step may release, besides the noised gradient sum (noise multiplier ``z`` relative to its L2
    sensitivity), other statistics of the *same* sampled batch, each with Gaussian noise of standard deviation
    ``sigma_j`` and L2 sensitivity 1 (e.g. DPSGD-F's per-group counts, :mod:`jaxdp.methods`). Divide each output
    by its noise's standard deviation and concatenate: the result is one Gaussian mechanism with unit noise whose
    L2 sensitivity (add or remove one example) is at most ``sqrt(z^-2 + sum_j sigma_j^-2)``. So the step is the
    sampled Gaussian mechanism with noise multiplier

        z_eff = (z^-2 + sum_j sigma_j^-2)^(-1/2)  <  min(z, sigma_j),

    and counting it so is never more optimistic than DP-SGD alone (``z_eff < z``). Under replace-one neighbours
    (``"fixed"``) every part's sensitivity at most doubles, so :func:`step_event`'s ``z/2`` convention stays valid
    for ``z_eff``.

    >>> round(combined_noise_multiplier(0.7, (10.0,)), 6)   # (0.7^-2 + 10^-2)^-1/2
    0.698291
    >>> combined_noise_multiplier(0.7)
    0.7
    """
    z = _check_noise_multiplier(noise_multiplier)
    extras = tuple(_check_noise_multiplier(s) for s in extra_noise_multipliers)
    if not extras:
        return z
    return float(1.0 / math.sqrt(z**-2 + sum(s**-2 for s in extras)))


# The ledger (:mod:`jaxdp.ledger`) builds on this module, so its names are re-exported on first access rather than
# imported here (that import would be a cycle).
_LEDGER_NAMES = ("LedgerEntry", "PrivacyLedger", "SamplerLike")


def __getattr__(name: str) -> object:
    if name in _LEDGER_NAMES:
        from jaxdp import ledger

        value = getattr(ledger, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jaxdp.accounting' has no attribute {name!r}")
