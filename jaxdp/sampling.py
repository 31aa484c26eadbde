"""Batch selection for DP-SGD, in fixed shapes, paired with the accounting that matches it.

Two samplers, each knowing its own accounting scheme (``sampler.scheme``), so that a
:class:`jaxdp.accounting.PrivacyLedger` fed by ``ledger.record(sampler, noise_multiplier)`` always counts
what was sampled:

* :class:`PoissonSampler` (the default, ``scheme = "poisson"``): each example is in each step's batch
  independently with probability q — exactly what the Poisson-subsampled Gaussian accounting assumes
  (add-or-remove-one neighbours).
* :class:`ShuffledSampler` (paper-faithful, ``scheme = "fixed"``): a fresh permutation every epoch, cut
  into batches of exactly ``batch_size``; accounted as fixed-size sampling without replacement with
  replace-one neighbours (an approximation for shuffled batches: see :mod:`jaxdp.accounting`).

Shapes. A step's batch is a :class:`Batch` of ``indices`` and ``mask``, both ``[n_chunks, width]``:
every chunk has one of a few widths (``chunk_widths``; by default one), so a jitted gradient function
compiles once per width. A Poisson batch takes one chunk of the narrowest width that holds it; one larger
than the widest, ``physical_batch_size``, is *never truncated* (that would change the privacy analysis):
it is split over several chunks of the widest, and the training loop sums the clipped gradients of all
chunks before adding noise once. Padding entries have index 0 and mask False (``clipped_grad`` gives them
zero weight). An empty Poisson batch is one all-padding chunk: the step still adds noise, as the analysis
assumes. Which examples a step holds never depends on the widths; only the padding does.

Determinism and checkpoints. ``batch(step)`` is a pure function of (constructor arguments, seed, step):
the sampler has no other state, so the state to checkpoint is just the step number, and a resumed run
sees exactly the batches an uninterrupted run would. Random numbers come from NumPy's PCG64 seeded by
``SeedSequence([seed, tag, step or epoch])``, whose uniform doubles and permutations are stable across
NumPy versions under NumPy's reproducibility policy for ``Generator.random``; ``permutation`` has been
stable in practice but NumPy does not promise it across versions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import dp_accounting
import numpy as np
from scipy import stats

from jaxdp import accounting

_POISSON_TAG = 0
_SHUFFLE_TAG = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """One step's batch: ``indices`` int32[n_chunks, physical] into the dataset, ``mask`` bool[same].

    ``mask[c, j]`` is False for padding (whose index is 0 and must contribute nothing). The real examples
    of the step are ``indices[mask]``; no index appears twice.
    """

    indices: np.ndarray
    mask: np.ndarray

    @property
    def n_chunks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def size(self) -> int:
        """Number of real (unmasked) examples in the step."""
        return int(self.mask.sum())


def _check_dataset_size(dataset_size: int) -> int:
    if isinstance(dataset_size, bool) or int(dataset_size) != dataset_size or dataset_size < 1:
        raise ValueError(f"dataset_size={dataset_size!r} must be a whole number >= 1.")
    return int(dataset_size)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed={seed!r} must be a whole number >= 0.")
    return int(seed)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step={step!r} must be a whole number >= 0 (the 0-based training step).")
    return int(step)


def _chunked(selected: np.ndarray, physical: int) -> Batch:
    """Spreads ``selected`` indices over ceil(len/physical) (at least 1) chunks of width ``physical``."""
    n_chunks = max(1, -(-len(selected) // physical))
    indices = np.zeros(n_chunks * physical, np.int32)
    mask = np.zeros(n_chunks * physical, bool)
    indices[: len(selected)] = selected
    mask[: len(selected)] = True
    return Batch(indices.reshape(n_chunks, physical), mask.reshape(n_chunks, physical))


def expected_slots(dataset_size: int, sampling_prob: float, widths: Sequence[int]) -> float:
    """The expected number of chunk slots (real examples plus padding) a step computes with these chunk widths:
    a batch of B examples takes one chunk of the narrowest width >= B, else ceil(B / widest) chunks of the
    widest, for B ~ Binomial(dataset_size, q)."""
    sizes, pmf = _batch_size_pmf(dataset_size, sampling_prob)
    return _expected_slots(sizes, pmf, widths)


def _batch_size_pmf(dataset_size: int, sampling_prob: float) -> tuple[np.ndarray, np.ndarray]:
    n = _check_dataset_size(dataset_size)
    sizes = np.arange(n + 1)
    return sizes, stats.binom(n, accounting._check_sampling_prob(sampling_prob)).pmf(sizes)


def _expected_slots(sizes: np.ndarray, pmf: np.ndarray, widths: Sequence[int]) -> float:
    widths = sorted(int(w) for w in widths)
    slots = widths[-1] * np.maximum(1, np.ceil(sizes / widths[-1]))
    for w in reversed(widths[:-1]):
        slots = np.where(sizes <= w, w, slots)
    return float(np.sum(pmf * slots))


def chunk_widths(dataset_size: int, sampling_prob: float, count: int = 1, *, multiple: int = 1) -> tuple[int, ...]:
    """``count`` (1 or 2) chunk widths, multiples of ``multiple``: the widest is
    :func:`default_physical_batch_size` (rounded up), and with ``count=2`` a narrower one that minimises
    :func:`expected_slots`.

    A second width trades padding for one more compiled gradient function (seconds to tens of seconds): worth it
    for long runs. For q = 256/12000 (the demo) the widths are (263, 294) and a step computes 275 slots instead
    of 297 (7% less); for q = 32/24000 (the paper) (34, 46): 38 slots instead of 46 (18% less).
    """
    if count not in (1, 2):
        raise ValueError(f"count={count!r}: 1 or 2 chunk widths.")
    if isinstance(multiple, bool) or int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be a whole number >= 1 (the number of data-parallel devices).")
    widest = -(-default_physical_batch_size(dataset_size, sampling_prob) // multiple) * multiple
    if count == 1 or widest == multiple:
        return (widest,)
    sizes, pmf = _batch_size_pmf(dataset_size, sampling_prob)
    narrow = min(range(multiple, widest, multiple), key=lambda w: _expected_slots(sizes, pmf, (w, widest)))
    return (narrow, widest)


def default_physical_batch_size(
    dataset_size: int, sampling_prob: float, overflow_prob: float = 0.01
) -> int:
    """The smallest chunk width p with P(B > p) <= overflow_prob, for B ~ Binomial(dataset_size, q).

    A batch larger than p costs a second chunk (never a truncation), so ``overflow_prob`` is the fraction
    of steps expected to need more than one chunk; a larger p pads every step more. For q = 32/24000
    (expected batch 32, std 5.65) this gives p = 46: 0.76% of steps take two chunks, the mean padding is 14 slots.
    """
    n = _check_dataset_size(dataset_size)
    q = accounting._check_sampling_prob(sampling_prob)
    if not (0 < overflow_prob < 1):
        raise ValueError(f"overflow_prob={overflow_prob!r} must be in (0, 1).")
    # isf gives the smallest p with sf(p) <= overflow_prob; at least 1 slot even when q*n is tiny.
    return int(min(n, max(1, stats.binom(n, q).isf(overflow_prob))))


class PoissonSampler:
    """Poisson sampling: every step, each example is included independently with probability q.

    Matches ``accounting.epsilon(..., sampling="poisson")``: neighbouring datasets differ by adding or
    removing one example, and the batch size is random (Binomial(dataset_size, q), mean q * dataset_size).

    Args:
      dataset_size: number of training examples (>= 1).
      sampling_prob: q in (0, 1]. Give exactly one of this and ``expected_batch_size``.
      expected_batch_size: q * dataset_size, in (0, dataset_size].
      physical_batch_size: width of each padded chunk; default :func:`default_physical_batch_size`.
        Batches larger than this are split over several chunks, never truncated. A sequence of widths
        (e.g. from :func:`chunk_widths`): each batch takes one chunk of the narrowest that holds it, and
        ``physical_batch_size`` is the widest.
      seed: batches are a pure function of (seed, step).
    """

    scheme = "poisson"

    def __init__(
        self,
        dataset_size: int,
        sampling_prob: float | None = None,
        *,
        expected_batch_size: float | None = None,
        physical_batch_size: int | Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.dataset_size = _check_dataset_size(dataset_size)
        if (sampling_prob is None) == (expected_batch_size is None):
            raise ValueError(
                "Give exactly one of sampling_prob (q in (0, 1]) and expected_batch_size "
                f"(q * dataset_size); got sampling_prob={sampling_prob!r}, "
                f"expected_batch_size={expected_batch_size!r}."
            )
        if expected_batch_size is not None:
            if not (0 < expected_batch_size <= self.dataset_size):
                raise ValueError(
                    f"expected_batch_size={expected_batch_size!r} must be in (0, dataset_size="
                    f"{self.dataset_size}]."
                )
            sampling_prob = expected_batch_size / self.dataset_size
        self.sampling_prob = accounting._check_sampling_prob(sampling_prob)
        if physical_batch_size is None:
            physical_batch_size = default_physical_batch_size(self.dataset_size, self.sampling_prob)
        widths = physical_batch_size if isinstance(physical_batch_size, Sequence) else (physical_batch_size,)
        if not widths or any(isinstance(w, bool) or int(w) != w or w < 1 for w in widths):
            raise ValueError(f"physical_batch_size={physical_batch_size!r} must be a whole number >= 1 "
                             "(or a sequence of them: the chunk widths).")
        self.chunk_widths = tuple(sorted({int(w) for w in widths}))
        self.physical_batch_size = self.chunk_widths[-1]
        self.seed = _check_seed(seed)

    @property
    def expected_batch_size(self) -> float:
        """q * dataset_size: what ``dp_noise(expected_batch_size=...)`` divides the noisy sum by."""
        return self.sampling_prob * self.dataset_size

    @property
    def steps_per_epoch(self) -> int:
        """round(1 / q): the number of steps that visit dataset_size examples in expectation."""
        return max(1, round(1 / self.sampling_prob))

    def batch(self, step: int) -> Batch:
        """The batch of training step ``step`` (0-based): one chunk of the narrowest of ``chunk_widths`` that
        holds it, else chunks of ``physical_batch_size``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _POISSON_TAG, _check_step(step)]))
        selected = np.flatnonzero(rng.random(self.dataset_size) < self.sampling_prob)
        width = next((w for w in self.chunk_widths if w >= len(selected)), self.physical_batch_size)
        return _chunked(selected, width)

    def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """The per-step event: ``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))``."""
        return accounting.step_event(self.scheme, self.sampling_prob, noise_multiplier)

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(dataset_size={self.dataset_size}, sampling_prob={self.sampling_prob!r}, "
            f"chunk_widths={self.chunk_widths})"  # never the seed: it may be the run's secret
        )


