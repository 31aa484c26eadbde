"""Tests of config.data.split_file for UCI Adult (jaxdp.data.adult_split): exactly the listed rows, the training
size from the file, the refusals of a missing / damaged / incompatible file or an unknown row; fair-dp's seed-0
split on UCI's real files where they are on this machine; and launch/compare_fairdp.py's paired mode."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from adult_testlib import NUM_ROWS, REAL_DIR, needs_real

from jaxdp import data
from jaxdp.data import adult, adult_split, adult_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adult_split_generated")
    adult_synthetic.write_adult_files(folder, NUM_ROWS, seed=0)
    return folder


def cfg(folder: Path, split_file: Path | str, **kwargs) -> dict:
    return {"source": "adult_synthetic", "data_dir": str(folder), "synthetic_num_images": NUM_ROWS,
            "synthetic_seed": 0, "group_attribute": "sex", "label_attribute": "income", "female_fraction": 0.2,
            "total": 400, "test_fraction": 0.25, "seed": 0, "split_file": str(split_file)} | kwargs


def ids(table: adult.AdultTable, rows) -> list[tuple[str, int]]:
    return [(adult.FILE_NAMES[table.partition[i]], int(table.line[i])) for i in rows]


@pytest.fixture(scope="module")
def split(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A split file of 301 training and 97 test rows drawn from both files; with the table rows it lists."""
    table = adult.read_table(generated, verify=False)
    order = np.random.default_rng(7).permutation(len(table))
    train, test = np.sort(order[:301]), np.sort(order[301:398])
    path = tmp_path_factory.mktemp("split") / "split.json"
    adult_split.write_split_file(path, table, ids(table, train), ids(table, test), source={"by": "test"})
    return path, train, test


def resign(content: dict) -> dict:
    content["sha256"] = hashlib.sha256(adult_split._canonical(content)).hexdigest()
    return content


def test_split_file_selects_exactly_the_listed_rows(generated: Path, split) -> None:
    path, train_rows, test_rows = split
    table = adult.read_table(generated, verify=False)
    train, test = data.load(cfg(generated, path))
    assert len(train) == 301 and len(test) == 97
    # The features of exactly those rows, standardised with the listed test rows' statistics.
    values = table.numerical[test_rows]
    mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
    for got, rows in ((train, train_rows), (test, test_rows)):
        want = table.features(rows, mean, std)
        assert sorted(r.tobytes() for r in got.inputs) == sorted(r.tobytes() for r in want)
        assert sorted(got.label.tolist()) == sorted(table.label[rows].tolist())
        assert int(np.sum(got.group == 0)) == int(table.female[rows].sum())  # group 0 = female
    # female_fraction, total and test_fraction are not used; the seed shuffles the same rows.
    other = data.load(cfg(generated, path, female_fraction=0.9, total=1000, test_fraction=0.5, seed=3))[0]
    assert sorted(r.tobytes() for r in other.inputs) == sorted(r.tobytes() for r in train.inputs)
    assert [r.tobytes() for r in other.inputs] != [r.tobytes() for r in train.inputs]


def test_train_size_is_the_listed_count(generated: Path, split) -> None:
    source = data.get_source("adult_synthetic")
    assert source.train_size(cfg(generated, split[0])) == 301
    source.check_available(cfg(generated, split[0]))
    with pytest.raises(ValueError, match="held-out rows .* not supported with a split file"):
        source.holdout_capacity(cfg(generated, split[0]))
    with pytest.raises(ValueError, match="not supported with a split file"):
        data.load_splits(cfg(generated, split[0]), holdout_per_group=5)


def damaged(content: dict) -> dict:
    content["train"]["adult.data"][0] += 0  # unchanged lines, but a changed count: the hash no longer matches
    content["counts"]["train"]["female"][0] += 1
    return content


def past_the_end(content: dict) -> dict:
    content["test"]["adult.test"].append(10_000)
    return resign(content)


@pytest.mark.parametrize("edit, message", [
    (lambda c: None, "no such file"),
    (lambda c: "{not json", "not a JSON file"),
    (lambda c: {**c, "format": "other/2"}, "not a split file of format 'jaxdp.adult_split/1'"),
    (lambda c: resign({k: v for k, v in c.items() if k != "counts"} | {"extra": 1}), "keys .* expected"),
    (damaged, "damaged or edited: its content's SHA-256"),
    (lambda c: resign(c | {"train": {"adult.data": [3, 2], "adult.test": []}}), "strictly increasing"),
    (lambda c: resign(c | {"data_sha256": {**c["data_sha256"], "adult.test": "0" * 64}}),
     "written for other Adult files: adult.test"),
    (past_the_end, "test row adult.test line 10000 is not a row of data"),
    (lambda c: resign(c | {"test": {**c["test"], "adult.data": sorted({*c["test"]["adult.data"],
                                                                        c["train"]["adult.data"][0]})}}),
     "in both the training and the test set"),
    (lambda c: resign(c | {"counts": {**c["counts"], "test": {"female": [1, 0], "male": [1, 0]}}}),
     "the test rows give .* the file states"),
])
def test_bad_split_files_are_refused_with_one_line(generated: Path, split, tmp_path: Path, edit, message) -> None:
    content = json.loads(split[0].read_text())
    changed = edit(json.loads(json.dumps(content)))
    path = tmp_path / "bad.json"
    if changed is not None:
        path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ValueError, match=message) as caught:
        data.get_source("adult_synthetic").check_available(cfg(generated, path))
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_row_with_a_missing_value_is_refused(generated: Path, split, tmp_path: Path) -> None:
    table = adult.read_table(generated, verify=False)
    line = table.missing_lines[0][0]
    content = json.loads(split[0].read_text())
    content["train"]["adult.data"] = sorted({*content["train"]["adult.data"], line})
    (tmp_path / "bad.json").write_text(json.dumps(resign(content)))
    with pytest.raises(ValueError, match=f"train row adult.data line {line} has a missing value"):
        data.load(cfg(generated, tmp_path / "bad.json"))


