"""The paper's settings and published numbers (Farrand et al. 2020, "Neither Private Nor Fair", Sec. 4).

:data:`PRIVACY_LEVELS` is the one table of the paper's privacy levels: the noise multiplier z of each
(``None``: non-private). The sweep's ``privacy`` axis (:mod:`jaxdp_study.grid`), the run names and the configs
``configs/high.py``, ``medium.py``, ``low.py``, ``nondp.py`` (:func:`level_config`) all read it. The rest of
the paper's training setting (ResNet18 with GroupNorm, 128x128, batch 32, Adam 5e-5, 60 epochs, clip S = 5,
delta 1e-6, a 30,000-image CelebA subset) is the default of :func:`jaxdp.config.base_config`.

Batches are Poisson-sampled, which is what the accountants assume; the paper used shuffled fixed-size batches.
``--config.dp.sampling=fixed --config.dp.accountant=rdp`` reproduces that batching and accounts for it as
sampling without replacement (see ``jaxdp.accounting``).
"""

from __future__ import annotations

import csv
import importlib.resources
import math
from typing import Any

import ml_collections

from jaxdp.config import base_config

PRIVACY_LEVELS: dict[str, float | None] = {"high": 1.5, "medium": 0.7, "low": 0.5, "nondp": None}
# The epsilons the paper reports for those levels (delta 1e-6): what a study on other data calibrates its noise to
# (config.dp.target_epsilon), when the paper's z at its q and steps would mean another epsilon there.
PAPER_EPSILONS: dict[str, float] = {"high": 1.15, "medium": 4.98, "low": 16.2}
PRIVACY_ORDER = tuple(PRIVACY_LEVELS)  # how tables, figures and run lists order the levels
FEMALE_FRACTIONS = (0.7, 0.8, 0.9, 0.99, 0.999)  # the imbalance study (Figure 1, Table 1 at 0.9)
L2_CLIP_NORM = 5.0  # the clip bound S of the imbalance study
L2_CLIP_NORMS = (1.0, 5.0, 10.0)  # the clipping study (Figure 2), at 70% female


def privacy_settings(level: str) -> dict[str, Any]:
    """The dotted config values that privacy level ``level`` sets.

    >>> privacy_settings("high")
    {'dp.enabled': True, 'dp.privacy_level': 'high', 'dp.noise_multiplier': 1.5}
    >>> privacy_settings("nondp")
    {'dp.enabled': False, 'dp.privacy_level': 'nondp'}
    """
    if level not in PRIVACY_LEVELS:
        raise ValueError(f"unknown privacy level {level!r}; choose one of {list(PRIVACY_LEVELS)}")
    z = PRIVACY_LEVELS[level]
    if z is None:
        return {"dp.enabled": False, "dp.privacy_level": level}
    return {"dp.enabled": True, "dp.privacy_level": level, "dp.noise_multiplier": z}


def level_config(level: str) -> ml_collections.ConfigDict:
    """One privacy level of the paper at each of its five female fractions: ``configs/<level>.py``.

    The run configs are :func:`jaxdp.config.base_config` with the level's settings
    (:func:`privacy_settings`) and ``data.female_fraction`` swept over :data:`FEMALE_FRACTIONS`; the sweep is
    named after the level (results in ``results/<level>/``).
    """
    c = base_config()
    c.name = level
    for path, value in privacy_settings(level).items():
        section, key = path.split(".")
        c[section][key] = value
    c.sweep.imbalance = ml_collections.ConfigDict({"data": {"female_fraction": FEMALE_FRACTIONS}})
    return c


def _number(text: str) -> float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


def paper_results() -> list[dict[str, Any]]:
    """The paper's published numbers (``jaxdp_study/resources/paper_results.csv``): one dict per published run.

    Keys: ``privacy`` (a :data:`PRIVACY_LEVELS` name), ``clip``, ``female_pct``, ``epsilon_paper``, accuracies
    ``acc_overall`` / ``acc_female`` / ``acc_male`` (percent), ``delta_acc`` (female minus male, points) and the
    fairness gaps; numbers are floats (NaN where unparseable), missing values None.
    """
    text = importlib.resources.files("jaxdp_study").joinpath("resources/paper_results.csv").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return [{k: v if k == "privacy" else _number(v) for k, v in rec.items()} for rec in csv.DictReader(lines)]
