"""Neuron selection (Luo et al. 2016): per-neuron AUC, the selection energy, the regression, and both stages."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import Capture, StopTraining, set_fields
from sklearn.metrics import roc_auc_score

from kdjax import checkpoint as ckpt
from kdjax import train as ktrain
from kdjax.config import default_stage_config
from kdjax.methods import neuron_selection as ns

# --- per-neuron statistics -------------------------------------------------------------------------------------


def test_neuron_auc_equals_scikit_learn_with_ties():
  rng = np.random.default_rng(0)
  attribute = rng.random(60) < 0.4
  columns = [rng.integers(0, 4, 60),                      # many ties
             rng.normal(size=60) + 1.5 * attribute,       # separable-ish, no ties
             np.zeros(60),                                # dead neuron: every value tied
             -(rng.integers(0, 3, 60) + 2.0 * attribute)]  # inhibitive: fires less for the attribute
  acts = np.stack(columns, axis=1).astype(np.float32)
  expected = [roc_auc_score(attribute, acts[:, j]) for j in range(acts.shape[1])]
  np.testing.assert_allclose(ns.neuron_auc(acts, attribute), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(ns.neuron_auc)(acts, attribute), expected, rtol=1e-6)
  assert expected[2] == 0.5 and expected[3] < 0.2
  several = np.stack([attribute, rng.random(60) < 0.5], axis=1)
  by_hand = [[roc_auc_score(several[:, a], acts[:, j]) for j in range(4)] for a in range(2)]
  np.testing.assert_allclose(ns.neuron_aucs(acts, several), by_hand, rtol=1e-6)


def test_single_class_attribute_is_refused():
  acts = np.ones((5, 3), np.float32)
  with pytest.raises(ValueError, match=r"attribute has a single class \(5 positive of 5"):
    ns.neuron_auc(acts, np.ones(5, bool))
  with pytest.raises(ValueError, match=r"attribute 1 has a single class \(0 positive"):
    ns.neuron_aucs(acts, np.array([[1, 0], [0, 0], [1, 0], [0, 0], [0, 0]], bool))
  with pytest.raises(ValueError, match=r"attribute \[n\]"):
    ns.neuron_auc(acts, np.ones(4, bool))


def test_unary_scores_fold_the_auc_and_penalise_nuisance():
  auc_ia = np.array([[0.9, 0.1, 0.5], [0.7, 0.3, 0.5]], np.float32)
  auc_na = np.array([[0.5, 0.9, 0.6]], np.float32)
  # mean_IA 2|AUC-1/2| = [0.6, 0.6, 0]; NA 2|AUC-1/2| = [0, 0.8, 0.2]
  np.testing.assert_allclose(ns.unary_scores(auc_ia, auc_na), [0.6, -0.2, -0.2], atol=1e-6)
  np.testing.assert_allclose(ns.unary_scores(auc_ia, auc_na, na_weight=0.5), [0.6, 0.2, -0.1], atol=1e-6)
  np.testing.assert_allclose(ns.unary_scores(auc_ia, np.zeros((0, 3))), [0.6, 0.6, 0.0], atol=1e-6)


def test_correlation_penalty_matches_numpy_and_ignores_dead_neurons():
  rng = np.random.default_rng(1)
  acts = rng.normal(size=(40, 4)).astype(np.float32)
  acts[:, 1] = -2 * acts[:, 0] + 0.1 * acts[:, 1]
  acts[:, 3] = 0.0
  w = np.asarray(ns.correlation_penalty(acts))
  expected = np.abs(np.corrcoef(acts[:, :3], rowvar=False))
  np.testing.assert_allclose(w[:3, :3], expected * (1 - np.eye(3)), atol=1e-5)
  assert np.all(w[3] == 0) and np.all(w[:, 3] == 0) and np.all(np.isfinite(w))


# --- selection -------------------------------------------------------------------------------------------------


def test_top_k_breaks_ties_by_index():
  unary = jnp.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
  np.testing.assert_array_equal(ns.top_k_select(unary, num_selected=4), [1, 3, 0, 2])
  np.testing.assert_array_equal(jax.jit(ns.top_k_select, static_argnames="num_selected")(unary, num_selected=4),
                                [1, 3, 0, 2])


def test_mean_field_drops_the_redundant_twin_on_a_hand_built_energy():
  # Neurons 0 and 1 are near-identical (|corr| = 1) and the best two by unary; 2 is weaker but independent.
  unary = jnp.array([1.0, 0.95, 0.5, 0.1])
  pairwise = jnp.zeros((4, 4)).at[0, 1].set(1.0).at[1, 0].set(1.0)
  np.testing.assert_array_equal(ns.top_k_select(unary, num_selected=2), [0, 1])
  chosen, q = ns.mean_field_select(unary, pairwise, num_selected=2, weight=0.0)
  np.testing.assert_array_equal(chosen, [0, 1])  # no penalty: the top-K unary
  chosen, q = ns.mean_field_select(unary, pairwise, num_selected=2, weight=4.0, temperature=0.05)
  np.testing.assert_array_equal(chosen, [0, 2])
  assert q[0] > 0.99 and q[1] < 0.01 and q[2] > q[3]
  # The selection is the exact minimiser of the energy over all 2-subsets.
  lam = 4.0 / 2
  energies = {s: -sum(float(unary[i]) for i in s) + lam * sum(float(pairwise[i, j]) for i, j in
                                                               itertools.combinations(s, 2))
              for s in itertools.combinations(range(4), 2)}
  assert min(energies, key=energies.get) == (0, 2)


def test_mean_field_ties_are_deterministic_and_jit_matches():
  unary = jnp.array([0.3, 0.3, 0.3, 0.3])
  chosen, _ = ns.mean_field_select(unary, jnp.zeros((4, 4)), num_selected=2, weight=1.0)
  np.testing.assert_array_equal(chosen, [0, 1])
  rng = np.random.default_rng(2)
  u, acts = jnp.asarray(rng.random(12), jnp.float32), rng.normal(size=(30, 12)).astype(np.float32)
  w = ns.correlation_penalty(acts)
  eager = ns.mean_field_marginals(u, w, num_selected=5, weight=1.0)
  jitted = jax.jit(ns.mean_field_marginals, static_argnames=("num_selected", "iters"))(u, w, num_selected=5,
                                                                                       weight=1.0)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 5, 2.0, True])
def test_selecting_more_neurons_than_the_layer_has_is_refused(bad):
  unary = jnp.zeros(4)
  with pytest.raises(ValueError, match=r"num_selected must be an integer in \[1, 4\] \(the layer has 4 neurons\)"):
    ns.top_k_select(unary, num_selected=bad)
  with pytest.raises(ValueError, match=r"num_selected"):
    ns.mean_field_select(unary, jnp.zeros((4, 4)), num_selected=bad)
  with pytest.raises(ValueError, match=r"num_selected"):
    ns.random_select(jax.random.PRNGKey(0), 4, num_selected=bad)


def test_random_select_is_distinct_and_seeded():
  a = np.asarray(ns.random_select(jax.random.PRNGKey(3), 10, num_selected=6))
  assert len(set(a.tolist())) == 6 and a.max() < 10
  np.testing.assert_array_equal(a, ns.random_select(jax.random.PRNGKey(3), 10, num_selected=6))


# --- the regression, the attributes and the feature metrics ------------------------------------------------------


def test_selected_neuron_loss_by_hand():
  student = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  teacher = jnp.array([[0.0, 2.0, 1.0], [4.0, 0.0, 1.0]])
  # relu(student) = [[1, 0], [0.5, 3]]; targets = teacher[:, [2, 0]] = [[1, 0], [1, 4]]
  np.testing.assert_allclose(ns.selected_neuron_loss(student, teacher, jnp.array([2, 0])), [0.0, 0.5 * (0.25 + 1)])
  grad = jax.grad(lambda s: ns.selected_neuron_loss(s, teacher, jnp.array([2, 0])).sum())(student)
  np.testing.assert_allclose(grad, [[0.0, 0.0], [-0.5, -1.0]])  # no gradient through the ReLU's zero side
  with pytest.raises(ValueError, match="student's feature has 2 units but 3 teacher neurons"):
    ns.selected_neuron_loss(student, teacher, jnp.array([0, 1, 2]))


def test_pixel_attributes_by_hand():
  image = np.zeros((1, 5, 5, 1), np.float32)
  image[0, 1, 3] = image[0, 3, 1] = 1.0  # two dots: one top-right, one bottom-left (a "/" stroke)
  mass, cx, cy, slant = ns.pixel_attributes(image)[0]
  assert (mass, cx, cy) == (2.0, 2.0, 2.0) and slant == pytest.approx(1.0)
  np.testing.assert_array_equal(ns.binarize_at_median(np.array([[1.0], [2.0], [3.0], [4.0]]))[:, 0],
                                [False, False, True, True])


def test_feature_metrics_on_separable_and_useless_features():
  rng = np.random.default_rng(4)
  train_y, test_y = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 20)
  centres = np.eye(3) * 5

  def feats(y):
    return centres[y] + rng.normal(size=(len(y), 3)) * 0.1
  good = ns.feature_metrics(feats(train_y), train_y, feats(test_y), test_y, num_pairs=200)
  assert good == {"ncm_accuracy": 1.0, "probe_accuracy": 1.0, "verification_accuracy": 1.0}
  noise = ns.feature_metrics(rng.normal(size=(90, 3)), train_y, rng.normal(size=(60, 3)), test_y, num_pairs=200)
  assert noise["ncm_accuracy"] < 0.6 and noise["verification_accuracy"] < 0.7
  pairs, same = ns.verification_pairs(test_y, num_pairs=10, seed=0)
  assert same.sum() == 5 and np.all(pairs[:, 0] != pairs[:, 1])
  assert np.array_equal(same, test_y[pairs[:, 0]] == test_y[pairs[:, 1]])


# --- the stages ------------------------------------------------------------------------------------------------


def _config(method, **fields):
  """sklearn digits (8x8, 1,497 train): teacher MLP 32-16 on 1,000 labelled images; the rest select."""
  c = default_stage_config()
  c.dataset = "digits"
  c.model = "mlp"
  c.batch_size = 16
  c.eval_batch_size = 160
  c.log_every_steps = 4
  c.checkpoint_every_steps = 4
  c.labelled_examples = 1000
  c.method = method
  if method == "supervised":
    c.model_kwargs = ml_collections.ConfigDict({"hidden": (32, 16)})
    c.include_unlabelled = False
    c.num_steps = 24
  elif method == "neuron_selection_select":
    c.num_steps = 0  # the stage's own length: ceil(497 / 16) = 32
    c.loss = ml_collections.ConfigDict({**ns.default_select_config(), "num_selected": 4})
  else:
    c.labelled_examples = 0
    c.model_kwargs = ml_collections.ConfigDict({"hidden": (16, 4)})
    c.num_steps = 8
    c.loss = ml_collections.ConfigDict({**ns.default_student_config(), "num_selected": 4, "num_pairs": 200})
  return set_fields(c, fields)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ns") / "teacher")
  ktrain.train_and_evaluate(_config("supervised"), workdir, progress=False)
  return workdir


@pytest.fixture(scope="module")
def select_run(teacher_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ns_select") / "select")
  return workdir, ktrain.train_and_evaluate(_config("neuron_selection_select", teacher_workdir=teacher_dir), workdir,
                                            progress=False)


def test_select_stage_writes_selection_and_resumes_after_a_kill(teacher_dir, select_run, tmp_path):
  config = _config("neuron_selection_select", teacher_workdir=teacher_dir)
  straight, result = select_run
  assert result["steps"] == 32 and "test_accuracy" not in result and result["extra"]["examples"] == 497
  with np.load(f"{straight}/{ns.SELECTION_FILE}") as f:
    written = {k: f[k] for k in f.files}
  assert str(written["mode"]) == "mean_field" and written["indices"].shape == (4,)
  assert written["auc_ia"].shape == (10, 16) and written["auc_na"].shape == (4, 16)
  assert len(set(written["indices"].tolist())) == 4
  np.testing.assert_allclose(written["unary"], ns.unary_scores(written["auc_ia"], written["auc_na"]), atol=1e-6)

  def crash(done, state):
    if done == 10:
      raise StopTraining("simulated crash after step 10")
  resumed = str(tmp_path / "resumed")
  with pytest.raises(StopTraining):
    ktrain.train_and_evaluate(config, resumed, progress=False, callbacks=[crash])
  checkpointer = ckpt.Checkpointer(resumed)
  assert checkpointer.manager.latest_step() == 8
  checkpointer.close()
  ktrain.train_and_evaluate(config, resumed, progress=False)
  with np.load(f"{resumed}/{ns.SELECTION_FILE}") as f:
    for key, value in written.items():
      np.testing.assert_array_equal(f[key], value)

  with pytest.raises(ValueError, match="num_steps must be 32"):
    ktrain.train_and_evaluate(_config("neuron_selection_select", teacher_workdir=teacher_dir, num_steps=40),
                              str(tmp_path / "bad"), progress=False)
  with pytest.raises(ValueError, match=r"num_selected must be an integer in \[1, 16\]"):
    ktrain.train_and_evaluate(_config("neuron_selection_select", teacher_workdir=teacher_dir, loss_num_selected=17),
                              str(tmp_path / "bad2"), progress=False)


def test_student_stage_regresses_the_selection_and_resumes_bit_identically(teacher_dir, select_run, tmp_path):
  select_dir = select_run[0]
  config = _config("neuron_selection", teacher_workdir=teacher_dir,
                   loss_selection=f"{select_dir}/{ns.SELECTION_FILE}")
  straight, resumed = Capture(), Capture()
  result = ktrain.train_and_evaluate(config, str(tmp_path / "straight"), progress=False, callbacks=[straight])
  assert {"ncm_accuracy", "probe_accuracy", "verification_accuracy"} == set(result["extra"])
  assert "regression" in result["train"] and result["teacher_cached"] is False

  def crash(done, state):
    if done == 5:
      raise StopTraining("simulated crash after step 5")
  with pytest.raises(StopTraining):
    ktrain.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False, callbacks=[crash])
  ktrain.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False, callbacks=[resumed])
  jax.tree.map(np.testing.assert_array_equal, straight.state, resumed.state)

  # The loss it optimised is the hand formula on the selected teacher neurons.
  with np.load(f"{select_dir}/{ns.SELECTION_FILE}") as f:
    indices = f["indices"]
  setup, _ = ktrain.setup_stage(config, str(tmp_path / "straight"))
  images, _ = setup.dataset.train.get(np.arange(16))
  x = jnp.asarray(images, jnp.float32)
  from kdjax import models
  teacher = models.apply_model(setup.teacher_models[0], setup.teacher_variables[0], x, features=("hidden_1",))
  student = models.apply_model(setup.student, {"params": straight.state.params}, x, features=("hidden_1",))
  by_hand = 0.5 * np.sum((np.asarray(student.features["hidden_1"]) -
                          np.asarray(teacher.features["hidden_1"])[:, indices]) ** 2, axis=1)
  np.testing.assert_allclose(ns.selected_neuron_loss(student.features["hidden_1"], teacher.features["hidden_1"],
                                                     jnp.asarray(indices)), by_hand, rtol=1e-5)


def test_student_stage_errors_name_the_argument(teacher_dir, tmp_path):
  with pytest.raises(ValueError, match="selection_mode='file' needs selection=PATH"):
    ktrain.setup_stage(_config("neuron_selection", teacher_workdir=teacher_dir), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="only `kdjax reproduce` resolves"):
    ktrain.train_and_evaluate(_config("neuron_selection", teacher_workdir=teacher_dir,
                                      loss_selection="@select_topk/selection.npz"), str(tmp_path / "b"),
                              progress=False)
  with pytest.raises(ValueError, match="student's feature has 4 units but 16 teacher neurons"):
    ktrain.train_and_evaluate(_config("neuron_selection", teacher_workdir=teacher_dir, loss_selection_mode="all"),
                              str(tmp_path / "c"), progress=False)
  with pytest.raises(ValueError, match="kd_weight must be > 0"):
    ktrain.setup_stage(_config("neuron_selection", teacher_workdir=teacher_dir, loss_selection_mode="none"),
                       str(tmp_path / "d"))


def test_paper_configs_build_and_keep_equal_student_size():
  from kdjax import config as kconfig
  from kdjax import reproduce
  paper = reproduce.load_paper("neuron_selection")
  assert set(paper.PROTOCOL) == set(paper.VARIANTS) and set(paper.PAPER_RESULTS) <= set(paper.VARIANTS)
  for full in (False, True):
    for variant in paper.VARIANTS:
      c = paper.get_config(variant + (",full" if full else ""))
      kconfig.check_keys(c)
      defaults = (ns.default_select_config() if c.method == "neuron_selection_select" else
                  ns.default_student_config() if c.method == "neuron_selection" else {})
      assert set(c.loss) <= set(defaults)
      if c.method == "neuron_selection" and variant != "student_all":
        assert c.model_kwargs.hidden[-1] == c.loss.num_selected  # the student's feature = K units
  assert paper.get_config("student_meanfield").loss.selection == "@select_meanfield/selection.npz"
  program = ktrain.as_program(ktrain.make_method("neuron_selection_select", paper.get_config("select_meanfield").loss))
  from kdjax import data as kdata
  transfer = kdata.make_transfer_set(kdata.load("mnist5k"), labelled_examples=paper.LABELLED, include_unlabelled=True)
  assert program.stage_length(paper.get_config("select_meanfield"), None, transfer) == 10  # 1,000 unseen / 100
