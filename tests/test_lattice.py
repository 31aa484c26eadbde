"""The lattice mechanism (jaxdp.lattice, dp_noise(mechanism="lattice")): no holes in the output's support, the
sensitivity of the quantised sum, the exactness of the integer sampler, and the transform's statistics."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import ndtr

import jaxdp
from jaxdp import lattice, methods, noise, threefry

# The example: z 0.7, C 1, B 32; one coordinate of the demo model's 20,650-parameter sum.
Z, C, B, D = 0.7, 1.0, 32, 20_650
LOW, HIGH = 0.75 / B, 0.95 / B  # a window of released values: (sum + noise) / B in [0.75, 0.95] / 32


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree_util.tree_leaves(tree)])


# --- No holes in the support (issue 23, section 2) -------------------------------------------------------------


def _gaussian_outputs(g: float) -> np.ndarray:
    """Every value the Gaussian mechanism can release in [LOW, HIGH] for a coordinate whose clipped sum is ``g``.

    The sampler's value is Q(u) for u = (m + 1/2) 2^-64 rounded to float32; in [2^-5, 2^-1) every float32 u is
    reached (the high word's 31 bits, rounded to 24, hit every float32 there; the low word adds less than half an
    ulp). So the set of noise values in the window's preimage is Q over every float32 u there, through the real
    compiled quantile, and the released values are the real release arithmetic on them (checked against dp_noise's
    own outputs in the test below)."""
    stddev = noise.stddev_at_least(Z * C)
    z_lo, z_hi = (LOW * B - g) / float(stddev), (HIGH * B - g) / float(stddev)
    u_lo, u_hi = np.float32(ndtr(-z_hi) * 0.999), np.float32(ndtr(-z_lo) * 1.001)
    assert 2**-5 <= u_lo and u_hi < 0.5
    u = np.arange(u_lo.view(np.uint32), u_hi.view(np.uint32) + 1, dtype=np.uint32).view(np.float32)
    q = jax.jit(noise._upper_quantile)(jnp.asarray(u))  # materialised, as _draw's loop output is
    out = np.asarray(jax.jit(noise._gaussian_release)(jnp.full(q.shape, g, jnp.float32), q, stddev, 1.0 / B))
    return np.unique(out[(out >= LOW) & (out <= HIGH)])


def _lattice_outputs(g: float, setup: lattice.LatticeNoise) -> np.ndarray:
    """Every value the lattice mechanism can release in [LOW, HIGH] for a coordinate whose sum is ``g``: the
    real release arithmetic applied to every integer the sampler can draw (its support, [-max_abs, max_abs],
    is a whole interval: test_every_integer_of_the_noise_range_has_positive_probability)."""
    m = setup.sampler.max_abs
    n = jnp.arange(-m, m + 1, dtype=jnp.int32)
    out = np.asarray(jax.jit(noise._lattice_release, static_argnums=2)(
        jnp.full(n.shape, g, jnp.float32), n, setup.exponent, 1.0 / B))
    return np.unique(out[(out >= LOW) & (out <= HIGH)])


@pytest.mark.parametrize("mechanism", ["gaussian", "lattice"])
def test_neighbouring_outputs_have_the_same_support(mechanism):
    """A coordinate whose clipped sum is 0 under one dataset and 0.3 under its neighbour (a bias only the target
    touches). Enumerated exactly: every float32 the mechanism can release in [0.75, 0.95] / 32 under each.
    Gaussian (the control): 39.7% of the values possible at 0.3 are impossible at 0 (and 19.9% the other way),
    so seeing one of them decides membership. Lattice: the two sets are equal."""
    if mechanism == "gaussian":
        at_zero, at_three = _gaussian_outputs(0.0), _gaussian_outputs(0.3)
        only_three = np.setdiff1d(at_three, at_zero).size / at_three.size
        only_zero = np.setdiff1d(at_zero, at_three).size / at_zero.size
        assert at_zero.size > 10**6 and at_three.size > 10**6
        assert only_three > 0.3 and only_zero > 0.1
    else:
        setup = lattice.lattice_noise(Z, C, D)
        at_zero, at_three = _lattice_outputs(0.0, setup), _lattice_outputs(0.3, setup)
        # 2^-23 apart: (0.95 - 0.75) / 32 * 2^23 + 1 values, every one possible under both.
        assert at_zero.size == at_three.size == 52_429
        np.testing.assert_array_equal(at_zero, at_three)


def test_the_enumerated_release_is_dp_noises_own():
    """The compiled release arithmetic the enumeration uses gives dp_noise's outputs bit for bit, for both
    mechanisms, on the noise dp_noise itself drew (so the enumeration is of the real compiled path: XLA contracts
    ``g + s z`` to one fused multiply-add there, which op-by-op evaluation would not)."""
    key = jax.random.key(3)
    g = {"w": jnp.full((D,), 0.3, jnp.float32)}
    words = noise._derive(noise._key_words(key), 0, noise._STEP)
    tx = jaxdp.dp_noise(Z, C, B, key)
    out, _ = tx.update(g, tx.init(g))
    z = noise._draw(words, D)
    release = jax.jit(noise._gaussian_release)
    np.testing.assert_array_equal(out["w"], release(g["w"], z, noise.stddev_at_least(Z * C), 1 / B))
    tx = jaxdp.dp_noise(Z, C, B, key, mechanism="lattice")
    out, _ = tx.update(g, tx.init(g))
    setup = lattice.lattice_noise(Z, C, D)
    n = setup.sampler.draw(words, D)
    release = jax.jit(noise._lattice_release, static_argnums=2)
    np.testing.assert_array_equal(out["w"], release(g["w"], n, setup.exponent, 1 / B))
    assert int(jnp.max(jnp.abs(n))) <= setup.sampler.max_abs


def test_every_integer_of_the_noise_range_has_positive_probability():
    """N = R0 + M1 (R1 + M2 R2): every table cell has weight >= 1 (of 2^128), so each level's support is a whole
    interval [-h, h]; M X + R with X on [-a, a] and R on [-h, h], 2h + 1 >= M, covers all of [-(M a + h), M a + h]
    (brute force for the inner two levels, the same argument for the outer one), so N's support is all of
    [-max_abs, max_abs]."""
    sampler = lattice.lattice_noise(Z, C, D).sampler
    assert len(sampler.tables) == 3 and sampler.multipliers == (256, 128)
    for table in sampler.tables:
        assert min(table.weights) >= 1 and len(table.weights) == 2 * table.half_width + 1
    reach = sampler.tables[-1].half_width
    for table, multiplier in zip(sampler.tables[-2::-1], sampler.multipliers[::-1], strict=True):
        assert 2 * table.half_width + 1 >= multiplier  # no gaps between consecutive multiples
        reach = multiplier * reach + table.half_width
    assert reach == sampler.max_abs == 3_154_496
    inner, middle = sampler.tables[2], sampler.tables[1]
    support = np.unique((sampler.multipliers[1] * np.arange(-inner.half_width, inner.half_width + 1)[:, None]
                         + np.arange(-middle.half_width, middle.half_width + 1)).ravel())
    np.testing.assert_array_equal(support, np.arange(-support[-1], support[-1] + 1))


# --- Sensitivity of the quantised sum -------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))


@pytest.mark.parametrize("strategy", ["vmap", "bookkeeping"])
def test_quantised_sums_of_neighbours_differ_by_at_most_the_lattice_bound(strategy):
    """Remove each example in turn from a batch (through the real clipping, both the per-example and the
    bookkeeping path): the quantised sums move by at most C / gamma + sqrt(d) lattice steps."""
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((12, 5), dtype=np.float32)) * 4
    y = jnp.arange(12) % 3
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()

    clip = 0.05  # below every example's norm: each contributes exactly its clipped full norm
    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=clip, strategy=strategy))
    d = sum(p.size for p in jax.tree_util.tree_leaves(params))
    exponent = lattice.lattice_exponent(clip, d, Z)
    bound = clip * 2.0**exponent + math.sqrt(d)
    full, norms = grad_fn(params, x, y, jnp.ones(12, bool))
    assert np.all(np.asarray(norms) > clip)
    k = np.asarray(lattice.quantise(jnp.asarray(flat(full)), exponent), np.int64)
    moves = []
    for i in range(12):
        without, _ = grad_fn(params, x, y, jnp.arange(12) != i)
        k_without = np.asarray(lattice.quantise(jnp.asarray(flat(without)), exponent), np.int64)
        moves.append(np.linalg.norm((k - k_without).astype(np.float64)))
    assert max(moves) <= bound
    assert min(moves) > 0.9 * clip * 2.0**exponent  # each example moves it by about its clipped norm


def test_rounding_both_neighbours_can_cost_sqrt_d_lattice_steps():
    """The sqrt(d) term is needed: sums just below (one neighbour) and just above (the other) a rounding boundary
    in every coordinate move by one step per coordinate while they differ by almost nothing."""
    d, exponent = 10_000, 12
    gamma = 2.0**-exponent
    below = jnp.full((d,), (7.5 - 1 / 64) * gamma, jnp.float32)
    above = below + np.float32(gamma / 32)
    moved = np.asarray(lattice.quantise(above, exponent) - lattice.quantise(below, exponent), np.float64)
    assert np.linalg.norm(moved) == math.sqrt(d)
    assert float(jnp.linalg.norm(above - below)) == pytest.approx(math.sqrt(d) * gamma / 32, rel=1e-6)
    # Exact: a sum on the lattice goes to its integer, and a power of two only changes the float's exponent.
    exact = jnp.asarray([-3.0, 0.0, 5.0, 2.0**20], jnp.float32) * np.float32(gamma)
    np.testing.assert_array_equal(lattice.quantise(exact, exponent), [-3, 0, 5, 2**20])
    # Clamped at 2^30 (1-Lipschitz); infinities clamp, NaN (which clipping never produces) is 0.
    extreme = jnp.asarray([1e30, -jnp.inf, jnp.nan, 2.0**31 * gamma], jnp.float32)
    np.testing.assert_array_equal(lattice.quantise(extreme, exponent), [2**30, -(2**30), 0, 2**30])


def test_lattice_step_and_effective_sensitivity():
    # gamma = 2^-e, the largest power of two with gamma sqrt(d) <= 2^-10 C (exactly).
    assert lattice.lattice_exponent(1.0, D, Z) == 18  # 2^-17 * 143.7 = 1.1e-3 > 2^-10 = 9.8e-4 >= 2^-18 * 143.7
    assert lattice.lattice_exponent(1.0, 11_200_000, Z) == 22  # ResNet18
    assert lattice.lattice_exponent(5.0, 11_200_000, Z) == 20
    assert lattice.lattice_exponent(1.0, 4**5, 0.7) == 15  # 2^-15 * 32 = 2^-10 exactly: allowed
    for d in (1, 17, D, 11_200_000):
        increase = lattice.effective_sensitivity(1.0, d, Z) - 1.0
        assert 2**-11 < increase / 1.0 <= 2**-10 * (1 + 1e-12)
    # Where the noise would not fit in int32, a coarser lattice: the increase is larger, and said.
    big = lattice.lattice_exponent(1.0, 10**8, 50.0)
    assert lattice.lattice_units_stddev(50.0, 1.0, 10**8, big) <= lattice.MAX_STDDEV
    assert lattice.lattice_units_stddev(50.0, 1.0, 10**8, big + 1) > lattice.MAX_STDDEV
    assert lattice.effective_sensitivity(1.0, 10**8, 50.0) - 1.0 > 2**-10
    assert noise.noise_stddev(Z, C, B, mechanism="lattice", num_params=D) == pytest.approx(
        Z * (1 + 2.0**-18 * math.sqrt(D)) / B, rel=1e-12)


# --- The integer sampler --------------------------------------------------------------------------------------


def test_alias_tables_realise_their_weights_exactly():
    """Each column gives its cell with probability threshold / capacity and its alias otherwise: summed over the
    columns that is each cell's weight, exactly; and the weights are the ideal pmf (recomputed here from scipy in
    float64, which resolves each cell to about 1e-16: the table's own bound, 1e-34, comes from 45-digit mpmath)."""
    for kind, stddev in (("rounded", 10.0), ("rounded", 640.0), ("discrete", 4.852371293483188)):
        table = lattice.alias_table(kind, stddev)
        capacity = 2 ** (128 - table.index_bits)
        realised = [0] * len(table.rows)
        for i, (alias, *words) in enumerate(table.rows.tolist()):
            threshold = (words[0] << 96) | (words[1] << 64) | (words[2] << 32) | words[3]
            realised[i] += threshold
            realised[alias] += capacity - threshold
        assert realised[:len(table.weights)] == list(table.weights) and not any(realised[len(table.weights):])
        values = np.arange(-table.half_width, table.half_width + 1)
        if kind == "rounded":
            ideal = ndtr(-(np.abs(values) - 0.5) / stddev) - ndtr(-(np.abs(values) + 0.5) / stddev)
            ideal[table.half_width] = 1 - 2 * ndtr(-0.5 / stddev)
        else:
            ideal = np.exp(-values.astype(np.float64) ** 2 / (2 * stddev**2))
            ideal /= math.sqrt(2 * math.pi) * stddev  # the normaliser, to 1e-200 at stddev 4.85 (Poisson)
        pmf = np.array([w / 2**128 for w in table.weights])
        assert 0.5 * np.abs(pmf - ideal).sum() < len(pmf) * 2e-16
        assert table.tv_bound <= lattice.TABLE_TV_BOUND < 1e-34


