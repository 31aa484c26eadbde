"""Tests of jaxdp.audit: the one-run bound against closed forms, hand-computed p-values, the authors' own p-value
code and exact coverage for mechanisms of known ε; membership inference against hand-counted scores."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxdp.audit import (
    auc_with_ci,
    calibrated_scores,
    choose_guesses,
    count_correct,
    default_guess_counts,
    draw_canary_coins,
    epsilon_lower_bound,
    loss_scores,
    max_epsilon_lower_bound,
    membership_inference_metrics,
    one_run_audit,
    one_run_p_value,
    tpr_at_fpr,
)


def logit(p):
    return math.log(p / (1 - p))


# --- epsilon_lower_bound ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 10, 100, 1000])
@pytest.mark.parametrize("confidence", [0.95, 0.99])
def test_all_guesses_correct_delta_0_is_the_closed_form(k, confidence):
    # P[Binomial(k, q) >= k] = q^k = 1 - confidence  =>  q = (1 - confidence)^(1/k), eps = logit(q), or 0 when
    # q < 1/2 (at 99%, five right out of five: 0.01^(1/5) = 0.398).
    expected = max(0.0, logit((1 - confidence) ** (1 / k)))
    assert epsilon_lower_bound(k, k, 0.0, confidence) == pytest.approx(expected, abs=1e-8)
    assert max_epsilon_lower_bound(k, 0.0, confidence) == pytest.approx(expected, abs=1e-8)


def test_hand_values_delta_0():
    # 0.05^(1/5) = 0.5493 -> logit 0.1978; 0.05^(1/4) = 0.4729 < 1/2: four right out of four is no evidence.
    assert epsilon_lower_bound(5, 5, 0.0) == pytest.approx(0.19776, abs=1e-5)
    assert epsilon_lower_bound(4, 4, 0.0) == 0.0
    assert epsilon_lower_bound(100, 100, 0.0) == pytest.approx(3.49297, abs=1e-5)
    # Chance-level or worse, no guesses, no correct guesses: 0.
    assert epsilon_lower_bound(100, 50, 0.0) == 0.0
    assert epsilon_lower_bound(0, 0, 0.0) == 0.0
    assert epsilon_lower_bound(10, 0, 1e-6, num_canaries=10) == 0.0


def test_p_value_delta_0_is_the_binomial_tail_by_hand():
    q = math.e / (1 + math.e)  # eps = 1
    tail = sum(math.comb(10, j) * q**j * (1 - q) ** (10 - j) for j in (8, 9, 10))
    assert one_run_p_value(10, 8, 1.0, 0.0) == pytest.approx(tail, rel=1e-12)


def test_p_value_delta_positive_by_hand():
    # k = 2 guesses, v = 2 right, m = 3 canaries, eps = 0 (q = 1/2), delta = 0.01.
    # f(2) = 1/4, f(1) = 3/4, f(v <= 0) = 1.  max over i of (f(2 - i) - f(2)) / i:
    #   i = 1: 1/2;  i = 2: (3/4)/2 = 3/8;  i = 3: (3/4)/3 = 1/4  ->  1/2.
    # p = 1/4 + 2 * 3 * 0.01 * 1/2 = 0.28.
    assert one_run_p_value(2, 2, 0.0, 0.01, num_canaries=3) == pytest.approx(0.28, rel=1e-12)
    assert one_run_p_value(2, 2, 0.0, 0.0) == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize(
    "k, v, delta, m", [(100, 100, 0.0, None), (200, 170, 0.0, None), (100, 90, 1e-6, 1000), (1000, 900, 1e-5, 1000)]
)
def test_bound_sits_where_the_p_value_crosses_one_minus_confidence(k, v, delta, m):
    eps = epsilon_lower_bound(k, v, delta, num_canaries=m)
    assert eps > 0
    assert one_run_p_value(k, v, eps, delta, num_canaries=m) <= 0.05
    assert one_run_p_value(k, v, eps + 1e-6, delta, num_canaries=m) > 0.05


# Values of the p-value code the authors published with the paper (as reproduced in public repositories, e.g.
# zj-jayzhang/one_round_auditing src/dp_audit.py), run with a 60-step bisection: (m, k, v, delta) -> eps at 95%.
AUTHORS_CODE = [
    (1000, 600, 600, 1e-5, 5.270399463514697),
    (1000, 100, 90, 1e-6, 1.6303580020232833),
    (1000, 1000, 900, 1e-5, 2.0206455958654317),
    (1000, 200, 180, 0.0, 1.7988652649778913),
    (5000, 500, 450, 1e-5, 1.9414204321292845),
    (1000, 50, 50, 1e-4, 2.481269215065907),
    (100, 100, 80, 1e-3, 0.9256108897959237),
    (1000, 1000, 1000, 1e-5, 5.782283135394014),
]


@pytest.mark.parametrize("m, k, v, delta, expected", AUTHORS_CODE)
def test_matches_the_authors_p_value_code(m, k, v, delta, expected):
    assert epsilon_lower_bound(k, v, delta, num_canaries=m) == pytest.approx(expected, abs=1e-8)


def test_monotone_in_correct_guesses_guesses_delta_confidence_and_canaries():
    for delta, m in ((0.0, None), (1e-5, 1000)):
        by_v = [epsilon_lower_bound(100, v, delta, num_canaries=m) for v in range(0, 101)]
        assert all(a <= b for a, b in zip(by_v, by_v[1:], strict=False))
        assert by_v[-1] > by_v[80] > 0
        # More guesses, same number right: weaker.  One more guess that is right: stronger.
        by_k = [epsilon_lower_bound(k, 80, delta, num_canaries=m) for k in range(80, 121)]
        assert all(a >= b for a, b in zip(by_k, by_k[1:], strict=False))
        assert by_k[0] > by_k[-1]
        for k in (50, 100, 400):
            v = int(0.85 * k)
            assert epsilon_lower_bound(k + 1, v + 1, delta, num_canaries=m) >= epsilon_lower_bound(
                k, v, delta, num_canaries=m
            )
    by_delta = [epsilon_lower_bound(100, 95, d, num_canaries=1000) for d in (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:], strict=False))
    assert by_delta[0] > by_delta[-1]
    by_confidence = [epsilon_lower_bound(100, 95, 1e-6, c, num_canaries=1000) for c in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in zip(by_confidence, by_confidence[1:], strict=False))
    by_m = [epsilon_lower_bound(100, 95, 1e-5, num_canaries=m) for m in (100, 1000, 10_000)]
    assert by_m[0] > by_m[1] > by_m[2]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((10, 11, 0.0), {}, "cannot exceed num_guesses"),
        ((-1, 0, 0.0), {}, "num_guesses must be >= 0"),
        ((10, -1, 0.0), {}, "num_correct must be >= 0"),
        ((10.5, 5, 0.0), {}, "whole number"),
        ((10, 5, 1.0), {"num_canaries": 10}, r"delta must be in \[0, 1\)"),
        ((10, 5, -1e-6), {}, r"delta must be in \[0, 1\)"),
        ((10, 5, 0.0, 0.0), {}, r"confidence must be in \(0, 1\)"),
        ((10, 5, 0.0, 1.0), {}, r"confidence must be in \(0, 1\)"),
        ((10, 5, 0.0, 95), {}, r"confidence must be in \(0, 1\)"),
        ((10, 5, 1e-6), {}, "pass num_canaries"),
        ((10, 5, 1e-6), {"num_canaries": 9}, "cannot exceed num_canaries"),
    ],
)
def test_impossible_inputs_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        epsilon_lower_bound(*args, **kwargs)


def _exact_failure_probability(num_canaries, correct_probability, epsilon, delta):
    # P[bound > epsilon] when all m canaries are guessed and each guess is right independently.
    v = np.arange(num_canaries + 1)
    bounds = np.array([epsilon_lower_bound(num_canaries, int(x), delta, num_canaries=num_canaries) for x in v])
    return float(stats.binom.pmf(v, num_canaries, correct_probability)[bounds > epsilon].sum()), bounds


def test_exact_coverage_for_randomized_response():
    # Randomized response on each coin with known eps is (eps, 0)-DP per canary and the number of correct guesses
    # is exactly Binomial(m, e^eps / (1 + e^eps)): the bound may exceed eps with probability at most 5%.
    for epsilon, m in ((0.5, 400), (1.0, 1000), (2.0, 300)):
        failure, _ = _exact_failure_probability(m, 1 / (1 + math.exp(-epsilon)), epsilon, 0.0)
        assert failure <= 0.05


def test_delta_matters_for_an_epsilon_delta_mechanism():
    # Each coin is revealed outright with probability 0.01, otherwise answered by randomized response with
    # eps = 0.5: (0.5, 0.01)-DP per canary. Read as if delta were 0 the bound exceeds 0.5 too often (6.0%);
    # the bound at delta = 0.01 (Theorem 3.1's term 2 m delta) keeps its 95% and can still be positive.
    epsilon, leak, m = 0.5, 0.01, 400
    right = leak + (1 - leak) / (1 + math.exp(-epsilon))
    failure_ignoring_delta, _ = _exact_failure_probability(m, right, epsilon, 0.0)
    failure_with_delta, bounds = _exact_failure_probability(m, right, epsilon, leak)
    assert failure_ignoring_delta > 0.05
    assert failure_with_delta <= 0.05
    assert bounds[-1] > epsilon


def test_near_epsilon_with_many_guesses():
    # 100,000 guesses at the expected accuracy of eps = 1 randomized response: the bound is eps minus about
    # 1.645 standard errors (~0.023).
    k = 100_000
    v = round(k / (1 + math.exp(-1.0)))
    bound = epsilon_lower_bound(k, v, 1e-6, num_canaries=k)
    assert 0.97 < bound < 1.0


def test_simulated_randomized_response_audit_through_the_bookkeeping():
    # The whole pipeline on a mechanism of known eps: coins -> randomized response -> scores -> guesses -> bound.
    epsilon, m, trials = 1.0, 200, 400
    rng = np.random.default_rng(0)
    exceed = 0
    for _ in range(trials):
        coins = draw_canary_coins(m, rng)
        truthful = rng.random(m) < 1 / (1 + math.exp(-epsilon))
        answer = np.where(truthful, coins, ~coins)
        scores = answer + 0.01 * rng.random(m)  # public tie-breaking noise
        k, v = count_correct(choose_guesses(scores, m // 2, m // 2), coins)
        exceed += epsilon_lower_bound(k, v, 0.0) > epsilon
    assert exceed / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


# --- one-run bookkeeping ----------------------------------------------------------------------------------------


def test_canary_coins_are_fair_and_reproducible():
    coins = draw_canary_coins(10_000, np.random.default_rng(7))
    assert coins.dtype == bool and coins.shape == (10_000,)
    assert abs(coins.mean() - 0.5) < 4 * 0.005
    np.testing.assert_array_equal(coins, draw_canary_coins(10_000, np.random.default_rng(7)))
    assert not np.array_equal(coins, draw_canary_coins(10_000, np.random.default_rng(8)))
    with pytest.raises(ValueError, match="Generator"):
        draw_canary_coins(10, 7)


def test_guesses_by_hand():
    #                scores: 5   1   3   2   4
    np.testing.assert_array_equal(choose_guesses([5, 1, 3, 2, 4], 2, 1), [1, -1, 0, 0, 1])
    np.testing.assert_array_equal(choose_guesses([5, 1, 3, 2, 4], 0, 2), [0, -1, 0, -1, 0])
    # Ties broken by position: the first canaries among equal scores are "in", the last "out".
    np.testing.assert_array_equal(choose_guesses([1.0, 1.0, 1.0, 1.0], 1, 1), [1, 0, 0, -1])
    with pytest.raises(ValueError, match="only 5 canaries"):
        choose_guesses([5, 1, 3, 2, 4], 3, 3)
    with pytest.raises(ValueError, match="NaN"):
        choose_guesses([5, np.nan], 1, 0)


def test_count_correct_by_hand():
    #                  guesses        coins (True = in)
    assert count_correct([1, -1, 0, 0, 1], [True, False, True, False, False]) == (3, 2)
    assert count_correct([0, 0], [1, 0]) == (0, 0)
    with pytest.raises(ValueError, match="same length"):
        count_correct([1, 0], [True])


def test_default_guess_counts():
    assert default_guess_counts(1000) == (50, 50)
    assert default_guess_counts(10) == (1, 1)
    assert default_guess_counts(1) == (0, 0)
    assert default_guess_counts(0) == (0, 0)


def test_one_run_audit_per_group():
    # Group 0: 100 canaries whose scores reveal the coins exactly; group 1: 40 canaries with useless scores.
    rng = np.random.default_rng(1)
    coins = draw_canary_coins(140, rng)
    group = np.r_[np.zeros(100, int), np.ones(40, int)]
    scores = np.where(group == 0, coins.astype(float), 0.0)
    result = one_run_audit(scores, coins, group, delta=1e-6, num_guess_in=10, num_guess_out=10)
    suffixes = ("", "_max", "_canaries", "_guesses", "_correct")
    assert set(result) == {f"epsilon_lower_bound{suffix}_{g}" for suffix in suffixes for g in (0, 1)}
    assert (result["epsilon_lower_bound_canaries_0"], result["epsilon_lower_bound_canaries_1"]) == (100, 40)
    assert result["epsilon_lower_bound_guesses_0"] == result["epsilon_lower_bound_correct_0"] == 20
    assert result["epsilon_lower_bound_0"] == pytest.approx(epsilon_lower_bound(20, 20, 1e-6, num_canaries=100))
    assert result["epsilon_lower_bound_0"] == result["epsilon_lower_bound_max_0"] > 0.9
    # Group 1, all scores equal: the first 10 guessed in, the last 10 out, whatever the coins.
    expected = count_correct(np.r_[np.ones(10), np.zeros(20), -np.ones(10)], coins[100:])
    assert (result["epsilon_lower_bound_guesses_1"], result["epsilon_lower_bound_correct_1"]) == expected
    with pytest.raises(ValueError, match="group 1"):
        one_run_audit(scores, coins, group, delta=1e-6, num_guess_in=30, num_guess_out=30)


def test_one_run_audit_defaults_and_empty_group():
    coins = draw_canary_coins(200, np.random.default_rng(2))
    result = one_run_audit(coins.astype(float), coins, np.zeros(200, int), delta=1e-6)
    assert result["epsilon_lower_bound_guesses_0"] == 20  # 10 in + 10 out of 200
    assert result["epsilon_lower_bound_correct_0"] == 20
    assert result["epsilon_lower_bound_canaries_1"] == result["epsilon_lower_bound_guesses_1"] == 0
    assert result["epsilon_lower_bound_1"] == 0.0


# --- membership inference ---------------------------------------------------------------------------------------


def test_auc_hand_example():
    # Members [3, 1], non-members [2, 0]: 3 of 4 pairs won -> 0.75. Placements V10 = (1, 0.5), V01 = (0.5, 1),
    # sample variances 0.125 each, var(AUC) = 0.125/2 + 0.125/2 = 0.125.
    auc, low, high = auc_with_ci([3, 1], [2, 0])
    assert auc == 0.75
    assert low == pytest.approx(0.75 - 1.959964 * math.sqrt(0.125), abs=1e-6)
    assert high == 1.0


def test_auc_perfect_reversed_tied():
    assert auc_with_ci([5, 6, 7], [1, 2, 3]) == (1.0, 1.0, 1.0)
    assert auc_with_ci([1, 2, 3], [5, 6, 7]) == (0.0, 0.0, 0.0)
    assert auc_with_ci([1, 1, 1], [1, 1, 1]).auc == 0.5
    assert math.isnan(auc_with_ci([], [1, 2]).auc)
    assert auc_with_ci([1], [0, 2]) == (0.5, 0.0, 1.0)


def test_auc_and_delong_variance_against_brute_force():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 8, 37).astype(float)  # integers: many ties
    y = rng.integers(0, 6, 23).astype(float)
    wins = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    auc, low, high = auc_with_ci(x, y)
    assert auc == pytest.approx(wins.mean(), abs=1e-12)
    variance = wins.mean(axis=1).var(ddof=1) / x.size + wins.mean(axis=0).var(ddof=1) / y.size
    assert (high - low) / 2 == pytest.approx(1.959964 * math.sqrt(variance), abs=1e-6)


def test_auc_identical_distributions_covers_one_half():
    rng = np.random.default_rng(4)
    auc, low, high = auc_with_ci(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(auc - 0.5) < 0.03
    assert low < 0.5 < high
    # Coverage of the DeLong interval over repetitions, at AUC 0.5 and at Phi(1/sqrt(2)) = 0.760.
    for shift, truth in ((0.0, 0.5), (1.0, stats.norm.cdf(1 / math.sqrt(2)))):
        covered = 0
        for _ in range(300):
            _, low, high = auc_with_ci(rng.normal(shift, size=100), rng.normal(size=100))
            covered += low <= truth <= high
        assert covered / 300 >= 0.9


def test_tpr_at_fpr_by_hand():
    nonmembers = np.arange(100.0)  # 0 .. 99
    members = [99.5, 98.5, 98.0, 50.0]
    # 1% of 100 = 1 non-member allowed above the threshold: threshold = 2nd highest non-member = 98;
    # members above 98: 99.5 and 98.5 (98.0 is not above) -> TPR 2/4, reached FPR 1/100.
    rate = tpr_at_fpr(members, nonmembers, 0.01)
    assert (rate.tpr, rate.threshold, rate.fpr) == (0.5, 98.0, 0.01)
    low, high = stats.beta.ppf(0.025, 2, 3), stats.beta.ppf(0.975, 3, 2)  # Clopper-Pearson for 2 of 4
    assert (rate.ci_low, rate.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert tpr_at_fpr(members, nonmembers, 0.05).threshold == 94.0


def test_tpr_at_low_fpr_needs_enough_nonmembers():
    rng = np.random.default_rng(5)
    members = rng.normal(1.0, size=500)
    too_few = tpr_at_fpr(members, rng.normal(size=999), 0.001)
    assert math.isnan(too_few.tpr) and math.isnan(too_few.ci_low) and math.isnan(too_few.ci_high)
    enough = tpr_at_fpr(members, rng.normal(size=1000), 0.001)
    assert 0.0 <= enough.ci_low <= enough.tpr <= enough.ci_high <= 1.0
    assert enough.fpr <= 0.001
    with pytest.raises(ValueError, match="fpr must be in"):
        tpr_at_fpr(members, members, 1.0)


def test_scores():
    np.testing.assert_array_equal(loss_scores([0.1, 2.0]), [-0.1, -2.0])
    np.testing.assert_allclose(calibrated_scores([0.1, 2.0], [0.5, 2.5]), [0.4, 0.5])
    with pytest.raises(ValueError, match="must match"):
        calibrated_scores([0.1, 2.0], [0.5])
    with pytest.raises(ValueError, match="infinite loss under both models"):
        calibrated_scores([np.inf, 2.0], [np.inf, 2.5])


def test_membership_inference_metrics_per_group_and_calibration():
    # Difficulty varies a lot between examples (reference loss 0..10); training lowers each member's loss by 1.
    # The plain loss attack barely sees it; the calibrated one separates perfectly. Group 1's members are
    # untouched by training: chance level for both attacks.
    rng = np.random.default_rng(6)
    n = 2000
    group = np.repeat([0, 1], n)
    is_member = np.tile(np.repeat([True, False], n // 2), 2)
    reference = rng.uniform(0, 10, size=2 * n)
    loss = reference - 1.0 * ((group == 0) & is_member)
    m = membership_inference_metrics(loss, group, is_member, reference_loss=reference)
    assert (m["mia_members_0"], m["mia_nonmembers_0"], m["mia_members_1"], m["mia_nonmembers_1"]) == (1000,) * 4
    assert 0.55 < m["mia_auc_0"] < 0.65  # plain attack: weak
    assert m["mia_cal_auc_0"] == 1.0
    assert m["mia_cal_tpr_at_fpr_0.01_0"] == 1.0 and m["mia_cal_tpr_at_fpr_0.001_0"] == 1.0
    assert m["mia_auc_1_ci_low"] < 0.5 < m["mia_auc_1_ci_high"]
    assert m["mia_cal_auc_1"] == 0.5  # calibrated scores all 0: every pair tied
    for prefix in ("mia_", "mia_cal_"):
        for g in (0, 1):
            for name in ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001"):
                key = f"{prefix}{name}_{g}"
                assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
    assert not any(key.startswith("mia_cal_") for key in membership_inference_metrics(loss, group, is_member))


def test_membership_inference_metrics_too_few_nonmembers_and_bad_input():
    m = membership_inference_metrics([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], [1, 0, 1, 0])
    assert math.isnan(m["mia_tpr_at_fpr_0.01_0"]) and math.isnan(m["mia_tpr_at_fpr_0.001_1"])
    assert m["mia_auc_0"] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        membership_inference_metrics([0.1, np.nan], [0, 1], [1, 0])
    with pytest.raises(ValueError, match="one entry per candidate"):
        membership_inference_metrics([0.1, 0.2], [0, 1], [1])
    with pytest.raises(ValueError, match="group must hold only"):
        membership_inference_metrics([0.1, 0.2], [0, 2], [1, 0])
