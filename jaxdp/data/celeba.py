"""CelebA subsets with an exact gender balance, prepared through tensorflow-datasets' ``celeb_a`` builder.

One code path serves real and generated data. The five files of CelebA's aligned release sit in tfds's manual
directory (default ``<data_dir>/downloads/manual/``); tfds's ``celeb_a`` builder prepares them offline,
checking each file's size and SHA-256 against the checksums registered in tfds. Files written by
:func:`jaxdp.data.synthetic.write_celeba_files` go through a subclass of that builder whose only change is
the checksum expectations for those five URLs, read from the generator's manifest; the real builder and its
registered checksums are untouched, so generated (or damaged) files are rejected as real CelebA.

**Counts** (one rule, exact at every total). With ``female_fraction = f`` and ``total = T``:

* females ``F = round_half_up(T * f)``, males ``M = T - F``;
* in each gender of ``n``: smiling ``n // 2``, not smiling ``n - n // 2`` (an odd one out is not smiling);
* every one of the four (gender, smiling) cells needs at least one example, else the call fails and says
  the smallest total that works.

``T = 30,000`` gives the paper's 29,970/30, 29,700/300, 27,000/3,000, 24,000/6,000 and 21,000/9,000 for
``f`` = 0.999, 0.99, 0.9, 0.8, 0.7, each gender half smiling.

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

**Preprocessing** as the paper: centre crop 178x178 (rows 20..197 of the 218x178 image), resize to
``image_size`` with PIL's bilinear filter (torchvision's ``CenterCrop(178)``, ``Resize(image_size)``); images
stay uint8, normalisation belongs to the model's input step.

**Cache.** The prepared arrays are stored in ``<data_dir>/jaxdp_subsets/*.npz``, keyed by a SHA-256 of every
setting that changes them (female_fraction, total, split_scheme, test_fraction, seed, image_size), the source
files' identity (tfds's registered checksums of the five real files, or the generator's manifest), the
builder version and this module's cache format version; the key is stored in the file and checked on load.
Files are written to a temporary name and renamed, so a crash leaves no half-written cache entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdp.data import synthetic
from jaxdp.runlog import atomic_writer

Cell = tuple[int, int]  # (group, label): group 0 female / 1 male, label 0 not smiling / 1 smiling
CELLS: tuple[Cell, ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
CELL_NAMES = {(0, 0): "non-smiling females", (0, 1): "smiling females", (1, 0): "non-smiling males",
              (1, 1): "smiling males"}
SPLIT_SCHEMES = ("paper", "official")
SOURCES = ("celeba", "synthetic")
CACHE_FORMAT_VERSION = 2  # 2: "official" test sets drawn from their own stream (same at every fraction)
CELEBA_VERSION = "2.1.0"  # the tfds celeb_a builder version this module was written against
_PARTITIONS = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class GroupedSplit:
    """Images with their label (Smiling: 1 smiling, 0 not) and group (Male: 0 female, 1 male).

    ``images`` is uint8 [N, H, W, 3]; ``label`` and ``group`` are int32 [N].
    """

    images: np.ndarray
    label: np.ndarray
    group: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}")
        for name in ("label", "group"):
            value = getattr(self, name)
            if value.dtype != np.int32 or value.shape != (n,):
                raise ValueError(f"{name} must be int32 [{n}], got {value.dtype} {value.shape}")

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> dict[Cell, int]:
        """``{(group, label): number of examples}`` for the four cells, e.g. ``{(1, 1): 15, ...}``."""
        return {cell: int(np.sum((self.group == cell[0]) & (self.label == cell[1]))) for cell in CELLS}

    def describe(self) -> str:
        """One line for logs, e.g. ``"300 images 32x32: females 135 smiling / 135 not, males 15 / 15"``."""
        c = self.counts()
        h, w = self.images.shape[1:3]
        return (f"{len(self)} images {h}x{w}: females {c[0, 1]} smiling / {c[0, 0]} not, "
                f"males {c[1, 1]} smiling / {c[1, 0]} not")


# ----------------------------------------------------------------------------------------------------------
# Counting.

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
    """The four cell sizes of a subset of ``total``: see the module docstring for the rule.

    >>> cell_counts(30000, 0.999)
    {(0, 0): 14985, (0, 1): 14985, (1, 0): 15, (1, 1): 15}
    """
    total = int(total)
    females = round_half_up(total * _exact(female_fraction))
    males = total - females
    return {(0, 0): females - females // 2, (0, 1): females // 2,
            (1, 0): males - males // 2, (1, 1): males // 2}


def plan_counts(*, female_fraction: float, total: int, split_scheme: str = "paper",
                test_fraction: float = 0.2) -> SubsetPlan:
    """The train and test cell sizes of :func:`build_imbalanced` (no data needed; the rules are in the docstring).

    Raises ValueError for a setting out of range or a total too small to give every cell an example.
    """
    _check_settings(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                    test_fraction=test_fraction)
    plan = _plan(total, female_fraction, split_scheme, test_fraction)
    if min(plan.train.values()) < 1:
        smallest = _smallest_total(female_fraction, split_scheme, test_fraction)
        empty = [CELL_NAMES[c] for c in CELLS if plan.train[c] < 1]
        cells = cell_counts(total, female_fraction)
        raise ValueError(
            f"female_fraction={female_fraction} with total={total} leaves no training examples of "
            f"{' or '.join(empty)} (cells {cells} by females = round_half_up(total * female_fraction), "
            f"each gender half smiling, then test_fraction={test_fraction} per cell to test); every "
            f"(gender, smiling) cell needs at least one training example: use total >= {smallest}, or a "
            f"smaller female_fraction.")
    return plan


def _plan(total: int, female_fraction: float, split_scheme: str, test_fraction: float) -> SubsetPlan:
    cells = cell_counts(total, female_fraction)
    p = _exact(test_fraction)
    test = {c: round_half_up(n * p) for c, n in cells.items()}
    train = {c: cells[c] - test[c] for c in CELLS}
    if split_scheme == "official":
        test = cell_counts(sum(test.values()), 0.5)
    return SubsetPlan(train=train, test=test)


def _smallest_total(female_fraction: float, split_scheme: str, test_fraction: float) -> int:
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


def _check_settings(*, female_fraction: Any, total: Any, split_scheme: Any, test_fraction: Any,
                    seed: Any = 0, image_size: Any = 128) -> None:
    if not isinstance(female_fraction, float | int) or not 0 < female_fraction < 1:
        raise ValueError(
            f"female_fraction={female_fraction!r} is out of range: it is the fraction of female images, "
            "strictly between 0 and 1 (the paper's levels are 0.7, 0.8, 0.9, 0.99, 0.999).")
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


# ----------------------------------------------------------------------------------------------------------
# The public entry points.

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
) -> tuple[GroupedSplit, GroupedSplit]:
    """Builds (train, test) CelebA subsets with an exact gender balance; Smiling balanced in each gender.

    The counting, split and preprocessing rules are in this module's docstring. The result is cached under
    ``<data_dir>/jaxdp_subsets/``: a later call with the same settings and source files loads it (no JPEG
    is decoded, TensorFlow is not imported).

    Args:
      female_fraction: fraction of female images, in (0, 1); 0.7 ... 0.999 in the paper.
      total: number of images in train + test (paper: 30,000 -> 24,000 train, 6,000 test).
      split_scheme: "paper" or "official" (see the module docstring).
      test_fraction: fraction of each cell that goes to the test set.
      seed: seeds which images are drawn and how they are split and ordered.
      image_size: side of the square output images.
      data_dir: tfds data directory (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
      manual_dir: where the five files are (default ``<data_dir>/downloads/manual``).
      source: "celeba" (the real files, checked against tfds's registered checksums) or "synthetic" (files
        written by :func:`jaxdp.data.synthetic.write_celeba_files`, checked against its manifest).

    Example::

        train, test = build_imbalanced(female_fraction=0.99, total=30_000, data_dir="~/tensorflow_datasets")
        train.counts()  # {(0, 0): 11880, (0, 1): 11880, (1, 0): 120, (1, 1): 120}
    """
    _check_settings(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                    test_fraction=test_fraction, seed=seed, image_size=image_size)
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: use 'celeba' (the real files) or 'synthetic' (generated files).")
    plan = plan_counts(female_fraction=female_fraction, total=total, split_scheme=split_scheme,
                       test_fraction=test_fraction)
    data_dir = Path(data_dir or default_data_dir()).expanduser().absolute()
    manual_dir = Path(manual_dir).expanduser().absolute() if manual_dir else data_dir / "downloads" / "manual"

    identity = _source_identity(source, manual_dir)
    settings = {"female_fraction": repr(float(female_fraction)), "total": int(total),
                "split_scheme": split_scheme, "test_fraction": repr(float(test_fraction)),
                "seed": int(seed), "image_size": int(image_size)}
    key = hashlib.sha256(json.dumps(
        {"settings": settings, "source": identity, "cache_format": CACHE_FORMAT_VERSION},
        sort_keys=True).encode()).hexdigest()
    cache_path = data_dir / "jaxdp_subsets" / (
        f"{source}-f{female_fraction}-n{total}-{split_scheme}-t{test_fraction}-s{seed}-{image_size}px-"
        f"{key[:16]}.npz")
    cached = _load_cache(cache_path, key)
    if cached is not None:
        return cached

    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir / ".jaxdp_data.lock"):
        cached = _load_cache(cache_path, key)  # another process may have built it meanwhile
        if cached is not None:
            return cached
        builder = _prepared_builder(source, data_dir, manual_dir)
        pools = _read_pools(builder)
        train_ids, test_ids = _select(pools, plan, split_scheme, seed, female_fraction, total, test_fraction,
                                      source)
        rng = np.random.default_rng([seed, 2])
        images = _decode_selected(pools, train_ids + test_ids, image_size)
        train = _assemble(train_ids, images, rng)
        test = _assemble(test_ids, images, rng)
        _save_cache(cache_path, key, settings, train, test)
    return train, test


def load(data_config: Mapping[str, Any] | Any) -> tuple[GroupedSplit, GroupedSplit]:
    """(train, test) for ``config.data`` (see :func:`jaxdp.config.base_config`): real or generated CelebA.

    ``source="celeba"``: the five files in ``manual_dir`` (default ``<data_dir>/downloads/manual``).
    ``source="synthetic"``: ``synthetic_num_images`` images generated with ``synthetic_seed`` (default 0)
    into ``<data_dir>/downloads/manual`` (default data_dir ``data/synthetic-<num>-<seed>`` under the current
    directory), once: complete files from an earlier call are reused. Both then take the same path
    through the tfds builder and :func:`build_imbalanced`.
    """
    get = data_config.get if hasattr(data_config, "get") else lambda k, d=None: getattr(data_config, k, d)
    source = get("source", "celeba")
    data_dir, manual_dir = get("data_dir", None), get("manual_dir", None)
    if source == "synthetic":
        num_images = int(get("synthetic_num_images", 4000))
        generator_seed = int(get("synthetic_seed", 0) or 0)
        data_dir = Path(data_dir or f"data/synthetic-{num_images}-{generator_seed}").expanduser().absolute()
        manual_dir = Path(manual_dir).expanduser().absolute() if manual_dir else data_dir / "downloads" / "manual"
        ensure_generated(manual_dir, num_images, seed=generator_seed)
    elif source != "celeba":
        raise ValueError(f"config.data.source={source!r}: use 'celeba' (the five CelebA files placed locally) "
                         "or 'synthetic' (generated CelebA-format data).")
    return build_imbalanced(
        female_fraction=get("female_fraction"), total=get("total", 30_000),
        split_scheme=get("split_scheme", "paper"), test_fraction=get("test_fraction", 0.2),
        seed=get("seed", 0), image_size=get("image_size", 128), data_dir=data_dir, manual_dir=manual_dir,
        source=source)


def ensure_generated(manual_dir: str | os.PathLike[str], num_images: int, *, seed: int = 0) -> Path:
    """Writes generated files into ``manual_dir`` unless complete ones for (num_images, seed) are there.

    Refuses to overwrite CelebA files that the generator did not write (e.g. a real CelebA manual directory).
    """
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    with _locked(manual_dir / ".jaxdp_generate.lock"):
        if synthetic.is_complete(manual_dir, num_images, seed):
            return manual_dir
        foreign = [n for n in synthetic.CELEBA_FILE_NAMES if (manual_dir / n).exists()]
        if foreign and not (manual_dir / synthetic.MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{manual_dir} holds CelebA files not written by the generator ({', '.join(foreign)}); "
                "refusing to overwrite them. Point config.data.data_dir (or manual_dir) for source='synthetic' "
                "at another directory, or use source='celeba' for these files.")
        synthetic.write_celeba_files(manual_dir, num_images, seed=seed)
    return manual_dir


def default_data_dir() -> Path:
    """tfds's default data directory: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


# ----------------------------------------------------------------------------------------------------------
# Source identity and the tfds builders.

def _real_checksums_path() -> Path:
    spec = importlib.util.find_spec("tensorflow_datasets")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tensorflow-datasets is not installed: pip install 'tensorflow-datasets>=4.9.6'.")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "celeb_a" / "checksums.tsv"


def _source_identity(source: str, manual_dir: Path) -> dict[str, Any]:
    if source == "celeba":
        checksums = _real_checksums_path().read_text()
        return {"builder": "celeb_a", "version": CELEBA_VERSION,
                "checksums": hashlib.sha256(checksums.encode()).hexdigest()}
    manifest = synthetic.read_manifest(manual_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"No generated CelebA files in {manual_dir} (no {synthetic.MANIFEST_NAME}). Write them with "
            "jaxdp.data.synthetic.write_celeba_files(manual_dir, num_images), or use jaxdp.data.load with "
            "config.data.source='synthetic', which does it for you.")
    return {"builder": "celeb_a_generated", "version": CELEBA_VERSION,
            "files": hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()}


_GENERATED_BUILDER_CLS = None


def _generated_builder_cls() -> type:
    """The real ``celeb_a`` builder with the checksum expectations taken from a generator manifest."""
    global _GENERATED_BUILDER_CLS
    if _GENERATED_BUILDER_CLS is None:
        import tensorflow_datasets as tfds

        real = tfds.builder_cls("celeb_a")

        class GeneratedCelebA(real, skip_registration=True):
            """tfds's celeb_a builder; only `url_infos` (expected sizes and SHA-256s) come from a manifest."""

            name = "celeb_a_generated"

            def __init__(self, *, manifest: dict, **kwargs: Any) -> None:
                from tensorflow_datasets.core.download import checksums

                self._generated_url_infos = {
                    info["url"]: checksums.UrlInfo(size=info["size"], checksum=info["sha256"], filename=name)
                    for name, info in manifest["files"].items()}
                super().__init__(**kwargs)

            @property
            def url_infos(self) -> dict:  # replaces the registered checksums, for these five URLs only
                return dict(self._generated_url_infos)

        _GENERATED_BUILDER_CLS = GeneratedCelebA
    return _GENERATED_BUILDER_CLS


def _prepared_builder(source: str, data_dir: Path, manual_dir: Path) -> Any:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    missing = [n for n in synthetic.CELEBA_FILE_NAMES if not (manual_dir / n).is_file()]
    if source == "celeba":
        if importlib.util.find_spec("importlib_resources") is None:
            # tfds >= 4.9.7 imports it to find celeb_a's registered checksums but does not declare it.
            raise ImportError("tensorflow-datasets needs the package importlib-resources to read the real "
                              "CelebA checksums (tfds issue #11212): pip install importlib-resources")
        builder = tfds.builder_cls("celeb_a")(data_dir=os.fspath(data_dir))
        if str(builder.version) != CELEBA_VERSION:
            raise RuntimeError(f"tfds's celeb_a builder is version {builder.version}; jaxdp.data was written "
                               f"for {CELEBA_VERSION}. Install tensorflow-datasets 4.9.x.")
    else:
        manifest = synthetic.read_manifest(manual_dir)
        digest = _source_identity(source, manual_dir)["files"][:16]
        config = tfds.core.BuilderConfig(name=f"files_{digest}", description="jaxdp generated files")
        builder = _generated_builder_cls()(data_dir=os.fspath(data_dir), config=config, manifest=manifest)
    if builder.data_path.exists() and (builder.data_path / "dataset_info.json").exists():
        return builder  # prepared earlier (tfds renames the directory into place only when complete)
    if missing:
        raise FileNotFoundError(
            f"Missing CelebA file(s) {', '.join(missing)} in {manual_dir}. Put the five files of CelebA's "
            f"aligned release ({', '.join(synthetic.CELEBA_FILE_NAMES)}) in that directory (tfds's manual "
            f"directory; its default is <data_dir>/downloads/manual/, here data_dir={data_dir}), or pass "
            "manual_dir=... (config.data.manual_dir). They are at "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive 'Align&Cropped Images' and 'Anno', "
            "'Eval').")
    what = "generated" if source == "synthetic" else "CelebA"
    fix = ("generate the files again (delete the directory; jaxdp.data.load regenerates it)"
           if source == "synthetic" else "download it again")
    check_files(manual_dir, fix=fix)
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
    started = time.perf_counter()
    try:
        builder.download_and_prepare(download_dir=os.fspath(data_dir / "downloads"),
                                     download_config=download_config)
    except NonMatchingChecksumError as e:
        bad = [n for n in synthetic.CELEBA_FILE_NAMES if os.fspath(manual_dir / n) in str(e)] or ["a file"]
        expectation = ("the size and SHA-256 recorded in tfds's celeb_a checksums.tsv" if source == "celeba"
                       else f"the size and SHA-256 in {manual_dir / synthetic.MANIFEST_NAME}")
        raise ValueError(
            f"{manual_dir / bad[0]} does not match {expectation}: the file is corrupt, truncated or not the "
            f"original {what} file; {fix}. (tfds: {str(e).splitlines()[0]})") from e
    except (zipfile.BadZipFile, ValueError, KeyError, IndexError, OSError) as e:
        raise ValueError(
            f"Preparing the {what} files in {manual_dir} failed ({type(e).__name__}: {e}); a zip or text file "
            f"is corrupt or truncated (img_align_celeba.zip, list_attr_celeba.txt, ...); {fix}.") from e
    _log(f"prepared {builder.name} in {builder.data_path} ({time.perf_counter() - started:.1f} s)")
    return builder


def check_files(manual_dir: str | os.PathLike[str], *, fix: str = "download it again") -> int:
    """Checks the five files' formats (what tfds's celeb_a builder parses); returns the number of images.

    Catches truncated or corrupt files with a message naming the file, before tfds reads them (tfds then also
    checks each file's size and SHA-256). Takes about a second for the real files.
    """
    manual_dir = Path(manual_dir)

    def fail(name: str, problem: str) -> ValueError:
        return ValueError(f"{manual_dir / name} is corrupt or truncated ({problem}); {fix}.")

    def rows(name: str, header_lines: int, width: int) -> list[list[str]]:
        try:
            lines = (manual_dir / name).read_text().splitlines()
        except UnicodeDecodeError as e:
            raise fail(name, "not a text file") from e
        body = [line.split() for line in lines[header_lines:] if line.strip()]
        bad = next((k for k, r in enumerate(body) if len(r) != width), None)
        if bad is not None:
            raise fail(name, f"line {bad + header_lines + 1} has {len(body[bad])} fields, expected {width}")
        return body

    def counted(name: str, names: list[str]) -> list[list[str]]:
        lines = (manual_dir / name).read_text(errors="replace").splitlines()
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise fail(name, "the first line must be the number of images")
        if lines[1].split() != names:
            raise fail(name, f"the second line must list the {len(names)} column names")
        body = rows(name, 2, len(names) + 1)
        if len(body) != int(lines[0]):
            raise fail(name, f"{len(body)} rows, but the first line says {int(lines[0])}")
        return body

    attributes = counted(synthetic.ATTR_NAME, synthetic.ATTRIBUTE_NAMES)
    if any(v not in ("1", "-1") for r in attributes for v in r[1:]):
        raise fail(synthetic.ATTR_NAME, "attribute values must be 1 or -1")
    landmarks = counted(synthetic.LANDMARKS_NAME, synthetic.LANDMARK_NAMES)
    partition = rows(synthetic.PARTITION_NAME, 0, 2)
    if any(r[1] not in ("0", "1", "2") for r in partition):
        raise fail(synthetic.PARTITION_NAME, "partitions must be 0, 1 or 2")
    identity = rows(synthetic.IDENTITY_NAME, 0, 2)
    n = len(attributes)
    for name, body in ((synthetic.LANDMARKS_NAME, landmarks), (synthetic.PARTITION_NAME, partition),
                       (synthetic.IDENTITY_NAME, identity)):
        if len(body) != n:
            raise fail(name, f"{len(body)} images listed, but {synthetic.ATTR_NAME} lists {n}")
    try:
        with zipfile.ZipFile(manual_dir / synthetic.ZIP_NAME) as archive:
            images = sum(1 for name in archive.namelist() if name.endswith(".jpg"))
    except (zipfile.BadZipFile, OSError) as e:
        raise fail(synthetic.ZIP_NAME, f"not a readable zip archive: {e}") from e
    if images != n:
        raise fail(synthetic.ZIP_NAME, f"{images} JPEGs, but {synthetic.ATTR_NAME} lists {n} images")
    return n


# ----------------------------------------------------------------------------------------------------------
# Reading, selecting, decoding.

@dataclass(frozen=True)
class _Pool:
    ids: np.ndarray  # tfds_id strings (shard and position), sorted
    group: np.ndarray
    label: np.ndarray
    jpegs: np.ndarray  # the encoded images, in the order of ids


def _read_pools(builder: Any) -> dict[str, _Pool]:
    """Reads each split once: ids, Male, Smiling and the still-encoded JPEG (nothing else is parsed)."""
    import tensorflow_datasets as tfds

    decoders = tfds.decode.PartialDecoding(
        {"image": True, "attributes": {"Male": True, "Smiling": True}},
        decoders={"image": tfds.decode.SkipDecoding()})
    pools = {}
    for split in _PARTITIONS:
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                read_config=tfds.ReadConfig(add_tfds_id=True))
        ds = ds.map(lambda ex: (ex["tfds_id"], ex["attributes"]["Male"], ex["attributes"]["Smiling"],
                                ex["image"])).batch(4096)
        parts: list[list[np.ndarray]] = [[], [], [], []]
        for batch in ds.as_numpy_iterator():
            for part, value in zip(parts, batch, strict=True):
                part.append(value)
        ids, male, smiling, jpegs = (np.concatenate(p) if p else np.zeros(0) for p in parts)
        order = np.argsort(ids, kind="stable")  # a fixed order, whatever order tfds reads in
        pools[split] = _Pool(ids=ids[order], group=male[order].astype(np.int32),
                             label=smiling[order].astype(np.int32), jpegs=jpegs[order])
    return pools