def test_tables_are_kept_in_the_compilation_cache_folder_and_a_damaged_file_is_rebuilt(tmp_path):
    """With JAX's compilation cache directory set, a table built once is loaded by the next process (here: after
    clearing the in-process cache) with the same weights and rows; a file whose checksum or contents do not match
    is ignored and rewritten, never used; without the directory nothing is written."""
    kind, stddev = "discrete", 3.25
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert lattice.table_cache_file(kind, stddev) is None
        lattice.alias_table.cache_clear()
        reference = lattice.alias_table(kind, stddev)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        path = lattice.table_cache_file(kind, stddev)
        lattice.alias_table.cache_clear()
        built = lattice.alias_table(kind, stddev)
        assert path.is_file() and built.weights == reference.weights
        lattice.alias_table.cache_clear()
        loaded = lattice.alias_table(kind, stddev)
        assert loaded.weights == reference.weights and np.array_equal(loaded.rows, reference.rows)
        assert loaded.tv_bound == reference.tv_bound

        # Damage: a weight moved between two cells (the sum still right) without updating the checksum; then
        # the same with a matching checksum but a weight of zero (a hole in the support); then garbage.
        import hashlib
        import json

        record = json.loads(path.read_text())
        table = json.loads(record["payload"])
        table["weights"][0], table["weights"][1] = table["weights"][1], table["weights"][0]
        record["payload"] = json.dumps(table, sort_keys=True)
        path.write_text(json.dumps(record))
        lattice.alias_table.cache_clear()
        assert lattice.alias_table(kind, stddev).weights == reference.weights
        centre = len(table["weights"]) // 2
        table["weights"][centre] = format(int(table["weights"][centre], 16) + int(table["weights"][0], 16), "x")
        table["weights"][0] = "0"
        record = {"payload": json.dumps(table, sort_keys=True)}
        record["sha256"] = hashlib.sha256(record["payload"].encode()).hexdigest()
        path.write_text(json.dumps(record))
        lattice.alias_table.cache_clear()
        assert lattice.alias_table(kind, stddev).weights == reference.weights
        path.write_text("{not json")
        lattice.alias_table.cache_clear()
        assert lattice.alias_table(kind, stddev).weights == reference.weights
        assert json.loads(path.read_text())["sha256"]  # rewritten whole
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        lattice.alias_table.cache_clear()


