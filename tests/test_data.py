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


@pytest.fixture(scope="session")
def truth(generated: Path) -> dict[str, tuple[int, int, int]]:
    """image fingerprint at SIZE -> (partition, Male, Smiling), read straight from the generated files."""
    manual = generated / "downloads" / "manual"
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
                    int(part[name]), int(attrs[name]["Male"] > 0), int(attrs[name]["Smiling"] > 0))
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
