"""The Gaussian noise transformation: scale, independence, determinism, optax composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.noise import noise_stddev

N = 200_000  # coordinates; the sample std of N normals has relative standard error 1/sqrt(2N) = 0.16%


def zeros():
    return {"a": jnp.zeros((N // 2,)), "b": jnp.zeros((N // 4, 2))}


def flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("z,c,b", [(0.7, 5.0, 32), (1.5, 1.0, 256), (0.5, 10.0, 1)])
def test_noise_standard_deviation_is_z_c_over_b(z, c, b):
    tx = jaxdp.dp_noise(noise_multiplier=z, l2_clip_norm=c, expected_batch_size=b, key=jax.random.key(0))
    out, _ = jax.jit(tx.update)(zeros(), tx.init(zeros()))
    sample = flat(out)
    expected = z * c / b
    assert noise_stddev(z, c, b) == pytest.approx(expected)
    # 1% is 6 standard errors: a wrong scale (sqrt(B), missing z or C, 2C) fails by far more.
    assert np.std(sample) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(sample)) < 6 * expected / np.sqrt(N)


def test_fresh_independent_noise_every_step_and_every_leaf():
    tx = jaxdp.dp_noise(1.0, 1.0, 1, jax.random.key(3))
    state = tx.init(zeros())
    update = jax.jit(tx.update)
    first, state = update(zeros(), state)
    second, state = update(zeros(), state)
    a, b = flat(first), flat(second)
    # Correlation of independent standard normals: |r| < 6 / sqrt(N) with overwhelming probability.
    assert abs(np.corrcoef(a, b)[0, 1]) < 6 / np.sqrt(N)
    leaf_a = np.ravel(first["a"])
    leaf_b = np.ravel(first["b"])
    assert abs(np.corrcoef(leaf_a, leaf_b)[0, 1]) < 6 / np.sqrt(N // 2)
    assert int(state.count) == 2


def test_same_key_same_noise_and_resume_from_state():
    tx = jaxdp.dp_noise(1.0, 2.0, 4, jax.random.key(7))
    s0 = tx.init(zeros())
    out1, s1 = tx.update(zeros(), s0)
    out2, _ = tx.update(zeros(), s1)
    # A state restored from a checkpoint (plain arrays) continues with the same draws.
    restored = type(s1)(key=np.asarray(s1.key), count=np.asarray(s1.count))
    out2_resumed, _ = tx.update(zeros(), restored)
    np.testing.assert_array_equal(flat(out2), flat(out2_resumed))
    again, _ = jaxdp.dp_noise(1.0, 2.0, 4, jax.random.key(7)).update(zeros(), s0)
    np.testing.assert_array_equal(flat(out1), flat(again))


def test_zero_noise_divides_the_sum_by_the_expected_batch_size():
    grads = {"w": jnp.array([8.0, -4.0])}
    tx = optax.chain(jaxdp.dp_noise(0.0, 1.0, 4, jax.random.key(0)), optax.sgd(1.0))
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["w"], [-2.0, 1.0])


def test_per_layer_bounds_use_total_sensitivity():
    tx = jaxdp.dp_noise(1.0, {"a": 3.0, "b": 4.0}, 1, jax.random.key(0))
    out, _ = tx.update(zeros(), tx.init(zeros()))
    assert np.std(flat(out)) == pytest.approx(5.0, rel=0.01)


def test_invalid_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0; got -1.0"):
        jaxdp.dp_noise(-1.0, 1.0, 32, key)
    with pytest.raises(ValueError, match="expected_batch_size must be an integer >= 1; got 0"):
        jaxdp.dp_noise(1.0, 1.0, 0, key)
    with pytest.raises(ValueError, match="l2_clip_norm must be a finite number > 0"):
        jaxdp.dp_noise(1.0, float("inf"), 32, key)


# --- Tails (issue 11, section 2) ----------------------------------------------------------------------------

TAIL = 5.3  # jax.random.normal in float32 never exceeds +5.22 sigma


def test_both_tails_beyond_5_3_sigma_match_the_gaussian_over_2e8_draws():
    """Count of draws beyond +5.3 and below -5.3 sigma through dp_noise: each tail is Poisson with mean
    n * P(N > 5.3) = 11.7; accepted between its 1e-4 and 1 - 1e-4 quantiles (1 and 26). jax.random.normal in
    float32 has no draw above 5.22 sigma, so its upper count is 0 and fails."""
    from scipy.stats import norm, poisson

    size, steps = 2**24, 12  # 2.0e8 draws in chunks of 16.8M (bounded memory)
    tx = jaxdp.dp_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1, key=jax.random.key(11))
    grads = {"w": jnp.zeros((size,), jnp.float32)}

    @jax.jit
    def tail_counts(state):
        out, state = tx.update(grads, state)
        return jnp.sum(out["w"] > TAIL), jnp.sum(out["w"] < -TAIL), state

    state, upper, lower = tx.init(grads), 0, 0
    for _ in range(steps):
        above, below, state = tail_counts(state)
        upper, lower = upper + int(above), lower + int(below)
    expected = size * steps * norm.sf(TAIL)
    low, high = poisson.ppf(1e-4, expected), poisson.isf(1e-4, expected)
    assert (low, high) == (1, 26)
    assert low <= upper <= high, f"{upper} draws above +{TAIL} sigma; a Gaussian gives {expected:.1f}"
    assert low <= lower <= high, f"{lower} draws below -{TAIL} sigma; a Gaussian gives {expected:.1f}"


def _bits(high, low):
    return jnp.asarray(np.array(high, np.uint32)), jnp.asarray(np.array(low, np.uint32))


def test_extreme_bit_patterns_reach_9_sigma_and_follow_the_gaussian_quantile():
    """The transform from 64 random bits: top bit the sign, 63 bits m, value ±Q((m + 1/2) 2^-64). The most
    extreme patterns give ±Q(2^-65) = ±9.155; every magnitude matches scipy's ndtri in float64."""
    from scipy.special import ndtri

    # m = 0, 1, 2^k for k = 1..62 and 2^63 - 1, through both halves of the 64 bits.
    ms = [0, 1] + [2**k for k in range(1, 63)] + [2**63 - 1]
    high = [m >> 32 for m in ms]
    low = [m & 0xFFFFFFFF for m in ms]
    negative = np.asarray(jaxdp.noise._normal_from_bits(*_bits(high, low)), np.float64)
    positive = np.asarray(jaxdp.noise._normal_from_bits(*_bits([h | 0x80000000 for h in high], low)), np.float64)
    np.testing.assert_array_equal(positive, -negative)  # symmetric
    reference = ndtri((np.array(ms, np.float64) + 0.5) * 2.0**-64)  # float64: m + 1/2 rounds, harmlessly
    np.testing.assert_allclose(negative[:-1], reference[:-1], rtol=4e-7)
    assert abs(negative[-1]) < 1e-6  # m = 2^63 - 1: u = 1/2 - 2^-65 rounds to 1/2 in float32, Q = 0
    assert negative[0] == pytest.approx(-9.1553, abs=1e-4)
    assert positive[0] >= 9.0 and positive[1] == pytest.approx(-ndtri(1.5 * 2.0**-64), rel=4e-7)
    assert np.all(np.diff(negative) > 0)  # monotone in m
    beyond = positive[np.abs(positive) > 0]
    assert (beyond > 6).sum() >= 30 and (beyond > 7).sum() >= 20 and (beyond > 9).sum() >= 2