def test_the_packaged_tables_are_the_tables_mpmath_builds_and_are_used_without_building(tmp_path, monkeypatch):
    """The two tables shipped in jaxdp/lattice_tables equal a fresh 45-digit build weight for weight (and in their
    total-variation bound); alias_table reads them without calling mpmath; a damaged packaged file is ignored and
    the table built instead."""
    built = {}
    for kind, stddev in lattice.PACKAGED_TABLES:
        half_width = math.ceil(lattice.TAIL_STDDEVS * stddev)
        built[kind, stddev] = lattice._table_weights(kind, stddev, half_width)
        assert lattice._load_table(lattice.packaged_table_file(kind, stddev), kind, stddev,
                                   half_width) == built[kind, stddev]

    def no_build(*args):
        raise AssertionError("built a packaged table")

    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        with monkeypatch.context() as patch:
            patch.setattr(lattice, "_table_weights", no_build)
            lattice.alias_table.cache_clear()
            for kind, stddev in lattice.PACKAGED_TABLES:
                assert lattice.alias_table(kind, stddev).tv_bound <= lattice.TABLE_TV_BOUND
        damaged = tmp_path / "damaged.json.gz"
        damaged.write_bytes(lattice.packaged_table_file("rounded", 640.0).read_bytes()[:-100])
        monkeypatch.setattr(lattice, "packaged_table_file", lambda kind, stddev: damaged)
        lattice.alias_table.cache_clear()
        assert lattice.alias_table("rounded", 640.0).weights == tuple(built["rounded", 640.0][0])
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        lattice.alias_table.cache_clear()


