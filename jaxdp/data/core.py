"""What every data source shares: the split types, the source registry, and the entry points that dispatch on it.

``config.data.source`` names a registered :class:`DataSource`; ``"celeba"`` (the five files of CelebA's aligned
release) and ``"synthetic"`` (CelebA-format data generated on first use) are built in, registered by
:mod:`jaxdp.data.celeba`, and so are ``"adult"`` (UCI Adult's two files) and ``"adult_synthetic"`` (Adult-format
rows generated on first use), registered by :mod:`jaxdp.data.adult`. A new dataset is one module that subclasses
:class:`DataSource` and calls :func:`register_source` when imported; import it before loading, then set
``config.data.source`` to its name. This module imports neither TensorFlow nor any source, so the registered names
are available to config validation at no cost.

Every source returns examples as a :class:`GroupedSplit`: images or feature vectors, with a binary label and a
binary group. For the CelebA sources the label is ``config.data.label_attribute`` (default ``"Smiling"``) and the
group is ``config.data.group_attribute`` (default ``"Male"``): group 1 has the attribute, group 0 does not, and
``config.data.female_fraction`` is the fraction of group 0 (women when the group attribute is ``"Male"``). For the
Adult sources the label is income > 50K and the group ``"sex"`` (group 0: female) or ``"race"`` (group 0:
non-white).

Example::

    from jaxdp import data

    data.check_available(config.data)          # raises data.DataUnavailable, saying what to do
    train, test = data.load(config.data)
    train, test, holdout = data.load_splits(config.data, holdout_per_group=500)
    data.group_names(config.data)              # ("female", "male")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

Cell = tuple[int, int]  # (group, label)
CELLS: tuple[Cell, ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
DEFAULT_LABEL_ATTRIBUTE = "Smiling"
DEFAULT_GROUP_ATTRIBUTE = "Male"


# Group attributes whose groups have names of their own: CelebA's Male, Adult's sex and race (group 0 first: the
# group whose share data.female_fraction sets).
NAMED_GROUPS = {"Male": ("female", "male"), "sex": ("female", "male"), "race": ("non-white", "white")}


def group_names_of(group_attribute: str) -> tuple[str, str]:
    """Names of group 0 and group 1 for a binary group attribute: ``("female", "male")`` for ``"Male"`` (CelebA)
    and ``"sex"`` (Adult), ``("non-white", "white")`` for ``"race"`` (Adult), else ``("not <attribute>",
    "<attribute>")``, e.g. ``("not Young", "Young")``."""
    if group_attribute in NAMED_GROUPS:
        return NAMED_GROUPS[group_attribute]
    return f"not {group_attribute}", group_attribute


class GroupedSplit:
    """Examples with their binary label and group: images, feature vectors, any fixed shape.

    ``inputs`` is ``[N, ...]``: uint8 ``[N, H, W, C]`` images (normalised to mean 0.5 / std 0.5 by the trainer,
    randomly flipped if the config asks) or floating-point features ``[N, D]`` (used as they are); ``label`` and
    ``group`` are int32 ``[N]``, each 0 or 1. ``label_attribute`` and ``group_attribute`` name what the 1s mean
    (for CelebA: label 1 = the image has the label attribute, group 1 = it has the group attribute; by default
    Smiling and Male, so group 0 is female). ``images`` is accepted for ``inputs`` (and read back as it), for the
    image sources.
    """

    __slots__ = ("inputs", "label", "group", "label_attribute", "group_attribute")

    def __init__(self, inputs: np.ndarray | None = None, label: np.ndarray | None = None,
                 group: np.ndarray | None = None, label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
                 group_attribute: str = DEFAULT_GROUP_ATTRIBUTE, *, images: np.ndarray | None = None) -> None:
        if (inputs is None) == (images is None):
            raise ValueError("GroupedSplit takes the examples as inputs= (or images= for image data), exactly once.")
        inputs = inputs if images is None else images
        for name, value in (("inputs", inputs), ("label", label), ("group", group),
                            ("label_attribute", label_attribute), ("group_attribute", group_attribute)):
            object.__setattr__(self, name, value)
        n = len(inputs)
        if not isinstance(inputs, np.ndarray) or inputs.ndim < 2 or not (
                inputs.dtype == np.uint8 or np.issubdtype(inputs.dtype, np.floating)):
            raise ValueError(f"inputs must be a numpy array [N, ...] of uint8 images or floating-point features, got "
                             f"{getattr(inputs, 'dtype', type(inputs).__name__)} {getattr(inputs, 'shape', '')}")
        for name in ("label", "group"):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != np.int32 or value.shape != (n,):
                raise ValueError(f"{name} must be int32 [{n}], got {getattr(value, 'dtype', type(value).__name__)} "
                                 f"{getattr(value, 'shape', '')}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"GroupedSplit is immutable (tried to set {name})")

    def __repr__(self) -> str:
        return f"GroupedSplit({self.describe()})"

    @property
    def images(self) -> np.ndarray:
        """``inputs``, under the image sources' name."""
        return self.inputs

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> dict[Cell, int]:
        """``{(group, label): number of examples}`` for the four cells, e.g. ``{(1, 1): 15, ...}``."""
        return {cell: int(np.sum((self.group == cell[0]) & (self.label == cell[1]))) for cell in CELLS}

    def describe(self) -> str:
        """One line for logs, e.g. ``"300 images 32x32: females 135 smiling / 135 not, males 15 / 15"``."""
        c = self.counts()
        if self.inputs.ndim != 4:
            g0, g1 = group_names_of(self.group_attribute)
            return (f"{len(self)} examples of {self.inputs.shape[1:]} features, label {self.label_attribute}: {g0} "
                    f"{c[0, 1]} with / {c[0, 0]} without, {g1} {c[1, 1]} / {c[1, 0]}")
        h, w = self.images.shape[1:3]
        if (self.label_attribute, self.group_attribute) == (DEFAULT_LABEL_ATTRIBUTE, DEFAULT_GROUP_ATTRIBUTE):
            return (f"{len(self)} images {h}x{w}: females {c[0, 1]} smiling / {c[0, 0]} not, "
                    f"males {c[1, 1]} smiling / {c[1, 0]} not")
        g0, g1 = group_names_of(self.group_attribute)
        return (f"{len(self)} images {h}x{w}, label {self.label_attribute}: {g0} {c[0, 1]} with / {c[0, 0]} "
                f"without, {g1} {c[1, 1]} / {c[1, 0]}")


