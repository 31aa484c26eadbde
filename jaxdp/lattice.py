"""The lattice mechanism: DP-SGD noise whose output is a post-processing of integers.

Why
---
The Gaussian mechanism's release ``fl(fl(g + fl(s Z)) / B)`` in float32, with ``s = z C`` not a power of two,
leaves holes in the output's support: ``fl(s Z)`` maps Z's float grid onto a finer one, so near a given value
some float32 outputs can occur when a coordinate of the clipped sum is ``g`` and never when it is ``g'``. An
adversary who knows the neighbour's value of one coordinate (a zero-initialised bias only the target touches)
then tells the datasets apart with certainty on those outputs (Mironov, "On significance of the least
significant bits for differential privacy", CCS 2012, for the Laplace mechanism; the same holds here).

The mechanism
-------------
For a clipped sum ``S`` with ``d`` coordinates, sensitivity ``C`` (add or remove one example) and noise
multiplier ``z`` (:func:`jaxdp.dp_noise` with ``mechanism="lattice"``):

1. ``gamma = 2^-e`` (:func:`lattice_exponent`): the largest power of two with ``gamma sqrt(d) <= 2^-10 C``
   (larger only where the noise would not fit in int32, see below);
2. ``k = clamp(round(S / gamma), -2^30, 2^30)`` in int32: ``S / gamma = S 2^e`` is a multiplication by a power
   of two, **exact** in floating point (no float error to bound), and rounding and clamping are exact;
3. ``y = k + N`` in int32, with ``N`` integer noise whose distribution is within a tiny total variation of
   ``round(N(0, sigma^2))`` per coordinate, ``sigma >= z Delta`` with ``Delta = C / gamma + sqrt(d)``;
4. the output is ``y gamma / B`` in float: a function of the integers ``y`` alone (post-processing).

Guarantee
---------
*Sensitivity.* If the float clipped sums of neighbouring datasets satisfy ``||S - S'|| <= C``, then
``||k - k'|| <= C / gamma + sqrt(d) = Delta``: ``|round(a) - round(b)| <= |a - b| + 1`` per coordinate (each
rounding moves by at most 1/2), clamping is 1-Lipschitz, and the triangle inequality. In units of the sum that is
the effective sensitivity ``C + gamma sqrt(d) <= C (1 + 2^-10)`` (:func:`effective_sensitivity`); the noise is
scaled to ``z`` times it, so ``z`` keeps its meaning and the accountant is unchanged.

*The noise* is ``sigma = (1 + 2^-14) z Delta`` (lattice units; the margin lets a per-step sensitivity computed in
float32 fit the tables, see :func:`lattice_units_stddev`), so at most ``2^-10 + 2^-14`` above the Gaussian
mechanism's ``z C`` at the same ``z``.

*The ideal mechanism* ``k + round(sigma G)``, ``G ~ N(0, I_d)``, equals ``round(k + sigma G)`` for integer
``k``: a post-processing of the Gaussian mechanism with L2 sensitivity ``Delta`` and noise multiplier
``sigma / Delta >= z``. Everything the accountant proves for the Poisson-subsampled Gaussian mechanism
composed over steps (``dp_accounting``'s PLD and RDP accountants) therefore holds for it exactly, whatever the
floating-point behaviour of the later steps, which see only ``y``.

*The sampler* (:class:`IntegerGaussian`) draws ``N = R0 + M1 (R1 + M2 (R2 + ...))``: ``R0`` a rounded Gaussian
``round(N(0, s0^2))`` and ``R1, R2, ...`` discrete Gaussians ``D_{Z,s}`` (pmf proportional to
``exp(-n^2 / 2 s^2)``; Canonne, Kamath & Steinke, "The discrete Gaussian for differential privacy", NeurIPS
2020), the ``M_i`` powers of two with ``s_{i-1} >= 2.5 M_i``. Each level comes from an alias table (Walker 1977;
Vose 1991) whose integer weights are the level's probabilities (computed with mpmath to 45 digits) rounded to
multiples of ``2^-128``, realised exactly by 128 random bits per level (index bits and a 114-or-more-bit
uniform ``U`` compared with the column's threshold): a value's first Threefry block gives each level its index
bits and ``U``'s top bits (one word per level), which decide the comparison unless they equal the threshold's top
word (a tie: one value in 10^5 or fewer); a tied value's levels take the rest of ``U`` from blocks of their own
(:meth:`IntegerGaussian.draw`). By Poisson summation (the convolution argument of Peikert, CRYPTO 2010, and
Micciancio & Walter, CRYPTO 2017), ``R + M X`` with ``X ~ D_{Z,t}`` has, pointwise, the pmf of
``round(N(0, s^2 + M^2 t^2))`` (or of ``D_{Z, sqrt(s^2 + M^2 t^2)}``) up to a factor ``(1 +- eps) / (1 -+ eps)``,
``eps = 2 sum_k exp(-2 pi^2 k^2 v)``, ``v = (1/t^2 + M^2/s^2)^-1 >= 4.6`` here, so ``eps < 1e-39``. The sampler's
total variation from ``round(N(0, sigma^2))`` per draw is therefore at most the tables' (their rounding and the
mass beyond ``12.5 sigma_level`` they leave out) plus the smoothing error and the chance that a draw meets more
tied values than it recomputes (:data:`TIE_FAILURE_PER_DRAW`, 1e-40 per value): :attr:`IntegerGaussian.tv_bound`,
below :data:`TV_PER_DRAW` (1.7e-34) for every sampler built here.

*The run.* Coupling each of the run's ``n`` draws with an ideal one, the real run's output differs from the ideal
run's with probability at most ``n tau``; so if the ideal run is (epsilon, delta)-DP, the real one is
``(epsilon, delta + (1 + e^epsilon) n tau)``-DP. :func:`jaxdp.accounting.lattice_delta` computes that term and
the accountant spends it out of the configured delta. There is no separate tail-truncation term: the tables
reach ``12.5`` standard deviations and the mass beyond is part of ``tau``.

What this does not cover
------------------------
* The floating-point computation of the clipped sum ``S`` itself: the argument above takes the float ``S`` as
  given and assumes ``||S - S'|| <= C`` for the float sums. The float sum of ``n`` clipped per-example
  gradients deviates from the exact sum by at most ``(n - 1) 2^-24 sum_i |g_i|`` per coordinate (any summation
  order; Higham, "Accuracy and Stability of Numerical Algorithms", 2002, eq. 4.4), so by at most about
  ``n^2 2^-24 C`` in L2 in the worst case (``0.4% of C`` at ``n = 256``; the two neighbours' sums can then be
  up to twice that further apart than ``C``), typically ``sqrt(n) 2^-24`` relative.
  The clip factors' own rounding adds a relative ``~ 2^-23``. The bookkeeping strategy sums over examples
  inside matrix products, and accelerators may run float32 products at reduced precision (TF32 on recent
  NVIDIA GPUs unless ``jax_default_matmul_precision`` asks for full float32), which makes these errors larger.
  These change the sensitivity by a small relative amount; unlike the support holes above they cannot make an
  output impossible under one dataset and possible under the other.
* The generator: Threefry-4x32-20's output is taken to be uniform random bits (see :mod:`jaxdp.threefry`).
* Timing: drawing takes the same work whatever the values (no data-dependent branch or loop; a draw recomputes
  a fixed number of blocks whether they tie or not). The memory addresses it reads and writes do depend on them
  (the tables' columns, which blocks are recomputed): an adversary who observes the training machine's caches is
  outside this guarantee.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp import runlog, threefry

SENSITIVITY_SLACK = 2.0**-10  # the lattice step's share of the sensitivity: gamma sqrt(d) <= this * C
MAX_SUM = 2**30  # |k| is clamped here, so that k + N fits in int32
# The largest noise standard deviation in lattice units: at most three levels (capacity 4.19e7), so that
# |N| <= sum_i (12.5 s_i + 1) M_i... <= 12.5 sqrt(3) sigma + 2^16 < 2^30 (Cauchy-Schwarz) and k + N fits in int32.
MAX_STDDEV = 4.0e7
TAIL_STDDEVS = 12.5  # each table covers |n| <= ceil(12.5 s); the mass beyond is part of its total variation
MAX_TABLE_STDDEV = 640.0  # the largest s of one table: 2 ceil(12.5 s) + 1 <= 2^14 cells
SMOOTHING_RATIO = 2.5  # each level's fine part has s >= 2.5 M, M the multiplier of the coarse part
RANDOM_BITS = 128  # per level: index bits, then the alias threshold's uniform U
_DIGITS = 45  # mpmath precision of the tables' probabilities (the weights are multiples of 2^-128)
_MAX_LEVELS = 3  # enough for MAX_STDDEV: 640, 163,840 and 4.19e7 are the capacities of 1 to 3 levels (at most 4:
# a value's levels take their columns from the four words of one block)
TIE_BLOCK = 32  # values per block that a draw recomputes in full where one of them ties (IntegerGaussian.draw)
# The probability, per value drawn, that a draw meets more tied blocks than it recomputes (tie_block_capacity).
TIE_FAILURE_PER_DRAW = 1e-40


def _normal_tail(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


# Per table: at most 2^-114 from rounding the weights (2^14 cells, each within 2^-128) and the ideal mass beyond
# 12.5 s (<= 2 Phi(-12.5)), once for the missing tail and once where it went (TV = half the L1 distance).
TABLE_TV_BOUND = 2.0**-114 + 2 * _normal_tail(TAIL_STDDEVS) * 1.001
# Per draw, every sampler built here: up to three tables, plus the smoothing error (below 1e-39 per level) and the
# chance of more tied blocks than a draw recomputes (TIE_FAILURE_PER_DRAW).
TV_PER_DRAW = _MAX_LEVELS * TABLE_TV_BOUND + 1e-38


# --- Alias tables ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class AliasTable:
    """One level's exact sampler: value ``n`` in ``[-half_width, half_width]`` with probability ``weights[n +
    half_width] / 2^128``.

    ``rows[i]`` (uint32) is column ``i``'s alias cell and its threshold's four words (most significant first): a
    block's top ``index_bits`` bits choose the column ``i``, its other ``128 - index_bits`` bits a uniform
    ``U``; the cell is ``i`` if ``U < threshold`` else the alias. ``tv_bound``: total variation from the ideal
    distribution (``kind`` ``"rounded"``: ``round(N(0, stddev^2))``; ``"discrete"``: ``D_{Z,stddev}``).
    """

    kind: str
    stddev: float
    half_width: int
    index_bits: int
    weights: tuple[int, ...]
    rows: np.ndarray
    tv_bound: float


def _ideal_probabilities(kind: str, stddev: float, half_width: int):
    """The ideal pmf at ``0 .. half_width`` (symmetric) and the mass beyond ``+-half_width``, in mpmath."""
    import mpmath

    s = mpmath.mpf(stddev)
    if kind == "rounded":
        # P(|X| > m + 1/2) / 2 for X ~ N(0, s^2): the cells [n - 1/2, n + 1/2) differ by consecutive tails.
        tails = [mpmath.erfc((m + mpmath.mpf(0.5)) / (s * mpmath.sqrt(2))) / 2 for m in range(half_width + 1)]
        probabilities = [1 - 2 * tails[0]] + [tails[n - 1] - tails[n] for n in range(1, half_width + 1)]
        return probabilities, 2 * tails[-1]
    # Discrete Gaussian: the normaliser sum_n exp(-n^2 / 2 s^2) = s sqrt(2 pi) sum_k exp(-2 pi^2 k^2 s^2) (Poisson
    # summation), and the mass beyond half_width is at most the integral of the density from half_width on.
    if s >= 1:
        normaliser = s * mpmath.sqrt(2 * mpmath.pi) * (1 + 2 * mpmath.nsum(
            lambda k: mpmath.exp(-2 * mpmath.pi**2 * k**2 * s**2), [1, mpmath.inf]))
    else:
        normaliser = 1 + 2 * mpmath.nsum(lambda n: mpmath.exp(-(n**2) / (2 * s**2)), [1, mpmath.inf])
    probabilities = [mpmath.exp(-mpmath.mpf(n) ** 2 / (2 * s**2)) / normaliser for n in range(half_width + 1)]
    beyond = 2 * s * mpmath.sqrt(2 * mpmath.pi) * mpmath.erfc(half_width / (s * mpmath.sqrt(2))) / 2 / normaliser
    return probabilities, beyond


def _alias_rows(weights: list[int], index_bits: int) -> np.ndarray:
    """Vose's alias method in exact integers: columns of capacity ``2^(128 - index_bits)``."""
    capacity = 1 << (RANDOM_BITS - index_bits)
    size = 1 << index_bits
    remaining = list(weights) + [0] * (size - len(weights))
    assert sum(remaining) == size * capacity
    alias, threshold = list(range(size)), [0] * size
    small = [i for i in range(size) if remaining[i] < capacity]
    large = [i for i in range(size) if remaining[i] >= capacity]
    while small and large:
        under, over = small.pop(), large[-1]
        threshold[under], alias[under] = remaining[under], over
        remaining[over] -= capacity - remaining[under]
        if remaining[over] < capacity:
            small.append(large.pop())
    # What is left is exactly full (exact arithmetic): threshold 0 and alias itself, i.e. always the column.
    assert all(remaining[i] == capacity for i in small + large)
    mask = 0xFFFFFFFF
    return np.array([[alias[i], threshold[i] >> 96, (threshold[i] >> 64) & mask, (threshold[i] >> 32) & mask,
                      threshold[i] & mask] for i in range(size)], np.uint32)


