"""The counting rules of an imbalanced subset: cell sizes, train/test plans, pool checks, held-out capacity.

Pure arithmetic on counts (no files, no images), shared by loading (:mod:`jaxdp.data.celeba`) and by the checks
that run before any training (:func:`jaxdp.data.holdout_capacity`). A *cell* is ``(group, label)``; group 1 has
the group attribute (by default Male), label 1 the label attribute (by default Smiling). The rules are stated
in :mod:`jaxdp.data.celeba`'s docstring; ``female_fraction`` is the fraction of group 0 (women for Male).

Pool sizes are given as ``{partition: {cell: number of examples}}`` with CelebA's partitions ``"train"``,
``"validation"`` and ``"test"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from jaxdp.data.core import CELLS, DEFAULT_GROUP_ATTRIBUTE, DEFAULT_LABEL_ATTRIBUTE, Cell, group_names_of

SPLIT_SCHEMES = ("paper", "official")
PARTITIONS = {"train": 0, "validation": 1, "test": 2}
CELL_NAMES = {(0, 0): "non-smiling females", (0, 1): "smiling females", (1, 0): "non-smiling males",
              (1, 1): "smiling males"}
Sizes = dict[str, dict[Cell, int]]


def cell_name(cell: Cell, label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
              group_attribute: str = DEFAULT_GROUP_ATTRIBUTE) -> str:
    """A cell in words: ``"smiling males"`` for the default attributes, else e.g. ``"female examples with
    Blond_Hair"``."""
    if (label_attribute, group_attribute) == (DEFAULT_LABEL_ATTRIBUTE, DEFAULT_GROUP_ATTRIBUTE):
        return CELL_NAMES[cell]
    group = group_names_of(group_attribute)[cell[0]]
    return f"{group} examples {'with' if cell[1] else 'without'} {label_attribute}"


@dataclass(frozen=True)
class SubsetPlan:
    """How many examples of each (group, label) cell go into the train and test sets."""

    train: dict[Cell, int]
    test: dict[Cell, int]


def round_half_up(x: Fraction) -> int:
    """Rounds a non-negative exact fraction to the nearest integer, halves up (2.5 -> 3)."""
    return int((x + Fraction(1, 2)) // 1)


def _exact(x: float) -> Fraction:
    # The decimal the user wrote (0.999 -> 999/1000), not the binary float just below it.
    return Fraction(repr(float(x)))


def cell_counts(total: int, female_fraction: float) -> dict[Cell, int]:
    """The four cell sizes of a subset of ``total``: see :mod:`jaxdp.data.celeba` for the rule.

    >>> cell_counts(30000, 0.999)
    {(0, 0): 14985, (0, 1): 14985, (1, 0): 15, (1, 1): 15}
    """
    total = int(total)
    females = round_half_up(total * _exact(female_fraction))
    males = total - females
    return {(0, 0): females - females // 2, (0, 1): females // 2,
            (1, 0): males - males // 2, (1, 1): males // 2}


def plan_counts(*, female_fraction: float, total: int, split_scheme: str = "paper", test_fraction: float = 0.2,
                label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
                group_attribute: str = DEFAULT_GROUP_ATTRIBUTE) -> SubsetPlan:
    """The train and test cell sizes of a subset (no data needed; the rules are in :mod:`jaxdp.data.celeba`).

    Raises ValueError for a setting out of range or a total too small to give every cell an example. The
    attributes only name the cells in messages.
    """
    check_settings(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                   test_fraction=test_fraction)
    plan = _plan(total, female_fraction, split_scheme, test_fraction)
    if min(plan.train.values()) < 1:
        smallest = smallest_total(female_fraction, split_scheme, test_fraction)
        empty = [cell_name(c, label_attribute, group_attribute) for c in CELLS if plan.train[c] < 1]
        cells = cell_counts(total, female_fraction)
        group0 = group_names_of(group_attribute)[0]
        rule = ("females = round_half_up(total * female_fraction), each gender half smiling"
                if group_attribute == DEFAULT_GROUP_ATTRIBUTE and label_attribute == DEFAULT_LABEL_ATTRIBUTE
                else f"{group0} = round_half_up(total * female_fraction), each group half with {label_attribute}")
        raise ValueError(
            f"female_fraction={female_fraction} with total={total} leaves no training examples of "
            f"{' or '.join(empty)} (cells {cells} by {rule}, then test_fraction={test_fraction} per cell to "
            f"test); every (group, label) cell needs at least one training example: use total >= {smallest}, "
            f"or a smaller female_fraction.")
    return plan


def _plan(total: int, female_fraction: float, split_scheme: str, test_fraction: float) -> SubsetPlan:
    cells = cell_counts(total, female_fraction)
    p = _exact(test_fraction)
    test = {c: round_half_up(n * p) for c, n in cells.items()}
    train = {c: cells[c] - test[c] for c in CELLS}
    if split_scheme == "official":
        test = cell_counts(sum(test.values()), 0.5)
    return SubsetPlan(train=train, test=test)


def smallest_total(female_fraction: float, split_scheme: str, test_fraction: float) -> int:
    """The smallest total whose plan gives every cell a training example."""
    # Every cell size is non-decreasing in the total, so feasibility is monotone: bisect.
    def ok(t: int) -> bool:
        return min(_plan(t, female_fraction, split_scheme, test_fraction).train.values()) >= 1

    low, high = 1, 4
    while not ok(high):
        low, high = high, high * 2
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if ok(mid) else (mid + 1, high)
    return low


def check_settings(*, female_fraction: object, total: object, split_scheme: object, test_fraction: object,
                   seed: object = 0, image_size: object = 128) -> None:
    """Refuses a setting out of range, naming it and the allowed range."""
    if not isinstance(female_fraction, float | int) or not 0 < female_fraction < 1:
        raise ValueError(
            f"female_fraction={female_fraction!r} is out of range: it is the fraction of group 0 (female images "
            "for group attribute Male), strictly between 0 and 1 (the paper's levels are 0.7, 0.8, 0.9, 0.99, "
            "0.999).")
    if not isinstance(total, int | np.integer) or isinstance(total, bool) or total < 4:
        raise ValueError(f"total={total!r}: the subset size must be an integer of at least 4 (paper: 30000).")
    if split_scheme not in SPLIT_SCHEMES:
        raise ValueError(f"split_scheme={split_scheme!r}: use one of {SPLIT_SCHEMES}.")
    if not isinstance(test_fraction, float | int) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r}: use a fraction strictly between 0 and 1 (paper: 0.2).")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r}: use a non-negative integer.")
    if not isinstance(image_size, int | np.integer) or not 8 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size!r}: use an integer side length from 8 to 1024 (paper: 128).")


