"""Adversarial KD (Xu, Hsu & Huang 2017): losses by hand, the discriminator, the two halves of the alternating
step kept apart, the non-finite guard, resume, cached teacher, the paper's configs."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import StopTraining, assert_trees_close, crash_after
from jax.test_util import check_grads
from test_train import tiny_config

from kdjax import parallel, reproduce
from kdjax.errors import UnknownNameError
from kdjax.methods import adversarial as adv
from kdjax.methods.objective import make_method
from kdjax.models import get as get_model
from kdjax.train import StageProgram, train_and_evaluate

K = 3  # classes in the hand-made tests


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


# --- losses and the discriminator -----------------------------------------------------------------------------


def test_discriminator_loss_by_hand():
  real, fake = np.array([0.5, -1.0]), np.array([2.0, -0.3])
  real_cls, fake_cls = np.array([[1.0, 0.0, -1.0], [0.2, 0.1, 0.0]]), np.array([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
  labels, mask = np.array([0, 2]), np.array([1.0, 0.0])
  got = adv.discriminator_loss(real, fake, real_cls, fake_cls, labels, label_mask=mask, class_weight=0.5)
  want = (-_log_sigmoid(real) - _log_sigmoid(-fake)
          + 0.5 * mask * -_log_softmax(real_cls)[np.arange(2), labels])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # the class term on the student's logits, and one-sided smoothing of the real target (0.9)
  got = adv.discriminator_loss(real, fake, real_cls, fake_cls, labels, label_mask=mask, fake_class=True,
                               label_smoothing=0.1)
  want = (-(0.9 * _log_sigmoid(real) + 0.1 * _log_sigmoid(-real)) - _log_sigmoid(-fake)
          + mask * -(_log_softmax(real_cls) + _log_softmax(fake_cls))[np.arange(2), labels])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_student_loss_by_hand_and_its_parts():
  s = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]])
  t = np.array([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
  labels, mask = np.array([1, 2]), np.array([1.0, 0.0])
  fake = np.array([-0.5, 1.5])
  fake_cls = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
  loss, parts = adv.student_loss(s, t, labels, fake, fake_cls, label_mask=mask, adv_weight=0.3, l1_weight=2.0,
                                 class_weight=0.5)
  ce = mask * -_log_softmax(s)[np.arange(2), labels]
  non_saturating = -_log_sigmoid(fake)
  cls = mask * -_log_softmax(fake_cls)[np.arange(2), labels]
  l1 = np.array([1.5, 4.0])
  np.testing.assert_allclose(parts["l1"], l1, rtol=1e-6)
  np.testing.assert_allclose(parts["adversarial"], non_saturating, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 0.3 * (non_saturating + 0.5 * cls) + 2.0 * l1, rtol=1e-5)
  # the ablation rows: CE + L1 (adv_weight 0) and CE + adversarial only (l1_weight 0)
  ce_l1, _ = adv.student_loss(s, t, labels, fake, fake_cls, label_mask=mask, adv_weight=0.0, l1_weight=1.0)
  np.testing.assert_allclose(ce_l1, ce + l1, rtol=1e-5)
  ce_adv, _ = adv.student_loss(s, t, labels, fake, fake_cls, label_mask=mask, adv_weight=1.0, l1_weight=0.0,
                               student_class_term=False, generator_loss="minimax")
  np.testing.assert_allclose(ce_adv, ce + _log_sigmoid(-fake), rtol=1e-5)  # log(1 - D(s))


def test_l1_is_zero_when_student_equals_teacher_and_losses_are_jit_grad_vmap_ready():
  s = _randn(0, (4, K))
  np.testing.assert_array_equal(adv.l1_logit_loss(s, s), np.zeros(4))
  real, fake, cls = _randn(1, (4,)), _randn(2, (4,)), _randn(3, (4, K))
  labels = jnp.array([0, 1, 2, 0])

  def d_loss(real, fake, cls):
    return jnp.mean(adv.discriminator_loss(real, fake, cls, cls, labels, fake_class=True))

  check_grads(jax.jit(d_loss), (real, fake, cls), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  check_grads(jax.jit(lambda f: jnp.sum(adv.generator_adversarial_loss(f))), (fake,), order=1, modes=["rev"])
  eager = adv.student_loss(s, s + 1, labels, fake, cls, adv_weight=1.0, l1_weight=1.0)[0]
  jitted = jax.jit(lambda *a: adv.student_loss(*a, adv_weight=1.0, l1_weight=1.0)[0])(s, s + 1, labels, fake, cls)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  one = lambda *a: adv.student_loss(*[x[None] for x in a], adv_weight=1.0, l1_weight=1.0)[0][0]  # noqa: E731
  per_example = jax.jit(jax.vmap(one))(s, s + 1, labels, fake, cls)
  np.testing.assert_allclose(per_example, eager, rtol=1e-5)
  grad = jax.jit(jax.grad(lambda x: jnp.mean(adv.student_loss(x, s + 1, labels, fake, cls, adv_weight=1.0,
                                                      l1_weight=1.0)[0])))(s)
  assert grad.shape == s.shape and np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_discriminator_outputs_and_wrong_width_error():
  disc = adv.LogitDiscriminator(num_classes=K)
  params = jax.jit(disc.init)(jax.random.PRNGKey(0), jnp.zeros((1, K)))["params"]
  assert params["dense_0"]["kernel"].shape == (K, 64) and params["head"]["kernel"].shape == (64, 1 + K)
  real_logit, class_logits = jax.jit(disc.apply)({"params": params}, _randn(0, (5, K)))
  assert real_logit.shape == (5,) and class_logits.shape == (5, K)
  with pytest.raises(ValueError, match=r"logit vectors \[batch, 3\] \(num_classes=3\); got an array of shape \(5, 4\)"):
    disc.apply({"params": params}, _randn(0, (5, 4)))


def test_bad_loss_fields_are_named():
  fields = adv.default_loss_config()
  with pytest.raises(UnknownNameError, match="generator_loss 'wgan'; expected one of: minimax, non_saturating"):
    adv.make_stage_program(**{**fields, "generator_loss": "wgan"})
  with pytest.raises(ValueError, match="d_steps .* must be an int >= 1, got 0"):
    adv.make_stage_program(**{**fields, "d_steps": 0})
  with pytest.raises(ValueError, match="adv_weight must be >= 0, got -1.0"):
    adv.make_stage_program(**{**fields, "adv_weight": -1.0})
  with pytest.raises(UnknownNameError, match="loss field for method 'adversarial'"):
    make_method("adversarial", {"lambda_adv": 1.0})
  program = make_method("adversarial", {})
  assert isinstance(program, StageProgram) and program.needs_teacher and program.cacheable_teacher


# --- the two halves of the step ---------------------------------------------------------------------------------


def _parts(student_lr=1e-2, disc_lr=1e-2, **step_kwargs):
  """A tiny student, discriminator, state, cached-teacher batch and the (un-jitted) step."""
  student = get_model("mlp", hidden=(8,), num_classes=K)
  disc = adv.LogitDiscriminator(num_classes=K, hidden=(16,))
  tx, disc_tx = optax.adam(student_lr), optax.adam(disc_lr)

  @jax.jit
  def init():  # one compilation (eager initialisation compiles op by op: slow on a busy CPU)
    params = student.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)))["params"]
    disc_params = disc.init(jax.random.PRNGKey(1), jnp.zeros((1, K)))["params"]
    return adv.AdversarialState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                                opt_state=tx.init((params, {})), rng=jax.random.PRNGKey(2), disc_params=disc_params,
                                disc_opt_state=disc_tx.init(disc_params))

  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 6)).astype(np.float32), "label": rng.integers(0, K, 16).astype(np.int32),
           "label_mask": (np.arange(16) < 8).astype(np.float32),
           "teacher_logits": 3 * rng.normal(size=(16, 1, K)).astype(np.float32)}
  kwargs = {"adv_weight": 1.0, "l1_weight": 1.0, **step_kwargs}
  step = adv.make_adversarial_step(student=student, disc=disc, tx=tx, disc_tx=disc_tx, cached_teacher=True, **kwargs)
  return student, disc, tx, disc_tx, init(), batch, step


def _copy(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_changed(a, b):
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_discriminator_half_never_changes_the_student():
  *_, state, batch, step = _parts(student_lr=0.0)
  before = _copy(state)
  new, metrics = jax.jit(step)(state, batch)
  _assert_equal(new.params, before.params)        # student LR 0: only the discriminator may move
  _assert_changed(new.disc_params, before.disc_params)
  assert float(metrics["nonfinite"][0]) == 0 and int(new.step) == 1


def test_student_half_never_changes_the_discriminator():
  student, disc, tx, disc_tx, state, batch, step = _parts(disc_lr=0.0)
  before = _copy(state)
  teacher = jnp.asarray(batch["teacher_logits"][:, 0])

  # The student's loss does depend on the discriminator's parameters (so a leak would move them) ...
  def student_objective(disc_params):
    s = student.apply({"params": state.params}, batch["image"])
    fake, cls = disc.apply({"params": disc_params}, s)
    return jnp.mean(adv.student_loss(s, teacher, batch["label"], fake, cls, label_mask=batch["label_mask"],
                                     adv_weight=1.0, l1_weight=1.0)[0])

  leak = jax.jit(jax.grad(student_objective))(state.disc_params)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(leak))
  # ... but student_update takes them as a constant and does not return them: in the whole step with the
  # discriminator's LR at 0 they stay bit-identical while the student moves.
  new, metrics = jax.jit(step)(state, batch)
  assert {"loss", "ce", "adversarial", "l1", "student_class", "train_accuracy"} <= set(metrics)
  _assert_equal(new.disc_params, before.disc_params)
  _assert_changed(new.params, before.params)


def test_step_updates_the_discriminator_first_then_the_student_against_it():
  student, disc, tx, disc_tx, state, batch, step = _parts()
  teacher = jnp.asarray(batch["teacher_logits"][:, 0])

  @jax.jit
  def by_hand(state):
    s = student.apply({"params": state.params}, batch["image"])
    disc_params, _, d_metrics, _ = adv.discriminator_update(state.disc_params, state.disc_opt_state, s, teacher,
                                                            batch["label"], batch["label_mask"], disc=disc,
                                                            disc_tx=disc_tx)
    (params, _, _), _, _ = adv.student_update(
        state.params, {}, state.opt_state, disc_params, batch["image"], teacher, batch["label"], batch["label_mask"],
        jax.random.fold_in(state.rng, 0), student=student, disc=disc, tx=tx, adv_weight=1.0, l1_weight=1.0)
    return disc_params, params, d_metrics

  want_disc, want_params, d_metrics = by_hand(state)
  new, metrics = jax.jit(step)(state, batch)
  assert_trees_close(new.disc_params, want_disc, rtol=1e-5, atol=1e-6)
  assert_trees_close(new.params, want_params, rtol=1e-5, atol=1e-6)
  for name in ("disc_acc_real", "disc_acc_fake", "disc_loss", "disc_class_acc"):
    np.testing.assert_allclose(metrics[name], d_metrics[name], rtol=1e-5)


def test_step_compiles_once_on_eight_devices_and_a_nonfinite_step_changes_nothing():
  *_, state, batch, step = _parts(d_steps=2)
  mesh = parallel.make_mesh()
  state = parallel.replicate(state, mesh)
  jitted = jax.jit(step, donate_argnums=(0,))
  for _ in range(3):
    state, metrics = jitted(state, parallel.shard_batch(batch, mesh))
  assert 0.0 <= float(metrics["disc_acc_real"][0]) <= 16.0 and float(metrics["nonfinite"][0]) == 0.0
  before = _copy(state)
  batch["teacher_logits"][3, 0, 1] = np.nan  # one NaN teacher logit: both updates are skipped
  state, metrics = jitted(state, parallel.shard_batch(batch, mesh))
  assert float(metrics["nonfinite"][0]) == 1.0 and int(state.step) == 4
  _assert_equal((state.params, state.opt_state, state.disc_params, state.disc_opt_state),
                (before.params, before.opt_state, before.disc_params, before.disc_opt_state))
  assert jitted._cache_size() == 1


# --- through the stage runner ---------------------------------------------------------------------------------


def adversarial_config(teacher_dir, **fields):
  c = tiny_config(method="adversarial", teacher_workdir=teacher_dir, labelled_examples=300, **fields)
  c.loss = {"disc_learning_rate": 1e-3, "disc_hidden": (16,)}
  return c


def one_device():
  """Stage-runner tests run on one device: the 8-device program compiles far slower on 2 busy cores (the
  step's multi-device equality is tested in test_train.py; here it only needs to compile once)."""
  return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher")
  train_and_evaluate(tiny_config(model_kwargs={"hidden": (48,)}, num_steps=30), str(workdir), progress=False,
                     mesh=one_device())
  return str(workdir)


def final_state(store):
  def callback(done, state):
    store["state"] = _copy(state)
  return callback


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical_with_both_optimizer_states(tmp_path, teacher_dir):
  config = adversarial_config(teacher_dir, num_steps=10, checkpoint_every_steps=3,
                              model_kwargs={"hidden": (32,), "dropout_hidden": 0.2})
  straight, resumed = {}, {}
  run = functools.partial(train_and_evaluate, config, progress=False, mesh=one_device())
  result = run(str(tmp_path / "straight"), callbacks=[final_state(straight)])
  with pytest.raises(StopTraining):
    run(str(tmp_path / "resumed"), callbacks=[crash_after(7)])
  run(str(tmp_path / "resumed"), callbacks=[final_state(resumed)])
  a, b = straight["state"], resumed["state"]
  assert isinstance(a, adv.AdversarialState) and int(a.step) == int(b.step) == 10
  _assert_equal(a, b)  # params, batch_stats, both optimizer states, disc params, rng, step
  # The discriminator's accuracy is logged every logged step and evaluated at the end.
  logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  assert all({"train/disc_acc_real", "train/disc_acc_fake", "train/l1", "train/adversarial"} <= set(r)
             for r in logged)
  assert {"disc_test_acc_real", "disc_test_acc_fake", "disc_test_class_acc", "test_l1_to_teacher"} == set(
      result["extra"])
  assert 0.0 <= result["extra"]["disc_test_acc_real"] <= 1.0


@pytest.mark.slow
def test_cached_teacher_equals_live_teacher(tmp_path, teacher_dir):
  live_store, cached_store = {}, {}
  cached = train_and_evaluate(adversarial_config(teacher_dir), str(tmp_path / "cached"), progress=False,
                              mesh=one_device(), callbacks=[final_state(cached_store)])
  live = train_and_evaluate(adversarial_config(teacher_dir, cache_teacher=False), str(tmp_path / "live"),
                            progress=False, mesh=one_device(), callbacks=[final_state(live_store)])
  assert cached["teacher_cached"] and not live["teacher_cached"]
  a, b = cached_store["state"], live_store["state"]
  assert_trees_close((a.params, a.disc_params), (b.params, b.disc_params), rtol=1e-4, atol=1e-5)


def test_an_ensemble_teacher_is_refused(tmp_path, teacher_dir):
  with pytest.raises(ValueError, match="adversarial KD distils one teacher; teacher_workdir names 2 runs"):
    train_and_evaluate(adversarial_config(f"{teacher_dir},{teacher_dir}"), str(tmp_path / "ens"), progress=False,
                       mesh=one_device())


# --- the paper's configs ----------------------------------------------------------------------------------------


def test_protocol_rows_are_the_ablation_of_section_9e():
  paper = reproduce.load_paper("adversarial")
  assert paper.PROTOCOL[0] == "teacher" and len(paper.PROTOCOL) == 11
  for size, hidden in (("small", (32, 32)), ("large", (128, 128))):
    configs = {row: paper.get_config(f"{size}_{row}") for row in paper.ROWS}
    assert all(tuple(c.model_kwargs.hidden) == hidden for c in configs.values())
    assert configs["ce"].method == "supervised" and not configs["ce"].include_unlabelled
    assert configs["kd"].method == "soft_targets" and configs["kd"].include_unlabelled
    loss = {row: configs[row].loss for row in ("ce_l1", "ce_adv", "full")}
    assert (loss["ce_l1"].adv_weight, loss["ce_l1"].l1_weight) == (0.0, 1.0)
    assert (loss["ce_adv"].adv_weight, loss["ce_adv"].l1_weight) == (1.0, 0.0)
    assert (loss["full"].adv_weight, loss["full"].l1_weight) == (1.0, 1.0)
    assert len({c.num_steps for c in configs.values()}) == 1  # every student makes the same number of updates
    for c in configs.values():
      make_method(c.method, c.loss)
  # The paper's gains are text labelled as low reliability, never typed in as accuracies.
  assert all(set(r) == {"claim"} for r in paper.PAPER_RESULTS.values())


@pytest.mark.slow
def test_full_configs_smoke_on_tiny_cifar_like_data(tmp_path):
  """``small_full,full`` (WRN-16-1 student, crops/flips, SGD step schedule, live teacher) for 2 steps on 8×8 images.

  The teacher is ``teacher,full`` with its WRN-40-2 swapped for a tiny MLP (compiling WRN-40-2 takes minutes
  on 2 busy cores); the other models of the full configs are checked without compiling.
  """
  paper = reproduce.load_paper("adversarial")
  teacher, student = paper.get_config("teacher,full"), paper.get_config("small_full,full")
  assert (teacher.model, student.model, paper.get_config("large_full,full").model) == ("wrn_40_2", "wrn_16_1",
                                                                                          "wrn_16_2")
  assert (student.dataset, student.jitter, student.hflip, student.optimizer) == ("cifar10", 4, True, "sgd")
  assert student.lr_schedule == "step" and student.loss.adv_weight == student.loss.l1_weight == 1.0
  rng = np.random.default_rng(0)
  path = str(tmp_path / "tiny_cifar.npz")
  np.savez(path, x_train=rng.integers(0, 255, (16, 8, 8, 3), np.uint8), y_train=np.arange(16) % 10,
           x_test=rng.integers(0, 255, (8, 8, 8, 3), np.uint8), y_test=np.arange(8) % 10)
  for c in (teacher, student):
    c.update({"dataset": path, "num_steps": 2, "batch_size": 8, "eval_batch_size": 8, "checkpoint_every_steps": 2})
  teacher.model, teacher.model_kwargs = "mlp", {"hidden": (8,)}
  train_and_evaluate(teacher, str(tmp_path / "teacher"), progress=False, mesh=one_device())
  student.teacher_workdir = str(tmp_path / "teacher")
  result = train_and_evaluate(student, str(tmp_path / "student"), progress=False, mesh=one_device())
  assert not result["teacher_cached"]  # augmented inputs: the teacher runs live
  assert result["steps"] == 2 and 0.0 <= result["test_accuracy"] <= 1.0
  assert set(result["extra"]) >= {"disc_test_acc_real", "disc_test_acc_fake"}
