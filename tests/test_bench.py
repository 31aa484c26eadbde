"""The benchmark times the training step itself, runs end to end at a tiny size and reports every field (its numbers
are not checked: timing is the benchmark's job, not the tests')."""

import builtins
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

from jaxdp import steps
from jaxdp.plan import DPConfig
from jaxdp_study import bench, grid, measurements
from jaxdp_study.bench import small_models, workloads

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(rounds=2, settle_s=0.0, warmup_s=0.0)


def tiny_resnet_config(**overrides):
    """configs/tiny.py's model shrunk further so that the compiles stay short (one stage, 8x8 images)."""
    config = grid.load_config(str(ROOT / "configs" / "tiny.py"))
    config.data.image_size, config.train.batch_size = 8, 4
    config.model.stage_sizes, config.model.width, config.model.num_groups = (1,), 4, 2
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def tiny_plan_workload(**kwargs):
    """A user workload small enough to compile in a second: an MLP with one hidden layer of 8 on 4 features."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4), dtype=np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    return workloads.PlanWorkload(
        "tiny-mlp-b8", "a tiny MLP", small_models.MLP(hidden=(8,)), {"x": x[:48], "y": y[:48]},
        (rng.random(48) < 0.3).astype(np.int32), dp=DPConfig(l2_clip_norm=1.0, noise_multiplier=1.0, delta=1e-5),
        optimizer=lambda: optax.sgd(0.1), batch_size=8, epochs=1, torch_model=("mlp", dict(features=4, hidden=(8,))),
        optimizer_settings=dict(optimizer="sgd", learning_rate=0.1, weight_decay=0.0), test=(x[48:], y[48:]),
        **kwargs)


def _check_entry(entry):
    assert entry["error"] is None, entry["error"]
    assert len(entry["step_s"]) == 2 and all(t > 0 for t in entry["step_s"])
    assert entry["examples_per_s"] > 0 and entry["vs_jax_nonprivate"] > 0
    if entry["framework"] == "jax" and not entry["breakdown"]:
        # A tiny step may reuse resident pages and grow RSS by nothing, so only presence is checked.
        assert entry["compile_s"] > 0 and entry["peak_memory_bytes"] >= 0


# --- the benchmark's step is the training step ------------------------------------------------------------------


def test_the_config_entry_is_the_program_train_and_evaluate_runs(tmp_path, monkeypatch):
    from test_train import tiny_config, tiny_datasets

    from jaxdp import train

    captured = []
    real = steps.jit_train_step

    def spy(config, plan):  # records the program of the first step the training loop runs
        step_fn = real(config, plan)

        def call(*args):
            if not captured:
                captured.append(step_fn.lower(*args).as_text())
            return step_fn(*args)

        return call

    monkeypatch.setattr(steps, "jit_train_step", spy)
    config = tiny_config(**{"train.epochs": 0.2})
    train_set, test_set = tiny_datasets()
    final = train.train_and_evaluate(config, tmp_path / "run", datasets=(train_set, test_set))
    monkeypatch.setattr(steps, "jit_train_step", real)
    workload = workloads.ConfigWorkload(config, dataset_size=len(train_set.label))
    step = workload.jax_step(True)
    assert step.plan.sampler.chunk_widths == tuple(final["chunk_widths"])
    assert step.lowered.as_text() == captured[0]  # the same compiled program, to the character
    # The comparison tells programs apart: a step without the diagnostics' statistics is another program.
    other = workloads.ConfigWorkload(tiny_config(**{"train.epochs": 0.2, "train.nonprivate_diagnostics": False}),
                                     dataset_size=len(train_set.label)).jax_step(True)
    assert other.lowered.as_text() != captured[0]


def test_a_user_workload_times_the_plans_own_train_step(monkeypatch):
    plans = []
    real = workloads.make_plan
    monkeypatch.setattr(workloads, "make_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    result = bench.run_benchmark(tiny_plan_workload(), strategies=["vmap"], methods=["dpsgd_f"],
                                 include_noise_only=False, **FAST)
    names = [r["name"] for r in result["results"]]
    assert names == ["jax nonprivate", "jax dp vmap", "jax dp vmap dpsgd_f"]
    assert [p.private for p in plans] == [False, True, True] and plans[2].method.name == "dpsgd_f"
    # Each entry ran its plan's train_step, whose one compiled program is its chunk step: one each, nothing else.
    assert [p.chunk_step._cache_size() for p in plans] == [1, 1, 1]
    for entry in result["results"]:
        _check_entry(entry)
    config = result["config"]
    assert (config["workload"], config["batch_size"], config["dataset_size"], config["chunk_width"]) == (
        "tiny-mlp-b8", 8, 48, plans[0].sampler.chunk_widths[-1])
    assert config["parameters"] == 4 * 8 + 8 + 8 * 2 + 2


def test_there_is_no_dp_step_of_the_benchmarks_own():
    # Every jaxdp step comes from the plan: the benchmark never builds clipping, noise or an optimiser update itself.
    sources = "\n".join(p.read_text() for p in (ROOT / "jaxdp_study" / "bench").glob("*.py")
                        if p.name not in ("user_runs.py",))  # the "as written" user script is the exception
    for call in ("clipped_grad(", "dp_noise(", "apply_updates(", ".update(grads"):
        assert call not in sources, call


# --- the step benchmark -----------------------------------------------------------------------------------------


def test_a_config_step_benchmark_reports_every_field():
    workload = workloads.ConfigWorkload(tiny_resnet_config(), dataset_size=200)
    result = bench.run_benchmark(workload, strategies=["vmap", "auto"], **FAST)
    names = [r["name"] for r in result["results"]]
    # "auto" is named after the strategy it picks (bookkeeping, for a ResNet); the breakdown comes last.
    assert names == ["jax nonprivate", "jax dp vmap", "jax dp bookkeeping", "jax dp noise+update only"]
    for entry in result["results"]:
        _check_entry(entry)
        assert entry["vs_fastest_opacus"] is None
    assert [r["breakdown"] for r in result["results"]] == [False, False, False, True]
    assert result["results"][0]["vs_jax_nonprivate"] == 1.0
    config = result["config"]
    # 200 examples, q = 4/200: P(Binomial(200, 0.02) > 9) < 1%, so 9 slots (jaxdp.sampling), padded to a multiple
    # of the test session's 4 devices (the run's mesh): 12.
    assert (config["workload"], config["input_shape"], config["chunk_width"]) == ("resnet-s1-w4-8px-b4", [8, 8, 3],
                                                                                  12)
    assert result["environment"]["memory_method"] == "rss growth per step"
    json.dumps(result)
    table = bench.format_table(result)
    assert table.count("\n| jax ") == 4 and "(chunk width 12)" in table.splitlines()[0]


def test_method_entries_follow_their_strategy_and_compare_with_its_dp_sgd_step():
    workload = workloads.ConfigWorkload(tiny_resnet_config(), dataset_size=200)
    result = bench.run_benchmark(workload, strategies=["vmap"], methods=bench.METHOD_NAMES, include_noise_only=False,
                                 **FAST)
    names = [r["name"] for r in result["results"]]
    assert names == ["jax nonprivate", "jax dp vmap", "jax dp vmap dpsgd_f", "jax dp vmap dpsgd_global",
                     "jax dp vmap dpsgd_global_adapt"]
    for entry in result["results"]:
        _check_entry(entry)
        assert (entry["vs_dpsgd"] is not None) == (entry["name"].split()[-1] in bench.METHOD_NAMES)
    assert result["config"]["methods"] == list(bench.METHOD_NAMES)
    assert "| vs DP-SGD |" in bench.format_table(result)


def test_mechanism_entries_time_the_step_with_the_other_noise_and_compare_with_the_default():
    workload = workloads.ConfigWorkload(tiny_resnet_config(), dataset_size=200)
    result = bench.run_benchmark(workload, strategies=["vmap"], mechanisms=["gaussian"], include_noise_only=False,
                                 **FAST)
    names = [r["name"] for r in result["results"]]
    assert names == ["jax nonprivate", "jax dp vmap", "jax dp vmap [gaussian]"]
    for entry in result["results"]:
        _check_entry(entry)
    assert result["results"][2]["vs_dpsgd"] > 0 and result["config"]["mechanisms"] == ["gaussian"]
    gaussian_step = workload.jax_step(True, "vmap", mechanism="gaussian")
    assert gaussian_step.plan.dp.noise_mechanism == "gaussian"
    assert workload.jax_step(True, "vmap").plan.dp.noise_mechanism == "lattice"  # the default
    with pytest.raises(ValueError, match="Unknown noise mechanisms"):
        bench.run_benchmark(workload, strategies=["vmap"], mechanisms=["laplace"], **FAST)


def test_bad_arguments_are_refused():
    workload = tiny_plan_workload()
    with pytest.raises(ValueError, match="Unknown strategies"):
        bench.run_benchmark(workload, strategies=["nope"], **FAST)
    with pytest.raises(ValueError, match="Unknown Opacus modes"):
        bench.run_benchmark(workload, compare_opacus=True, opacus_modes=["nope"], **FAST)
    with pytest.raises(ValueError, match="Unknown methods"):
        bench.run_benchmark(workload, methods=["dpsgd"], **FAST)
    with pytest.raises(ValueError, match="settle_s=-1"):
        bench.run_benchmark(workload, rounds=1, settle_s=-1)
    with pytest.raises(ValueError, match="warmup_s >= 0; got -1"):
        bench.run_benchmark(workload, rounds=1, warmup_s=-1)


def test_a_round_warms_up_for_its_warmup_time_before_the_timed_steps():
    from jaxdp_study.bench import timing

    calls = []
    entry = timing.Entry("fake", "jax", False)
    entry._run = lambda: (calls.append(None), __import__("time").sleep(0.01))
    times = timing.timed_round(entry, 3, settle_s=0.0, warmup_s=0.0)
    assert len(times) == 3 and len(calls) == 4  # the untimed step that measures memory, then the timed ones
    calls.clear()
    times = timing.timed_round(entry, 3, settle_s=0.0, warmup_s=0.1)
    assert len(times) == 3 and len(calls) >= 3 + 9  # about ten 10 ms steps of warm-up, then the timed ones


def test_compare_opacus_without_torch_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "opacus"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0 opacus"):
        bench.run_benchmark(tiny_plan_workload(), compare_opacus=True, **FAST)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0 opacus"):
        bench.run_user_loops(tiny_plan_workload(), opacus_modes=["hooks"], rounds=1)


def test_opacus_entries_run_the_same_model(tmp_path):
    pytest.importorskip("opacus")
    result = bench.run_benchmark(tiny_plan_workload(), strategies=["vmap"], compare_opacus=True,
                                 opacus_modes=["hooks", "ghost"], include_noise_only=False, **FAST)
    names = [r["name"] for r in result["results"]]
    assert names == ["jax nonprivate", "jax dp vmap", "torch nonprivate", "opacus hooks", "opacus ghost"]
    for entry in result["results"]:
        _check_entry(entry)
        assert entry["vs_fastest_opacus"] > 0
    assert max(r["vs_fastest_opacus"] for r in result["results"] if r["name"].startswith("opacus")) == 1.0
    assert {"torch", "opacus", "torch_threads"} <= set(result["environment"])


def test_the_torch_twins_have_the_jax_models_parameters():
    pytest.importorskip("opacus")
    import jax

    from jaxdp_study.bench import torch_side

    def jax_count(model, shape):
        shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, *shape), np.float32))["params"]
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))

    def torch_count(model):
        return sum(p.numel() for p in model.parameters())

    assert torch_count(torch_side.digits_cnn()) == jax_count(small_models.DigitsCNN(), (8, 8, 1)) == 21_642
    # 98*256 + 256 + 256*256 + 256 + 256*2 + 2
    assert torch_count(torch_side.mlp(98)) == jax_count(small_models.MLP(), (98,)) == 91_650
    config = tiny_resnet_config()
    from jaxdp import models

    resnet = torch_side.resnet((1,), 4, 2)
    assert torch_count(resnet) == jax_count(models.create_model(config.model, private=True), (8, 8, 3))
    assert torch_side.to_torch_layout(np.zeros((2, 8, 6, 1))).shape == (2, 1, 8, 6)


# --- workloads from configs -------------------------------------------------------------------------------------


def test_a_config_workload_takes_its_settings_from_the_config():
    demo = workloads.ConfigWorkload(grid.load_config(str(ROOT / "configs" / "demo.py")))
    # configs/demo.py: 12,800 images, 1/16 to test: 12,000 training images.
    assert (demo.name, demo.batch_size, demo.dataset_size, demo.strategies) == (
        "resnet-s111-w8-32px-b256", 256, 12_000, ("auto",))
    settings = demo.settings()
    assert (settings["l2_clip_norm"], settings["noise_multiplier"], settings["learning_rate"],
            settings["input_shape"], settings["model"]["stage_sizes"]) == (1.0, 0.7, 5e-3, [32, 32, 3], [1, 1, 1])
    resnet = workloads.ConfigWorkload(workloads.named_config("resnet18"))
    # The paper's split of 30,000: 24,000 training images.
    assert (resnet.name, resnet.dataset_size) == ("resnet18-64px-b32", 24_000)


def test_the_input_shape_comes_from_the_data_source(monkeypatch):
    from jaxdp import data

    class Features(data.DataSource):
        def input_shape(self, data_config):
            return (98,)

        def train_size(self, data_config):
            return 1234

    class Opaque(data.DataSource):
        pass

    # Registered for this test only: the registry is global, and other tests list its names.
    monkeypatch.setitem(data.core._SOURCES, "bench-test-features", Features())
    monkeypatch.setitem(data.core._SOURCES, "bench-test-opaque", Opaque())
    config = tiny_resnet_config(**{"data.source": "bench-test-features"})
    assert workloads.input_shape(config.data) == (98,) and workloads.training_set_size(config) == 1234
    assert workloads.ConfigWorkload(config).name == "resnet-s1-w4-98features-b4"
    assert workloads.input_shape(tiny_resnet_config().data) == (8, 8, 3)
    opaque = tiny_resnet_config(**{"data.source": "bench-test-opaque"})
    with pytest.raises(ValueError, match="input_shape"):
        workloads.input_shape(opaque.data)
    with pytest.raises(ValueError, match="--dataset-size"):
        workloads.training_set_size(opaque)


# --- the command line -------------------------------------------------------------------------------------------


def _load_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_bench_cli", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_resolves_flags_over_config_over_workload(monkeypatch):
    cli = _load_launcher()
    calls = []
    monkeypatch.setattr(cli.bench, "run_benchmark", lambda workload, **kw: calls.append((workload, kw)) or {})
    monkeypatch.setattr(cli.bench, "format_table", lambda result: "")
    tiny = str(ROOT / "configs" / "tiny.py")
    cli.main(["--no-record"])  # the stub result is no measurement
    cli.main(["--config", tiny, "--no-record"])
    cli.main(["--config", tiny, "--batch-size", "4", "--stage-sizes", "1,1", "--strategies", "vmap,bookkeeping",
              "--dataset-size", "100", "--no-record"])
    cli.main(["--workload", "adult-mlp", "--methods", "all", "--no-record"])
    (plain, plain_kw), (config, config_kw), (overridden, overridden_kw), (mlp, mlp_kw) = calls
    # Without flags: ResNet18 at 64x64, batch 32, every strategy (as before --config existed).
    assert (plain.name, plain.strategies, plain_kw["strategies"]) == ("resnet18-64px-b32", bench.ALL_STRATEGIES,
                                                                       None)
    assert (config.name, config.strategies, config.dataset_size) == ("resnet-s1111-w8-16px-b32", ("vmap",), 160)
    assert (overridden.name, overridden_kw["strategies"], overridden.dataset_size) == (
        "resnet-s11-w8-16px-b4", ["vmap", "bookkeeping"], 100)
    assert (mlp.name, mlp.dp.l2_clip_norm, mlp.batch_size, mlp_kw["methods"]) == (
        "adult-mlp-b256", 0.5, 256, list(bench.METHOD_NAMES))
    assert mlp.data["x"].shape == (small_models.ADULT_TRAIN, small_models.ADULT_FEATURES)


def test_cli_refuses_what_does_not_apply(capsys):
    cli = _load_launcher()
    for argv, message in (
        (["--config", "configs/nope.py"], "config file 'configs/nope.py' does not exist"),
        (["--workload", "demo", "--config", "configs/demo.py"], "--workload or --config, not both"),
        (["--workload", "digits", "--batch-size", "8"], "--batch-size apply to config workloads only"),
        (["--loop", "--config", "configs/demo.py", "--batch-size", "8"], "--batch-size do not apply to --loop"),
        (["--config", "configs/demo.py", "--run", "medium"], "apply to --loop only"),
        (["--workload", "resnet18", "--loop"], "whole user runs are written for digits (real data"),
        (["--workload", "adult-mlp", "--loop"], "whole user runs are written for digits (real data"),
        (["--workload", "digits", "--loop", "--run", "x"], "--run and --epochs apply to a config's --loop"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.slow
def test_cli_benchmarks_a_config_and_records_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(measurements.DIR_ENV, str(tmp_path))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "--config", str(ROOT / "configs" / "tiny.py"),
         "--image-size", "8", "--batch-size", "4", "--stage-sizes", "1", "--width", "4", "--num-groups", "2",
         "--dataset-size", "200", "--rounds", "2", "--settle", "0", "--warmup", "0", "--no-noise-only",
         "--strategies", "auto", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**__import__("os").environ, measurements.DIR_ENV: str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["results"]] == ["jax nonprivate", "jax dp bookkeeping"]
    (record,) = tmp_path.glob("step-*.json")
    assert re.fullmatch(r"step-cpu-resnet-s1-w4-8px-b4-\d{4}-\d\d-\d\d-\d{6}\.json", record.name)
    assert json.loads(record.read_text())["payload"] == result
    assert "| jax dp bookkeeping |" in proc.stdout


# --- whole runs -------------------------------------------------------------------------------------------------


def test_user_loops_run_each_way_and_report_accuracy_and_epsilon():
    result = bench.run_user_loops(tiny_plan_workload(), strategies=["vmap"], opacus_modes=(), rounds=2,
                                  settle_s=0.0, max_steps=3)
    assert [r["name"] for r in result["summary"]] == ["jaxdp plan vmap", "jaxdp as written vmap"]
    assert [(r["round"], r["name"]) for r in result["runs"]] == [(0, "jaxdp plan vmap"), (0, "jaxdp as written vmap"),
                                                                (1, "jaxdp plan vmap"), (1, "jaxdp as written vmap")]
    for row in result["runs"]:
        assert row["steps"] == 3 and row["run_s"] >= row["first_step_s"] > 0 and row["median_step_s"] > 0
        assert 0 <= row["test_accuracy"] <= 1 and row["epsilon"] > 0 and row["accountant"] == "pld"
    assert len(result["runs"][0]["step_s"]) == 3 and "step_s" not in result["runs"][2]
    # Both ways account 3 Poisson steps of q = 8/48 with z = 1, at delta 1e-5; the plan's lattice noise and the
    # script's float Gaussian (dp_noise's default) differ only in their samplers' own deltas, charged out of delta.
    plan, written = result["summary"]
    assert plan["epsilon"] == pytest.approx(written["epsilon"], rel=1e-5)
    assert plan["speedup_vs_opacus"] is None
    table = bench.format_runs_table(result)
    assert "| jaxdp as written vmap | 3 |" in table and "(pld) |" in table
    with pytest.raises(ValueError, match="max_steps"):
        bench.run_user_loops(tiny_plan_workload(), opacus_modes=(), rounds=1, max_steps=0)


def test_user_loops_with_opacus():
    pytest.importorskip("opacus")
    import torch

    threads = torch.get_num_threads()
    try:
        result = bench.run_user_loops(tiny_plan_workload(), strategies=["vmap"], opacus_modes=["hooks"], rounds=1,
                                      settle_s=0.0, max_steps=3, torch_threads=1)
    finally:
        torch.set_num_threads(threads)
    assert result["environment"]["torch_threads"] == 1
    plan, written, opacus = result["summary"]
    assert opacus["name"] == "opacus make_private hooks" and opacus["steps"] == 3 and opacus["accountant"] == "prv"
    assert opacus["speedup_vs_opacus"] == 1.0 and plan["speedup_vs_opacus"] > 0
    assert 0 <= opacus["test_accuracy"] <= 1 and opacus["epsilon"] > 0


@pytest.mark.slow
def test_the_digits_loop_from_the_command_line_writes_a_record_the_docs_render(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv(measurements.DIR_ENV, str(tmp_path))
    cli = _load_launcher()
    result = cli.main(["--workload", "digits", "--loop", "--max-steps", "2", "--rounds", "1", "--settle", "0",
                       "--strategies", "vmap", "--opacus-modes", ""])
    assert result["config"]["parameters"] == 21_642 and result["config"]["dataset_size"] == 1_400
    assert [r["steps"] for r in result["summary"]] == [2, 2]
    (path,) = tmp_path.glob("runs-cpu-digits-cnn-b64-*.json")
    assert f"recorded {path}" in capsys.readouterr().out
    (record,) = measurements.read_records(tmp_path)
    rendered = measurements.render_record(record)
    assert "| jaxdp plan vmap | 2 |" in rendered and "python launch/bench.py --workload digits --loop" in rendered


def test_digits_are_sklearns_bundled_digits_split_1400_397():
    pytest.importorskip("sklearn")
    x, y, x_test, y_test = small_models.digits()
    assert x.shape == (1400, 8, 8, 1) and x_test.shape == (397, 8, 8, 1) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    workload = workloads.digits_workload()
    # 1,400 / 64 = 21.9 -> 22 steps per epoch; 15 epochs = 330 steps (issue 25's run).
    assert workload.make_plan(True).num_steps == 330


# --- a config's run against its step -----------------------------------------------------------------------------


def test_loop_benchmark_pairs_each_run_with_the_step_it_ran(tmp_path, monkeypatch):
    from test_train import tiny_config, tiny_datasets

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # to see that the runs' directories are deleted
    config = tiny_config(**{"train.epochs": 0.5})  # strategy "vmap": the quickest to compile
    result = bench.run_loop_benchmark(config, rounds=2, steps_per_round=2, settle_s=0.0, datasets=tiny_datasets())
    assert list(tmp_path.iterdir()) == []
    assert sorted(result) == ["config", "environment", "rounds", "summary"]
    setup = result["config"]
    assert (setup["bench_entry"], setup["clipping_strategy"], setup["method"]) == ("jax dp vmap", "vmap", "dpsgd")
    assert setup["chunk_widths"][-1] >= 16 and setup["epochs"] == 0.5 and setup["bench_compile_s"] > 0
    for row in result["rounds"]:
        split = row["run_time_split_s"]
        assert row["run_steps"] == 3 and row["run_step_s"] == pytest.approx(split["train_steps"] / 3)
        assert row["run_all_s"] >= row["run_step_s"] > 0 and row["bench_step_s"] > 0
        assert row["ratio"] == pytest.approx(row["run_step_s"] / row["bench_step_s"])
        assert row["ratio_all"] == pytest.approx(row["run_all_s"] / row["bench_step_s"])
    assert result["summary"]["ratio"] == pytest.approx(sum(r["ratio"] for r in result["rounds"]) / 2)
    assert "| median |" in bench.format_loop_table(result)

    # Without DP the run's step is the non-private plan's; a DP-fairness method's is the method's step.
    from jaxdp_study.bench import config_loop

    plain = {"method": None, "clipping_strategy": None, "train_size": 96}
    entry = config_loop.loop_step_entry(tiny_config(**{"dp.enabled": False}), plain)
    assert entry.name == "jax nonprivate" and not entry.private
    fair = {"method": "dpsgd_f", "clipping_strategy": "vmap", "train_size": 96}
    assert config_loop.loop_step_entry(tiny_config(**{"dp.method": "dpsgd_f"}), fair).name == "jax dp vmap dpsgd_f"


def test_loop_benchmark_picks_a_run_of_the_sweep_and_refuses_what_it_cannot_do(tmp_path, capsys):
    demo = grid.load_config(str(ROOT / "configs" / "demo.py"))
    config, name = bench.loop_run_config(demo, "medium-ff0.9")
    assert name == "medium-ff0.9-clip1-seed0" and config.data.female_fraction == 0.9
    assert config.dp.noise_multiplier == 0.7 and not config.sweep
    assert bench.loop_run_config(demo)[1] == "demo"
    with pytest.raises(ValueError, match="'nope' matches none of the config's runs: high-ff0.7-clip1-seed0, "):
        bench.loop_run_config(demo, "nope")
    with pytest.raises(ValueError, match="rounds >= 1"):
        bench.run_loop_benchmark(demo, rounds=0)
    celeba = grid.load_config(str(ROOT / "configs" / "medium.py"))
    celeba.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):  # before any training
        bench.run_loop_benchmark(celeba, run="ff0.9")
    assert not any(tmp_path.iterdir())
