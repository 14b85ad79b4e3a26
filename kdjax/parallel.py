"""Data parallelism over every device: a ``("data",)`` mesh, batch sharded, state replicated.

``jax.jit`` over a mesh replaces ``pmap`` (in maintenance mode in current JAX): the global batch
is one array sharded along its first axis, parameters are replicated, and XLA inserts the
gradient all-reduce (and the cross-device BatchNorm statistics) itself, so training on 8 devices
computes the same function as on 1. With several hosts, call :func:`initialize_multihost` first
(JAX's own runtime, one process per host); each process then feeds its contiguous slice of the
global batch (:func:`process_slice`).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

log = logging.getLogger(__name__)


# The environments in which ``jax.distributed.initialize()`` finds the coordinator, process count and process id by
# itself (JAX's ``jax._src.clusters``): the variables it reads, and the one that says how many processes there are.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OPEN_MPI_VARIABLES = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                      "OMPI_COMM_WORLD_LOCAL_RANK")
TPU_POD_VARIABLES = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-process environment JAX can configure itself from, or ``None`` (a single process).

  * ``"slurm"``: every variable of :data:`SLURM_VARIABLES` is set (``srun``) and ``SLURM_NTASKS`` > 1;
  * ``"openmpi"``: :data:`OPEN_MPI_VARIABLES` are set (``mpirun``) and ``OMPI_COMM_WORLD_SIZE`` > 1;
  * ``"tpu"``: a Cloud TPU VM (a TPU device file under ``/dev`` and ``libtpu`` installed) or a TPU pod on GKE
    (``TPU_WORKER_HOSTNAMES`` or ``MEGASCALE_COORDINATOR_ADDRESS`` set). JAX then reads the worker list and id
    from the environment or the VM's metadata server; on a single-host TPU VM it finds one process.

  A SLURM allocation of one task (an ``salloc`` shell, ``srun -n 1``) is a single process: nothing to start.
  """
  env = os.environ if environ is None else environ
  if all(v in env for v in SLURM_VARIABLES) and _count(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if all(v in env for v in OPEN_MPI_VARIABLES) and _count(env["OMPI_COMM_WORLD_SIZE"]) > 1:
    return "openmpi"
  if any(env.get(v) for v in TPU_POD_VARIABLES):
    return "tpu"
  if environ is None and _on_cloud_tpu_vm():
    return "tpu"
  return None


def _count(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  """A TPU VM without starting any JAX backend: TPU chips under ``/dev`` and the ``libtpu`` package."""
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


_started_with: list = [None]  # the arguments initialize_multihost started the runtime with (None: it did not)


def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> bool:
  """Starts JAX's multi-process runtime (``jax.distributed.initialize``) when the run spans several processes.

  Call it once per process (one per host), before anything touches JAX devices; the command line does
  (``kdjax train|reproduce --coordinator-address HOST:PORT --num-processes N --process-id I``).

  * All three arguments given: ``jax.distributed.initialize(coordinator_address, num_processes, process_id)``.
    Process 0 serves the coordinator on ``HOST:PORT``; every process must reach it.
  * None given: ``jax.distributed.initialize()`` with no arguments when :func:`detect_cluster` finds SLURM, Open
    MPI or a Cloud TPU (JAX reads the coordinator, count and id from that environment); otherwise nothing
    happens (one process, every local device). ``JAX_COORDINATOR_PORT`` / ``JAX_LOCAL_DEVICE_IDS``, which JAX
    reads, still apply. On a Cloud TPU, where the runtime is optional (libtpu joins a pod slice's workers
    itself), a failure to start it is logged and the run continues.

  Cross-process collectives on CPU devices use gloo (``jax_cpu_collectives_implementation``), unless ``mpi``
  was chosen; GPUs and TPUs use their own (NCCL, ICI). After this call ``jax.devices()`` lists every process's
  devices, and :func:`make_mesh` spans them all.

  Calling it again with the same arguments does nothing (a second command in the same process).

  Returns:
    Whether the distributed runtime runs.

  Raises:
    ValueError: only some of the three arguments given, ``num_processes`` < 1, ``process_id`` outside
      ``[0, num_processes)``, or an address that is not ``HOST:PORT``.
    RuntimeError: called after JAX's devices were created (the runtime must come first), or the installed
      jaxlib has no gloo collectives for a CPU run.
  """
  given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
           "--process-id": process_id}
  missing = [name for name, value in given.items() if value is None]
  if missing and len(missing) < len(given):
    raise ValueError(f"a multi-process run needs all of --coordinator-address, --num-processes and --process-id; "
                     f"got {', '.join(n for n in given if n not in missing)} without {', '.join(missing)}. Give all "
                     "three on every process, or none (under SLURM, Open MPI or on a Cloud TPU JAX reads them from "
                     "the environment)")
  cluster = None
  if not missing:
    _check_multihost_arguments(coordinator_address, num_processes, process_id)
  elif (cluster := detect_cluster()) is None:
    return False
  arguments = (coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    if arguments == _started_with[0]:  # a second command in the same process (kdjax.cli.main called again)
      return True
    raise RuntimeError(f"JAX's distributed runtime already runs in this process (started with {_started_with[0]}); "
                       f"it cannot be restarted with {arguments}: use one process per run")
  _select_cpu_collectives()
  try:
    if missing:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id)
  except Exception as e:  # noqa: BLE001 - re-raised, explained, or (Cloud TPU only) logged
    if isinstance(e, RuntimeError) and "must be called before" in str(e):
      raise RuntimeError("the multi-process runtime must start before anything creates JAX's devices (an array, "
                         "jax.devices(), a jit call): call kdjax.parallel.initialize_multihost first thing in each "
                         f"process ({e})") from e
    if cluster != "tpu" or jax.distributed.is_initialized():
      raise
    # On Cloud TPU the runtime is optional: libtpu joins the workers of a pod slice by itself.
    log.warning("jax.distributed.initialize() did not start on this Cloud TPU (%s: %s); continuing without it "
                "(libtpu still joins the workers of a pod slice)", type(e).__name__, str(e)[:200])
    return False
  _started_with[0] = arguments
  log.info("JAX process %d of %d: %d local device(s) of %d", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def _check_multihost_arguments(coordinator_address, num_processes, process_id) -> None:
  if not (_is_int(num_processes) and num_processes >= 1):
    raise ValueError(f"--num-processes must be an integer >= 1 (the number of processes, one per host); "
                     f"got {num_processes!r}")
  if not (_is_int(process_id) and 0 <= process_id < num_processes):
    raise ValueError(f"--process-id must be an integer in [0, {num_processes - 1}] (this process's rank among "
                     f"--num-processes {num_processes}; process 0 serves the coordinator); got {process_id!r}")
  host, sep, port = str(coordinator_address).rpartition(":")
  if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
    raise ValueError(f"--coordinator-address must be HOST:PORT (process 0's address and a free port every "
                     f"process can reach, e.g. 10.0.0.1:1234); got {coordinator_address!r}")


def _is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _select_cpu_collectives() -> None:
  """Gloo for cross-process collectives of CPU devices (older JAX defaults to none, which cannot all-reduce
  across processes); a user's explicit ``mpi`` stays. Harmless on GPU/TPU, whose collectives are their own."""
  chosen = jax.config.jax_cpu_collectives_implementation
  if chosen in ("mpi", "megascale"):
    return
  if chosen != "gloo":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    from jax._src.lib import _jax  # where jaxlib keeps its gloo factory (private; checked only when present)
  except ImportError:
    return
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    raise RuntimeError("this jaxlib has no gloo collectives, so CPU devices of several processes cannot "
                       "all-reduce; install a jaxlib built with gloo (the PyPI wheels are), or set "
                       "jax_cpu_collectives_implementation=mpi with an MPI library")


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
