"""FitNets, attention transfer and FSP as training stages: two-stage mechanics, devices, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close

from kdjax import checkpoint as ckpt
from kdjax import models, parallel
from kdjax.config import default_stage_config
from kdjax.methods import attention_transfer
from kdjax.methods.objective import make_objective
from kdjax.train import StageProgress, create_train_state, make_train_step, train_and_evaluate

WIDTHS = (4, 4, 8, 8)
GUIDED = ("conv1", "bn1", "layer1_0", "layer2_0")  # resnet8: the layers up to stage 2


def config(**fields):
  c = default_stage_config()
  c.dataset = "digits"
  c.model = "resnet8"
  c.model_kwargs = {"widths": WIDTHS}
  c.batch_size = 16
  c.num_steps = 3
  c.log_every_steps = 3
  c.checkpoint_every_steps = 3
  c.eval_batch_size = 160
  for key, value in fields.items():
    c[key] = value
  return c


def variables_of(workdir):
  return ckpt.load_teacher_variables(str(workdir))[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resnet_teacher")
  train_and_evaluate(config(model="resnet14", num_steps=6), str(workdir), progress=False)
  return str(workdir)


def one_step(method, loss, mesh):
  """One jitted training step of ``method`` (resnet14 -> resnet8) on ``mesh``; returns the new state."""
  student = models.get("resnet8", widths=WIDTHS, num_classes=10)
  teacher = models.get("resnet14", widths=WIDTHS, num_classes=10)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
           "label": (np.arange(16) % 10).astype(np.int32), "label_mask": np.ones(16, np.float32)}
  teacher_vars = teacher.init(jax.random.key(1), batch["image"][:1])
  objective = make_objective(method, loss)
  tx = optax.sgd(0.01, momentum=0.9)
  state = create_train_state(student, tx, jnp.asarray(batch["image"][:1]), seed=0, objective=objective,
                             teacher_models=[teacher], teacher_variables=[teacher_vars])
  step = jax.jit(make_train_step(student=student, objective=objective, tx=tx, teacher_models=(teacher,)))
  new_state, metrics = step(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh),
                            parallel.replicate((teacher_vars,), mesh))
  assert float(metrics["nonfinite"][0]) == 0.0
  return new_state


@pytest.mark.parametrize("method, loss", [
    # the default run keeps one method (the sharded feature-regression step); the slow run checks the rest
    pytest.param("attention_transfer", {"alpha": 0.9}, marks=pytest.mark.slow),
    pytest.param("fsp", {}, marks=pytest.mark.slow),
    ("fitnets_hint", {}),
    pytest.param("fitnets_kd", {"lambda_decay_fraction": 0.5}, marks=pytest.mark.slow),
    pytest.param("fitnets_one_stage", {}, marks=pytest.mark.slow),
])
def test_each_stage_step_on_eight_devices_equals_one_device(method, loss):
  one = one_step(method, loss, parallel.make_mesh(jax.devices()[:1]))
  eight = one_step(method, loss, parallel.make_mesh())
  # Float tolerance: the sharded step reduces in another order; beta = 1000 (AT) amplifies it.
  assert_trees_close((one.params, one.batch_stats, one.aux_params),
                     (eight.params, eight.batch_stats, eight.aux_params), rtol=1e-4, atol=1e-5)
  if method.startswith("fitnets_") and method != "fitnets_kd":
    assert jax.tree.leaves(one.aux_params)  # the regressor is trained alongside


def fresh_params(seed):
  student = models.get("resnet8", widths=WIDTHS, num_classes=10)
  return create_train_state(student, optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)), seed=seed).params


@pytest.mark.slow
def test_fitnets_two_stages(tmp_path, teacher):
  # Stage 1: only the layers up to the guided layer (and the regressor) change.
  stage1 = config(method="fitnets_hint", teacher_workdir=teacher, trainable=GUIDED, num_steps=4)
  train_and_evaluate(stage1, str(tmp_path / "stage1"), progress=False)
  after, init = variables_of(tmp_path / "stage1")["params"], fresh_params(0)
  for name in after:
    changed = not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[name]),
                                                            jax.tree.leaves(init[name])))
    assert changed == (name in GUIDED), name
  # Stage 2 starts from stage 1's guided layers and fresh upper layers; the regressor is gone.
  stage2 = config(method="fitnets_kd", teacher_workdir=teacher, init_from=str(tmp_path / "stage1"),
                  init_layers=GUIDED, num_steps=0, num_epochs=0, seed=1)
  stage2.loss = {"lambda_decay_fraction": 0.5}
  train_and_evaluate(stage2, str(tmp_path / "stage2_at0"), progress=False)
  start, fresh1 = variables_of(tmp_path / "stage2_at0")["params"], fresh_params(1)
  assert set(start) == set(fresh1)
  for name in start:
    assert_trees_close(start[name], (after if name in GUIDED else fresh1)[name], rtol=0, atol=0)


def test_fitnets_kd_lambda_anneals_over_a_fraction_of_the_stage():
  logits = jnp.zeros((2, 3))
  out = models.ModelOutput(logits, {}, {})
  batch = {"label": jnp.zeros(2, jnp.int32), "label_mask": jnp.ones(2)}
  # 4 -> 1 over the first half of a 20-step stage, then flat; the same fractions in a 200-step stage.
  objective = make_objective("fitnets_kd", {"lambda_decay_fraction": 0.5})
  for total in (20, 200):
    lambdas = [float(objective.fn(out, out, batch, StageProgress(jnp.int32(f * total), total))[1]["lambda"][0])
               for f in (0, 0.25, 0.5, 0.9)]
    assert lambdas == pytest.approx([4.0, 2.5, 1.0, 1.0])
  # The default anneals over the whole stage, as the paper's 4 -> 1 over its 500 epochs.
  objective = make_objective("fitnets_kd", {})
  lam = objective.fn(out, out, batch, StageProgress(jnp.int32(75), 100))[1]["lambda"][0]
  assert float(lam) == pytest.approx(4.0 - 3.0 * 0.75)


@pytest.mark.slow
def test_fsp_then_plain_training(tmp_path, teacher):
  train_and_evaluate(config(method="fsp", teacher_workdir=teacher, num_steps=3), str(tmp_path / "fsp"),
                     progress=False)
  result = train_and_evaluate(config(init_from=str(tmp_path / "fsp"), num_steps=2), str(tmp_path / "task"),
                              progress=False)
  assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_fsp_channel_mismatch_names_index_and_counts(tmp_path, teacher):
  c = config(method="fsp", teacher_workdir=teacher, model_kwargs={"widths": (4, 4, 8, 16)})
  with pytest.raises(ValueError, match="at index 3 the student has 16 channels"):
    train_and_evaluate(c, str(tmp_path / "s"), progress=False)


def test_hint_guided_shape_mismatch_names_both_layers(tmp_path, teacher):
  c = config(method="fitnets_one_stage", teacher_workdir=teacher)
  c.loss = {"guided_layer": "stage3", "hint_layer": "stage2"}
  with pytest.raises(ValueError, match=r"guided layer 'student:stage3', hint layer 'teacher:stage2'.*\(2, 2, 8\)|"
                                       r"guided layer 'student:stage3', hint layer 'teacher:stage2'"):
    train_and_evaluate(c, str(tmp_path / "s"), progress=False)


def test_unknown_init_layer_and_trainable_list_the_layers(tmp_path, teacher):
  c = config(init_from=teacher, init_layers=("layer9_0",))
  with pytest.raises(ValueError, match="layer9_0.*its layers are: bn1, conv1, fc"):
    train_and_evaluate(c, str(tmp_path / "a"), progress=False)
  c = config(trainable=("nope",))
  with pytest.raises(ValueError, match="unknown trainable layer.*conv1"):
    train_and_evaluate(c, str(tmp_path / "b"), progress=False)


def test_gradient_attention_double_backprop_under_jit_on_eight_devices():
  model = models.get("mlp", hidden=(16,), num_classes=4)
  x = np.random.default_rng(0).normal(size=(16, 4, 4, 1)).astype(np.float32)
  labels = np.arange(16) % 4
  student_vars = model.init(jax.random.key(0), x)
  teacher_vars = model.init(jax.random.key(1), x)

  def task(params, images):
    logits = model.apply({"params": params}, images)
    return -jax.nn.log_softmax(logits)[jnp.arange(16), labels]

  def total(params, images):
    grad_at = attention_transfer.gradient_attention_loss(task, params, task, teacher_vars["params"], images)
    return jnp.mean(task(params, images) + 10.0 * grad_at)

  grad_fn = jax.jit(jax.grad(total))
  one = grad_fn(student_vars["params"], jax.device_put(x, jax.devices()[0]))
  mesh = parallel.make_mesh()
  eight = grad_fn(parallel.replicate(student_vars["params"], mesh), parallel.shard_batch({"x": x}, mesh)["x"])
  assert_trees_close(one, eight, rtol=1e-5, atol=1e-6)
  assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(one))
