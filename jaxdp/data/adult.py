"""UCI Adult (census income) with an exact group balance: the sources "adult" and "adult_synthetic".

The real files, ``adult.data`` and ``adult.test`` of the UCI release (https://archive.ics.uci.edu/dataset/2/adult),
are read from ``config.data.manual_dir`` (default ``<data_dir>/downloads/manual``, the folder convention of CelebA)
and checked against their SHA-256 (:data:`SHA256`); anything else is refused with what to do. ``adult_synthetic``
writes files of the same format (:mod:`jaxdp.data.adult_synthetic`) on first use and reads them through the same
parser, without that checksum (they are not UCI's files).

**Rows and label** (as fair-dp's ``datasets/tabular.py``, Esipova et al. 2023): both files are read (the test file's
first line, ``|1x3 Cross validator``, and blank lines skipped; the test labels' trailing ``.`` removed), every row
with a ``?`` in any column is dropped: 45,222 of the 48,842 rows remain (14,695 women, 30,527 men). The label is
``income > 50K`` (1). ``fnlwgt`` (a sampling weight of the census, not a property of the person) is dropped.

**Features** (:data:`FEATURE_NAMES`, 99 of them, a fixed layout that does not depend on the data):

* the five numerical columns ``age, education_num, capital_gain, capital_loss, hours_per_week``, standardised
  ``(x - mean) / std`` (sample std, ddof 1, as pandas);
* ``race`` as one indicator, non-white = 1, and ``sex`` as one indicator, female = 1: fair-dp keeps both protected
  attributes among the inputs, and so do we, to run fair-dp's experiment as it is (a model that sees the group can
  also use it; removing them would be a different study, and the other columns carry much of the same
  information: ``relationship`` holds Husband and Wife);
* one indicator per category of ``workclass, education, marital_status, occupation, relationship,
  native_country``, over the category lists that ``adult.names`` documents (:data:`CATEGORIES`), so the layout is
  public. fair-dp one-hot encodes the categories present after its subsampling (98 features for its seeds 0 and
  1); ours has one more always-zero column, ``workclass=Never-worked``, which no complete row has.

**Where the standardisation statistics come from.** fair-dp computes them over all 45,222 rows, training and test
together, without noise: statistics of its training rows that enter the model (no DP covers them) and of its test
rows that enter training. jaxdp computes them over the **test set** only (the fixed test set below): they are then
not statistics of any training row, so no training row influences the model except through the DP mechanism. The
price is that the (label-free) means and standard deviations of the test rows' five numerical columns shape the
input scale of the model evaluated on them; that is ten numbers, no labels, and the same affine map for train and
test, so it cannot favour correct predictions on test rows over any other rows of the population. The test rows are
not protected by the training's DP guarantee either way: they are never trained on, and evaluation releases them.

**Groups.** ``group_attribute`` ``"sex"`` (the default for Adult): group 0 = female, group 1 = male, names
``("female", "male")``; ``"race"``: group 0 = non-white (every race but White), group 1 = white, names
``("non-white", "white")``. ``female_fraction`` is the fraction of group 0 in the training set (women, or people
who are not white): the natural fractions are 14,695 / 45,222 = 32.5% and 6,319 / 45,222 = 14.0%.

**Counts** (exact, the same rule at every fraction). With ``total = T``, ``test_fraction = p``,
``female_fraction = f``: ``test = round_half_up(T p)`` rows, ``train = T - test``; the training set holds
``round_half_up(train f)`` rows of group 0 and the rest of group 1; within each group the rows are drawn at random,
so each group keeps its natural label rate (about 11% of women, 31% of men earn > 50K), which is the point of real
data. The test set has the **natural** group composition of its pool (``round_half_up(test n0 / n)`` rows of group
0, ``n0`` of ``n`` pool rows being in group 0), drawn at random within each group, from its own random stream: for
one seed, total and test fraction it is the same rows at every female fraction, so every fraction is evaluated on
one test set, with the groups' standardisation statistics fixed with it. A ``total`` whose training set a fraction
cannot fill is refused with the largest total that fits. ``T = 30,000, p = 0.2`` (24,000 train, 6,000 test)
fits every fraction from the natural one down to 1% (23,760 men of the 24,481 left after the test set).

**Split schemes.** ``"paper"`` (as fair-dp, and as the paper pooled CelebA's partitions): the two files pooled,
the test set drawn from the pool, the training set from the rest. ``"official"``: the test set drawn from
``adult.test``, the training set from ``adult.data`` (UCI's split; fewer rows to draw from: 9,782 women and 20,380
men).

**Seeds.** ``seed`` picks the test set, the training rows (each group's rows in a seeded random order, of which
the training set takes a prefix: for one seed, the women at 5% are a subset of the women at 20%) and the order of
both sets. Held-out rows (``holdout_per_group = n``, for the privacy audit) are ``n`` rows of each group from what
the training pool has left, drawn at random within the group (like the training rows: members and non-members are
exchangeable), a prefix of their own stream: a larger ``n`` extends a smaller one.

**Split files.** ``config.data.split_file`` (not in the default config; a config adds it, as
``configs/adult_fairdp_paired.py``) names a file of :mod:`jaxdp.data.adult_split` that lists the training and the
test rows by (file, line number): then exactly those rows are the two sets, and ``female_fraction``, ``total``,
``test_fraction`` and ``split_scheme`` are not used (``train_size``, and with it the privacy accounting's dataset
size, is the file's training count). Everything else is as above: the test rows' standardisation, the features, the
group attribute, the order by ``seed``, the files' checksums. The file is checked (its own SHA-256, its schema, the
Adult files' SHA-256 its lines refer to, every line a complete row, disjoint sets, its per-sex counts) before any run,
each problem one line naming the file. Held-out rows (``holdout_per_group > 0``) are refused with a split file. A split
file discloses which rows trained (membership, which DP's guarantee does not cover for inputs you publish yourself):
fair-dp's are recomputable from public data, code and seed; keep one for private data as private as the data.

Example::

    from jaxdp import data
    cfg = {"source": "adult", "manual_dir": "../shared/data/adult", "group_attribute": "sex",
           "label_attribute": "income", "female_fraction": 0.1, "total": 30_000, "test_fraction": 0.2}
    train, test = data.load(cfg)   # 24,000 x 99 float32 features, 2,400 women; 6,000 test rows
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from jaxdp.data.celeba import default_data_dir  # also registers "celeba" and "synthetic" first
from jaxdp.data.core import (
    DataSource,
    DataUnavailable,
    GroupedSplit,
    Splits,
    check_holdout_request,
    config_value,
    group_names_of,
    register_source,
)
from jaxdp.data.subsets import round_half_up

__all__ = [
    "CATEGORIES", "COLUMNS", "FEATURE_NAMES", "FILE_NAMES", "GROUP_ATTRIBUTES", "LABEL_ATTRIBUTE", "NUMERICAL",
    "SHA256", "AdultPlan", "AdultSource", "AdultTable", "GeneratedAdultSource", "build_listed_splits", "build_splits",
    "plan_counts",
    "read_table",
]

UCI_PAGE = "https://archive.ics.uci.edu/dataset/2/adult"
DATA_NAME, TEST_NAME = "adult.data", "adult.test"
FILE_NAMES = (DATA_NAME, TEST_NAME)
# The UCI release's files (their md5 sums are UCI's published ones; see /work/shared/data/adult/README.md).
SHA256 = {
    DATA_NAME: "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
    TEST_NAME: "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
}
TEST_HEADER = "|1x3 Cross validator"  # adult.test's first line
COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
           "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
           "income")
NUMERICAL = ("age", "education_num", "capital_gain", "capital_loss", "hours_per_week")
# The categories of adult.names, in its order: the one-hot layout (public, independent of the data).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "workclass": ("Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov", "State-gov",
                  "Without-pay", "Never-worked"),
    "education": ("Bachelors", "Some-college", "11th", "HS-grad", "Prof-school", "Assoc-acdm", "Assoc-voc", "9th",
                  "7th-8th", "12th", "Masters", "1st-4th", "10th", "Doctorate", "5th-6th", "Preschool"),
    "marital_status": ("Married-civ-spouse", "Divorced", "Never-married", "Separated", "Widowed",
                       "Married-spouse-absent", "Married-AF-spouse"),
    "occupation": ("Tech-support", "Craft-repair", "Other-service", "Sales", "Exec-managerial", "Prof-specialty",
                   "Handlers-cleaners", "Machine-op-inspct", "Adm-clerical", "Farming-fishing", "Transport-moving",
                   "Priv-house-serv", "Protective-serv", "Armed-Forces"),
    "relationship": ("Wife", "Own-child", "Husband", "Not-in-family", "Other-relative", "Unmarried"),
    "native_country": ("United-States", "Cambodia", "England", "Puerto-Rico", "Canada", "Germany",
                       "Outlying-US(Guam-USVI-etc)", "India", "Japan", "Greece", "South", "China", "Cuba", "Iran",
                       "Honduras", "Philippines", "Italy", "Poland", "Jamaica", "Vietnam", "Mexico", "Portugal",
                       "Ireland", "France", "Dominican-Republic", "Laos", "Ecuador", "Taiwan", "Haiti", "Columbia",
                       "Hungary", "Guatemala", "Nicaragua", "Scotland", "Thailand", "Yugoslavia", "El-Salvador",
                       "Trinadad&Tobago", "Peru", "Hong", "Holand-Netherlands"),
}
RACES = ("White", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other", "Black")
SEXES = ("Female", "Male")
INCOMES = ("<=50K", ">50K")
FEATURE_NAMES: tuple[str, ...] = (*NUMERICAL, "race=non-white", "sex=Female",
                                  *(f"{col}={cat}" for col, cats in CATEGORIES.items() for cat in cats))
LABEL_ATTRIBUTE = "income"  # config.data.label_attribute for Adult: label 1 = income > 50K
SPLIT_LABEL = "income>50K"  # GroupedSplit.label_attribute: what label 1 means
# group attribute -> what group 0 is (the group whose training fraction data.female_fraction sets)
GROUP_ATTRIBUTES = {"sex": "female", "race": "non-white (every race but White)"}
DEFAULT_GROUP_ATTRIBUTE = "sex"
SPLIT_SCHEMES = ("paper", "official")
PARTITIONS = {DATA_NAME: 0, TEST_NAME: 1}


# ----------------------------------------------------------------------------------------------------------
# Reading the files.

@dataclass(frozen=True)
class AdultTable:
    """The complete rows of the two files (rows with a ``?`` dropped), in file order.

    ``numerical`` float64 ``[N, 5]`` (:data:`NUMERICAL`), ``codes`` int ``[N, 6]`` (index into each
    :data:`CATEGORIES` list), ``female``/``nonwhite``/``label`` int32 ``[N]`` (0/1), ``partition`` int32 ``[N]``
    (0: adult.data, 1: adult.test), ``line`` int32 ``[N]`` (the row's line number in its file, from 1: with
    ``partition`` the row's identity, whatever the order), ``dropped`` the number of rows with a missing value,
    ``missing_lines`` their line numbers per partition, and ``sha256`` the SHA-256 of each file the table was parsed
    from (by file name).
    """

    numerical: np.ndarray
    codes: np.ndarray
    female: np.ndarray
    nonwhite: np.ndarray
    label: np.ndarray
    partition: np.ndarray
    line: np.ndarray
    dropped: int
    missing_lines: tuple[tuple[int, ...], ...] = ((), ())
    sha256: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label)

    def group(self, group_attribute: str) -> np.ndarray:
        """Each row's group id: 0 = female (``"sex"``) or non-white (``"race"``), 1 = the other."""
        return (1 - (self.female if group_attribute == "sex" else self.nonwhite)).astype(np.int32)

    def features(self, rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """float32 ``[len(rows), 99]`` in the order of :data:`FEATURE_NAMES`, numerical columns standardised."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), len(FEATURE_NAMES)), np.float32)
        k = len(NUMERICAL)
        out[:, :k] = (self.numerical[rows] - mean) / std
        out[:, k], out[:, k + 1] = self.nonwhite[rows], self.female[rows]
        offset = k + 2
        for j, cats in enumerate(CATEGORIES.values()):
            out[np.arange(len(rows)), offset + self.codes[rows, j]] = 1.0
            offset += len(cats)
        return out


def _parse(path: Path, text: str, *, test_file: bool) -> tuple[list[list[str]], int, list[int], list[int]]:
    """The complete rows of one file as lists of 15 fields, the number of rows with a missing value, the complete
    rows' line numbers (from 1) and those of the rows with a missing value."""
    lines = text.split("\n")
    start = 0
    if test_file:
        if not lines or lines[0].strip() != TEST_HEADER:
            raise ValueError(f"{path}: the first line must be {TEST_HEADER!r} (the UCI test file's header); got "
                             f"{lines[0][:40]!r}. Is this UCI's adult.test? ({UCI_PAGE})")
        start = 1
    rows, dropped, numbers, missing = [], 0, [], []
    for number, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split(", ")
        if len(fields) != len(COLUMNS):
            raise ValueError(f"{path}, line {number}: {len(fields)} fields separated by ', ', expected "
                             f"{len(COLUMNS)} ({', '.join(COLUMNS)}); the file is damaged or not UCI Adult's.")
        if "?" in fields:
            dropped += 1
            missing.append(number)
            continue
        rows.append(fields)
        numbers.append(number)
    return rows, dropped, numbers, missing


def _encode(path: Path, rows: list[list[str]], *, test_file: bool) -> dict[str, np.ndarray]:
    """The rows of one file as arrays; a value outside ``adult.names``' lists is refused with its line."""
    def index(column: str, values: tuple[str, ...]) -> np.ndarray:
        lookup = {v: i for i, v in enumerate(values)}
        j = COLUMNS.index(column)
        out = np.empty(len(rows), np.int32)
        for i, r in enumerate(rows):
            value = r[j]
            if column == "income" and test_file:
                value = value[:-1] if value.endswith(".") else value
            if value not in lookup:
                raise ValueError(f"{path}: {column}={r[j]!r} (complete row {i + 1}) is not one of adult.names' "
                                 f"values ({', '.join(values)}); the file is damaged or not UCI Adult's.")
            out[i] = lookup[value]
        return out

    try:
        numerical = np.array([[float(r[COLUMNS.index(c)]) for c in NUMERICAL] for r in rows], np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: a numerical column ({', '.join(NUMERICAL)}) holds a non-number ({e}); the file "
                         "is damaged or not UCI Adult's.") from None
    return {"numerical": numerical.reshape(len(rows), len(NUMERICAL)),
            "codes": np.stack([index(c, v) for c, v in CATEGORIES.items()], 1).reshape(len(rows), len(CATEGORIES)),
            "female": (index("sex", SEXES) == 0).astype(np.int32),
            "nonwhite": (index("race", RACES) != 0).astype(np.int32),
            "label": index("income", INCOMES)}


_TABLES: dict[tuple[str, ...], AdultTable] = {}
_TABLES_LOCK = threading.Lock()


def read_table(folder: str | os.PathLike[str], *, verify: bool = True) -> AdultTable:
    """The complete rows of ``folder``'s ``adult.data`` and ``adult.test``.

    With ``verify`` (the real data) each file's SHA-256 must be UCI's (:data:`SHA256`), else
    :class:`jaxdp.data.DataUnavailable` says which file is wrong and where to get it. Parsed tables are kept in
    memory by the files' digests: a sweep reads each file once per process.
    """
    folder = Path(folder).expanduser().absolute()
    if verify:
        check_files(folder)
    contents = {name: (folder / name).read_bytes() for name in FILE_NAMES}
    key = tuple(hashlib.sha256(contents[name]).hexdigest() for name in FILE_NAMES)
    with _TABLES_LOCK:
        if key in _TABLES:
            return _TABLES[key]
    parts, dropped, missing_lines = [], 0, []
    for name in FILE_NAMES:
        try:
            text = contents[name].decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{folder / name} is not a text file; the file is damaged or not UCI Adult's "
                             f"({UCI_PAGE}).") from None
        rows, n_missing, numbers, missing = _parse(folder / name, text, test_file=name == TEST_NAME)
        dropped += n_missing
        missing_lines.append(tuple(missing))
        arrays = _encode(folder / name, rows, test_file=name == TEST_NAME)
        arrays["partition"] = np.full(len(rows), PARTITIONS[name], np.int32)
        arrays["line"] = np.asarray(numbers, np.int32)
        parts.append(arrays)
    table = AdultTable(**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, dropped=dropped,
                       missing_lines=tuple(missing_lines), sha256=dict(zip(FILE_NAMES, key, strict=True)))
    with _TABLES_LOCK:
        _TABLES[key] = table
    return table


def check_files(folder: str | os.PathLike[str]) -> None:
    """Raises :class:`jaxdp.data.DataUnavailable` unless ``folder`` holds UCI's two files (by SHA-256)."""
    folder = Path(folder).expanduser().absolute()
    missing = [n for n in FILE_NAMES if not (folder / n).is_file()]
    if missing:
        raise DataUnavailable(
            f"Missing UCI Adult file(s) {', '.join(missing)} in {folder}. Put adult.data and adult.test of the UCI "
            f"release in that folder (config.data.manual_dir; default <data_dir>/downloads/manual), or point "
            f"--config.data.manual_dir at the folder that holds them. Get them from {UCI_PAGE} (the zip's adult.data "
            f"and adult.test). {_SYNTHETIC_HINT}")
    for name in FILE_NAMES:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if digest != SHA256[name]:
            raise DataUnavailable(
                f"{folder / name} is not UCI's {name}: its SHA-256 is {digest}, UCI's is {SHA256[name]} (a truncated "
                f"or edited copy, or another file). Download it again from {UCI_PAGE}. {_SYNTHETIC_HINT}")


_SYNTHETIC_HINT = ("Or run the same study on generated Adult-format rows, no download needed: "
                   "--config.data.source=adult_synthetic --config.data.synthetic_num_images=48842 (as many rows as "
                   "UCI's files).")


# ----------------------------------------------------------------------------------------------------------
# Counting and drawing the subsets.

@dataclass(frozen=True)
class AdultPlan:
    """Rows of each group (index 0, 1) in the training and the test set."""

    train: tuple[int, int]
    test: tuple[int, int]


def _exact(x: float) -> Fraction:
    return Fraction(repr(float(x)))  # the decimal the user wrote, not the binary float next to it


def plan_counts(*, female_fraction: float, total: int, test_fraction: float,
                test_pool: tuple[int, int]) -> AdultPlan:
    """The group counts of the training and test sets (rules in the module docstring); ``test_pool`` is the
    number of rows of each group in the pool the test set is drawn from (its composition is theirs).

    >>> plan_counts(female_fraction=0.1, total=30000, test_fraction=0.2, test_pool=(14695, 30527))
    AdultPlan(train=(2400, 21600), test=(1950, 4050))
    """
    check_settings(female_fraction=female_fraction, total=total, test_fraction=test_fraction)
    n_test = round_half_up(int(total) * _exact(test_fraction))
    n_train = int(total) - n_test
    train0 = round_half_up(n_train * _exact(female_fraction))
    test0 = round_half_up(Fraction(n_test * test_pool[0], max(1, sum(test_pool))))
    plan = AdultPlan(train=(train0, n_train - train0), test=(test0, n_test - test0))
    if min(plan.train) < 1 or min(plan.test) < 1:
        raise ValueError(
            f"total={total}, test_fraction={test_fraction}, female_fraction={female_fraction} gives training groups "
            f"of {plan.train[0]} and {plan.train[1]} rows and test groups of {plan.test[0]} and {plan.test[1]}: "
            "every group needs a row in each set; use a larger total.")
    return plan


def check_settings(*, female_fraction: Any, total: Any, test_fraction: Any, seed: Any = 0,
                   split_scheme: Any = "paper", group_attribute: Any = DEFAULT_GROUP_ATTRIBUTE,
                   label_attribute: Any = LABEL_ATTRIBUTE) -> None:
    """Refuses a setting the Adult sources cannot serve, naming it and what is allowed."""
    if isinstance(female_fraction, bool) or not isinstance(female_fraction, float | int) \
            or not 0 < female_fraction < 1:
        raise ValueError(f"config.data.female_fraction={female_fraction!r} must be strictly between 0 and 1: the "
                         "fraction of group 0 in the training set (women for group_attribute 'sex'; natural: 0.325).")
    if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 4:
        raise ValueError(f"config.data.total={total!r}: the number of training + test rows, an integer >= 4 "
                         "(e.g. 30000: 24,000 train, 6,000 test at test_fraction 0.2).")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, float | int) or not 0 < test_fraction < 1:
        raise ValueError(f"config.data.test_fraction={test_fraction!r} must be strictly between 0 and 1.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"config.data.seed={seed!r}: use a non-negative integer.")
    if split_scheme not in SPLIT_SCHEMES:
        raise ValueError(f"config.data.split_scheme={split_scheme!r}: for Adult use 'paper' (both files pooled, "
                         "as fair-dp) or 'official' (test rows from adult.test, training rows from adult.data).")
    if group_attribute not in GROUP_ATTRIBUTES:
        raise ValueError(f"config.data.group_attribute={group_attribute!r} is not an Adult grouping; use 'sex' "
                         "(group 0 = female) or 'race' (group 0 = non-white).")
    if label_attribute != LABEL_ATTRIBUTE:
        raise ValueError(f"config.data.label_attribute={label_attribute!r}: Adult's label is "
                         f"{LABEL_ATTRIBUTE!r} (1 = income > 50K); set config.data.label_attribute='income'.")


def _pool_counts(group: np.ndarray, pool: np.ndarray) -> tuple[int, int]:
    return int(np.sum(pool & (group == 0))), int(np.sum(pool & (group == 1)))


def _pools(table: AdultTable, split_scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows the test set may take, rows the training set may take) as boolean masks."""
    everything = np.ones(len(table), bool)
    if split_scheme == "paper":
        return everything, everything
    return table.partition == PARTITIONS[TEST_NAME], table.partition == PARTITIONS[DATA_NAME]


def _largest_total(train_pool: tuple[int, int], test_pool: tuple[int, int], shared: bool, female_fraction: float,
                   test_fraction: float, upto: int) -> int:
    """The largest total <= upto whose training groups fit (0 if none): group ``g`` needs ``plan.train[g]`` of the
    ``train_pool[g]`` rows, less the test set's ``plan.test[g]`` when the two pools are ``shared`` ("paper")."""
    def ok(total: int) -> bool:
        try:
            plan = plan_counts(female_fraction=female_fraction, total=total, test_fraction=test_fraction,
                               test_pool=test_pool)
        except ValueError:
            return False
        return all(plan.train[g] + (plan.test[g] if shared else 0) <= train_pool[g] for g in (0, 1))

    # Not monotone in general (rounding), but the training counts grow with the total: bisect, then step down.
    low, high = 4, upto
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    while low >= 4 and not ok(low):
        low -= 1
    return max(low, 0) if low >= 4 else 0


@dataclass(frozen=True)
class _Selection:
    train: np.ndarray
    test: np.ndarray
    leftover: tuple[np.ndarray, np.ndarray]  # per group: the training pool's rows not taken, in their seeded order


def _select(table: AdultTable, *, female_fraction: float, total: int, test_fraction: float, seed: int,
            split_scheme: str, group_attribute: str) -> _Selection:
    group = table.group(group_attribute)
    test_pool, train_pool = _pools(table, split_scheme)
    plan = plan_counts(female_fraction=female_fraction, total=total, test_fraction=test_fraction,
                       test_pool=_pool_counts(group, test_pool))
    test_rng = np.random.default_rng([seed, 3])  # its own stream: the same test rows at every fraction
    test = np.concatenate([test_rng.permutation(np.flatnonzero(test_pool & (group == g)))[:plan.test[g]]
                           for g in (0, 1)])
    taken = np.zeros(len(table), bool)
    taken[test] = True
    train, leftover = [], []
    for g in (0, 1):
        # One stream per group: a group's training rows are a prefix of one order, whatever the other group needs.
        rows = np.random.default_rng([seed, 1, g]).permutation(np.flatnonzero(train_pool & ~taken & (group == g)))
        if plan.train[g] > len(rows):
            largest = _largest_total(_pool_counts(group, train_pool), _pool_counts(group, test_pool),
                                     split_scheme == "paper", female_fraction, test_fraction, total)
            raise ValueError(
                f"female_fraction={female_fraction}, total={total}, test_fraction={test_fraction} "
                f"(split_scheme={split_scheme!r}) needs {plan.train[g]} training rows of group {g} "
                f"({group_names_of(group_attribute)[g]}), but only {len(rows)} are left after the test set; "
                + (f"the largest total that fits this fraction is {largest}." if largest
                   else "no total fits this fraction."))
        train.append(rows[:plan.train[g]])
        leftover.append(rows[plan.train[g]:])
    return _Selection(np.concatenate(train), test, (leftover[0], leftover[1]))


def build_splits(table: AdultTable, *, female_fraction: float, total: int = 30_000, test_fraction: float = 0.2,
                 seed: int = 0, split_scheme: str = "paper", group_attribute: str = DEFAULT_GROUP_ATTRIBUTE,
                 holdout_per_group: int = 0) -> Splits:
    """``(train, test, holdout)`` of float32 feature vectors (rules in the module docstring); holdout is None
    when ``holdout_per_group`` is 0. Too large a holdout is refused with the largest that fits."""
    check_settings(female_fraction=female_fraction, total=total, test_fraction=test_fraction, seed=seed,
                   split_scheme=split_scheme, group_attribute=group_attribute)
    chosen = _select(table, female_fraction=female_fraction, total=total, test_fraction=test_fraction, seed=seed,
                     split_scheme=split_scheme, group_attribute=group_attribute)
    held = None
    if holdout_per_group:
        capacity = {g: len(chosen.leftover[g]) for g in (0, 1)}
        check_holdout_request(int(holdout_per_group), capacity, group_names_of(group_attribute))
        held_rng = np.random.default_rng([seed, 4])
        held = np.concatenate([held_rng.permutation(chosen.leftover[g])[:holdout_per_group] for g in (0, 1)])
    return _materialise(table, chosen.train, chosen.test, held, seed=seed, group_attribute=group_attribute)


def build_listed_splits(table: AdultTable, rows: dict[str, np.ndarray], *, seed: int = 0,
                        group_attribute: str = DEFAULT_GROUP_ATTRIBUTE) -> Splits:
    """``(train, test, None)`` of exactly the table rows ``rows["train"]`` and ``rows["test"]`` (a split file's,
    :func:`jaxdp.data.adult_split.resolve_rows`): standardised, encoded and shuffled by ``seed`` as
    :func:`build_splits` does its own rows."""
    check_settings(female_fraction=0.5, total=30_000, test_fraction=0.2, seed=seed, group_attribute=group_attribute)
    return _materialise(table, np.asarray(rows["train"]), np.asarray(rows["test"]), None, seed=seed,
                        group_attribute=group_attribute)


def _materialise(table: AdultTable, train_rows: np.ndarray, test_rows: np.ndarray, held_rows: np.ndarray | None, *,
                 seed: int, group_attribute: str) -> Splits:
    # The test set's statistics: no training row's value enters the model except through DP (module docstring).
    test_values = table.numerical[test_rows]
    mean = test_values.mean(axis=0)
    std = test_values.std(axis=0, ddof=1) if len(test_rows) > 1 else np.ones(len(NUMERICAL))
    std = np.where(std > 0, std, 1.0)  # a constant column stays 0 after centring
    group = table.group(group_attribute)
    order = np.random.default_rng([seed, 2])

    def split(rows: np.ndarray) -> GroupedSplit:
        rows = rows[order.permutation(len(rows))]
        return GroupedSplit(inputs=table.features(rows, mean, std), label=table.label[rows].astype(np.int32),
                            group=group[rows], label_attribute=SPLIT_LABEL, group_attribute=group_attribute)

    train, test = split(train_rows), split(test_rows)
    return Splits(train, test, None if held_rows is None else split(held_rows))


# ----------------------------------------------------------------------------------------------------------
# The two registered sources.

class AdultSource(DataSource):
    """``config.data.source = "adult"``: UCI's ``adult.data`` and ``adult.test`` in ``config.data.manual_dir``
    (default ``<data_dir>/downloads/manual``; data_dir: ``config.data.data_dir``, else ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets``), checked by SHA-256."""

    verify = True

    def settings(self, data_config: Any) -> dict[str, Any]:
        """:func:`build_splits`' keyword arguments of ``config.data`` (validated)."""
        def get(key: str, default: Any = None) -> Any:
            return config_value(data_config, key, default)

        if get("split_file"):  # the rows come from the file: female_fraction, total, test_fraction, split_scheme unused
            settings = dict(seed=get("seed", 0), group_attribute=get("group_attribute", DEFAULT_GROUP_ATTRIBUTE))
            check_settings(female_fraction=0.5, total=30_000, test_fraction=0.2, **settings,
                           label_attribute=get("label_attribute", LABEL_ATTRIBUTE))
            return {"split_file": str(get("split_file")), **settings}
        settings = dict(female_fraction=get("female_fraction"), total=get("total", 30_000),
                        test_fraction=get("test_fraction", 0.2), seed=get("seed", 0),
                        split_scheme=get("split_scheme", "paper"),
                        group_attribute=get("group_attribute", DEFAULT_GROUP_ATTRIBUTE))
        check_settings(**settings, label_attribute=get("label_attribute", LABEL_ATTRIBUTE))
        return settings

    def folder(self, data_config: Any) -> Path:
        """Where the two files are."""
        manual_dir = config_value(data_config, "manual_dir")
        if manual_dir:
            return Path(manual_dir).expanduser().absolute()
        data_dir = config_value(data_config, "data_dir")
        return Path(data_dir or default_data_dir()).expanduser().absolute() / "downloads" / "manual"

    def table(self, data_config: Any) -> AdultTable:
        return read_table(self.folder(data_config), verify=self.verify)

    def listed_rows(self, data_config: Any) -> dict[str, np.ndarray]:
        """The table rows of ``config.data.split_file`` (checked against the files: :mod:`jaxdp.data.adult_split`)."""
        from jaxdp.data import adult_split

        split = adult_split.read_split_file(config_value(data_config, "split_file"))
        return adult_split.resolve_rows(split, self.table(data_config))  # (generates synthetic files where absent)

    def check_available(self, data_config: Any) -> None:
        settings = self.settings(data_config)
        check_files(self.folder(data_config))
        if "split_file" in settings:
            self.listed_rows(data_config)  # refuses a damaged or incompatible file, or an unknown row, before any run
            return
        _select(self.table(data_config), **settings)  # refuses a total the pool cannot fill, before any run

    def load_splits(self, data_config: Any, holdout_per_group: int) -> Splits:
        settings = self.settings(data_config)
        if "split_file" in settings:
            if holdout_per_group:
                self.holdout_capacity(data_config)  # refuses
            return build_listed_splits(self.table(data_config), self.listed_rows(data_config), seed=settings["seed"],
                                       group_attribute=settings["group_attribute"])
        return build_splits(self.table(data_config), **settings, holdout_per_group=holdout_per_group)

    def train_size(self, data_config: Any) -> int:
        """Exact from the settings (the counting rule of the module docstring): ``total - round_half_up(total p)``;
        with ``split_file``, the number of training rows it lists."""
        settings = self.settings(data_config)
        if "split_file" in settings:
            from jaxdp.data import adult_split

            return adult_split.read_split_file(settings["split_file"]).size("train")
        return int(settings["total"]) - round_half_up(int(settings["total"]) * _exact(settings["test_fraction"]))

    def holdout_capacity(self, data_config: Any) -> dict[int, int]:
        settings = self.settings(data_config)
        if "split_file" in settings:
            raise ValueError(f"config.data.split_file={settings['split_file']!r} lists the training and test rows "
                             "only: held-out rows (config.audit, holdout_per_group > 0) are not supported with a "
                             "split file; unset one of the two.")
        chosen = _select(self.table(data_config), **settings)
        return {g: len(chosen.leftover[g]) for g in (0, 1)}

    def group_names(self, data_config: Any) -> tuple[str, str]:
        return group_names_of(config_value(data_config, "group_attribute", DEFAULT_GROUP_ATTRIBUTE))

    def input_shape(self, data_config: Any) -> tuple[int, ...]:
        return (len(FEATURE_NAMES),)


class GeneratedAdultSource(AdultSource):
    """``config.data.source = "adult_synthetic"``: ``config.data.synthetic_num_images`` rows in UCI's format
    (:mod:`jaxdp.data.adult_synthetic`, seeded by ``config.data.synthetic_seed``), written on first use into
    ``config.data.manual_dir`` if set, else ``config.data.data_dir``, else ``data/adult-synthetic-<rows>-<seed>``
    under the current directory, and read by the same parser as the real files, without UCI's checksums (they are
    not UCI's files; the generator's manifest guards against stale or edited files instead). Always available."""

    verify = False

    def folder(self, data_config: Any) -> Path:
        num_rows, seed = self.generator_arguments(data_config)
        where = config_value(data_config, "manual_dir") or config_value(data_config, "data_dir") \
            or f"data/adult-synthetic-{num_rows}-{seed}"
        return Path(where).expanduser().absolute()

    @staticmethod
    def generator_arguments(data_config: Any) -> tuple[int, int]:
        """(rows, seed) of the generator, validated."""
        from jaxdp.data import adult_synthetic

        num_rows = config_value(data_config, "synthetic_num_images", 4000)
        adult_synthetic.check_num_rows(num_rows)
        return int(num_rows), int(config_value(data_config, "synthetic_seed", 0))

    def table(self, data_config: Any) -> AdultTable:
        from jaxdp.data import adult_synthetic

        num_rows, seed = self.generator_arguments(data_config)
        folder = adult_synthetic.ensure_generated(self.folder(data_config), num_rows, seed=seed)
        return read_table(folder, verify=False)

    def check_available(self, data_config: Any) -> None:
        self.generator_arguments(data_config)  # the rows are generated on first use
        if "split_file" in self.settings(data_config):
            self.listed_rows(data_config)


register_source("adult", AdultSource())
register_source("adult_synthetic", GeneratedAdultSource())
