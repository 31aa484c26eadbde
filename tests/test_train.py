"""The training loop: device-count equivalence, kill-and-resume, BatchNorm refusal, checkpoint corruption."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import sampling, train
from jaxdp.checkpoint import Checkpointer
from jaxdp.config import base_config


class Split:
    def __init__(self, images, label, group):
        self.images, self.label, self.group = images, label, group


def tiny_datasets(n_train=96, n_test=48, size=16, seed=0):
    """Smiling = a bright lower half; males (group 1) have a darker face. Learnable in a few steps."""
    rng = np.random.default_rng(seed)

    def make(n):
        label = rng.integers(0, 2, n).astype(np.int32)
        group = (rng.random(n) < 0.3).astype(np.int32)
        images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
        images[label == 1, size // 2 :] += 150
        images[group == 1] //= 2
        return Split(images, label, group)

    return make(n_train), make(n_test)


def tiny_config(**overrides):
    c = base_config()
    c.dp.clipping_strategy = "vmap"  # the fastest to compile on these tiny models; "auto" is tested where it matters
    c.data.image_size = 16
    c.model.stage_sizes = (1,)
    c.model.width = 8
    c.model.num_groups = 4
    c.dp.noise_multiplier = 0.5
    c.dp.l2_clip_norm = 1.0
    c.optim.learning_rate = 1e-2
    c.train.batch_size = 16
    c.train.epochs = 1
    c.train.eval_every_steps = 3
    c.train.checkpoint_every_steps = 2
    c.train.eval_batch_size = 16
    c.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def final_params(workdir):
    """The trained parameters a finished run publishes (params.msgpack; its checkpoints are deleted)."""
    import flax.serialization

    return flax.serialization.msgpack_restore((Path(workdir) / "params.msgpack").read_bytes())["params"]


def assert_trees_close(a, b, **kwargs):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


def test_run_writes_history_and_final(tmp_path):
    final = train.train_and_evaluate(tiny_config(), tmp_path, datasets=tiny_datasets())
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # 96 / 16 = 6 steps, evaluation every 3
    for key in ("accuracy_0", "accuracy_1", "tpr_1", "epsilon", "nonprivate_clip_fraction_0",
                "nonprivate_grad_norm_mean_1", "nonprivate_train_loss"):
        assert key in rows[-1]
    assert rows[0]["epsilon"] < rows[1]["epsilon"]
    assert 0.0 <= rows[-1]["nonprivate_clip_fraction_0"] <= 1.0
    assert final["steps"] == 6 and final["sampling"] == "poisson"
    assert set(final["epsilon"]) == {"pld", "rdp", "rdp_classic"}
    assert final["metrics"] == rows[-1]
    assert json.loads((tmp_path / "final.json").read_text()) == final
    # Finished runs are not redone.
    assert train.train_and_evaluate(tiny_config(), tmp_path, datasets=tiny_datasets()) == final


@pytest.mark.parametrize("private", [True, False])
def test_one_two_and_four_devices_follow_the_same_trajectory(tmp_path, private):
    assert jax.device_count() >= 4, "tests/conftest.py asks XLA for 4 host devices"
    params = {}
    for n in (1, 2, 4):
        config = tiny_config(**{"train.num_devices": n, "dp.enabled": private, "train.epochs": 0.5,
                                "dp.reproducible": True})
        train.train_and_evaluate(config, tmp_path / str(n), datasets=tiny_datasets())
        params[n] = final_params(tmp_path / str(n))
    assert_trees_close(params[1], params[2], rtol=1e-4, atol=1e-5)
    assert_trees_close(params[1], params[4], rtol=1e-4, atol=1e-5)


class Interrupt(Exception):
    pass


SECRET = 0x0123456789ABCDEF0123456789ABCDEF


@pytest.fixture
def fixed_secret(monkeypatch):
    """Every new run draws SECRET instead of fresh OS entropy; returns the list of draws (one per new run)."""
    draws = []

    def draw():
        draws.append(SECRET)
        return SECRET

    monkeypatch.setattr(train, "new_run_secret", draw)
    return draws


def reference_and_interrupted_run(tmp_path, draws):
    """A 9-step run to the end in ref/, and the same run killed after step 5 in run/ (checkpoints at 0, 2, 4).

    Both runs use the same secret (``fixed_secret``), as a run and its resumption do."""
    data = tiny_datasets()
    config = tiny_config(**{"train.epochs": 1.5})  # 9 steps, checkpoints every 2, evaluations every 3
    reference = train.train_and_evaluate(config, tmp_path / "ref", datasets=data)

    def die_at_step_5(step, total, info):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.train_and_evaluate(config, tmp_path / "run", on_progress=die_at_step_5, datasets=data)
    assert len(draws) == 2  # one secret per new run
    return config, data, reference


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, fixed_secret):
    config, data, reference = reference_and_interrupted_run(tmp_path, fixed_secret)
    assert not (tmp_path / "run" / "final.json").exists()
    resumed = train.train_and_evaluate(config, tmp_path / "run", datasets=data)
    assert len(fixed_secret) == 2, "a resumed run reads its secret from the checkpoint, it draws no new one"
    assert_trees_close(final_params(tmp_path / "ref"), final_params(tmp_path / "run"), rtol=0, atol=0)
    for key in ("accuracy", "accuracy_0", "accuracy_1", "epsilon", "nonprivate_clip_fraction_0",
                "nonprivate_train_loss"):
        assert resumed["metrics"][key] == reference["metrics"][key]
    ref_rows = (tmp_path / "ref" / "history.jsonl").read_text().splitlines()
    run_rows = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "wall_time_s"} for r in rows]
    assert strip(ref_rows) == strip(run_rows)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, fixed_secret):
    config, data, reference = reference_and_interrupted_run(tmp_path, fixed_secret)
    ckpt = tmp_path / "run" / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps == [2, 4]  # the step-0 checkpoint (the secret's) was rotated out (max_to_keep=2)
    # Damage every array file of the newest step (as a disk error or a truncated copy would).
    for path in (ckpt / "4" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and path.suffix != ".json":
            path.write_bytes(b"\0" * 7)
    assert Checkpointer(ckpt).restore_latest()[0] == 2
    assert (tmp_path / "run" / "checkpoints-corrupt").is_dir()  # moved aside, not deleted
    resumed = train.train_and_evaluate(config, tmp_path / "run", datasets=data)
    assert resumed["metrics"]["accuracy"] == reference["metrics"]["accuracy"]
    assert_trees_close(final_params(tmp_path / "ref"), final_params(tmp_path / "run"), rtol=0, atol=0)


def test_batchnorm_is_refused_under_dp(tmp_path):
    with pytest.raises(ValueError, match="BatchNorm on batch statistics makes each example's gradient depend"):
        train.train_and_evaluate(tiny_config(**{"model.norm": "batch"}), tmp_path, datasets=tiny_datasets())


def test_batchnorm_trains_without_dp(tmp_path):
    config = tiny_config(**{"model.norm": "batch", "dp.enabled": False, "train.num_devices": 2})
    final = train.train_and_evaluate(config, tmp_path, datasets=tiny_datasets())
    assert final["epsilon"] == {"pld": None, "rdp": None, "rdp_classic": None}
    clip_fraction = final["metrics"]["nonprivate_clip_fraction_0"]
    assert np.isnan(clip_fraction if clip_fraction is not None else np.nan)


def test_a_workdir_with_another_config_is_refused(tmp_path):
    data = tiny_datasets()
    train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5}), tmp_path, datasets=data)
    (tmp_path / "final.json").unlink()
    with pytest.raises(ValueError, match="holds a different config"):
        train.train_and_evaluate(
            tiny_config(**{"train.epochs": 0.5, "dp.noise_multiplier": 2.0}), tmp_path, datasets=data
        )


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("data.female_fraction", 1.0, r"config.data.female_fraction=1.0 must be in \(0, 1\)"),
        ("dp.l2_clip_norm", 0.0, "config.dp.l2_clip_norm=0.0 must be > 0"),
        ("dp.sampling", "uniform", "config.dp.sampling='uniform'; choose 'poisson' or 'fixed'"),
        ("optim.name", "nosuchopt", "config.optim.name='nosuchopt' is not an optax optimiser"),
        ("train.num_devices", 64, "num_devices must be between 1 and"),
    ],
)
def test_invalid_config_values_are_named(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(tiny_config(**{key: value}), tmp_path, datasets=tiny_datasets())
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_end_to_end_dp_run_on_generated_celeba_beats_chance(tmp_path):
    """Generated CelebA-format files -> tfds builder -> imbalanced subset -> DP-SGD -> per-group evaluation."""
    c = tiny_config()
    c.data.source = "synthetic"
    c.data.data_dir = str(tmp_path / "data")
    c.data.synthetic_num_images = 2500
    c.data.total = 1200
    c.data.split_scheme = "official"  # balanced test set: 50% is chance for both groups
    c.data.female_fraction = 0.7
    c.data.image_size = 32
    # The demo's model (configs/demo.py): few parameters and a large batch, so DP-SGD learns in ~100 steps.
    c.model.stage_sizes = (1, 1, 1)
    c.model.width = 8
    c.model.num_groups = 8
    c.dp.noise_multiplier = 0.5
    c.dp.l2_clip_norm = 1.0
    c.dp.noise_mechanism = "gaussian"  # epsilon 53 here: beyond what the lattice's total variation can certify
    c.dp.clipping_strategy = "bookkeeping"
    c.optim.learning_rate = 5e-3
    c.train.batch_size = 128
    c.train.epochs = 12
    c.train.eval_every_steps = 45
    c.train.checkpoint_every_steps = 200
    c.train.eval_batch_size = 80
    final = train.train_and_evaluate(c, tmp_path / "run")
    m = final["metrics"]
    assert final["train_size"] == 960 and m["n_0"] + m["n_1"] == 240, final
    # The lower end of the 95% interval of the overall accuracy clears chance (50%).
    n = m["n_0"] + m["n_1"]
    p = m["accuracy"] / 100
    assert p - 1.96 * np.sqrt(p * (1 - p) / n) > 0.5, m["accuracy"]
    assert final["epsilon"]["pld"] < final["epsilon"]["rdp_classic"]


# --- issue 11: what a run writes must not undo its epsilon ------------------------------------------------------


def _written_files(workdir: Path) -> list[Path]:
    """Every file a run writes outside its checkpoints (what a run's reader sees)."""
    return [p for p in workdir.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts]


def test_sampling_and_noise_come_from_a_secret_kept_only_in_checkpoints(tmp_path, monkeypatch, capfd):
    """Two runs of one config differ (their randomness is not the public train.seed), and the secret appears
    in no file, log line or run name outside the checkpoints, which hold it for exact resumption."""
    drawn = []
    real = train.new_run_secret

    def spy():
        drawn.append(real())
        return drawn[-1]

    monkeypatch.setattr(train, "new_run_secret", spy)
    data = tiny_datasets()
    config = tiny_config(**{"train.epochs": 0.5, "train.progress": True, "train.keep_checkpoints": True})
    a = train.train_and_evaluate(config, tmp_path / "a", datasets=data)
    train.train_and_evaluate(config, tmp_path / "b", datasets=data)
    assert len(drawn) == 2 and drawn[0] != drawn[1] and drawn[0].bit_length() > 64
    params_a, params_b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(params_a),
                                                        jax.tree_util.tree_leaves(params_b), strict=True))
    assert a["reproducible"] is False and a["privacy_note"] is None
    logs = capfd.readouterr()
    for secret, run in zip(drawn, ("a", "b"), strict=True):
        spellings = {f"{secret:x}", f"{secret:032x}", str(secret)}
        for path in _written_files(tmp_path / run):
            text = path.read_text(errors="replace")
            assert not any(s in text for s in spellings), path
        assert not any(s in logs.out + logs.err for s in spellings)
        record = Checkpointer(tmp_path / run / "checkpoints").latest_record()
        assert int(record["run_secret"], 16) == secret


