"""The benchmark runs end to end at a tiny size and reports every field (its numbers are not checked: timing
is the benchmark's job, not the tests')."""

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdp_study import bench, grid

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(image_size=8, batch_size=2, stage_sizes=(1,), width=4, num_groups=2, rounds=2, settle_s=0.0)


def _check_entry(entry, *, jax_entry):
    assert entry["error"] is None, entry["error"]
    assert len(entry["step_s"]) == 2 and all(t > 0 for t in entry["step_s"])
    assert entry["examples_per_s"] > 0 and entry["vs_jax_nonprivate"] > 0
    if jax_entry:
        # A tiny step may reuse resident pages and grow RSS by nothing, so only presence is checked.
        assert entry["compile_s"] > 0 and entry["peak_memory_bytes"] >= 0


def test_run_benchmark_jax_only():
    result = bench.run_benchmark(strategies=["bookkeeping"], **TINY)
    names = [r["name"] for r in result["results"]]
    assert names == ["jax nonprivate (flax conv)", "jax nonprivate (matmul conv)", "jax dp bookkeeping",
                     "jax dp bookkeeping (legacy noise)", "jax dp noise+adam only",
                     "jax dp noise+adam only (legacy noise)"]
    for entry in result["results"]:
        _check_entry(entry, jax_entry=True)
        assert entry["vs_fastest_opacus"] is None
    assert result["environment"]["memory_method"] == "rss growth per step"
    assert max(r["vs_jax_nonprivate"] for r in result["results"] if not r["private"]) == 1.0
    assert result["config"]["batch_size"] == 2 and result["environment"]["backend"] == "cpu"
    json.dumps(result)  # JSON-ready
    table = bench.format_table(result)
    assert table.count("\n| jax ") == 6


def test_compare_opacus_without_torch_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "opacus"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0 opacus"):
        bench.run_benchmark(compare_opacus=True, **TINY)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Unknown strategies"):
        bench.run_benchmark(strategies=["nope"], **TINY)
    with pytest.raises(ValueError, match="Unknown Opacus modes"):
        bench.run_benchmark(opacus_modes=["nope"], **TINY)
    with pytest.raises(ValueError, match="settle_s=-1"):
        bench.run_benchmark(**{**TINY, "settle_s": -1})


@pytest.mark.slow
def test_cli_with_opacus(tmp_path):
    pytest.importorskip("opacus")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "--image-size", "8", "--batch-size", "2",
         "--stage-sizes", "1", "--width", "4", "--rounds", "2", "--settle", "0", "--strategies", "bookkeeping",
         "--opacus-modes", "hooks,ghost", "--compare-opacus", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["results"]]
    assert names[-3:] == ["torch nonprivate", "opacus hooks", "opacus ghost"]
    for entry in result["results"]:
        _check_entry(entry, jax_entry=entry["framework"] == "jax")
    assert result["results"][-1]["vs_fastest_opacus"] > 0
    assert "| opacus ghost |" in proc.stdout


def _load_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_bench_cli", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_come_from_an_experiment_config():
    demo = bench.settings_from_config(grid.load_config(str(ROOT / "configs" / "demo.py")))
    assert demo == dict(image_size=32, batch_size=256, strategies=["auto"], stage_sizes=(1, 1, 1), width=8,
                        num_groups=8, l2_clip_norm=1.0, noise_multiplier=0.7, learning_rate=5e-3)
    config = grid.load_config(str(ROOT / "configs" / "tiny.py"))
    config.model.norm = "batch"
    with pytest.raises(ValueError, match="GroupNorm ResNets"):
        bench.settings_from_config(config)


def test_cli_resolves_flags_over_config_over_defaults(monkeypatch):
    cli = _load_launcher()
    calls = []
    monkeypatch.setattr(cli.bench, "run_benchmark", lambda **kw: calls.append(kw) or {"stub": True})
    monkeypatch.setattr(cli.bench, "format_table", lambda result: "")
    tiny = str(ROOT / "configs" / "tiny.py")
    cli.main(["--no-record"])  # the stub result is no measurement
    cli.main(["--config", tiny, "--no-record"])
    cli.main(["--config", tiny, "--batch-size", "4", "--stage-sizes", "1,1", "--strategies", "vmap,bookkeeping",
              "--no-record"])
    keys = ("image_size", "batch_size", "strategies", "stage_sizes", "width", "num_groups")
    plain, config, overridden = ({k: kw[k] for k in keys} for kw in calls)
    assert plain == dict(image_size=64, batch_size=32, strategies=None, stage_sizes=(2, 2, 2, 2), width=64,
                         num_groups=32)  # as before --config existed: ResNet18, 64x64, batch 32, every strategy
    assert config == dict(image_size=16, batch_size=32, strategies=["vmap"], stage_sizes=(1, 1, 1, 1), width=8,
                          num_groups=4)  # configs/tiny.py
    assert overridden == {**config, "batch_size": 4, "stage_sizes": (1, 1), "strategies": ["vmap", "bookkeeping"]}
    assert (calls[1]["l2_clip_norm"], calls[1]["noise_multiplier"], calls[1]["learning_rate"]) == (5.0, 0.7, 1e-3)
    assert "l2_clip_norm" not in calls[0]  # run_benchmark's own defaults


