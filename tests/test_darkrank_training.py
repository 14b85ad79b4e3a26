"""The DarkRank training stage: P x K batches, the teacher's embeddings, retrieval results, resume, one compile."""

import functools

import jax
import numpy as np
import pytest
from conftest import StopTraining, crash_after
from test_train import tiny_config

from kdjax import parallel, reproduce
from kdjax import train as ktrain
from kdjax.methods import darkrank as dr
from kdjax.methods.objective import make_method
from kdjax.train import train_and_evaluate

HELD_OUT = (7, 8, 9)


def one_device():
  """Stage-runner tests run on one device (the multi-device equality of the runner is test_train.py's)."""
  return parallel.make_mesh(jax.devices()[:1])


def darkrank_config(teacher_dir="", **loss):
  """digits with classes 7-9 held out: batches of 4 classes x 2, embedding MLP 64-24-8 (teacher 64-32-12)."""
  c = tiny_config(method="darkrank", model="embedding_mlp", batch_size=8, num_steps=6, checkpoint_every_steps=3,
                  teacher_workdir=teacher_dir, held_out_classes=HELD_OUT)
  c.model_kwargs = {"hidden": (24,), "embedding_dim": 8}
  c.loss = {**dr.default_loss_config(), "transfer": "none", "list_length": 3, **loss}
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher")
  config = darkrank_config()
  config.num_steps = 20
  config.model_kwargs = {"hidden": (32,), "embedding_dim": 12}
  result = train_and_evaluate(config, str(workdir), progress=False, mesh=one_device())
  assert set(result["retrieval"]) == {"recall@1", "recall@5", "mAP", "queries"}
  assert result["retrieval"]["queries"] > 0 and 0 < result["retrieval"]["mAP"] <= 1
  return str(workdir)


def keep_state(store):
  def callback(done, state):
    store["state"] = jax.device_get(state)
  return callback


def test_batches_are_p_classes_times_k_examples_of_seen_classes(tmp_path):
  setup, program = ktrain.setup_stage(darkrank_config(examples_per_class=2), str(tmp_path), mesh=one_device())
  assert setup.dataset.num_classes == 7  # 7, 8, 9 held out; the rest relabelled 0..6
  batches = list(program.batches(setup)(4))
  assert len(batches) == 2  # steps 4 and 5 of 6
  for batch in batches:
    labels = np.asarray(batch["label"])
    assert labels.shape == (8,) and len(set(labels[:4])) == 4 and (labels[:4] == labels[4:]).all()
    assert labels.max() < 7
  again = list(program.batches(setup)(5))[0]  # a pure function of (seed, step): resumable
  np.testing.assert_array_equal(again["image"], batches[1]["image"])
  jittered = darkrank_config(examples_per_class=2)
  jittered.jitter, jittered.hflip = 1, True
  setup, program = ktrain.setup_stage(jittered, str(tmp_path / "jitter"), mesh=one_device())
  shifted = [list(program.batches(setup)(5))[0] for _ in range(2)]
  np.testing.assert_array_equal(shifted[0]["label"], batches[1]["label"])  # the same examples, augmented
  assert not np.array_equal(shifted[0]["image"], batches[1]["image"])
  np.testing.assert_array_equal(shifted[0]["image"], shifted[1]["image"])


@pytest.mark.parametrize("variant", ["teacher", "student_alone", "student_hard", "student_soft", "student_soft_kd",
                                     "student_kd", "student_hard_whole_list", "student_soft_paper,full"])
def test_paper_configs_build(variant):
  config = reproduce.load_paper("darkrank").get_config(variant)
  program = make_method(config.method, config.loss)
  assert program.needs_teacher == (variant not in ("teacher", "student_alone"))
  assert config.held_out_classes and config.batch_size % config.loss.examples_per_class == 0


def test_student_compiles_once_and_reports_every_term(tmp_path, teacher_dir):
  """The hard transfer with KD and the triplet term (the soft transfer runs in the resume test)."""
  config = darkrank_config(teacher_dir, transfer="hard", kd_weight=1.0, triplet_weight=0.5)
  setup, program = ktrain.setup_stage(config, str(tmp_path), mesh=one_device())
  raw, traces = program.make_step(setup), []

  def step(state, batch, teacher_variables):
    traces.append(1)
    return raw(state, batch, teacher_variables)
  jitted = jax.jit(step, donate_argnums=(0,))
  state = parallel.replicate(program.init_state(setup), setup.mesh)
  teacher_variables = parallel.replicate(tuple(setup.teacher_variables), setup.mesh)
  for batch in program.batches(setup)(0):
    state, metrics = jitted(state, batch, teacher_variables)
  # The same first step with another teacher (its weights halved) moves the student elsewhere.
  first = next(iter(program.batches(setup)(0)))
  moved = [jax.device_get(jitted(parallel.replicate(program.init_state(setup), setup.mesh), first,
                                 jax.tree.map(lambda v, k=k: v * k, teacher_variables))[0].params)
           for k in (1.0, 0.5)]
  assert max(float(np.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, moved))) > 1e-6
  assert (len(traces), jitted._cache_size()) == (1, 1)
  assert int(state.step) == 6 and float(metrics["nonfinite"][0]) == 0.0
  assert set(metrics) == {"loss", "train_accuracy", "nonfinite", "cross_entropy", "triplet", "rank", "kd"}
  assert float(metrics["rank"][0]) > 0


def test_killed_and_resumed_student_is_bit_identical(tmp_path, teacher_dir):
  config = darkrank_config(teacher_dir, transfer="soft", kd_weight=1.0)
  config.model_kwargs = {"hidden": (24,), "embedding_dim": 8, "dropout_hidden": 0.2}
  run = functools.partial(train_and_evaluate, config, progress=False, mesh=one_device())
  straight, resumed = {}, {}
  result = run(str(tmp_path / "straight"), callbacks=[keep_state(straight)])
  with pytest.raises(StopTraining):
    run(str(tmp_path / "resumed"), callbacks=[crash_after(5)])
  again = run(str(tmp_path / "resumed"), callbacks=[keep_state(resumed)])
  for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  assert result["retrieval"] == again["retrieval"] and result["test_errors"] == again["test_errors"]


@pytest.mark.parametrize("loss,batch_size,match", [
    ({"transfer": "soft", "list_length": 9}, 8, r"list_length must be in \[1, 8\]"),
    ({"transfer": "soft", "list_length": 0}, 8, r"list_length must be in \[1, 8\]"),
    ({"examples_per_class": 1}, 8, "examples_per_class must be an int >= 2"),
    ({"transfer": "ranked"}, 8, "unknown transfer 'ranked'"),
    ({"kd_weight": -1.0}, 8, "kd_weight must be a number >= 0"),
    ({"examples_per_class": 3}, 8, "batch_size=8 must be a multiple of examples_per_class=3"),
])
def test_bad_loss_fields_are_explained(tmp_path, loss, batch_size, match):
  with pytest.raises(ValueError, match=match):
    config = darkrank_config(**loss)
    config.batch_size = batch_size
    setup, program = ktrain.setup_stage(config, str(tmp_path), mesh=one_device())
    program.init_state(setup)


def test_teacher_is_needed_only_for_a_transfer():
  assert not make_method("darkrank", {"transfer": "none"}).needs_teacher
  assert make_method("darkrank", {"transfer": "hard"}).needs_teacher
  assert make_method("darkrank", {"transfer": "none", "kd_weight": 1.0}).needs_teacher
  assert not make_method("darkrank", {"transfer": "soft", "rank_weight": 0.0}).needs_teacher
