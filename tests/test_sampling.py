"""Tests for jaxdp.sampling: Poisson statistics, chunking without loss, padding, determinism, shuffling."""

import math

import dp_accounting
import numpy as np
import pytest

from jaxdp import accounting
from jaxdp.sampling import Batch, PoissonSampler, ShuffledSampler, default_physical_batch_size


def _examples(batch: Batch) -> np.ndarray:
    return batch.indices[batch.mask]


def test_poisson_inclusion_frequency_and_batch_size_distribution():
    n, q, steps = 200, 0.1, 2_000
    sampler = PoissonSampler(n, q, seed=3)
    counts = np.zeros(n)
    sizes = np.zeros(steps)
    for step in range(steps):
        examples = _examples(sampler.batch(step))
        counts[examples] += 1
        sizes[step] = len(examples)
    # Each example's count is Binomial(2000, 0.1): mean 200, std sqrt(2000*0.1*0.9) = 13.4. With 200
    # examples, a deviation beyond 5 std has probability about 200 * 5.7e-7 = 1e-4.
    per_example_std = math.sqrt(steps * q * (1 - q))
    assert np.max(np.abs(counts - steps * q)) < 5 * per_example_std
    # All 400,000 draws together: frequency q with std sqrt(q(1-q)/400000) = 4.7e-4.
    assert abs(counts.sum() / (n * steps) - q) < 4 * math.sqrt(q * (1 - q) / (n * steps))
    # Batch size ~ Binomial(200, 0.1): mean 20, variance 18. The mean of 2000 sizes has std 0.095; the
    # sample variance has relative std sqrt(2/1999) ~ 3.2% (a fixed-size sampler would give variance 0).
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=4 * math.sqrt(2 / (steps - 1)))


def test_poisson_large_batch_is_chunked_never_truncated():
    n, q, physical = 100, 0.5, 16
    chunked = PoissonSampler(n, q, physical_batch_size=physical, seed=7)
    whole = PoissonSampler(n, q, physical_batch_size=n, seed=7)
    for step in range(20):
        batch = chunked.batch(step)
        examples = _examples(batch)
        assert batch.indices.shape == batch.mask.shape == (batch.n_chunks, physical)
        assert batch.indices.dtype == np.int32 and batch.mask.dtype == bool
        assert batch.n_chunks == max(1, math.ceil(batch.size / physical)) and batch.n_chunks >= 3
        assert len(np.unique(examples)) == len(examples)  # no duplicate within a step
        # No example lost: the same set as when the whole batch fits in one chunk.
        assert set(examples) == set(_examples(whole.batch(step)))
        # Padding: index 0, mask False, all at the end of the last chunk.
        assert np.all(batch.indices[~batch.mask] == 0)
        assert batch.mask.reshape(-1)[: batch.size].all() and not batch.mask.reshape(-1)[batch.size :].any()


def test_empty_poisson_batch_is_one_masked_chunk():
    sampler = PoissonSampler(10, 0.01, physical_batch_size=4)
    empty = next(sampler.batch(s) for s in range(200) if sampler.batch(s).size == 0)
    assert empty.indices.shape == (1, 4) and not empty.mask.any()


def test_poisson_determinism_in_seed_and_step():
    a = PoissonSampler(1_000, expected_batch_size=50, seed=1)
    b = PoissonSampler(1_000, expected_batch_size=50, seed=1)
    later_first = b.batch(9)
    for step in (0, 9, 123_456):
        assert np.array_equal(a.batch(step).indices, b.batch(step).indices)
        assert np.array_equal(a.batch(step).mask, b.batch(step).mask)
    assert np.array_equal(later_first.indices, a.batch(9).indices)  # independent of call order
    other_seed = PoissonSampler(1_000, expected_batch_size=50, seed=2)
    assert set(_examples(a.batch(0))) != set(_examples(other_seed.batch(0)))
    assert set(_examples(a.batch(0))) != set(_examples(a.batch(1)))


