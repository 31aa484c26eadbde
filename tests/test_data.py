"""Tests of jaxdp.data: the CelebA-format generator, the tfds path, exact imbalance, splits, cache, errors.

One set of 800 generated images (200 per female/male x smiling cell; per cell 160 train / 20 validation /
20 test partition) is written and prepared through the tfds builder once per session.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdp import data
from jaxdp.data import celeba, synthetic
from jaxdp.data.celeba import GroupedSplit, build_imbalanced, cell_counts, plan_counts

NUM_IMAGES = 800
SIZE = 16  # image_size used throughout: decoding stays cheap


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir whose downloads/manual holds 800 generated images, prepared through tfds."""
    data_dir = tmp_path_factory.mktemp("generated")
    synthetic.write_celeba_files(data_dir / "downloads" / "manual", NUM_IMAGES, seed=0)
    build(data_dir, female_fraction=0.9, total=200)  # prepares the tfds dataset once
    return data_dir


def build(data_dir: Path, **kwargs) -> tuple[GroupedSplit, GroupedSplit]:
    settings = dict(total=200, image_size=SIZE, data_dir=data_dir, source="synthetic") | kwargs
    return build_imbalanced(**settings)


def fingerprints(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def read_truth(manual: Path, label_attribute: str = "Smiling",
               group_attribute: str = "Male") -> dict[str, tuple[int, int, int]]:
    """image fingerprint at SIZE -> (partition, group, label), read straight from generated files."""
    lines = (manual / synthetic.ATTR_NAME).read_text().splitlines()
    names = lines[1].split()
    attrs = {r.split()[0]: dict(zip(names, map(int, r.split()[1:]), strict=True)) for r in lines[2:]}
    part = dict(line.split() for line in (manual / synthetic.PARTITION_NAME).read_text().splitlines())
    out = {}
    with zipfile.ZipFile(manual / synthetic.ZIP_NAME) as archive:
        for member in archive.namelist():
            if member.endswith(".jpg"):
                name = member.split("/")[-1]
                image = celeba._decode_image(archive.read(member), SIZE)
                out[fingerprints(image[None])[0]] = (
                    int(part[name]), int(attrs[name][group_attribute] > 0), int(attrs[name][label_attribute] > 0))
    return out


@pytest.fixture(scope="session")
def truth(generated: Path) -> dict[str, tuple[int, int, int]]:
    """image fingerprint at SIZE -> (partition, Male, Smiling), read straight from the generated files."""
    out = read_truth(generated / "downloads" / "manual")
    assert len(out) == NUM_IMAGES  # every generated image is distinct
    return out


# ----------------------------------------------------------------------------------------------------------
# Counting rules (no data needed).

@pytest.mark.parametrize("female_fraction, females, males", [
    (0.999, 29_970, 30), (0.99, 29_700, 300), (0.9, 27_000, 3_000), (0.8, 24_000, 6_000), (0.7, 21_000, 9_000)])
def test_paper_counts_at_30000(female_fraction: float, females: int, males: int) -> None:
    cells = cell_counts(30_000, female_fraction)
    assert cells == {(0, 0): females // 2, (0, 1): females // 2, (1, 0): males // 2, (1, 1): males // 2}
    plan = plan_counts(female_fraction=female_fraction, total=30_000)
    assert sum(plan.train.values()) == 24_000 and sum(plan.test.values()) == 6_000
    assert plan.test[1, 1] == males // 10  # 20% of each cell: 3 smiling males in test at 99.9%
    official = plan_counts(female_fraction=female_fraction, total=30_000, split_scheme="official")
    assert official.train == plan.train
    assert official.test == {(0, 0): 1500, (0, 1): 1500, (1, 0): 1500, (1, 1): 1500}


def test_rounding_rule_for_odd_and_half_counts() -> None:
    # 10 * 0.25 = 2.5 females -> 3 (half up); odd genders put the extra one in "not smiling".
    assert cell_counts(10, 0.25) == {(0, 0): 2, (0, 1): 1, (1, 0): 4, (1, 1): 3}
    # 0.999 is taken as the decimal 999/1000, not the float below it: 1500 * 0.999 = 1498.5 -> 1499.
    assert cell_counts(1500, 0.999) == {(0, 0): 750, (0, 1): 749, (1, 0): 1, (1, 1): 0}
    assert cell_counts(1501, 0.999) == {(0, 0): 750, (0, 1): 749, (1, 0): 1, (1, 1): 1}
    # Per-cell test counts: 1 of 1 smiling male -> round(0.2) = 0 to test, stays in train.
    plan = plan_counts(female_fraction=0.999, total=1501)
    assert plan.test == {(0, 0): 150, (0, 1): 150, (1, 0): 0, (1, 1): 0}
    assert plan.train == {(0, 0): 600, (0, 1): 599, (1, 0): 1, (1, 1): 1}


def test_too_small_total_names_the_smallest_that_works() -> None:
    with pytest.raises(ValueError, match=r"no training examples of non-smiling males or smiling males .* "
                                         r"use total >= 1501"):
        plan_counts(female_fraction=0.999, total=200)
    with pytest.raises(ValueError, match=r"no training examples of smiling males \(cells .* use total >= 1501"):
        plan_counts(female_fraction=0.999, total=1500)
    plan_counts(female_fraction=0.999, total=1501)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, 0.0, "0.7", None])
def test_female_fraction_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"female_fraction={bad!r} is out of range.*strictly between 0 and 1"):
        plan_counts(female_fraction=bad, total=200)


@pytest.mark.parametrize("setting, value, message", [
    ("test_fraction", 0.0, "test_fraction=0.0"), ("test_fraction", 1.0, "test_fraction=1.0"),
    ("split_scheme", "random", "split_scheme='random': use one of"), ("total", 2, "total=2"),
    ("image_size", 4, "image_size=4: use an integer side length from 8"), ("seed", -1, "seed=-1")])