_TABLE_CACHE_FORMAT = 1  # bump when the tables' construction changes: older files are then ignored
# The tables every sampler above 1,280 lattice units starts with (its outer rounded level) and every three-level
# sampler's middle level once it reaches 640: shipped with the package (jaxdp/lattice_tables/, written by
# write_packaged_tables), so that a first run does not spend seconds in mpmath building them. A packaged file is read
# like a cache file (its SHA-256 and structure checked, else ignored and the table built);
# tests/test_lattice.py rebuilds both and compares them weight for weight.
PACKAGED_TABLES = (("rounded", 640.0), ("discrete", 640.0))


def _half_width(stddev: float) -> int:
    """The largest |n| a table of standard deviation ``stddev`` holds: ``ceil(12.5 stddev)`` (:data:`TAIL_STDDEVS`)."""
    return max(1, math.ceil(TAIL_STDDEVS * stddev))


def _table_file_name(kind: str, stddev: float) -> str:
    """The name of a table's file, in the package and in the cache folder (without the package's ``.gz``)."""
    return f"{kind}-{float(stddev).hex()}-v{_TABLE_CACHE_FORMAT}.json"


def packaged_table_file(kind: str, stddev: float) -> Path:
    """Where the package keeps the table of ``(kind, stddev)`` if it ships it (:data:`PACKAGED_TABLES`)."""
    return Path(__file__).with_name("lattice_tables") / (_table_file_name(kind, stddev) + ".gz")