def test_poisson_defaults_and_attributes():
    sampler = PoissonSampler(24_000, expected_batch_size=32)
    assert sampler.scheme == "poisson"
    assert sampler.sampling_prob == 32 / 24_000 and sampler.expected_batch_size == pytest.approx(32)
    assert sampler.steps_per_epoch == 750
    # Smallest p with P(Binomial(24000, 1/750) > p) <= 1%: P(B > 45) = 1.15%, P(B > 46) = 0.76%.
    assert sampler.physical_batch_size == default_physical_batch_size(24_000, 32 / 24_000) == 46
    assert default_physical_batch_size(10, 1.0) == 10 and default_physical_batch_size(1, 0.5) == 1


def test_shuffled_covers_each_example_once_per_epoch():
    n, b = 103, 10
    keep_all = ShuffledSampler(n, b, seed=5, drop_remainder=False)
    assert keep_all.steps_per_epoch == 11
    for epoch in range(3):
        batches = [keep_all.batch(epoch * 11 + i) for i in range(11)]
        assert all(x.indices.shape == (1, b) for x in batches)
        assert [x.size for x in batches] == [10] * 10 + [3]
        seen = np.concatenate([_examples(x) for x in batches])
        assert sorted(seen) == list(range(n))  # every example exactly once
    drop = ShuffledSampler(n, b, seed=5)
    assert drop.steps_per_epoch == 10
    epoch0 = np.concatenate([_examples(drop.batch(i)) for i in range(10)])
    epoch1 = np.concatenate([_examples(drop.batch(10 + i)) for i in range(10)])
    assert len(set(epoch0)) == len(set(epoch1)) == 100
    assert not np.array_equal(epoch0, epoch1)  # a fresh permutation each epoch
    assert all(drop.batch(i).mask.all() for i in range(20))
    again = ShuffledSampler(n, b, seed=5)
    assert np.array_equal(again.batch(13).indices, drop.batch(13).indices)