def _select(pools: dict[str, _Pool], plan: SubsetPlan, split_scheme: str, seed: int, female_fraction: float,
            total: int, test_fraction: float, source: str) -> tuple[list[tuple], list[tuple]]:
    """Chooses (id, group, label) triples for train and test; errors if a cell asks more than its pool has."""
    def cell_pool(splits: tuple[str, ...], cell: Cell) -> list[tuple]:
        out = []
        for split in splits:
            pool = pools[split]
            take = (pool.group == cell[0]) & (pool.label == cell[1])
            out += [(i, cell[0], cell[1]) for i in pool.ids[take]]
        return out

    if split_scheme == "paper":
        needs = {c: ("all partitions", plan.train[c] + plan.test[c]) for c in CELLS}
    else:
        needs = {c: ("the train partition", plan.train[c]) for c in CELLS}
    test_needs = {c: ("the test partition", plan.test[c]) for c in CELLS}

    def check(need: dict, sizes: dict) -> None:
        for c, (where, n) in need.items():
            if n > sizes[c]:
                largest = _largest_total(pools, female_fraction, split_scheme, test_fraction, total)
                what = "generated data" if source == "synthetic" else "CelebA"
                advice = (f"the largest total this pool supports at female_fraction={female_fraction} is "
                          f"{largest}" if largest else "no total works with this pool at this female_fraction")
                raise ValueError(
                    f"female_fraction={female_fraction}, total={total}, split_scheme={split_scheme!r} needs {n} "
                    f"{CELL_NAMES[c]} from {where} of the {what}, which has only {sizes[c]}; {advice}"
                    + (" (or generate more images: synthetic_num_images)." if source == "synthetic" else "."))

    rng = np.random.default_rng([seed, 1])
    train, test = [], []
    if split_scheme == "paper":
        available = {c: cell_pool(tuple(_PARTITIONS), c) for c in CELLS}
        check(needs, {c: len(v) for c, v in available.items()})
        for c in CELLS:
            chosen = rng.choice(len(available[c]), size=plan.train[c] + plan.test[c], replace=False)
            picked = [available[c][k] for k in chosen]  # in random order: the first ones go to test
            test += picked[:plan.test[c]]
            train += picked[plan.test[c]:]
    else:
        available = {c: cell_pool(("train",), c) for c in CELLS}
        available_test = {c: cell_pool(("test",), c) for c in CELLS}
        check(needs, {c: len(v) for c, v in available.items()})
        check(test_needs, {c: len(v) for c, v in available_test.items()})
        # The test set gets its own stream, so it depends on (seed, total, test_fraction) only: the same images
        # at every female fraction, and accuracy across imbalance levels is compared on one test set.
        test_rng = np.random.default_rng([seed, 3])
        for c in CELLS:
            train += [available[c][k] for k in rng.choice(len(available[c]), plan.train[c], replace=False)]
            test += [available_test[c][k] for k in test_rng.choice(len(available_test[c]), plan.test[c],
                                                                   replace=False)]
    return train, test