def pooled(sizes: Sizes, partitions: tuple[str, ...]) -> dict[Cell, int]:
    """Cell sizes summed over ``partitions``."""
    return {c: sum(sizes[p][c] for p in partitions) for c in CELLS}


def _needs(plan: SubsetPlan, split_scheme: str) -> list[tuple[Cell, tuple[str, ...], str, int]]:
    """(cell, partitions, their name, examples needed from them), in the order they are checked."""
    if split_scheme == "paper":
        return [(c, tuple(PARTITIONS), "all partitions", plan.train[c] + plan.test[c]) for c in CELLS]
    return ([(c, ("train",), "the train partition", plan.train[c]) for c in CELLS]
            + [(c, ("test",), "the test partition", plan.test[c]) for c in CELLS])


def fits(sizes: Sizes, plan: SubsetPlan, split_scheme: str) -> bool:
    """Whether every cell of ``plan`` fits its pool."""
    return all(n <= pooled(sizes, parts)[c] for c, parts, _, n in _needs(plan, split_scheme))


def check_fits(sizes: Sizes, plan: SubsetPlan, *, female_fraction: float, total: int, split_scheme: str,
               test_fraction: float, what: str, more_hint: str = "", label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
               group_attribute: str = DEFAULT_GROUP_ATTRIBUTE) -> None:
    """Raises ValueError naming the first cell that asks more than its pool has, its pool size and the largest
    total that fits (``what`` names the data, e.g. "CelebA"; ``more_hint`` says how to get more of it)."""
    for c, parts, where, n in _needs(plan, split_scheme):
        have = pooled(sizes, parts)[c]
        if n > have:
            largest = largest_total(sizes, female_fraction, split_scheme, test_fraction, total)
            advice = (f"the largest total this pool supports at female_fraction={female_fraction} is {largest}"
                      if largest else "no total works with this pool at this female_fraction")
            raise ValueError(
                f"female_fraction={female_fraction}, total={total}, split_scheme={split_scheme!r} needs {n} "
                f"{cell_name(c, label_attribute, group_attribute)} from {where} of the {what}, which has only "
                f"{have}; {advice}" + (f" ({more_hint})." if more_hint else "."))


def largest_total(sizes: Sizes, female_fraction: float, split_scheme: str, test_fraction: float, upto: int) -> int:
    """The largest total <= upto whose cells all fit their pools (0 if none); cell sizes grow with the total."""
    def ok(t: int) -> bool:
        plan = _plan(t, female_fraction, split_scheme, test_fraction)
        return min(plan.train.values()) >= 1 and fits(sizes, plan, split_scheme)

    low, high = smallest_total(female_fraction, split_scheme, test_fraction), upto
    if low > high or not ok(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def holdout_partitions(split_scheme: str) -> tuple[str, ...]:
    """Where held-out examples come from: the pool the training examples are drawn from (all partitions under
    "paper", the train partition under "official"), so that members and non-members are exchangeable."""
    return tuple(PARTITIONS) if split_scheme == "paper" else ("train",)


def holdout_cells(holdout_per_group: int) -> dict[Cell, int]:
    """Held-out examples per cell: each group label-balanced as the training cells (an odd one out has label 0).

    >>> holdout_cells(5)
    {(0, 0): 3, (0, 1): 2, (1, 0): 3, (1, 1): 2}
    """
    n = int(holdout_per_group)
    return {(g, label): (n - n // 2 if label == 0 else n // 2) for g, label in CELLS}


def holdout_capacity(sizes: Sizes, plan: SubsetPlan, split_scheme: str) -> dict[int, int]:
    """``{group: the largest holdout_per_group that group's pool allows}`` once train and test are taken.

    With ``r0``, ``r1`` examples of a group left without / with the label, ``n`` fits when
    ``n - n // 2 <= r0`` and ``n // 2 <= r1``: the largest is ``min(2 r0, 2 r1 + 1)``.
    """
    pool = pooled(sizes, holdout_partitions(split_scheme))
    used = {c: plan.train[c] + (plan.test[c] if split_scheme == "paper" else 0) for c in CELLS}
    rest = {c: max(0, pool[c] - used[c]) for c in CELLS}
    return {g: min(2 * rest[g, 0], 2 * rest[g, 1] + 1) for g in (0, 1)}
