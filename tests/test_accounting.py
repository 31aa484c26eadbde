"""Tests for jaxdp.accounting: published epsilons, accountant relations, calibration, the ledger, errors."""

import math

import dp_accounting
import pytest

from jaxdp import accounting
from jaxdp.sampling import PoissonSampler, ShuffledSampler

PAPER_Q = 32 / 24_000
PAPER_STEPS = 45_000  # 60 epochs of 750 batches
PAPER_DELTA = 1e-6


def test_paper_epsilons_with_rdp_classic():
    # Farrand et al. 2020 print 1.15 / 4.98 / 16.2 for z = 1.5 / 0.7 / 0.5. The classic conversion over
    # the Opacus orders gives 1.1470 / 4.9803 / 16.2574 (optimal orders 25 / 5 / 2.5): the paper's
    # numbers are these rounded to two decimals (1.15, 4.98, 16.26), the last printed with its last
    # digit dropped (16.2; rounding to one decimal would give 16.3). mechanism=None: the ideal Gaussian mechanism
    # the paper analysed (jaxdp's own samplers add their delta, tested below).
    got = {
        z: accounting.epsilon(z, PAPER_Q, PAPER_STEPS, PAPER_DELTA, accountant="rdp_classic", mechanism=None)
        for z in (1.5, 0.7, 0.5)
    }
    assert got[1.5] == pytest.approx(1.1470, abs=5e-5)
    assert got[0.7] == pytest.approx(4.9803, abs=5e-5)
    assert got[0.5] == pytest.approx(16.2574, abs=5e-5)
    assert round(got[1.5], 2) == 1.15
    assert round(got[0.7], 2) == 4.98
    assert round(got[0.5], 2) == 16.26 and math.floor(got[0.5] * 10) / 10 == 16.2