def _pool_sizes(pools: dict[str, _Pool], splits: tuple[str, ...]) -> dict[Cell, int]:
    return {c: sum(int(np.sum((pools[s].group == c[0]) & (pools[s].label == c[1]))) for s in splits)
            for c in CELLS}


def _largest_total(pools: dict[str, _Pool], female_fraction: float, split_scheme: str, test_fraction: float,
                   upto: int) -> int:
    """The largest total <= upto whose cells all fit their pools (0 if none); cell sizes grow with the total."""
    if split_scheme == "paper":
        all_sizes = _pool_sizes(pools, tuple(_PARTITIONS))
    else:
        train_sizes, test_sizes = _pool_sizes(pools, ("train",)), _pool_sizes(pools, ("test",))

    def fits(t: int) -> bool:
        plan = _plan(t, female_fraction, split_scheme, test_fraction)
        if min(plan.train.values()) < 1:
            return False
        if split_scheme == "paper":
            return all(plan.train[c] + plan.test[c] <= all_sizes[c] for c in CELLS)
        return all(plan.train[c] <= train_sizes[c] and plan.test[c] <= test_sizes[c] for c in CELLS)

    low, high = _smallest_total(female_fraction, split_scheme, test_fraction), upto
    if low > high or not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


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


def _assemble(chosen: list[tuple], images: dict[bytes, np.ndarray], rng: np.random.Generator) -> GroupedSplit:
    order = rng.permutation(len(chosen))
    chosen = [chosen[k] for k in order]
    return GroupedSplit(
        images=np.stack([images[c[0]] for c in chosen]),
        label=np.array([c[2] for c in chosen], dtype=np.int32),
        group=np.array([c[1] for c in chosen], dtype=np.int32))


# ----------------------------------------------------------------------------------------------------------
# Cache and locking.

def _load_cache(path: Path, key: str) -> tuple[GroupedSplit, GroupedSplit] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            splits = tuple(GroupedSplit(images=f[f"{s}_images"], label=f[f"{s}_label"], group=f[f"{s}_group"])
                           for s in ("train", "test"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        _log(f"ignoring unreadable cache file {path} ({type(e).__name__}); rebuilding it")
        return None
    return splits  # type: ignore[return-value]


def _save_cache(path: Path, key: str, settings: dict, train: GroupedSplit, test: GroupedSplit) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, "wb") as f:
        np.savez(f, key=np.array(key), settings=np.array(json.dumps(settings)),
                 **{f"{name}_{field}": getattr(split, field)
                    for name, split in (("train", train), ("test", test))
                    for field in ("images", "label", "group")})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so parallel runs of a sweep prepare the data once."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log(message: str) -> None:
    from absl import logging

    logging.info("jaxdp.data: %s", message)