def test_upper_quantile_matches_ndtri_everywhere():
    """Q(u) = Phi^-1(1 - u) in float32 against scipy in float64 on a log grid from 2^-65 to 1/2 (all three
    polynomial pieces), relative error < 4e-7, and monotone."""
    from scipy.special import ndtri

    u = np.unique(np.concatenate([2.0 ** np.linspace(-65, -1, 200_001), np.linspace(0.25, 0.5, 20_001)]))
    u = np.unique(u.astype(np.float32))
    q = np.asarray(jax.jit(jaxdp.noise._upper_quantile)(jnp.asarray(u)), np.float64)
    reference = -ndtri(u.astype(np.float64))
    live = reference > 1e-3
    assert np.max(np.abs(q[live] / reference[live] - 1)) < 4e-7
    assert np.max(np.abs(q[~live] - reference[~live])) < 1e-9
    assert np.all(np.diff(q) <= 0)


def test_gaussian_shapes_dtypes_keys_and_chunking():
    key = jax.random.key(5)
    z = jaxdp.noise.gaussian(key, (2**20 + 7,))
    assert z.dtype == jnp.float32
    # Value i comes from counter i: a prefix is the same whatever the size (the draw is chunked).
    np.testing.assert_array_equal(jaxdp.noise.gaussian(key, (1000,)), z[:1000])
    np.testing.assert_array_equal(jaxdp.noise.gaussian(key, (10, 100)).ravel(), z[:1000])
    assert np.std(np.asarray(z)) == pytest.approx(1.0, rel=0.005)
    assert jaxdp.noise.gaussian(key, (3, 4), jnp.bfloat16).dtype == jnp.bfloat16
    assert jaxdp.noise.gaussian(key, (0,)).shape == (0,)
    # Typed and raw keys with the same data give the same draws; a 64-bit key is zero-padded to 128 bits.
    raw = jax.random.key_data(key)
    np.testing.assert_array_equal(jaxdp.noise.gaussian(raw, (8,)), z[:8])
    padded = jnp.concatenate([raw, jnp.zeros(2, jnp.uint32)])
    np.testing.assert_array_equal(jaxdp.noise.gaussian(jax.random.wrap_key_data(padded, impl="rbg"), (8,)), z[:8])
    with pytest.raises(ValueError, match="floating-point"):
        jaxdp.noise.gaussian(key, (3,), jnp.int32)
    with pytest.raises(ValueError, match="single PRNG key"):
        jaxdp.noise.gaussian(jax.random.split(key, 2), (3,))