def test_reproducible_runs_replay_and_say_their_epsilon_is_no_guarantee(tmp_path, capsys):
    data = tiny_datasets()
    config = tiny_config(**{"train.epochs": 0.5, "dp.reproducible": True, "train.progress": True,
                            "train.keep_checkpoints": True})
    a = train.train_and_evaluate(config, tmp_path / "a", datasets=data)
    train.train_and_evaluate(config, tmp_path / "b", datasets=data)
    assert_trees_close(final_params(tmp_path / "a"), final_params(tmp_path / "b"), rtol=0, atol=0)
    assert a["reproducible"] is True and "not a guarantee against anyone who knows the seed" in a["privacy_note"]
    assert "reproducible seed: eps is no guarantee" in capsys.readouterr().out
    assert "run_secret" not in Checkpointer(tmp_path / "a" / "checkpoints").latest_record()


# Keys of a history row that are not statistics of the training data (test metrics, progress, epsilon).
_PUBLIC_ROW_KEYS = {"step", "epoch", "wall_time_s", "epsilon", "epsilon_note"}


def _is_test_metric(key: str) -> bool:
    from jaxdp import fairness

    names = fairness.group_metrics(np.array([0, 1, 0, 1]), np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]))
    return key in names


def test_training_data_statistics_are_labelled_nonprivate_and_can_be_turned_off(tmp_path):
    data = tiny_datasets()
    final = train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5}), tmp_path / "on", datasets=data)
    rows = [json.loads(line) for line in (tmp_path / "on" / "history.jsonl").read_text().splitlines()]
    for row in rows + [final["metrics"]]:
        unlabelled = [k for k in row if k not in _PUBLIC_ROW_KEYS and not _is_test_metric(k)
                      and not k.startswith("nonprivate_")]
        assert not unlabelled, unlabelled
    assert "nonprivate_train_loss" in final["metrics"] and "train_loss" not in final["metrics"]

    off = train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5, "train.nonprivate_diagnostics": False}),
                                   tmp_path / "off", datasets=data)
    for path in _written_files(tmp_path / "off"):
        text = path.read_text(errors="replace")  # params.msgpack is binary
        assert '"nonprivate_' not in text.replace('"nonprivate_diagnostics": false', ""), path
    assert not any(k.startswith("nonprivate_") for k in off["metrics"])


