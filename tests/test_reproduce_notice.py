"""``kdjax reproduce PAPER --dataset NAME`` says how a protocol designed for another dataset relates to NAME."""

import numpy as np

from kdjax import reproduce, train


def test_the_notice_sets_each_dataset_dependent_setting_beside_both_datasets(tmp_path):
  paper = reproduce.load_paper("soft_targets")
  assert reproduce.dataset_notice(paper, "mnist5k") == []  # its own dataset: nothing to say
  lines = reproduce.dataset_notice(paper, "digits")
  assert lines[0].startswith("note: this protocol was designed for 'mnist5k'; on 'digits' its settings are used as "
                             "written")
  teacher = next(line for line in lines if line.strip().startswith("teacher:"))
  assert "jitter 2 px (7% of mnist5k's 28-px height, 25% of digits's 8 px)" in teacher
  assert "1000 labelled examples (25% of mnist5k's 4000 training examples, 67% of digits's 1497)" in teacher
  assert "150 epochs (1050 steps on 'mnist5k', 1050 on 'digits')" in teacher
  small = tmp_path / "small.npz"
  rng = np.random.default_rng(0)
  np.savez(small, x_train=rng.random((300, 28, 28, 1)).astype(np.float32), y_train=np.arange(300) % 10,
           x_test=rng.random((50, 28, 28, 1)).astype(np.float32), y_test=np.arange(50) % 10)
  lines = reproduce.dataset_notice(paper, str(small))
  assert any(f"but {str(small)!r} has only 300: every example is labelled" in line for line in lines), lines


def test_reproduce_prints_the_notice_before_training(tmp_path, monkeypatch):
  seen, printed = [], []

  def fake_train(config, workdir, **kwargs):
    seen.append((config.dataset, config.test_dataset))
    printed.append("trained")
    return {"test_accuracy": 0.5, "test_errors": 150, "test_examples": 300, "steps": 1}
  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  monkeypatch.setattr(reproduce, "plot_results", lambda results, path: None)
  reproduce.run_protocol("soft_targets", seeds=1, workdir=str(tmp_path), dataset="digits", echo=printed.append)
  assert printed[0].startswith("note: this protocol was designed for 'mnist5k'")
  assert printed.index("trained") > printed.index(printed[0])
  assert {dataset for dataset, _ in seen} == {"digits"}
