"""The scripts in examples/ run as a user runs them (`python examples/NAME.py`, no arguments, a fresh interpreter),
finish, and print an epsilon that the accountant confirms and a test accuracy far above chance."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdp import accounting

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_as_user(script: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python script`` in a user's environment: none of the test session's XLA device flags or compilation
    cache; jaxdp imported from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def run_example(name: str) -> str:
    """The example's stdout, after checking that it exited 0 and printed its epsilon and test accuracy."""
    proc = run_as_user(EXAMPLES / name, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def final_numbers(stdout: str) -> tuple[float, float]:
    """``(epsilon, test accuracy in percent)`` from the example's last lines."""
    epsilon = re.search(r"^epsilon = ([0-9.]+) \(delta = 1e-05", stdout, re.M)
    accuracy = re.search(r"^test accuracy = ([0-9.]+)% \(360 images, 10 classes: chance is 10%\)", stdout, re.M)
    assert epsilon and accuracy, stdout
    return float(epsilon.group(1)), float(accuracy.group(1))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a fresh interpreter, 90 DP steps of a CNN: ~15 s of CPU time
def test_digits_cnn_meets_its_epsilon_target_and_learns():
    stdout = run_example("digits_cnn.py")
    epsilon, accuracy = final_numbers(stdout)
    # Calibrated to epsilon <= 3.0: at the target, not below it by more than the calibration's tolerance.
    assert 2.9 <= epsilon <= 3.0, stdout
    # 360 test images of 10 balanced classes: chance is 10% (36 right); a private CNN gets about 90%.
    assert accuracy >= 60.0, stdout


@pytest.mark.slow  # a fresh interpreter, 200 DP steps of an MLP: ~10 s of CPU time
def test_custom_loop_nnx_reports_the_accountants_epsilon_and_learns():
    stdout = run_example("custom_loop_nnx.py")
    epsilon, accuracy = final_numbers(stdout)
    # What it ran: 200 Poisson steps at q = 128 / 1437 (the digits minus 360 test images) with z = 1.5.
    expected = accounting.epsilon(1.5, 128 / 1437, 200, 1e-5)
    assert epsilon == pytest.approx(expected, abs=1e-3), (stdout, expected)
    assert accuracy >= 60.0, stdout
    # epsilon read as it goes grows with the steps and ends at the run's.
    so_far = [float(e) for e in re.findall(r"epsilon so far ([0-9.]+)", stdout)]
    assert len(so_far) == 4 and so_far == sorted(so_far) and so_far[-1] == pytest.approx(epsilon, abs=1e-3), stdout
    assert "resumed at step 100 from the checkpoint" in stdout


@pytest.mark.slow  # a fresh interpreter, three runs of 248 steps of an MLP: ~12 s of CPU time
def test_tabular_fairness_compares_dpsgd_and_dpsgd_f_at_one_epsilon_per_group():
    stdout = run_example("tabular_fairness.py")
    blocks = re.findall(r"^(non-private|dpsgd|dpsgd_f)\b.*?\n  test accuracy = ([0-9.]+)%: group 0 ([0-9.]+)% "
                        r"\[[0-9., ]+\], group 1 ([0-9.]+)% \[[0-9., ]+\] \((\d+) / (\d+) test examples, majority "
                        r"class ([0-9.]+)%\)$", stdout, re.M)
    assert [b[0] for b in blocks] == ["non-private", "dpsgd", "dpsgd_f"], stdout
    for name, overall, group0, group1, n0, n1, majority in blocks:
        # 4000 generated test examples, 20% in group 1; labels balanced: the majority class is about 50%.
        assert int(n0) + int(n1) == 4000 and 600 <= int(n1) <= 1000, stdout
        assert float(majority) <= 55.0 and float(overall) >= 70.0, (name, stdout)
        assert min(float(group0), float(group1)) >= 55.0, (name, stdout)
    # Both private runs are calibrated to epsilon <= 2.0.
    epsilons = [float(e) for e in re.findall(r"^  epsilon = ([0-9.]+) \(delta = 1e-05", stdout, re.M)]
    assert len(epsilons) == 2 and all(1.95 <= e <= 2.0 for e in epsilons), stdout
    # DPSGD-F pays for its noisy counts (count noise multiplier 10, the reference value) with more gradient noise:
    # the combined multiplier (z^-2 + 10^-2)^-1/2 of its steps is DP-SGD's z, since both meet the same target.
    z_dpsgd, z_f = (float(z) for z in re.findall(r"^dpsgd(?:_f)?: noise multiplier ([0-9.]+)", stdout, re.M))
    assert z_f > z_dpsgd and (z_f**-2 + 10.0**-2) ** -0.5 == pytest.approx(z_dpsgd, abs=2e-3), stdout


def test_custom_loop_nnx_checkpoint_resumes_exactly(tmp_path):
    """The example's checkpoint (state arrays, step, secret) and a plan rebuilt from the saved secret continue
    the run bit for bit: the same batches, the same noise, the same parameters."""
    example = load_example("custom_loop_nnx")
    train_data, _ = example.load_data()
    graphdef, params = example.nnx.split(example.MLP(example.nnx.Rngs(0)))
    secret = 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0
    num_train = len(train_data["y"])

    plan = example.build_plan(graphdef, num_train, secret=secret)
    uninterrupted = example.train(plan, plan.init(params), train_data, 0, 4, evaluate=None)

    plan = example.build_plan(graphdef, num_train, secret=secret)
    state = example.train(plan, plan.init(params), train_data, 0, 2, evaluate=None)
    path = tmp_path / "checkpoint.npz"
    example.save_checkpoint(path, state, 2, plan.secret)
    leaves, step, restored_secret = example.load_checkpoint(path)
    assert (step, restored_secret) == (2, secret)
    plan = example.build_plan(graphdef, num_train, secret=restored_secret)
    state = jax.tree.unflatten(jax.tree.structure(plan.init(params)), leaves)
    resumed = example.train(plan, state, train_data, step, 4, evaluate=None)

    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the secret matters: another one gives other batches and noise, so other parameters.
    plan = example.build_plan(graphdef, num_train, secret=secret + 1)
    other = example.train(plan, plan.init(params), train_data, 0, 4, evaluate=None)
    assert not np.array_equal(np.asarray(jax.tree.leaves(other.params)[0]),
                              np.asarray(jax.tree.leaves(uninterrupted.params)[0]))


def api_snippet(path: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in a Markdown file."""
    match = re.search(re.escape(heading) + r"\n.*?```python\n(.*?)```", path.read_text(), re.S)
    assert match, f"no python block after {heading!r} in {path}"
    return match.group(1)


@pytest.mark.slow  # a fresh interpreter, 105 DP steps of an MLP: ~8 s of CPU time
def test_the_readmes_api_snippet_runs_and_meets_its_epsilon_target(tmp_path):
    # The README's 15 lines, as a reader pastes them into a file; docs/library.md opens with the same lines.
    snippet = api_snippet(ROOT / "README.md", "## The API in 15 lines")
    assert snippet == api_snippet(ROOT / "docs" / "library.md", "## The whole thing")
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    proc = run_as_user(script, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    epsilon = float(re.fullmatch(r"epsilon = ([0-9.]+)\n", proc.stdout).group(1))
    assert 2.9 <= epsilon <= 3.0, proc.stdout  # calibrated to the snippet's target_epsilon=3.0
