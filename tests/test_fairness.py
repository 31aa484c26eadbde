"""Tests of jaxdp.fairness against hand-counted confusion tables and hand-computed intervals."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.fairness import (
    clip_diagnostics,
    finalize_clip_diagnostics,
    group_metrics,
    proportion_ci,
    zero_clip_diagnostics,
)

# Fifteen test images, groups interleaved (0 = female, 1 = male; label 1 = smiling):
#   index   0  1  2  3  4  5  6  7  8  9 10 11 12 13 14
GROUP = [0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
Y_TRUE = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]
Y_PRED = [1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0]
# Group 0 (indices 0 2 3 5 6 8 9 11 12 14), 10 images:
#                 pred 1   pred 0
#   true 1 (6)    TP 4     FN 2        (indices 0 2 5 8 | 3 11)
#   true 0 (4)    FP 1     TN 3        (index 6 | 9 12 14)
#   accuracy 7/10 = 70%, demographic parity (4+1)/10 = 0.5, TPR 4/6, FNR 2/6, FPR 1/4
# Group 1 (indices 1 4 7 10 13), 5 images:
#                 pred 1   pred 0
#   true 1 (2)    TP 1     FN 1        (index 1 | 4)
#   true 0 (3)    FP 2     TN 1        (indices 7 10 | 13)
#   accuracy 2/5 = 40%, demographic parity 3/5 = 0.6, TPR 1/2, FNR 1/2, FPR 2/3
# Overall accuracy 9/15 = 60%.


def test_hand_counted_confusion_tables():
    m = group_metrics(np.array(Y_TRUE), np.array(Y_PRED), np.array(GROUP))
    assert (m["tp_0"], m["fn_0"], m["fp_0"], m["tn_0"]) == (4, 2, 1, 3)
    assert (m["tp_1"], m["fn_1"], m["fp_1"], m["tn_1"]) == (1, 1, 2, 1)
    assert (m["n"], m["n_0"], m["n_1"], m["n_pos_0"], m["n_neg_0"], m["n_pos_1"], m["n_neg_1"]) == (
        15,
        10,
        5,
        6,
        4,
        2,
        3,
    )
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["accuracy_0"] == pytest.approx(70.0)
    assert m["accuracy_1"] == pytest.approx(40.0)
    assert m["demographic_parity_0"] == pytest.approx(0.5)
    assert m["demographic_parity_1"] == pytest.approx(0.6)
    assert m["tpr_0"] == pytest.approx(4 / 6)
    assert m["tpr_1"] == pytest.approx(0.5)
    assert m["fnr_0"] == pytest.approx(2 / 6)
    assert m["fnr_1"] == pytest.approx(0.5)
    assert m["fpr_0"] == pytest.approx(0.25)
    assert m["fpr_1"] == pytest.approx(2 / 3)
    # Gaps: accuracy signed female - male in percentage points; the others absolute, in [0, 1].
    assert m["delta_accuracy"] == pytest.approx(30.0)
    assert m["delta_demographic_parity"] == pytest.approx(0.1)
    assert m["delta_equal_opportunity"] == pytest.approx(4 / 6 - 0.5)
    assert m["delta_fpr"] == pytest.approx(2 / 3 - 0.25)


def test_gap_sign_when_the_minority_is_better():
    swapped = group_metrics(Y_TRUE, Y_PRED, [1 - g for g in GROUP])
    assert swapped["delta_accuracy"] == pytest.approx(-30.0)
    assert swapped["delta_demographic_parity"] == pytest.approx(0.1)


def test_intervals_are_wilson_in_the_units_of_their_rate():
    m = group_metrics(Y_TRUE, Y_PRED, GROUP)
    # Wilson 95% for 7/10 (z = 1.95996): centre (0.7 + 0.19208) / 1.38415 = 0.64449,
    # half-width 1.95996 / 1.38415 * sqrt(0.021 + 0.0096036) = 0.24771 -> (0.3968, 0.8922); in percent.
    assert m["accuracy_0_ci_low"] == pytest.approx(39.68, abs=0.01)
    assert m["accuracy_0_ci_high"] == pytest.approx(89.22, abs=0.01)
    # Wilson 95% for 1/2: symmetric around 1/2, (0.0945, 0.9055).
    assert m["tpr_1_ci_low"] == pytest.approx(0.0945, abs=1e-4)
    assert m["tpr_1_ci_high"] == pytest.approx(0.9055, abs=1e-4)
    for key in ["accuracy", "accuracy_1", "demographic_parity_0", "tpr_0", "fnr_0", "fpr_1"]:
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]


def test_wilson_and_clopper_pearson_at_the_extremes():
    # Wilson 3/3, z^2 = 3.84146: centre (1 + 0.64024) / 2.28049 = 0.71925, half-width
    # 1.95996 / 2.28049 * sqrt(3.84146 / 36) = 0.28075 -> (0.43850, 1); 0/3 mirrors it: (0, 0.56150).
    assert proportion_ci(3, 3) == pytest.approx((0.43850, 1.0), abs=1e-5)
    assert proportion_ci(0, 3) == pytest.approx((0.0, 0.56150), abs=1e-5)
    # Clopper-Pearson 3/3: lower = 0.025 ** (1/3) = 0.29240; 0/3: upper = 1 - 0.025 ** (1/3) = 0.70760.
    assert proportion_ci(3, 3, method="clopper-pearson") == pytest.approx((0.025 ** (1 / 3), 1.0), abs=1e-6)
    assert proportion_ci(0, 3, method="clopper-pearson") == pytest.approx((0.0, 1 - 0.025 ** (1 / 3)), abs=1e-6)
    # 7/10 exact interval (0.3475, 0.9333), the textbook value.
    low, high = proportion_ci(7, 10, method="clopper-pearson")
    assert (round(low, 4), round(high, 4)) == (0.3475, 0.9333)
    # 99% is wider than 95%.
    assert proportion_ci(3, 3, confidence=0.99)[0] < proportion_ci(3, 3)[0]
    assert proportion_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        proportion_ci(1, 2, confidence=95)
    with pytest.raises(ValueError, match="'exact'.*wilson"):
        proportion_ci(1, 2, method="exact")


def test_group_without_positives_has_nan_tpr_and_gap_without_warnings():
    # Group 1 has three non-smiling images only: TPR/FNR undefined, FPR = 1/3.
    y_true, y_pred, group = [1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = group_metrics(y_true, y_pred, group)
    assert m["n_pos_1"] == 0 and m["n_neg_1"] == 3
    assert math.isnan(m["tpr_1"]) and math.isnan(m["fnr_1"])
    assert (m["tpr_1_ci_low"], m["tpr_1_ci_high"]) == (0.0, 1.0)
    assert m["fpr_1"] == pytest.approx(1 / 3)
    assert math.isnan(m["delta_equal_opportunity"])
    assert m["delta_fpr"] == pytest.approx(1 / 3 - 0.0)  # group 0: FP 0 of 1 negative
    assert m["accuracy_1"] == pytest.approx(200 / 3)


def test_empty_group_gives_nan_rates_and_gaps_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = group_metrics(jnp.array([1, 0, 1]), jnp.array([1, 1, 1]), jnp.zeros(3, jnp.int32))
    assert m["n_1"] == 0
    for key in ["accuracy_1", "demographic_parity_1", "tpr_1", "fpr_1", "fnr_1"]:
        assert math.isnan(m[key]), key
    assert (m["accuracy_1_ci_low"], m["accuracy_1_ci_high"]) == (0.0, 100.0)
    for key in ["delta_accuracy", "delta_demographic_parity", "delta_equal_opportunity", "delta_fpr"]:
        assert math.isnan(m[key]), key
    assert m["accuracy"] == pytest.approx(200 / 3)


def test_inputs_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"y_pred must hold only 0 and 1.*0\.7.*argmax"):
        group_metrics([1, 0], [0.7, 0.2], [0, 1])
    with pytest.raises(ValueError, match=r"group must hold only 0 and 1 \(0 = female, 1 = male\); found \[2\]"):
        group_metrics([1, 0], [1, 0], [0, 2])
    with pytest.raises(ValueError, match="lengths 3, 2, 3"):
        group_metrics([1, 0, 1], [1, 0], [0, 1, 1])
    with pytest.raises(ValueError, match="1-D"):
        group_metrics([[1, 0]], [[1, 0]], [[0, 1]])
    # Booleans and floats equal to 0/1 are accepted.
    m = group_metrics(np.array([True, False]), np.array([1.0, 0.0]), np.array([False, True]))
    assert m["accuracy"] == 100.0


# --- clipping diagnostics ---------------------------------------------------------------------------------------

# index:    0    1    2    3     4       5     6    7
NORMS = [1.0, 6.0, 7.0, 5.0, np.inf, 10.0, 3.0, 8.0]
MASK = [True, True, True, True, True, True, False, True]  # index 6 is padding
GROUPS = [0, 0, 1, 1, 0, 1, 0, 1]
# C = 5. Group 0, real: 1.0, 6.0, inf -> n 3, non-finite 1, clipped 1 (6 > 5), norm sum 7 -> fraction 1/2, mean 3.5.
# Group 1: 7, 5, 10, 8 -> n 4, clipped 3 (5 is at the bound, not above), sum 30 -> fraction 3/4, mean 7.5.


def test_clip_diagnostics_on_hand_made_norms_inside_jit():
    sums = jax.jit(clip_diagnostics)(jnp.array(NORMS), jnp.array(MASK), jnp.array(GROUPS), 5.0)
    assert {k: float(v) for k, v in sums.items()} == {
        "n_0": 3, "n_1": 4, "nonfinite_0": 1, "nonfinite_1": 0,
        "clipped_0": 1, "clipped_1": 3, "norm_sum_0": 7.0, "norm_sum_1": 30.0,
    }  # fmt: skip
    final = finalize_clip_diagnostics(sums)
    assert final == {
        "clip_fraction_0": 0.5, "grad_norm_mean_0": 3.5, "n_0": 3, "nonfinite_0": 1,
        "clip_fraction_1": 0.75, "grad_norm_mean_1": 7.5, "n_1": 4, "nonfinite_1": 0,
    }  # fmt: skip


def test_clip_diagnostics_accumulate_across_steps_with_an_absent_group():
    total = zero_clip_diagnostics()
    total = jax.tree.map(jnp.add, total, clip_diagnostics(jnp.array(NORMS), jnp.array(MASK), jnp.array(GROUPS), 5.0))
    # Second batch: only women, norms 2 and 9 (one clipped).
    only_female = clip_diagnostics(jnp.array([2.0, 9.0]), jnp.array([True, True]), jnp.array([0, 0]), 5.0)
    assert int(only_female["n_1"]) == 0 and float(only_female["norm_sum_1"]) == 0.0
    assert math.isnan(finalize_clip_diagnostics(only_female)["clip_fraction_1"])
    total = jax.tree.map(jnp.add, total, only_female)
    final = finalize_clip_diagnostics(total)
    assert final["n_0"] == 5
    assert final["clip_fraction_0"] == pytest.approx(2 / 4)  # (6, 9) of the finite (1, 6, 2, 9)
    assert final["grad_norm_mean_0"] == pytest.approx(18 / 4)
    assert final["clip_fraction_1"] == pytest.approx(0.75)
    empty = finalize_clip_diagnostics(zero_clip_diagnostics())
    assert math.isnan(empty["grad_norm_mean_0"]) and empty["n_0"] == 0


def test_clip_diagnostics_refuses_per_layer_bounds_and_bad_shapes():
    with pytest.raises(ValueError, match="scalar"):
        clip_diagnostics(jnp.ones(2), jnp.ones(2, bool), jnp.zeros(2, int), jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        clip_diagnostics(jnp.ones(2), jnp.ones(3, bool), jnp.zeros(2, int), 1.0)
    with pytest.raises(ValueError, match="lack"):
        finalize_clip_diagnostics({"n_0": 1})