def test_noise_multiplier_zero_under_dp_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"config.dp.noise_multiplier=0.0 must be > 0 under DP .* "
                                         r"set config.dp.enabled=False"):
        train.train_and_evaluate(tiny_config(**{"dp.noise_multiplier": 0.0}), tmp_path, datasets=tiny_datasets())
    assert not (tmp_path / "checkpoints").exists()


def test_final_json_splits_the_wall_time(tmp_path):
    final = train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5, "dp.clipping_strategy": "auto"}), tmp_path,
                                     datasets=tiny_datasets())
    split = final["time_split_s"]
    assert list(split) == ["compile", "init", "data", "train_steps", "evaluation", "accounting", "checkpoints",
                           "other"]
    assert all(v >= 0 for v in split.values()) and split["compile"] > 0 and split["train_steps"] > 0
    # The phases cover the whole run, each second once (compile is subtracted from the phase it happened in).
    assert sum(split.values()) == pytest.approx(final["wall_time_s"], rel=0.01, abs=0.01)
    # The default strategy "auto" is resolved before training and recorded with its reason.
    assert final["clipping_strategy"] == "bookkeeping" and final["clipping_strategy_reason"].startswith("auto: ")
    assert final["chunk_widths"] == list(sampling.chunk_widths(final["train_size"], final["sampling_prob"],
                                                               multiple=final["devices"]))