def test_cli_benchmarks_a_config_with_todays_json(tmp_path, capsys):
    # configs/tiny.py's settings, its model shrunk by flags so that the compiles stay short; strategy "auto".
    out = tmp_path / "bench.json"
    cli = _load_launcher()
    result = cli.main(["--config", str(ROOT / "configs" / "tiny.py"), "--image-size", "8", "--batch-size", "2",
                       "--stage-sizes", "1", "--width", "4", "--rounds", "2", "--settle", "0", "--no-noise-only",
                       "--strategies", "auto", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    config = result["config"]
    assert (config["num_groups"], config["strategies"], config["l2_clip_norm"], config["noise_multiplier"],
            config["learning_rate"]) == (4, ["auto"], 5.0, 0.7, 1e-3)
    assert sorted(config) == sorted(["image_size", "batch_size", "strategies", "rounds", "steps_per_round",
                                     "settle_s", "max_pixels", "compare_opacus", "opacus_modes", "stage_sizes",
                                     "width", "num_groups", "l2_clip_norm", "noise_multiplier", "learning_rate",
                                     "seed"])
    assert sorted(result) == ["config", "environment", "results"]
    # "auto" is benchmarked under the name of the strategy it picks for the model.
    assert [r["name"] for r in result["results"]] == ["jax nonprivate (flax conv)", "jax nonprivate (matmul conv)",
                                                      "jax dp bookkeeping"]
    for entry in result["results"]:
        _check_entry(entry, jax_entry=True)
    assert "| jax dp bookkeeping |" in capsys.readouterr().out


def test_cli_bad_config_is_one_line(capsys):
    cli = _load_launcher()
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", "configs/nope.py"])
    assert e.value.code == 2 and "config file 'configs/nope.py' does not exist" in capsys.readouterr().err


def test_method_entries_follow_their_strategy_and_compare_with_its_dp_sgd_step():
    result = bench.run_benchmark(strategies=["bookkeeping"], methods=bench.METHOD_NAMES, include_noise_only=False,
                                 **TINY)
    names = [r["name"] for r in result["results"]]
    assert names == ["jax nonprivate (flax conv)", "jax nonprivate (matmul conv)", "jax dp bookkeeping",
                     "jax dp bookkeeping dpsgd_f", "jax dp bookkeeping dpsgd_global",
                     "jax dp bookkeeping dpsgd_global_adapt"]
    for entry in result["results"]:
        _check_entry(entry, jax_entry=True)
        assert (entry["vs_dpsgd"] is not None) == (entry["name"].split()[-1] in bench.METHOD_NAMES)
    assert result["config"]["methods"] == list(bench.METHOD_NAMES)
    assert "| vs DP-SGD |" in bench.format_table(result)
    with pytest.raises(ValueError, match="Unknown methods"):
        bench.run_benchmark(methods=["dpsgd"], **TINY)


# --- the training loop around the step (issue 15, item 4) -------------------------------------------------------


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

    # Without DP the run's step is the non-private matmul-conv step; a DP-fairness method's is the method's step.
    plain = {"method": None, "clipping_strategy": None, "noise_multiplier": None, "chunk_widths": [4]}
    entry = bench._loop_step_entry(tiny_config(**{"dp.enabled": False}), plain, seed=0)
    assert entry.name == "jax nonprivate (matmul conv)" and not entry.private
    fair = {"method": "dpsgd_f", "clipping_strategy": "vmap", "noise_multiplier": 0.5, "chunk_widths": [2, 4]}
    assert bench._loop_step_entry(tiny_config(**{"dp.method": "dpsgd_f"}), fair, seed=0).name == "jax dp vmap dpsgd_f"


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
    cli = _load_launcher()
    for argv, message in (
        (["--loop"], "--loop needs --config"),
        (["--loop", "--config", "configs/demo.py", "--batch-size", "8"], "--batch-size do not apply to --loop"),
        (["--config", "configs/demo.py", "--run", "medium"], "--run and --epochs apply to --loop only"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