class ShuffledSampler:
    """Shuffled fixed-size batches: a fresh permutation each epoch, cut into ``batch_size`` pieces.

    This is what the paper (and most non-private training) does. It is accounted as
    ``accounting.epsilon(..., sampling="fixed", dataset_size=...)``: fixed-size sampling without
    replacement, independently each step, with replace-one neighbours. That analysis is the standard
    stand-in but is not a proof for shuffled batches (each example is used exactly once per epoch); use
    :class:`PoissonSampler` when the guarantee must match the algorithm exactly.

    Args:
      dataset_size: number of training examples (>= 1).
      batch_size: examples per step, in [1, dataset_size].
      seed: the permutation of epoch e is a pure function of (seed, e).
      drop_remainder: True (default): each epoch has dataset_size // batch_size full batches and the
        dataset_size % batch_size examples left at the end of that epoch's permutation are skipped.
        False: a last, smaller batch (padded, mask False) so every example is used once per epoch; the
        accounting still uses the nominal batch_size.
    """

    scheme = "fixed"

    def __init__(
        self, dataset_size: int, batch_size: int, *, seed: int = 0, drop_remainder: bool = True
    ) -> None:
        self.dataset_size = _check_dataset_size(dataset_size)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or not (
            1 <= batch_size <= self.dataset_size
        ):
            raise ValueError(
                f"batch_size={batch_size!r} must be a whole number in [1, dataset_size="
                f"{self.dataset_size}]."
            )
        self.batch_size = int(batch_size)
        self.seed = _check_seed(seed)
        self.drop_remainder = bool(drop_remainder)
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    @property
    def sampling_prob(self) -> float:
        return self.batch_size / self.dataset_size

    @property
    def expected_batch_size(self) -> int:
        return self.batch_size

    @property
    def physical_batch_size(self) -> int:
        return self.batch_size

    @property
    def chunk_widths(self) -> tuple[int, ...]:
        """The one chunk width: every batch is exactly ``batch_size`` wide."""
        return (self.batch_size,)

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.dataset_size // self.batch_size
        return -(-self.dataset_size // self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SHUFFLE_TAG, epoch]))
            self._cached_epoch = (epoch, rng.permutation(self.dataset_size).astype(np.int32))
        return self._cached_epoch[1]

    def batch(self, step: int) -> Batch:
        """The batch of training step ``step`` (0-based): one chunk of ``batch_size`` slots."""
        epoch, within = divmod(_check_step(step), self.steps_per_epoch)
        start = within * self.batch_size
        selected = self._permutation(epoch)[start : start + self.batch_size]
        return _chunked(selected, self.batch_size)

    def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """The per-step event: ``SampledWithoutReplacementDpEvent(n, b, GaussianDpEvent(z / 2))``.

        z/2 because the replace-one sensitivity of the clipped sum is 2C (see :mod:`jaxdp.accounting`).
        """
        return accounting.step_event(
            self.scheme, self.sampling_prob, noise_multiplier, self.dataset_size
        )

    def __repr__(self) -> str:
        return (
            f"ShuffledSampler(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
            f"drop_remainder={self.drop_remainder})"  # never the seed: it may be the run's secret
        )


SAMPLERS = {cls.scheme: cls for cls in (PoissonSampler, ShuffledSampler)}


def make_sampler(scheme: str, dataset_size: int, batch_size: int, *, seed: int, chunk_multiple: int = 1,
                 sampling_prob: float | None = None, num_chunk_widths: int = 1, public_size: int | None = None,
                 physical_batch_size: int | None = None):
    """The sampler of ``scheme`` ("poisson": expected batch ``batch_size``; "fixed": exactly ``batch_size``),
    with chunks a multiple of ``chunk_multiple`` wide (the number of data-parallel devices); a Poisson sampler's
    ``num_chunk_widths`` widths are :func:`chunk_widths` (fixed-size batches take one width).

    ``sampling_prob`` (Poisson only) fixes q instead of ``batch_size / dataset_size``: a run that adds examples
    whose number must stay secret (an audit's canaries) keeps the q, and so the steps and the epsilon, of its
    public training set. ``public_size`` (the public training set's size, when ``dataset_size`` holds such secret
    examples) is then the size the chunk widths are computed from: the widths are the shapes of the compiled
    steps, so they show in timing, in the compilation cache's keys and in ``final.json``, and must not depend on
    a secret count. (Batches wider than the widest chunk still take several chunks, never a truncation.)
    ``physical_batch_size`` (Poisson only) sets the chunk width instead (rounded up to a multiple of
    ``chunk_multiple``; one width).
    """
    if scheme not in SAMPLERS:
        raise ValueError(f"sampling scheme {scheme!r} is unknown; choose one of {tuple(SAMPLERS)}.")
    if scheme == PoissonSampler.scheme:
        q = batch_size / dataset_size if sampling_prob is None else sampling_prob
        if physical_batch_size is not None:
            widths = (-(-int(physical_batch_size) // chunk_multiple) * chunk_multiple,)
        else:
            widths = chunk_widths(dataset_size if public_size is None else public_size, q, num_chunk_widths,
                                  multiple=chunk_multiple)
        return PoissonSampler(dataset_size, q, physical_batch_size=widths, seed=seed)
    if sampling_prob is not None:
        raise ValueError("sampling_prob is for Poisson sampling; fixed-size batches take exactly batch_size.")
    if batch_size % chunk_multiple:
        raise ValueError(
            f"config.train.batch_size={batch_size} must be a multiple of the device count ({chunk_multiple}) "
            "with config.dp.sampling='fixed'."
        )
    return ShuffledSampler(dataset_size, batch_size, seed=seed)
