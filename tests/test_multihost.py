"""A run over two processes (jax.distributed on localhost, 2 CPU devices each) equals a 4-device run."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import assert_trees_close, final_params, tiny_config, tiny_datasets

from jaxdp import train

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    reference = train.train_and_evaluate(
        tiny_config(**{"train.epochs": 0.5, "dp.reproducible": True}), tmp_path / "one", datasets=tiny_datasets()
    )
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multihost_worker.py"), str(i), port, str(tmp_path / "two")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 0: devices=4" in outputs[0] and "process 1: devices=4" in outputs[1]
    # The run secret is drawn by process 0 and broadcast: both processes hold the same one.
    secrets = [next(line for line in out.splitlines() if "secret=" in line).split("secret=")[1] for out in outputs]
    assert secrets[0] == secrets[1] != "3039", secrets
    assert_trees_close(final_params(tmp_path / "one"), final_params(tmp_path / "two"), rtol=1e-4, atol=1e-5)
    assert reference["devices"] == 4