def write_packaged_tables() -> list[Path]:
    """Build :data:`PACKAGED_TABLES` with mpmath and write them into the package (run when their construction
    changes: ``python -c "from jaxdp import lattice; lattice.write_packaged_tables()"``)."""
    written = []
    for kind, stddev in PACKAGED_TABLES:
        half_width = _half_width(stddev)
        weights, tv_bound = _table_weights(kind, stddev, half_width)
        record = json.dumps(_table_record(_table_payload(kind, stddev, half_width, weights, tv_bound)))
        path = packaged_table_file(kind, stddev)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(record.encode(), compresslevel=9, mtime=0))
        written.append(path)
    return written


def table_cache_file(kind: str, stddev: float) -> Path | None:
    """Where :func:`alias_table` keeps the table of ``(kind, stddev)`` across processes: a ``jaxdp-lattice``
    folder in JAX's persistent compilation cache directory, when one is configured
    (``jax.config.update("jax_compilation_cache_dir", ...)``; the study's sweeps set it), else ``None`` (no file).

    The tables are public (functions of ``kind`` and ``stddev`` alone, which follow from the public ``z``, ``C``
    and parameter count); the file carries a SHA-256 of its contents, and a file that does not match, or does not
    describe a valid table, is ignored and rebuilt."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        return None
    return Path(directory) / "jaxdp-lattice" / _table_file_name(kind, stddev)


def _table_payload(kind: str, stddev: float, half_width: int, weights: list[int], tv_bound: float) -> str:
    return json.dumps({"format": _TABLE_CACHE_FORMAT, "kind": kind, "stddev": float(stddev).hex(),
                       "half_width": half_width, "weights": [format(w, "x") for w in weights],
                       "tv_bound": float(tv_bound).hex()}, sort_keys=True)


def _table_record(payload: str) -> dict[str, str]:
    """A table file's contents: the payload and its SHA-256, which :func:`_load_table` checks."""
    return {"payload": payload, "sha256": hashlib.sha256(payload.encode()).hexdigest()}


