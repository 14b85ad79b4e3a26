"""Data parallelism over every device: a ``("data",)`` mesh, batch sharded, state replicated.

``jax.jit`` over a mesh replaces ``pmap`` (in maintenance mode in current JAX): the global batch
is one array sharded along its first axis, parameters are replicated, and XLA inserts the
gradient all-reduce (and the cross-device BatchNorm statistics) itself, so training on 8 devices
computes the same function as on 1. With several hosts, call :func:`initialize_multihost` first
(JAX's own runtime, one process per host); each process then feeds its contiguous slice of the
global batch (:func:`process_slice`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_multihost(**kwargs) -> None:
  """Starts JAX's multi-process runtime (``jax.distributed.initialize``): call once per host process,
  before anything else touches JAX; arguments as ``jax.distributed.initialize`` (none on Cloud TPU
  or under SLURM, where JAX finds them itself)."""
  jax.distributed.initialize(**kwargs)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the devices (and the processes)."""
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be divisible by the number of devices "
                     f"({mesh.size}); choose a multiple of {mesh.size}")


def process_slice(global_batch_size: int) -> slice:
  """The contiguous part of a global batch that this process feeds."""
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch (this process's slice of the global batch) on the mesh, batch-sharded."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a pytree replicated on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))