class Splits(NamedTuple):
    """``(train, test, holdout)``; ``holdout`` is None unless held-out examples were asked for."""

    train: GroupedSplit
    test: GroupedSplit
    holdout: GroupedSplit | None


class DataUnavailable(FileNotFoundError):
    """The data a config asks for is not on this machine; the message says which files are missing, where they
    go, and what to run instead."""


class DataSource:
    """A dataset that :func:`load` can serve. Subclass it, implement :meth:`load_splits` (and
    :meth:`holdout_capacity` for the privacy audit's held-out examples), and register an instance::

        class MyFaces(DataSource):
            def load_splits(self, data_config, holdout_per_group):
                ...
                return Splits(train, test, None)

        register_source("my_faces", MyFaces())    # at import time of the module that defines it

    Every method takes ``config.data`` (a ConfigDict or a mapping).
    """

    def check_available(self, data_config: Any) -> None:
        """Raises :class:`DataUnavailable` when the data is not on this machine; cheap (no decoding)."""

    def load_splits(self, data_config: Any, holdout_per_group: int) -> Splits:
        """``(train, test, holdout)``; holdout has ``holdout_per_group`` examples of each group (None when 0)."""
        raise NotImplementedError

    def holdout_capacity(self, data_config: Any) -> dict[int, int]:
        """``{0: n0, 1: n1}``: how many held-out examples of each group this source can provide."""
        raise NotImplementedError(f"the data source {type(self).__name__} provides no held-out examples")

    def train_size(self, data_config: Any) -> int | None:
        """The number of training examples ``config.data`` gives, when the source knows it without loading
        (None: unknown until loaded). Lets a sweep refuse a batch larger than the training set before any run."""
        return None

    def group_names(self, data_config: Any) -> tuple[str, str]:
        """Names of group 0 and group 1 (default: from ``data_config.group_attribute``)."""
        return group_names_of(config_value(data_config, "group_attribute", DEFAULT_GROUP_ATTRIBUTE))

    def input_shape(self, data_config: Any) -> tuple[int, ...]:
        """The shape of one example as :meth:`load_splits` returns it (``(H, W, C)`` for images, ``(D,)`` for
        feature vectors), from the settings alone: nothing is loaded (e.g. to build the model before the data)."""
        raise NotImplementedError(f"the data source {type(self).__name__} does not state its input shape")


_SOURCES: dict[str, DataSource] = {}