def _load_table(path: Path, kind: str, stddev: float, half_width: int) -> tuple[list[int], float] | None:
    """The cached weights and total-variation bound, or None if the file is absent, damaged or not this table's
    (a ``.gz`` file is read through gzip)."""
    try:
        raw = path.read_bytes()
        record = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
        payload = record["payload"]
        if hashlib.sha256(payload.encode()).hexdigest() != record["sha256"]:
            return None
        table = json.loads(payload)
        weights = [int(w, 16) for w in table["weights"]]
        tv_bound = float.fromhex(table["tv_bound"])
    except (OSError, EOFError, ValueError, KeyError, TypeError):  # gzip.BadGzipFile is an OSError
        return None
    valid = (table.get("format") == _TABLE_CACHE_FORMAT and table.get("kind") == kind
             and table.get("stddev") == float(stddev).hex() and table.get("half_width") == half_width
             and len(weights) == 2 * half_width + 1 and sum(weights) == 1 << RANDOM_BITS
             and min(weights) >= 1 and 0 <= tv_bound <= TABLE_TV_BOUND)
    return (weights, tv_bound) if valid else None


def _save_table(path: Path, payload: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        runlog.write_json(path, _table_record(payload))
    except OSError:  # a read-only or full cache folder costs the next process the build, nothing else
        pass


@functools.lru_cache(maxsize=64)
def alias_table(kind: str, stddev: float) -> AliasTable:
    """The alias table of ``round(N(0, stddev^2))`` (``kind="rounded"``) or ``D_{Z,stddev}`` (``"discrete"``),
    ``stddev <= 640``: read from the package for the two tables almost every sampler uses (:data:`PACKAGED_TABLES`),
    else built in mpmath (the rounded table of 640 is the slowest), then cached in the process, and across
    processes in :func:`table_cache_file` when JAX's compilation cache directory is set."""
    if kind not in ("rounded", "discrete") or not 0 < stddev <= MAX_TABLE_STDDEV:
        raise ValueError(f"alias_table takes kind 'rounded' or 'discrete' and 0 < stddev <= {MAX_TABLE_STDDEV}; "
                         f"got {kind!r}, {stddev!r}.")
    half_width = _half_width(stddev)
    index_bits = max(1, (2 * half_width).bit_length())
    cached = _load_table(packaged_table_file(kind, stddev), kind, stddev, half_width)  # None if not shipped
    cache_file = table_cache_file(kind, stddev) if cached is None else None
    if cache_file is not None:
        cached = _load_table(cache_file, kind, stddev, half_width)
    if cached is None:
        weights, tv_bound = _table_weights(kind, stddev, half_width)
        if cache_file is not None:
            _save_table(cache_file, _table_payload(kind, stddev, half_width, weights, tv_bound))
    else:
        weights, tv_bound = cached
    return AliasTable(kind, float(stddev), half_width, index_bits, tuple(weights),
                      _alias_rows(weights, index_bits), tv_bound)


def _table_weights(kind: str, stddev: float, half_width: int) -> tuple[list[int], float]:
    """The table's integer weights (units of ``2^-128``) and its total variation from the ideal pmf, in mpmath."""
    import mpmath

    with mpmath.workdps(_DIGITS):
        half, beyond = _ideal_probabilities(kind, stddev, half_width)
        ideal = half[:0:-1] + half  # values -half_width .. half_width
        total = 1 << RANDOM_BITS
        weights = [int(mpmath.floor(p * total)) for p in ideal]
        # The rounding remainder and the ideal mass beyond the table go to the centre cell.
        weights[half_width] += total - sum(weights)
        if min(weights) < 1:
            raise AssertionError(f"an empty cell in the {kind} table of stddev {stddev}: its support would have a hole")
        distance = sum(abs(mpmath.mpf(w) / total - p) for w, p in zip(weights, ideal, strict=True)) + beyond
        tv_bound = float(distance / 2) * (1 + 1e-9) + 1e-44  # upward, past the 45-digit evaluation
    assert tv_bound <= TABLE_TV_BOUND, (kind, stddev, tv_bound)
    return weights, tv_bound


def _take(tables: Sequence[AliasTable], j: int, row: jax.Array) -> jax.Array:
    """Word ``j`` of the tables' rows (concatenated in order; ``row`` indexes the concatenation): the alias (int32)
    for ``j = 0``, else threshold word ``j``. 1-D gathers with int32 indices ("clip": they are in range): XLA's CPU
    backend ran a 2-D gather of the rows with uint32 indices, fused with what consumes it, about 10^4 times
    slower."""
    values = np.concatenate([t.rows[:, j] for t in tables])
    return jnp.take(jnp.asarray(values.astype(np.int32) if j == 0 else values), row, mode="clip")


def _exact_cells(word: jax.Array, rest: Sequence[jax.Array], tables: Sequence[AliasTable]) -> jax.Array:
    """Each level's values (int32 ``[levels, n]``) from 128 random bits each: for level ``l`` (row ``l`` of ``word``
    and of the three words ``rest``), ``word``'s top ``index_bits`` bits choose the column of ``tables[l]``, its
    other bits are the top of the uniform ``U`` and ``rest`` is the rest of ``U``; the cell is the column where
    ``U`` is below the column's threshold (compared word by word), else its alias.

    The levels' tables are read as one concatenated table, and each gathered word has one use (``x - t`` wraps
    exactly where ``x < t``), so that XLA compiles the levels as one fused loop."""
    level_rows = np.cumsum([0] + [len(t.rows) for t in tables])[:-1].astype(np.int32)[:, None]
    shift = np.array([32 - t.index_bits for t in tables], np.uint32)[:, None]
    column = (word >> shift).astype(jnp.int32)
    row = level_rows + column
    # U's top bits are word's low bits: the threshold's top word holds the same number of bits.
    x = [word & ((np.uint32(1) << shift) - np.uint32(1)), *rest]
    below = None
    for j in reversed(range(4)):
        d = x[j] - _take(tables, j + 1, row)
        below = (d > x[j]) if below is None else (d > x[j]) | ((d == 0) & below)
    half_width = np.array([t.half_width for t in tables], np.int32)[:, None]
    return jnp.where(below, column, _take(tables, 0, row)) - half_width


def _exact_level(word: jax.Array, rest: Sequence[jax.Array], table: AliasTable) -> jax.Array:
    """One level's values (int32) from 128 random bits each (:func:`_exact_cells` for one table)."""
    return _exact_cells(word[None], [r[None] for r in rest], (table,))[0]


def _fast_level(word: jax.Array, table: AliasTable) -> tuple[jax.Array, jax.Array]:
    """:func:`_exact_level`'s value from ``word`` alone wherever ``U``'s top bits differ from the threshold's top
    word (they decide the comparison), and whether they are equal (a *tie*: the value then needs ``rest``).

    Each gathered word has one use, so XLA fuses both gathers into the draw's one loop (a gather with two uses
    became a fusion of its own, which recomputed the generator's block)."""
    shift = 32 - table.index_bits
    column = (word >> np.uint32(shift)).astype(jnp.int32)
    # Both below 2^shift <= 2^30 (index_bits >= 2): the difference is exact in int32.
    above = _take((table,), 1, column).astype(jnp.int32) - (word & np.uint32((1 << shift) - 1)).astype(jnp.int32)
    cell = jnp.where(above > 0, column, _take((table,), 0, column)) - np.int32(table.half_width)
    return cell, above == 0


def tie_block_capacity(size: int, tables: Sequence[AliasTable]) -> int:
    """How many blocks of :data:`TIE_BLOCK` values a draw of ``size`` values recomputes in full (all of them
    when that is every block): the smallest number ``K`` such that more than ``K`` blocks hold a tie with
    probability at most ``size * TIE_FAILURE_PER_DRAW``.

    A value ties at level ``l`` with probability ``2^-(32 - index_bits_l)`` (``U``'s top bits are uniform and
    independent of the column), so a block holds a tie with probability at most ``q = TIE_BLOCK sum_l
    2^-(32 - index_bits_l)``, independently of the other blocks. With ``mu = blocks q`` (at least the expected
    number of blocks with a tie), Chernoff's bound ``P(X >= m) <= e^-mu (e mu / m)^m`` for ``m > mu`` (increasing
    in ``mu`` there, so it holds for the true mean too) is checked at ``m = K + 1``, with a factor ``e`` to spare.
    """
    blocks = -(-int(size) // TIE_BLOCK)
    q = TIE_BLOCK * sum(2.0 ** -(32 - t.index_bits) for t in tables)
    mu = blocks * q
    log_budget = math.log(max(int(size), 1) * TIE_FAILURE_PER_DRAW) - 1.0
    for capacity in range(blocks):
        m = capacity + 1
        if m > mu and -mu + m * (1.0 + math.log(mu) - math.log(m)) <= log_budget:
            return capacity
    return blocks


# --- The integer noise -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class IntegerGaussian:
    """Integer noise ``N = R0 + M1 (R1 + M2 (R2 + ...))`` within ``tv_bound`` (total variation, per draw) of
    ``round(N(0, stddev^2))`` (module docstring).

    ``tables``: the levels, outermost (rounded) first; ``multipliers``: ``M1, M2, ...``; ``inner_stddev``: the
    ideal standard deviation of ``R1 + M2 (...)`` (the part ``M1`` multiplies); ``max_abs``: the largest |N|.
    Every integer in ``[-max_abs, max_abs]`` has positive probability (every cell of every table does).
    """

    stddev: float
    tables: tuple[AliasTable, ...]
    multipliers: tuple[int, ...]
    inner_stddev: float | None
    smoothing_bound: float
    tv_bound: float
    max_abs: int

    def draw(self, key_words: jax.Array, size: int, outer_multiplier: jax.Array | None = None) -> jax.Array:
        """``size`` int32 draws keyed by the 128-bit ``key_words``: value ``i``, level ``l`` takes its column and the
        top bits of its ``U`` from word ``l`` of the block at counter ``(i, 0, 0, LATTICE)`` and the other 96 bits
        of ``U`` from the block at ``(i, l, 1, LATTICE)``. ``outer_multiplier``: a (traced) ``M1 <=
        multipliers[0]`` replacing it, which lowers the standard deviation to ``sqrt(s0^2 + M1^2 inner_stddev^2)``
        (:func:`outer_multiplier`).

        How (the values are those of computing every level's 128 bits for every value):

        1. one element-wise pass makes every value from its first block alone (:func:`_fast_level`) and marks the
           values with a tie at some level (one in 10^5 or fewer);
        2. the first ``K`` blocks of :data:`TIE_BLOCK` values holding a tie are recomputed in full, ``K`` fixed by
           the size (:func:`tie_block_capacity`), whatever the values: the work, and so the time, do not depend on
           them, though the addresses written (which blocks) do, as the tables' gathers' addresses already do.

        More than ``K`` such blocks (probability at most ``TIE_FAILURE_PER_DRAW`` per value, in :attr:`tv_bound`)
        would leave a tie in a later block decided as "not below". A draw whose ``K`` is all its blocks (a short
        one) skips the first pass and computes every value in full.
        """
        threefry.check_draw_size(size)
        if size == 0:
            return jnp.zeros((0,), jnp.int32)
        words = list(jnp.asarray(key_words, jnp.uint32))
        LATTICE = threefry.LATTICE  # noqa: N806 (the counter domain's name)
        blocks = -(-size // TIE_BLOCK)
        threefry.check_draw_size(blocks * TIE_BLOCK)
        capacity = tie_block_capacity(size, self.tables)

        def combine(levels):
            value = levels[-1]
            for level in reversed(range(len(levels) - 1)):
                multiplier = self.multipliers[level]
                if level == 0 and outer_multiplier is not None:
                    multiplier = outer_multiplier
                value = levels[level] + multiplier * value
            return value

        def exact(index):
            # Lanes [level, value]: each takes its level's word of the value's first block and its own block.
            level = np.arange(len(self.tables), dtype=np.uint32)[:, None]
            first = threefry.threefry4x32(words, [index[None, :], 0, 0, LATTICE])
            word = first[len(self.tables) - 1]
            for row in reversed(range(len(self.tables) - 1)):
                word = jnp.where(level == row, first[row], word)
            rest = threefry.threefry4x32(words, [index[None, :], level, 1, LATTICE])[:3]
            return combine(list(_exact_cells(word, rest, self.tables)))

        if capacity >= blocks:
            return threefry.computed_once(words, lambda: exact(jax.lax.iota(jnp.uint32, size)))

        def first_pass():  # 2 v + (1 where some level ties): one int32 output, so one fused loop (|v| < 2^30)
            first = threefry.threefry4x32(words, [jax.lax.iota(jnp.uint32, blocks * TIE_BLOCK), 0, 0, LATTICE])
            cells, ties = zip(*(_fast_level(first[level], table) for level, table in enumerate(self.tables)),
                              strict=True)
            tie = functools.reduce(jnp.logical_or, ties)
            return combine(list(cells)) * np.int32(2) + tie.astype(jnp.int32)

        encoded = threefry.computed_once(words, first_pass).reshape(blocks, TIE_BLOCK)
        tied = jnp.max(encoded & np.int32(1), axis=1) > 0
        chosen = jnp.nonzero(tied, size=capacity, fill_value=blocks)[0]  # the first `capacity` tied blocks
        index = chosen.astype(jnp.uint32)[:, None] * np.uint32(TIE_BLOCK) + jnp.arange(TIE_BLOCK, dtype=jnp.uint32)
        # Unfilled places (fill_value = blocks) point past the end: their values are computed and dropped.
        values = (encoded >> np.int32(1)).at[chosen].set(exact(index.reshape(-1)).reshape(capacity, TIE_BLOCK),
                                                         mode="drop")
        return values.reshape(-1)[:size]


def _smoothing_error(fine: float, multiplier: int, coarse: float) -> float:
    """``log((1 + eps) / (1 - eps))``, ``eps = 2 sum_k exp(-2 pi^2 k^2 v)``, ``v = (1/coarse^2 + M^2/fine^2)^-1``:
    the pointwise log-ratio between ``fine-level + M coarse-level`` and the single Gaussian (module docstring)."""
    v = 1.0 / (1.0 / coarse**2 + multiplier**2 / fine**2)
    eps = 2 * sum(math.exp(-2 * math.pi**2 * k**2 * v) for k in range(1, 50)) * (1 + 1e-9)
    if eps >= 0.5:
        raise AssertionError(f"smoothing too weak: v = {v}")
    return math.log1p(eps) - math.log1p(-eps)


@functools.lru_cache(maxsize=64)
def integer_gaussian(stddev: float) -> IntegerGaussian:
    """The sampler for ``round(N(0, sigma^2))`` with ``sigma >= stddev`` (``0 < stddev <= MAX_STDDEV``), cached.

    Levels: a single rounded table up to 640; above, a rounded table of ``min(640, stddev / 2)`` plus ``M1``
    times a discrete Gaussian of the rest, itself split the same way until each table's ``s <= 640``.
    """
    if not 0 < stddev <= MAX_STDDEV:
        raise ValueError(f"The lattice noise's standard deviation must be in (0, {MAX_STDDEV:g}] lattice units; "
                         f"got {stddev!r}.")
    plan, multipliers, target, kind = [], [], float(stddev), "rounded"
    while target > MAX_TABLE_STDDEV:
        fine = min(MAX_TABLE_STDDEV, target / 2)
        multiplier = 2 ** math.floor(math.log2(fine / SMOOTHING_RATIO))
        plan.append((kind, fine))
        multipliers.append(multiplier)
        # Rounded up, so the ideal standard deviation never falls below the one asked for.
        target = math.sqrt(target**2 - fine**2) / multiplier * (1 + 2**-40)
        kind = "discrete"
    plan.append((kind, target))
    tables = tuple(alias_table(k, s) for k, s in plan)
    assert len(tables) <= _MAX_LEVELS, (stddev, len(tables))  # a value's levels share one block's four words
    # The ideal standard deviations of the nested parts, innermost first, and the check that the whole reaches
    # stddev, in exact arithmetic.
    variance = Fraction(tables[-1].stddev) ** 2
    inner = [variance]
    smoothing = 0.0
    for table, multiplier in zip(tables[-2::-1], multipliers[::-1], strict=True):
        smoothing += _smoothing_error(table.stddev, multiplier, math.sqrt(variance))
        variance = Fraction(table.stddev) ** 2 + multiplier**2 * variance
        inner.append(variance)
    if variance < Fraction(stddev) ** 2:
        raise AssertionError(f"integer_gaussian({stddev}) reaches only {math.sqrt(variance)}")
    max_abs = tables[-1].half_width
    for table, multiplier in zip(tables[-2::-1], multipliers[::-1], strict=True):
        max_abs = table.half_width + multiplier * max_abs
    if max_abs >= 2**31 - MAX_SUM:
        raise AssertionError(f"integer_gaussian({stddev}): |N| up to {max_abs} overflows int32 with k")
    tv = sum(t.tv_bound for t in tables) + math.expm1(smoothing) + TIE_FAILURE_PER_DRAW
    assert tv <= TV_PER_DRAW
    return IntegerGaussian(math.sqrt(variance), tables, tuple(multipliers),
                           math.sqrt(inner[-2]) if len(tables) > 1 else None, smoothing, tv, max_abs)


def outer_multiplier(sampler: IntegerGaussian, stddev: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The smallest ``M1`` whose noise reaches the (traced, float32) ``stddev``, and whether ``M1`` is allowed
    (``<= multipliers[0]``: the bound the smoothing error was computed for); for a one-level sampler, whether its
    fixed standard deviation reaches ``stddev``. The standard deviation is then at most ``inner_stddev`` above
    ``stddev`` (one step of ``M1``)."""
    if not sampler.multipliers:
        return None, stddev <= np.float32(sampler.stddev)
    fine = np.float32(sampler.tables[0].stddev)
    rest = jnp.sqrt(jnp.maximum(jnp.square(stddev) - fine * fine, 0.0)) / np.float32(sampler.inner_stddev)
    multiplier = jnp.ceil(rest).astype(jnp.int32)
    return multiplier, multiplier <= sampler.multipliers[0]


# --- The lattice for a sum -----------------------------------------------------------------------------------


def lattice_exponent(l2_clip_norm: float, num_params: int, noise_multiplier: float) -> int:
    """``e`` with lattice step ``gamma = 2^-e``: the smallest ``e`` with ``gamma sqrt(d) <= 2^-10 C`` (checked in
    exact arithmetic), decreased while the noise's standard deviation ``z (C / gamma + sqrt(d))`` would exceed
    :data:`MAX_STDDEV` lattice units (then the sensitivity increase ``gamma sqrt(d) / C`` is larger, and
    :func:`effective_sensitivity` says by how much).

    >>> lattice_exponent(1.0, 20_650, 0.7)   # gamma = 2^-18: 2^-18 * sqrt(20650) = 5.5e-4 <= 2^-10 = 9.8e-4
    18
    """
    c, d = Fraction(float(l2_clip_norm)), int(num_params)
    if d <= 0:
        return 0
    slack_sq = (Fraction(SENSITIVITY_SLACK) * c) ** 2

    def fits(e: int) -> bool:  # gamma^2 d <= (2^-10 C)^2, exactly
        return Fraction(2) ** (-2 * e) * d <= slack_sq

    exponent = math.ceil(-math.log2(SENSITIVITY_SLACK * float(c) / math.sqrt(d)))
    while fits(exponent - 1):
        exponent -= 1
    while not fits(exponent):
        exponent += 1
    while lattice_units_stddev(noise_multiplier, float(c), d, exponent) > MAX_STDDEV:
        exponent -= 1
    if not -120 <= exponent <= 120:
        raise ValueError(f"The lattice step 2^-{exponent} for l2_clip_norm={float(c)} and {d} parameters is outside "
                         "float32's range; rescale the loss so that the clip norm is between 1e-30 and 1e30.")
    return exponent


def effective_sensitivity(l2_clip_norm: float, num_params: int, noise_multiplier: float) -> float:
    """``C + gamma sqrt(d)``: the lattice mechanism's L2 sensitivity in units of the sum (deterministic rounding of
    both neighbours' sums adds at most ``sqrt(d)`` lattice steps), rounded up. The noise's standard deviation in
    the sum is ``noise_multiplier`` times this (or slightly more), so the accountant takes ``noise_multiplier``.

    >>> round(effective_sensitivity(1.0, 20_650, 0.7) - 1.0, 6)   # 2^-18 * sqrt(20650)
    0.000548
    """
    gamma = 2.0 ** -lattice_exponent(l2_clip_norm, num_params, noise_multiplier)
    return float(np.nextafter(float(l2_clip_norm) + gamma * math.sqrt(int(num_params)), np.inf))


# The sampler is built for 1 + 2^-14 times the required standard deviation: more than the 1 + 2^-16 by which a
# per-step one computed in float32 is enlarged (LatticeNoise.required_stddev), so that the largest per-step
# sensitivity still fits the outer multiplier the smoothing bound was computed for. The default step's noise is
# therefore 6e-5 (relative) above z times the effective sensitivity.
_BUILD_MARGIN = 1 + 2**-14


def lattice_units_stddev(noise_multiplier: float, l2_clip_norm: float, num_params: int, exponent: int) -> float:
    """``z (C 2^e + sqrt(d))`` (times ``1 + 2^-14``): the noise the sampler is built for, in lattice units."""
    return float(noise_multiplier) * (float(l2_clip_norm) * 2.0**exponent + math.sqrt(int(num_params))) * _BUILD_MARGIN


def quantise(values: jax.Array, exponent: int) -> jax.Array:
    """``clamp(round(values 2^e), -2^30, 2^30)`` as int32 (NaN, which clipping never produces, as 0).

    Exact: multiplying a float by a power of two in range only changes its exponent."""
    x = values if values.dtype in (jnp.float32, jnp.float64) else values.astype(jnp.float32)
    scaled = x * np.asarray(2.0**exponent, x.dtype)
    k = jnp.clip(jnp.round(scaled), -MAX_SUM, MAX_SUM)
    return jnp.where(jnp.isnan(k), 0, k).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class LatticeNoise:
    """The lattice mechanism for one noise multiplier, sensitivity (the largest per-step one) and coordinate count:
    ``exponent`` (``gamma = 2^-exponent``), the integer ``sampler`` (None when there is no noise to add)."""

    noise_multiplier: float
    l2_clip_norm: float
    num_params: int
    exponent: int
    sampler: IntegerGaussian | None

    @property
    def effective_sensitivity(self) -> float:
        return effective_sensitivity(self.l2_clip_norm, self.num_params, self.noise_multiplier)

    def required_stddev(self, l2_clip_norm: jax.Array) -> jax.Array:
        """The (traced, float32) noise standard deviation in lattice units for a per-step sensitivity, enlarged by
        ``1 + 2^-16`` to outweigh its float32 roundings (as :func:`jaxdp.noise.dp_noise` does)."""
        scaled = l2_clip_norm * np.float32(2.0**self.exponent) + np.float32(math.sqrt(self.num_params))
        return np.float32(self.noise_multiplier) * scaled * np.float32(1 + 2**-16)


@functools.lru_cache(maxsize=64)
def lattice_noise(noise_multiplier: float, l2_clip_norm: float, num_params: int) -> LatticeNoise:
    """The cached :class:`LatticeNoise` (builds the sampler's tables: up to about a second the first time)."""
    exponent = lattice_exponent(l2_clip_norm, num_params, noise_multiplier)
    sampler = None
    if noise_multiplier > 0 and num_params > 0:
        sampler = integer_gaussian(lattice_units_stddev(noise_multiplier, l2_clip_norm, num_params, exponent))
    return LatticeNoise(float(noise_multiplier), float(l2_clip_norm), int(num_params), exponent, sampler)


@functools.partial(jax.jit, static_argnames=("stddev",))
def _noised_counts(counts: jax.Array, key: jax.Array, *, stddev: float) -> jax.Array:
    sampler = integer_gaussian(stddev)
    k = quantise(jnp.ravel(counts), 0)
    noise = sampler.draw(threefry.key_words(key), k.size)
    return (k + noise).astype(jnp.float32).reshape(jnp.shape(counts))


def noised_counts(counts: jax.Array, key: jax.Array, stddev: float) -> jax.Array:
    """Integer counts (float32 holding integers) plus integer noise within ``TV_PER_DRAW`` of
    ``round(N(0, sigma^2))``, ``sigma >= stddev``, keyed by the secret ``key``: the lattice mechanism with lattice
    step 1 (counts are integers already, so their sensitivity is unchanged). One compiled program per call."""
    return _noised_counts(counts, key, stddev=float(stddev))
