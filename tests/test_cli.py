"""The ``kdjax`` command: list, train (and resume), reproduce on a tiny setting, user errors."""

import json

import pytest

from kdjax.cli import main

TINY = ["--dataset", "digits", "--no-progress", "--config.num_steps=3", "--config.labelled_examples=300",
        "--config.batch_size=16", "--config.eval_batch_size=160", "--config.checkpoint_every_steps=2"]


@pytest.mark.slow
def test_list_shows_papers_datasets_models(capsys):
  assert main(["list"]) == 0
  out = capsys.readouterr().out
  for text in ("soft_targets", "mimic", "Hinton", "mnist5k", "digits", "mnist1d", ".npz", "mimic_mlp",
               "small_cnn", "features: bottleneck, hidden_0, logits"):
    assert text in out
  assert "200,186 params" in out  # mimic_mlp: 784*64 + 64*2000 + 2000 + 2000*10 + 10


def test_list_methods_shows_every_registered_method(capsys):
  from kdjax.methods.objective import METHODS
  assert main(["list", "methods"]) == 0
  out = capsys.readouterr().out
  for name in ("rocket_launching", "adversarial", "attention_transfer_gradient", *METHODS):
    assert f"  {name} " in out


@pytest.mark.parametrize("paper, seeds", [pytest.param("soft_targets", 2, marks=pytest.mark.slow),
                                          pytest.param("mimic", 1, marks=pytest.mark.slow)])
def test_reproduce_smoke_writes_table_json_and_chart(tmp_path, capsys, paper, seeds):
  workdir = tmp_path / paper
  assert main(["reproduce", paper, "--seeds", str(seeds), "--workdir", str(workdir), *TINY]) == 0
  out = capsys.readouterr().out
  assert "| run | measured test accuracy" in out and "paper (reported)" in out
  results = json.loads((workdir / "results.json").read_text())
  runs = results["runs"]
  assert {"teacher", "student_alone"} <= set(runs)
  assert any(name.startswith("student_") and name != "student_alone" for name in runs)
  for run in runs.values():
    assert len(run["test_accuracy"]) == seeds and all(0.0 <= a <= 1.0 for a in run["test_accuracy"])
    assert run["test_accuracy_std"] >= 0.0
  assert results["paper_results"] and results["settings"]["seeds"] == seeds
  assert results["settings"]["dataset"] == "digits"
  assert (workdir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_then_rerun_resumes_finished_run(tmp_path, capsys):
  teacher = tmp_path / "teacher"
  args = ["train", "--config", "papers/soft_targets/config.py:teacher", "--workdir", str(teacher),
          "--no-progress", "--config.dataset=digits", "--config.num_steps=4", "--config.batch_size=16",
          "--config.labelled_examples=300", "--config.eval_batch_size=160"]
  assert main(args) == 0
  first = capsys.readouterr().out
  assert main(args) == 0  # resumes at the last step: nothing to train, same evaluation
  assert capsys.readouterr().out == first
  student = ["train", "--config", "papers/soft_targets/config.py:student_kd_T4", "--workdir",
             str(tmp_path / "student"), "--no-progress", "--config.dataset=digits", "--config.num_steps=2",
             "--config.batch_size=16", "--config.eval_batch_size=160", f"--config.teacher_workdir={teacher}",
             "--config.loss.temperature", "20"]
  assert main(student) == 0
  saved = json.loads((tmp_path / "student" / "config.json").read_text())
  assert saved["loss"]["temperature"] == 20.0


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "no_paper"], "unknown paper 'no_paper'; expected one of: "),
    (["train", "--config", "papers/soft_targets/config.py:teacher", "--workdir", "/tmp/x",
      "--config.tempreature=3"], "unknown config key 'tempreature'"),
    (["train", "--config", "papers/soft_targets/config.py:nope", "--workdir", "/tmp/x"], "unknown variant 'nope'"),
    (["train", "--config", "papers/soft_targets/config.py:student_kd_T4", "--workdir", "/tmp/x",
      "--config.temperature=0"], "unknown config key 'temperature'"),
    (["train", "--config", "papers/no/config.py", "--workdir", "/tmp/x"], "does not exist"),
])
def test_user_errors_print_one_clear_line(argv, message, capsys):
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("kdjax: error: ") and message in err


def test_zero_temperature_is_rejected_before_training(tmp_path, capsys):
  argv = ["train", "--config", "papers/soft_targets/config.py:student_kd_T4", "--workdir", str(tmp_path / "s"),
          "--config.loss.temperature=0", f"--config.teacher_workdir={tmp_path}/none", "--config.dataset=digits"]
  assert main(argv) == 2
  assert "temperature must be > 0, got 0.0" in capsys.readouterr().err


@pytest.mark.slow
def test_full_switch_uses_the_tfds_dataset(tmp_path, capsys):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=256):
    assert main(["reproduce", "soft_targets", "--full", "--seeds", "1", "--workdir", str(tmp_path), "--no-progress",
                 "--config.num_steps=1", "--config.eval_batch_size=256"]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["settings"]["full"] and results["settings"]["dataset"] == "mnist"
  assert results["settings"]["configs"]["teacher"]["labelled_examples"] == 0  # all labels, as the paper
  assert results["runs"]["teacher"]["test_examples"] == [256]


def test_tensorboard_event_files_when_tensorboardx_is_installed(tmp_path):
  pytest.importorskip("tensorboardX", reason="tensorboardX is an optional extra: pip install -e '.[tensorboard]'")
  argv = ["train", "--config", "papers/mimic/config.py:teacher", "--workdir", str(tmp_path), "--no-progress",
          "--config.dataset=digits", "--config.num_steps=2", "--config.batch_size=16", "--config.log_every_steps=1",
          "--config.eval_batch_size=160"]
  assert main(argv) == 0
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_a_misspelt_paper_creates_no_compilation_cache_directory(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("KDJAX_COMPILATION_CACHE", raising=False)  # conftest points it at the test run's cache
  assert main(["reproduce", "no_paper"]) == 2
  assert main(["reproduce", "mimic", "--protocol", "no_protocol"]) == 2
  assert "unknown protocol" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []
