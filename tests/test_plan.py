"""The public DP plan (jaxdp.plan) as a user drives it: its own loss, arrays and loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp


def _linear_plan():
    def loss_fn(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(batch["x"] @ params["w"], batch["y"])

    dp = jaxdp.DPConfig(l2_clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    return jaxdp.make_plan(dp, loss_fn, dataset_size=64, batch_size=16, steps=4, optimizer=optax.sgd(0.1))


def test_init_after_a_donating_step_gives_a_fresh_usable_state():
    # train_step donates its state; a second init (a restart, a checkpoint template) must not hand back arrays the
    # first state's step deleted, and both states start from the same values (the same secret noise key).
    plan = _linear_plan()
    params = {"w": jnp.zeros((3, 2))}
    data = {"x": np.ones((64, 3), np.float32), "y": np.zeros(64, np.int32)}
    first = plan.init(params)
    batch, mask = plan.gather(data, plan.batch(0))
    stepped, _ = plan.train_step(first, batch, mask)
    second = plan.init(params)
    again, _ = plan.train_step(second, batch, mask)
    for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(params["w"]), np.zeros((3, 2)))  # the caller's arrays survive


def test_the_optimizer_may_be_a_function_of_the_step_count():
    import optax

    from jaxdp import DPConfig, make_plan

    seen = []

    def optimizer(num_steps):
        seen.append(num_steps)
        return optax.sgd(optax.linear_schedule(0.1, 0.0, num_steps))

    plan = make_plan(DPConfig(l2_clip_norm=1.0, noise_multiplier=1.0, delta=1e-5), lambda p, b: b["x"] @ p,
                     dataset_size=1000, batch_size=50, epochs=3, optimizer=optimizer)
    assert seen == [60] == [plan.num_steps]  # 3 epochs of round(1000 / 50) steps
    with pytest.raises(TypeError, match=r"optimizer\(num_steps=60\) must return an optax.GradientTransformation"):
        make_plan(None, lambda p, b: b["x"] @ p, dataset_size=1000, batch_size=50, epochs=3,
                  optimizer=lambda n: 0.1)