# --- issue 14: the privacy audit at the end of a run ---------------------------------------------------------------


def audit_config(**overrides):
    return tiny_config(**{"audit.enabled": True, "audit.mia_examples_per_group": 8, "audit.canaries_per_group": 16,
                          "train.epochs": 1.0, **overrides})


def test_audited_run_reports_mia_and_a_lower_bound_per_group_without_changing_its_epsilon(tmp_path):
    train_split, test_split = tiny_datasets()
    holdout, _ = tiny_datasets(n_train=160, seed=1)
    holdout.group[:80], holdout.group[80:] = 0, 1  # 80 held-out examples per group
    final = train.train_and_evaluate(audit_config(), tmp_path / "audit", datasets=(train_split, test_split, holdout))
    plain = train.train_and_evaluate(tiny_config(**{"train.epochs": 1.0}), tmp_path / "plain",
                                     datasets=(train_split, test_split))
    # The canaries that joined training change neither q, the steps nor epsilon (they depend on secret coins).
    assert final["steps"] == plain["steps"] and final["sampling_prob"] == plain["sampling_prob"]
    assert final["epsilon"] == plain["epsilon"] and final["train_size"] == len(train_split.label)
    assert final["chunk_widths"] == plain["chunk_widths"]  # the compiled steps' shapes do not show the coins either
    audit = final["audit"]["nonprivate"]
    for g in (0, 1):
        assert audit[f"mia_members_{g}"] == audit[f"mia_nonmembers_{g}"] == 8
        assert 0.0 <= audit[f"mia_auc_{g}"] <= 1.0 and f"mia_cal_auc_{g}" in audit
        assert audit[f"epsilon_lower_bound_canaries_{g}"] == 16
        assert audit[f"epsilon_lower_bound_{g}"] <= final["epsilon"]["pld"]
    assert final["audit"]["settings"]["canaries_per_group"] == 16


@pytest.mark.parametrize("overrides, message", [
    ({"audit.num_guess_in": 17}, r"num_guess_in=17 must be None or in \[0, config.audit.canaries_per_group=16\]"),
    ({"audit.num_guess_out": -1}, r"config.audit.num_guess_out=-1 must be None or in \[0,"),
    ({"dp.sampling": "fixed", "dp.accountant": "rdp"}, r"audit needs config.dp.sampling='poisson' \(got 'fixed'\)"),
    ({"train.nonprivate_diagnostics": False}, r"nonprivate_diagnostics=False: the audit's results are statistics"),
    ({"audit.mia_examples_per_group": 0, "audit.canaries_per_group": 0}, r"audits nothing"),
])
def test_impossible_audit_configs_are_refused_by_validation(overrides, message):
    from jaxdp.config import validate_run_config

    with pytest.raises(ValueError, match=message):
        validate_run_config(audit_config(**overrides))