def test_other_settings_out_of_range(tmp_path: Path, setting: str, value: object, message: str) -> None:
    kwargs = dict(female_fraction=0.9, total=200, data_dir=tmp_path, source="synthetic") | {setting: value}
    with pytest.raises(ValueError, match=message):
        build_imbalanced(**kwargs)
    assert not any(tmp_path.iterdir())  # validated before anything is written


# ----------------------------------------------------------------------------------------------------------
# The generated files.

def test_generated_file_formats(generated: Path) -> None:
    from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as tfds_celeb_a

    manual = generated / "downloads" / "manual"
    attr = (manual / synthetic.ATTR_NAME).read_text().splitlines()
    assert attr[0] == "800"
    assert attr[1].split() == tfds_celeb_a.ATTR_HEADINGS and len(attr[1].split()) == 40
    rows = [line.split() for line in attr[2:]]
    assert len(rows) == 800 and [r[0] for r in rows[:2]] == ["000001.jpg", "000002.jpg"]
    values = np.array([[int(v) for v in r[1:]] for r in rows])
    assert values.shape == (800, 40) and set(np.unique(values)) == {-1, 1}
    male = values[:, attr[1].split().index("Male")] > 0
    smiling = values[:, attr[1].split().index("Smiling")] > 0
    assert male.sum() == 400 and smiling[male].sum() == 200 and smiling[~male].sum() == 200
    partition = np.array([int(line.split()[1]) for line in (manual / synthetic.PARTITION_NAME).read_text()
                          .splitlines()])
    for g in (0, 1):
        for s in (0, 1):
            cell = partition[(male == g) & (smiling == s)]
            assert np.bincount(cell).tolist() == [160, 20, 20]  # 8:1:1 of each cell of 200
    marks = (manual / synthetic.LANDMARKS_NAME).read_text().splitlines()
    assert marks[0] == "800" and marks[1].split() == tfds_celeb_a.LANDMARK_HEADINGS
    assert all(len(line.split()) == 11 for line in marks[2:]) and len(marks) == 802
    identity = [line.split() for line in (manual / synthetic.IDENTITY_NAME).read_text().splitlines()]
    assert len(identity) == 800 and all(len(r) == 2 and int(r[1]) >= 1 for r in identity)
    with zipfile.ZipFile(manual / synthetic.ZIP_NAME) as archive:
        jpgs = [n for n in archive.namelist() if n.endswith(".jpg")]
        assert jpgs[0] == "img_align_celeba/000001.jpg" and len(jpgs) == 800
        for name in jpgs[:50]:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (178, 218))
    manifest = json.loads((manual / synthetic.MANIFEST_NAME).read_text())
    assert manifest["num_images"] == 800 and set(manifest["files"]) == set(synthetic.CELEBA_FILE_NAMES)
    assert celeba.check_files(manual) == 800


def test_generator_is_deterministic_in_seed(tmp_path: Path) -> None:
    a = synthetic.write_celeba_files(tmp_path / "a", 40, seed=3, workers=1)
    b = synthetic.write_celeba_files(tmp_path / "b", 40, seed=3, workers=2)
    c = synthetic.write_celeba_files(tmp_path / "c", 40, seed=4, workers=1)
    for name in synthetic.CELEBA_FILE_NAMES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a[synthetic.ZIP_NAME].read_bytes() != c[synthetic.ZIP_NAME].read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(ValueError, match="num_images=42: use a multiple of 4"):
        synthetic.write_celeba_files(tmp_path / "d", 42)


# ----------------------------------------------------------------------------------------------------------
# Subsets: exact counts, split schemes, labels matching images.

