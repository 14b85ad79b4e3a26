"""Gradient-based attention transfer as a training stage: the step's gradient against the pure losses,
both variants through the stage runner, one compilation, eight devices, and the errors people meet."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from test_train import tiny_config

from kdjax import checkpoint as ckpt
from kdjax import models, parallel
from kdjax.errors import UnknownNameError
from kdjax.methods import attention_transfer as at
from kdjax.methods.objective import make_method
from kdjax.methods.soft_targets import hard_label_loss
from kdjax.train import create_train_state, train_and_evaluate

SHAPE = (4, 4, 1)  # 16 input elements
BETA = 64.0        # weight (β/2)/16 = 2 on the per-example norm with per_element=True


def fake_setup(student, tx, *, teacher=None, teacher_variables=None, example_shape=SHAPE, num_classes=3):
  """The fields of kdjax.train.Setup that the gradient-AT program reads, without data or a work directory."""
  return types.SimpleNamespace(
      student=student, tx=tx, example=jnp.zeros((1, *example_shape), jnp.float32),
      teacher_models=[teacher] if teacher is not None else [],
      teacher_variables=[teacher_variables] if teacher is not None else [],
      dataset=types.SimpleNamespace(num_classes=num_classes), config=types.SimpleNamespace(seed=0),
      init_variables=None)


def a_batch(seed=0, n=8, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, *SHAPE)).astype(dtype), "label": (np.arange(n) % 3).astype(np.int32),
          "label_mask": np.array([1, 1, 0, 1, 1, 1, 0, 1][:n], np.float32)}


def program_and_state(variant, student, tx, teacher=None, teacher_variables=None, **loss):
  program = make_method("attention_transfer_gradient", {"variant": variant, "beta": BETA, **loss})
  setup = fake_setup(student, tx, teacher=teacher, teacher_variables=teacher_variables)
  return program, setup, program.init_state(setup)


@pytest.mark.parametrize("variant", ["teacher", "flip"])
def test_step_gradient_is_grad_of_the_pure_losses_and_matches_finite_differences(variant):
  with jax.enable_x64(True):
    student = models.get("mlp", hidden=(6,), num_classes=3)
    teacher = models.get("mlp", hidden=(5,), num_classes=3)
    batch = a_batch(dtype=np.float64)
    x = jnp.asarray(batch["image"])
    f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    teacher_vars = f64(teacher.init(jax.random.key(1), x[:1]))
    program, setup, state = program_and_state(variant, student, optax.sgd(1.0), teacher, teacher_vars)
    state = state.replace(params=f64(state.params))
    new_state, metrics = jax.jit(program.make_step(setup))(state, batch, (teacher_vars,))
    step_grad = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)  # SGD with rate 1

    mask, labels = jnp.asarray(batch["label_mask"]), jnp.asarray(batch["label"])

    def ce(model):
      return lambda variables, inputs: hard_label_loss(model.apply(variables, inputs), labels) * mask

    def objective(params):  # the paper's objective from the module's pure functions, written out by hand
      s = {"params": params}
      if variant == "teacher":
        term = at.gradient_attention_loss(ce(student), s, ce(teacher), teacher_vars, x)
      else:
        term = at.flip_invariance_loss(ce(student), s, x)
      return jnp.mean(ce(student)(s, x) + (BETA / 2 / 16) * mask * term)

    want = jax.grad(objective)(state.params)
    assert_trees_close(step_grad, want, rtol=1e-9, atol=1e-12)
    assert float(metrics["nonfinite"][0]) == 0.0
    assert float(metrics["gradient_attention"][0]) > 0
    # the attention term changes the update (double backprop reaches the parameters)
    ce_only = jax.grad(lambda p: jnp.mean(ce(student)({"params": p}, x)))(state.params)
    assert not np.allclose(want["dense_0"]["kernel"], ce_only["dense_0"]["kernel"])
    # a central difference along a random direction agrees with the step's gradient
    rng = np.random.default_rng(5)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), state.params)
    moved = lambda c: objective(jax.tree.map(lambda a, d: a + c * d, state.params, direction))
    fd = (moved(1e-6) - moved(-1e-6)) / 2e-6
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(step_grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)


def test_unlabelled_examples_contribute_nothing():
  student = models.get("mlp", hidden=(6,), num_classes=3)
  teacher_vars = student.init(jax.random.key(1), jnp.zeros((1, *SHAPE)))
  program, setup, state = program_and_state("teacher", student, optax.sgd(1.0), student, teacher_vars)
  step = jax.jit(program.make_step(setup))
  batch = a_batch()
  changed = {**batch, "image": batch["image"].copy(), "label": batch["label"].copy()}
  changed["image"][[2, 6]] *= 5.0  # the two unlabelled examples: other images and labels
  changed["label"][[2, 6]] = 1
  one = step(state, batch, (teacher_vars,))[0]
  state = program.init_state(setup)  # the step donates nothing here, but start afresh anyway
  two = step(state, changed, (teacher_vars,))[0]
  assert_trees_close(one.params, two.params, rtol=1e-6, atol=1e-7)


def test_step_compiles_once_and_eight_devices_equal_one():
  # 'teacher': a CNN with BatchNorm in training mode (statistics over the global batch) inside the double
  # backprop; 'flip': an MLP (cheaper to compile).
  cnn = models.get("small_cnn", channels=(4,), dense=8, num_classes=3)
  cnn_teacher = models.get("small_cnn", channels=(3,), dense=6, num_classes=3)
  teacher_vars = cnn_teacher.init(jax.random.key(1), jnp.zeros((1, *SHAPE)))
  mlp = models.get("mlp", hidden=(6,), num_classes=3)

  def run(variant, student, mesh, steps):
    program, setup, state = program_and_state(variant, student, optax.adam(0.01), cnn_teacher, teacher_vars)
    step = jax.jit(program.make_step(setup), donate_argnums=(0,))
    state = parallel.replicate(state, mesh)
    tvars = parallel.replicate((teacher_vars,), mesh)
    for s in range(steps):
      state, metrics = step(state, parallel.shard_batch(a_batch(seed=s), mesh), tvars)
      assert float(metrics["nonfinite"][0]) == 0.0
    return state, step

  for variant, student in (("teacher", cnn), ("flip", mlp)):
    one, step = run(variant, student, parallel.make_mesh(jax.devices()[:1]), 2)
    assert step._cache_size() == 1
    eight, _ = run(variant, student, parallel.make_mesh(), 2)
    assert_trees_close((one.params, one.batch_stats), (eight.params, eight.batch_stats), rtol=1e-4, atol=1e-5)
    assert int(eight.step) == 2


def test_both_variants_train_through_the_stage_runner(tmp_path):
  start = create_train_state(models.get("mlp", hidden=(32,), num_classes=10), optax.sgd(0.1),
                             jnp.zeros((1, 8, 8, 1)), seed=0).params
  # 'flip' needs no teacher; its finished run then serves as the teacher of 'teacher'.
  for variant, teacher in (("flip", ""), ("teacher", str(tmp_path / "flip"))):
    config = tiny_config(method="attention_transfer_gradient", teacher_workdir=teacher, num_steps=3,
                         labelled_examples=300)
    config.loss = {"variant": variant}
    result = train_and_evaluate(config, str(tmp_path / variant), progress=False)
    assert not result["teacher_cached"]  # the teacher's input gradient needs a live teacher
    assert result["steps"] == 3 and 0.0 <= result["test_accuracy"] <= 1.0
    assert result["train"]["gradient_attention"] > 0 and result["train"]["nonfinite"] == 0.0
    variables, _, step = ckpt.load_teacher_variables(str(tmp_path / variant))
    assert step == 3 and set(variables["params"]) == {"dense_0", "head"}  # the exported student
    assert not np.allclose(variables["params"]["dense_0"]["kernel"], start["dense_0"]["kernel"])
  config = tiny_config(method="attention_transfer_gradient", teacher_workdir=str(tmp_path / "flip"))
  config.loss = {"variant": "flip"}
  with pytest.raises(ValueError, match="uses no teacher"):
    train_and_evaluate(config, str(tmp_path / "flip_with_teacher"), progress=False)


def test_errors_name_what_was_expected():
  student = models.get("mlp", hidden=(6,), num_classes=3)
  teacher = models.get("mlp", hidden=(5,), num_classes=3)
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 16)))
  program, setup, state = program_and_state("teacher", student, optax.sgd(0.1), teacher, teacher_vars)
  batch = {**a_batch(), "image": np.ones((8, *SHAPE), np.int32)}
  with pytest.raises(TypeError, match=r"floating-point inputs.*int32"):
    program.make_step(setup)(state, batch, (teacher_vars,))
  with pytest.raises(TypeError, match="floating-point inputs"):
    at.input_gradient(lambda p, x: jnp.sum(x), None, jnp.ones((2, 3), jnp.int32))
  # a teacher trained on other inputs (32 elements against its 16)
  wide = fake_setup(student, optax.sgd(0.1), teacher=teacher, teacher_variables=teacher_vars, example_shape=(4, 4, 2))
  with pytest.raises(ValueError, match=r"cannot take the student's inputs of shape \(4, 4, 2\)"):
    program.make_step(wide)
  other_classes = fake_setup(student, optax.sgd(0.1), teacher=teacher, teacher_variables=teacher_vars, num_classes=10)
  with pytest.raises(ValueError, match="teacher has 3 classes and the student's dataset 10"):
    program.make_step(other_classes)
  flip = make_method("attention_transfer_gradient", {"variant": "flip"})
  with pytest.raises(ValueError, match=r"\[batch, H, W, C\].*\(16,\)"):
    flip.make_step(fake_setup(student, optax.sgd(0.1), example_shape=(16,)))
  with pytest.raises(UnknownNameError, match="expected one of: flip, teacher"):
    make_method("attention_transfer_gradient", {"variant": "mirror"})
  with pytest.raises(ValueError, match="alpha must be 0"):
    make_method("attention_transfer_gradient", {"variant": "flip", "alpha": 0.9})
  with pytest.raises(ValueError, match="beta must be a number >= 0"):
    make_method("attention_transfer_gradient", {"beta": -1.0})
  assert make_method("attention_transfer_gradient", {}).needs_teacher
  assert not make_method("attention_transfer_gradient", {"variant": "flip"}).needs_teacher