def test_threefry4x32_known_answer_vectors():
    """Random123's known-answer vectors for Threefry-4x32 with 20 rounds (kat_vectors: counter, key, output)."""
    vectors = [
        ("00000000 00000000 00000000 00000000", "00000000 00000000 00000000 00000000",
         "9c6ca96a e17eae66 fc10ecd4 5256a7d8"),
        ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff ffffffff ffffffff",
         "2a881696 57012287 f6c7446e a16a6732"),
        ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0 082efa98 ec4e6c89",
         "59cd1dbb b8879579 86b5d00c ac8b6d84"),
    ]
    for counter, key, expected in vectors:
        words = [[int(w, 16) for w in text.split()] for text in (counter, key, expected)]
        out = jaxdp.noise._threefry4x32([np.uint32(w) for w in words[1]], [np.uint32(w) for w in words[0]])
        assert [int(x) for x in out] == words[2]


# --- Sensitivity override, optax composition, checkpoints -------------------------------------------------------


def test_sensitivity_override_scales_the_same_draws():
    tx = jaxdp.dp_noise(noise_multiplier=0.5, l2_clip_norm=1.0, expected_batch_size=1, key=jax.random.key(2))
    state = tx.init(zeros())
    default, _ = jax.jit(tx.update)(zeros(), state)
    override = jax.jit(lambda u, s, c: tx.update(u, s, l2_clip_norm=c))
    scaled, new_state = override(zeros(), state, jnp.float32(6.0))  # traced: DPSGD-F's max_k C_k of the step
    # rtol 2e-5: a per-step std carries the 1 + 2^-16 margin over its float32 roundings (never below z * C).
    np.testing.assert_allclose(flat(scaled), 6.0 * flat(default), rtol=2e-5)
    assert np.std(flat(scaled)) == pytest.approx(0.5 * 6.0, rel=0.01)
    assert int(new_state.count) == 1
    per_layer, _ = override(zeros(), state, {"a": jnp.float32(3.0), "b": jnp.float32(4.0)})  # sqrt(9 + 16) = 5
    np.testing.assert_allclose(flat(per_layer), 5.0 * flat(default), rtol=2e-5)


