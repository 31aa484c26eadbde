"""Tests of UCI Adult in jaxdp.data: the format generator, the parser, the features, exact imbalance, the fixed test
set, seeds, held-out rows, checksums and refusals; on UCI's real files where they are on this machine.

One generated set of 1,200 rows (800 in adult.data, 400 in adult.test) is written once per session.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from adult_testlib import NUM_ROWS, REAL_DIR, needs_real

from jaxdp import data
from jaxdp.data import adult, adult_synthetic


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adult_generated")
    adult_synthetic.write_adult_files(folder, NUM_ROWS, seed=0)
    return folder


def cfg(folder: Path | None = None, **kwargs) -> dict:
    base = {"source": "adult_synthetic", "data_dir": str(folder) if folder else None,
            "synthetic_num_images": NUM_ROWS, "synthetic_seed": 0, "group_attribute": "sex",
            "label_attribute": "income", "female_fraction": 0.2, "total": 400, "test_fraction": 0.25, "seed": 0}
    return base | kwargs


def row_keys(split: data.GroupedSplit) -> list[bytes]:
    return [r.tobytes() for r in split.inputs]


# ----------------------------------------------------------------------------------------------------------
# The generated files: UCI's format, deterministic.

def test_generated_files_have_uci_format(generated: Path) -> None:
    train_text = (generated / "adult.data").read_text()
    test_text = (generated / "adult.test").read_text()
    assert train_text.endswith(">50K\n\n") or train_text.endswith("<=50K\n\n")  # a blank line at the end, as UCI's
    test_lines = test_text.split("\n")
    assert test_lines[0] == "|1x3 Cross validator" and test_lines[-2:] == ["", ""]
    body = train_text.split("\n")[:-2] + test_lines[1:-2]
    assert len(body) == NUM_ROWS and len(train_text.split("\n")[:-2]) == 800
    for line in body:
        fields = line.split(", ")
        assert len(fields) == 15 and "," not in "".join(fields)
    assert all(line.endswith("K.") for line in test_lines[1:-2])  # the test file's labels end with a dot
    assert not any(line.endswith(".") for line in train_text.split("\n")[:-2])
    missing = [line for line in body if "?" in line.split(", ")]
    assert 0.03 * NUM_ROWS < len(missing) < 0.15 * NUM_ROWS  # about 7% of the rows have a "?", as UCI's
    for column, values in adult.CATEGORIES.items():
        j = adult.COLUMNS.index(column)
        assert {line.split(", ")[j] for line in body} <= set(values) | {"?"}


def test_generator_is_deterministic_in_its_seed(generated: Path, tmp_path: Path) -> None:
    again = adult_synthetic.write_adult_files(tmp_path / "a", NUM_ROWS, seed=0)
    other = adult_synthetic.write_adult_files(tmp_path / "b", NUM_ROWS, seed=1)
    for name in adult.FILE_NAMES:
        assert again[name].read_bytes() == (generated / name).read_bytes()
        assert other[name].read_bytes() != (generated / name).read_bytes()
    with pytest.raises(ValueError, match="synthetic_num_images=10: .* from 30 to"):
        adult_synthetic.write_adult_files(tmp_path / "c", 10)


def test_generated_income_depends_on_the_features(generated: Path) -> None:
    table = adult.read_table(generated, verify=False)
    education_num = table.numerical[:, adult.NUMERICAL.index("education_num")]
    high, low = table.label[education_num >= 13].mean(), table.label[education_num <= 9].mean()
    assert high > low + 0.2  # the income model's strongest term
    assert 0.15 < table.label.mean() < 0.35 and table.label[table.female == 1].mean() < table.label.mean()


def test_ensure_generated_reuses_and_never_overwrites_uci_files(tmp_path: Path) -> None:
    folder = adult_synthetic.ensure_generated(tmp_path / "gen", 60, seed=3)
    stamp = (folder / "adult.data").stat().st_mtime_ns
    adult_synthetic.ensure_generated(folder, 60, seed=3)
    assert (folder / "adult.data").stat().st_mtime_ns == stamp  # complete: reused
    with open(folder / "adult.data", "a") as f:
        f.write("x")
    adult_synthetic.ensure_generated(folder, 60, seed=3)  # edited: written again
    assert adult_synthetic.is_complete(folder, 60, 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adult.data").write_text("39, State-gov, ...\n")
    with pytest.raises(FileExistsError, match="did not write .*adult.data.*refusing to overwrite"):
        adult_synthetic.ensure_generated(foreign, 60)


# ----------------------------------------------------------------------------------------------------------
# The parser and the features, by hand.

HAND_DATA = ("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, "
             "40, United-States, <=50K\n"
             "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, "
             "0, 0, 13, United-States, >50K\n"
             "54, ?, 180211, Some-college, 10, Married-civ-spouse, ?, Husband, Asian-Pac-Islander, Male, 0, 0, 60, "
             "South, >50K\n\n")
HAND_TEST = ("|1x3 Cross validator\n"
             "25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Female, 0, 0, 40, "
             "United-States, <=50K.\n"
             "44, Private, 160323, Some-college, 10, Married-civ-spouse, Machine-op-inspct, Wife, White, Female, "
             "7688, 0, 40, Holand-Netherlands, >50K.\n\n")


def write_hand(folder: Path, data_text: str = HAND_DATA, test_text: str = HAND_TEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adult.data").write_text(data_text)
    (folder / "adult.test").write_text(test_text)
    return folder


def test_parser_drops_missing_rows_and_reads_every_column(tmp_path: Path) -> None:
    table = adult.read_table(write_hand(tmp_path), verify=False)
    assert len(table) == 4 and table.dropped == 1  # the row with "?" is gone
    assert table.partition.tolist() == [0, 0, 1, 1]
    assert table.label.tolist() == [0, 1, 0, 1]  # ">50K." in the test file is 1
    assert table.female.tolist() == [0, 0, 1, 1] and table.nonwhite.tolist() == [0, 0, 1, 0]
    np.testing.assert_array_equal(table.numerical[:, 0], [39, 50, 25, 44])
    assert table.group("sex").tolist() == [1, 1, 0, 0] and table.group("race").tolist() == [1, 1, 0, 1]
    # Features with mean 0 / std 1 statistics are the raw values; one indicator per categorical column.
    features = table.features(np.arange(4), np.zeros(5), np.ones(5))
    names = adult.FEATURE_NAMES
    assert features.shape == (4, 99) and len(names) == 99
    assert features[3, names.index("capital_gain")] == 7688
    assert features[2, names.index("race=non-white")] == 1 and features[2, names.index("sex=Female")] == 1
    assert features[3, names.index("native_country=Holand-Netherlands")] == 1
    assert features[1, names.index("relationship=Husband")] == 1
    np.testing.assert_array_equal(features[:, 7:].sum(axis=1), [6, 6, 6, 6])  # six categorical columns


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("Bachelors", "Bachelor", 1), "education='Bachelor' .* not one of adult.names' values"),
    (lambda t: t.replace(", 40, United", ", forty, United", 1), "a numerical column .* holds a non-number"),
    (lambda t: t.replace(", <=50K\n", ", <=50K, extra\n", 1), "line 1: 16 fields separated by ', ', expected 15"),
])
def test_damaged_rows_are_refused_with_file_and_line(tmp_path: Path, edit, problem: str) -> None:
    folder = write_hand(tmp_path, data_text=edit(HAND_DATA))
    with pytest.raises(ValueError, match=problem):
        adult.read_table(folder, verify=False)


def test_test_file_without_its_header_is_refused(tmp_path: Path) -> None:
    folder = write_hand(tmp_path, test_text=HAND_TEST.split("\n", 1)[1])
    with pytest.raises(ValueError, match=r"adult.test: the first line must be '\|1x3 Cross validator'"):
        adult.read_table(folder, verify=False)


# ----------------------------------------------------------------------------------------------------------
# Counts, the fixed test set, seeds.

def test_plan_counts_by_hand() -> None:
    # 30,000 at 0.2: 6,000 test (natural: 6,000 * 14,695 / 45,222 = 1,949.7 -> 1,950 women), 24,000 train.
    plan = adult.plan_counts(female_fraction=0.01, total=30_000, test_fraction=0.2, test_pool=(14_695, 30_527))
    assert plan == adult.AdultPlan(train=(240, 23_760), test=(1_950, 4_050))
    # 0.325 of 24,000 = 7,800; fair-dp's sizes: 29,355 * 0.2 = 5,871 test, 23,484 train, half women.
    assert adult.plan_counts(female_fraction=0.325, total=30_000, test_fraction=0.2,
                             test_pool=(14_695, 30_527)).train == (7_800, 16_200)
    assert adult.plan_counts(female_fraction=0.5, total=29_355, test_fraction=0.2,
                             test_pool=(14_695, 30_527)) == adult.AdultPlan(train=(11_742, 11_742), test=(1_908, 3_963))
    with pytest.raises(ValueError, match="every group needs a row in each set"):
        adult.plan_counts(female_fraction=0.01, total=40, test_fraction=0.2, test_pool=(1, 2))


@pytest.mark.parametrize("female_fraction, women", [(0.5, 150), (0.2, 60), (0.05, 15), (0.01, 3)])
def test_exact_counts_and_one_test_set_at_every_fraction(generated: Path, female_fraction: float,
                                                         women: int) -> None:
    train, test = data.load(cfg(generated, female_fraction=female_fraction))
    reference_test = data.load(cfg(generated, female_fraction=0.3))[1]
    assert len(train) == 300 and int(np.sum(train.group == 0)) == women
    np.testing.assert_array_equal(test.inputs, reference_test.inputs)  # the same rows, same order
    np.testing.assert_array_equal(test.label, reference_test.label)
    assert train.inputs.dtype == np.float32 and train.inputs.shape[1:] == (99,)
    assert not set(row_keys(train)) & set(row_keys(test))
    # The test set's composition is its pool's: round(100 * women / rows of the pool).
    table = adult.read_table(generated, verify=False)
    assert int(np.sum(test.group == 0)) == int(np.floor(100 * table.female.mean() + 0.5))


def test_women_at_a_smaller_fraction_are_a_subset_and_seeds_differ(generated: Path) -> None:
    def women(split: data.GroupedSplit) -> set[bytes]:
        return {r.tobytes() for r in split.inputs[split.group == 0]}

    at_20, at_5 = data.load(cfg(generated, female_fraction=0.2))[0], data.load(cfg(generated, female_fraction=0.05))[0]
    assert women(at_5) < women(at_20)
    again = data.load(cfg(generated, female_fraction=0.2))[0]
    np.testing.assert_array_equal(again.inputs, at_20.inputs)
    other = data.load(cfg(generated, female_fraction=0.2, seed=1))
    assert set(row_keys(other[0])) != set(row_keys(at_20))
    assert set(row_keys(other[1])) != set(row_keys(data.load(cfg(generated))[1]))


def test_standardisation_uses_the_test_set_only(generated: Path) -> None:
    train, test = data.load(cfg(generated))
    numerical = test.inputs[:, :5].astype(np.float64)
    np.testing.assert_allclose(numerical.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(numerical.std(axis=0, ddof=1), 1, rtol=1e-5)
    # The training rows are mapped with the test set's statistics: their own mean is not 0.
    assert np.max(np.abs(train.inputs[:, :5].mean(axis=0))) > 1e-3
    # Changing the training rows (another fraction) leaves every test feature as it was.
    np.testing.assert_array_equal(data.load(cfg(generated, female_fraction=0.01))[1].inputs, test.inputs)


def test_race_groups_non_white_first(generated: Path) -> None:
    config = cfg(generated, group_attribute="race", female_fraction=0.1)
    train, test = data.load(config)
    assert data.group_names(config) == ("non-white", "white")
    assert int(np.sum(train.group == 0)) == 30
    is_nonwhite = train.inputs[:, adult.FEATURE_NAMES.index("race=non-white")]
    np.testing.assert_array_equal(is_nonwhite == 1, train.group == 0)
    assert train.group_attribute == "race" and "non-white" in train.describe()


def test_official_split_takes_test_rows_from_adult_test(generated: Path) -> None:
    table = adult.read_table(generated, verify=False)
    settings = dict(female_fraction=0.2, total=200, test_fraction=0.25, seed=0, group_attribute="sex")
    chosen = adult._select(table, split_scheme="official", **settings)
    assert set(table.partition[chosen.test].tolist()) == {1} and set(table.partition[chosen.train].tolist()) == {0}
    pooled = adult._select(table, split_scheme="paper", **settings)
    assert set(table.partition[pooled.train].tolist()) == {0, 1}  # "paper" pools both files
    train, test = data.load(cfg(generated, split_scheme="official", total=200))
    assert (len(train), len(test)) == (150, 50) and int(np.sum(train.group == 0)) == 30


def test_a_total_the_pool_cannot_fill_names_the_largest_that_fits(generated: Path) -> None:
    with pytest.raises(ValueError, match=r"needs \d+ training rows of group 1 \(male\), but only \d+ are left after "
                                         r"the test set; the largest total that fits this fraction is (\d+)") as e:
        data.load(cfg(generated, total=1_100, female_fraction=0.01))
    largest = int(str(e.value).rsplit(" ", 1)[1].rstrip("."))
    data.load(cfg(generated, total=largest, female_fraction=0.01))  # fits
    with pytest.raises(ValueError, match="largest total"):
        data.load(cfg(generated, total=largest + 1, female_fraction=0.01))


def test_holdout_is_disjoint_per_group_and_nested(generated: Path) -> None:
    config = cfg(generated)
    capacity = data.holdout_capacity(config)
    table = adult.read_table(generated, verify=False)
    women, men = int(table.female.sum()), int(len(table) - table.female.sum())
    train, test, held = data.load_splits(config, holdout_per_group=20)
    assert capacity == {0: women - int(np.sum(train.group == 0)) - int(np.sum(test.group == 0)),
                        1: men - int(np.sum(train.group == 1)) - int(np.sum(test.group == 1))}
    assert [int(np.sum(held.group == g)) for g in (0, 1)] == [20, 20]
    assert not set(row_keys(held)) & (set(row_keys(train)) | set(row_keys(test)))
    np.testing.assert_array_equal(train.inputs, data.load(config)[0].inputs)  # train and test untouched
    bigger = data.load_splits(config, holdout_per_group=30).holdout
    assert set(row_keys(held)) < set(row_keys(bigger))
    with pytest.raises(ValueError, match=rf"holdout_per_group <= {min(capacity.values())}"):
        data.load_splits(config, holdout_per_group=min(capacity.values()) + 1)


# ----------------------------------------------------------------------------------------------------------
# Settings, checksums and refusals.

def test_input_shape_and_names_without_loading(tmp_path: Path) -> None:
    config = cfg(tmp_path / "never-written")
    assert data.input_shape(config) == (99,) and data.group_names(config) == ("female", "male")
    assert data.input_shape({"source": "adult", "manual_dir": str(tmp_path)}) == (99,)
    assert data.input_shape({"source": "synthetic", "image_size": 32}) == (32, 32, 3)
    assert adult.GeneratedAdultSource().train_size(config) == 300  # 400 - round(400 * 0.25)
    assert adult.AdultSource().train_size({"female_fraction": 0.5, "total": 29_355, "test_fraction": 0.2}) == 23_484
    data.check_available(config)  # generated on first use: available, nothing written by the check
    assert not (tmp_path / "never-written").exists()


@pytest.mark.parametrize("setting, message", [
    ({"group_attribute": "Male"}, "group_attribute='Male' is not an Adult grouping; use 'sex'"),
    ({"label_attribute": "Smiling"}, "label_attribute='Smiling': Adult's label is 'income'"),
    ({"female_fraction": 1.0}, "female_fraction=1.0 must be strictly between 0 and 1"),
    ({"split_scheme": "random"}, "split_scheme='random': for Adult use 'paper'"),
    ({"synthetic_num_images": 5}, "synthetic_num_images=5"),
])
def test_settings_out_of_range_are_refused(tmp_path: Path, setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.check_available(cfg(tmp_path, **setting))


def test_missing_uci_files_say_what_to_do(tmp_path: Path) -> None:
    config = {"source": "adult", "manual_dir": str(tmp_path), "group_attribute": "sex", "label_attribute": "income",
              "female_fraction": 0.2}
    with pytest.raises(data.DataUnavailable) as raised:
        data.check_available(config)
    message = str(raised.value)
    assert f"Missing UCI Adult file(s) adult.data, adult.test in {tmp_path}." in message
    assert "https://archive.ics.uci.edu/dataset/2/adult" in message and "config.data.manual_dir" in message
    assert "--config.data.source=adult_synthetic" in message
    assert isinstance(raised.value, FileNotFoundError) and not any(tmp_path.iterdir())
    # The default folder is CelebA's convention: <data_dir>/downloads/manual.
    with pytest.raises(data.DataUnavailable, match=f"in {tmp_path / 'downloads' / 'manual'}"):
        data.load({**config, "manual_dir": None, "data_dir": str(tmp_path)})


def test_files_other_than_ucis_are_refused_by_checksum(generated: Path, tmp_path: Path) -> None:
    for name in adult.FILE_NAMES:
        shutil.copy(generated / name, tmp_path / name)
    config = {"source": "adult", "manual_dir": str(tmp_path), "group_attribute": "sex", "label_attribute": "income",
              "female_fraction": 0.2, "total": 400, "test_fraction": 0.25}
    digest = hashlib.sha256((tmp_path / "adult.data").read_bytes()).hexdigest()
    expected = (rf"{tmp_path / 'adult.data'} is not UCI's adult.data: its SHA-256 is {digest}, UCI's is "
                rf"{adult.SHA256['adult.data']}.*Download it again from https://archive.ics.uci.edu/dataset/2/adult")
    with pytest.raises(data.DataUnavailable, match=expected):
        data.check_available(config)
    with pytest.raises(data.DataUnavailable, match="is not UCI's adult.data"):
        data.load(config)  # loading checks too, not only the check before a run


# ----------------------------------------------------------------------------------------------------------
# UCI's files.

@needs_real
def test_real_files_give_fairdps_rows_and_counts() -> None:
    table = adult.read_table(REAL_DIR)
    assert len(table) == 45_222 and table.dropped == 48_842 - 45_222
    assert int(table.female.sum()) == 14_695 and int(len(table) - table.female.sum()) == 30_527
    assert int(table.nonwhite.sum()) == 6_319
    assert [int(np.sum(table.partition == p)) for p in (0, 1)] == [30_162, 15_060]
    # income > 50K: 1,669 women and 9,539 men.
    assert int(table.label[table.female == 1].sum()) == 1_669 and int(table.label[table.female == 0].sum()) == 9_539
    assert int(np.sum(table.codes[:, 0] == adult.CATEGORIES["workclass"].index("Never-worked"))) == 0


@needs_real
def test_real_files_fill_every_fraction_of_the_study() -> None:
    base = {"source": "adult", "manual_dir": str(REAL_DIR), "group_attribute": "sex", "label_attribute": "income",
            "total": 30_000, "test_fraction": 0.2}
    for fraction in (0.325, 0.2, 0.1, 0.05, 0.01):
        data.check_available({**base, "female_fraction": fraction})
    train, test = data.load({**base, "female_fraction": 0.01})
    assert int(np.sum(train.group == 0)) == 240 and int(np.sum(test.group == 0)) == 1_950 and len(test) == 6_000
    # The smallest group's leftover rows after the 1% run's 23,760 men and 4,050 test men: 30,527 - 27,810.
    assert data.holdout_capacity({**base, "female_fraction": 0.01})[1] == 2_717


# ----------------------------------------------------------------------------------------------------------
# The configs, the plan on the MLP, one training run.

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_configs_expand_to_the_documented_grids(tmp_path: Path) -> None:
    from jaxdp_study.grid import expand, load_config

    study = expand(load_config(CONFIGS / "adult.py"))
    assert len(study) == 60  # 4 levels x 5 fractions x 3 seeds
    assert {r.config.data.female_fraction for r in study} == {0.325, 0.2, 0.1, 0.05, 0.01}
    assert {r.config.dp.target_epsilon for r in study if r.config.dp.enabled} == {1.15, 4.98, 16.2}
    fairdp = expand(load_config(CONFIGS / "adult_fairdp.py"))
    assert len(fairdp) == 25
    methods = {(r.config.dp.enabled and r.config.dp.method, r.config.optim.learning_rate) for r in fairdp}
    assert methods == {(False, 0.01), ("dpsgd", 0.01), ("dpsgd_f", 0.01), ("dpsgd_global", 0.2),
                       ("dpsgd_global_adapt", 0.2)}
    run = next(r for r in fairdp if r.config.dp.enabled and r.config.dp.method == "dpsgd_global_adapt")
    assert (run.config.dp.dpsgd_global_adapt.initial_threshold, run.config.optim.name, run.config.train.batch_size,
            run.config.train.epochs, run.config.dp.l2_clip_norm, run.config.dp.noise_multiplier) == (
        50.0, "sgd", 256, 20, 0.5, 1.0)
    mitigations = expand(load_config(CONFIGS / "adult_mitigations.py"))
    names = {r.name for r in study}
    assert len(mitigations) == 117 and len([r for r in mitigations if r.name in names]) == 36  # shared with adult.py


@pytest.mark.parametrize("name", ["adult.py", "adult_fairdp.py"])
def test_configs_refuse_clearly_without_the_files(tmp_path: Path, name: str) -> None:
    from jaxdp.train import check_runnable
    from jaxdp_study.grid import expand, load_config

    config = load_config(CONFIGS / name)
    config.data.manual_dir = str(tmp_path)
    with pytest.raises(data.DataUnavailable, match=f"Missing UCI Adult file.* in {tmp_path}.*dataset/2/adult"):
        check_runnable(expand(config)[0].config)


def test_the_studys_plan_on_the_mlp_runs_bookkeeping(tmp_path: Path) -> None:
    import jax

    from jaxdp import models, steps
    from jaxdp_study.grid import expand, load_config

    run = next(r for r in expand(load_config(CONFIGS / "adult_fairdp.py")) if r.config.dp.enabled)
    model = models.create_model(run.config.model, private=True)
    shape = data.input_shape(run.config.data)
    params = models.random_params(model, np.zeros((1, *shape), np.float32))
    plan = steps.plan_from_config(run.config, model, 23_484, secret=None)
    example = {"inputs": jax.ShapeDtypeStruct((1, *shape), np.float32), "labels": jax.ShapeDtypeStruct((1,), np.int32)}
    assert plan.resolve_strategy(params, example)[0] == "bookkeeping"
    assert plan.num_steps == 1_840 and plan.sampler.sampling_prob == 256 / 23_484


@pytest.mark.slow  # one short DP run, compiled: ~10-20 s on 2 cores
def test_a_dp_run_on_generated_adult_data_writes_its_groups_and_shape(generated: Path, tmp_path: Path) -> None:
    from jaxdp.train import train_and_evaluate
    from jaxdp_study.grid import load_config

    config = load_config(CONFIGS / "adult.py")
    del config["sweep"]
    config.data.source, config.data.data_dir = "adult_synthetic", str(generated)
    config.data.synthetic_num_images, config.data.total, config.data.test_fraction = NUM_ROWS, 400, 0.25
    config.data.female_fraction = 0.2
    config.model.hidden_sizes = (16,)
    config.train.batch_size, config.train.epochs, config.train.progress = 64, 2, False
    config.train.misalignment_examples_per_group = 16
    config.dp.privacy_level, config.dp.noise_multiplier = "medium", 1.0
    final = train_and_evaluate(config, tmp_path / "run")
    assert final["input_shape"] == [99] and final["group_names"] == ["female", "male"]
    assert final["clipping_strategy"] == "bookkeeping" and final["steps"] == 10  # round(300 / 64) = 5 per epoch
    assert final["train_size"] == 300 and final["test_size"] == 100
    assert final["metrics"]["n_0"] + final["metrics"]["n_1"] == 100 and 0 < final["epsilon"]["pld"] < 100
    assert 0 <= final["metrics"]["accuracy_0"] <= 100


def test_fairdp_comparison_table_by_hand(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_fairdp", CONFIGS.parent / "launch" / "compare_fairdp.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    # Means 91 and 90, sample SDs sqrt(2) and 0: pooled SD sqrt((1 * 2 + 0) / 2) = 1, SE = 1 * sqrt(1/2 + 1/2) = 1.
    assert compare.difference([90.0, 92.0], [90.0, 90.0]) == pytest.approx((1.0, 1.0))
    assert compare.difference([90.0], [89.0]) == (1.0, None)  # no spread to estimate
    fairdp = {"runs": [{"method": "regular", "seed": s, "wall_s": 100.0 * (s + 1), "epsilon": None,
                        "test_accuracy_per_group": {"male": 0.80, "female": f}} for s, f in ((0, 0.90), (1, 0.90))]}
    (tmp_path / "fairdp.json").write_text(json.dumps(fairdp))
    rows = [{"method": "", "dp_enabled": "false", "group_0": "female", "group_1": "male", "seed": str(s),
             "wall_time_s": "3.0", "epsilon_rdp": "", "accuracy_0": str(f), "accuracy_1": "80.0"}
            for s, f in ((0, 90.0), (1, 92.0))]
    with open(tmp_path / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = compare.table(compare.fairdp_runs(tmp_path / "fairdp.json"), compare.jaxdp_runs(tmp_path / "summary.csv"))
    assert ("| regular | 2 / 2 | 91.00 ± 1.41 | 90.00 ± 0.00 | +1.00 ± 1.00 | 80.00 ± 0.00 | 80.00 ± 0.00 | "
            "+0.00 ± 0.00 | – / – | 3.0 / 150.0 | 1/50 |") in text
    assert "| dpsgd | 0 / 0 | – | – | – |" in text
