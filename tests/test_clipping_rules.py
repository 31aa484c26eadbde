"""Per-example clip rules (clipped_grad(..., clip_rule=...)): every strategy, microbatching, sensitivity.

The rules below are the ones issue 13's methods need: DPSGD-F (each group g has its own bound C_g: factor
min(1, C_g / norm)), global clipping (factor C / Z if norm <= Z, else 0: sensitivity C) and global-adapt
(C / Z if norm <= Z, else min(1, C / norm): sensitivity C).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clipping_testlib import CONVNET_LOSS, ConvNet, assert_same, cross_entropy_loss, flat, normal, perturbed

import jaxdp
from jaxdp import clipping
from jaxdp.models import random_params

TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class PerGroupBounds:
    """DPSGD-F: clip_args is each example's group id."""

    bounds: tuple[float, ...]

    def factors(self, norms, group):
        return jnp.minimum(1.0, jnp.asarray(self.bounds)[group] / jnp.maximum(norms, TINY))

    @property
    def sensitivity(self):
        return max(self.bounds)


@dataclasses.dataclass(frozen=True)
class GlobalClipping:
    l2_clip_norm: float
    threshold: float  # Z

    def factors(self, norms, clip_args):
        return jnp.where(norms <= self.threshold, self.l2_clip_norm / self.threshold, 0.0)

    @property
    def sensitivity(self):
        return self.l2_clip_norm


@dataclasses.dataclass(frozen=True)
class GlobalAdapt:
    l2_clip_norm: float
    threshold: float

    def factors(self, norms, clip_args):
        clipped = jnp.minimum(1.0, self.l2_clip_norm / jnp.maximum(norms, TINY))
        return jnp.where(norms <= self.threshold, self.l2_clip_norm / self.threshold, clipped)

    @property
    def sensitivity(self):
        return self.l2_clip_norm


@pytest.fixture(scope="module")
def convnet():
    model = ConvNet()
    x = normal(0, (6, 9, 9, 3))
    x = x.at[3].set(jnp.nan)  # a poisoned example: zeroed, and never shown to the rule as live
    y = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([True, True, True, True, True, False])  # the last example is padding
    params = perturbed(random_params(model, x[:1], seed=1))
    groups = jnp.array([0, 1, 1, 0, 0, 1])
    norms = np.asarray(jax.jit(jaxdp.clipped_grad(CONVNET_LOSS, 1.0))(params, x, y, mask)[1])
    return params, x, y, mask, groups, norms


def _rules(norms):
    live = np.sort(norms[np.isfinite(norms)])
    threshold = float((live[1] + live[2]) / 2)  # between two norms: no example sits at the jump of the rule
    return {
        "dpsgd_f": PerGroupBounds((0.3 * live[0], 2.0 * live[-1])),  # group 0 clipped, group 1 not
        "global": GlobalClipping(0.5, threshold),
        "global_adapt": GlobalAdapt(0.5 * live[0], threshold),
    }


@pytest.mark.parametrize("rule_name", ["dpsgd_f", "global", "global_adapt"])
def test_every_strategy_and_microbatching_match_vmap(convnet, rule_name):
    params, x, y, mask, groups, norms = convnet
    rule = _rules(norms)[rule_name]
    ref = jax.jit(jaxdp.clipped_grad(CONVNET_LOSS, 1.0, clip_rule=rule, return_loss=True))(
        params, x, y, mask, groups)
    # The reference is what the rule says, example by example: factors from vmap's norms, summed by hand.
    grads = jax.jit(jax.vmap(jax.grad(lambda p, a, b: CONVNET_LOSS(p, a[None], b[None])), in_axes=(None, 0, 0)))(
        params, x, y)
    live = np.asarray(mask) & np.isfinite(norms)
    factors = np.where(live, np.asarray(rule.factors(jnp.asarray(np.where(live, norms, 0.0)), groups)), 0.0)
    by_hand = sum(f * flat(jax.tree_util.tree_map(lambda g, i=i: g[i], grads)) for i, f in enumerate(factors) if f)
    np.testing.assert_allclose(flat(ref[0]), by_hand, rtol=1e-5, atol=1e-7)
    for strategy in clipping.available_strategies():
        out = jax.jit(jaxdp.clipped_grad(CONVNET_LOSS, 1.0, 4, strategy=strategy, clip_rule=rule, return_loss=True))(
            params, x, y, mask, groups)
        assert_same(out, ref)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


_MLP_LOSS = cross_entropy_loss(MLP())


@pytest.mark.parametrize("strategy", ["vmap", "bookkeeping"])
@pytest.mark.parametrize("rule_name", ["dpsgd_f", "global", "global_adapt"])
def test_sensitivity_of_rules_add_remove(strategy, rule_name):
    """Removing any one example moves the clipped sum by at most the rule's bound, and some example attains it."""
    batch = 12
    x = normal(40, (batch, 5)) * 4
    y = jnp.asarray(np.arange(batch) % 3)
    groups = jnp.asarray(np.arange(batch) % 2)
    params = perturbed(random_params(MLP(), x[:1], seed=41))
    everyone = jnp.ones(batch, bool)
    norms = np.asarray(jax.jit(jaxdp.clipped_grad(_MLP_LOSS, 1.0, strategy=strategy))(params, x, y, everyone)[1])
    rule = {
        # Group 1 has the larger bound; both bounds are below every norm here, so each example contributes C_g.
        "dpsgd_f": PerGroupBounds((0.2 * norms.min(), 0.5 * norms.min())),
        # Z at the median norm: the examples at or below it contribute C * norm / Z, the one at Z contributes C.
        "global": GlobalClipping(0.1, float(np.sort(norms)[batch // 2])),
        "global_adapt": GlobalAdapt(0.1, float(np.sort(norms)[batch // 2])),
    }[rule_name]
    fn = jax.jit(jaxdp.clipped_grad(_MLP_LOSS, 1.0, strategy=strategy, clip_rule=rule))
    full = flat(fn(params, x, y, everyone, groups)[0])
    moved = [np.linalg.norm(full - flat(fn(params, x, y, jnp.arange(batch) != i, groups)[0])) for i in range(batch)]
    assert max(moved) <= rule.sensitivity * (1 + 1e-5)
    np.testing.assert_allclose(max(moved), rule.sensitivity, rtol=1e-4)


def test_rule_arguments_are_checked():
    rule = GlobalClipping(1.0, 2.0)
    with pytest.raises(ValueError, match="clip_rule works with one flat l2_clip_norm"):
        jaxdp.clipped_grad(_MLP_LOSS, {"Dense_0": 1.0, "Dense_1": 1.0}, clip_rule=rule)
    with pytest.raises(ValueError, match="factors"):
        jaxdp.clipped_grad(_MLP_LOSS, 1.0, clip_rule=lambda norms, args: norms)
    x = normal(42, (4, 5))
    params = random_params(MLP(), x[:1], seed=43)
    fn = jaxdp.clipped_grad(_MLP_LOSS, 1.0, clip_rule=PerGroupBounds((1.0, 2.0)))
    with pytest.raises(ValueError, match="leading axis 4"):
        fn(params, x, jnp.zeros(4, int), jnp.ones(4, bool), jnp.zeros(3, int))

    class WrongShape:
        def factors(self, norms, clip_args):
            return jnp.ones(())

    with pytest.raises(ValueError, match="one factor per example"):
        jaxdp.clipped_grad(_MLP_LOSS, 1.0, clip_rule=WrongShape())(params, x, jnp.zeros(4, int), jnp.ones(4, bool))