def test_chain_with_adam_with_and_without_the_extra_argument():
    grads = {"w": jnp.array([8.0, -4.0])}
    tx = optax.chain(jaxdp.dp_noise(1.0, 1.0, 4, jax.random.key(0)), optax.adam(1e-3))
    state = tx.init(grads)
    plain, _ = tx.update(grads, state, grads)
    same, _ = jax.jit(lambda g, s: tx.update(g, s, g, l2_clip_norm=1.0))(grads, state)
    np.testing.assert_allclose(plain["w"], same["w"], rtol=1e-6)
    other, _ = jax.jit(lambda g, s, c: tx.update(g, s, g, l2_clip_norm=c))(grads, state, jnp.float32(100.0))
    assert not np.allclose(plain["w"], other["w"])
    # Zero noise, override or not: Adam's first step moves every coordinate by -lr * sign(sum / B).
    quiet = optax.chain(jaxdp.dp_noise(0.0, 1.0, 4, jax.random.key(0)), optax.adam(1e-3))
    step, _ = quiet.update(grads, quiet.init(grads), grads, l2_clip_norm=jnp.float32(3.0))
    np.testing.assert_allclose(step["w"], [-1e-3, 1e-3], rtol=1e-4)


def test_resume_from_a_checkpointed_state_draws_the_uninterrupted_noise(tmp_path):
    """Three steps in one go against one step, a checkpoint of the state as plain arrays (saved to disk), and two
    steps of a transformation built anew in a fresh "process" (with another key: the state's key is the one
    that counts)."""
    tx = jaxdp.dp_noise(1.0, 2.0, 4, jaxdp.noise.key_from_seed(12345))
    update = jax.jit(tx.update)
    state = tx.init(zeros())
    uninterrupted = []
    for _ in range(3):
        out, state = update(zeros(), state)
        uninterrupted.append(flat(out))

    first, state = update(zeros(), tx.init(zeros()))
    np.savez(tmp_path / "noise_state.npz", key=np.asarray(state.key), count=np.asarray(state.count))
    saved = np.load(tmp_path / "noise_state.npz")
    assert saved["key"].dtype == np.uint32 and saved["key"].shape == (4,) and saved["count"].dtype == np.int32
    fresh = jaxdp.dp_noise(1.0, 2.0, 4, jaxdp.noise.secret_key())
    state = type(fresh.init(zeros()))(key=saved["key"], count=saved["count"])
    resumed = [flat(first)]
    for _ in range(2):
        out, state = jax.jit(fresh.update)(zeros(), state)
        resumed.append(flat(out))
    for a, b in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


# --- Secure mode ------------------------------------------------------------------------------------------------


def test_secure_mode_is_a_standard_normal_with_other_draws():
    tx = jaxdp.dp_noise(1.0, 1.0, 1, jax.random.key(4), secure=True)
    out, _ = jax.jit(tx.update)(zeros(), tx.init(zeros()))
    plain, _ = jax.jit(jaxdp.dp_noise(1.0, 1.0, 1, jax.random.key(4)).update)(zeros(), tx.init(zeros()))
    sample = flat(out)
    assert np.std(sample) == pytest.approx(1.0, rel=0.01)
    assert abs(np.mean(sample)) < 6 / np.sqrt(N)
    # (N1 + N2 + N3 + N4) / 2 of four streams; the first stream is the default's draw.
    assert abs(np.corrcoef(sample, flat(plain))[0, 1] - 0.5) < 6 / np.sqrt(N)
    kurtosis = np.mean(sample**4) / np.mean(sample**2) ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.06)  # Gaussian: 3 (standard error ~0.011 here)


