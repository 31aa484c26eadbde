"""CelebA through tensorflow-datasets with exact gender imbalance, and a CelebA-format generator.

``load(config.data)`` returns ``(train, test)`` :class:`GroupedSplit` s for real (``source="celeba"``) or
generated (``source="synthetic"``) data; see :mod:`jaxdp.data.celeba` for the counting, split and cache
rules and :mod:`jaxdp.data.synthetic` for the generator.
"""

from jaxdp.data import celeba, synthetic
from jaxdp.data.celeba import GroupedSplit, build_imbalanced, cell_counts, load, plan_counts

__all__ = ["GroupedSplit", "build_imbalanced", "cell_counts", "celeba", "load", "plan_counts", "synthetic"]