@pytest.mark.parametrize("female_fraction, males", [(0.7, 60), (0.8, 40), (0.9, 20), (0.99, 2)])
def test_exact_counts_every_level(generated: Path, female_fraction: float, males: int) -> None:
    train, test = build(generated, female_fraction=female_fraction)
    females = 200 - males
    cells = {(0, 0): females - females // 2, (0, 1): females // 2, (1, 0): males - males // 2,
             (1, 1): males // 2}
    expected_test = {c: int(n * 0.2 + 0.5) for c, n in cells.items()}
    assert test.counts() == expected_test
    assert train.counts() == {c: cells[c] - expected_test[c] for c in cells}
    assert len(train) + len(test) == 200
    assert train.images.shape == (len(train), SIZE, SIZE, 3) and train.images.dtype == np.uint8
    assert train.label.dtype == np.int32 and train.group.dtype == np.int32


def test_999_at_a_small_total_is_refused(generated: Path) -> None:
    # 200 * 0.999 = 199.8 -> 200 females, 0 males: the error names the smallest total that works.
    with pytest.raises(ValueError, match=r"female_fraction=0.999 with total=200 .* use total >= 1501"):
        build(generated, female_fraction=0.999)


def test_paper_scheme_composition_and_labels(generated: Path, truth: dict) -> None:
    train, test = build(generated, female_fraction=0.9, split_scheme="paper")
    assert train.counts() == {(0, 0): 72, (0, 1): 72, (1, 0): 8, (1, 1): 8}
    assert test.counts() == {(0, 0): 18, (0, 1): 18, (1, 0): 2, (1, 1): 2}
    train_fp, test_fp = fingerprints(train.images), fingerprints(test.images)
    assert not set(train_fp) & set(test_fp) and len(set(train_fp + test_fp)) == 200
    for split, fps in ((train, train_fp), (test, test_fp)):
        # every image carries its own Male and Smiling from list_attr_celeba.txt
        assert [truth[f][1:] for f in fps] == list(zip(split.group.tolist(), split.label.tolist(), strict=True))
    partitions = {truth[f][0] for f in train_fp + test_fp}
    assert partitions == {0, 1, 2}  # drawn from all of CelebA


def test_official_scheme_composition_and_partitions(generated: Path, truth: dict) -> None:
    train, test = build(generated, female_fraction=0.9, split_scheme="official")
    assert train.counts() == {(0, 0): 72, (0, 1): 72, (1, 0): 8, (1, 1): 8}  # as the paper scheme
    assert test.counts() == {(0, 0): 10, (0, 1): 10, (1, 0): 10, (1, 1): 10}  # balanced, same size 40
    for split, partition in ((train, 0), (test, 2)):
        fps = fingerprints(split.images)
        assert {truth[f][0] for f in fps} == {partition}
        assert [truth[f][1:] for f in fps] == list(zip(split.group.tolist(), split.label.tolist(), strict=True))


def test_official_test_set_is_the_same_at_every_female_fraction(generated: Path) -> None:
    # The imbalance comparison is paired: one seed, one test set, whatever the training data's composition.
    tests = [build(generated, female_fraction=ff, split_scheme="official", seed=4)[1] for ff in (0.6, 0.9, 0.95)]
    sets = [sorted(fingerprints(t.images)) for t in tests]
    assert sets[0] == sets[1] == sets[2] and len(set(sets[0])) == 40
    other = build(generated, female_fraction=0.9, split_scheme="official", seed=5)[1]
    assert sorted(fingerprints(other.images)) != sets[0]  # another seed, another test set


def test_pool_too_small_names_cell_pool_and_largest_total(generated: Path) -> None:
    # 0.99 of 405 -> 401 females -> 201 non-smiling females, but each cell has 200 images.
    with pytest.raises(ValueError, match=r"needs 201 non-smiling females from all partitions of the generated "
                                         r"data, which has only 200; the largest total .* is 404"):
        build(generated, female_fraction=0.99, total=405)
    # official, 0.7 of 407: 285 females -> 143 / 142; paper test counts 29 + 28 + 12 + 12 = 81 -> balanced test
    # of 81: 41 females -> 21 non-smiling, but the test partition holds 20 per cell. 406 gives 80: fits.
    with pytest.raises(ValueError, match=r"needs 21 non-smiling females from the test partition of the "
                                         r"generated data, which has only 20; the largest total .* is 406"):
        build(generated, female_fraction=0.7, total=407, split_scheme="official")


def test_seed_determinism_and_difference(generated: Path) -> None:
    train, test = build(generated, female_fraction=0.8, seed=11)
    for path in (generated / "jaxdp_subsets").glob("*-s11-*"):
        path.unlink()  # rebuild from scratch, not from the cache
    train2, test2 = build(generated, female_fraction=0.8, seed=11)
    for a, b in ((train, train2), (test, test2)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.group, b.group)
    other, _ = build(generated, female_fraction=0.8, seed=12)
    assert other.counts() == train.counts()
    assert set(fingerprints(other.images)) != set(fingerprints(train.images))


# ----------------------------------------------------------------------------------------------------------
# The cache.

@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = celeba._decode_image

    def counting(jpeg: bytes, image_size: int) -> np.ndarray:
        calls[0] += 1
        return real(jpeg, image_size)

    monkeypatch.setattr(celeba, "_decode_image", counting)
    return calls


def test_cache_hit_decodes_nothing_and_every_setting_misses(generated: Path, decode_counter: list[int]) -> None:
    base = dict(female_fraction=0.7, total=120, split_scheme="paper", test_fraction=0.25, seed=5,
                image_size=SIZE)
    first = build(generated, **base)
    assert decode_counter[0] == 120
    again = build(generated, **base)
    assert decode_counter[0] == 120  # hit: nothing decoded
    np.testing.assert_array_equal(first[0].images, again[0].images)
    changes = dict(female_fraction=0.8, total=124, split_scheme="official", test_fraction=0.2, seed=6,
                   image_size=SIZE + 4)
    for setting, value in changes.items():
        before = decode_counter[0]
        train, test = build(generated, **(base | {setting: value}))
        assert decode_counter[0] - before == len(train) + len(test), setting  # miss: all decoded afresh
    assert len(list((generated / "jaxdp_subsets").glob("*.npz"))) >= 7
    assert not list((generated / "jaxdp_subsets").glob("*.tmp"))


def test_cache_is_keyed_by_the_source_files(generated: Path, tmp_path: Path, decode_counter: list[int]) -> None:
    # Same settings and same data_dir, different generated files: a miss, and a different dataset.
    other_manual = tmp_path / "manual"
    synthetic.write_celeba_files(other_manual, 200, seed=1)
    settings = dict(female_fraction=0.7, total=40, seed=0)
    a, _ = build(generated, **settings)
    before = decode_counter[0]
    b, _ = build(generated, manual_dir=other_manual, **settings)
    assert decode_counter[0] - before == 40
    assert set(fingerprints(a.images)) != set(fingerprints(b.images))


def test_crash_while_writing_the_cache_leaves_nothing(generated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(file, **arrays) -> None:
        file.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(celeba.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        build(generated, female_fraction=0.7, total=40, seed=31)
    assert not [p for p in (generated / "jaxdp_subsets").iterdir() if "-s31-" in p.name]


def test_stale_or_unreadable_cache_file_is_rebuilt(generated: Path, decode_counter: list[int]) -> None:
    build(generated, female_fraction=0.7, total=40, seed=21)
    (path,) = (generated / "jaxdp_subsets").glob("*-s21-*.npz")
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    before = decode_counter[0]
    train, test = build(generated, female_fraction=0.7, total=40, seed=21)
    assert decode_counter[0] - before == 40 and len(train) + len(test) == 40


@pytest.mark.slow  # a fresh interpreter importing jax: ~5 s
def test_cache_hit_does_not_import_tensorflow(generated: Path) -> None:
    build(generated, female_fraction=0.9, total=200)
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from jaxdp.data import celeba\n"
        f"train, test = celeba.build_imbalanced(female_fraction=0.9, total=200, image_size={SIZE}, "
        f"data_dir={str(generated)!r}, source='synthetic')\n"
        "assert len(train) == 160, len(train)\n"
        "print('tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip().splitlines()[-1] == "False"


# ----------------------------------------------------------------------------------------------------------
# Missing and damaged files; the real builder's checksums.

def copy_manual(generated: Path, destination: Path, without_manifest: bool = False) -> Path:
    manual = destination / "downloads" / "manual"
    shutil.copytree(generated / "downloads" / "manual", manual)
    if without_manifest:
        (manual / synthetic.MANIFEST_NAME).unlink()
    return manual


def assert_nothing_half_prepared(data_dir: Path) -> None:
    leftovers = [p for p in data_dir.rglob("*") if "incomplete" in p.name or p.name == "2.1.0"]
    assert leftovers == []
    assert not (data_dir / "jaxdp_subsets").exists() or not any((data_dir / "jaxdp_subsets").iterdir())


def test_missing_files_are_listed_with_the_directory(generated: Path, tmp_path: Path) -> None:
    manual = copy_manual(generated, tmp_path, without_manifest=True)
    (manual / synthetic.ZIP_NAME).unlink()
    (manual / synthetic.IDENTITY_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=(
            rf"Missing CelebA file\(s\) img_align_celeba.zip, identity_CelebA.txt in {manual}\..*"
            r"default is <data_dir>/downloads/manual/")):
        build_imbalanced(female_fraction=0.9, total=200, data_dir=tmp_path, source="celeba")
    assert_nothing_half_prepared(tmp_path)


def test_generated_source_without_manifest_says_how_to_generate(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No generated CelebA files in .*write_celeba_files"):
        build_imbalanced(female_fraction=0.9, total=200, data_dir=tmp_path, source="synthetic")


def test_real_builder_rejects_generated_files(generated: Path, tmp_path: Path) -> None:
    # Well-formed CelebA-format files, but not the real ones: tfds's registered checksums reject them.
    copy_manual(generated, tmp_path, without_manifest=True)
    with pytest.raises(ValueError, match=r"does not match the size and SHA-256 recorded in tfds's celeb_a "
                                         r"checksums.tsv.*download it again"):
        build_imbalanced(female_fraction=0.9, total=200, data_dir=tmp_path, source="celeba")
    assert_nothing_half_prepared(tmp_path)


def test_generated_files_use_the_real_builders_urls_and_file_names() -> None:
    import tensorflow_datasets as tfds

    registered = tfds.builder_cls("celeb_a").url_infos  # tfds's own checksums.tsv, as the real path uses
    assert {url: info.filename for url, info in registered.items()} == {
        url: name for name, url in synthetic.FILE_URLS.items()}
    assert registered[synthetic.FILE_URLS[synthetic.ZIP_NAME]].size == 1_443_490_838


def test_truncated_zip_is_named(generated: Path, tmp_path: Path) -> None:
    manual = copy_manual(generated, tmp_path)
    zip_path = manual / synthetic.ZIP_NAME
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{zip_path} is corrupt or truncated .*generate the files again"):
        build(tmp_path, female_fraction=0.9)
    assert_nothing_half_prepared(tmp_path)


def test_truncated_attribute_file_is_named(generated: Path, tmp_path: Path) -> None:
    manual = copy_manual(generated, tmp_path)
    attr = manual / synthetic.ATTR_NAME
    attr.write_text(attr.read_text()[:5000])
    with pytest.raises(ValueError, match=rf"{attr} is corrupt or truncated \(line \d+ has \d+ fields"):
        build(tmp_path, female_fraction=0.9)
    assert_nothing_half_prepared(tmp_path)


def test_tampered_file_fails_the_manifest_checksum(generated: Path, tmp_path: Path) -> None:
    # Same format, one value flipped: only the SHA-256 recorded by the generator catches it.
    manual = copy_manual(generated, tmp_path)
    attr = manual / synthetic.ATTR_NAME
    text = attr.read_text()
    attr.write_text(text.replace("000001.jpg -1", "000001.jpg  1", 1) if "000001.jpg -1" in text
                    else text.replace("000001.jpg  1", "000001.jpg -1", 1))
    with pytest.raises(ValueError, match=rf"{attr} does not match the size and SHA-256 in .*jaxdp_generated"):
        build(tmp_path, female_fraction=0.9)
    assert_nothing_half_prepared(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# load(config.data) and GroupedSplit.

def test_load_synthetic_reuses_complete_files(generated: Path) -> None:
    from jaxdp.config import base_config

    config = base_config()
    config.data.source = "synthetic"
    config.data.synthetic_num_images = NUM_IMAGES
    config.data.data_dir = str(generated)
    config.data.female_fraction = 0.9
    config.data.total = 200
    config.data.image_size = SIZE
    zip_path = generated / "downloads" / "manual" / synthetic.ZIP_NAME
    mtime = zip_path.stat().st_mtime_ns
    train, test = celeba.load(config.data)
    assert zip_path.stat().st_mtime_ns == mtime  # not regenerated
    direct = build(generated, female_fraction=0.9)
    np.testing.assert_array_equal(train.images, direct[0].images)
    assert test.counts() == direct[1].counts()
    config.data.source = "imagenet"
    with pytest.raises(ValueError, match="config.data.source='imagenet': use 'celeba'"):
        celeba.load(config.data)


def test_generator_refuses_to_overwrite_foreign_files(generated: Path, tmp_path: Path) -> None:
    manual = copy_manual(generated, tmp_path, without_manifest=True)
    with pytest.raises(FileExistsError, match="not written by the generator"):
        celeba.ensure_generated(manual, 40)


def test_grouped_split_checks_and_summaries() -> None:
    split = GroupedSplit(images=np.zeros((3, 4, 4, 3), np.uint8), label=np.array([1, 0, 1], np.int32),
                         group=np.array([0, 1, 1], np.int32))
    assert len(split) == 3
    assert split.counts() == {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 1}
    assert split.describe() == "3 images 4x4: females 1 smiling / 0 not, males 1 smiling / 1 not"
    with pytest.raises(ValueError, match="label must be int32"):
        GroupedSplit(images=split.images, label=np.array([1, 0, 1]), group=split.group)


# ----------------------------------------------------------------------------------------------------------
# Sources in a registry.

def data_config(**overrides):
    from jaxdp.config import base_config

    config = base_config()
    for key, value in overrides.items():
        setattr(config.data, key, value)
    return config.data


def generated_config(generated: Path, **overrides):
    settings = dict(source="synthetic", synthetic_num_images=NUM_IMAGES, data_dir=str(generated),
                    female_fraction=0.9, total=200, image_size=SIZE)
    return data_config(**(settings | overrides))


class TinySource(data.DataSource):
    """A registered toy source: 2 training and 2 test images."""

    def load_splits(self, data_config, holdout_per_group):
        def split(values: list[int]) -> GroupedSplit:
            n = len(values)
            return GroupedSplit(images=np.full((n, 4, 4, 3), 7, np.uint8), label=np.array(values, np.int32),
                                group=np.array(values[::-1], np.int32))

        return data.Splits(split([0, 1]), split([1, 0]), None)


def test_sources_are_registered_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxdp.data import core

    assert data.available_sources()[:2] == ("celeba", "synthetic")
    assert isinstance(data.get_source("synthetic"), celeba.GeneratedSource)
    monkeypatch.setattr(core, "_SOURCES", dict(core._SOURCES))  # registrations end with the test
    data.register_source("tiny", TinySource())
    assert "tiny" in data.available_sources()
    train, test = data.load({"source": "tiny"})
    assert train.label.tolist() == [0, 1] and test.label.tolist() == [1, 0]
    assert data.group_names({"source": "tiny", "group_attribute": "Young"}) == ("not Young", "Young")
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        data.register_source("tiny", TinySource())
    with pytest.raises(NotImplementedError, match="TinySource provides no held-out examples"):
        data.load_splits({"source": "tiny"}, holdout_per_group=2)
    with pytest.raises(ValueError, match=r"config.data.source='imagenet': use 'celeba' or 'synthetic' or 'adult' or "
                                         r"'adult_synthetic' or 'tiny' \(the registered data sources"):
        data.load({"source": "imagenet"})
    from jaxdp.config import base_config, validate_run_config

    config = base_config()
    config.data.source = "tiny"
    validate_run_config(config)  # the config schema accepts every registered name
    config.data.source = "imagenet"
    with pytest.raises(ValueError, match="choose one of 'celeba', 'synthetic', 'adult', 'adult_synthetic', 'tiny'"):
        validate_run_config(config)


@pytest.mark.slow  # a fresh interpreter importing jax: ~5 s
def test_names_checks_and_capacity_do_not_import_tensorflow(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from jaxdp.config import base_config, validate_run_config\n"
        "from jaxdp import data\n"
        "c = base_config(); validate_run_config(c)\n"
        f"c.data.data_dir = {str(tmp_path)!r}\n"
        "try:\n"
        "    data.check_available(c.data)\n"
        "except data.DataUnavailable:\n"
        "    pass\n"
        "c.data.source = 'synthetic'; c.data.total = 200\n"
        "data.check_available(c.data)\n"
        "print(data.available_sources(), data.holdout_capacity(c.data), data.group_names(c.data))\n"
        "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    lines = out.stdout.strip().splitlines()
    # 4,000 generated images: cells of 1,000, 800 / 100 / 100 per partition; total 200 at 70%: 70 / 70 / 30 / 30.
    assert lines[-2] == "('celeba', 'synthetic', 'adult', 'adult_synthetic') {0: 1860, 1: 1940} ('female', 'male')"
    assert lines[-1] == "False False"
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------
# Checking data before a run.

def test_missing_celeba_is_reported_before_anything_runs(tmp_path: Path) -> None:
    config = data_config(data_dir=str(tmp_path))
    with pytest.raises(data.DataUnavailable) as raised:
        data.check_available(config)
    message = str(raised.value)
    manual = tmp_path / "downloads" / "manual"
    assert f"in {manual}." in message
    for name in ("img_align_celeba.zip", "list_attr_celeba.txt", "list_eval_partition.txt",
                 "list_landmarks_align_celeba.txt", "identity_CelebA.txt"):
        assert name in message
    assert "--config.data.source=synthetic" in message
    assert isinstance(raised.value, FileNotFoundError)
    assert not any(tmp_path.iterdir())  # nothing created
    # The same message when loading goes ahead anyway.
    with pytest.raises(data.DataUnavailable, match="--config.data.source=synthetic"):
        data.load(config)


def test_celeba_files_of_the_wrong_size_are_unavailable(generated: Path, tmp_path: Path) -> None:
    manual = copy_manual(generated, tmp_path, without_manifest=True)  # CelebA's formats, not CelebA's files
    with pytest.raises(data.DataUnavailable, match=rf"wrong size in {manual}: img_align_celeba.zip is [\d,]+ bytes "
                                                   r"\(CelebA's: 1,443,490,838\), .*--config.data.source=synthetic"):
        data.check_available(data_config(data_dir=str(tmp_path)))


def test_prepared_celeba_is_available_without_the_files(tmp_path: Path) -> None:
    info = tmp_path / "celeb_a" / "2.1.0" / "dataset_info.json"  # what tfds leaves once it has prepared CelebA
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    data.check_available(data_config(data_dir=str(tmp_path)))


def test_generated_data_is_always_available(tmp_path: Path) -> None:
    data.check_available(data_config(source="synthetic", data_dir=str(tmp_path / "new")))
    assert not any(tmp_path.iterdir())  # generated on first use, not by the check
    with pytest.raises(ValueError, match="female_fraction=1.5 is out of range"):
        data.check_available(data_config(source="synthetic", female_fraction=1.5))
    with pytest.raises(ValueError, match="num_images=42: use a multiple of 4"):
        data.check_available(data_config(source="synthetic", synthetic_num_images=42))


# ----------------------------------------------------------------------------------------------------------
# TensorFlow's noise.

def test_noise_filter_drops_exactly_tfds_deprecations() -> None:
    import logging

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    noise = celeba._TfdsNoise()
    dropped = [
        record("absl", "`FeatureConnector.dtype` is deprecated. Please change your code to use NumPy"),
        record("absl", "Using custom data configuration: BuilderConfig(name='files_53d48eb406247fae')"),
        record("tensorflow", "From /site-packages/tensorflow_datasets/core/reader.py:102: CounterV2 (from "
                             "tensorflow.python.data.experimental.ops.counter) is deprecated and will be removed "
                             "in a future version.\nInstructions for updating:\nUse `tf.data.Dataset.counter(...)`"),
    ]
    kept = [
        record("absl", "Dataset celeb_a is corrupt"),
        record("tensorflow", "From /home/me/train.py:3: foo (from tensorflow.x) is deprecated and will be removed "
                             "in a future version.\nInstructions for updating:\nUse bar"),
        record("tensorflow", "5 out of the last 5 calls triggered tf.function retracing"),
    ]
    assert [noise.filter(r) for r in dropped] == [False, False, False]
    assert [noise.filter(r) for r in kept] == [True, True, True]


@pytest.mark.slow  # a fresh interpreter importing TensorFlow, preparing and reading 40 images: ~15 s
def test_loading_prints_no_tfds_deprecation_noise(tmp_path: Path) -> None:
    code = (
        "from absl import logging\n"
        "from jaxdp.data import celeba, synthetic\n"
        f"synthetic.write_celeba_files({str(tmp_path / 'downloads' / 'manual')!r}, 40, workers=1)\n"
        f"train, test = celeba.build_imbalanced(female_fraction=0.5, total=20, image_size={SIZE}, "
        f"data_dir={str(tmp_path)!r}, source='synthetic')\n"
        "assert len(train) + len(test) == 20\n"
        "logging.warning('a warning after loading still shows')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    for noise in ("FeatureConnector.dtype", "CounterV2", "Instructions for updating",
                  "Using custom data configuration"):
        assert noise not in out.stderr + out.stdout, noise
    assert "a warning after loading still shows" in out.stderr


# ----------------------------------------------------------------------------------------------------------
# Label and group attributes.

# Computed with main's code at 4aca0b8 (before attributes, holdouts and the registry): SHA-256 of the images,
# labels and groups of build_imbalanced(total=200, image_size=16) on the session's 800 generated images, and the
# generator's file checksums. The default path must reproduce them exactly (the demo's numbers depend on it).
MAIN_FILE_SHA256 = {"img_align_celeba.zip": "860bf65f764499d0", "list_eval_partition.txt": "fe2d4cbf9f610fec",
                    "list_landmarks_align_celeba.txt": "7b77f0c191c99ac5",
                    "list_attr_celeba.txt": "f54a8b3b0a0e1e0c", "identity_CelebA.txt": "5b6bf228ff305f58"}
MAIN_SPLIT_SHA256 = {
    ("paper", 0.9, 0): ("e90db97886807141c9c12407ae700826", "253bbfee567f17755955a0921b0eb2b1"),
    ("paper", 0.7, 3): ("7224d60cdfecae50c728ba22c6708f23", "711494df0e52fef89af7efd9758756a4"),
    ("official", 0.9, 0): ("e65dc92730683402a5770cf9e32f8dc3", "b117ea137761ee17e857fb95f2e2b36e"),
    ("official", 0.7, 3): ("b39d0bfef3840f92c1fd8d83d8d738f0", "e838148282d266284fd3567635eb6de8"),
}


def split_sha256(split: GroupedSplit) -> str:
    digest = hashlib.sha256()
    for array in (split.images, split.label, split.group):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def test_default_attributes_give_mains_data_bit_for_bit(generated: Path) -> None:
    manifest = json.loads((generated / "downloads" / "manual" / synthetic.MANIFEST_NAME).read_text())
    assert {name: info["sha256"][:16] for name, info in manifest["files"].items()} == MAIN_FILE_SHA256
    for (scheme, female_fraction, seed), expected in MAIN_SPLIT_SHA256.items():
        for path in (generated / "jaxdp_subsets").glob(f"*-f{female_fraction}-n200-{scheme}-t0.2-s{seed}-*"):
            path.unlink()  # built by this code, not read from a cache
        train, test = build(generated, female_fraction=female_fraction, split_scheme=scheme, seed=seed)
        assert (split_sha256(train), split_sha256(test)) == expected, (scheme, female_fraction, seed)
        loaded = data.load(generated_config(generated, female_fraction=female_fraction, split_scheme=scheme,
                                            seed=seed))
        assert tuple(map(split_sha256, loaded)) == expected


def test_group_names_follow_the_group_attribute() -> None:
    assert data.group_names(data_config()) == ("female", "male")
    assert data.group_names(data_config(group_attribute="Young")) == ("not Young", "Young")
    split = GroupedSplit(images=np.zeros((3, 4, 4, 3), np.uint8), label=np.array([1, 0, 1], np.int32),
                         group=np.array([0, 1, 1], np.int32), label_attribute="Blond_Hair",
                         group_attribute="Young")
    assert split.describe() == ("3 images 4x4, label Blond_Hair: not Young 1 with / 0 without, Young 1 / 1")


def test_unknown_or_equal_attributes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"label_attribute='Smile' is not a CelebA attribute; use one of "
                                         r"5_o_Clock_Shadow, .*Young\."):
        build_imbalanced(female_fraction=0.9, total=200, data_dir=tmp_path, label_attribute="Smile")
    with pytest.raises(ValueError, match="label_attribute and group_attribute are both 'Male'"):
        data.check_available(data_config(label_attribute="Male", data_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_generator_refuses_attributes_it_does_not_draw(tmp_path: Path) -> None:
    listed = r"It models Male, Smiling, Bald, Bangs, Black_Hair, .*Wearing_Hat; .*config.data.source='celeba'"
    with pytest.raises(ValueError, match=r"does not draw 'Young' in the images.*" + listed):
        data.check_available(data_config(source="synthetic", group_attribute="Young"))
    with pytest.raises(ValueError, match=r"does not draw 'Attractive' or 'Oval_Face'"):
        synthetic.write_celeba_files(tmp_path, 40, label_attribute="Attractive", group_attribute="Oval_Face")
    with pytest.raises(ValueError, match="cannot draw Blond_Hair and Bald as independent attributes"):
        data.load(data_config(source="synthetic", label_attribute="Blond_Hair", group_attribute="Bald",
                              data_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())  # refused before anything is written
    # Real CelebA has every attribute: the same pair passes the settings check and stops at the missing files.
    with pytest.raises(data.DataUnavailable):
        data.check_available(data_config(group_attribute="Young", data_dir=str(tmp_path)))


class MiddleRng:
    """Every random draw at the middle of its range, whatever the order: two faces differ only where their
    attributes are drawn."""

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.full(size, (low + high) / 2) if size is not None else (low + high) / 2

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.full(size, loc, dtype=float) if size is not None else loc

    def integers(self, low, high=None, size=None):
        low, high = (0, low) if high is None else (low, high)
        return np.full(size, (low + high - 1) // 2) if size is not None else (low + high - 1) // 2

    def random(self, size=None):
        return np.full(size, 0.5) if size is not None else 0.5


def test_generator_draws_every_modelled_attribute_visibly_at_32px() -> None:
    from PIL import Image as PILImage

    def at_32(image: PILImage.Image) -> np.ndarray:
        image = image.crop((0, 20, 178, 198)).resize((32, 32), PILImage.BILINEAR)  # the loader's crop and resize
        return np.asarray(image, dtype=np.int16)

    base = dict.fromkeys(synthetic.ATTRIBUTE_NAMES, False) | {"No_Beard": True}
    for male in (False, True):
        for name in synthetic.MODELLED_ATTRIBUTES:
            without, _ = synthetic.draw_face(base | {"Male": male, name: False}, MiddleRng())
            with_it, _ = synthetic.draw_face(base | {"Male": male, name: True}, MiddleRng())
            changed = np.abs(at_32(with_it) - at_32(without)).max(axis=-1) > 16
            # Smiling, the paper's label, changes 14 of the 1,024 pixels; every modelled attribute at least 10.
            assert changed.sum() >= 10, (name, male, int(changed.sum()))
    for name in ("Young", "Attractive", "Oval_Face"):  # not drawn: refused (above)
        without, _ = synthetic.draw_face(base | {name: False}, MiddleRng())
        with_it, _ = synthetic.draw_face(base | {name: True}, MiddleRng())
        assert np.array_equal(at_32(with_it), at_32(without))


def test_design_attributes_get_exact_cells_and_a_consistent_table() -> None:
    table = synthetic._attribute_table(800, 0, label_attribute="Blond_Hair", group_attribute="Eyeglasses")
    values = table["attributes"] > 0
    column = {name: values[:, k] for k, name in enumerate(synthetic.ATTRIBUTE_NAMES)}
    for g in (0, 1):
        for y in (0, 1):
            cell = (column["Eyeglasses"] == g) & (column["Blond_Hair"] == y)
            assert cell.sum() == 200 and np.bincount(table["partition"][cell]).tolist() == [160, 20, 20]
    hair = np.stack([column[n] for n in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair")], axis=1)
    assert hair.sum(axis=1).max() == 1  # one hair colour per face
    assert not (column["Blond_Hair"] & column["Bald"]).any()  # blond hair is drawn on a head with hair
    # Gender follows the generator's rates given the design: glasses mostly on men (11% vs 3%), blond mostly on
    # women (19% vs 6%).
    assert column["Male"][column["Eyeglasses"]].mean() > 0.6 > column["Male"][~column["Eyeglasses"]].mean()
    assert column["Male"][column["Blond_Hair"]].mean() < column["Male"][~column["Blond_Hair"]].mean()
    assert 0.4 < column["Smiling"].mean() < 0.6
    assert not (column["Heavy_Makeup"] & column["Male"]).any()  # the other attributes keep their rules


@pytest.fixture(scope="module")
def blond_by_glasses(tmp_path_factory: pytest.TempPathFactory):
    """200 generated images designed for label Blond_Hair, group Eyeglasses (cells of 50: 40 / 5 / 5)."""
    data_dir = tmp_path_factory.mktemp("blond-by-glasses")
    return data_config(source="synthetic", synthetic_num_images=200, data_dir=str(data_dir),
                       label_attribute="Blond_Hair", group_attribute="Eyeglasses", female_fraction=0.7, total=100,
                       image_size=SIZE)


def test_other_attributes_through_the_same_builder(blond_by_glasses) -> None:
    train, test, holdout = data.load_splits(blond_by_glasses, holdout_per_group=30)
    data_dir = Path(blond_by_glasses.data_dir)
    manual = data_dir / "downloads" / "manual-Eyeglasses-Blond_Hair"  # beside, never over, the default files
    assert synthetic.read_manifest(manual)["label_attribute"] == "Blond_Hair"
    assert not (data_dir / "downloads" / "manual").exists()
    # 70 without glasses (35 blond / 35 not), 30 with (15 / 15); 20% of each cell to test.
    assert train.counts() == {(0, 0): 28, (0, 1): 28, (1, 0): 12, (1, 1): 12}
    assert test.counts() == {(0, 0): 7, (0, 1): 7, (1, 0): 3, (1, 1): 3}
    assert (train.label_attribute, train.group_attribute) == ("Blond_Hair", "Eyeglasses")
    assert train.describe().startswith("80 images 16x16, label Blond_Hair: not Eyeglasses 28 with")
    truth = read_truth(manual, "Blond_Hair", "Eyeglasses")
    for split in (train, test, holdout):
        assert [truth[f][1:] for f in fingerprints(split.images)] == list(
            zip(split.group.tolist(), split.label.tolist(), strict=True))
    # Capacity: 50 - 35 = 15 left per cell without glasses (30), 50 - 15 = 35 with (70).
    assert data.holdout_capacity(blond_by_glasses) == {0: 30, 1: 70}
    assert holdout.counts() == {(0, 0): 15, (0, 1): 15, (1, 0): 15, (1, 1): 15}
    assert not set(fingerprints(holdout.images)) & set(fingerprints(train.images) + fingerprints(test.images))
    assert data.group_names(blond_by_glasses) == ("not Eyeglasses", "Eyeglasses")


# ----------------------------------------------------------------------------------------------------------
# Held-out examples.

@pytest.mark.parametrize("split_scheme, capacity", [("paper", {0: 220, 1: 380}), ("official", {0: 176, 1: 304})])
def test_holdout_capacity_by_hand(generated: Path, tmp_path: Path, split_scheme: str,
                                  capacity: dict[int, int]) -> None:
    # 200 per cell, 160 / 20 / 20 per partition. Train at 90% of 200: 72 / 72 / 8 / 8, test 18 / 18 / 2 / 2.
    # "paper": 200 - 90 = 110 women left per label -> min(2 * 110, 2 * 110 + 1) = 220; men 200 - 10 = 190 -> 380.
    # "official": 160 - 72 = 88 women per label in the train partition -> 176; men 160 - 8 = 152 -> 304.
    assert data.holdout_capacity(generated_config(tmp_path / "nothing-generated-yet", split_scheme=split_scheme)) \
        == capacity
    assert not (tmp_path / "nothing-generated-yet").exists()  # from the generator's composition
    # Real CelebA's path counts the two text files (here: a copy of the generated ones): the same numbers.
    copy_manual(generated, tmp_path, without_manifest=True)
    assert data.holdout_capacity(data_config(data_dir=str(tmp_path), female_fraction=0.9, total=200,
                                             split_scheme=split_scheme)) == capacity


def test_holdout_is_disjoint_balanced_and_leaves_train_and_test_alone(generated: Path, truth: dict,
                                                                      decode_counter: list[int]) -> None:
    config = generated_config(generated, split_scheme="official", seed=7)
    train, test = data.load(config)
    splits = data.load_splits(config, holdout_per_group=5)
    for a, b in ((train, splits.train), (test, splits.test)):
        assert split_sha256(a) == split_sha256(b)
    holdout = splits.holdout
    assert holdout.counts() == {(0, 0): 3, (0, 1): 2, (1, 0): 3, (1, 1): 2}  # 5 per group, odd one label 0
    held = fingerprints(holdout.images)
    assert len(set(held)) == 10 and not set(held) & set(fingerprints(train.images) + fingerprints(test.images))
    assert [truth[f][1:] for f in held] == list(zip(holdout.group.tolist(), holdout.label.tolist(), strict=True))
    assert {truth[f][0] for f in held} == {0}  # the training examples' pool: CelebA's train partition
    before = decode_counter[0]
    again = data.load_splits(config, holdout_per_group=5)
    assert decode_counter[0] == before and split_sha256(again.holdout) == split_sha256(holdout)  # cached
    for path in (generated / "jaxdp_subsets").glob("*-s7-*holdout5-*"):
        path.unlink()
    rebuilt = data.load_splits(config, holdout_per_group=5)
    assert decode_counter[0] - before == 10  # only the holdout is decoded; train and test come from the cache
    assert split_sha256(rebuilt.holdout) == split_sha256(holdout)  # deterministic per data.seed
    larger = data.load_splits(config, holdout_per_group=9).holdout
    assert set(held) <= set(fingerprints(larger.images))  # a larger holdout extends a smaller one
    other_seed = data.load_splits(generated_config(generated, split_scheme="official", seed=8), holdout_per_group=5)
    assert set(fingerprints(other_seed.holdout.images)) != set(held)
    assert data.load_splits(config).holdout is None


def test_holdout_larger_than_the_pool_is_refused_with_what_fits(generated: Path, decode_counter: list[int]) -> None:
    config = generated_config(generated, split_scheme="official", seed=9)
    before = decode_counter[0]
    with pytest.raises(ValueError, match=r"holdout_per_group=177 asks for 177 held-out examples of each group, "
                                         r"but only 176 female and 304 male examples are left .* use "
                                         r"holdout_per_group <= 176"):
        data.load_splits(config, holdout_per_group=177)
    assert decode_counter[0] == before and not list((generated / "jaxdp_subsets").glob("*-s9-*"))
    with pytest.raises(ValueError, match="holdout_per_group=-1: use a non-negative integer"):
        data.load_splits(config, holdout_per_group=-1)
    # Exactly the capacity works: every female example of the train partition outside train is held out.
    holdout = data.load_splits(config, holdout_per_group=176).holdout
    assert holdout.counts() == {(0, 0): 88, (0, 1): 88, (1, 0): 88, (1, 1): 88}