# --- Secret seeds and keys (issue 11, section 1) ----------------------------------------------------------------


def test_secret_seed_has_128_random_bits():
    seeds = [jaxdp.noise.secret_seed() for _ in range(64)]
    assert all(isinstance(s, int) and 0 <= s < 2**128 for s in seeds)
    assert len(set(seeds)) == 64
    assert max(s.bit_length() for s in seeds) > 120  # fails with probability 2^-512 for 128 random bits
    ones = sum(bin(s).count("1") for s in seeds)  # 8192 fair bits: mean 4096, standard deviation 45
    assert abs(ones - 4096) < 6 * 45
    high_ones = sum((s >> 64).bit_count() for s in seeds)  # the upper 64 bits are random too
    assert abs(high_ones - 2048) < 6 * 32


def test_key_from_seed_is_deterministic_and_keeps_all_128_bits():
    seed = 0x0123456789ABCDEF_FEDCBA9876543210
    key = jaxdp.noise.key_from_seed(seed)
    assert [int(w) for w in jax.random.key_data(key)] == [0x01234567, 0x89ABCDEF, 0xFEDCBA98, 0x76543210]
    np.testing.assert_array_equal(jaxdp.noise.gaussian(key, (16,)),
                                  jaxdp.noise.gaussian(jaxdp.noise.key_from_seed(seed), (16,)))
    draws = {seed ^ (1 << bit): jaxdp.noise.gaussian(jaxdp.noise.key_from_seed(seed ^ (1 << bit)), (4,))
             for bit in (0, 63, 64, 127)}  # flipping any one bit, low or high, changes the noise
    values = [tuple(np.asarray(v).tolist()) for v in draws.values()]
    assert len(set(values)) == 4 and tuple(np.asarray(jaxdp.noise.gaussian(key, (4,))).tolist()) not in values
    assert len(jax.random.key_data(jaxdp.noise.secret_key())) == 4
    for bad in (-1, 2**128, 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*128\)"):
            jaxdp.noise.key_from_seed(bad)


def test_the_standard_deviation_used_is_never_below_z_c():
    # Rounded to the nearest float32, z*C can fall below the accounted value (0.7 -> 0.69999999); the std used must
    # not, on the constant path (float64, rounded up) or on the traced per-step path (float32, scaled up).
    from fractions import Fraction

    from jaxdp import noise

    rng = np.random.default_rng(0)
    zs, cs = rng.uniform(0.1, 3.0, 2000), rng.uniform(0.01, 10.0, 2000)
    for z, c in zip(zs, cs, strict=True):
        used = noise.stddev_at_least(z * c)
        assert Fraction(float(used)) >= Fraction(z) * Fraction(c)
        assert float(used) <= z * c * (1 + 2e-7)
    c32 = np.float32(cs)
    for z in (0.5, 0.7, 1.5):
        tx = jaxdp.dp_noise(z, 1.0, 1, jax.random.key(3))
        state = tx.init(zeros())
        default, _ = jax.jit(tx.update)(zeros(), state)
        draws = np.asarray(flat(default), np.float64) / float(noise.stddev_at_least(z))
        def noised(c, tx=tx, state=state):
            return jnp.concatenate([jnp.ravel(v) for v in jax.tree_util.tree_leaves(
                tx.update(zeros(), state, l2_clip_norm=c)[0])])

        override = jax.jit(jax.vmap(noised))(jnp.asarray(c32[:64]))
        # The same draws, scaled by a std that is at least z * C for every traced C (the per-coordinate rounding
        # of std * draw, at most 2^-24, is far inside the 2^-16 margin).
        ratio = np.asarray(override, np.float64) / draws[None, :]
        exact = np.array([float(Fraction(z) * Fraction(float(c))) for c in c32[:64]])
        assert np.all(ratio.min(axis=1) >= exact) and np.all(ratio.max(axis=1) <= exact * (1 + 1e-4))
    assert float(noise.stddev_at_least(0.7)) > 0.7 > float(np.float32(0.7))


