"""Tests of jaxdp_study.measurements: dated measurement records, their writers (launch/bench.py, launch/sweep.py
--record) and the tables the docs generate from them."""

import datetime
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

from jaxdp_study import measurements

ROOT = Path(__file__).resolve().parents[1]
NOON = datetime.datetime(2026, 12, 2, 12, 0, 5, tzinfo=datetime.UTC)


def step_result(examples_per_s: float, backend: str = "cpu") -> dict:
    """A step-benchmark result in jaxdp_study.bench.run_benchmark's format, with numbers chosen by hand."""
    entry = dict(framework="jax", step_s=[0.5], compile_s=2.25, peak_memory_bytes=3 * 2**20, error=None,
                 vs_fastest_opacus=None, memory_vs_nonprivate=None, vs_dpsgd=None)
    return {
        "config": dict(workload="resnet-s1111-w8-16px-b32", title="tiny: resnet-s1111-w8, inputs [16, 16, 3], batch 32",
                       chunk_width=46, input_shape=[16, 16, 3], batch_size=32, dataset_size=160, strategies=["vmap"],
                       rounds=2, steps_per_round=1, settle_s=0.0, compare_opacus=False, opacus_modes=[],
                       l2_clip_norm=5.0, noise_multiplier=0.7, learning_rate=1e-3),
        "environment": dict(jax="0.0", backend=backend, device="cpu", cpu="x86_64", date="2026-12-02",
                            memory_method="rss growth per step"),
        "results": [dict(entry, name="jax nonprivate", private=False, examples_per_s=64.0,
                         vs_jax_nonprivate=1.0),
                    dict(entry, name="jax dp vmap", private=True, examples_per_s=examples_per_s,
                         vs_jax_nonprivate=examples_per_s / 64.0)],
    }


def test_a_record_holds_the_payload_command_date_versions_and_machine(tmp_path):
    path = measurements.write_record("step-cpu-x", {"speed": 12.5, "nan": float("nan")},
                                     command="python launch/bench.py --rounds 2", directory=tmp_path, now=NOON)
    assert path == tmp_path / "step-cpu-x-2026-12-02-120005.json"
    record = json.loads(path.read_text())
    assert record["name"] == "step-cpu-x" and record["date"] == "2026-12-02T12:00:05Z"
    assert record["command"] == "python launch/bench.py --rounds 2"
    assert record["payload"] == {"speed": 12.5, "nan": None}  # NaN is not JSON: null (jaxdp.runlog.json_safe)
    import jax
    import numpy as np

    assert record["versions"]["jax"] == jax.__version__ and record["versions"]["numpy"] == np.__version__
    assert {"jaxlib", "flax", "optax"} <= set(record["versions"])
    machine = record["machine"]
    assert machine["cpu_count"] >= 1 and 1 <= machine["cpus_usable"] <= machine["cpu_count"]
    assert machine["jax_backend"] == jax.default_backend() and len(machine["jax_devices"]) == len(jax.devices())
    assert machine["cpu_model"]  # this Linux machine has /proc/cpuinfo
    # A second record in the same second is another file: records are never overwritten.
    again = measurements.write_record("step-cpu-x", {"speed": 13.0}, command="python x", directory=tmp_path, now=NOON)
    assert again.name == "step-cpu-x-2026-12-02-120005-1.json" and json.loads(path.read_text())["payload"]["speed"]
    assert not list(tmp_path.glob(".*.tmp"))  # written through the atomic writer, nothing left behind


def test_a_record_needs_a_plain_name_and_its_command(tmp_path):
    with pytest.raises(ValueError, match="letters, digits"):
        measurements.write_record("step cpu/x", {}, command="python x", directory=tmp_path)
    with pytest.raises(ValueError, match="needs the command"):
        measurements.write_record("step", {}, command=" ", directory=tmp_path)
    assert measurements.slug("medium-ff0.9 (clip 1)/x") == "medium-ff0.9-clip-1-x"
    assert not list(tmp_path.iterdir())


def test_the_docs_show_the_newest_record_of_each_kind_or_the_command_to_record_it(tmp_path):
    old = NOON - datetime.timedelta(days=1)
    measurements.write_record("step-cpu-tiny", step_result(11.0), command="python launch/bench.py --old",
                              directory=tmp_path, now=old)
    measurements.write_record("step-cpu-tiny", step_result(22.0), command="python launch/bench.py --new",
                              directory=tmp_path, now=NOON)
    page = ("# Speed\n\n<!-- measurement: step-cpu-tiny | python launch/bench.py --new -->\n\n"
            "<!-- measurement: step-gpu-big | python launch/bench.py --gpu -->\n")
    out = measurements.fill_placeholders(page, measurements.read_records(tmp_path),
                                         link=lambda record: f"measurements/{record['path'].name}")
    assert "<!--" not in out
    assert "`python launch/bench.py --new`" in out and "--old" not in out
    # The newest record's table, as jaxdp_study.bench.format_table prints it: 32 / 22.0 examples/s, 22/64 = 0.34.
    assert "| jax dp vmap | 22.0 | 0.34 |" in out and "| jax dp vmap | 11.0 |" not in out
    assert "Measured 2026-12-02T12:00:05Z on" in out and "jax " in out
    assert "[`step-cpu-tiny-2026-12-02-120005.json`](measurements/step-cpu-tiny-2026-12-02-120005.json)" in out
    assert "*No measurement recorded yet; run `python launch/bench.py --gpu`.*" in out