def test_dp_events_match_scheme():
    poisson = PoissonSampler(24_000, expected_batch_size=32)
    assert poisson.dp_event(0.7) == dp_accounting.PoissonSampledDpEvent(
        32 / 24_000, dp_accounting.GaussianDpEvent(0.7)
    )
    shuffled = ShuffledSampler(24_000, 32)
    assert shuffled.scheme == "fixed" and shuffled.sampling_prob == 32 / 24_000
    assert shuffled.dp_event(0.7) == dp_accounting.SampledWithoutReplacementDpEvent(
        24_000, 32, dp_accounting.GaussianDpEvent(0.35)
    )
    ledger = accounting.PrivacyLedger()
    ledger.record(shuffled, 0.7, steps=3)
    assert ledger.dp_event() == dp_accounting.SelfComposedDpEvent(shuffled.dp_event(0.7), 3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PoissonSampler(0, 0.1), "dataset_size=0 must be a whole number >= 1"),
        (lambda: PoissonSampler(100), "Give exactly one of sampling_prob"),
        (lambda: PoissonSampler(100, 0.1, expected_batch_size=10), "Give exactly one of sampling_prob"),
        (lambda: PoissonSampler(100, 1.5), r"sampling_prob=1.5 is outside \(0, 1\]"),
        (lambda: PoissonSampler(100, expected_batch_size=200), r"expected_batch_size=200 must be in"),
        (lambda: PoissonSampler(100, 0.1, physical_batch_size=0), "physical_batch_size=0"),
        (lambda: PoissonSampler(100, 0.1, seed=-1), "seed=-1"),
        (lambda: PoissonSampler(100, 0.1).batch(-1), "step=-1 must be a whole number >= 0"),
        (lambda: ShuffledSampler(100, 101), r"batch_size=101 must be a whole number in \[1, dataset_size"),
        (lambda: ShuffledSampler(100, 0), "batch_size=0"),
        (lambda: default_physical_batch_size(100, 0.1, overflow_prob=0), "overflow_prob=0"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_repr_never_shows_the_seed():
    """A sampler's seed may be a run's secret; printing a sampler (in a log, an error) must not reveal it."""
    secret = 0xDEADBEEF_01234567_89ABCDEF_0F1E2D3C
    for sampler in (PoissonSampler(100, 0.1, seed=secret), ShuffledSampler(100, 10, seed=secret)):
        assert f"{secret:x}" not in repr(sampler) and str(secret) not in repr(sampler)


def test_make_sampler_pads_chunks_to_the_device_count_and_names_unknown_schemes():
    from jaxdp.sampling import make_sampler

    poisson = make_sampler("poisson", 12_000, 256, seed=1, chunk_multiple=4)
    assert isinstance(poisson, PoissonSampler) and poisson.physical_batch_size % 4 == 0
    assert poisson.expected_batch_size == pytest.approx(256)
    assert isinstance(make_sampler("fixed", 100, 8, seed=1, chunk_multiple=4), ShuffledSampler)
    with pytest.raises(ValueError, match="multiple of the device count"):
        make_sampler("fixed", 100, 10, seed=1, chunk_multiple=4)
    with pytest.raises(ValueError, match="choose one of \\('poisson', 'fixed'\\)"):
        make_sampler("uniform", 100, 10, seed=1)


def test_chunk_widths_follow_the_public_size_not_a_secret_pool_size():
    from jaxdp.sampling import make_sampler

    # An audited run samples from its training set plus the canaries its secret coins let in, at the public q:
    # the widths (the compiled steps' shapes, in final.json and the compilation cache) must not move with them.
    public = make_sampler("poisson", 12_000, 256, seed=1, num_chunk_widths=2)
    for included in (0, 7, 400):
        pool = make_sampler("poisson", 12_000 + included, 256, seed=1, num_chunk_widths=2,
                            sampling_prob=256 / 12_000, public_size=12_000)
        assert pool.chunk_widths == public.chunk_widths and pool.sampling_prob == public.sampling_prob
    assert make_sampler("poisson", 12_400, 256, seed=1, sampling_prob=256 / 12_000).physical_batch_size > \
        public.physical_batch_size  # what the pool's own size would have given
    assert make_sampler("fixed", 100, 8, seed=1).chunk_widths == (8,)


def test_expected_slots_by_hand():
    from jaxdp.sampling import expected_slots

    # n=3, q=1/2: B = 0, 1, 2, 3 with probabilities 1/8, 3/8, 3/8, 1/8.
    assert expected_slots(3, 0.5, (2,)) == pytest.approx(2 * 7 / 8 + 4 / 8)  # B=3: two chunks of 2
    assert expected_slots(3, 0.5, (1, 2)) == pytest.approx(1 * 4 / 8 + 2 * 3 / 8 + 4 / 8)
    assert expected_slots(3, 0.5, (3,)) == pytest.approx(3)


def test_two_chunk_widths_pad_less_and_hold_the_same_examples():
    from jaxdp.sampling import chunk_widths, expected_slots, make_sampler

    # The demo (q = 256/12000): the default width pads every step to 294 (296.5 slots with the 0.85% of steps that
    # take two chunks); a second width of 263 holds 70% of the batches: 275.3 slots.
    assert chunk_widths(12_000, 256 / 12_000) == (294,)
    assert chunk_widths(12_000, 256 / 12_000, 2) == (263, 294)
    assert expected_slots(12_000, 256 / 12_000, (294,)) == pytest.approx(296.5, abs=0.05)
    assert expected_slots(12_000, 256 / 12_000, (263, 294)) == pytest.approx(275.3, abs=0.05)
    assert chunk_widths(24_000, 32 / 24_000, 2) == (34, 46)  # the paper: 38.2 slots instead of 46.3
    assert all(w % 4 == 0 for w in chunk_widths(12_000, 256 / 12_000, 2, multiple=4))
    with pytest.raises(ValueError, match="1 or 2 chunk widths"):
        chunk_widths(100, 0.1, 3)

    one = PoissonSampler(100, 0.3, physical_batch_size=40, seed=3)
    two = PoissonSampler(100, 0.3, physical_batch_size=(24, 40), seed=3)
    assert two.chunk_widths == (24, 40) and two.physical_batch_size == 40
    widths = set()
    for step in range(60):
        batch = two.batch(step)
        width = batch.indices.shape[1]
        widths.add(width)
        assert width == (24 if batch.size <= 24 else 40)
        assert batch.n_chunks == max(1, math.ceil(batch.size / width))
        assert sorted(_examples(batch)) == sorted(_examples(one.batch(step)))  # never truncated, nothing added
    assert widths == {24, 40}
    assert make_sampler("poisson", 12_000, 256, seed=1, num_chunk_widths=2).chunk_widths == (263, 294)
