"""The benchmark runs end to end at a tiny size and reports every field (its numbers are not checked: timing
is the benchmark's job, not the tests')."""

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdp import bench

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
