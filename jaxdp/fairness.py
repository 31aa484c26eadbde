"""Per-group classification metrics, fairness gaps with confidence intervals, and per-group clipping statistics.

Binary labels and groups: label 1 is the positive class (*smiling* in the paper, Farrand et al. 2020; income above
50K in UCI Adult), and the two groups are 0 and 1 (in the paper's study group 0 is *female*, the majority, and
group 1 *male*, the minority; a run's ``final.json`` names its groups in ``group_names``). Accuracies are in
**percent**, as in the paper's tables; every other rate (demographic parity, TPR, FPR, FNR) is a fraction in
[0, 1]. The accuracy gap is signed, group 0 minus group 1, in percentage points (the paper's "female minus male");
the other gaps are absolute differences of rates in [0, 1].

Confidence intervals are Wilson score intervals by default. With the paper's minority test sets (3 male images at
99.9% female, 55 at 99%) a point estimate alone misleads, and the usual normal (Wald) interval collapses to a
point at 0/n or n/n. Wilson's interval has coverage close to the nominal level on average, never leaves [0, 1]
and is not degenerate at 0/n or n/n (Brown, Cai & DasGupta 2001, "Interval Estimation for a Binomial
Proportion", recommend it for small n). ``method="clopper-pearson"`` gives the exact interval, whose coverage is
at least nominal for every true rate, at the price of being wider (conservative).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

GROUPS = (0, 1)
CI_METHODS = ("wilson", "clopper-pearson")


def proportion_ci(
    successes: int, trials: int, *, confidence: float = 0.95, method: str = "wilson"
) -> tuple[float, float]:
    """Two-sided confidence interval for a binomial proportion ``successes / trials``, within [0, 1].

    ``trials == 0`` gives the uninformative ``(0.0, 1.0)``. Wilson: centre ``(p + z^2/2n) / (1 + z^2/n)``, half-width
    ``z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)`` with ``z`` the ``(1+confidence)/2`` normal quantile; e.g.
    3/3 at 95% is (0.4385, 1.0). Clopper-Pearson: quantiles of Beta(k, n-k+1) and Beta(k+1, n-k); 3/3 at 95% is
    (0.2924, 1.0).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")
    if method not in CI_METHODS:
        raise ValueError(f"method={method!r} is not a known interval; choose one of {CI_METHODS}.")
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got successes={successes}, trials={trials}.")
    if trials == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    if method == "clopper-pearson":
        low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
        high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
        return low, high
    z = float(stats.norm.ppf(1 - alpha / 2))
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_binary(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one entry per example), got shape {array.shape}.")
    if array.dtype == bool:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold 0/1 integers or booleans, got dtype {array.dtype}.")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        raise ValueError(
            f"{name} must hold only 0 and 1 ({_MEANING[name]}); found {np.unique(array[bad])[:5].tolist()}"
            + (
                " (predicted probabilities or logits? pass the predicted class, e.g. argmax of the logits)"
                if name == "y_pred"
                else ""
            )
            + "."
        )
    return array.astype(np.int64)


_MEANING = {
    "y_true": "1 = smiling",
    "y_pred": "1 = predicted smiling",
    "group": "0 = female, 1 = male",
}


def group_metrics(
    y_true: Any, y_pred: Any, group: Any, *, confidence: float = 0.95, method: str = "wilson"
) -> dict[str, float | int]:
    """Accuracy and fairness metrics overall and per group, with confidence intervals for every per-group rate.

    Args:
      y_true: labels, 0/1 (1 = the positive class, e.g. smiling), numpy or jax, ints, floats equal to 0/1, or
        bools; shape [N].
      y_pred: predicted classes, 0/1, shape [N].
      group: sensitive attribute, 0/1 (e.g. 0 = female, 1 = male), shape [N].
      confidence: level of the intervals (0.95).
      method: ``"wilson"`` (default) or ``"clopper-pearson"``; see the module docstring.

    Returns:
      A flat dict (JSON-ready Python numbers). For ``g`` in 0, 1:

      * counts (int): ``n``, ``n_g``, ``n_pos_g`` (label 1), ``n_neg_g`` (label 0), and the confusion table
        ``tp_g, fp_g, tn_g, fn_g``;
      * ``accuracy``, ``accuracy_g`` -- percent of correct predictions;
      * ``demographic_parity_g`` = P(yhat=1 | group g);
      * ``tpr_g`` = P(yhat=1 | y=1, g) (equality of opportunity), ``fnr_g`` = 1 - ``tpr_g``,
        ``fpr_g`` = P(yhat=1 | y=0, g) -- fractions in [0, 1];
      * for each of those rates ``r`` (and overall ``accuracy``): ``r_ci_low``, ``r_ci_high`` (same units as ``r``);
      * gaps: ``delta_accuracy`` = ``accuracy_0 - accuracy_1`` (signed, percentage points);
        ``delta_demographic_parity``, ``delta_equal_opportunity`` (TPR), ``delta_fpr`` -- absolute differences.

      A rate whose denominator is 0 (an empty group, a group without positives or negatives) is NaN with the
      interval (0, 1) (0 to 100 for accuracy), and any gap involving it is NaN; no division warning is raised.

    Example::

        m = group_metrics(labels, logits.argmax(-1), is_male)
        print(f"female {m['accuracy_0']:.1f}% male {m['accuracy_1']:.1f}% "
              f"[{m['accuracy_1_ci_low']:.1f}, {m['accuracy_1_ci_high']:.1f}]")
    """
    if method not in CI_METHODS:
        raise ValueError(f"method={method!r} is not a known interval; choose one of {CI_METHODS}.")
    y_true, y_pred, group = _as_binary("y_true", y_true), _as_binary("y_pred", y_pred), _as_binary("group", group)
    if not len(y_true) == len(y_pred) == len(group):
        raise ValueError(
            f"y_true, y_pred and group must have one entry per example; got lengths {len(y_true)}, {len(y_pred)}, "
            f"{len(group)}."
        )

    metrics: dict[str, float | int] = {}

    def rate(name: str, successes: int, trials: int, scale: float = 1.0) -> None:
        metrics[name] = scale * successes / trials if trials else math.nan
        low, high = proportion_ci(successes, trials, confidence=confidence, method=method)
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = scale * low, scale * high

    n = len(y_true)
    metrics["n"] = n
    rate("accuracy", int(np.sum(y_true == y_pred)), n, scale=100.0)
    for g in GROUPS:
        in_group = group == g
        tp = int(np.sum(in_group & (y_true == 1) & (y_pred == 1)))
        fn = int(np.sum(in_group & (y_true == 1) & (y_pred == 0)))
        fp = int(np.sum(in_group & (y_true == 0) & (y_pred == 1)))
        tn = int(np.sum(in_group & (y_true == 0) & (y_pred == 0)))
        n_pos, n_neg = tp + fn, fp + tn
        metrics.update({f"n_{g}": n_pos + n_neg, f"n_pos_{g}": n_pos, f"n_neg_{g}": n_neg})
        metrics.update({f"tp_{g}": tp, f"fp_{g}": fp, f"tn_{g}": tn, f"fn_{g}": fn})
        rate(f"accuracy_{g}", tp + tn, n_pos + n_neg, scale=100.0)
        rate(f"demographic_parity_{g}", tp + fp, n_pos + n_neg)
        rate(f"tpr_{g}", tp, n_pos)
        rate(f"fnr_{g}", fn, n_pos)
        rate(f"fpr_{g}", fp, n_neg)

    # NaN propagates through the differences: a gap is undefined when either rate is.
    metrics["delta_accuracy"] = metrics["accuracy_0"] - metrics["accuracy_1"]
    metrics["delta_demographic_parity"] = abs(metrics["demographic_parity_0"] - metrics["demographic_parity_1"])
    metrics["delta_equal_opportunity"] = abs(metrics["tpr_0"] - metrics["tpr_1"])
    metrics["delta_fpr"] = abs(metrics["fpr_0"] - metrics["fpr_1"])
    return metrics


# --- clipping diagnostics (inside the jitted training step) ----------------------------------------------------

CLIP_SUM_KEYS = tuple(f"{name}_{g}" for name in ("n", "nonfinite", "clipped", "norm_sum") for g in GROUPS)


