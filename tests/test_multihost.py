"""Several processes through JAX's runtime (issue 13 §2): 2 processes × 2 CPU devices on localhost, gloo collectives.

The multi-process runs start the real command (``kdjax train --coordinator-address 127.0.0.1:PORT --num-processes 2
--process-id I``) in two subprocesses through tests/multihost_worker.py, which records what each process read. One
module fixture runs everything once (process starts and compilation dominate the time):

* in this process: a tiny MLP teacher (on 4 devices; the processes load it on 2 each);
* 2 processes, three commands in turn: run A, a ``soft_targets`` stage with the cached teacher, uninterrupted; run
  B, the same stage stopped after step 5 (its step-4 checkpoint on disk); run B again, which resumes;
* meanwhile in this process: the 1-process reference of the same stage on 4 of the conftest's 8 devices (the same
  global batch of 16 over the same number of devices as 2 processes × 2).

The tests then check (a) A equals the 1-process run, (b) each process read only its half of every global batch,
(c) the resumed B equals A bit for bit, (d) the teacher-logit cache each process assembled equals the teacher's
logits computed here in one process. Without gloo or the distributed runtime the processes fail and the test
fails with their messages; nothing is skipped.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt
from kdjax import data as kdata
from kdjax import models, parallel
from kdjax.cli import main
from kdjax.config import load_config
from kdjax.train import build_model, train_and_evaluate

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
NUM_STEPS, STOP_AFTER, CHECKPOINT_EVERY = 8, 5, 4
PROCESSES, DEVICES_PER_PROCESS = 2, 2
LAUNCH_TIMEOUT_S = 300  # a hung collective would otherwise wait for JAX's 5-minute barrier timeouts

CONFIG = textwrap.dedent("""
    from kdjax.config import default_stage_config

    def get_config(variant="student"):
      c = default_stage_config()
      c.dataset = "digits"; c.model = "mlp"; c.batch_size = 16; c.eval_batch_size = 160
      c.log_every_steps = 2; c.checkpoint_every_steps = {checkpoint_every}
      if variant == "teacher":
        c.model_kwargs = {{"hidden": (48,)}}; c.num_steps = 30
        return c
      # Dropout makes the comparison see the per-step randomness; 300 labelled examples, the rest teacher-labelled.
      c.model_kwargs = {{"hidden": (32,), "dropout_hidden": 0.2}}; c.num_steps = {num_steps}
      c.method = "soft_targets"; c.teacher_workdir = {teacher!r}; c.labelled_examples = 300
      c.loss = {{"temperature": 4.0, "alpha": 0.9, "ensemble_mean": "arithmetic"}}
      return c
""")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env() -> dict[str, str]:
  """This process's environment (the conftest's XLA flags, so both sides compile alike) with 2 CPU devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags.append(f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path),
          "PYTHONUNBUFFERED": "1"}


def start(record_dir: pathlib.Path, commands: list[tuple[int, list[str]]]) -> list:
  """Starts 2 processes joined by JAX's distributed runtime that run ``commands`` (``(stop_after, kdjax args)``) in
  turn; their records and logs go to ``record_dir`` (created). Returns ``[(process, log path)]``."""
  port = free_port()
  record_dir.mkdir()
  started = []
  for process_id in range(PROCESSES):
    argv = [str(WORKER), str(record_dir)]
    for i, (stop_after, args) in enumerate(commands):
      argv += (["--then"] if i else []) + [str(stop_after), *args, "--no-progress",
                                           "--coordinator-address", f"127.0.0.1:{port}",
                                           "--num-processes", str(PROCESSES), "--process-id", str(process_id)]
    log_path = record_dir / f"process_{process_id}.log"
    with open(log_path, "w") as log_file:
      started.append((subprocess.Popen([sys.executable, *argv], env=child_env(), stdout=log_file,
                                       stderr=subprocess.STDOUT), log_path))
  return started


def finish(started: list, deadline: float) -> None:
  """Waits for the processes of :func:`start`; fails with both log tails if one fails or the pair runs past
  ``deadline`` (``time.monotonic()``). A failing process gets its partner ended at once (the partner would wait in
  a collective for minutes)."""
  procs = [p for p, _ in started]
  failed = None
  while any(p.poll() is None for p in procs):
    failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
    if failed is not None or time.monotonic() > deadline:
      break
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  codes = [p.returncode for p in procs]
  if any(codes):
    tails = "\n".join(f"--- process {i} (exit status {c}), {path}:\n" + "\n".join(path.read_text().splitlines()[-25:])
                      for i, (c, (_, path)) in enumerate(zip(codes, started)))
    why = f"timed out after {LAUNCH_TIMEOUT_S} s" if failed is None else f"process {failed} failed"
    pytest.fail(f"the 2-process run {why} (it needs gloo collectives and jax.distributed on localhost; see the "
                f"logs):\n{tails}")


def params_of(workdir) -> dict:
  variables, _, step = ckpt.load_teacher_variables(str(workdir))
  return {"variables": variables, "step": step}


