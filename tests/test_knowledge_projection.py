"""Knowledge Projection: the two routes, the schedules, pair checks and selection, and the stages."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import Capture

from kdjax import checkpoint as ckpt
from kdjax import data as kdata
from kdjax import models, reproduce
from kdjax import train as ktrain
from kdjax.config import default_stage_config
from kdjax.errors import UnknownNameError
from kdjax.methods import knowledge_projection as kp

STUDENT = {"channels": (4, 8, 8), "dense": 8}
TEACHER = {"channels": (8, 16, 16), "dense": 16}


def _ce(z, y):
  return np.log(np.exp(z).sum()) - z[y]


# --- pure pieces --------------------------------------------------------------------------------------------------


def test_joint_loss_by_hand():
  s = np.array([[1.0, -1.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
  p = np.array([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
  labels = np.array([2, 1])
  loss, parts = kp.knowledge_projection_loss(s, p, labels, route_weight=0.5, label_mask=np.array([1.0, 0.0]))
  np.testing.assert_allclose(loss, [_ce(s[0], 2) + 0.5 * _ce(p[0], 2), 0.0], rtol=1e-5)
  np.testing.assert_allclose(parts["projection_cross_entropy"], [_ce(p[0], 2), 0.0], rtol=1e-5)
  feat_s, feat_p = np.ones((2, 2, 2, 1), np.float32), np.zeros((2, 2, 2, 1), np.float32)
  feat_p[1] = 3.0
  loss, parts = kp.knowledge_projection_loss(s, p, labels, route_weight=0.0, student_feature=feat_s,
                                             projected_feature=feat_p, mu=2.0)
  np.testing.assert_allclose(parts["feature_l2"], [1.0, 4.0])
  np.testing.assert_allclose(loss, [_ce(s[0], 2) + 2.0, _ce(s[1], 1) + 8.0], rtol=1e-5)
  # The L2 target is a constant: no gradient reaches the projected feature.
  g = jax.grad(lambda f: jnp.sum(kp.knowledge_projection_loss(s, p, labels, route_weight=1.0, student_feature=feat_s,
                                                              projected_feature=f, mu=1.0)[0]))(feat_p)
  assert not np.any(g)


@pytest.mark.parametrize("mode, expected", [
    # steps 0, 30, 59, 60, 99 of 100 with prune_until 0.6: d = 1, 0.5, 1/60, 0, 0
    ("lambda", ([2.0, 1.0, 2 / 60, 0.0, 0.0], [1, 1, 1, 1, 1])),
    ("magnitude", ([2.0, 2.0, 2.0, 0.0, 0.0], [1.0, 0.5, 1 / 60, 0.0, 0.0])),
    ("both", ([2.0, 1.0, 2 / 60, 0.0, 0.0], [1.0, 0.5, 1 / 60, 0.0, 0.0])),
    ("none", ([2.0] * 5, [1] * 5)),
])
def test_route_schedule_values(mode, expected):
  got = [kp.route_schedule(t, 100, lam=2.0, route_pruning=mode, prune_until=0.6) for t in (0, 30, 59, 60, 99)]
  np.testing.assert_allclose([float(w) for w, _ in got], expected[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose([float(k) for _, k in got], expected[1], rtol=1e-5, atol=1e-7)
  jitted = jax.jit(lambda t: kp.route_schedule(t, 100, lam=2.0, route_pruning=mode))(jnp.int32(30))
  np.testing.assert_allclose([float(jitted[0]), float(jitted[1])], [expected[0][1], expected[1][1]], rtol=1e-5)


def test_magnitude_mask_by_hand():
  kernel = np.array([0.5, -3.0, 0.0, 2.0, -0.5, 1.0], np.float32).reshape(1, 1, 2, 3)
  def kept(fraction):
    return np.asarray(kp.magnitude_mask(kernel, fraction)).reshape(-1)
  np.testing.assert_array_equal(kept(1.0), [1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(kept(0.5), [0, 1, 0, 1, 0, 1])       # |-3|, 2, 1
  np.testing.assert_array_equal(kept(0.6), [1, 1, 0, 1, 0, 1])       # ceil(3.6) = 4: the tie 0.5/-0.5 -> index 0
  np.testing.assert_array_equal(kept(0.1), [0, 1, 0, 0, 0, 0])       # ceil(0.6) = 1
  np.testing.assert_array_equal(kept(0.0), [0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(jax.jit(kp.magnitude_mask)(kernel, 0.5)).reshape(-1), kept(0.5))


def test_select_pair_and_pair_parsing():
  assert kp.select_pair({"a=a": 0.9, "b=b": 0.3, "c=c": 0.5}) == "b=b"
  assert kp.select_pair({"a=a": 0.3, "b=b": 0.3}) == "a=a"                  # ties: the first in order
  assert kp.select_pair({"a=a": float("nan"), "b=b": 2.0}) == "b=b"
  with pytest.raises(ValueError, match="no candidate"):
    kp.select_pair({"a=a": float("nan")})
  assert kp.parse_pair(" stage2 = block_1 ") == ("stage2", "block_1")
  with pytest.raises(ValueError, match="teacher_layer=student_layer"):
    kp.parse_pair("block_1")
  with pytest.raises(FileNotFoundError, match="selection stage"):
    kp.read_pair("/nonexistent/selection.json")


def test_pair_errors_name_layers_and_shapes():
  teacher = {"block_0": (1, 8, 8, 8), "block_1": (1, 4, 4, 16)}
  student = {"block_0": (1, 8, 8, 4), "block_1": (1, 4, 4, 8)}
  kp.check_pair("block_1", "block_1", teacher, student)
  with pytest.raises(ValueError) as err:
    kp.check_pair("block_1", "block_0", teacher, student)
  assert all(s in str(err.value) for s in ("'block_1'", "(1, 4, 4, 16)", "'block_0'", "(1, 8, 8, 4)"))
  with pytest.raises(UnknownNameError, match="teacher layer 'stage9'.*block_0, block_1"):
    kp.check_pair("stage9", "block_0", teacher, student)
  with pytest.raises(UnknownNameError, match="student injection layer 'conv'.*block_0, block_1"):
    kp.check_pair("block_0", "conv", teacher, student)
  with pytest.raises(UnknownNameError, match="route_pruning 'sometimes'"):
    kp.make_stage_program(**{**kp.default_loss_config(), "route_pruning": "sometimes"})
  with pytest.raises(ValueError, match="lam must be a number >= 0"):
    kp.make_stage_program(**{**kp.default_loss_config(), "lam": -1.0})


# --- the routes -----------------------------------------------------------------------------------------------------


def _nets(classes=5):
  student_zoo = models.get("small_cnn", num_classes=classes, **STUDENT)
  student = kp.InjectableCNN(channels=STUDENT["channels"], dense=STUDENT["dense"], num_classes=classes)
  teacher = models.get("small_cnn", num_classes=classes, **TEACHER)
  x = jax.random.normal(jax.random.PRNGKey(3), (6, 8, 8, 1))
  sv = jax.jit(student.init)(jax.random.PRNGKey(0), x)
  tv = jax.jit(teacher.init)(jax.random.PRNGKey(1), x)
  return student_zoo, student, teacher, sv, tv, x


@pytest.mark.slow  # ~26 s; the default run checks the exported student is small_cnn's tree (selection_then_kp)
def test_injectable_student_is_small_cnn():
  zoo, student, _, sv, _, x = _nets()
  zoo_vars = jax.eval_shape(zoo.init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(zoo_vars) == jax.tree.structure(sv)

  @jax.jit
  def routes(sv, x):
    feats = models.apply_model(student, sv, x, features=("block_0", "block_1")).features
    entered = [student.apply(sv, None, injected=feats[name], inject_at=name) for name in ("block_0", "block_1")]
    return zoo.apply(sv, x), student.apply(sv, x), entered

  zoo_logits, logits, entered = routes(sv, x)
  np.testing.assert_allclose(zoo_logits, logits, rtol=1e-5, atol=1e-6)
  for got in entered:  # entering at block_k with the student's own block_k map is the student route
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
  feats = jax.eval_shape(lambda v, x: models.apply_model(student, v, x, features=("block_0",)).features, sv, x)
  feats = {"block_0": jnp.zeros(feats["block_0"].shape)}
  with pytest.raises(UnknownNameError, match="block_0, block_1, block_2"):
    student.apply(sv, None, injected=feats["block_0"], inject_at="conv_0")


def _route(student, mu=0.0):
  return kp._Route(student, "block_1", "block_1", TEACHER["channels"][1], STUDENT["channels"][1], route="projection",
                   mu=mu, beta=0.0)


def test_projection_route_gradient_stops_at_the_teacher_and_skips_lower_student_layers():
  _, student, teacher, sv, tv, x = _nets()
  r = _route(student)
  rp, rs = r.init(jax.random.PRNGKey(2), (4, 4))
  labels, mask = jnp.array([0, 1, 2, 3, 4, 0]), jnp.ones(6)

  def projection_only(teacher_vars, params):
    feature = kp.teacher_features([teacher], [teacher_vars], x, ["block_1"])["block_1"]
    _, parts, *_ = r.losses(params, sv["batch_stats"], rp, rs, x, labels, mask, feature, route_weight=1.0,
                            train=True)
    return jnp.mean(parts["projection_cross_entropy"])

  g_teacher, g_student = jax.jit(jax.grad(projection_only, argnums=(0, 1)))(tv, sv["params"])
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(g_teacher))
  for layer in ("conv_0", "conv_1", "bn_0", "bn_1"):        # S_1..i: not on the projection route
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(g_student[layer])), layer
  assert np.any(g_student["conv_2"]["kernel"]) and np.any(g_student["head"]["kernel"])


@pytest.mark.slow  # two compiled KP updates with two teachers
def test_student_update_independent_of_the_teacher_once_the_route_is_pruned():
  _, student, teacher, sv, tv, x = _nets()
  r = _route(student)
  tx = ktrain.make_optimizer(default_stage_config(), 10)
  rp, rs = r.init(jax.random.PRNGKey(2), (4, 4))
  cand = {"params": sv["params"], "batch_stats": sv["batch_stats"], "route_params": rp, "route_batch_stats": rs,
          "opt_state": tx.init((sv["params"], rp))}
  labels, mask = jnp.array([0, 1, 2, 3, 4, 0]), jnp.ones(6)
  other = jax.jit(teacher.init)(jax.random.PRNGKey(7), x)
  weight, kept = kp.route_schedule(9, 10, lam=1.0, route_pruning="both")
  assert float(weight) == 0.0 and float(kept) == 0.0

  @jax.jit
  def update(cand, teacher_vars):
    feature = kp.teacher_features([teacher], [teacher_vars], x, ["block_1"])["block_1"]
    return kp._joint_update(r, tx, cand, x, labels, mask, feature, route_weight=weight, kept=kept,
                            rng=jax.random.PRNGKey(0), prune=True)[0]
  results = [update(cand, teacher_vars) for teacher_vars in (tv, other)]
  jax.tree.map(np.testing.assert_array_equal, results[0]["params"], results[1]["params"])
  jax.tree.map(np.testing.assert_array_equal, results[0]["batch_stats"], results[1]["batch_stats"])
  assert not np.any(results[0]["route_params"]["conv"]["kernel"])    # fully pruned: exactly zero


# --- the stages -------------------------------------------------------------------------------------------------


def _config(**fields):
  c = default_stage_config()
  c.dataset = "digits"
  c.model = "small_cnn"
  c.batch_size, c.num_steps, c.eval_batch_size = 16, 2, 300
  c.log_every_steps = c.checkpoint_every_steps = 1
  for key, value in fields.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("kp") / "teacher")
  c = _config(classes=(0, 1, 2, 3, 4), model_kwargs=ml_collections.ConfigDict(TEACHER))
  ktrain.train_and_evaluate(c, workdir, progress=False)
  return workdir


def _student_config(teacher_dir, method, loss, **fields):
  return _config(classes=(5, 6, 7, 8, 9), labelled_examples=100, include_unlabelled=False,
                 model_kwargs=ml_collections.ConfigDict(STUDENT), teacher_workdir=teacher_dir, method=method,
                 loss=ml_collections.ConfigDict(loss), **fields)


def test_selection_then_kp_stage(teacher_dir, tmp_path, monkeypatch):
  candidates = ("block_0=block_0", "block_1=block_1")
  select = _student_config(teacher_dir, "knowledge_projection_select",
                           {**kp.default_select_config(), "candidates": candidates})
  result = ktrain.train_and_evaluate(select, str(tmp_path / "select"), progress=False)
  assert "test_accuracy" not in result and result["steps"] == 2
  with open(tmp_path / "select" / kp.SELECTION_FILE) as f:
    record = json.load(f)
  losses = {row["candidate"]: row["validation_joint_loss"] for row in record["candidates"]}
  assert list(losses) == list(candidates)
  assert record["pair"] == min(losses, key=losses.get) == result["extra"]["pair"]
  assert record["validation_examples"] == 20 and record["training_examples"] == 80
  for k, value in enumerate(losses.values()):
    assert result["extra"][f"validation_joint_loss_c{k}"] == pytest.approx(value)

  traces = []
  joint_update = kp._joint_update
  monkeypatch.setattr(kp, "_joint_update", lambda *a, **k: (traces.append(1), joint_update(*a, **k))[1])
  loss = {**kp.default_loss_config(), "pair": str(tmp_path / "select" / kp.SELECTION_FILE),
          "route_pruning": "both"}
  c = _student_config(teacher_dir, "knowledge_projection", loss, num_steps=3)
  capture = Capture()
  result = ktrain.train_and_evaluate(c, str(tmp_path / "kp"), progress=False, callbacks=[capture])
  assert len(traces) == 1 and int(capture.state.step) == 3            # traced once for all three batches
  assert result["extra"]["teacher_layer"] + "=" + result["extra"]["student_layer"] == record["pair"]
  target_test = int(np.sum(kdata.load("digits").test.labels >= 5))
  assert 0.0 <= result["extra"]["projection_route_test_accuracy"] <= 1.0 and result["test_examples"] == target_test
  # The exported student is small_cnn's tree and nothing else: no projection, no teacher.
  variables, config, _ = ckpt.load_teacher_variables(str(tmp_path / "kp"))
  zoo = models.get("small_cnn", num_classes=5, **STUDENT).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(zoo["params"])
  assert "projection" not in json.dumps(jax.tree.map(lambda a: a.shape, variables["params"]))
  assert "conv" in capture.state.route_params and "kernel" not in capture.state.params.get("conv", {})
  # magnitude pruning: after update t = 2 of 3 (prune_until 0.6: d = 1 - 2/1.8 < 0) nothing of P is left
  assert not np.any(capture.state.route_params["conv"]["kernel"])
  assert result["extra"]["projection_nonzero_fraction"] == 0.0 and result["extra"]["route_weight_last_step"] == 0.0


def test_bad_pair_resolution_fails_before_training(teacher_dir, tmp_path):
  loss = {**kp.default_loss_config(), "pair": "block_0=block_1"}
  c = _student_config(teacher_dir, "knowledge_projection", loss)
  with pytest.raises(ValueError, match=r"teacher 'block_0' \(shape \(1, 8, 8, 8\)\).*'block_1' \(shape \(1, 4, 4, 8\)"):
    ktrain.train_and_evaluate(c, str(tmp_path / "bad"), progress=False)
  hint = _student_config(teacher_dir, "knowledge_projection", {**kp.default_loss_config(), "route": "hint",
                                                                "pair": "block_1=block_1"})
  result = ktrain.train_and_evaluate(hint, str(tmp_path / "hint"), progress=False)
  assert result["extra"]["route"] == "hint" and np.isfinite(result["train"]["hint"])


def test_paper_configs_build():
  paper = reproduce.load_paper("knowledge_projection")
  for variant in paper.VARIANTS:
    for scale in ("", ",full"):
      c = paper.get_config(variant + scale)
      assert c.method in ("supervised", "knowledge_projection", "knowledge_projection_select")
  assert set(paper.PROTOCOL) <= set(paper.VARIANTS) and paper.PROTOCOL[:2] == ("teacher", "kp_select")
  c = paper.get_config("student_kp")
  assert c.classes == (5, 6, 7, 8, 9) and c.loss.pair == "@kp_select/selection.json" and c.loss.lam == 1.0
  assert paper.get_config("teacher").classes == (0, 1, 2, 3, 4)
  assert paper.get_config("student_kp_no_prune").loss.route_pruning == "none"


@pytest.mark.slow
def test_full_config_smoke(tmp_path):
  """The ``,full`` protocol's stages for 2 steps on tiny 8×8×3 inputs; the WRN-40-2 teacher cut to depth 10."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / "tiny.npz")
  np.savez(path, x_train=rng.integers(0, 255, (60, 8, 8, 3), np.uint8), y_train=np.arange(60) % 10,
           x_test=rng.integers(0, 255, (20, 8, 8, 3), np.uint8), y_test=np.arange(20) % 10)
  paper = reproduce.load_paper("knowledge_projection")
  dirs = {}
  for variant in ("teacher", "kp_select", "student_kp"):
    c = paper.get_config(variant + ",full")
    c.dataset, c.batch_size, c.num_steps, c.eval_batch_size, c.labelled_examples = path, 8, 2, 20, 40
    c.model_kwargs = ml_collections.ConfigDict({"depth": 10}) if variant == "teacher" else c.model_kwargs
    if variant != "teacher":
      c.teacher_workdir = dirs["teacher"]
    if variant == "student_kp":
      c.loss.pair = os.path.join(dirs["kp_select"], kp.SELECTION_FILE)
    dirs[variant] = str(tmp_path / variant)
    result = ktrain.train_and_evaluate(c, dirs[variant], progress=False)
    assert result["steps"] == 2
  assert result["extra"]["teacher_layer"] in ("stage1", "stage2", "stage3")


@pytest.mark.slow  # ~13 s, an edge case of the teacher check
def test_a_teacher_of_a_source_task_with_another_class_count_is_accepted(teacher_dir, tmp_path):
  # KP reads only the teacher's features (StageProgram.teacher_features_only): a 5-class source-task teacher
  # guides a 3-class target student; a logit-based method is still refused that teacher.
  loss = {**kp.default_loss_config(), "pair": "block_1=block_1"}
  c = _student_config(teacher_dir, "knowledge_projection", loss, num_steps=1)
  c.classes = (5, 6, 7)
  result = ktrain.train_and_evaluate(c, str(tmp_path / "kp3"), progress=False)
  labels = np.asarray(kdata.load("digits").test.labels)
  assert result["test_examples"] == int(np.sum((labels >= 5) & (labels <= 7)))
  kd = _student_config(teacher_dir, "soft_targets", {}, num_steps=1)
  kd.classes = (5, 6, 7)
  with pytest.raises(ValueError, match="outputs 5 classes, but this stage's dataset has 3"):
    ktrain.train_and_evaluate(kd, str(tmp_path / "kd3"), progress=False)