# --- One compiled program per eager call (issue 25, item 1) -----------------------------------------------------

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class _CountCompiles:
    """Counts XLA programs compiled (or fetched from the compilation cache) inside the block, through JAX's public
    monitoring events."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        self.count += event == _BACKEND_COMPILE

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _eager_cases():
    """Each public noise entry point called as a user calls it outside jit, on shapes no other test uses (so the
    first call compiles)."""
    grads = {"w": jnp.ones((1237,)), "b": jnp.ones((3, 5))}
    cases = {}
    for name, kwargs in (("gaussian", {}), ("secure", {"secure": True}), ("lattice", {"mechanism": "lattice"})):
        tx = jaxdp.dp_noise(0.9, 1.0, 16, jax.random.key(7), **kwargs)
        cases[name] = (tx.update, (grads, tx.init(grads)))
        cases[name + " per-step sensitivity"] = (
            lambda g, s, tx=tx: tx.update(g, s, l2_clip_norm=jnp.float32(0.5)), (grads, tx.init(grads)))
    cases["gaussian()"] = (lambda key: jaxdp.noise.gaussian(key, (77, 3)), (jax.random.key(1),))
    from jaxdp import methods
    method = methods.DPSGDF(base_clip_norm=1.0, count_noise_multiplier=10.0)
    for mechanism in ("gaussian", "lattice"):
        cases[f"methods.release {mechanism}"] = (
            lambda s, c, k, mechanism=mechanism: methods.release(method, s, c, k, mechanism=mechanism),
            (method.init_state(), jnp.asarray([3.0, 1.0, 9.0, 4.0]), jax.random.key(2)))
    return cases


@pytest.mark.parametrize("case", list(_eager_cases()))
def test_eager_calls_run_one_compiled_program(case):
    """Outside jit, each call dispatches one operation (a nested jit: one compiled program), where the
    tail-correct sampler's small operations used to be dispatched one by one (hundreds of programs, 240 ms for
    20,000 parameters); the first call compiles exactly one program and the next none. Inside a user's jit the
    same calls trace into the caller's program."""
    fn, args = _eager_cases()[case]
    top_level = jax.make_jaxpr(fn)(*args).eqns
    assert [eqn.primitive.name for eqn in top_level] in (["pjit"], ["jit"])
    with _CountCompiles() as first:
        jax.block_until_ready(fn(*args))
    with _CountCompiles() as second:
        jax.block_until_ready(fn(*args))
    assert (first.count, second.count) == (1, 0)
    jax.block_until_ready(jax.jit(fn)(*args))  # and traceable inside jit


def test_eager_chain_dispatches_the_noise_as_one_program():
    """In optax.chain(dp_noise, adam) called eagerly, the noise is one operation; what remains is Adam's own
    (optax's eager tree maps), independent of the noise's cost."""
    grads = {"w": jnp.ones((1237,)), "b": jnp.ones((3, 5))}
    noise_only = jaxdp.dp_noise(0.9, 1.0, 16, jax.random.key(7))
    chained = optax.chain(noise_only, optax.adam(1e-3))
    adam = optax.adam(1e-3)
    chain_ops = len(jax.make_jaxpr(chained.update)(grads, chained.init(grads), grads).eqns)
    adam_ops = len(jax.make_jaxpr(adam.update)(grads, adam.init(grads), grads).eqns)
    assert chain_ops == adam_ops + 1