def clip_diagnostics(
    per_example_norms: jax.Array, mask: jax.Array, group: jax.Array, l2_clip_norm: Any
) -> dict[str, jax.Array]:
    """Per-group clipping counts of one batch, as sums to accumulate across steps (jit-friendly, no branching).

    The paper explains the accuracy disparity by minority examples having larger gradients and being clipped
    more; these sums let every run check that. For ``g`` in 0, 1 (``group`` values other than 0/1 are counted
    in neither), over the *real* examples (``mask`` True; padding is ignored):

    * ``n_g`` (int32): real examples of group ``g`` in the batch (0 when the group is absent);
    * ``nonfinite_g`` (int32): those whose norm is inf/NaN (their gradient was zeroed by ``clipped_grad``);
    * ``clipped_g`` (int32): those with a finite pre-clip norm strictly above ``l2_clip_norm`` (exactly the ones
      ``min(1, C/||g||)`` scales down);
    * ``norm_sum_g`` (float32): sum of their finite pre-clip norms.

    Args:
      per_example_norms: float[B] pre-clip L2 norms of each example's whole gradient (from ``clipped_grad``).
      mask: bool[B], False for padding.
      group: int[B] (or bool), 0 = female, 1 = male.
      l2_clip_norm: the flat clipping bound C (a scalar; with per-layer bounds pass the bound the norms are
        compared against, e.g. sqrt of the sum of squared per-layer bounds, and read the fraction accordingly).

    Privacy: these statistics are computed from the private training examples without noise, so they are not
    covered by the run's DP guarantee. They are diagnostics for the researcher; publishing them with the model
    would leak information beyond epsilon.

    Accumulate with ``jax.tree.map(jnp.add, total, batch_sums)`` starting from :func:`zero_clip_diagnostics`,
    and turn the totals into fractions and means with :func:`finalize_clip_diagnostics`.
    """
    norms = jnp.asarray(per_example_norms, jnp.float32)
    mask = jnp.asarray(mask, bool)
    group = jnp.asarray(group)
    if norms.ndim != 1 or mask.shape != norms.shape or group.shape != norms.shape:
        raise ValueError(
            "per_example_norms, mask and group must all have shape [B]; got "
            f"{norms.shape}, {mask.shape}, {group.shape}."
        )
    if jnp.ndim(l2_clip_norm) != 0:
        raise ValueError(
            "clip_diagnostics compares each example's whole-gradient norm to one bound: pass a scalar "
            f"l2_clip_norm, got an array of shape {jnp.shape(l2_clip_norm)}."
        )
    finite = jnp.isfinite(norms)
    sums: dict[str, jax.Array] = {}
    for g in GROUPS:
        real = mask & (group == g)
        sums[f"n_{g}"] = jnp.sum(real, dtype=jnp.int32)
        sums[f"nonfinite_{g}"] = jnp.sum(real & ~finite, dtype=jnp.int32)
        sums[f"clipped_{g}"] = jnp.sum(real & finite & (norms > l2_clip_norm), dtype=jnp.int32)
        sums[f"norm_sum_{g}"] = jnp.sum(jnp.where(real & finite, norms, 0.0))
    return {key: sums[key] for key in CLIP_SUM_KEYS}


def zero_clip_diagnostics() -> dict[str, jax.Array]:
    """The empty accumulator for :func:`clip_diagnostics` sums."""
    return {key: jnp.zeros((), jnp.float32 if key.startswith("norm_sum") else jnp.int32) for key in CLIP_SUM_KEYS}


def finalize_clip_diagnostics(sums: Mapping[str, Any]) -> dict[str, float | int]:
    """Fractions and means from accumulated :func:`clip_diagnostics` sums (host side, plain Python numbers).

    For ``g`` in 0, 1: ``clip_fraction_g`` = ``clipped_g / (n_g - nonfinite_g)`` (fraction of the group's
    examples with a finite norm that were clipped), ``grad_norm_mean_g`` = ``norm_sum_g / (n_g - nonfinite_g)``,
    and the counts ``n_g``, ``nonfinite_g``. NaN where the group had no example with a finite norm.
    """
    missing = [key for key in CLIP_SUM_KEYS if key not in sums]
    if missing:
        raise ValueError(f"sums lack {missing}; pass the (accumulated) output of clip_diagnostics.")
    result: dict[str, float | int] = {}
    for g in GROUPS:
        n, nonfinite = int(sums[f"n_{g}"]), int(sums[f"nonfinite_{g}"])
        counted = n - nonfinite
        result[f"clip_fraction_{g}"] = int(sums[f"clipped_{g}"]) / counted if counted else math.nan
        result[f"grad_norm_mean_{g}"] = float(sums[f"norm_sum_{g}"]) / counted if counted else math.nan
        result[f"n_{g}"] = n
        result[f"nonfinite_{g}"] = nonfinite
    return result
