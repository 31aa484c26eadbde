"""CelebA subsets with an exact group balance through tensorflow-datasets' ``celeb_a`` builder: the sources
"celeba" and "synthetic".

One code path serves real and generated data. The five files of CelebA's aligned release sit in tfds's manual
directory (default ``<data_dir>/downloads/manual/``); tfds's ``celeb_a`` builder prepares them offline,
checking each file's size and SHA-256 against the checksums registered in tfds. Files written by
:func:`jaxdp.data.synthetic.write_celeba_files` go through a subclass of that builder whose only change is
the checksum expectations for those five URLs, read from the generator's manifest; the real builder and its
registered checksums are untouched, so generated (or damaged) files are rejected as real CelebA.

**Label and group.** Any two of CelebA's 40 binary attributes: ``label_attribute`` (default ``"Smiling"``) and
``group_attribute`` (default ``"Male"``). Group 1 has the group attribute, group 0 does not;
``female_fraction`` is the fraction of group 0 (women, for the default Male). The generator draws only some
attributes (:data:`jaxdp.data.synthetic.MODELLED_ATTRIBUTES`) and refuses the others. Below, "female/male"
and "smiling" stand for group 0/1 and label 1.

**Counts** (one rule, exact at every total). With ``female_fraction = f`` and ``total = T``:

* females ``F = round_half_up(T * f)``, males ``M = T - F``;
* in each gender of ``n``: smiling ``n // 2``, not smiling ``n - n // 2`` (an odd one out is not smiling);
* every one of the four (gender, smiling) cells needs at least one example, else the call fails and says
  the smallest total that works.

``T = 30,000`` gives the paper's 29,970/30, 29,700/300, 27,000/3,000, 24,000/6,000 and 21,000/9,000 for
``f`` = 0.999, 0.99, 0.9, 0.8, 0.7, each gender half smiling. (The arithmetic is in :mod:`jaxdp.data.subsets`.)

**Split schemes.** ``test_fraction = p``; for each cell of ``c`` examples, ``round_half_up(c * p)`` go to the
test set under "paper" (the test size is the sum over cells, which equals ``T * p`` whenever the cells times
``p`` are whole numbers, as at ``T = 30,000, p = 0.2``: 24,000 train / 6,000 test).

* ``"paper"``: the ``T`` examples are drawn from all of CelebA (partitions 0, 1, 2 pooled, as the paper's
  code did), then each cell is split at random into train and test by the count above, so the test set keeps
  the imbalance exactly (the paper split at random without stratifying: 3 male test images at 99.9%, where
  this gives 6).
* ``"official"``: the training set has exactly the cells of "paper"'s training set, drawn from CelebA's
  train partition (0); the validation partition (1) is not used; the test set, of the same size as
  "paper"'s, is drawn from the test partition (2) with a *balanced* composition (the counting rule above at
  ``f = 0.5``: half female, each gender half smiling), so minority accuracy is measured on thousands of
  images at every imbalance level. The test set is drawn from its own random stream: for a given seed, total
  and test_fraction it is the same images at every female fraction, so runs at different imbalance levels
  are compared on one test set.

Draws are without replacement, seeded by ``seed`` (same seed, same subset); train and test are each returned
in a seeded random order.

**Held-out examples** (``holdout_per_group = n``, for membership inference and audits): ``n`` examples of each
group, label-balanced as the training cells (``n - n // 2`` without the label, ``n // 2`` with it), drawn from
what the training set's pool has left after train and test are taken (all partitions under "paper", the
train partition under "official"), so held-out and training examples of a cell are exchangeable. Their own
random stream: train and test are the same arrays whatever ``n`` is, and for one seed a larger ``n``
extends a smaller one. :func:`jaxdp.data.holdout_capacity` says how large ``n`` can be.

**Preprocessing** as the paper: centre crop 178x178 (rows 20..197 of the 218x178 image), resize to
``image_size`` with PIL's bilinear filter (torchvision's ``CenterCrop(178)``, ``Resize(image_size)``); images
stay uint8, normalisation belongs to the model's input step.

**Cache.** The prepared arrays are stored in ``<data_dir>/jaxdp_subsets/*.npz``, keyed by a SHA-256 of every
setting that changes them (female_fraction, total, split_scheme, test_fraction, seed, image_size, and the
attributes when they are not the defaults), the source files' identity (tfds's registered checksums of the
five real files, or the generator's manifest), the builder version and this module's cache format version;
the key is stored in the file and checked on load. Held-out examples have a file of their own, keyed by the
subset's key and ``n``. Files are written to a temporary name and renamed, so a crash leaves no half-written
cache entry.

**Quiet.** Preparing and reading through tfds logs deprecation notices from inside tfds and TensorFlow
(``FeatureConnector.dtype``, ``CounterV2``, "Using custom data configuration") that no user of jaxdp can act
on; they are filtered out of the absl and TensorFlow loggers while this module calls tfds. Every other
warning passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdp.data import synthetic
from jaxdp.data.celeba_files import (
    _SYNTHETIC_HINT,
    _damaged_prepared_message,
    _log,
    _missing_files_message,
    _Pool,
    _prepared_builder,
    _prepared_pools,
    _quiet_tfds,
    _read_pools,
    _registered_sizes,
    _source_identity,
    _tfds_data_path,
    check_files,
)
from jaxdp.data.celeba_files import _TfdsNoise as _TfdsNoise  # re-exported: tests filter records with it
from jaxdp.data.core import (
    CELLS,
    DEFAULT_GROUP_ATTRIBUTE,
    DEFAULT_LABEL_ATTRIBUTE,
    Cell,
    DataSource,
    DataUnavailable,
    GroupedSplit,
    Splits,
    check_holdout_request,
    config_value,
    group_names_of,
    load,
    register_source,
)
from jaxdp.data.subsets import (
    CELL_NAMES,
    PARTITIONS,
    SPLIT_SCHEMES,
    Sizes,
    SubsetPlan,
    cell_counts,
    check_fits,
    check_settings,
    holdout_cells,
    holdout_partitions,
    plan_counts,
    round_half_up,
)
from jaxdp.data.subsets import holdout_capacity as capacity_of_pools
from jaxdp.runlog import atomic_writer, locked

__all__ = [
    "CELLS", "CELL_NAMES", "SPLIT_SCHEMES", "CelebASource", "GeneratedSource", "GroupedSplit", "SubsetPlan",
    "build_imbalanced", "build_splits", "cell_counts", "check_files", "default_data_dir", "ensure_generated",
    "load", "plan_counts", "round_half_up",
]

FILE_SOURCES = ("celeba", "synthetic")  # whose checksums build_splits expects: tfds's, or a generator manifest
CACHE_FORMAT_VERSION = 2  # 2: "official" test sets drawn from their own stream (same at every fraction)
HOLDOUT_FORMAT_VERSION = 1
_PARTITIONS = PARTITIONS
_DEFAULT_ATTRIBUTES = (DEFAULT_LABEL_ATTRIBUTE, DEFAULT_GROUP_ATTRIBUTE)


def _check_settings(*, female_fraction: Any, total: Any, split_scheme: Any, test_fraction: Any, seed: Any = 0,
                    image_size: Any = 128, label_attribute: Any = DEFAULT_LABEL_ATTRIBUTE,
                    group_attribute: Any = DEFAULT_GROUP_ATTRIBUTE, holdout_per_group: Any = 0) -> None:
    check_settings(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                   test_fraction=test_fraction, seed=seed, image_size=image_size)
    for name, value in (("label_attribute", label_attribute), ("group_attribute", group_attribute)):
        if value not in synthetic.ATTRIBUTE_NAMES:
            raise ValueError(f"{name}={value!r} is not a CelebA attribute; use one of "
                             f"{', '.join(synthetic.ATTRIBUTE_NAMES)}.")
    if label_attribute == group_attribute:
        raise ValueError(f"label_attribute and group_attribute are both {label_attribute!r}: choose two different "
                         "attributes (e.g. label Smiling, group Male).")
    if isinstance(holdout_per_group, bool) or not isinstance(holdout_per_group, int | np.integer) \
            or holdout_per_group < 0:
        raise ValueError(f"holdout_per_group={holdout_per_group!r}: use a non-negative integer (0: no holdout).")


# ----------------------------------------------------------------------------------------------------------
# Building subsets.

def build_imbalanced(
    *,
    female_fraction: float,
    total: int = 30_000,
    split_scheme: str = "paper",
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 128,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    source: str = "celeba",
    label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
    group_attribute: str = DEFAULT_GROUP_ATTRIBUTE,
) -> tuple[GroupedSplit, GroupedSplit]:
    """Builds (train, test) CelebA subsets with an exact group balance; the label balanced in each group.

    The counting, split and preprocessing rules are in this module's docstring. The result is cached under
    ``<data_dir>/jaxdp_subsets/``: a later call with the same settings and source files loads it (no JPEG
    is decoded, TensorFlow is not imported).

    Args:
      female_fraction: fraction of group 0 (female images for group attribute Male), in (0, 1); 0.7 ... 0.999
        in the paper.
      total: number of images in train + test (paper: 30,000 -> 24,000 train, 6,000 test).
      split_scheme: "paper" or "official" (see the module docstring).
      test_fraction: fraction of each cell that goes to the test set.
      seed: seeds which images are drawn and how they are split and ordered.
      image_size: side of the square output images.
      data_dir: tfds data directory (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
      manual_dir: where the five files are (default ``<data_dir>/downloads/manual``).
      source: "celeba" (the real files, checked against tfds's registered checksums) or "synthetic" (files
        written by :func:`jaxdp.data.synthetic.write_celeba_files`, checked against its manifest).
      label_attribute: the CelebA attribute used as the label (1: the image has it).
      group_attribute: the CelebA attribute that defines the groups (1: the image has it).

    Example::

        train, test = build_imbalanced(female_fraction=0.99, total=30_000, data_dir="~/tensorflow_datasets")
        train.counts()  # {(0, 0): 11880, (0, 1): 11880, (1, 0): 120, (1, 1): 120}
    """
    train, test, _ = build_splits(
        female_fraction=female_fraction, total=total, split_scheme=split_scheme, test_fraction=test_fraction,
        seed=seed, image_size=image_size, data_dir=data_dir, manual_dir=manual_dir, source=source,
        label_attribute=label_attribute, group_attribute=group_attribute)
    return train, test


def build_splits(
    *,
    female_fraction: float,
    total: int = 30_000,
    split_scheme: str = "paper",
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 128,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    source: str = "celeba",
    label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
    group_attribute: str = DEFAULT_GROUP_ATTRIBUTE,
    holdout_per_group: int = 0,
) -> Splits:
    """:func:`build_imbalanced`'s (train, test), the same arrays, and ``holdout_per_group`` held-out examples
    of each group (None when 0; rules in the module docstring). Too large a holdout is refused with the
    largest that fits, before anything is decoded.
    """
    _check_settings(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                    test_fraction=test_fraction, seed=seed, image_size=image_size, label_attribute=label_attribute,
                    group_attribute=group_attribute, holdout_per_group=holdout_per_group)
    if source not in FILE_SOURCES:
        raise ValueError(f"source={source!r}: use 'celeba' (the real files) or 'synthetic' (generated files).")
    if source == "synthetic":
        synthetic.check_design(label_attribute, group_attribute)
    plan = plan_counts(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                       test_fraction=test_fraction, label_attribute=label_attribute, group_attribute=group_attribute)
    data_dir, manual_dir = _directories(data_dir, manual_dir)
    attributes = (label_attribute, group_attribute)
    holdout_per_group = int(holdout_per_group)
    subset = _subset_cache(source, data_dir, manual_dir, female_fraction=female_fraction, total=total,
                           split_scheme=split_scheme, test_fraction=test_fraction, seed=seed,
                           image_size=image_size, attributes=attributes)
    holdout = _holdout_cache(subset, holdout_per_group) if holdout_per_group else None

    def from_cache() -> tuple[tuple | None, tuple | None]:
        pair = _load_cache(subset, ("train", "test"), attributes)
        held = _load_cache(holdout, ("holdout",), attributes) if holdout and pair else None
        return pair, held

    pair, held = from_cache()
    if pair is not None and (holdout is None or held is not None):
        return Splits(pair[0], pair[1], held[0] if held else None)

    data_dir.mkdir(parents=True, exist_ok=True)
    with locked(data_dir / ".jaxdp_data.lock"):
        pair, held = from_cache()  # another process may have built them meanwhile
        if pair is not None and (holdout is None or held is not None):
            return Splits(pair[0], pair[1], held[0] if held else None)
        with _quiet_tfds():
            pools = _prepared_pools(source, data_dir, manual_dir, label_attribute, group_attribute)
        what = "generated data" if source == "synthetic" else "CelebA"
        check_fits(_pool_sizes(pools), plan, female_fraction=female_fraction, total=total,
                   split_scheme=split_scheme, test_fraction=test_fraction, what=what,
                   more_hint="or generate more images: synthetic_num_images" if source == "synthetic" else "",
                   label_attribute=label_attribute, group_attribute=group_attribute)
        train_ids, test_ids = _select(pools, plan, split_scheme, seed)
        holdout_ids = []
        if holdout is not None:
            check_holdout_request(holdout_per_group, capacity_of_pools(_pool_sizes(pools), plan, split_scheme),
                                  group_names_of(group_attribute))
            holdout_ids = _select_holdout(pools, train_ids + test_ids, split_scheme, seed, holdout_per_group)
        images = _decode_selected(pools, (train_ids + test_ids if pair is None else []) + holdout_ids, image_size)
        if pair is None:
            rng = np.random.default_rng([seed, 2])
            pair = (_assemble(train_ids, images, rng, attributes), _assemble(test_ids, images, rng, attributes))
            _save_cache(subset, {"train": pair[0], "test": pair[1]})
        if holdout is not None:
            held = (_assemble(holdout_ids, images, np.random.default_rng([seed, 5]), attributes),)
            _save_cache(holdout, {"holdout": held[0]})
    return Splits(pair[0], pair[1], held[0] if held else None)


def _directories(data_dir: str | os.PathLike[str] | None,
                 manual_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    data_dir = Path(data_dir or default_data_dir()).expanduser().absolute()
    manual_dir = Path(manual_dir).expanduser().absolute() if manual_dir else data_dir / "downloads" / "manual"
    return data_dir, manual_dir


def ensure_generated(manual_dir: str | os.PathLike[str], num_images: int, *, seed: int = 0,
                     label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
                     group_attribute: str = DEFAULT_GROUP_ATTRIBUTE) -> Path:
    """Writes generated files into ``manual_dir`` unless complete ones for these arguments are there.

    Refuses to overwrite CelebA files that the generator did not write (e.g. a real CelebA manual directory).
    """
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    design = dict(label_attribute=label_attribute, group_attribute=group_attribute)
    with locked(manual_dir / ".jaxdp_generate.lock"):
        if synthetic.is_complete(manual_dir, num_images, seed, **design):
            return manual_dir
        foreign = [n for n in synthetic.CELEBA_FILE_NAMES if (manual_dir / n).exists()]
        if foreign and not (manual_dir / synthetic.MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{manual_dir} holds CelebA files not written by the generator ({', '.join(foreign)}); "
                "refusing to overwrite them. Point config.data.data_dir (or manual_dir) for source='synthetic' "
                "at another directory, or use source='celeba' for these files.")
        synthetic.write_celeba_files(manual_dir, num_images, seed=seed, **design)
    return manual_dir


def default_data_dir() -> Path:
    """tfds's default data directory: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


# ----------------------------------------------------------------------------------------------------------
# The two registered sources.

class CelebASource(DataSource):
    """``config.data.source = "celeba"``: the five files of CelebA's aligned release, placed by the user in
    ``config.data.manual_dir`` (default ``<data_dir>/downloads/manual``; data_dir: ``config.data.data_dir``, else
    ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``)."""

    file_source = "celeba"

    def build_arguments(self, data_config: Any) -> dict[str, Any]:
        """:func:`build_splits`' keyword arguments for ``config.data`` (settings validated, directories
        resolved)."""
        def get(key: str, default: Any = None) -> Any:
            return config_value(data_config, key, default)

        arguments = dict(
            female_fraction=get("female_fraction"), total=get("total", 30_000),
            split_scheme=get("split_scheme", "paper"), test_fraction=get("test_fraction", 0.2),
            seed=get("seed", 0), image_size=get("image_size", 128),
            label_attribute=get("label_attribute", DEFAULT_LABEL_ATTRIBUTE),
            group_attribute=get("group_attribute", DEFAULT_GROUP_ATTRIBUTE))
        _check_settings(**arguments)
        data_dir, manual_dir = self.directories(data_config, arguments)
        return arguments | dict(data_dir=data_dir, manual_dir=manual_dir, source=self.file_source)

    def directories(self, data_config: Any, arguments: dict[str, Any]) -> tuple[Path, Path]:
        """(data_dir, manual_dir) for ``config.data``."""
        return _directories(config_value(data_config, "data_dir"), config_value(data_config, "manual_dir"))

    def plan(self, arguments: dict[str, Any]) -> SubsetPlan:
        """The train/test cell sizes (ValueError if a cell would be empty)."""
        keys = ("female_fraction", "total", "split_scheme", "test_fraction", "label_attribute", "group_attribute")
        return plan_counts(**{k: arguments[k] for k in keys})

    def check_available(self, data_config: Any) -> None:
        arguments = self.build_arguments(data_config)
        self.plan(arguments)
        data_dir, manual_dir = arguments["data_dir"], arguments["manual_dir"]
        settings = {k: arguments[k] for k in ("female_fraction", "total", "split_scheme", "test_fraction", "seed",
                                              "image_size")}
        subset = _subset_cache(self.file_source, data_dir, manual_dir, **settings,
                               attributes=(arguments["label_attribute"], arguments["group_attribute"]))
        if subset.path.exists():
            return  # the subset is cached
        missing = [n for n in synthetic.CELEBA_FILE_NAMES if not (manual_dir / n).is_file()]
        info = _tfds_data_path(data_dir) / "dataset_info.json"
        if info.exists():  # prepared by tfds earlier (the files may have been removed since)
            try:
                json.loads(info.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                if missing:  # with the files, the damaged copy is prepared again when the run loads it
                    raise DataUnavailable(_damaged_prepared_message(info.parent, manual_dir, e)) from None
            return
        if missing:
            raise DataUnavailable(_missing_files_message(missing, manual_dir, data_dir))
        registered = _registered_sizes()
        wrong = [(n, (manual_dir / n).stat().st_size) for n in synthetic.CELEBA_FILE_NAMES
                 if (manual_dir / n).stat().st_size != registered[n]]
        if wrong:
            described = ", ".join(f"{n} is {size:,} bytes (CelebA's: {registered[n]:,})" for n, size in wrong)
            raise DataUnavailable(
                f"CelebA file(s) of the wrong size in {manual_dir}: {described}, by the sizes tfds registers: "
                f"truncated, or not the original files; download them again. {_SYNTHETIC_HINT}")

    def load_splits(self, data_config: Any, holdout_per_group: int) -> Splits:
        return build_splits(**self.build_arguments(data_config), holdout_per_group=holdout_per_group)

    def train_size(self, data_config: Any) -> int:
        """Exact by the counting rule (the module docstring): the sum of the plan's training cells."""
        return sum(self.plan(self.build_arguments(data_config)).train.values())

    def input_shape(self, data_config: Any) -> tuple[int, ...]:
        size = config_value(data_config, "image_size", 128)
        return (int(size), int(size), 3)

    def holdout_capacity(self, data_config: Any) -> dict[int, int]:
        arguments = self.build_arguments(data_config)
        plan = self.plan(arguments)
        sizes = self.pool_sizes(data_config, arguments)
        check_fits(sizes, plan, what="generated data" if self.file_source == "synthetic" else "CelebA",
                   more_hint="or generate more images: synthetic_num_images" if self.file_source == "synthetic"
                   else "", **{k: arguments[k] for k in ("female_fraction", "total", "split_scheme",
                                                         "test_fraction", "label_attribute", "group_attribute")})
        return capacity_of_pools(sizes, plan, arguments["split_scheme"])

    def pool_sizes(self, data_config: Any, arguments: dict[str, Any]) -> Sizes:
        """Examples per partition and (group, label) cell, from the two text files (no image is read), or from
        the prepared tfds dataset if the files were removed after preparing."""
        attributes = arguments["label_attribute"], arguments["group_attribute"]
        sizes = _sizes_from_files(arguments["manual_dir"], *attributes)
        if sizes is None:
            self.check_available(data_config)
            with _quiet_tfds():
                builder = _prepared_builder(self.file_source, arguments["data_dir"], arguments["manual_dir"])
                sizes = _pool_sizes(_read_pools(builder, *attributes, with_images=False))
        return sizes


class GeneratedSource(CelebASource):
    """``config.data.source = "synthetic"``: ``config.data.synthetic_num_images`` CelebA-format images drawn by
    :mod:`jaxdp.data.synthetic` with ``config.data.synthetic_seed``, written on first use into
    ``<data_dir>/downloads/manual`` (data_dir default ``data/synthetic-<num>-<seed>`` under the current
    directory; for attributes other than Smiling by Male, ``manual-<group>-<label>`` beside it) and reused
    after, then prepared like the real files. Always available; an attribute the generator does not draw is
    refused."""

    file_source = "synthetic"

    def directories(self, data_config: Any, arguments: dict[str, Any]) -> tuple[Path, Path]:
        num_images, generator_seed = self.generator_arguments(data_config)
        data_dir = Path(config_value(data_config, "data_dir") or f"data/synthetic-{num_images}-{generator_seed}")
        data_dir = data_dir.expanduser().absolute()
        manual_dir = config_value(data_config, "manual_dir")
        if manual_dir:
            return data_dir, Path(manual_dir).expanduser().absolute()
        design = (arguments["label_attribute"], arguments["group_attribute"])
        name = "manual" if design == _DEFAULT_ATTRIBUTES else f"manual-{design[1]}-{design[0]}"
        return data_dir, data_dir / "downloads" / name

    @staticmethod
    def generator_arguments(data_config: Any) -> tuple[int, int]:
        """(num_images, seed) of the generator, validated."""
        num_images = config_value(data_config, "synthetic_num_images", 4000)
        synthetic.check_num_images(num_images)
        return int(num_images), int(config_value(data_config, "synthetic_seed", 0))

    def build_arguments(self, data_config: Any) -> dict[str, Any]:
        arguments = super().build_arguments(data_config)
        synthetic.check_design(arguments["label_attribute"], arguments["group_attribute"])
        return arguments

    def check_available(self, data_config: Any) -> None:
        self.plan(self.build_arguments(data_config))  # settings only: the files are generated on first use

    def load_splits(self, data_config: Any, holdout_per_group: int) -> Splits:
        arguments = self.build_arguments(data_config)
        num_images, generator_seed = self.generator_arguments(data_config)
        ensure_generated(arguments["manual_dir"], num_images, seed=generator_seed,
                         label_attribute=arguments["label_attribute"], group_attribute=arguments["group_attribute"])
        return build_splits(**arguments, holdout_per_group=holdout_per_group)

    def pool_sizes(self, data_config: Any, arguments: dict[str, Any]) -> Sizes:
        """From the generator's exact composition: nothing needs to be generated yet."""
        per_cell = synthetic.cell_partition_sizes(self.generator_arguments(data_config)[0])
        return {partition: {c: per_cell[partition] for c in CELLS} for partition in _PARTITIONS}


register_source("celeba", CelebASource())
register_source("synthetic", GeneratedSource())


# ----------------------------------------------------------------------------------------------------------
# Reading, selecting, decoding.

def _pool_sizes(pools: dict[str, _Pool]) -> Sizes:
    return {split: {c: int(np.sum((pool.group == c[0]) & (pool.label == c[1]))) for c in CELLS}
            for split, pool in pools.items()}


def _sizes_from_files(manual_dir: Path, label_attribute: str, group_attribute: str) -> Sizes | None:
    """Examples per partition and cell, read from list_attr_celeba.txt and list_eval_partition.txt (None if
    either is missing); the rows tfds's celeb_a builder turns into its three splits."""
    attr_path, partition_path = manual_dir / synthetic.ATTR_NAME, manual_dir / synthetic.PARTITION_NAME
    if not (attr_path.is_file() and partition_path.is_file()):
        return None
    names = {0: "train", 1: "validation", 2: "test"}
    partition = {}
    for line in partition_path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            partition[fields[0]] = names[int(fields[1])]
    lines = attr_path.read_text().splitlines()
    columns = lines[1].split()
    g, y = columns.index(group_attribute) + 1, columns.index(label_attribute) + 1
    sizes = {split: dict.fromkeys(CELLS, 0) for split in _PARTITIONS}
    for line in lines[2:]:
        fields = line.split()
        if fields:
            sizes[partition[fields[0]]][int(fields[g] == "1"), int(fields[y] == "1")] += 1
    return sizes


def _cell_pool(pools: dict[str, _Pool], splits: tuple[str, ...], cell: Cell) -> list[tuple]:
    """(id, group, label) of the cell's examples in ``splits``, in id order."""
    out = []
    for split in splits:
        pool = pools[split]
        take = (pool.group == cell[0]) & (pool.label == cell[1])
        out += [(i, cell[0], cell[1]) for i in pool.ids[take]]
    return out


def _select(pools: dict[str, _Pool], plan: SubsetPlan, split_scheme: str, seed: int) -> tuple[list, list]:
    """Chooses (id, group, label) triples for train and test; the plan must fit the pools (`check_fits`)."""
    rng = np.random.default_rng([seed, 1])
    train, test = [], []
    if split_scheme == "paper":
        available = {c: _cell_pool(pools, tuple(_PARTITIONS), c) for c in CELLS}
        for c in CELLS:
            chosen = rng.choice(len(available[c]), size=plan.train[c] + plan.test[c], replace=False)
            picked = [available[c][k] for k in chosen]  # in random order: the first ones go to test
            test += picked[:plan.test[c]]
            train += picked[plan.test[c]:]
    else:
        available = {c: _cell_pool(pools, ("train",), c) for c in CELLS}
        available_test = {c: _cell_pool(pools, ("test",), c) for c in CELLS}
        # The test set gets its own stream, so it depends on (seed, total, test_fraction) only: the same images
        # at every female fraction, and accuracy across imbalance levels is compared on one test set.
        test_rng = np.random.default_rng([seed, 3])
        for c in CELLS:
            train += [available[c][k] for k in rng.choice(len(available[c]), plan.train[c], replace=False)]
            test += [available_test[c][k] for k in test_rng.choice(len(available_test[c]), plan.test[c],
                                                                   replace=False)]
    return train, test


def _select_holdout(pools: dict[str, _Pool], used: list[tuple], split_scheme: str, seed: int,
                    holdout_per_group: int) -> list[tuple]:
    """``holdout_cells(n)`` examples per cell from the training pool, outside ``used``: a prefix of a seeded
    permutation of each cell's remainder (its own stream), so a larger ``n`` extends a smaller one."""
    rng = np.random.default_rng([seed, 4])
    taken = {u[0] for u in used}
    out = []
    for c, n in holdout_cells(holdout_per_group).items():
        rest = [t for t in _cell_pool(pools, holdout_partitions(split_scheme), c) if t[0] not in taken]
        order = rng.permutation(len(rest))
        out += [rest[k] for k in order[:n]]
    return out


def _decode_image(jpeg: bytes, image_size: int) -> np.ndarray:
    """Decodes one CelebA JPEG, centre-crops 178x178 and resizes (PIL bilinear), as torchvision does."""
    with Image.open(io.BytesIO(jpeg)) as image:
        image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        # torchvision's CenterCrop: offsets int(round((H - side) / 2)), so rows 20..197 of 218.
        top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
        image = image.crop((left, top, left + side, top + side))
        if side != image_size:
            image = image.resize((image_size, image_size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _decode_selected(pools: dict[str, _Pool], chosen: list[tuple], image_size: int) -> dict[bytes, np.ndarray]:
    encoded = {}
    for pool in pools.values():
        encoded.update(zip(pool.ids.tolist(), pool.jpegs.tolist(), strict=True))
    keys = [c[0] for c in chosen]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as executor:  # PIL releases the GIL
        arrays = list(executor.map(lambda k: _decode_image(encoded[k], image_size), keys))
    return dict(zip(keys, arrays, strict=True))


def _assemble(chosen: list[tuple], images: dict[bytes, np.ndarray], rng: np.random.Generator,
              attributes: tuple[str, str]) -> GroupedSplit:
    order = rng.permutation(len(chosen))
    chosen = [chosen[k] for k in order]
    return GroupedSplit(
        images=np.stack([images[c[0]] for c in chosen]),
        label=np.array([c[2] for c in chosen], dtype=np.int32),
        group=np.array([c[1] for c in chosen], dtype=np.int32),
        label_attribute=attributes[0], group_attribute=attributes[1])


# ----------------------------------------------------------------------------------------------------------
# Cache and locking.

@dataclass(frozen=True)
class _CacheEntry:
    path: Path
    key: str
    settings: dict


def _subset_cache(source: str, data_dir: Path, manual_dir: Path, *, female_fraction: float, total: int,
                  split_scheme: str, test_fraction: float, seed: int, image_size: int,
                  attributes: tuple[str, str]) -> _CacheEntry:
    """Where the (train, test) arrays of these settings are cached, and their key (see the module docstring)."""
    identity = _source_identity(source, manual_dir)
    settings = {"female_fraction": repr(float(female_fraction)), "total": int(total),
                "split_scheme": split_scheme, "test_fraction": repr(float(test_fraction)),
                "seed": int(seed), "image_size": int(image_size)}
    tag = ""
    if attributes != _DEFAULT_ATTRIBUTES:  # the defaults keep the keys (and files) of earlier versions
        settings |= {"label_attribute": attributes[0], "group_attribute": attributes[1]}
        tag = f"-{attributes[1]}-{attributes[0]}"
    key = hashlib.sha256(json.dumps(
        {"settings": settings, "source": identity, "cache_format": CACHE_FORMAT_VERSION},
        sort_keys=True).encode()).hexdigest()
    path = data_dir / "jaxdp_subsets" / (
        f"{source}{tag}-f{female_fraction}-n{total}-{split_scheme}-t{test_fraction}-s{seed}-{image_size}px-"
        f"{key[:16]}.npz")
    return _CacheEntry(path, key, settings)


def _holdout_cache(subset: _CacheEntry, holdout_per_group: int) -> _CacheEntry:
    settings = {"subset_key": subset.key, "holdout_per_group": int(holdout_per_group),
                "holdout_format": HOLDOUT_FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = subset.path.with_name(f"{subset.path.stem}-holdout{holdout_per_group}-{key[:16]}.npz")
    return _CacheEntry(path, key, settings | {"subset": subset.settings})


def _load_cache(entry: _CacheEntry | None, names: tuple[str, ...],
                attributes: tuple[str, str]) -> tuple[GroupedSplit, ...] | None:
    if entry is None or not entry.path.exists():
        return None
    try:
        with np.load(entry.path, allow_pickle=False) as f:
            if str(f["key"]) != entry.key:
                return None
            return tuple(GroupedSplit(images=f[f"{s}_images"], label=f[f"{s}_label"], group=f[f"{s}_group"],
                                      label_attribute=attributes[0], group_attribute=attributes[1])
                         for s in names)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        _log(f"ignoring unreadable cache file {entry.path} ({type(e).__name__}); rebuilding it")
        return None


def _save_cache(entry: _CacheEntry, splits: dict[str, GroupedSplit]) -> None:
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(entry.path, "wb") as f:
        np.savez(f, key=np.array(entry.key), settings=np.array(json.dumps(entry.settings)),
                 **{f"{name}_{field}": getattr(split, field)
                    for name, split in splits.items() for field in ("images", "label", "group")})

