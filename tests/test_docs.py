"""The docs build strictly: `mkdocs build --strict` (mkdocs.yml) fails on any warning, and mkdocs.yml's validation
makes every broken link, missing anchor, page outside the nav and docstring that does not match its signature a
warning. This is how CI checks the docs: .ci/run runs the test suite, and the suite runs the build."""

import datetime
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdp_study import measurements

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def build(site_dir: Path, config_file: Path = ROOT / "mkdocs.yml", measurements_dir: Path | None = None
          ) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[test]' (the docs extra is part of the test extra)")
    env = {k: v for k, v in os.environ.items() if k != measurements.DIR_ENV}  # the suite points it at a tmp dir
    if measurements_dir is not None:
        env[measurements.DIR_ENV] = str(measurements_dir)
    env.update(NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config_file),
                           "--site-dir", str(site_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def text_of(html_file: Path) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html_file.read_text()))


def test_docs_build_strictly_with_every_page_and_api_module(tmp_path):
    proc = build(tmp_path / "site")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARNING" not in log, log[-4000:]
    site = tmp_path / "site"
    for page in ("library", "engine", "threat-model", "accounting", "methods", "audit", "data", "training", "study",
                 "results", "performance"):
        assert (site / page / "index.html").exists(), page
    # The API reference is generated from the docstrings: each module's page shows its public functions.
    for page, name in (("noise", "dp_noise"), ("clipping", "clipped_grad"), ("accounting", "PrivacyLedger"),
                       ("sampling", "PoissonSampler"), ("methods", "DPSGDF"), ("audit", "epsilon_lower_bound"),
                       ("fairness", "group_metrics"), ("data", "load_splits"), ("plan", "make_plan"),
                       ("plan", "DPConfig"), ("plan", "ExecutionConfig"), ("plan", "TrainState"),
                       ("plan", "StepOutput"), ("steps", "plan_from_config")):
        assert name in text_of(site / "api" / page / "index.html"), (page, name)
    performance = (site / "performance" / "index.html").read_text()
    assert "measurement:" not in performance  # every placeholder was filled, by a record or by its command


def test_the_performance_page_is_generated_from_a_record_file(tmp_path):
    records = tmp_path / "records"
    command = "python launch/bench.py --config configs/demo.py --strategies vmap,vmap_matmul,bookkeeping"
    payload = {"config": {"image_size": 32, "batch_size": 256, "compare_opacus": False},
               "environment": {"device": "cpu", "date": "2026-12-02", "backend": "cpu"},
               "results": [{"name": "jax dp bookkeeping", "error": None, "examples_per_s": 4321.5,
                            "vs_jax_nonprivate": 0.875, "vs_fastest_opacus": None, "vs_dpsgd": None,
                            "compile_s": 3.25, "peak_memory_bytes": 5 * 2**20, "memory_vs_nonprivate": 1.5}]}
    measurements.write_record("step-cpu-resnet-s111-w8-32px-b256", payload, command=command, directory=records,
                              now=datetime.datetime(2026, 12, 2, 9, 30, tzinfo=datetime.UTC))
    # The performance page alone, with the real hook and the real page (the full site is the test above).
    import yaml

    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "performance.md").write_text((ROOT / "docs" / "performance.md").read_text())
    config = {"site_name": "t", "docs_dir": str(docs), "strict": True, "validation": settings["validation"],
              "hooks": [str(ROOT / "docs" / "hooks" / "measurements.py")],
              "markdown_extensions": settings["markdown_extensions"], "nav": ["performance.md"]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = build(tmp_path / "site", config_file=tmp_path / "mkdocs.yml", measurements_dir=records)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    page = text_of(tmp_path / "site" / "performance" / "index.html")
    # The record's table as jaxdp_study.bench.format_table prints it (HTML cells, read as text): 4321.5 ex/s, 0.88x.
    assert "jax dp bookkeeping 4321.5 0.88 3.2 5.0 1.50" in page, page[:3000]
    assert command in page and "Measured 2026-12-02T09:30:00Z" in page
    assert "No measurement recorded yet; run python launch/bench.py --config configs/demo.py --strategies vmap,vmap" \
        not in page  # the demo's placeholder was filled by the record; others (no record here) show their command


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    import yaml

    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the engine](engine.md) and [its noise](other.md#no-such-anchor).\n")
    (docs / "other.md").write_text("# Other\n\n## Noise\n")
    config = {"site_name": "t", "docs_dir": str(docs), "strict": settings["strict"],
              "validation": settings["validation"], "nav": ["index.md", "other.md"]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = build(tmp_path / "site", config_file=tmp_path / "mkdocs.yml")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Aborted" in log
    assert "'engine.md'" in log and "no-such-anchor" in log


def test_the_readmes_relative_links_resolve_from_the_repository_root():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert local, "the README links to the docs pages"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_readme_is_a_front_door_and_ci_runs_its_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "the README is at most 250 lines; long material goes to docs/"
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    setup = [b.strip() for b in blocks if b.strip().startswith("pip install")]
    assert len(setup) == 2, f"two set-up commands (the demo, the tests), found {setup}"
    demo, tests = setup
    assert "launch/sweep.py --config configs/demo.py" in demo
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith("set ")]
    assert tests in ci, f".ci/run must run exactly the README's test command {tests!r}; it runs {ci}"
