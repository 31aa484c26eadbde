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


def test_a_batch_over_several_chunks_runs_the_one_compiled_program_and_takes_the_one_chunk_step():
    """A Poisson batch wider than the chunk width takes several chunks through the same compiled program (no second
    compile), and the step it takes equals the one-chunk step on the same examples."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)).astype(np.float32), rng.integers(0, 3, 12).astype(np.int32)

    def loss_fn(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(batch["x"] @ params["w"], batch["y"])

    dp = jaxdp.DPConfig(l2_clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, reproducible=True)
    plan = jaxdp.make_plan(dp, loss_fn, dataset_size=12, batch_size=4, steps=3, optimizer=optax.sgd(0.5))
    params = {"w": jnp.zeros((5, 3))}
    mask = np.ones((1, 12), bool)
    one, _ = plan.train_step(plan.init(params), {"x": x[None], "y": y[None]}, mask)
    assert plan.chunk_step._cache_size() == 1
    three, out = plan.train_step(plan.init(params), {"x": x.reshape(3, 4, 5), "y": y.reshape(3, 4)},
                                 mask.reshape(3, 4))
    assert plan.chunk_step._cache_size() == 2  # the chunk width changed (12 -> 4), not the number of chunks
    again, _ = plan.train_step(plan.init(params), {"x": x.reshape(3, 4, 5)[:2], "y": y.reshape(3, 4)[:2]},
                               mask.reshape(3, 4)[:2])
    assert plan.chunk_step._cache_size() == 2  # two chunks of 4: the same program as three chunks of 4
    np.testing.assert_allclose(np.asarray(one.params["w"]), np.asarray(three.params["w"]), rtol=1e-5, atol=1e-6)
    assert out.norms.shape == (3, 4) and out.losses.shape == (3, 4)
    assert int(one.opt_state[0].count) == int(three.opt_state[0].count) == 1  # the noise advanced once per step


def test_one_chunk_without_the_chunk_axis_from_device_arrays_equals_the_host_chunk_and_bad_inputs_are_named():
    """A one-chunk batch may come as device arrays without the chunk axis (passed to the program as they are) and
    gives the step the host arrays with a chunk axis give; inputs whose shapes disagree are refused by name."""
    plan = _linear_plan()
    params = {"w": jnp.zeros((3, 2))}
    rng = np.random.default_rng(1)
    data = {"x": rng.normal(size=(64, 3)).astype(np.float32), "y": rng.integers(0, 2, 64).astype(np.int32)}
    batch, mask = plan.gather(data, plan.batch(0))
    assert mask.shape[0] == 1
    host, host_out = plan.train_step(plan.init(params), batch, mask)
    device_batch = jax.tree.map(lambda a: jnp.asarray(a[0]), batch)
    device, device_out = plan.train_step(plan.init(params), device_batch, jnp.asarray(mask[0]))
    np.testing.assert_array_equal(np.asarray(host.params["w"]), np.asarray(device.params["w"]))
    np.testing.assert_array_equal(np.asarray(host_out.norms), np.asarray(device_out.norms))
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(5, 3\); every leaf must start with the mask's"):
        plan.train_step(plan.init(params), {"x": np.ones((5, 3), np.float32), "y": np.zeros(mask.shape[1], np.int32)},
                        mask[0])
    with pytest.raises(ValueError, match=r"mask must be bool\[n_chunks, width\]"):
        plan.train_step(plan.init(params), batch, mask.astype(np.float32))
    with pytest.raises(ValueError, match=r"groups must be integers of the mask's shape"):
        plan.train_step(plan.init(params), batch, mask, groups=np.zeros(3, np.int32))


def test_no_compiled_program_holds_the_secret_noise_key(tmp_path):
    """Every program JAX compiles goes to its persistent compilation cache when one is on (the study's sweeps turn
    it on), and its cache key is computed from the program: a program holding the secret key as a constant would
    write it to disk. Every module lowered for ``init`` and two ``train_step`` calls is searched for the key's
    words; a program that compiles the key in is caught (the control)."""
    import re

    from jax._src import config as jax_config

    previous = jax_config.jax_dump_ir_to.value
    jax.config.update("jax_dump_ir_to", str(tmp_path))
    jax.clear_caches()

    def holding(words):
        numbers = [str(int(w)) for w in words]
        blob = "0x" + np.asarray(words, "<u4").tobytes().hex().upper()
        return [p.name for p in sorted(tmp_path.iterdir()) if blob in p.read_text().upper()
                or all(re.search(rf"(?<![0-9]){n}(?![0-9])", p.read_text()) for n in numbers)]

    try:
        plan = _linear_plan()
        assert plan.dp.noise_mechanism == "lattice"
        data = {"x": np.ones((64, 3), np.float32), "y": np.zeros(64, np.int32)}
        state = plan.init({"w": jnp.zeros((3, 2))})
        key = np.asarray(state.opt_state[0].key, np.uint32)
        for step in range(2):
            state, _ = plan.train_step(state, *plan.gather(data, plan.batch(step)))
        jax.block_until_ready(state)
        lowered = [p.name for p in tmp_path.iterdir()]
        assert any("chunk_fn" in n for n in lowered) and any("init" in n for n in lowered), lowered
        assert holding(key) == []
        secret = key.copy()  # a host array closed over is compiled in as a constant
        jax.block_until_ready(jax.jit(lambda x: x + secret)(jnp.zeros(4, jnp.uint32)))
        assert len(holding(key)) == 1
    finally:
        jax.config.update("jax_dump_ir_to", previous)
        jax.clear_caches()
