"""``kdjax reproduce`` with two-stage methods: ``"@<variant>"`` names the same seed's earlier run."""

import json
import os
import types

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt
from kdjax import reproduce
from kdjax.config import default_stage_config
from kdjax.errors import UnknownNameError

WIDTHS = (4, 4, 8, 8)
GUIDED = ("conv1", "bn1", "layer1_0", "layer2_0")


def fake_paper(stage2_init="@stage1", stage2_steps=0):
  """A three-variant protocol on digits: teacher, FitNets-style hint stage, stage 2 from it."""
  def get_config(variant):
    c = default_stage_config()
    c.dataset = "digits"
    c.model = "resnet8"
    c.model_kwargs = {"widths": WIDTHS}
    c.batch_size = 16
    c.eval_batch_size = 160
    c.num_steps = 2
    if variant == "stage1":
      c.method = "fitnets_hint"
      c.trainable = GUIDED
    elif variant == "student_two_stage":
      c.init_from = stage2_init
      c.init_layers = GUIDED
      c.num_steps, c.num_epochs = stage2_steps, 0
    return c
  return types.SimpleNamespace(PAPER="fake", PAPER_RESULTS={}, PROTOCOL=("teacher", "stage1", "student_two_stage"),
                               get_config=get_config)


def params_of(workdir):
  return ckpt.load_teacher_variables(str(workdir))[0]["params"]


@pytest.mark.slow
def test_init_from_reference_resolves_to_this_seeds_stage1_run(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce, "load_paper", lambda key: fake_paper())
  results = reproduce.run_protocol("fake", seeds=2, workdir=str(tmp_path), progress=False, echo=lambda *a: None)
  assert set(results["runs"]) == {"teacher", "stage1", "student_two_stage"}
  for seed in (0, 1):
    seed_dir = tmp_path / f"seed_{seed}"
    saved = json.loads((seed_dir / "student_two_stage" / "config.json").read_text())
    assert saved["init_from"] == str(seed_dir / "stage1")
    assert json.loads((seed_dir / "stage1" / "config.json").read_text())["teacher_workdir"] == str(
        seed_dir / "teacher")
    # Stage 2 at step 0 holds exactly stage 1's guided layers of the same seed.
    start, stage1 = params_of(seed_dir / "student_two_stage"), params_of(seed_dir / "stage1")
    for name in GUIDED:
      for a, b in zip(jax.tree.leaves(start[name]), jax.tree.leaves(stage1[name])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = params_of(tmp_path / "seed_1" / "stage1")["conv1"]
  assert not np.array_equal(np.asarray(jax.tree.leaves(other)[0]),
                            np.asarray(jax.tree.leaves(params_of(tmp_path / "seed_0" / "stage1")["conv1"])[0]))


@pytest.mark.parametrize("reference", ["@nope", "@student_two_stage"])
def test_unknown_or_later_reference_fails_before_training(tmp_path, monkeypatch, reference):
  monkeypatch.setattr(reproduce, "load_paper", lambda key: fake_paper(stage2_init=reference))
  with pytest.raises(UnknownNameError, match=rf"'{reference[1:]}'; expected one of: stage1, teacher"):
    reproduce.run_protocol("fake", seeds=1, workdir=str(tmp_path), progress=False, echo=lambda *a: None)
  assert not (tmp_path / "seed_0").exists()


def test_plain_paths_are_left_alone():
  c = default_stage_config()
  c.init_from, c.teacher_workdir = "runs/x/stage1", "runs/a,@teacher"
  reproduce.resolve_run_references(c, seed_dir="w/seed_0", variant="v", done=("teacher",))
  assert c.init_from == "runs/x/stage1" and c.teacher_workdir == "runs/a,w/seed_0/teacher"


def test_a_named_protocol_runs_its_own_variants_and_reports_train_accuracy(tmp_path, monkeypatch):
  paper = fake_paper()
  base = paper.get_config

  def get_config(variant):
    c = base("teacher")
    c.report_train_accuracy = variant == "alone"
    return c
  paper.get_config, paper.PROTOCOLS = get_config, {"short": ("teacher", "alone")}
  monkeypatch.setattr(reproduce, "load_paper", lambda key: paper)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UnknownNameError, match="'long'; expected one of: default, short"):
    reproduce.run_protocol("fake", seeds=1, protocol="long", progress=False, echo=lambda *a: None)
  results = reproduce.run_protocol("fake", seeds=1, protocol="short", progress=False, echo=lambda *a: None)
  assert set(results["runs"]) == {"teacher", "alone"} and results["settings"]["protocol"] == "short"
  assert (tmp_path / "runs" / "fake_short" / "seed_0" / "alone" / "results.json").exists()
  measured = json.loads((tmp_path / "runs/fake_short/seed_0/alone/results.json").read_text())["train_accuracy"]
  assert results["runs"]["alone"]["extra"]["train_accuracy"] == [measured]
  assert "train_accuracy" not in results["runs"]["teacher"].get("extra", {})
  assert "protocol `short`" in (tmp_path / "runs/fake_short/results.md").read_text()


