"""DP-fairness methods (jaxdp.methods): sensitivity on every clipping strategy, the released counts and the state
they produce, the config schema, the plan's accounting and count noise, and the misalignment cosines."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clipping_testlib import cross_entropy_loss, flat, normal, perturbed

import jaxdp
from jaxdp import accounting, clipping, diagnostics, methods, steps
from jaxdp.config import base_config, resolve, validate_run_config
from jaxdp.models import random_params
from jaxdp_study import grid


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


LOSS = cross_entropy_loss(MLP())
BATCH = 12


@pytest.fixture(scope="module")
def batch():
    x = normal(40, (BATCH, 5)) * 4
    y = jnp.asarray(np.arange(BATCH) % 3)
    groups = jnp.asarray((np.arange(BATCH) % 3 == 0).astype(np.int32))  # 4 of group 1, 8 of group 0
    params = perturbed(random_params(MLP(), x[:1], seed=41))
    norms = np.asarray(jax.jit(jaxdp.clipped_grad(LOSS, 1.0))(params, x, y, jnp.ones(BATCH, bool))[1])
    return params, x, y, groups, norms


def _method_and_state(name, norms):
    """Each method in a state where its bound is attained by some example (see the test)."""
    low = float(norms.min())
    if name == "dpsgd":
        return methods.DPSGD(0.5 * low), {}
    if name == "dpsgd_f":
        # Released counts m = (1, 3), o = (4, 0): b = (0.2, 1), mean 0.6, C_k = C0 (1 + b_k / 0.6) = (4/3, 8/3) C0;
        # C0 below every norm, so every example contributes exactly its group's bound and group 1 has the max.
        m = methods.DPSGDF(base_clip_norm=0.2 * low, count_noise_multiplier=10.0)
        return m, {"counts": jnp.array([1.0, 3.0, 4.0, 0.0])}
    median = float(np.sort(norms)[BATCH // 2])  # Z at an example's norm: it contributes C * norm / Z = C
    if name == "dpsgd_global":
        return methods.DPSGDGlobal(0.1, median), {}
    m = methods.DPSGDGlobalAdapt(0.1, 100.0, 10.0, 0.1, 1.0, 32.0)
    return m, {"threshold": jnp.asarray(median, jnp.float32)}


def _sensitivity(method, state):
    s = method.noise_sensitivity(state)
    return float(s) if s is not None else method.l2_clip_norm


@pytest.mark.parametrize("strategy", clipping.available_strategies())
@pytest.mark.parametrize("name", methods.METHODS)
def test_removing_one_example_moves_the_clipped_sum_by_at_most_the_stated_bound_and_attains_it(batch, strategy,
                                                                                                name):
    params, x, y, groups, _ = batch
    # The norms this strategy computes (upper bounds, equal to vmap's up to rounding): Z sits exactly at one.
    norms = np.asarray(jax.jit(jaxdp.clipped_grad(LOSS, 1.0, strategy=strategy))(params, x, y,
                                                                                 jnp.ones(BATCH, bool))[1])
    method, state = _method_and_state(name, norms)
    bound = _sensitivity(method, state)
    if name == "dpsgd_f":
        np.testing.assert_allclose(method.group_bounds(state), [4 / 3 * 0.2 * norms.min(), 8 / 3 * 0.2 * norms.min()],
                                   rtol=1e-6)
        assert bound == pytest.approx(8 / 3 * 0.2 * norms.min(), rel=1e-6)
    fn = jax.jit(jaxdp.clipped_grad(LOSS, method.l2_clip_norm if name != "dpsgd_f" else 1.0, strategy=strategy,
                                    clip_rule=method.clip_rule))
    clip_args = method.clip_args(state, groups)
    full = flat(fn(params, x, y, jnp.ones(BATCH, bool), clip_args)[0])
    moved = [np.linalg.norm(full - flat(fn(params, x, y, jnp.arange(BATCH) != i, clip_args)[0]))
             for i in range(BATCH)]
    assert max(moved) <= bound * (1 + 1e-5)
    np.testing.assert_allclose(max(moved), bound, rtol=1e-4)


def test_global_clipping_drops_and_global_adapt_clips_above_the_threshold(batch):
    params, x, y, groups, norms = batch
    z = float(np.sort(norms)[BATCH // 2])
    above = norms > z
    drop = methods.DPSGDGlobal(0.1, z).clip_rule.factors(jnp.asarray(norms), None)
    adapt = methods.GlobalRule(0.1, None, adapt=True).factors(jnp.asarray(norms), jnp.full(BATCH, z))
    np.testing.assert_allclose(np.asarray(drop)[~above], 0.1 / z, rtol=1e-6)
    assert np.all(np.asarray(drop)[above] == 0)
    np.testing.assert_allclose(np.asarray(adapt)[above], 0.1 / norms[above], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adapt)[~above], 0.1 / z, rtol=1e-6)


# --- released counts and the state they produce ------------------------------------------------------------------


def test_dpsgd_f_counts_and_bounds_by_hand():
    m = methods.DPSGDF(base_clip_norm=1.0, count_noise_multiplier=10.0)
    norms = jnp.array([0.5, 2.0, 1.0, 3.0, jnp.nan, 0.2, 5.0])
    groups = jnp.array([0, 0, 0, 1, 1, 1, 0])
    mask = jnp.array([True, True, True, True, True, True, False])  # the last is padding
    # Group 0: 2.0 above C0, 0.5 and 1.0 (= C0) at or below; group 1: 3.0 and the non-finite one above, 0.2 below.
    np.testing.assert_array_equal(m.counts(norms, mask, groups, m.init_state()), [1, 2, 2, 1])
    # No counts yet: every b_k is taken as 1, C_k = 2 C0.
    np.testing.assert_allclose(m.group_bounds(m.init_state()), [2.0, 2.0])
    # m = (2, 6), o = (8, 4): b = (0.2, 0.6), mean 0.4: C = (1.5, 2.5); the noise is scaled to 2.5.
    state = m.update({}, jnp.array([2.3, 6.9, 8.0, 4.5]))  # noisy counts are rounded down
    np.testing.assert_array_equal(state["counts"], [2, 6, 8, 4])
    np.testing.assert_allclose(m.group_bounds(state), [1.5, 2.5])
    assert float(m.noise_sensitivity(state)) == pytest.approx(2.5)
    # Negative noisy counts are clamped at 0; no count above C0 anywhere: every bound is C0.
    state = m.update({}, jnp.array([-3.0, -0.5, 7.0, 2.0]))
    np.testing.assert_array_equal(state["counts"], [0, 0, 7, 2])
    np.testing.assert_allclose(m.group_bounds(state), [1.0, 1.0])
    assert m.public_state(state) == {"method_clip_norm_0": 1.0, "method_clip_norm_1": 1.0}


def test_global_adapt_count_and_threshold_update_by_hand():
    m = methods.DPSGDGlobalAdapt(1.0, 4.0, 10.0, 0.1, 0.5, 32.0)
    state = m.init_state()
    norms = jnp.array([1.0, 2.0, 2.5, 9.0, jnp.inf, 0.1])
    mask = jnp.array([True, True, True, True, True, False])
    # tau Z = 2: 2.5, 9 and the non-finite one are above; 2.0 is not; the padding is not counted.
    np.testing.assert_array_equal(m.counts(norms, mask, jnp.zeros(6, int), state), [3])
    new = m.update(state, jnp.array([16.0]))  # Z <- 4 exp(-0.1 + 16 / 32)
    assert float(new["threshold"]) == pytest.approx(4 * math.exp(0.4), rel=1e-6)
    assert m.public_state(new) == {"method_threshold": pytest.approx(4 * math.exp(0.4), rel=1e-6)}


# --- the config ---------------------------------------------------------------------------------------------------


def test_method_parameters_default_to_the_reference_values_in_the_resolved_config():
    c = base_config()
    assert c.dp.method == "dpsgd" and c.dp.dpsgd_global.threshold is None
    c.dp.method = "dpsgd_global_adapt"
    validate_run_config(c)
    assert resolve(c)["dp"]["dpsgd_global_adapt"] == {"initial_threshold": 100.0, "count_noise_multiplier": 10.0,
                                                      "threshold_learning_rate": 0.1, "count_threshold_factor": 1.0}
    assert resolve(c)["dp"]["dpsgd_f"] == {"base_clip_norm": None, "count_noise_multiplier": None}
    c.dp.method, c.dp.l2_clip_norm = "dpsgd_f", 2.0
    assert resolve(c)["dp"]["dpsgd_f"] == {"base_clip_norm": 2.0, "count_noise_multiplier": 10.0}  # C0 = C


@pytest.mark.parametrize("overrides,message", [
    ({"dp.method": "fair"}, r"config.dp.method='fair' is not a method; choose one of 'dpsgd', 'dpsgd_f', "
                            r"'dpsgd_global', 'dpsgd_global_adapt'"),
    ({"dp.method": "dpsgd_f", "dp.dpsgd_global.threshold": 10.0},
     r"config.dp.dpsgd_global.threshold=10.0 is a parameter of dp.method='dpsgd_global', but "
     r"config.dp.method='dpsgd_f' \(whose parameters are: config.dp.dpsgd_f.base_clip_norm, "
     r"config.dp.dpsgd_f.count_noise_multiplier\)"),
    ({"dp.dpsgd_f.count_noise_multiplier": 5.0}, r"config.dp.method='dpsgd' \(whose parameters are: none\)"),
    ({"dp.method": "dpsgd_global", "dp.dpsgd_global.threshold": -1.0},
     r"config.dp.dpsgd_global.threshold=-1.0 must be a finite number > 0"),
    ({"dp.method": "dpsgd_global", "dp.enabled": False}, r"needs config.dp.enabled=True"),
])
def test_unknown_methods_and_foreign_parameters_are_refused(overrides, message):
    c = base_config()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate_run_config(c)


def test_an_unknown_parameter_is_refused_with_the_allowed_ones():
    c = base_config()
    with c.dp.dpsgd_global.unlocked():
        c.dp.dpsgd_global.z = 3.0
    with pytest.raises(ValueError, match=r"config.dp.dpsgd_global.z is not a parameter of 'dpsgd_global'; its "
                                         r"parameters are config.dp.dpsgd_global.threshold"):
        validate_run_config(c)


def test_every_method_has_one_display_name_and_parameters_in_method_order():
    # The report names methods by methods.DISPLAY_NAMES; a method added to METHODS without a name would print raw.
    assert tuple(methods.DISPLAY_NAMES) == methods.METHODS == tuple(methods.PARAMETERS)
    assert methods.DISPLAY_NAMES["dpsgd_f"] == "DPSGD-F" and len(set(methods.DISPLAY_NAMES.values())) == 4


def test_methods_are_an_ordinary_sweep_axis():
    c = base_config()
    c.sweep.methods = grid.grid({"privacy": ("medium",), "dp.method": methods.METHODS})
    c.sweep.threshold = grid.grid({"privacy": ("medium",), "dp.method": ("dpsgd_global",),
                                   "dp.dpsgd_global.threshold": (10.0,)})
    runs = {r.name: r.config for r in grid.expand(c)}
    assert sorted(c.dp.method for c in runs.values()) == sorted([*methods.METHODS, "dpsgd_global"])
    assert runs["medium-ff0.7-clip5-seed0-threshold10-methoddpsgd_global"].dp.dpsgd_global.threshold == 10.0
    c.sweep.threshold = grid.grid({"privacy": ("medium",), "dp.dpsgd_global.threshold": (10.0,)})
    with pytest.raises(grid.SweepError, match="is a parameter of dp.method='dpsgd_global'"):
        grid.expand(c)


# --- the plan: accounting, calibration and the count noise -------------------------------------------------------


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _config(method, **dp):
    c = base_config()
    c.dp.method = method
    c.dp.noise_mechanism = "gaussian"  # accounted as accounting.epsilon's default mechanism, below
    c.dp.reproducible = True
    c.train.batch_size = 32
    c.train.epochs = 10
    for k, v in dp.items():
        c.dp[k] = v
    return c


def test_the_ledger_records_each_methods_releases_with_the_gradient():
    eps = {}
    for method in methods.METHODS:
        p = steps.plan_from_config(_config(method), _Model(), 1000, secret=None)
        ledger = accounting.PrivacyLedger()
        for _ in range(p.total_steps):
            p.record_step(ledger)
        assert len(ledger.entries) == 1
        eps[method] = ledger.epsilon(1e-5, "rdp")
    z_eff = accounting.combined_noise_multiplier(0.7, (10.0,))
    expected = accounting.epsilon(z_eff, 32 / 1000, p.total_steps, 1e-5, "rdp")
    assert eps["dpsgd_f"] == eps["dpsgd_global_adapt"] == expected > eps["dpsgd"] == eps["dpsgd_global"]


def test_target_epsilon_is_met_by_the_composition():
    c = _config("dpsgd_f", target_epsilon=2.0, accountant="rdp")
    p = steps.plan_from_config(c, _Model(), 1000, secret=None)
    ledger = accounting.PrivacyLedger()
    p.record_step(ledger)
    ledger.record(p.sampler, p.noise_multiplier, steps=p.total_steps - 1, extra_noise_multipliers=(10.0,))
    assert ledger.steps == p.total_steps and len(ledger.entries) == 1
    assert 1.99 < ledger.epsilon(1e-6, "rdp") <= 2.0
    plain = steps.plan_from_config(_config("dpsgd", target_epsilon=2.0, accountant="rdp"), _Model(), 1000, secret=None)
    assert p.noise_multiplier > plain.noise_multiplier  # the counts' share of the budget costs gradient noise
    costly = _config("dpsgd_f", target_epsilon=2.0, accountant="rdp")
    costly.dp.dpsgd_f.count_noise_multiplier = 0.3
    with pytest.raises(ValueError, match="cannot be met: the method's own releases"):
        steps.plan_from_config(costly, _Model(), 1000, secret=None)


def test_count_noise_is_gaussian_from_the_secret_noise_key():
    c = _config("dpsgd_global_adapt")
    c.dp.reproducible = False
    p = steps.plan_from_config(c, _Model(), 1000, secret=2**100 + 7)
    q = steps.plan_from_config(c, _Model(), 1000, secret=2**100 + 8)
    m = p.method
    step_ids = jnp.arange(4000)
    state = m.init_state()
    # The secret key comes from the noise state, an argument of the compiled function (never a constant of it).
    release = jax.jit(jax.vmap(lambda t, n: p.release(state, jnp.zeros(1), t, n)["threshold"], in_axes=(0, None)))
    other = jax.jit(jax.vmap(lambda t, n: q.release(state, jnp.zeros(1), t, n)["threshold"], in_axes=(0, None)))
    # Z' = Z exp(-eta + sigma N / B): recover N.
    thresholds = np.asarray(release(step_ids, p.noise.init(None)))
    draws = (np.log(thresholds / m.initial_threshold) + m.threshold_learning_rate) * \
        m.expected_batch_size / m.count_noise_multiplier
    assert abs(draws.mean()) < 0.06 and abs(draws.std() - 1) < 0.04
    assert abs(np.corrcoef(draws[1:], draws[:-1])[0, 1]) < 0.06  # fresh noise every step
    other_draws = np.log(np.asarray(other(step_ids, q.noise.init(None))) / m.initial_threshold)
    assert abs(np.corrcoef(draws, other_draws)[0, 1]) < 0.06  # another secret, other noise
    # Plain DP-SGD releases nothing else: its release is the identity.
    dpsgd = steps.plan_from_config(_config("dpsgd"), _Model(), 1000, secret=1)
    assert dpsgd.release({"x": 1}, jnp.zeros(0), 0, dpsgd.noise.init(None)) == {"x": 1}


# --- training with a method -----------------------------------------------------------------------------------------


def test_counts_are_exact_over_chunks_and_devices():
    """One batch as one chunk of 24, or as two chunks of 12 over 1 or 2 devices: the same counts, equal to numpy's."""
    from test_train import tiny_config, tiny_datasets

    from jaxdp import models, parallel

    config = tiny_config(**{"dp.method": "dpsgd_f", "dp.reproducible": True})
    train_set, _ = tiny_datasets()
    model = models.create_model(config.model, private=True)
    variables = models.init_variables(model, jax.random.key(0, impl="rbg"))
    idx = np.arange(24)
    p = steps.plan_from_config(config, model, len(train_set.label), secret=None)
    mesh1 = parallel.make_mesh(1)
    (one,) = steps.step_batches(mesh1, train_set, idx[None], np.ones((1, 24), bool))
    norms_of = jax.jit(lambda params, b, p=p: p.clipped_grad(
        params, {"inputs": steps.normalize_inputs(b.inputs), "labels": b.labels}, None, b.mask,
        p.clip_args(p.init_method_state(), b.groups))[1])
    norms = np.asarray(norms_of(variables["params"], one))
    c0 = float(np.median(norms))  # C0 between the norms: both counts of a group are used
    config.dp.dpsgd_f.base_clip_norm = c0
    reference = None
    for devices, width in ((1, 24), (1, 12), (2, 12)):
        mesh = parallel.make_mesh(devices)
        p = steps.plan_from_config(config, model, len(train_set.label), secret=None, mesh=mesh)
        state = parallel.replicate(mesh, p.init(variables["params"]))

        def step_counts(s, chunks, p=p):  # the counts the step releases, summed over its chunks and devices
            acc = p.zero_accumulator(s.params)
            for c, b in enumerate(chunks):
                x = {"inputs": steps.normalize_inputs(b.inputs), "labels": b.labels}
                _, acc, _ = p.chunk_fn(s, acc, x, b.mask, b.groups, c == 0, False)
            return acc.counts

        chunks = steps.step_batches(mesh, train_set, idx.reshape(-1, width), np.ones((24 // width, width), bool))
        counts = np.asarray(jax.jit(step_counts)(state, chunks))
        if reference is None:
            groups = train_set.group[idx]
            above = [np.sum((groups == k) & (norms > c0)) for k in (0, 1)]
            below = [np.sum((groups == k) & (norms <= c0)) for k in (0, 1)]
            reference = np.array(above + below, np.float32)
            assert reference.sum() == 24 and reference.min() > 0
        np.testing.assert_array_equal(counts, reference)


def test_misalignment_cosines_by_hand():
    g0, g1 = {"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([0.0, 3.0])}  # sums of 2 and 3 examples
    directions = {"clipped": {"w": jnp.array([1.0, 1.0])}, "noised": {"w": jnp.array([-1.0, 0.0])}}
    out = diagnostics.misalignment_cosines([g0, g1], jnp.array([2.0, 3.0]), jnp.array([0.75, 0.25]), directions)
    # Means (1, 0) and (0, 1); overall 0.75 (1, 0) + 0.25 (0, 1) = (0.75, 0.25).
    assert float(out["cos_clipped_0"]) == pytest.approx(1 / math.sqrt(2))
    assert float(out["cos_clipped_1"]) == pytest.approx(1 / math.sqrt(2))
    assert float(out["cos_clipped_all"]) == pytest.approx(1.0 / (math.sqrt(0.625) * math.sqrt(2)))
    assert float(out["cos_noised_0"]) == pytest.approx(-1.0) and float(out["cos_noised_1"]) == pytest.approx(0.0)
    empty = diagnostics.misalignment_cosines([g0, g1], jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]), directions)
    assert math.isnan(float(empty["cos_clipped_1"])) and float(empty["cos_clipped_all"]) == pytest.approx(
        1 / math.sqrt(2))


def _expand(name):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
    return {r.name: r.config for r in grid.expand(grid.load_config(path))}


def test_mitigation_configs_sweep_the_methods_and_share_run_names_with_the_plain_studies():
    paper, mitigations = _expand("paper"), _expand("mitigations")
    assert len(mitigations) == 65  # 4 levels x 5 fractions of DP-SGD / non-DP + 3 methods x 3 levels x 5 fractions
    assert sorted({c.dp.method for c in mitigations.values()}) == sorted(methods.METHODS)
    plain = {n for n, c in mitigations.items() if c.dp.method == "dpsgd"}
    assert plain <= set(paper) and len(plain) == 20  # --workdir results/paper reuses them
    assert mitigations["low-ff0.999-clip5-seed0-methoddpsgd_global_adapt"].dp.noise_multiplier == 0.5
    demo, demo_mitigations = _expand("demo"), _expand("demo_mitigations")
    assert len(demo_mitigations) == 18
    assert {n for n, c in demo_mitigations.items() if c.dp.method == "dpsgd"} <= set(demo)
    run = demo_mitigations["medium-ff0.99-clip1-seed0-methoddpsgd_f"]
    assert (run.data.image_size, run.train.batch_size, run.dp.clipping_strategy) == (32, 256, "auto")


def test_misalignment_of_a_step_matches_per_example_gradients_computed_by_hand():
    """The cosines the trainer writes, against a reference from vmap'd single-example gradients of the same inputs
    (the same flips): each group's mean over the public sample vs the batch's unclipped and clipped sums."""
    import functools

    from test_train import tiny_config, tiny_datasets

    from jaxdp import models, parallel

    config = tiny_config(**{"dp.reproducible": True})
    train_set, _ = tiny_datasets()
    model = models.create_model(config.model, private=True)
    variables = models.init_variables(model, jax.random.key(0, impl="rbg"))
    mesh = parallel.make_mesh(1)
    p = steps.plan_from_config(config, model, len(train_set.label), secret=None)
    state = parallel.replicate(mesh, p.init(variables["params"]))
    flip_key = jax.random.fold_in(jax.random.key(0), 2)
    sample = diagnostics.MisalignmentSample(config, train_set, mesh, p.sampler.physical_batch_size)
    batch = p.sampler.batch(3)
    chunks = steps.step_batches(mesh, train_set, batch.indices, batch.mask)
    step = jax.jit(functools.partial(steps.train_step, plan=p, flip_key=flip_key, diagnostics_on=False,
                                     return_update=True))
    unclipped_sum = jax.jit(functools.partial(steps.unclipped_sum_step, plan=p, flip_key=flip_key))
    zeros = p.zero_accumulator(state.params).grad_sum
    sums = sample.sums(unclipped_sum, zeros, state, chunks, 3)  # before the step's update, as the loop
    _, _, update = steps.run_step(step, p, state, {}, chunks, 3)
    cosines = sample.cosines(jax.jit(diagnostics.misalignment_cosines), sums, update)

    def one(params, x, y):
        return steps.cross_entropy(model.apply({"params": params}, x[None], train=True), y[None])[0]

    per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))

    def grads(chunk_list):
        rows, mask = [], []
        for b in chunk_list:
            g = per_example(state.params, steps.model_inputs(b, jnp.int32(3), flip_key), b.labels)
            rows += [flat(jax.tree_util.tree_map(lambda a, i=i: a[i], g)) for i in range(b.mask.shape[0])]
            mask += list(np.asarray(b.mask))
        return np.array(rows), np.array(mask)

    g, mask = grads(chunks)
    unclipped = (g * mask[:, None]).sum(0)
    clipped = (g * (mask * np.minimum(1, 1.0 / np.linalg.norm(g, axis=1)))[:, None]).sum(0)  # C = 1
    means = []
    for k in (0, 1):
        gk, mk = grads(sample.chunks[k])
        means.append((gk * mk[:, None]).sum(0) / mk.sum())
    overall = sample.weights[0] * means[0] + sample.weights[1] * means[1]

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for name, direction in (("unclipped", unclipped), ("clipped", clipped)):
        for k in (0, 1):
            assert cosines[f"cos_{name}_{k}"] == pytest.approx(cos(means[k], direction), abs=1e-4)
        assert cosines[f"cos_{name}_all"] == pytest.approx(cos(overall, direction), abs=1e-4)
    assert abs(cosines["cos_noised_all"]) < abs(cosines["cos_clipped_all"])  # z = 0.5: the noise turns it further


def test_global_adapt_divides_its_count_by_the_public_expected_batch_size():
    """An audited run samples from its training set plus the canaries its secret coins let in (dataset_size), at
    the q of the public training set (public_size): the threshold update must not depend on the coins."""
    c = _config("dpsgd_global_adapt")
    for pool in (1000, 1013, 1040):  # the public 1000 plus 0, 13 or 40 canaries
        p = steps.plan_from_config(c, _Model(), pool, secret=None, public_size=1000)
        assert p.method.expected_batch_size == 32.0 == p.expected_batch_size
        assert p.sampler.sampling_prob == 32 / 1000