def test_each_level_picks_the_column_below_its_threshold_and_the_alias_at_or_above():
    """The 128-bit comparison, word by word: for every column of a table, the bits just below its threshold give
    the column, the threshold itself gives the alias."""
    table = lattice.alias_table("rounded", 10.0)
    bits = 32 - table.index_bits
    blocks, expected = [], []
    for column, (alias, t0, t1, t2, t3) in enumerate(table.rows.tolist()):
        threshold = (t0 << 96) | (t1 << 64) | (t2 << 32) | t3
        for u, cell in ((threshold - 1, column), (threshold, alias)):
            if 0 <= u < 2 ** (128 - table.index_bits):
                blocks.append([(column << bits) | (u >> 96), (u >> 64) & 0xFFFFFFFF, (u >> 32) & 0xFFFFFFFF,
                               u & 0xFFFFFFFF])
                expected.append(cell - table.half_width)
    block = jnp.asarray(np.array(blocks, np.uint32).T)
    got = jax.jit(lambda b: lattice._exact_level(b[0], list(b[1:]), table))(block)
    np.testing.assert_array_equal(got, expected)
    assert len(expected) > len(table.rows)  # most columns have both outcomes
    # The first pass decides from the first word alone: top bits one below the threshold's top word give the
    # column, one above the alias, equal ones a tie (there the full comparison above decides).
    words, cells, ties = [], [], []
    for column, (alias, t0, *_) in enumerate(table.rows.tolist()):
        for top, cell, tie in ((t0 - 1, column, False), (t0 + 1, alias, False), (t0, None, True)):
            if 0 <= top < 2**bits:
                words.append((column << bits) | top)
                cells.append(cell - table.half_width if cell is not None else 0)
                ties.append(tie)
    cell, tie = jax.jit(lambda w: lattice._fast_level(w, table))(jnp.asarray(np.array(words, np.uint32)))
    np.testing.assert_array_equal(tie, ties)
    decided = ~np.array(ties)
    np.testing.assert_array_equal(np.asarray(cell)[decided], np.array(cells)[decided])
    assert decided.sum() > len(table.rows)


