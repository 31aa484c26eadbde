"""One process of a two-process training run (JAX's distributed runtime on this machine); see test_multihost.py."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
from test_train import tiny_config, tiny_datasets  # noqa: E402

from jaxdp import noise, parallel, plan, train  # noqa: E402

if __name__ == "__main__":
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    if process_id == 1:  # each process draws its own entropy; the run must still use one secret everywhere
        noise.secret_seed = lambda: 12345
    print(f"process {process_id}: secret={plan.new_run_secret():x}", flush=True)
    config = tiny_config(**{"train.epochs": 0.5, "dp.reproducible": True})
    final = train.train_and_evaluate(config, workdir, datasets=tiny_datasets())
    print(f"process {process_id}: devices={final['devices']} accuracy={final['metrics']['accuracy']}", flush=True)