def test_a_damaged_record_fails_loudly(tmp_path):
    (tmp_path / "step-x.json").write_text("{not json")
    with pytest.raises(ValueError, match="step-x.json: not valid JSON"):
        measurements.read_records(tmp_path)
    (tmp_path / "step-x.json").write_text('{"name": "step-x"}')
    with pytest.raises(ValueError, match=r"not a measurement record \(missing \['date'"):
        measurements.read_records(tmp_path)


def _load_bench_cli():
    spec = importlib.util.spec_from_file_location("launch_bench_cli_records", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_writes_a_record_named_after_what_it_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(measurements.DIR_ENV, str(tmp_path))
    monkeypatch.chdir(ROOT)
    cli = _load_bench_cli()
    monkeypatch.setattr(cli.bench, "run_benchmark", lambda workload, **kw: step_result(22.0))
    argv = ["--config", "configs/tiny.py", "--rounds", "2", "--json", str(tmp_path / "bare.json")]
    result = cli.main(argv)
    (path,) = tmp_path.glob("step-*.json")
    assert re.fullmatch(r"step-cpu-resnet-s1111-w8-16px-b32-\d{4}-\d\d-\d\d-\d{6}\.json", path.name)
    record = json.loads(path.read_text())
    assert record["command"] == "python launch/bench.py --config configs/tiny.py --rounds 2 --json " + str(
        tmp_path / "bare.json")
    assert record["payload"] == result == json.loads((tmp_path / "bare.json").read_text())  # --json still works
    assert f"recorded {path}" in capsys.readouterr().out
    cli.main([*argv, "--no-record"])
    cli.main([*argv, "--record-name", "step-cpu-mine"])
    assert len(list(tmp_path.glob("step-*.json"))) == 2 and len(list(tmp_path.glob("step-cpu-mine-*.json"))) == 1


def test_bench_names_resnet18_opacus_and_method_records():
    cli = _load_bench_cli()
    result = step_result(1.0, backend="gpu")
    result["config"].update(workload="resnet18-128px-b256", batch_size=256)
    assert cli._step_record_name(result) == "step-gpu-resnet18-128px-b256"
    result["config"].update(compare_opacus=True, methods=["dpsgd_f"])
    assert cli._step_record_name(result) == "step-gpu-resnet18-128px-b256-methods-opacus"
    result["config"].update(compare_opacus=False, methods=[], mechanisms=["gaussian"])
    assert cli._step_record_name(result) == "step-gpu-resnet18-128px-b256-mechanisms"


def test_sweep_record_holds_the_wall_time_and_each_trained_run(tmp_path, monkeypatch):
    monkeypatch.setenv(measurements.DIR_ENV, str(tmp_path / "records"))
    if "launch_sweep_cli" not in sys.modules:  # absl flags can be defined once per process (tests/test_sweep.py)
        spec = importlib.util.spec_from_file_location("launch_sweep_cli", ROOT / "launch" / "sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["launch_sweep_cli"] = module
        spec.loader.exec_module(module)
    cli = sys.modules["launch_sweep_cli"]
    statuses = []
    for name in ("medium-ff0.7", "nondp-ff0.7"):  # the first was trained now, the second had finished before
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "final.json").write_text(json.dumps(
            {"steps": 9, "wall_time_s": 12.5, "time_split_s": {"compile": 4.0, "train_steps": 6.5, "evaluation": 1.0}}))
        statuses.append(types.SimpleNamespace(run=types.SimpleNamespace(name=name), run_dir=run_dir))
    result = types.SimpleNamespace(statuses=statuses, trained=["medium-ff0.7"], skipped=["nondp-ff0.7"])
    monkeypatch.setattr(sys, "argv", ["launch/sweep.py", "--config", "configs/tiny.py", "--record"])
    cli._record(types.SimpleNamespace(name="tiny"), result, 75.0)
    (path,) = (tmp_path / "records").glob("sweep-tiny-*.json")
    record = json.loads(path.read_text())
    assert record["command"] == "python launch/sweep.py --config configs/tiny.py --record"
    assert record["payload"] == {"config": "tiny", "wall_time_s": 75.0, "runs_trained": 1, "runs_skipped": 1,
                                 "runs": [{"name": "medium-ff0.7", "steps": 9, "wall_time_s": 12.5,
                                           "time_split_s": {"compile": 4.0, "train_steps": 6.5, "evaluation": 1.0}}]}
    table = measurements.format_sweep_table(record["payload"])
    assert "1 runs trained, 1 already finished; wall time 0:01:15 (75 s)" in table
    assert "| medium-ff0.7 | 9 | 12.5 | 4.0 | 6.5 | 1.0 |" in table