@needs_real
def test_fairdps_seed0_split_on_the_real_files() -> None:
    path = ROOT / "docs" / "measurements" / "fairdp" / "fairdp_adult_split_seed0.json"
    config = {"source": "adult", "manual_dir": str(REAL_DIR), "group_attribute": "sex", "label_attribute": "income",
              "seed": 0, "split_file": str(path)}
    assert data.get_source("adult").train_size(config) == 23_484
    train, test = data.load(config)
    # fair-dp's seed 0: every woman (14,695) and 14,660 men, 23,484 training and 5,871 test rows.
    assert (len(train), len(test)) == (23_484, 5_871)
    assert int(np.sum(train.group == 0)) == 11_765 and int(np.sum(test.group == 0)) == 2_930
    assert int(train.label[train.group == 0].sum()) == 1_323 and int(test.label[test.group == 1].sum()) == 926


def test_compare_fairdp_paired_mode(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compare_fairdp", ROOT / "launch" / "compare_fairdp.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    # jaxdp 90 and 92 (SD sqrt 2) against fair-dp's 90: +1.00, SE sqrt(2) sqrt(1/2 + 1) = sqrt(3).
    diff, se = compare.paired_difference([90.0, 92.0], 90.0)
    assert (diff, se) == pytest.approx((1.0, 3 ** 0.5))
    fairdp = {"runs": [{"method": "regular", "seed": s, "wall_s": 1.0, "epsilon": None,
                        "test_accuracy_per_group": {"male": 0.80, "female": f}} for s, f in ((0, 0.90), (1, 0.91))]}
    (tmp_path / "fairdp.json").write_text(json.dumps(fairdp))
    paired = {}
    for split_seed, (a, b) in ((0, (90.0, 92.0)), (1, (91.0, 93.0))):
        rows = [{"method": "", "dp_enabled": "false", "group_0": "female", "group_1": "male", "seed": str(s),
                 "wall_time_s": "3.0", "epsilon_rdp": "", "accuracy_0": str(f), "accuracy_1": "80.0",
                 "n_0": "10", "n_1": "12"} for s, f in ((0, a), (1, b))]
        with open(tmp_path / f"s{split_seed}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paired[split_seed] = compare.jaxdp_runs(tmp_path / f"s{split_seed}.csv")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"counts": {"test": {"female": [10, 1], "male": [12, 3]}}}))
    compare.check_split(paired[0], split_file, 0)
    split_file.write_text(json.dumps({"counts": {"test": {"female": [11, 1], "male": [12, 3]}}}))
    with pytest.raises(SystemExit, match="tested on 10 women and 12 men"):
        compare.check_split(paired[0], split_file, 0)
    text = compare.paired_table(compare.fairdp_runs(tmp_path / "fairdp.json"), paired)
    assert "| regular | 0 | 2 | 91.00 ± 1.41 | 90.00 | +1.00 ± 1.73 | 80.00 ± 0.00 | 80.00 | +0.00 ± 0.00 |" in text
    assert "| regular | 1 | 2 | 92.00 ± 1.41 | 91.00 | +1.00 ± 1.73 |" in text
    # Combined: mean +1.00, SE sqrt(3 + 3) / 2 = 1.22.
    assert "| regular | 0+1 combined |  |  |  | **+1.00 ± 1.22** |  |  | **+0.00 ± 0.00** |" in text
    assert "| dpsgd | 0 | 0 | – | – | – |" in text


def test_the_paired_config_reads_fairdps_committed_splits() -> None:
    from jaxdp_study.grid import expand, load_config

    config = load_config(ROOT / "configs" / "adult_fairdp_paired.py")
    runs = expand(config)
    assert len(runs) == 25 and all(Path(r.config.data.split_file).name == "fairdp_adult_split_seed0.json" for r in runs)
    # The committed files check on their own (SHA-256, schema) and give fair-dp's training sizes of seeds 0 and 1.
    sizes = [adult_split.read_split_file(ROOT / "docs" / "measurements" / "fairdp" / f"fairdp_adult_split_seed{s}.json")
             for s in (0, 1)]
    assert [(s.size("train"), s.size("test")) for s in sizes] == [(23_484, 5_871), (23_594, 5_898)]
    assert all(s.data_sha256 == adult.SHA256 for s in sizes)