def test_modern_accountants_are_tighter_than_rdp_classic_in_paper_setting():
    # Measured: pld 0.8948 / 3.7818 / 13.4363, rdp 0.9656 / 4.3103 / 15.0200. Strict order pld < rdp <
    # rdp_classic: all are upper bounds, PLD is the tightest, dp_accounting's RDP uses finer orders and
    # the improved conversion.
    expected = {1.5: (0.8948, 0.9656), 0.7: (3.7818, 4.3103), 0.5: (13.4363, 15.0200)}
    for z, (pld_ref, rdp_ref) in expected.items():
        classic = accounting.epsilon(z, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp_classic", mechanism=None)
        rdp = accounting.epsilon(z, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", mechanism=None)
        pld = accounting.epsilon(z, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "pld", mechanism=None)
        assert pld < rdp < classic
        assert rdp == pytest.approx(rdp_ref, abs=1e-4)
        assert pld == pytest.approx(pld_ref, abs=1e-3)


def test_pld_discretization_grid():
    assert accounting.pld_discretization(0.5) == 1e-4
    assert accounting.pld_discretization(2.5) == 2e-4
    assert accounting.pld_discretization(5.0) == 5e-4
    assert accounting.pld_discretization(15.0) == 1e-3
    assert accounting.pld_discretization(math.inf) == 1e-3
    # A finer interval can only tighten the (pessimistic) bound.
    coarse = accounting.epsilon(1.0, 0.01, 500, 1e-5, pld_value_discretization=1e-3)
    fine = accounting.epsilon(1.0, 0.01, 500, 1e-5, pld_value_discretization=1e-4)
    assert fine <= coarse


def test_full_batch_gaussian_by_hand():
    # q = 1, one step: the plain Gaussian mechanism, whose RDP is alpha / (2 s^2) with s the noise
    # multiplier relative to the sensitivity. Poisson/add-remove: s = z. Fixed/replace-one: the clipped
    # sum moves by up to 2C, so s = z / 2 and the RDP is 4x larger. Classic conversion by hand:
    # z = 10, delta = 1e-5: add-remove min_a 0.005 a + ln(1e5)/(a-1) at a = 49: 0.245 + 0.23986 = 0.48486;
    # replace-one min_a 0.02 a + ln(1e5)/(a-1) at a = 25: 0.5 + 0.47971 = 0.97971.
    log_inv_delta = math.log(1e5)

    def by_hand(rdp_per_order):
        return min(rdp_per_order * a + log_inv_delta / (a - 1) for a in accounting.PAPER_RDP_ORDERS)

    poisson = accounting.epsilon(10.0, 1.0, 1, 1e-5, "rdp_classic", mechanism=None)
    fixed = accounting.epsilon(10.0, 1.0, 1, 1e-5, "rdp_classic", "fixed", dataset_size=100, mechanism=None)
    assert poisson == pytest.approx(by_hand(1 / 200), rel=1e-9)
    assert poisson == pytest.approx(0.48486, abs=1e-5)
    assert fixed == pytest.approx(by_hand(4 / 200), rel=1e-9)
    assert fixed == pytest.approx(0.97971, abs=1e-5)


def test_fixed_vs_poisson_events():
    poisson = accounting.step_event("poisson", 0.01, 0.7)
    assert poisson == dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(0.7))
    fixed = accounting.step_event("fixed", 32 / 24_000, 0.7, dataset_size=24_000)
    assert fixed == dp_accounting.SampledWithoutReplacementDpEvent(
        24_000, 32, dp_accounting.GaussianDpEvent(0.35)
    )
    # The installed dp_accounting still uses the convention the z/2 relies on (issue #378).
    accounting._check_replace_one_convention()


def test_fixed_accounting_in_paper_setting():
    # Fixed-size batches, replace-one: much larger than Poisson (rdp 0.9656) for the same z, because the
    # sensitivity is 2C and the without-replacement RDP bound is looser. Measured: 5.3255.
    eps = accounting.epsilon(1.5, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", "fixed", 24_000, mechanism=None)
    assert eps == pytest.approx(5.3255, abs=1e-3)
    with pytest.raises(ValueError, match="accountant='pld' cannot account for sampling='fixed'.*'rdp'"):
        accounting.epsilon(1.5, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "pld", "fixed", 24_000)


# A fixed, coarse PLD interval keeps the PLD cases fast (about 0.3 s per epsilon instead of 1 s).
FAST = {"pld_value_discretization": 1e-3}


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_monotone_in_noise_and_steps(accountant):
    q, delta = 0.01, 1e-5

    def eps(z, t):
        return accounting.epsilon(z, q, t, delta, accountant, **FAST)

    by_noise = [eps(z, 1_000) for z in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    by_steps = [eps(1.0, t) for t in (0, 10, 100, 1_000, 3_000)]
    assert by_steps[0] == 0.0
    assert all(a < b for a, b in zip(by_steps, by_steps[1:], strict=False))


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_calibrate_round_trip(accountant):
    q, steps, delta, target, tol = PAPER_Q, 4_500, 1e-6, 2.0, 1e-2

    def eps(z):
        return accounting.epsilon(z, q, steps, delta, accountant, **FAST)

    z = accounting.calibrate_noise(target, q, steps, delta, accountant, tol=tol, **FAST)
    assert eps(z) <= target
    # Smallest to the tolerance: a little less noise misses the target.
    assert eps(z * (1 - 2 * tol)) > target
    assert eps(z) == pytest.approx(target, rel=0.05)


def test_calibrate_recovers_paper_noise():
    # epsilon(0.7) = 4.9803 > 4.98, so the smallest z meeting 4.98 lies just above 0.7.
    z = accounting.calibrate_noise(4.98, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp_classic", tol=1e-4)
    assert 0.7 < z < 0.7 * 1.001


def test_calibrate_fixed_round_trip():
    def eps(z):
        return accounting.epsilon(z, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp_classic", "fixed", 24_000)

    z = accounting.calibrate_noise(
        8.0, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp_classic", "fixed", 24_000, tol=0.05
    )
    assert eps(z) <= 8.0 < eps(z * 0.9)


def test_calibrate_errors():
    with pytest.raises(ValueError, match="target_epsilon=0.0 must be a finite number > 0"):
        accounting.calibrate_noise(0.0, 0.01, 100, 1e-5)
    with pytest.raises(ValueError, match="not reachable with noise_multiplier <= 2"):
        accounting.calibrate_noise(0.01, 0.5, 10_000, 1e-5, "rdp", max_noise_multiplier=2.0)
    with pytest.raises(ValueError, match="steps=0 spends no privacy"):
        accounting.calibrate_noise(1.0, 0.01, 0, 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling_prob": 0.0}, r"sampling_prob=0.0 is outside \(0, 1\]"),
        ({"sampling_prob": 1.5}, r"sampling_prob=1.5 is outside \(0, 1\]"),
        ({"noise_multiplier": -1.0}, "noise_multiplier=-1.0 is not allowed: it must be a finite number > 0"),
        ({"noise_multiplier": 0.0}, "turn DP off"),
        ({"delta": 0.0}, r"delta=0.0 is outside \(0, 1\)"),
        ({"delta": 1.0}, r"delta=1.0 is outside \(0, 1\)"),
        ({"steps": -1}, "steps=-1 is negative"),
        ({"steps": 2.5}, "steps=2.5 must be a whole number"),
        ({"accountant": "moments"}, "accountant='moments' is unknown; choose one of"),
        ({"sampling": "shuffle"}, "sampling='shuffle' is unknown"),
        ({"sampling": "fixed", "accountant": "rdp"}, "sampling='fixed' needs dataset_size"),
        (
            {"sampling": "fixed", "accountant": "rdp", "dataset_size": 1000, "sampling_prob": 0.0125},
            "whole batch size",
        ),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"noise_multiplier": 1.0, "sampling_prob": 0.01, "steps": 10, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        accounting.epsilon(**args)


# ---------------------------------------------------------------------------------------------------
# Ledger


def test_ledger_compresses_and_matches_epsilon():
    sampler = PoissonSampler(24_000, expected_batch_size=32)
    ledger = accounting.PrivacyLedger()
    assert ledger.steps == 0 and ledger.epsilon(1e-6) == 0.0
    assert isinstance(ledger.dp_event(), dp_accounting.NoOpDpEvent)
    for _ in range(5):
        ledger.record(sampler, 0.7)
    ledger.record(sampler, 0.7, steps=PAPER_STEPS - 5)
    assert ledger.steps == PAPER_STEPS and len(ledger.entries) == 1
    assert ledger.dp_event() == dp_accounting.SelfComposedDpEvent(sampler.dp_event(0.7), PAPER_STEPS)
    for accountant in ("rdp", "rdp_classic"):
        assert ledger.epsilon(PAPER_DELTA, accountant) == accounting.epsilon(
            0.7, PAPER_Q, PAPER_STEPS, PAPER_DELTA, accountant
        )
    # A change of noise starts a new entry; the event becomes a composition of the two runs.
    ledger.record(sampler, 1.5, steps=10)
    assert len(ledger.entries) == 2
    event = ledger.dp_event()
    assert isinstance(event, dp_accounting.ComposedDpEvent)
    assert [e.count for e in event.events] == [PAPER_STEPS, 10]
    assert ledger.epsilon(PAPER_DELTA, "rdp") > accounting.epsilon(
        0.7, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp"
    )


def test_ledger_scheme_comes_from_sampler():
    shuffled = ShuffledSampler(24_000, 32)
    ledger = accounting.PrivacyLedger()
    ledger.record(shuffled, 1.5, steps=PAPER_STEPS, num_params=11_200_000)  # ResNet18: its truncation delta is 1e-10
    assert ledger.entries[0].scheme == "fixed" and ledger.entries[0].dataset_size == 24_000
    assert ledger.epsilon(PAPER_DELTA, "rdp") == pytest.approx(5.3255, abs=1e-3)
    with pytest.raises(ValueError, match="accountant='pld' cannot account for sampling='fixed'"):
        ledger.epsilon(PAPER_DELTA, "pld")
    with pytest.raises(ValueError, match="mixes sampling schemes"):
        ledger.record(PoissonSampler(24_000, expected_batch_size=32), 1.5)
    with pytest.raises(TypeError, match="takes the batch sampler"):
        ledger.record(32 / 24_000, 1.5)


def test_ledger_json_round_trip(tmp_path):
    sampler = PoissonSampler(1_000, 0.02)
    ledger = accounting.PrivacyLedger()
    ledger.record(sampler, 1.1, steps=300)
    ledger.record(sampler, 0.9, steps=200)
    restored = accounting.PrivacyLedger.from_json(ledger.to_json())
    assert restored == ledger and restored.steps == 500
    path = tmp_path / "ledger.json"
    ledger.save(path)
    loaded = accounting.PrivacyLedger.load(path)
    assert loaded == ledger
    assert loaded.epsilon(1e-5, "rdp") == ledger.epsilon(1e-5, "rdp")
    # Resuming and recording one more step makes it different.
    loaded.record(sampler, 0.9)
    assert loaded != ledger and loaded.steps == 501 and len(loaded.entries) == 2
    with pytest.raises(ValueError, match="Not a jaxdp privacy ledger"):
        accounting.PrivacyLedger.from_json('{"entries": []}')


# ---------------------------------------------------------------------------------------------------
# Extra releases on the same batch (issue 13: DPSGD-F's counts, Global-Adapt's count)


def test_combined_noise_multiplier_by_hand():
    # (1^-2 + 1^-2)^-1/2 = 1/sqrt(2); 0.7 and 10: (2.0408 + 0.01)^-1/2 = 0.69829.
    assert accounting.combined_noise_multiplier(1.0, (1.0,)) == pytest.approx(1 / math.sqrt(2))
    assert accounting.combined_noise_multiplier(0.7, (10.0,)) == pytest.approx(0.698291, abs=1e-6)
    assert accounting.combined_noise_multiplier(0.7, (10.0, 10.0)) == pytest.approx((0.7**-2 + 0.02) ** -0.5)
    assert accounting.combined_noise_multiplier(0.7) == 0.7
    with pytest.raises(ValueError, match="noise_multiplier=0.0 is not allowed"):
        accounting.combined_noise_multiplier(0.7, (0.0,))


@pytest.mark.parametrize("accountant", ["pld", "rdp", "rdp_classic"])
def test_extra_releases_cost_epsilon_and_equal_the_combined_gaussian(accountant):
    sampler = PoissonSampler(24_000, expected_batch_size=32)
    plain, method = accounting.PrivacyLedger(), accounting.PrivacyLedger()
    plain.record(sampler, 0.7, steps=PAPER_STEPS)
    for _ in range(3):  # identical steps stay one entry
        method.record(sampler, 0.7, extra_noise_multipliers=(10.0,))
    method.record(sampler, 0.7, steps=PAPER_STEPS - 3, extra_noise_multipliers=(10.0,))
    assert len(method.entries) == 1 and method.steps == PAPER_STEPS
    z_eff = accounting.combined_noise_multiplier(0.7, (10.0,))
    eps_method = method.epsilon(PAPER_DELTA, accountant)
    assert eps_method == accounting.epsilon(z_eff, PAPER_Q, PAPER_STEPS, PAPER_DELTA, accountant)
    assert eps_method >= plain.epsilon(PAPER_DELTA, accountant)
    # A strong extra release (sigma = z) costs much more: z_eff = 0.7 / sqrt(2).
    strong = accounting.PrivacyLedger()
    strong.record(sampler, 0.7, steps=PAPER_STEPS, extra_noise_multipliers=(0.7,))
    assert strong.epsilon(PAPER_DELTA, accountant) > 1.5 * plain.epsilon(PAPER_DELTA, accountant)


def test_ledger_with_extra_releases_round_trips_and_plain_json_is_unchanged():
    sampler = PoissonSampler(1_000, 0.02)
    plain = accounting.PrivacyLedger()
    plain.record(sampler, 1.1, steps=300)
    text = plain.to_json()
    assert '"version": 1' in text and "extra" not in text  # what older jaxdp versions wrote and read
    assert accounting.PrivacyLedger.from_json(text) == plain
    method = accounting.PrivacyLedger()
    method.record(sampler, 1.1, steps=300)
    method.record(sampler, 1.1, steps=200, extra_noise_multipliers=(10.0, 8.0))
    assert len(method.entries) == 2  # a different step: a new entry
    text = method.to_json()
    assert '"version": 2' in text  # a reader that ignores the extra releases must refuse it, not undercount
    restored = accounting.PrivacyLedger.from_json(text)
    assert restored == method and restored.entries[1].extra_noise_multipliers == (10.0, 8.0)
    assert restored.epsilon(1e-5, "rdp") == method.epsilon(1e-5, "rdp") > plain.epsilon(1e-5, "rdp")
    with pytest.raises(ValueError, match="version 4 is not supported"):
        accounting.PrivacyLedger.from_json(text.replace('"version": 2', '"version": 4'))


# --- What the samplers add to delta (issue 23, sections 2 and 3) --------------------------------------------------

DEMO_Q, DEMO_STEPS, DEMO_PARAMS = 256 / 12_000, 141, 20_650
RESNET18_PARAMS = 11_200_000


def test_truncation_delta_by_hand():
    """jaxdp.noise.gaussian ends at T = Q(2^-65) = 9.15529 standard deviations. At z = 0.25 the target shifts the
    sum by a = 4 of them: per step q (1 + 2^-23) Phi(-(T2 - a c)) = q 1.266e-7, with T2 = T (1 - 4e-7) / (1 + 4e-7)
    and c = 1 / (1 + 4e-7) (the quantile's error), plus 1.02e-19 per noised coordinate; 60 = q * steps of them in
    the paper: 7.6e-6, more than delta = 1e-6 (issue 23: z < 0.275 exceeds it)."""
    from scipy.special import ndtr, ndtri

    top = -ndtri(2.0**-65)
    assert top == pytest.approx(9.155294, abs=1e-6)
    rho = 4e-7
    t2, c = top * (1 - rho) / (1 + rho), 1 / (1 + rho)
    y0 = (t2 - math.sqrt(t2 * t2 - 4)) / 2
    per_coordinate = (1 + 2**-23) * ndtr(y0 - t2) + 2.0**-65
    assert per_coordinate == pytest.approx(1.0213e-19, rel=1e-4)
    by_hand = PAPER_Q * PAPER_STEPS * ((1 + 2**-23) * ndtr(4 * c - t2) + RESNET18_PARAMS * per_coordinate)
    got = accounting.truncation_delta(0.25, PAPER_Q, PAPER_STEPS, num_params=RESNET18_PARAMS)
    assert got == pytest.approx(by_hand, rel=1e-12) and got == pytest.approx(7.597e-6, rel=1e-3)
    # z = 0.7: Phi(-(9.155 - 1.43)) = 5.5e-15 per step; the coordinates' 1.1e-12 dominate.
    assert accounting.truncation_delta(0.7, PAPER_Q, PAPER_STEPS, num_params=RESNET18_PARAMS) == pytest.approx(
        6.896e-11, rel=1e-3)
    # Unknown coordinates: the largest draw, 2^32 - 1 of them (conservative).
    assert accounting.truncation_delta(0.7, PAPER_Q, PAPER_STEPS) == pytest.approx(
        60 * (2**32 - 1) * per_coordinate, rel=1e-3)
    # Replace-one (fixed batches) shifts by 2C: a = 2 / z.
    assert accounting.truncation_delta(0.5, PAPER_Q, PAPER_STEPS, num_params=0, sampling="fixed") == pytest.approx(
        PAPER_Q * PAPER_STEPS * (1 + 2**-23) * ndtr(4 * c - t2), rel=1e-9)


def test_epsilon_spends_the_truncation_delta_out_of_delta():
    """The Gaussian sampler's epsilon is the ideal mechanism's at delta - delta_trunc, so the total is delta."""
    for accountant in ("rdp", "rdp_classic", "pld"):
        trunc = accounting.truncation_delta(0.5, PAPER_Q, PAPER_STEPS, num_params=RESNET18_PARAMS)
        ideal = accounting.epsilon(0.5, PAPER_Q, PAPER_STEPS, PAPER_DELTA - trunc, accountant, mechanism=None)
        got = accounting.epsilon(0.5, PAPER_Q, PAPER_STEPS, PAPER_DELTA, accountant, num_params=RESNET18_PARAMS)
        assert got == ideal > accounting.epsilon(0.5, PAPER_Q, PAPER_STEPS, PAPER_DELTA, accountant, mechanism=None)


def test_a_noise_multiplier_whose_truncation_takes_half_of_delta_is_refused():
    """The paper's setting at z = 0.25 (what target_epsilon=100 calibrates to): refused, with the numbers."""
    message = (r"noise_multiplier=0.25 \(q=0.001333, 45000 steps, 11200000 coordinates noised per step\): the "
               r"Gaussian sampler's draws end at 9.155 standard deviations.*delta_trunc = 7.6e-06.*at least half of "
               r"delta = 1e-06. The smallest noise multiplier allowed here is 0.2848")
    with pytest.raises(accounting.SamplerDeltaError, match=message):
        accounting.epsilon(0.25, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", num_params=RESNET18_PARAMS)
    ledger = accounting.PrivacyLedger()
    ledger.record(PoissonSampler(24_000, expected_batch_size=32), 0.25, steps=PAPER_STEPS, num_params=RESNET18_PARAMS)
    with pytest.raises(accounting.SamplerDeltaError, match="the ledger's 45000 steps.*smallest noise multiplier"):
        ledger.epsilon(PAPER_DELTA, "rdp")
    # z = 0.2848 is allowed, 0.2847 is not; the ideal mechanism has no such limit.
    accounting.epsilon(0.2848, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", num_params=RESNET18_PARAMS)
    with pytest.raises(accounting.SamplerDeltaError):
        accounting.epsilon(0.2847, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", num_params=RESNET18_PARAMS)
    ideal = accounting.epsilon(0.2848, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", mechanism=None)
    assert 170 < ideal < 180
    # Calibrating to a target that needs a smaller z (RDP epsilon 200 needs about 0.27) says so instead of silently
    # adding noise; a target above the limit's epsilon is met as usual.
    with pytest.raises(accounting.SamplerDeltaError, match="target_epsilon=200.0 needs less noise than the gaussian "
                                                         r"sampler allows.*about 0.28"):
        accounting.calibrate_noise(200.0, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", num_params=RESNET18_PARAMS)
    z = accounting.calibrate_noise(100.0, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", num_params=RESNET18_PARAMS)
    assert z == pytest.approx(0.326, abs=1e-3)


def test_lattice_epsilon_at_the_demos_settings():
    """z 0.7, q 256/12000, 141 steps, delta 1e-6 (the demo's model: 20,650 parameters). The lattice's epsilon at
    the same z (its noise is z times its sensitivity C + gamma sqrt(d)) equals the ideal's up to its delta (1e-24
    here). At the same noise standard deviation as the Gaussian's (z C / (C + gamma sqrt(d)) relative to its
    sensitivity) it is 0.15% larger (5.3367 against 5.3288) for a sensitivity 0.055% larger: epsilon grows by
    2.7 times the relative increase of the sensitivity here, so at most 3 x 2^-10 = 0.3%."""
    from jaxdp import lattice

    kwargs = {"num_params": DEMO_PARAMS}
    gaussian = accounting.epsilon(0.7, DEMO_Q, DEMO_STEPS, 1e-6, **kwargs)
    lattice_eps = accounting.epsilon(0.7, DEMO_Q, DEMO_STEPS, 1e-6, mechanism="lattice", **kwargs)
    ideal = accounting.epsilon(0.7, DEMO_Q, DEMO_STEPS, 1e-6, mechanism=None)
    assert lattice_eps == pytest.approx(ideal, rel=1e-9) and gaussian == pytest.approx(ideal, rel=1e-6)
    assert 5.2 < ideal < 5.5
    increase = lattice.effective_sensitivity(1.0, DEMO_PARAMS, 0.7) - 1.0
    assert 2**-11 < increase <= 2**-10
    same_noise = accounting.epsilon(0.7 / (1 + increase), DEMO_Q, DEMO_STEPS, 1e-6, mechanism="lattice", **kwargs)
    assert 1 + 2 * increase < same_noise / gaussian <= 1 + 3 * increase
    assert accounting.lattice_delta(lattice_eps, DEMO_STEPS, num_params=DEMO_PARAMS) < 1e-24


def test_lattice_refuses_an_epsilon_too_large_for_its_total_variation():
    with pytest.raises(accounting.SamplerDeltaError, match=r"the lattice sampler's distance from the ideal rounded "
                                                         r"Gaussian \(total variation 1.7e-34 per draw"):
        accounting.epsilon(0.25, PAPER_Q, PAPER_STEPS, PAPER_DELTA, "rdp", mechanism="lattice",
                           num_params=RESNET18_PARAMS)


def test_ledger_records_the_mechanism_and_its_coordinates():
    sampler = PoissonSampler(12_000, expected_batch_size=256)
    ledger = accounting.PrivacyLedger()
    ledger.record(sampler, 0.7, steps=DEMO_STEPS, mechanism="lattice", num_params=DEMO_PARAMS)
    text = ledger.to_json()
    assert '"version": 3' in text and '"mechanism": "lattice"' in text and '"num_params": 20650' in text
    restored = accounting.PrivacyLedger.from_json(text)
    assert restored == ledger and restored.entries[0].mechanism == "lattice"
    assert restored.epsilon(1e-6, "rdp") == accounting.epsilon(0.7, DEMO_Q, DEMO_STEPS, 1e-6, "rdp",
                                                               mechanism="lattice", num_params=DEMO_PARAMS)
    ledger.record(sampler, 0.7, mechanism="gaussian", num_params=DEMO_PARAMS)
    assert len(ledger.entries) == 2  # another mechanism: another entry
    with pytest.raises(ValueError, match="mechanism='float' is not a noise mechanism"):
        ledger.record(sampler, 0.7, mechanism="float")