def _every_value_in_full(sampler, key, size, multiplier=None):
    """The draw computed the slow way: every level of every value from its 128 bits (its first block's word and
    its own block), and how many (value, level) pairs tie (their top bits equal the threshold's)."""
    words, index = list(jnp.asarray(key, jnp.uint32)), jax.lax.iota(jnp.uint32, size)
    first = threefry.threefry4x32(words, [index, 0, 0, threefry.LATTICE])
    levels, ties = [], 0
    for level, table in enumerate(sampler.tables):
        rest = threefry.threefry4x32(words, [index, level, 1, threefry.LATTICE])[:3]
        levels.append(lattice._exact_level(first[level], rest, table))
        ties = ties + jnp.sum(lattice._fast_level(first[level], table)[1])
    value = levels[-1]
    for level in reversed(range(len(levels) - 1)):
        m = multiplier if (level == 0 and multiplier is not None) else sampler.multipliers[level]
        value = levels[level] + m * value
    return value, ties


@pytest.mark.parametrize("stddev", [500.0, 400_000.0])
def test_the_draw_is_every_value_computed_in_full_with_ties_among_them(stddev):
    """2^20 values of a one-level and a three-level sampler (the Adult MLP's size of noise), with the traced outer
    multiplier too: bit for bit the values computed in full, and ties happened (about 4 and 8 expected), so the
    recomputed blocks were exercised. Shorter draws (one of them computed in full) are the same values' prefix."""
    sampler, key, size = lattice.integer_gaussian(stddev), jnp.asarray([5, 7, 11, 13], jnp.uint32), 2**20
    multipliers = [None] + ([jnp.int32(sampler.multipliers[0] - 3)] if sampler.multipliers else [])
    for multiplier in reversed(multipliers):  # the default multiplier last: `full` below is its
        drawn = jax.jit(lambda k, m: sampler.draw(k, size, outer_multiplier=m))(key, multiplier)
        full, ties = jax.jit(lambda k, m: _every_value_in_full(sampler, k, size, m))(key, multiplier)
        assert int(ties) > 0
        np.testing.assert_array_equal(drawn, full)
    assert lattice.tie_block_capacity(100, sampler.tables) == math.ceil(100 / lattice.TIE_BLOCK)  # all in full
    assert lattice.tie_block_capacity(1000, sampler.tables) < math.ceil(1000 / lattice.TIE_BLOCK)  # two passes
    for n in (100, 1000):
        np.testing.assert_array_equal(jax.jit(lambda k, n=n: sampler.draw(k, n))(key), np.asarray(full)[:n])


