"""Data parallelism for DP-SGD: one device mesh axis over all devices of all processes.

Design (see docs/training.md, "Data parallelism"): the per-example work (forward, per-example gradients, clipping) is
written with ``jax.shard_map`` over a 1-D mesh axis ``"data"``: each device clips the gradients of its own
share of the (padded, fixed-shape) batch and the clipped sums are added across devices with one ``psum``. The
noise, the optimiser and the parameters live outside the ``shard_map``, replicated, inside the same ``jax.jit``:
the noise is drawn once from a replicated key, so every device adds the *same* draw and the noise is not
multiplied by the device count. ``shard_map`` makes the per-device work explicit (the privacy-relevant sum is a
visible ``psum``), where ``jit`` with sharding annotations would leave the partitioning of the per-example
``vmap`` to the compiler.

Multi-host runs: call :func:`initialize_distributed` (JAX's own distributed runtime) before anything else
touches JAX; every process then builds the same global batch on the host (batches are a pure function of the
sampler seed and the step) and :func:`shard_batch` hands each device its slice.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts JAX's distributed runtime for a multi-process run; returns whether it did.

    Arguments default to the environment variables ``JAXDP_COORDINATOR`` (host:port), ``JAXDP_NUM_PROCESSES``
    and ``JAXDP_PROCESS_ID``; on SLURM or TPU pods ``jax.distributed.initialize()`` finds them by itself, which is
    what happens when ``JAXDP_NUM_PROCESSES`` is unset and ``SLURM_NTASKS`` > 1. A single-process run does nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("JAXDP_COORDINATOR")
    if num_processes is None and "JAXDP_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXDP_NUM_PROCESSES"])
    if process_id is None and "JAXDP_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXDP_PROCESS_ID"])
    if num_processes is not None and num_processes > 1:
        if coordinator_address is None:
            raise ValueError(
                "A multi-process run needs the coordinator's address: set JAXDP_COORDINATOR=host:port "
                "(the same on every process) or pass coordinator_address."
            )
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` global devices (default: all of them, of all processes)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices must be between 1 and {len(devices)} (the devices JAX sees); got {num_devices}."
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split across the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """Places a host array whose leading axis is the global batch onto the mesh, split along that axis.

    Every process must pass the same global array (our samplers make it a pure function of seed and step);
    each process only materialises the slices of its own devices.
    """
    if array.shape[0] % mesh.size:
        raise ValueError(
            f"The batch's leading dimension ({array.shape[0]}) must be a multiple of the number of devices "
            f"({mesh.size}); pad it (the samplers' physical_batch_size does this)."
        )
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def shard_chunks(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """Places a host array ``[n_chunks, width, ...]`` (a step's chunks) onto the mesh, each chunk's examples (the
    second axis) split across the devices; the width must be a multiple of the device count."""
    if array.shape[1] % mesh.size:
        raise ValueError(
            f"The chunk width ({array.shape[1]}) must be a multiple of the number of devices ({mesh.size}); pad it "
            "(the samplers' physical_batch_size does this)."
        )
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def replicate(mesh: Mesh, tree):
    """Places a pytree of values (equal on every process) on every device of the mesh."""
    sharding = replicated(mesh)

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def round_up_to_devices(size: int, mesh: Mesh) -> int:
    return -(-size // mesh.size) * mesh.size
