"""Empirical privacy per group: membership inference and a one-run privacy audit.

Two different questions, answered by two different kinds of number:

* **One-run audit: an empirical lower bound on ε.** ``epsilon_lower_bound_g`` is a number L such that, with
  probability at least ``confidence`` (95%) over the canaries' coins, the training procedure of this run is *not*
  (ε, δ)-DP for any ε < L, at the run's δ, with respect to including or excluding one canary of group g. It is a
  statement about the whole training procedure (sampling, clipping, noise, everything jaxdp did), checked on this
  one run, in the style of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
  2023, arXiv:2305.08846). Since the reported ε is an *upper* bound for the same procedure, **a lower bound above
  the reported ε means a bug** in jaxdp's mechanism or its accounting (or, with probability at most 5%, bad luck).
  A lower bound far below the reported ε is expected and proves nothing: the attack here is weak (the loss of
  each canary, a training image with its label flipped by default, under the final model), and one run with m
  canaries cannot show more than about ``logit((1 - confidence) ** (1 / k))`` with k guesses
  (``max_epsilon_lower_bound``).

  Neighbouring relation: flipping one canary's coin must turn the training input into a neighbour in the sense
  of the reported ε. Under Poisson sampling (add-or-remove-one) a canary that is "out" is simply absent; under
  fixed-size batches (replace-one) an "out" canary must be replaced by another example so that the dataset size
  does not depend on the coins.

* **Membership inference: average-case leakage per group.** ``mia_auc_g`` is how well a simple attacker
  separates members of group g (training examples) from non-members of the same group (held-out examples, never
  trained on), by the loss-threshold attack (Yeom, Giacomelli, Fredrikson and Jha, "Privacy Risk in Machine
  Learning", CSF 2018: score = -loss) and its per-example-calibrated variant (Watson, Guo, Cormode and
  Sablayrolles, "On the Importance of Difficulty Calibration in Membership Inference Attacks", ICLR 2022:
  score = -(loss under the trained model - loss under a reference model), e.g. the initial model). AUC 0.5 is
  chance. These are *measurements* of how much a given attack learns on average, not privacy guarantees: a low AUC
  does not mean that no example is exposed, and an AUC above 0.5 under DP does not contradict ε. TPR at a low FPR
  looks at the most exposed examples (Carlini et al., "Membership Inference Attacks From First Principles", S&P
  2022, argue it is the number that matters).

Everything here is plain NumPy/SciPy on arrays the trainer hands over: per-example losses under the trained and
the reference model, group ids, membership truth, and the canaries' coins. Groups are 0 and 1 as in
``jaxdp.fairness`` (by default 0 = female, the majority, and 1 = male, the minority; the data's
``group_attribute`` names them otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import special, stats

from jaxdp.fairness import GROUPS, proportion_ci

DEFAULT_CONFIDENCE = 0.95  # of every bound and interval here unless given; config.audit.confidence sets a run's
DEFAULT_FPRS = (0.01, 0.001)
# Fraction of a group's canaries guessed "in" (highest scores) and, separately, "out" (lowest scores): 10% of the
# canaries guessed, 90% abstained on. A choice made before training, as validity requires; see one_run_audit.
DEFAULT_GUESS_FRACTION = 0.05
_BISECTION_STEPS = 200
_EPSILON_TOLERANCE = 1e-10


# --- the one-run bound ------------------------------------------------------------------------------------------


def _as_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float | np.floating) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a whole number, got {value!r}.")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def _check_bound_inputs(
    num_guesses: Any, num_correct: Any, delta: float, num_canaries: Any | None
) -> tuple[int, int, float, int | None]:
    k = _as_count("num_guesses", num_guesses)
    v = _as_count("num_correct", num_correct)
    if v > k:
        raise ValueError(f"num_correct ({v}) cannot exceed num_guesses ({k}).")
    delta = float(delta)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), e.g. the run's 1e-6; got {delta!r}.")
    m = None
    if num_canaries is not None:
        m = _as_count("num_canaries", num_canaries)
        if k > m:
            raise ValueError(f"num_guesses ({k}) cannot exceed num_canaries ({m}): each guess is about one canary.")
    if delta > 0 and m is None:
        raise ValueError(
            "with delta > 0 the bound depends on the number of canaries m (the term 2*m*delta of Steinke et al.'s "
            "Theorem 3.1): pass num_canaries=m, all the canaries of the audit, abstentions included."
        )
    return k, v, delta, m


def _one_run_p_value(k: int, v: int, epsilon: float, delta: float, m: int | None) -> float:
    if v == 0:
        return 1.0
    # Work with the probability of a *wrong* guess, expit(-eps): accurate where e^eps / (1 + e^eps) rounds to 1.
    wrong = float(special.expit(-epsilon))
    # f(v) = P[Binomial(k, q) >= v] = P[Binomial(k, 1 - q) <= k - v], q = e^eps / (1 + e^eps).
    tail = float(stats.binom.cdf(k - v, k, wrong))
    if delta == 0.0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= W <= v - 1] = sum of P[Binomial(k, 1 - q) = j] for j = k-v+1 .. k-v+i.
    # For i > v the difference stays 1 - f(v) while i grows, so the max over i in 1..m is attained at i <= v.
    window = np.cumsum(stats.binom.pmf(np.arange(k - v + 1, k + 1), k, wrong))
    worst = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def one_run_p_value(
    num_guesses: int, num_correct: int, epsilon: float, delta: float, *, num_canaries: int | None = None
) -> float:
    """The bound of Steinke, Nasr and Jagielski's Theorem 3.1: P[at least ``num_correct`` of ``num_guesses`` right].

    For a procedure that is (``epsilon``, ``delta``)-DP with respect to each canary, this is an upper bound on the
    probability that an auditor who guesses ``num_guesses`` of the m = ``num_canaries`` coins gets at least
    ``num_correct`` = v of them right: with W ~ Binomial(k, e^ε / (1 + e^ε)) and f(v) = P[W >= v],

        f(v) + 2 m δ max_{i = 1..m} (f(v - i) - f(v)) / i        (capped at 1),

    which for δ = 0 is the binomial tail f(v). It is the p-value of the hypothesis "(ε, δ)-DP" given v;
    ``epsilon_lower_bound`` inverts it. Assumptions: see ``epsilon_lower_bound``.
    """
    k, v, delta, m = _check_bound_inputs(num_guesses, num_correct, delta, num_canaries)
    epsilon = float(epsilon)
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}.")
    return _one_run_p_value(k, v, epsilon, delta, m)


def epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    num_canaries: int | None = None,
) -> float:
    """Empirical lower bound on ε from a one-run audit: k guesses, v of them correct, at the run's δ.

    Implements Theorem 3.1 (the main result) of T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1)
    Training Run", NeurIPS 2023 (arXiv:2305.08846). Setting: m canaries, each with an independent fair coin
    S_i in {-1, +1}, included in training iff S_i = +1 (the rest of the training data fixed, or random
    independently of the coins); after training, an auditor looks at the output and guesses T_i in {-1, 0, +1} for
    each canary (0 = abstain), with at most k non-zero guesses -- here the k+ highest-scoring canaries "in" and the
    k- lowest "out", k = k+ + k-, with k+ and k- fixed before looking at the scores. If training is (ε, δ)-DP with
    respect to each canary (flipping one coin changes the input to a neighbour), the number v of correct guesses
    satisfies P[v >= v0] <= p(ε, v0) = ``one_run_p_value``: for δ = 0, v is stochastically dominated by
    Binomial(k, e^ε / (1 + e^ε)); for δ > 0 the theorem adds 2 m δ max_i (f(v - i) - f(v)) / i.

    Returned: the largest ε found with p(ε, v) <= 1 - ``confidence`` (0.0 when even ε = 0 is not rejected),
    located by bisection to about 1e-10. Guarantee: if training is (ε*, δ)-DP, the returned value exceeds ε*
    with probability at most 1 - ``confidence`` over the coins. (Training is then (ε, δ)-DP for every ε >= ε*, so
    P[v >= v0] <= min over ε >= ε* of p(ε, v0) for every v0; returning some ε > ε* with p(ε, v) <= 1 - confidence
    can thus only happen on an event of that probability. The bisection keeps p <= 1 - confidence at the value it
    returns as an invariant, so this holds even where p is not monotone in ε.) For
    δ = 0, and whenever 2 m δ <= 1, p(ε, v) is nondecreasing in ε (each term f(v) + (2mδ / i)(f(v - i) - f(v)) has
    derivative proportional to (1 - 2mδ/i) P[Bin(k-1, q) = v-1] + (2mδ/i) P[Bin(k-1, q) = v-i-1] in q), so the
    result is exactly sup{ε : p(ε, v) <= 1 - confidence}. For δ = 0 that is the closed form of the binomial tail:
    v = k gives max(0, logit((1 - confidence) ** (1 / k))).

    Not covered: choosing k+ and k- (or the score) after seeing the outcome -- trying several and keeping the best
    needs a multiple-testing correction (e.g. Bonferroni: confidence 1 - (1 - c) / number tried). The bound is
    about the procedure at δ; it says nothing about other δ.

    Args:
      num_guesses: k, the guesses made (abstentions excluded), >= 0.
      num_correct: v, the correct ones, 0 <= v <= k.
      delta: the δ of the claim being audited, in [0, 1) -- the run's δ.
      confidence: in (0, 1), e.g. 0.95.
      num_canaries: m, all canaries of the audit including abstentions (>= k); required when delta > 0.

    Example::

        epsilon_lower_bound(100, 100, 0.0)                         # 3.49: all 100 right, delta 0
        epsilon_lower_bound(100, 90, 1e-6, num_canaries=1000)     # fewer right, delta 1e-6 over 1,000 canaries
    """
    k, v, delta, m = _check_bound_inputs(num_guesses, num_correct, delta, num_canaries)
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")
    alpha = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return _one_run_p_value(k, v, epsilon, delta, m) <= alpha

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    # p -> 1 as eps grows (the tail f(v) alone tends to 1 for v <= k), so the doubling ends; by eps ~ 750 the
    # probability of a wrong guess underflows to 0 and f(v) = 1 exactly.
    while rejected(high):
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        if high - low <= _EPSILON_TOLERANCE * max(1.0, high):
            break
        middle = 0.5 * (low + high)
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def max_epsilon_lower_bound(
    num_guesses: int, delta: float, confidence: float = DEFAULT_CONFIDENCE, *, num_canaries: int | None = None
) -> float:
    """The largest lower bound an audit with ``num_guesses`` guesses can give: all of them correct.

    What the audit could have detected at most: with k = 100 guesses at δ = 0 and 95% it is 3.49, so a run
    claiming ε = 8 can be neither confirmed nor refuted beyond 3.49 by it.
    """
    return epsilon_lower_bound(num_guesses, num_guesses, delta, confidence, num_canaries=num_canaries)


# --- one-run audit bookkeeping ----------------------------------------------------------------------------------


def draw_canary_coins(num_canaries: int, rng: np.random.Generator) -> np.ndarray:
    """The canaries' fair coins: a bool array of ``num_canaries`` entries, True = included in training.

    Independent fair coins drawn from ``rng``, which the trainer builds from the run's secret seed, so that a
    resumed run draws the same coins and nobody who knows only the public config can predict them. The coins are
    membership information about the canaries: keep them where the secret seed is kept (the checkpoints), not in
    final.json or the logs.
    """
    m = _as_count("num_canaries", num_canaries)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}.")
    return rng.integers(0, 2, size=m).astype(bool)


def _as_scores(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one entry per example), got shape {array.shape}.")
    bad = int(np.sum(np.isnan(array)))
    if bad:
        raise ValueError(
            f"{name} has {bad} NaN entries: a loss that is NaN cannot be ranked; compute the losses in float32 "
            "from the logits (e.g. optax.softmax_cross_entropy_with_integer_labels) or drop those examples first."
        )
    return array


def default_guess_counts(num_canaries: int) -> tuple[int, int]:
    """(k+, k-) when none are given: ``DEFAULT_GUESS_FRACTION`` of the canaries each, at least 1 (if m >= 2)."""
    m = _as_count("num_canaries", num_canaries)
    each = min(max(1, round(DEFAULT_GUESS_FRACTION * m)), m // 2)
    return each, each


def choose_guesses(scores: Any, num_guess_in: int, num_guess_out: int) -> np.ndarray:
    """The auditor's guesses from attack scores (higher = more likely included): int8 array in {-1, 0, +1}.

    +1 ("in") for the ``num_guess_in`` highest scores, -1 ("out") for the ``num_guess_out`` lowest, 0 (abstain)
    for the rest. Ties are broken by position (earlier canary first among equal scores), which depends only on the
    canaries' order, fixed before the coins, so the guesses remain a function of the trained model alone, as
    the theorem requires.
    """
    scores = _as_scores("scores", scores)
    k_in, k_out = _as_count("num_guess_in", num_guess_in), _as_count("num_guess_out", num_guess_out)
    if k_in + k_out > scores.size:
        raise ValueError(
            f"num_guess_in + num_guess_out = {k_in + k_out} guesses, but there are only {scores.size} canaries; "
            f"at most {scores.size} in all."
        )
    order = np.argsort(-scores, kind="stable")  # highest first; equal scores keep canary order
    guesses = np.zeros(scores.size, dtype=np.int8)
    guesses[order[:k_in]] = 1
    if k_out:
        guesses[order[scores.size - k_out :]] = -1
    return guesses


def count_correct(guesses: Any, coins: Any) -> tuple[int, int]:
    """(k, v): how many guesses were made (non-zero) and how many match the coins (+1 with True, -1 with False)."""
    guesses = np.asarray(guesses)
    coins = np.asarray(coins)
    if guesses.shape != coins.shape or guesses.ndim != 1:
        raise ValueError(f"guesses and coins must be 1-D of the same length, got {guesses.shape} and {coins.shape}.")
    if not np.all(np.isin(guesses, (-1, 0, 1))):
        raise ValueError("guesses must hold only -1 (out), 0 (abstain) and +1 (in).")
    if coins.dtype != bool:
        if not np.all(np.isin(coins, (0, 1))):
            raise ValueError("coins must be booleans (True = included) or 0/1.")
        coins = coins.astype(bool)
    made = guesses != 0
    correct = (guesses == 1) & coins | (guesses == -1) & ~coins
    return int(np.sum(made)), int(np.sum(correct))


def one_run_audit(
    scores: Any,
    coins: Any,
    group: Any,
    *,
    delta: float,
    num_guess_in: int | None = None,
    num_guess_out: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float | int]:
    """The one-run audit per group: guesses from the canaries' scores, counted against their coins, turned into ε.

    Each group's canaries form their own audit (their own m, k+, k-): the other group's canaries, included by
    their own independent coins, are part of the rest of the training data, and the procedure stays (ε, δ)-DP with
    respect to each canary whatever they are.

    Args:
      scores: attack scores of the canaries, higher = more likely included (``loss_scores`` or
        ``calibrated_scores`` of their losses under the trained model), shape [m]. They may use anything that does
        not depend on the coins other than through the trained model (the reference losses of the initial model
        do not; a reference model trained on the canaries would).
      coins: the coins the trainer used (``draw_canary_coins``), bool [m], True = included.
      group: each canary's group, 0/1, shape [m].
      delta: the run's δ (the one its ε is reported at).
      num_guess_in: k+ per group; None = ``default_guess_counts`` of the group's canaries. It must be fixed before
        seeing the scores (in the config) for the bound to hold.
      num_guess_out: k- per group, likewise.
      confidence: of the lower bound.

    Returns:
      For g in 0, 1: ``epsilon_lower_bound_g`` (``epsilon_lower_bound``), ``epsilon_lower_bound_max_g`` (the bound
      had every guess been right: what this audit could show at most), ``epsilon_lower_bound_canaries_g`` (m),
      ``epsilon_lower_bound_guesses_g`` (k), ``epsilon_lower_bound_correct_g`` (v). A group without canaries
      gets m = k = v = 0 and bounds 0.0.
    """
    scores = _as_scores("scores", scores)
    coins = np.asarray(coins)
    group = np.asarray(group)
    if not scores.shape == coins.shape == group.shape:
        raise ValueError(
            f"scores, coins and group must have one entry per canary; got shapes {scores.shape}, {coins.shape}, "
            f"{group.shape}."
        )
    if not np.all(np.isin(group, GROUPS)):
        raise ValueError(f"group must hold only the group ids {GROUPS}.")
    result: dict[str, float | int] = {}
    for g in GROUPS:
        in_group = group == g
        m = int(np.sum(in_group))
        k_in, k_out = default_guess_counts(m)
        k_in = k_in if num_guess_in is None else num_guess_in
        k_out = k_out if num_guess_out is None else num_guess_out
        try:
            guesses = choose_guesses(scores[in_group], k_in, k_out)
        except ValueError as error:
            raise ValueError(f"group {g}: {error} Lower num_guess_in / num_guess_out or add canaries.") from None
        k, v = count_correct(guesses, coins[in_group])
        result[f"epsilon_lower_bound_{g}"] = epsilon_lower_bound(k, v, delta, confidence, num_canaries=m)
        result[f"epsilon_lower_bound_max_{g}"] = max_epsilon_lower_bound(k, delta, confidence, num_canaries=m)
        result[f"epsilon_lower_bound_canaries_{g}"] = m
        result[f"epsilon_lower_bound_guesses_{g}"] = k
        result[f"epsilon_lower_bound_correct_{g}"] = v
    return result


# --- membership inference ---------------------------------------------------------------------------------------


def loss_scores(loss: Any) -> np.ndarray:
    """Yeom et al. (2018) loss-threshold attack: score = -loss (members tend to have lower loss)."""
    return -_as_scores("loss", loss)


def calibrated_scores(loss: Any, reference_loss: Any) -> np.ndarray:
    """Watson et al. (2022) difficulty calibration: score = -(loss - reference_loss).

    ``reference_loss`` is each example's loss under a model not trained on it (the initial model, or one trained
    on other data): subtracting it removes how hard the example is anyway, leaving what training on it changed.
    """
    loss = _as_scores("loss", loss)
    reference_loss = _as_scores("reference_loss", reference_loss)
    if loss.shape != reference_loss.shape:
        raise ValueError(f"loss and reference_loss must match, got shapes {loss.shape} and {reference_loss.shape}.")
    with np.errstate(invalid="ignore"):
        scores = reference_loss - loss
    both_infinite = int(np.sum(np.isnan(scores)))
    if both_infinite:
        raise ValueError(
            f"{both_infinite} examples have an infinite loss under both models, so their calibrated score is "
            "undefined; compute the losses from logits with a numerically stable cross-entropy."
        )
    return scores


class AucEstimate(NamedTuple):
    auc: float
    ci_low: float
    ci_high: float


def auc_with_ci(member_scores: Any, nonmember_scores: Any, *, confidence: float = DEFAULT_CONFIDENCE) -> AucEstimate:
    """Area under the ROC curve of members against non-members, with a DeLong interval.

    AUC = P[member score > non-member score] + 1/2 P[equal] (the Mann-Whitney statistic over n1 * n0 pairs).
    Interval: DeLong, DeLong and Clarke-Pearson (Biometrics 1988): the variance of the AUC as a two-sample
    U-statistic, var(V10)/n1 + var(V01)/n0 with V10, V01 the placement values (each member's fraction of
    non-members below it, each non-member's fraction of members above it; computed from mid-ranks, O(n log n)),
    then AUC +- z * sd, clipped to [0, 1]. Chosen because it is nonparametric (Hanley-McNeil assumes a shape of the
    score distributions), deterministic (no resampling seed, unlike a bootstrap) and standard. It is a large-sample
    interval: nominal coverage needs tens of examples per side, it is too narrow near AUC 0 or 1 and degenerate at
    perfect separation (1.0, 1.0) or when every score is tied (0.5, 0.5). It covers the sampling of members and
    non-members, not the randomness of training. With fewer than 2 members or non-members the interval is the
    uninformative (0, 1); with none, the AUC is NaN.

    Hand example: members [3, 1], non-members [2, 0]: pairs won 1, 1, 0, 1 -> AUC 0.75; V10 = (1, 0.5),
    V01 = (0.5, 1), variances 0.125 each, var = 0.125/2 + 0.125/2 = 0.125, interval 0.75 +- 1.96 * 0.354.
    """
    x = _as_scores("member_scores", member_scores)
    y = _as_scores("nonmember_scores", nonmember_scores)
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")
    n1, n0 = x.size, y.size
    if n1 == 0 or n0 == 0:
        return AucEstimate(math.nan, 0.0, 1.0)
    combined = stats.rankdata(np.concatenate([x, y]))  # mid-ranks: ties count 1/2
    rank_x, rank_y = combined[:n1], combined[n1:]
    auc = float((rank_x.sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    if n1 < 2 or n0 < 2:
        return AucEstimate(auc, 0.0, 1.0)
    v10 = (rank_x - stats.rankdata(x)) / n0  # non-members below each member
    v01 = 1.0 - (rank_y - stats.rankdata(y)) / n1  # members above each non-member
    sd = math.sqrt(np.var(v10, ddof=1) / n1 + np.var(v01, ddof=1) / n0)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return AucEstimate(auc, max(0.0, auc - z * sd), min(1.0, auc + z * sd))


class TprAtFpr(NamedTuple):
    tpr: float
    ci_low: float
    ci_high: float
    threshold: float
    fpr: float  # the false-positive rate reached on the non-members, <= the one asked for


def tpr_at_fpr(
    member_scores: Any, nonmember_scores: Any, fpr: float, *, confidence: float = DEFAULT_CONFIDENCE
) -> TprAtFpr:
    """True-positive rate of the attack at a false-positive rate ``fpr`` fixed on the non-members.

    The threshold t is the (j+1)-th highest non-member score, j = floor(fpr * n0): "member" means score > t, so at
    most j non-members (empirical FPR <= ``fpr``; less with ties at t) and TPR = the fraction of members above t.
    Interval: Clopper-Pearson (exact binomial) on that fraction, *given* t. It does not cover the uncertainty of
    the threshold itself -- with n0 non-members the true FPR at t is itself uncertain by about
    sqrt(fpr / n0) -- nor the randomness of training.

    The rate is meaningful only when fpr * n0 >= 1 (TPR at 0.1% FPR needs at least 1,000 non-members): with fewer,
    the threshold would sit above every non-member and measure TPR at FPR 0 instead. Then, or without members, the
    TPR and its interval are NaN.
    """
    x = _as_scores("member_scores", member_scores)
    y = _as_scores("nonmember_scores", nonmember_scores)
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), e.g. 0.01; got {fpr!r}.")
    n1, n0 = x.size, y.size
    allowed = math.floor(round(fpr * n0, 9))  # round: 0.001 * 1000 must give 1, not 0.999...
    if n1 == 0 or allowed < 1:
        return TprAtFpr(math.nan, math.nan, math.nan, math.nan, math.nan)
    threshold = float(np.sort(y)[::-1][allowed])
    true_positives = int(np.sum(x > threshold))
    low, high = proportion_ci(true_positives, n1, confidence=confidence, method="clopper-pearson")
    return TprAtFpr(true_positives / n1, low, high, threshold, float(np.mean(y > threshold)))


def _attack_metrics(
    prefix: str,
    scores: np.ndarray,
    group: np.ndarray,
    is_member: np.ndarray,
    fprs: Sequence[float],
    confidence: float,
) -> dict[str, float | int]:
    metrics: dict[str, float | int] = {}
    for g in GROUPS:
        members = scores[(group == g) & is_member]
        nonmembers = scores[(group == g) & ~is_member]
        auc = auc_with_ci(members, nonmembers, confidence=confidence)
        metrics[f"{prefix}auc_{g}"] = auc.auc
        metrics[f"{prefix}auc_{g}_ci_low"], metrics[f"{prefix}auc_{g}_ci_high"] = auc.ci_low, auc.ci_high
        for fpr in fprs:
            rate = tpr_at_fpr(members, nonmembers, fpr, confidence=confidence)
            name = f"{prefix}tpr_at_fpr_{fpr:g}_{g}"
            metrics[name], metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = rate.tpr, rate.ci_low, rate.ci_high
    return metrics


def membership_inference_metrics(
    loss: Any,
    group: Any,
    is_member: Any,
    *,
    reference_loss: Any | None = None,
    fprs: Sequence[float] = DEFAULT_FPRS,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float | int]:
    """Per-group membership inference: the loss-threshold attack and, given reference losses, its calibrated form.

    Members are training examples, non-members held-out examples never trained on, of the same group and the same
    distribution (otherwise the attack measures the difference between the two sets, not membership).

    Args:
      loss: each candidate's loss under the trained model, shape [N].
      group: 0/1 group ids, shape [N].
      is_member: membership truth, bool or 0/1, shape [N].
      reference_loss: each candidate's loss under the reference model (e.g. the initial parameters), shape [N];
        None = no calibrated attack.
      fprs: false-positive rates for the TPR (default 1% and 0.1%).
      confidence: of every interval.

    Returns:
      A flat dict, JSON-ready (NaN where undefined; the run log writes it as null), for g in 0, 1:
      ``mia_members_g``, ``mia_nonmembers_g`` (counts); ``mia_auc_g`` with ``mia_auc_g_ci_low/high``
      (``auc_with_ci``); for each fpr f, ``mia_tpr_at_fpr_{f}_g`` with ``_ci_low/_ci_high`` (``tpr_at_fpr``),
      e.g. ``mia_tpr_at_fpr_0.01_1``; and with ``reference_loss`` the same keys for the calibrated attack with
      ``mia_cal_`` in place of ``mia_`` (``mia_cal_auc_0``, ...).
    """
    loss = _as_scores("loss", loss)
    group = np.asarray(group)
    is_member = np.asarray(is_member)
    if not loss.shape == group.shape == is_member.shape:
        raise ValueError(
            f"loss, group and is_member must have one entry per candidate; got shapes {loss.shape}, {group.shape}, "
            f"{is_member.shape}."
        )
    if not np.all(np.isin(group, GROUPS)):
        raise ValueError(f"group must hold only the group ids {GROUPS}.")
    if is_member.dtype != bool:
        if not np.all(np.isin(is_member, (0, 1))):
            raise ValueError("is_member must be booleans or 0/1 (1 = trained on).")
        is_member = is_member.astype(bool)
    metrics: dict[str, float | int] = {}
    for g in GROUPS:
        metrics[f"mia_members_{g}"] = int(np.sum((group == g) & is_member))
        metrics[f"mia_nonmembers_{g}"] = int(np.sum((group == g) & ~is_member))
    metrics.update(_attack_metrics("mia_", loss_scores(loss), group, is_member, fprs, confidence))
    if reference_loss is not None:
        scores = calibrated_scores(loss, reference_loss)
        metrics.update(_attack_metrics("mia_cal_", scores, group, is_member, fprs, confidence))
    return metrics