def test_without_its_recomputed_blocks_a_draw_differs_exactly_in_tied_blocks(monkeypatch):
    """The test above has teeth: with no block recomputed (the failure the capacity makes unlikely), the draw
    differs from the values in full, and only inside blocks that hold a tie."""
    sampler, key, size = lattice.integer_gaussian(500.0), jnp.asarray([5, 7, 11, 13], jnp.uint32), 2**20
    monkeypatch.setattr(lattice, "tie_block_capacity", lambda size, tables: 0)
    drawn = np.asarray(jax.jit(lambda k: sampler.draw(k, size))(key))
    full, _ = jax.jit(lambda k: _every_value_in_full(sampler, k, size))(key)
    words = list(key)
    first = threefry.threefry4x32(words, [jax.lax.iota(jnp.uint32, size), 0, 0, threefry.LATTICE])
    tied_blocks = np.asarray(lattice._fast_level(first[0], sampler.tables[0])[1]).reshape(-1, lattice.TIE_BLOCK).any(1)
    differs = (drawn != np.asarray(full)).reshape(-1, lattice.TIE_BLOCK).any(1)
    assert differs.any() and not (differs & ~tied_blocks).any()


@pytest.mark.parametrize("size", [2, 21_642, 91_650, 11_000_000])
def test_the_recomputed_blocks_outnumber_the_tied_ones_but_with_negligible_probability(size):
    """tie_block_capacity's K against the exact binomial tail (mpmath): more than K of the draw's blocks hold a
    tie with probability at most size * TIE_FAILURE_PER_DRAW, and K is not far above what that needs (the tail
    at 95% of K is above the budget), for the three-level sampler's tables (14, 14 and 8 column bits)."""
    import mpmath

    tables = lattice.integer_gaussian(400_000.0).tables
    assert [t.index_bits for t in tables] == [14, 14, 8]
    blocks = math.ceil(size / lattice.TIE_BLOCK)
    capacity = lattice.tie_block_capacity(size, tables)
    if capacity == blocks:  # every block recomputed: nothing can be left
        assert size < 1000
        return
    with mpmath.workdps(80):
        no_tie = mpmath.fprod((1 - mpmath.mpf(2) ** -(32 - t.index_bits)) ** lattice.TIE_BLOCK for t in tables)
        q = 1 - no_tie

        def tail(m):  # P(Binomial(blocks, q) >= m), as 1 - P(< m) at 80 digits (the budget is 1e-35 or more)
            return 1 - mpmath.fsum(mpmath.binomial(blocks, j) * q**j * no_tie ** (blocks - j) for j in range(m))

        budget = size * lattice.TIE_FAILURE_PER_DRAW
        assert tail(capacity + 1) <= budget
        assert tail(int(0.95 * capacity)) > budget  # Chernoff's bound costs under 5% more blocks


