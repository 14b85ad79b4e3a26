"""Nothing lost, nothing silently wrong (issue 12): the work directory, checkpoints and teachers.

Every bad input is refused before ``config.json`` is written (so the corrected command can use the same
work directory), a second process cannot share a work directory, only a truly unreadable checkpoint is set
aside, a finished run is never retrained over, and an unfinished teacher is refused unless allowed.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import StopTraining, crash_after
from test_train import tiny_config as stage_config

from kdjax import checkpoint as ckpt
from kdjax import train
from kdjax.errors import WorkdirError, WorkdirInUseError
from kdjax.logging_utils import METRICS_FILE
from kdjax.train import train_and_evaluate


def tiny_config(**fields):
  """A 4-step MLP stage on sklearn digits (8x8x1, 10 classes)."""
  return stage_config(**{"model_kwargs": {"hidden": (16,)}, "num_steps": 4, "checkpoint_every_steps": 2, **fields})


def save_npz(path, *, n=64, shape=(8, 8, 1), classes=10, seed=0, **replace):
  rng = np.random.default_rng(seed)
  arrays = {"x_train": rng.random((n, *shape)).astype(np.float32), "y_train": np.arange(n) % classes,
            "x_test": rng.random((16, *shape)).astype(np.float32), "y_test": np.arange(16) % classes}
  arrays.update(replace)
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A finished run of :func:`tiny_config` (used read-only; tests that change a run copy it with finished_run)."""
  workdir = str(tmp_path_factory.mktemp("teacher") / "run")
  train_and_evaluate(tiny_config(), workdir, progress=False)
  return workdir


@pytest.fixture
def finished_run(tmp_path, teacher_dir):
  """A private copy of the finished run of :func:`tiny_config`."""
  import shutil
  shutil.copytree(teacher_dir, tmp_path / "run")
  return tmp_path / "run"


# --- refused before anything is written ---------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("keep_checkpoints", 0), ("batch_size", 0), ("batch_size", -8), ("checkpoint_every_steps", 0),
    ("log_every_steps", 0), ("eval_batch_size", 0), ("num_steps", -1), ("jitter", -1), ("keep_checkpoints", -1)])
def test_bad_numeric_fields_are_named_and_nothing_is_written(tmp_path, field, value):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=rf"{field} must be an integer >= \d .*got {value!r}"):
    train_and_evaluate(tiny_config(**{field: value}), str(workdir), progress=False)
  assert not workdir.exists()  # the directory this call created is removed again


def test_batch_larger_than_the_data_is_refused_and_the_corrected_rerun_uses_the_same_workdir(tmp_path):
  data = save_npz(tmp_path / "small.npz", n=20)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"batch_size=24 is larger than the transfer set .* \(20 examples\)"):
    train_and_evaluate(tiny_config(dataset=data, batch_size=24), str(workdir), progress=False)
  assert not (workdir / "config.json").exists()
  train_and_evaluate(tiny_config(dataset=data, batch_size=8), str(workdir), progress=False)
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 8


