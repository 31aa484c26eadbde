"""Data for DP training: sources in a registry; CelebA and UCI Adult with exact group imbalance, and generators of
both formats.

``load(config.data)`` returns ``(train, test)`` :class:`GroupedSplit` s from the source registered under
``config.data.source``: ``"celeba"`` (the real files) or ``"synthetic"`` (generated on first use), ``"adult"``
(UCI Adult's two files) or ``"adult_synthetic"`` (generated on first use), or one a module adds with
:func:`register_source` (see :class:`DataSource`). ``input_shape(config.data)`` gives one example's shape without
loading anything. Before any run, ``check_available(config.data)`` raises :class:`DataUnavailable` with what to do;
for the privacy audit, ``load_splits(config.data, holdout_per_group=n)`` adds held-out examples of each group and
``holdout_capacity(config.data)`` says how many exist. ``group_names(config.data)`` names the groups after
``config.data.group_attribute``. See :mod:`jaxdp.data.celeba` and :mod:`jaxdp.data.adult` for the counting, split
and cache rules, :mod:`jaxdp.data.subsets` for CelebA's arithmetic, :mod:`jaxdp.data.synthetic` and
:mod:`jaxdp.data.adult_synthetic` for the generators.
"""

from jaxdp.data import adult, celeba, subsets, synthetic
from jaxdp.data.celeba import build_imbalanced, build_splits, cell_counts, plan_counts
from jaxdp.data.core import (
    DataSource,
    DataUnavailable,
    GroupedSplit,
    Splits,
    available_sources,
    check_available,
    get_source,
    group_names,
    holdout_capacity,
    input_shape,
    load,
    load_splits,
    register_source,
)

__all__ = [
    "DataSource", "DataUnavailable", "GroupedSplit", "Splits", "adult", "available_sources", "build_imbalanced",
    "build_splits", "celeba", "cell_counts", "check_available", "get_source", "group_names", "holdout_capacity",
    "input_shape", "load", "load_splits", "plan_counts", "register_source", "subsets", "synthetic",
]