def test_two_levels_are_pointwise_the_rounded_gaussian():
    """R0 + 256 J (R0 rounded Gaussian of 640, J a discrete Gaussian of 5.33): its exact pmf (a convolution of the
    two tables' weights, in float64) against round(N(0, sigma^2)) at every integer within 6 sigma: relative error
    below 1e-9 (the Poisson-summation bound is 1e-39; float64 convolution resolves about 1e-13). With the fine
    level a discrete Gaussian instead, or a multiplier off by one, the error would be far larger."""
    sampler = lattice.integer_gaussian(1500.0)
    fine, coarse = sampler.tables
    (multiplier,) = sampler.multipliers
    assert (fine.kind, fine.stddev, multiplier, coarse.kind) == ("rounded", 640.0, 256, "discrete")
    p_fine = np.array([w / 2**128 for w in fine.weights])
    p_coarse = np.array([w / 2**128 for w in coarse.weights])
    pmf = np.zeros(2 * sampler.max_abs + 1)
    for j, p in enumerate(p_coarse):
        start = multiplier * (j - coarse.half_width) + sampler.max_abs - fine.half_width
        pmf[start:start + len(p_fine)] += p * p_fine
    values = np.arange(-sampler.max_abs, sampler.max_abs + 1)
    bulk = np.abs(values) <= 6 * sampler.stddev
    a = np.abs(values[bulk])
    ideal = ndtr(-(a - 0.5) / sampler.stddev) - ndtr(-(a + 0.5) / sampler.stddev)
    ideal[a == 0] = 1 - 2 * ndtr(-0.5 / sampler.stddev)
    assert np.max(np.abs(pmf[bulk] / ideal - 1)) < 1e-9
    assert sampler.stddev == pytest.approx(1500.0, rel=1e-11) and sampler.stddev >= 1500.0
    assert sampler.tv_bound <= lattice.TV_PER_DRAW and sampler.smoothing_bound < 1e-39


def test_two_discrete_levels_are_pointwise_the_discrete_gaussian():
    """The demo sampler's inner part R1 + 128 R2 (discrete Gaussians of 358.6 and 4.85) against D_{Z,S1},
    S1 = inner_stddev = 721.7, at every integer within 6 S1: relative error below 1e-9."""
    sampler = lattice.lattice_noise(Z, C, D).sampler
    _, middle, inner = sampler.tables
    multiplier = sampler.multipliers[1]
    p_middle = np.array([w / 2**128 for w in middle.weights])
    p_inner = np.array([w / 2**128 for w in inner.weights])
    reach = multiplier * inner.half_width + middle.half_width
    pmf = np.zeros(2 * reach + 1)
    for j, p in enumerate(p_inner):
        start = multiplier * (j - inner.half_width) + reach - middle.half_width
        pmf[start:start + len(p_middle)] += p * p_middle
    values = np.arange(-reach, reach + 1).astype(np.float64)
    s = sampler.inner_stddev
    assert s == pytest.approx(math.sqrt(middle.stddev**2 + multiplier**2 * inner.stddev**2), rel=1e-12)
    bulk = np.abs(values) <= 6 * s
    ideal = np.exp(-values[bulk] ** 2 / (2 * s**2)) / (math.sqrt(2 * math.pi) * s)  # normaliser exact to 1e-200
    assert np.max(np.abs(pmf[bulk] / ideal - 1)) < 1e-9


def test_draws_follow_the_rounded_gaussian():
    """2^20 draws of the demo's 3-level sampler (sigma 183,601): standard deviation within 1% (6 standard errors),
    and the fractions within 1, 2 and 3 sigma within 6 standard errors of the Gaussian's."""
    sampler = lattice.lattice_noise(Z, C, D).sampler
    draws = np.asarray(jax.jit(lambda k: sampler.draw(k, 2**20))(jnp.arange(4, dtype=jnp.uint32)), np.float64)
    sigma = sampler.stddev
    assert np.std(draws) == pytest.approx(sigma, rel=0.01)
    assert abs(np.mean(draws)) < 6 * sigma / 2**10
    for t in (1, 2, 3):
        p = 1 - 2 * ndtr(-t)
        assert abs(np.mean(np.abs(draws) <= t * sigma) - p) < 6 * math.sqrt(p * (1 - p) / 2**20)


# --- dp_noise(mechanism="lattice") ------------------------------------------------------------------------------


def zeros():
    return {"a": jnp.zeros((100_000,)), "b": jnp.zeros((50_000, 2))}