def read_record(record_dir: pathlib.Path, run: int = 0) -> list[dict]:
  """Each process's record of command ``run`` of a launch (tests/multihost_worker.py)."""
  return [json.loads((record_dir / f"run{run}_process_{i}.json").read_text()) for i in range(PROCESSES)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  teacher_dir = root / "teacher"
  config_path = root / "config.py"
  config_path.write_text(CONFIG.format(teacher=str(teacher_dir), num_steps=NUM_STEPS,
                                       checkpoint_every=CHECKPOINT_EVERY))
  four = parallel.make_mesh(jax.devices()[:PROCESSES * DEVICES_PER_PROCESS])
  timings, begin = {}, time.monotonic()
  train_and_evaluate(load_config(f"{config_path}:teacher"), str(teacher_dir), mesh=four, progress=False)
  timings["teacher"], begin = time.monotonic() - begin, time.monotonic()
  student = ["train", "--config", f"{config_path}:student", "--workdir"]
  # One launch, three commands: A uninterrupted; B stopped after step 5 (as if both processes died there, its
  # step-4 checkpoint on disk); B again, resuming from that checkpoint (a fresh stage: state, data and teacher are
  # rebuilt and the state is read back from disk, as after a restart; only the processes are not new, which saves
  # the test a second start of two processes).
  started = start(root / "launch", [(0, student + [str(root / "A")]), (STOP_AFTER, student + [str(root / "B")]),
                                    (0, student + [str(root / "B")])])
  deadline = time.monotonic() + LAUNCH_TIMEOUT_S
  try:  # the 1-process reference trains meanwhile: the processes wait on each other part of the time
    reference = train_and_evaluate(load_config(f"{config_path}:student"), str(root / "reference"), mesh=four,
                                   progress=False)
  finally:
    finish(started, deadline)
  timings["2 processes (A; B stopped; B resumed) with the reference meanwhile"] = time.monotonic() - begin
  print("multihost timings (s):", {k: round(v, 1) for k, v in timings.items()})
  return {"root": root, "records": root / "launch", "config": config_path, "teacher": teacher_dir,
          "reference": reference,
          "results": {name: json.loads((root / name / ckpt.RESULTS_FILE).read_text()) for name in ("A", "B")}}


def assert_trees(a, b, *, exact: bool) -> None:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and leaves_a
  for x, y in zip(leaves_a, leaves_b):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_two_processes_train_what_one_process_trains(runs):
  records = read_record(runs["records"], 0)
  assert [(r["process_index"], r["process_count"], r["local_devices"], r["devices"]) for r in records] == \
      [(0, 2, 2, 4), (1, 2, 2, 4)], "each process should see its 2 devices and the 4 of the global mesh"
  # Float tolerance, not equality: the gradient all-reduce crosses processes through gloo, which adds the 4
  # devices' partial sums in another order than XLA's in-process all-reduce (measured: up to 3e-8 apart after
  # 8 steps). Everything else (batches, dropout bits, the teacher cache) is the same bits.
  assert_trees(params_of(runs["root"] / "A")["variables"], params_of(runs["root"] / "reference")["variables"],
               exact=False)
  a, reference = runs["results"]["A"], runs["reference"]
  assert a["steps"] == NUM_STEPS and a["teacher_cached"]
  assert a["test_errors"] == reference["test_errors"] and a["test_examples"] == reference["test_examples"] == 300
  np.testing.assert_allclose(a["train"]["loss"], reference["train"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(a["test_cross_entropy"], reference["test_cross_entropy"], rtol=1e-5)


def assert_halves_of_global_batches(records: list[dict], config_path, steps: list[int]) -> None:
  """Process ``i`` read exactly the ``i``-th contiguous half of each global batch of ``steps`` and nothing else."""
  config = load_config(f"{config_path}:student")
  transfer_set = kdata.make_transfer_set(kdata.load("digits"), labelled_examples=config.labelled_examples,
                                         split_seed=config.split_seed)
  batches = kdata.TrainBatches(transfer_set, batch_size=config.batch_size, seed=config.seed)
  first, second = records
  assert sorted(map(int, first["read"])) == sorted(map(int, second["read"])) == steps
  for step in steps:
    mine, theirs = first["read"][str(step)], second["read"][str(step)]
    assert len(mine) == len(theirs) == config.batch_size // PROCESSES
    assert not set(mine) & set(theirs), f"step {step}: both processes read positions {set(mine) & set(theirs)}"
    np.testing.assert_array_equal(mine + theirs, batches.indices(step), err_msg=f"step {step}")


def test_each_process_reads_only_its_half_of_every_global_batch(runs):
  assert_halves_of_global_batches(read_record(runs["records"], 0), runs["config"], list(range(NUM_STEPS)))


def test_a_checkpoint_written_by_two_processes_resumes_in_two_processes_to_the_same_bits(runs):
  stopped, resumed_record = read_record(runs["records"], 1), read_record(runs["records"], 2)
  assert [r["checkpoints_before"] for r in resumed_record] == [[CHECKPOINT_EVERY]] * PROCESSES
  assert not any(r["results_before"] for r in resumed_record), "the stopped run must not have written results"
  assert all(max(map(int, r["read"])) >= STOP_AFTER - 1 for r in stopped)
  resumed = params_of(runs["root"] / "B")
  assert resumed["step"] == NUM_STEPS
  assert_trees(resumed["variables"], params_of(runs["root"] / "A")["variables"], exact=True)
  a, b = runs["results"]["A"], runs["results"]["B"]
  assert (b["test_errors"], b["test_cross_entropy"], b["train"]) == (a["test_errors"], a["test_cross_entropy"],
                                                                    a["train"])
  # The resumed run read from the checkpoint's step on (not from 0), again each process its own half.
  assert_halves_of_global_batches(resumed_record, runs["config"], list(range(CHECKPOINT_EVERY, NUM_STEPS)))
  rows = [json.loads(line)["step"] for line in (runs["root"] / "B" / "metrics.jsonl").read_text().splitlines()]
  assert rows == list(range(2, NUM_STEPS + 1, 2)), "each logged step once, as in an uninterrupted run"


def test_teacher_logit_cache_is_assembled_from_both_processes(runs):
  config = load_config(f"{runs['config']}:student")
  transfer_set = kdata.make_transfer_set(kdata.load("digits"), labelled_examples=config.labelled_examples,
                                         split_seed=config.split_seed)
  teacher = build_model("mlp", {"hidden": (48,)}, 10)
  variables = params_of(runs["teacher"])["variables"]
  images, _ = transfer_set.split.get(transfer_set.indices)
  want = np.asarray(jax.jit(lambda v, x: models.apply_model(teacher, v, x, train=False).logits)(variables, images))
  cached = [np.load(runs["records"] / f"run0_teacher_logits_{i}.npy") for i in range(PROCESSES)]
  assert cached[0].shape == (1, len(transfer_set), 10)  # [members, examples, classes]: the whole transfer set
  np.testing.assert_array_equal(cached[0], cached[1])  # both processes hold the same gathered cache
  # Tolerance: one batch of 1,497 here against 10 batches of 160 there, which XLA may tile differently. A batch
  # from the wrong process or position would be off by whole logits.
  np.testing.assert_allclose(cached[0][0], want, rtol=1e-5, atol=1e-5)


# --- the command line's multi-process flags (no process is started) -------------------------------------------


@pytest.mark.parametrize("flags, match", [
    (["--num-processes", "2"], "needs all of .*got --num-processes without --coordinator-address, --process-id"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id must be an integer in \[0, 1\].*got 2"),
    (["--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes must be .* >= 1"),
    (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
])
def test_bad_multiprocess_flags_are_explained(flags, match, capsys):
  for command in (["train", "--config", "unused.py", "--workdir", "unused"], ["reproduce", "hinton"]):
    assert main(command + flags) == 2
    assert jax.distributed.is_initialized() is False
    err = capsys.readouterr().err
    assert err.startswith("kdjax: error: ") and re.search(match, err), err


def test_cluster_detection_reads_the_variables_jax_reads():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  assert parallel.detect_cluster({**slurm, "SLURM_NTASKS": "2"}) == "slurm"
  assert parallel.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # salloc shell, srun -n 1
  assert parallel.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # sbatch script, not srun
  ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_RANK": "0",
          "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
  assert parallel.detect_cluster({**ompi, "OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
  assert parallel.detect_cluster({**ompi, "OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert parallel.detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "tpu"
  assert parallel.detect_cluster({}) is None


def test_no_flags_outside_a_cluster_start_nothing(monkeypatch):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", *parallel.TPU_POD_VARIABLES):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(parallel, "_on_cloud_tpu_vm", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("must not start the runtime"))
  assert parallel.initialize_multihost() is False


def test_starting_the_runtime_after_jax_made_its_devices_is_explained():
  assert jax.devices()  # the backend of this (pytest) process exists
  with pytest.raises(RuntimeError, match="before anything creates JAX's devices.*first thing in each process"):
    parallel.initialize_multihost("127.0.0.1:1", 1, 0)
  assert not jax.distributed.is_initialized()


def test_a_jaxlib_without_gloo_is_named(monkeypatch):
  from jax._src.lib import _jax
  monkeypatch.delattr(_jax, "make_gloo_tcp_collectives")
  with pytest.raises(RuntimeError, match="no gloo collectives"):
    parallel.initialize_multihost("127.0.0.1:1", 2, 0)


@pytest.mark.parametrize("cluster", ["slurm", "tpu"])
def test_a_runtime_that_cannot_start_fails_except_on_cloud_tpu_where_it_is_optional(cluster, monkeypatch, caplog):
  def unreachable(*args, **kwargs):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(parallel, "detect_cluster", lambda: cluster)
  monkeypatch.setattr(jax.distributed, "initialize", unreachable)
  if cluster == "tpu":  # libtpu joins a pod slice's workers by itself: log it and run on
    assert parallel.initialize_multihost() is False
    assert "did not start on this Cloud TPU (ValueError: coordinator_address" in caplog.text
  else:
    with pytest.raises(ValueError, match="coordinator_address"):
      parallel.initialize_multihost()