def test_audit_asking_for_more_held_out_examples_than_exist_is_refused_before_training(tmp_path):
    from jaxdp import data

    config = audit_config(**{"audit.mia_examples_per_group": 300, "audit.canaries_per_group": 300})
    config.data.source, config.data.total, config.data.synthetic_num_images = "synthetic", 200, 400
    config.data.split_scheme, config.data.data_dir = "official", str(tmp_path / "data")
    capacity = data.holdout_capacity(config.data)
    with pytest.raises(ValueError, match=rf"needs 300 non-members \+ 300 canaries = 600 held-out examples per group, "
                                         rf"but config.data leaves {capacity[0]} \(female\) and {capacity[1]} "
                                         rf"\(male\).*<= {min(capacity.values())}"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match="needs held-out examples"):
        train.train_and_evaluate(audit_config(), tmp_path / "run2", datasets=tiny_datasets())


def test_secure_noise_trains_and_is_part_of_the_run_identity(tmp_path):
    data = tiny_datasets()
    gaussian = {"train.epochs": 0.5, "dp.reproducible": True, "dp.noise_mechanism": "gaussian"}  # secure's mechanism
    plain = train.train_and_evaluate(tiny_config(**gaussian), tmp_path / "plain", datasets=data)
    secure = train.train_and_evaluate(tiny_config(**gaussian, **{"dp.secure_noise": True}), tmp_path / "secure",
                                      datasets=data)
    assert secure["epsilon"] == plain["epsilon"]  # the same Gaussian mechanism, other draws
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(final_params(tmp_path / "plain")),
                                                        jax.tree_util.tree_leaves(final_params(tmp_path / "secure")),
                                                        strict=True))
    assert json.loads((tmp_path / "secure" / "config.json").read_text())["dp"]["secure_noise"] is True


# --- issue 13: DP-fairness methods and the misalignment diagnostics ------------------------------------------------


@pytest.mark.parametrize("method", ["dpsgd_f", "dpsgd_global_adapt"])
def test_a_method_trains_records_its_releases_and_writes_its_state(tmp_path, method):
    from jaxdp import accounting

    data = tiny_datasets()
    final = train.train_and_evaluate(tiny_config(**{"dp.method": method}), tmp_path / method, datasets=data)
    plain = train.train_and_evaluate(tiny_config(), tmp_path / "plain", datasets=data)
    z_eff = accounting.combined_noise_multiplier(0.5, (10.0,))
    for name in ("pld", "rdp", "rdp_classic"):
        assert final["epsilon"][name] == accounting.epsilon(z_eff, final["sampling_prob"], final["steps"], 1e-6, name,
                                                            mechanism=final["noise_mechanism"],
                                                            num_params=final["noised_coordinates"])
        assert final["epsilon"][name] > plain["epsilon"][name]
    assert (final["method"], final["extra_noise_multipliers"], final["group_names"]) == \
        (method, [10.0], ["female", "male"])
    assert (plain["method"], plain["extra_noise_multipliers"]) == ("dpsgd", [])
    resolved = json.loads((tmp_path / method / "config.json").read_text())["dp"][method]
    assert resolved["count_noise_multiplier"] == 10.0 and None not in resolved.values()
    rows = [json.loads(line) for line in (tmp_path / method / "history.jsonl").read_text().splitlines()]
    state_keys = {"dpsgd_f": ("method_clip_norm_0", "method_clip_norm_1"), "dpsgd_global_adapt": ("method_threshold",)}
    for row in rows:
        # The method's state is post-processing of its noisy releases (covered by epsilon): not labelled non-private.
        assert all(row[k] > 0 for k in state_keys[method])
        assert all(-1 <= row[f"nonprivate_cos_{d}_{g}"] <= 1 for d in ("unclipped", "clipped", "noised")
                   for g in ("0", "1", "all"))
    if method == "dpsgd_f":
        assert all(1.0 <= row["method_clip_norm_0"] <= 3.0 for row in rows)  # C0 <= C_k <= (1 + K) C0, C0 = C = 1


def test_global_clipping_turns_the_update_by_nothing_when_every_norm_is_below_z(tmp_path):
    final = train.train_and_evaluate(tiny_config(**{"dp.method": "dpsgd_global", "train.epochs": 0.5}), tmp_path,
                                     datasets=tiny_datasets())
    m = final["metrics"]
    # Every norm is below Z = 100, so every example is scaled by the same C / Z: the clipped sum is parallel to the
    # unclipped one (the misalignment comes from the noise alone); the method releases nothing else.
    for g in ("0", "1", "all"):
        assert m[f"nonprivate_cos_clipped_{g}"] == pytest.approx(m[f"nonprivate_cos_unclipped_{g}"], abs=1e-5)
    assert m["nonprivate_clip_fraction_0"] == 0.0 and final["extra_noise_multipliers"] == []
    assert not [k for k in m if k.startswith("method_")]