@pytest.mark.parametrize("paper", ["fitnets", "fsp", "attention_transfer"])
def test_transfer_set_protocols_follow_the_regime_and_reference_their_own_runs(paper):
  from kdjax.config import TRANSFER_SET_LADDER
  module = reproduce.load_paper(paper)
  variants = reproduce.protocol_variants(module, "transfer_set")
  assert variants[0] == "teacher" and module.TRANSFER_SET_STEPS in TRANSFER_SET_LADDER
  teacher = module.get_config("teacher")
  assert teacher.to_dict() == module.get_config("teacher").to_dict()  # the main protocol's teacher
  for index, variant in enumerate(variants[1:], start=1):
    c = module.get_config(variant)
    base = module.get_config(variant[len("transfer_"):])
    assert (c.dataset, c.labelled_examples, c.jitter, c.num_epochs) == ("mnist5k", 1000, 2, 0)
    assert c.report_train_accuracy and 0 < c.num_steps <= module.TRANSFER_SET_STEPS
    assert (c.model, c.method, c.learning_rate) == (base.model, base.method, base.learning_rate)
    assert c.include_unlabelled == (c.method != "supervised")  # only a distillation term uses transfer inputs
    if variant.endswith("student_alone"):
      assert c.num_steps == module.TRANSFER_SET_STEPS
    reproduce.resolve_run_references(c, seed_dir="w", variant=variant, done=variants[:index])
    assert c.init_from in ("", "w/" + variants[index - 1])  # stage 2 starts from this protocol's stage 1
    with pytest.raises(ValueError, match="no ',full' setting"):
      module.get_config(variant + ",full")


@pytest.mark.parametrize("paper", ["fitnets", "fsp", "attention_transfer"])
def test_paper_protocols_build_and_reference_earlier_runs(paper):
  module = reproduce.load_paper(paper)
  assert module.PROTOCOL[0] == "teacher"
  for index, variant in enumerate(module.PROTOCOL):
    for scale in ("", ",full"):
      c = module.get_config(variant + scale)
      assert c.batch_size % 8 == 0
      reproduce.resolve_run_references(c, seed_dir="w", variant=variant, done=module.PROTOCOL[:index])
    if not variant.startswith("teacher"):  # "teacher", or a second teacher such as AT's "teacher_mlp"
      assert variant.startswith("student_")



def test_file_references_resolve_in_dataset_and_loss_fields():
  c = default_stage_config()
  c.dataset, c.test_dataset = "@reconstruct/reconstructed.npz", "mnist5k"
  with c.unlocked():
    c.loss.metadata, c.loss.kind = "@metadata/metadata.npz", "top_layer"
  reproduce.resolve_run_references(c, seed_dir="w/seed_0", variant="v", done=("metadata", "reconstruct"))
  assert c.dataset == os.path.join("w/seed_0", "reconstruct", "reconstructed.npz")
  assert c.loss.metadata == os.path.join("w/seed_0", "metadata", "metadata.npz")
  assert (c.test_dataset, c.loss.kind) == ("mnist5k", "top_layer")
  c.dataset = "@later/x.npz"
  with pytest.raises(UnknownNameError, match="'later'"):
    reproduce.resolve_run_references(c, seed_dir="w/seed_0", variant="v", done=("metadata",))


def test_table_shows_stages_without_a_model_and_retrieval_columns():
  runs = {
      "metadata": {"test_accuracy": [], "test_errors": [], "test_examples": [],
                   "extra_stats": {"bytes": {"mean": 10.0, "std": 0.0}}},
      "student": {"test_accuracy": [0.9], "test_errors": [10], "test_examples": [100], "test_accuracy_mean": 0.9,
                  "test_accuracy_std": 0.0, "test_errors_mean": 10.0, "test_errors_std": 0.0,
                  "retrieval_stats": {"mAP": {"mean": 0.5, "std": 0.1}}},
  }
  table = reproduce.format_table({"paper": "P", "settings": {"dataset": "d", "seeds": 1, "full": False},
                                  "runs": runs, "paper_results": {}})
  assert "| metadata | — | — | — | bytes 10.0000 ± 0.0000 | — |" in table
  assert "| student | 0.9000 ± 0.0000 | 10.0 ± 0.0 / 100 | mAP 0.5000 ± 0.1000 | — | — |" in table