def test_flat_images_with_jitter_are_refused_before_config_json(tmp_path):
  data = save_npz(tmp_path / "flat.npz", shape=(64,))
  with pytest.raises(ValueError, match=r"jitter=2 .* examples of shape \(64,\)"):
    train_and_evaluate(tiny_config(dataset=data, jitter=2), str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_evaluation_only_fields_may_change_on_resume_and_others_may_not(tmp_path, finished_run):
  workdir = str(finished_run)
  first = json.loads((finished_run / "results.json").read_text())
  again = train_and_evaluate(tiny_config(eval_batch_size=48, log_every_steps=1, checkpoint_every_steps=1,
                                         keep_checkpoints=5), workdir, progress=False)
  assert again["test_errors"] == first["test_errors"]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["eval_batch_size"] == 48
  with pytest.raises(ValueError, match=r"fields \['learning_rate'\] differ: learning_rate was 0.001, now 0.01"):
    train_and_evaluate(tiny_config(learning_rate=1e-2), workdir, progress=False)


def test_a_workdir_that_is_a_file_or_read_only_gets_a_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(WorkdirError, match="is a file, not a directory"):
    train_and_evaluate(tiny_config(), str(path), progress=False)
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  if os.geteuid() == 0:  # root writes anywhere: let the file system say no
    real_open = os.open

    def refusing_open(name, *args, **kwargs):
      if str(name).startswith(str(read_only)):
        raise OSError(errno.EROFS, "Read-only file system", str(name))
      return real_open(name, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing_open)
  else:
    read_only.chmod(0o555)
  with pytest.raises(WorkdirError, match=r"cannot write to work directory .*read_only.*(read-only|permission)"):
    train_and_evaluate(tiny_config(), str(read_only / "run"), progress=False)


# --- one process per work directory -------------------------------------------------------------------------


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from kdjax.checkpoint import WorkdirLock
    with WorkdirLock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(120)
""")


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"})
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirInUseError, match=rf"in use by another kdjax run \(pid {holder.pid} on host "):
      train_and_evaluate(tiny_config(), str(workdir), progress=False)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert (workdir / ckpt.LOCK_FILE).exists()  # the dead process's lock file is still there ...
  with ckpt.WorkdirLock(str(workdir)):  # ... and does not block
    assert json.loads((workdir / ckpt.LOCK_FILE).read_text())["pid"] == os.getpid()


# --- checkpoints: only a bad file is set aside; a finished run is never retrained over --------------------------


@pytest.mark.parametrize("error", [MemoryError("out of memory"), OSError(errno.EIO, "Input/output error"),
                                   PermissionError(errno.EACCES, "Permission denied"),
                                   ValueError("UNAVAILABLE: network file system not responding")])
def test_a_machine_error_while_restoring_propagates_and_keeps_the_finished_run(finished_run, monkeypatch, error):
  workdir = finished_run
  results = (workdir / "results.json").read_text()
  steps = sorted(os.listdir(workdir / "checkpoints"))

  def failing_restore(self, *args, **kwargs):
    raise error
  monkeypatch.setattr(ckpt.ocp.CheckpointManager, "restore", failing_restore)
  with pytest.raises(type(error)):
    train_and_evaluate(tiny_config(), str(workdir), progress=False)
  assert sorted(os.listdir(workdir / "checkpoints")) == steps  # nothing was moved aside
  assert not (workdir / ckpt.UNREADABLE_DIR).exists()
  assert (workdir / "results.json").read_text() == results


def test_corrupt_checkpoint_errors_are_told_from_machine_errors():
  import json as json_module
  corrupt = [ValueError("NOT_FOUND: Error opening \"zarr\" driver"), json_module.JSONDecodeError("x", "garbage", 0),
             FileNotFoundError("_METADATA"), KeyError("params")]
  machine = [MemoryError(), OSError(errno.EIO, "I/O"), OSError(errno.ENOSPC, "full"),
             ValueError("RESOURCE_EXHAUSTED: out of memory"), RuntimeError("unknown")]
  wrapped = ValueError("could not restore")
  wrapped.__cause__ = OSError(errno.EIO, "I/O")
  assert all(ckpt.is_corrupt_checkpoint_error(e) for e in corrupt)
  assert not any(ckpt.is_corrupt_checkpoint_error(e) for e in machine + [wrapped])


def test_a_finished_run_without_a_readable_checkpoint_is_not_retrained_over(finished_run):
  workdir = finished_run
  results = (workdir / "results.json").read_text()
  for step in os.listdir(workdir / "checkpoints"):  # a damaged disk: every checkpoint unreadable
    for root, _, files in os.walk(workdir / "checkpoints" / step):
      for name in files:
        (open(os.path.join(root, name), "wb")).write(b"garbage")
  with pytest.raises(ValueError, match=r"holds a finished run \(results.json\) but no readable checkpoint"):
    train_and_evaluate(tiny_config(), str(workdir), progress=False)
  assert (workdir / "results.json").read_text() == results
  assert len(os.listdir(workdir / ckpt.UNREADABLE_DIR)) == 2  # both set aside, none deleted


def test_metrics_have_one_row_per_logged_step_after_a_resume(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config(num_steps=8, log_every_steps=1, checkpoint_every_steps=4)
  with pytest.raises(StopTraining):
    train_and_evaluate(config, str(workdir), progress=False, callbacks=[crash_after(6)])
  train_and_evaluate(config, str(workdir), progress=False)
  steps = [json.loads(line)["step"] for line in (workdir / METRICS_FILE).read_text().splitlines()]
  assert steps == list(range(1, 9))


def test_the_lock_is_released_so_the_same_process_can_run_again(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(StopTraining):
    train_and_evaluate(tiny_config(), workdir, progress=False, callbacks=[crash_after(1)])
  t0 = time.time()
  train_and_evaluate(tiny_config(), workdir, progress=False)
  assert time.time() - t0 < 60


def test_progress_is_a_log_line_every_n_seconds_when_not_a_terminal_and_a_bar_on_one(tmp_path, caplog):
  import io
  import logging

  from kdjax.logging_utils import MetricWriter

  class Terminal(io.StringIO):
    def isatty(self):
      return True
  caplog.set_level(logging.INFO, logger="kdjax.logging_utils")
  log_stream = io.StringIO()
  writer = MetricWriter(str(tmp_path / "log"), total_steps=4, progress=True, description="stage",
                        progress_seconds=0.0, stream=log_stream)
  writer.write(2, {"train/loss": 1.5})
  for step in range(1, 5):
    writer.advance(step)
  writer.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage: step")]
  assert len(lines) == 4 and lines[-1].startswith("stage: step 4/4 (100%)") and lines[-1].endswith("loss 1.5")
  assert log_stream.getvalue() == ""  # nothing written with carriage returns
  caplog.clear()
  terminal = Terminal()
  writer = MetricWriter(str(tmp_path / "tty"), total_steps=4, progress=True, description="stage", stream=terminal)
  writer.advance(4)
  writer.close()
  assert "\r" in terminal.getvalue() and not any("stage: step" in r.getMessage() for r in caplog.records)


def test_a_model_that_cannot_take_the_inputs_is_refused_before_config_json(tmp_path):
  data = save_npz(tmp_path / "flat.npz", shape=(64,))
  with pytest.raises(ValueError, match=r"model 'small_cnn' cannot take the examples of dataset .*flat.npz' "
                                       r"\(shape \(64,\)\)"):
    train_and_evaluate(tiny_config(dataset=data, model="small_cnn", model_kwargs={"channels": (4,), "dense": 8}),
                       str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_more_labelled_examples_than_the_data_has_is_said(tmp_path, caplog):
  import logging

  from kdjax import data as kdata
  config = tiny_config(dataset=save_npz(tmp_path / "small.npz", n=40), labelled_examples=1000, batch_size=8)
  dataset = kdata.load(config.dataset)
  transfer = kdata.make_transfer_set(dataset, labelled_examples=1000)
  caplog.set_level(logging.WARNING, logger="kdjax.train")
  train.check_stage_data(config, dataset, transfer, train.as_program(train.make_method("supervised", {})))
  assert "labelled_examples=1000 is not below the 40 training examples" in caplog.text