def test_misalignment_is_measured_only_for_private_runs_and_can_be_turned_off(tmp_path):
    data = tiny_datasets()
    nondp = train.train_and_evaluate(tiny_config(**{"dp.enabled": False, "train.epochs": 0.5}), tmp_path / "a",
                                     datasets=data)
    off = train.train_and_evaluate(tiny_config(**{"train.misalignment_examples_per_group": 0, "train.epochs": 0.5}),
                                   tmp_path / "b", datasets=data)
    for final in (nondp, off):
        assert not [k for k in final["metrics"] if k.startswith("nonprivate_cos")]
    assert "nonprivate_clip_fraction_0" in off["metrics"]


@pytest.mark.parametrize("method", ["dpsgd_f", "dpsgd_global_adapt"])
def test_a_method_follows_the_same_trajectory_on_one_and_four_devices(tmp_path, method):
    params = {}
    for n in (1, 4):
        config = tiny_config(**{"train.num_devices": n, "dp.method": method, "train.epochs": 1.0,
                                "dp.reproducible": True})
        final = train.train_and_evaluate(config, tmp_path / str(n), datasets=tiny_datasets())
        params[n] = (final_params(tmp_path / str(n)),
                     {k: v for k, v in final["metrics"].items() if k.startswith("method_")})
    assert_trees_close(params[1][0], params[4][0], rtol=1e-4, atol=1e-5)
    assert params[1][1] == pytest.approx(params[4][1], rel=1e-6)  # the counts, hence the state, are exact


def test_a_killed_run_with_a_method_resumes_exactly(tmp_path, fixed_secret):
    data = tiny_datasets()
    config = tiny_config(**{"train.epochs": 1.5, "dp.method": "dpsgd_global_adapt"})
    reference = train.train_and_evaluate(config, tmp_path / "ref", datasets=data)

    def die_at_step_5(step, total, info):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.train_and_evaluate(config, tmp_path / "run", on_progress=die_at_step_5, datasets=data)
    resumed = train.train_and_evaluate(config, tmp_path / "run", datasets=data)
    assert_trees_close(final_params(tmp_path / "ref"), final_params(tmp_path / "run"), rtol=0, atol=0)
    assert resumed["metrics"]["method_threshold"] == reference["metrics"]["method_threshold"]
    assert resumed["metrics"]["nonprivate_cos_noised_1"] == reference["metrics"]["nonprivate_cos_noised_1"]


@pytest.mark.slow
def test_demo_audit_lower_bound_stays_below_the_reported_epsilon_at_high_privacy(tmp_path):
    """configs/demo_audit.py's high-privacy run at 90% female (the smallest minority), as configured except that the
    generated pool is 6,000 images instead of 30,000 (enough for its 2,400-image subset and 200 held-out examples
    per group): the one-run audit's 95% lower bound stays below the reported epsilon, and could have exceeded it."""
    from jaxdp_study import grid

    config_file = Path(__file__).parents[1] / "configs" / "demo_audit.py"
    (run,) = [r for r in grid.expand(grid.load_config(config_file)) if r.name.startswith("high-ff0.9")]
    config = run.config
    config.data.synthetic_num_images, config.data.data_dir = 6_000, str(tmp_path / "data")
    config.train.progress = False
    final = train.train_and_evaluate(config, tmp_path / "run")
    audit, epsilon = final["audit"]["nonprivate"], final["epsilon"]["pld"]
    for g in (0, 1):
        assert audit[f"epsilon_lower_bound_max_{g}"] > epsilon, "the audit could not have caught a violation"
        assert audit[f"epsilon_lower_bound_{g}"] <= epsilon, audit


def test_two_chunk_widths_follow_the_same_trajectory(tmp_path):
    from jaxdp import sampling

    # 96 examples, q = 1/6: chunk widths (17, 25); the 6 steps' batches take both.
    widths = sampling.chunk_widths(96, 16 / 96, 2)
    sampler = sampling.PoissonSampler(96, 16 / 96, physical_batch_size=widths, seed=0)  # train.seed (reproducible)
    assert len({sampler.batch(s).indices.shape[1] for s in range(6)}) == 2
    params = {}
    for n in (1, 2):
        config = tiny_config(**{"train.num_chunk_widths": n, "dp.reproducible": True})
        final = train.train_and_evaluate(config, tmp_path / str(n), datasets=tiny_datasets())
        params[n] = final_params(tmp_path / str(n))
        assert final["steps"] == 6
    assert_trees_close(params[1], params[2], rtol=1e-4, atol=1e-5)


