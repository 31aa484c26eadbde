"""The tfds side of the CelebA sources (:mod:`jaxdp.data.celeba`): the five files, their identity and checks, the
tfds ``celeb_a`` builders that prepare them, reading the prepared splits, and keeping tfds's log noise out.

Everything here that imports ``tensorflow_datasets`` or TensorFlow does so inside a function, so that loading a
cached subset (:func:`jaxdp.data.celeba.build_imbalanced`) imports neither. The rules for real and generated files
(checksums from tfds or from the generator's manifest) are in :mod:`jaxdp.data.celeba`'s docstring.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxdp.data import synthetic
from jaxdp.data.core import DEFAULT_GROUP_ATTRIBUTE, DEFAULT_LABEL_ATTRIBUTE, DataUnavailable
from jaxdp.data.subsets import PARTITIONS

CELEBA_VERSION = "2.1.0"  # the tfds celeb_a builder version this module was written against


# ----------------------------------------------------------------------------------------------------------
# Source identity, availability and the tfds builders.

_SYNTHETIC_HINT = ("Or run the same study on generated CelebA-format data, no download needed: "
                   "--config.data.source=synthetic.")


def _missing_files_message(missing: list[str], manual_dir: Path, data_dir: Path) -> str:
    return (f"Missing CelebA file(s) {', '.join(missing)} in {manual_dir}. Put the five files of CelebA's aligned "
            f"release ({', '.join(synthetic.CELEBA_FILE_NAMES)}) in that directory (tfds's manual directory; its "
            f"default is <data_dir>/downloads/manual/, here data_dir={data_dir}), or pass manual_dir=... "
            "(config.data.manual_dir). They are at https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google "
            f"Drive 'Align&Cropped Images' and 'Anno', 'Eval'). {_SYNTHETIC_HINT}")


def _tfds_data_path(data_dir: Path) -> Path:
    """Where tfds keeps the prepared real CelebA (its builder's ``data_path``), without importing tfds."""
    return data_dir / "celeb_a" / CELEBA_VERSION


def _registered_sizes() -> dict[str, int]:
    """{file name: size in bytes} from tfds's celeb_a checksums.tsv (read as text: tfds is not imported)."""
    sizes = {}
    for line in _real_checksums_path().read_text().splitlines():
        fields = line.split("\t")
        if len(fields) == 4:
            sizes[fields[3]] = int(fields[1])
    return sizes


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
    """The tfds builder of ``source``'s files, prepared (once) from ``manual_dir``; call under `_quiet_tfds`."""
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
        raise DataUnavailable(_missing_files_message(missing, manual_dir, data_dir))
    what = "generated" if source == "synthetic" else "CelebA"
    fix = ("generate the files again (delete the directory; jaxdp.data.load regenerates it)"
           if source == "synthetic" else "download it again")
    check_files(manual_dir, fix=fix)
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
    started = time.perf_counter()
    _log(f"preparing the {what} files in {manual_dir} for tfds (once; a minute or two on a CPU) ...")
    tfds.display_progress_bar(False)  # its download bars would show a "download" of local files; one line instead
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


def _prepared_path(source: str, data_dir: Path, manual_dir: Path) -> Path:
    """The folder where tfds keeps ``source``'s prepared copy (its builder's ``data_path``), without building it."""
    if source == "celeba":
        return _tfds_data_path(data_dir)
    digest = _source_identity(source, manual_dir)["files"][:16]
    return data_dir / "celeb_a_generated" / f"files_{digest}" / CELEBA_VERSION


def _is_damage(error: BaseException) -> bool:
    """Whether ``error`` says the prepared copy is damaged (a truncated or corrupt record, a missing shard, an
    unreadable dataset_info.json), as opposed to a bug or a setting."""
    if isinstance(error, json.JSONDecodeError):
        return True
    import tensorflow as tf
    from google.protobuf import json_format

    return isinstance(error, json_format.ParseError | tf.errors.DataLossError | tf.errors.NotFoundError
                      | tf.errors.InvalidArgumentError)


def _damaged_prepared_message(path: Path, manual_dir: Path, error: BaseException) -> str:
    detail = " ".join(str(error).split())[:200]
    return (f"The prepared copy of the data in {path} is damaged ({type(error).__name__}: {detail}) and the source "
            f"files to prepare it again are not all in {manual_dir}. Put the five files back in {manual_dir} (or "
            f"point config.data.manual_dir at them) and delete {path}: it is prepared again on the next run.")


def _prepared_pools(source: str, data_dir: Path, manual_dir: Path, label_attribute: str,
                    group_attribute: str) -> dict[str, _Pool]:
    """:func:`_read_pools` of the prepared builder. A damaged prepared copy (tfds's folder under ``data_dir``) is
    deleted and prepared again from the source files when they are all in ``manual_dir`` (it is derived from
    them); otherwise :class:`DataUnavailable` names the folder and says what to do. Call under the data lock."""
    for attempt in range(2):
        try:
            return _read_pools(_prepared_builder(source, data_dir, manual_dir), label_attribute, group_attribute)
        except Exception as error:
            if not _is_damage(error):
                raise
            path = _prepared_path(source, data_dir, manual_dir)
            sources = all((manual_dir / n).is_file() for n in synthetic.CELEBA_FILE_NAMES)
            if attempt or not sources or not path.is_dir():
                raise DataUnavailable(_damaged_prepared_message(path, manual_dir, error)) from None
            from absl import logging as absl_logging

            absl_logging.warning("jaxdp.data: the prepared copy in %s is damaged (%s); deleting it and preparing it "
                                 "again from %s", path, type(error).__name__, manual_dir)
            shutil.rmtree(path)
    raise AssertionError("unreachable")


def check_files(manual_dir: str | os.PathLike[str], *, fix: str = "download it again") -> int:
    """Checks the five files' formats (what tfds's celeb_a builder parses); returns the number of images.

    Catches truncated or corrupt files with a message naming the file, before tfds reads them (tfds then also
    checks each file's size and SHA-256). Reads the text files and the zip's directory; no image is decoded.
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
# Quiet tfds.

# Log records from inside tfds that a jaxdp user cannot act on (tfds's own use of deprecated APIs, and the
# custom builder configuration jaxdp itself uses for generated files).
_TFDS_NOISE = ("`FeatureConnector.dtype` is deprecated", "Using custom data configuration")


class _TfdsNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_TFDS_NOISE):
            return False
        # TensorFlow's deprecation notice for a call made by tfds: "From .../tensorflow_datasets/...py:102:
        # CounterV2 (from ...) is deprecated ...\nInstructions for updating: ..."
        caller = message.split(": ", 1)[0]
        return not (caller.startswith("From ") and "tensorflow_datasets" in caller
                    and "Instructions for updating" in message)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Drops `_TfdsNoise`'s records from the absl and TensorFlow loggers while tfds is called."""
    noise = _TfdsNoise()
    loggers = [logging.getLogger("absl"), logging.getLogger("tensorflow")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


# ----------------------------------------------------------------------------------------------------------
# Reading the prepared splits.

@dataclass(frozen=True)
class _Pool:
    ids: np.ndarray  # tfds_id strings (shard and position), sorted
    group: np.ndarray
    label: np.ndarray
    jpegs: np.ndarray | None  # the encoded images, in the order of ids


def _read_pools(builder: Any, label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
                group_attribute: str = DEFAULT_GROUP_ATTRIBUTE, *, with_images: bool = True) -> dict[str, _Pool]:
    """Reads each split once: ids, the two attributes and the still-encoded JPEG (nothing else is parsed)."""
    import tensorflow_datasets as tfds

    features: dict[str, Any] = {"attributes": {group_attribute: True, label_attribute: True}}
    if with_images:
        features["image"] = True
    decoders = tfds.decode.PartialDecoding(
        features, decoders={"image": tfds.decode.SkipDecoding()} if with_images else None)
    pools = {}
    for split in PARTITIONS:
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                read_config=tfds.ReadConfig(add_tfds_id=True))
        ds = ds.map(lambda ex: (ex["tfds_id"], ex["attributes"][group_attribute], ex["attributes"][label_attribute],
                                ex["image"] if with_images else ex["tfds_id"])).batch(4096)
        parts: list[list[np.ndarray]] = [[], [], [], []]
        for batch in ds.as_numpy_iterator():
            for part, value in zip(parts, batch, strict=True):
                part.append(value)
        ids, group, label, jpegs = (np.concatenate(p) if p else np.zeros(0) for p in parts)
        order = np.argsort(ids, kind="stable")  # a fixed order, whatever order tfds reads in
        pools[split] = _Pool(ids=ids[order], group=group[order].astype(np.int32),
                             label=label[order].astype(np.int32), jpegs=jpegs[order] if with_images else None)
    return pools


def _log(message: str) -> None:
    from absl import logging as absl_logging

    absl_logging.info("jaxdp.data: %s", message)