def test_lattice_noise_standard_deviation_and_fresh_draws():
    """Noise of z times the effective sensitivity over B, fresh every step, on the lattice gamma / B."""
    tx = jaxdp.dp_noise(Z, 5.0, B, jax.random.key(0), mechanism="lattice")
    state = tx.init(zeros())
    first, state = tx.update(zeros(), state)
    second, state = tx.update(zeros(), state)
    a, b = flat(first), flat(second)
    expected = noise.noise_stddev(Z, 5.0, B, mechanism="lattice", num_params=200_000)
    assert expected == pytest.approx(Z * 5.0 / B, rel=2**-10)
    assert np.std(a) == pytest.approx(expected, rel=0.01)
    assert abs(np.corrcoef(a, b)[0, 1]) < 6 / math.sqrt(a.size)
    step = 2.0 ** -lattice.lattice_exponent(5.0, 200_000, Z) / B
    np.testing.assert_array_equal(np.round(a / step) * step, a)  # every output on the lattice
    assert int(state.count) == 2


def test_lattice_per_step_sensitivity_scales_the_noise_and_refuses_more():
    """A traced per-step sensitivity (DPSGD-F) at most the one given: the noise follows it (at most one step of
    the outer multiplier above, 0.4% here); above it the step's output is NaN."""
    tx = jaxdp.dp_noise(Z, 3.0, 1, jax.random.key(1), mechanism="lattice")
    update = jax.jit(lambda u, s, c: tx.update(u, s, l2_clip_norm=c))
    state = tx.init(zeros())
    for c in (3.0, 2.0, 1.0):
        out, _ = update(zeros(), state, jnp.float32(c))
        assert np.std(flat(out)) == pytest.approx(Z * c, rel=0.01)
    out, _ = update(zeros(), state, jnp.float32(3.01))
    assert np.all(np.isnan(flat(out)))


def test_lattice_resumes_from_a_checkpointed_state():
    tx = jaxdp.dp_noise(Z, 1.0, 4, jaxdp.noise.key_from_seed(99), mechanism="lattice")
    update = jax.jit(tx.update)
    small = {"w": jnp.zeros((1000,))}
    state = tx.init(small)
    _, state = update(small, state)
    second, _ = update(small, state)
    restored = type(state)(key=np.asarray(state.key), count=np.asarray(state.count))
    again, _ = jaxdp.dp_noise(Z, 1.0, 4, jaxdp.noise.secret_key(), mechanism="lattice").update(small, restored)
    np.testing.assert_array_equal(second["w"], again["w"])


def test_invalid_mechanism_and_secure_lattice_are_refused():
    with pytest.raises(ValueError, match="mechanism='laplace' is not a noise mechanism; choose one of"):
        jaxdp.dp_noise(Z, C, B, jax.random.key(0), mechanism="laplace")
    with pytest.raises(ValueError, match="secure=True applies to mechanism='gaussian'"):
        jaxdp.dp_noise(Z, C, B, jax.random.key(0), mechanism="lattice", secure=True)


def test_count_release_on_the_lattice_is_integer_and_has_sigma():
    """DPSGD-Global-Adapt's count with mechanism='lattice': the released count is an integer, its noise has
    standard deviation sigma_b = 10 (over 4,000 fresh keys)."""
    method = methods.DPSGDGlobalAdapt(1.0, 1.0, 10.0, 0.0, 1.0, expected_batch_size=1.0)
    state = method.init_state()

    def released(key):
        next_state = methods.release(method, state, jnp.asarray([7.0]), key, mechanism="lattice")
        return jnp.log(next_state["threshold"])  # log Z = 0 + (7 + N) / 1 with eta_Z = 0

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(4000))
    counts = np.asarray(jax.jit(jax.vmap(released))(keys), np.float64)
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    assert np.mean(counts) == pytest.approx(7.0, abs=6 * 10 / math.sqrt(4000))
    assert np.std(counts) == pytest.approx(10.0, rel=0.07)
    with pytest.raises(ValueError, match="mechanism='exact' is not a noise mechanism"):
        methods.release(method, state, jnp.asarray([7.0]), jax.random.key(0), mechanism="exact")


def test_threefry_counter_domains_are_distinct():
    # The lattice draws use their own counter domain: never the Gaussian draws' or a step key's blocks.
    assert len({threefry.BITS, threefry.STEP, threefry.LATTICE}) == 3