def test_a_batch_split_over_several_chunks_takes_the_same_step_as_one_chunk(tmp_path, monkeypatch):
    from jaxdp import sampling

    # Chunks of 6: every batch (about 16 examples) takes 2-4 chunks through the one compiled train_step, whose
    # update counts only on the last; the run must follow the one-chunk run, misalignment measurements included
    # (they use the step's whole clipped sum and its one noise draw).
    config = tiny_config(**{"train.epochs": 1.0, "dp.reproducible": True, "train.num_devices": 1})
    one = train.train_and_evaluate(config, tmp_path / "one", datasets=tiny_datasets())
    monkeypatch.setattr(sampling, "default_physical_batch_size", lambda n, q, overflow_prob=0.01: 6)
    split = train.train_and_evaluate(config, tmp_path / "split", datasets=tiny_datasets())
    assert split["chunk_widths"] == [6] and one["chunk_widths"][0] > 16
    assert split["steps"] == one["steps"] == 6 and split["epsilon"] == one["epsilon"]
    assert_trees_close(final_params(tmp_path / "one"), final_params(tmp_path / "split"), rtol=1e-4, atol=1e-5)
    rows = [[json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
            for name in ("one", "split")]
    for a, b in zip(*rows, strict=True):
        assert a["nonprivate_train_examples_0"] == b["nonprivate_train_examples_0"]
        for key in ("nonprivate_cos_clipped_0", "nonprivate_cos_noised_1", "nonprivate_cos_unclipped_all", "accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


@pytest.mark.parametrize("method", ["dpsgd", "dpsgd_f", "dpsgd_global_adapt"])
def test_the_compiled_step_holds_no_secret(method):
    # A value closed over by a jitted function is compiled into the program as a constant, and so written to the
    # persistent compilation cache (<workdir>/.xla_cache): every secret (the noise and count-noise keys) must be
    # an argument. Two secrets must give the very same program, and no word of the secret keys may appear in it.
    import functools

    from jaxdp import diagnostics, models, parallel, steps

    config = tiny_config(**{"dp.method": method})
    train_set, _ = tiny_datasets()
    mesh = parallel.make_mesh(1)
    model = models.create_model(config.model, private=True)
    variables = models.init_variables(model, jax.random.key(0, impl="rbg"))
    texts, words = [], []
    for secret in (2**100 + 7, 2**100 + 8):
        plan = steps.plan_from_config(config, model, len(train_set.label), secret=secret, mesh=mesh)
        state = plan.init(variables["params"])
        batch = plan.sampler.batch(0)
        (chunk,) = steps.step_batches(mesh, train_set, batch.indices, batch.mask)
        step = jax.jit(functools.partial(steps.train_step, plan=plan, flip_key=None, diagnostics_on=True,
                                         return_update=True))
        texts.append(step.lower(state, diagnostics.zero_stats(True), plan.zero_accumulator(state.params), chunk,
                                np.int32(0), np.bool_(True), np.bool_(True)).as_text())
        noise_key = state.opt_state[0].key
        count_key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(noise_key, impl="rbg"), 1))
        words += [int(w) for w in np.concatenate([np.ravel(noise_key), np.ravel(count_key)])]
    assert texts[0] == texts[1]
    assert not [w for w in words if str(w) in texts[0]]


def _secret_byte_strings(secret: int) -> dict[str, bytes]:
    """Every way the run's secret, its child seeds and its noise key could sit in a file, as bytes."""
    from jaxdp import noise
    from jaxdp.plan import _NOISE_STREAM, _SAMPLER_STREAM, AUDIT_STREAM, child_seed

    out = {}
    seeds = {"secret": secret, **{f"child{s}": child_seed(secret, s) for s in (_SAMPLER_STREAM, _NOISE_STREAM,
                                                                                 AUDIT_STREAM)}}
    for name, value in seeds.items():
        out[f"{name}-be"] = value.to_bytes(16, "big")
        out[f"{name}-le"] = value.to_bytes(16, "little")
        out[f"{name}-hex"] = f"{value:032x}".encode()
        out[f"{name}-dec"] = str(value).encode()
    words = np.asarray(jax.random.key_data(noise.key_from_seed(child_seed(secret, _NOISE_STREAM))), np.uint32)
    out["noise-key-words"] = words.tobytes()
    out["noise-key-words-be"] = words.byteswap().tobytes()
    return out


