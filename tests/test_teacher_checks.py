"""Issue 12, continued: teachers (unfinished, corrupt, of another class count or input shape, ensemble members
named) and the ``kdjax`` command (no traceback on success, progress lines off a terminal, one-line errors).

Split from test_reliability.py so each file stays near a minute on one core.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import StopTraining, crash_after
from test_reliability import save_npz, tiny_config

from kdjax import train
from kdjax.errors import UnfinishedRunError
from kdjax.train import train_and_evaluate


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A finished run of :func:`test_reliability.tiny_config`, used read-only."""
  workdir = str(tmp_path_factory.mktemp("teacher") / "run")
  train_and_evaluate(tiny_config(), workdir, progress=False)
  return workdir


@pytest.fixture
def finished_run(tmp_path, teacher_dir):
  """A private copy of :func:`teacher_dir` (for tests that damage it)."""
  import shutil
  shutil.copytree(teacher_dir, tmp_path / "run")
  return tmp_path / "run"


def test_a_teacher_with_another_class_count_is_refused_before_config_json(tmp_path, teacher_dir):
  data = save_npz(tmp_path / "four.npz", classes=4)
  config = tiny_config(dataset=data, method="soft_targets", teacher_workdir=teacher_dir)
  with pytest.raises(ValueError, match=r"teacher .*run \(mlp, 10 classes.* outputs 10 classes, but .* has 4"):
    train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


STUDENT_CONFIG = textwrap.dedent("""
    from kdjax.config import default_stage_config
    def get_config():
      c = default_stage_config()
      c.dataset = "digits"; c.model = "mlp"; c.model_kwargs = {"hidden": (16,)}; c.method = "soft_targets"
      c.batch_size = 16; c.num_steps = 6; c.log_every_steps = 2; c.checkpoint_every_steps = 2
      c.eval_batch_size = 160; c.jitter = 1
      return c
""")


def test_a_successful_cli_run_prints_no_traceback_and_logs_progress_lines_when_not_a_terminal(tmp_path, teacher_dir):
  config = tmp_path / "config.py"
  config.write_text(STUDENT_CONFIG)
  done = subprocess.run([sys.executable, "-m", "kdjax.cli", "train", "--config", str(config), "--workdir",
                         str(tmp_path / "run"), f"--config.teacher_workdir={teacher_dir}"],
                        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr
  assert "\r" not in done.stderr  # no carriage-return progress bar in a log
  assert "run: step 6/6 (100%)" in done.stderr
  assert "test accuracy" in done.stdout


def test_an_unfinished_teacher_is_refused_unless_allowed_and_the_allowance_is_recorded(tmp_path):
  teacher = tmp_path / "teacher"
  with pytest.raises(StopTraining):
    train_and_evaluate(tiny_config(num_steps=8), str(teacher), progress=False, callbacks=[crash_after(5)])
  student = tiny_config(method="soft_targets", teacher_workdir=str(teacher))
  with pytest.raises(UnfinishedRunError, match=r"no results.json .*newest checkpoint is at step 4 of 8.*"
                                               r"allow_partial_teacher=true"):
    train_and_evaluate(student, str(tmp_path / "student"), progress=False)
  assert not (tmp_path / "student").exists()
  train_and_evaluate(tiny_config(method="soft_targets", teacher_workdir=str(teacher), allow_partial_teacher=True),
                     str(tmp_path / "student"), progress=False)
  recorded = json.loads((tmp_path / "student" / "config.json").read_text())
  assert recorded["allow_partial_teacher"] is True
  assert "step 4 of 8" in " ".join(recorded["partial_teachers"][str(teacher)])


def test_a_teacher_with_a_corrupt_newest_checkpoint_is_refused_unless_allowed(finished_run):
  teacher = finished_run
  for root, _, files in os.walk(teacher / "checkpoints" / "4"):  # a bad disk under the newest checkpoint
    for name in files:
      (open(os.path.join(root, name), "wb")).write(b"garbage")
  with pytest.raises(UnfinishedRunError, match=r"newest checkpoint of .*run' \(step 4\) is unreadable"):
    train.load_teachers(str(teacher))
  (model,), (variables,) = train.load_teachers(str(teacher), allow_partial=True)  # step 2 instead
  assert set(variables["params"]) == {"dense_0", "head"}


def test_ensemble_members_with_different_classes_or_inputs_are_named(tmp_path, teacher_dir):
  four = tmp_path / "four"
  train_and_evaluate(tiny_config(dataset=save_npz(tmp_path / "four.npz", classes=4)), str(four), progress=False)
  with pytest.raises(ValueError, match=r"differ in class count.*teacher\d*/run \(mlp, 10 classes.*four \(mlp, 4 "):
    train.load_teachers(f"{teacher_dir},{four}")
  small = tmp_path / "small"
  train_and_evaluate(tiny_config(dataset=save_npz(tmp_path / "small.npz", shape=(4, 4, 1))), str(small),
                     progress=False)
  with pytest.raises(ValueError, match=r"teacher .*small \(mlp, 10 classes, .*inputs \(4, 4, 1\)\) cannot take "
                                       r"this stage's inputs of shape \(8, 8, 1\).*ensemble: "):
    train.load_teachers(f"{teacher_dir},{small}", example_shape=(8, 8, 1), num_classes=10)


def test_the_cli_reports_a_bad_workdir_in_one_line(tmp_path, capsys):
  from kdjax.cli import main
  config = tmp_path / "config.py"
  config.write_text(STUDENT_CONFIG)
  path = tmp_path / "file"
  path.write_text("")
  run = str(tmp_path / "run")
  assert main(["train", "--config", str(config), "--workdir", run, "--config.keep_checkpoints=0"]) == 2
  assert "kdjax: error: keep_checkpoints must be an integer >= 1" in capsys.readouterr().err
  assert main(["train", "--config", str(config), "--workdir", str(path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("kdjax: error: --workdir") and "is a file, not a directory" in err and "Traceback" not in err