def register_source(name: str, source: DataSource, *, replace: bool = False) -> DataSource:
    """Makes ``source`` loadable as ``config.data.source = name``; returns it.

    Registering a taken name raises ValueError unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a data source name must be a non-empty string, got {name!r}")
    if not isinstance(source, DataSource):
        raise TypeError(f"register_source({name!r}, ...) needs a jaxdp.data.DataSource, got {type(source).__name__}")
    if name in _SOURCES and not replace:
        raise ValueError(f"a data source named {name!r} is already registered; pass replace=True to replace it")
    _SOURCES[name] = source
    return source


def available_sources() -> tuple[str, ...]:
    """The registered source names, in registration order (the built-ins first: ``"celeba"``, ``"synthetic"``,
    ``"adult"``, ``"adult_synthetic"``)."""
    return tuple(_SOURCES)


def get_source(name: Any) -> DataSource:
    """The source registered as ``name``; an unknown name is refused with the list of registered ones."""
    if name not in _SOURCES:
        names = " or ".join(repr(n) for n in _SOURCES)
        raise ValueError(f"config.data.source={name!r}: use {names} (the registered data sources; a new one "
                         "registers itself with jaxdp.data.register_source).")
    return _SOURCES[name]


def config_value(data_config: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    """``data_config[key]`` for a ConfigDict, a mapping or an object with attributes; ``default`` if absent."""
    if isinstance(data_config, Mapping) or hasattr(data_config, "get"):
        value = data_config.get(key, default)
    else:
        value = getattr(data_config, key, default)
    return default if value is None and default is not None else value


def _source_of(data_config: Any) -> DataSource:
    return get_source(config_value(data_config, "source", "celeba"))


def check_available(data_config: Any) -> None:
    """Raises :class:`DataUnavailable` (which files are missing, where they go, and that
    ``--config.data.source=synthetic`` runs the same study on generated data) unless the data ``data_config``
    names is on this machine. Cheap: no image is decoded, TensorFlow is not imported. Generated data is always
    available (it is generated on first use). Raises ValueError for a setting the source cannot serve (e.g. an
    attribute the generator does not draw).
    """
    _source_of(data_config).check_available(data_config)


def load(data_config: Any) -> tuple[GroupedSplit, GroupedSplit]:
    """``(train, test)`` for ``config.data``, from the source registered as ``config.data.source``."""
    train, test, _ = _source_of(data_config).load_splits(data_config, 0)
    return train, test


def load_splits(data_config: Any, *, holdout_per_group: int = 0) -> Splits:
    """``(train, test, holdout)``: train and test are :func:`load`'s, identical arrays; ``holdout`` (None when
    ``holdout_per_group`` is 0) holds ``holdout_per_group`` examples of each group that are in neither train nor
    test, drawn from the pool the training examples come from (the same distribution: non-members for membership
    inference). A request larger than :func:`holdout_capacity` allows is refused before anything is loaded, with
    the numbers that would work.
    """
    if isinstance(holdout_per_group, bool) or not isinstance(holdout_per_group, int | np.integer) \
            or holdout_per_group < 0:
        raise ValueError(f"holdout_per_group={holdout_per_group!r}: use a non-negative integer (0: no holdout).")
    source = _source_of(data_config)
    holdout_per_group = int(holdout_per_group)
    if holdout_per_group:
        check_holdout_request(holdout_per_group, source.holdout_capacity(data_config),
                              source.group_names(data_config))
    return source.load_splits(data_config, holdout_per_group)


def check_holdout_request(holdout_per_group: int, capacity: Mapping[int, int], names: tuple[str, str]) -> None:
    """Refuses ``holdout_per_group`` above ``min(capacity)``, with the capacity of each group."""
    if holdout_per_group > min(capacity.values()):
        raise ValueError(
            f"holdout_per_group={holdout_per_group} asks for {holdout_per_group} held-out examples of each group, "
            f"but only {capacity[0]} {names[0]} and {capacity[1]} {names[1]} examples are left outside the "
            f"training and test sets at these settings (jaxdp.data.holdout_capacity: {dict(capacity)}); use "
            f"holdout_per_group <= {min(capacity.values())}, or make room: a smaller data.total, or more data "
            "(data.synthetic_num_images for generated data).")


def holdout_capacity(data_config: Any) -> dict[int, int]:
    """``{0: n0, 1: n1}``: the most held-out examples of each group that :func:`load_splits` can return for
    ``config.data`` (label-balanced like the training cells, outside train and test). Computed from counts
    only: no image is decoded.
    """
    return _source_of(data_config).holdout_capacity(data_config)


def input_shape(data_config: Any) -> tuple[int, ...]:
    """The shape of one example of ``config.data`` (no batch axis): ``(image_size, image_size, 3)`` for CelebA,
    ``(99,)`` for Adult. Cheap: nothing is loaded."""
    return tuple(int(n) for n in _source_of(data_config).input_shape(data_config))


def group_names(data_config: Any) -> tuple[str, str]:
    """``(name of group 0, name of group 1)``: ``("female", "male")`` for group attribute Male, else e.g.
    ``("not Young", "Young")``."""
    return _source_of(data_config).group_names(data_config)