def test_a_finished_run_leaves_no_byte_of_its_secret_and_publishes_its_params(tmp_path, fixed_secret):
    import flax.serialization

    final = train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5}), tmp_path, datasets=tiny_datasets())
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "checkpoints-corrupt").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"params.msgpack", "model.json", "final.json", "config.json", "history.jsonl"} <= {p.name for p in files}
    for path in files:
        content = path.read_bytes()
        for name, pattern in _secret_byte_strings(SECRET).items():
            assert pattern not in content, (path, name)
    # The published model: Flax variables in one line, and a card with epsilon and no non-private statistic.
    variables = flax.serialization.msgpack_restore((tmp_path / "params.msgpack").read_bytes())
    assert set(variables) == {"params"} and jax.tree_util.tree_leaves(variables["params"])
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["privacy"]["epsilon"] == final["epsilon"] and card["privacy"]["delta"] == 1e-6
    assert card["test_metrics"]["accuracy"] == final["metrics"]["accuracy"]
    assert not [k for k in json.dumps(card).split('"') if k.startswith("nonprivate_")]


def test_keep_checkpoints_keeps_the_secret_with_a_warning(tmp_path, fixed_secret, capsys):
    config = tiny_config(**{"train.epochs": 0.5, "train.keep_checkpoints": True})
    train.train_and_evaluate(config, tmp_path, datasets=tiny_datasets())
    assert int(Checkpointer(tmp_path / "checkpoints").latest_record()["run_secret"], 16) == SECRET
    assert "holds the run's secret" in capsys.readouterr().out
    # Rerunning the finished run without the flag deletes what it kept.
    train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5}), tmp_path, datasets=tiny_datasets())
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_on_another_training_set_is_refused(tmp_path, fixed_secret):
    config, data, _ = reference_and_interrupted_run(tmp_path, fixed_secret)
    other = tiny_datasets(seed=1)
    with pytest.raises(ValueError, match="were written for another training set"):
        train.train_and_evaluate(config, tmp_path / "run", datasets=other)
    resumed = train.train_and_evaluate(config, tmp_path / "run", datasets=data)  # the right data still resumes
    assert resumed["steps"] == 9


def test_every_history_row_of_a_reproducible_run_says_its_epsilon_is_no_guarantee(tmp_path):
    config = tiny_config(**{"train.epochs": 1.0, "dp.reproducible": True})
    train.train_and_evaluate(config, tmp_path, datasets=tiny_datasets())
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("not a guarantee" in row["epsilon_note"] for row in rows)


def test_a_stop_signal_saves_a_checkpoint_at_the_end_of_the_step_and_resumes_exactly(tmp_path, fixed_secret):
    """SIGTERM (what SLURM sends) in the middle of step 3: the step finishes, a checkpoint of step 3 is written
    (checkpoints are every 2 steps otherwise), the run stops with runlog.Stopped, and the rerun ends where an
    uninterrupted run ends."""
    import os
    import signal

    from jaxdp import runlog

    config, data = tiny_config(**{"train.epochs": 1.0}), tiny_datasets()
    reference = train.train_and_evaluate(config, tmp_path / "ref", datasets=data)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    runlog.install_stop_handlers()

    def terminate_at_step_3(step, total, info):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with pytest.raises(runlog.Stopped) as stopped:
            train.train_and_evaluate(config, tmp_path / "run", on_progress=terminate_at_step_3, datasets=data)
    finally:
        runlog.clear_stop_request()
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stopped.value.exit_code == 143
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps()[-1] == 3
    resumed = train.train_and_evaluate(config, tmp_path / "run", datasets=data)
    assert resumed["metrics"]["accuracy"] == reference["metrics"]["accuracy"]
    assert_trees_close(final_params(tmp_path / "ref"), final_params(tmp_path / "run"), rtol=0, atol=0)


def test_runs_use_the_lattice_mechanism_by_default_and_refuse_secure_noise_with_it(tmp_path):
    from jaxdp import lattice

    final = train.train_and_evaluate(tiny_config(**{"train.epochs": 0.5, "dp.reproducible": True}), tmp_path,
                                     datasets=tiny_datasets())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dp"]["noise_mechanism"] == "lattice" and final["steps"] == 3
    # The plan's release is (k + N) gamma / B: on a zero sum, integer multiples of gamma / B, gamma a power of two.
    from jaxdp import steps

    plan = steps.plan_from_config(tiny_config(**{"dp.reproducible": True}), None, 96, secret=None)
    grads = {"w": jnp.zeros((50, 40), jnp.float32)}
    released, _ = plan.noise.update(grads, plan.noise.init(grads), None)
    gamma = 2.0 ** -lattice.lattice_exponent(1.0, 2000, 0.5)
    units = np.asarray(released["w"], np.float64) * 16 / gamma
    np.testing.assert_array_equal(units, np.round(units))
    assert np.std(units) * gamma == pytest.approx(0.5, rel=0.05)  # z C, in the sum's units
    with pytest.raises(ValueError, match="config.dp.secure_noise=True draws float Gaussian noise"):
        train.train_and_evaluate(tiny_config(**{"dp.secure_noise": True}), tmp_path / "x", datasets=tiny_datasets())
