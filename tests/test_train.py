"""The generic step and stage loop: devices, recompilation, caching, resume, checkpoints, errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import StopTraining, crash_after
from flax import serialization

from kdjax import checkpoint as ckpt
from kdjax import models, parallel, reproduce, train
from kdjax.cli import main
from kdjax.config import apply_overrides, default_stage_config
from kdjax.data import epoch_order
from kdjax.errors import MissingCheckpointError, NonFiniteError, UnknownNameError
from kdjax.methods.objective import make_objective
from kdjax.train import (
  create_train_state,
  make_lr_schedule,
  make_optimizer,
  make_train_step,
  step_boundaries,
  train_and_evaluate,
)


def tiny_config(**fields):
  """A stage on sklearn digits that trains in a second or two."""
  c = default_stage_config()
  c.dataset = "digits"
  c.model = "mlp"
  c.model_kwargs = {"hidden": (32,)}
  c.batch_size = 16
  c.num_steps = 8
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.eval_batch_size = 160
  for key, value in fields.items():
    c[key] = value
  return c


def params_of(workdir):
  variables, _, step = ckpt.load_teacher_variables(str(workdir))
  return variables, step


def assert_trees_equal(a, b, exact=True, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher")
  train_and_evaluate(tiny_config(model_kwargs={"hidden": (48,)}, num_steps=30), str(workdir), progress=False)
  return str(workdir)


def test_eight_devices_equal_one_device(tmp_path):
  assert jax.device_count() == 8, "conftest should give 8 CPU devices"
  # BatchNorm (cross-device statistics) and dropout (sharding-independent random bits) included.
  config = tiny_config(model="small_cnn", model_kwargs={"channels": (4,), "dense": 16, "dropout": 0.3},
                       num_steps=4)
  one = train_and_evaluate(config, str(tmp_path / "one"), mesh=parallel.make_mesh(jax.devices()[:1]),
                           progress=False)
  eight = train_and_evaluate(config, str(tmp_path / "eight"), mesh=parallel.make_mesh(), progress=False)
  assert_trees_equal(params_of(tmp_path / "one")[0], params_of(tmp_path / "eight")[0], exact=False)
  assert one["test_errors"] == eight["test_errors"]


def test_step_compiles_once_and_batch_is_sharded():
  mesh = parallel.make_mesh()
  model = models.get("mlp", hidden=(8,), num_classes=3)
  tx = optax.sgd(0.1)
  state = parallel.replicate(create_train_state(model, tx, jnp.zeros((1, 4)), seed=0), mesh)
  step = jax.jit(make_train_step(student=model, objective=make_objective("supervised", {}), tx=tx),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  for _ in range(4):
    batch = parallel.shard_batch({"image": rng.normal(size=(16, 4)).astype(np.float32),
                                  "label": rng.integers(0, 3, 16).astype(np.int32),
                                  "label_mask": np.ones(16, np.float32)}, mesh)
    assert len(batch["image"].sharding.device_set) == 8
    state, metrics = step(state, batch)
  assert step._cache_size() == 1
  assert int(state.step) == 4


def test_cached_teacher_equals_live_teacher(tmp_path, teacher_dir):
  config = tiny_config(method="soft_targets", teacher_workdir=teacher_dir, labelled_examples=300)
  config.loss = {"temperature": 4.0, "alpha": 0.9, "ensemble_mean": "arithmetic"}
  cached = train_and_evaluate(config, str(tmp_path / "cached"), progress=False)
  live_config = tiny_config(method="soft_targets", teacher_workdir=teacher_dir, labelled_examples=300,
                            cache_teacher=False)
  live_config.loss = config.loss
  live = train_and_evaluate(live_config, str(tmp_path / "live"), progress=False)
  assert cached["teacher_cached"] and not live["teacher_cached"]
  assert_trees_equal(params_of(tmp_path / "cached")[0], params_of(tmp_path / "live")[0], exact=False)


def test_ensemble_teacher_runs(tmp_path, teacher_dir):
  config = tiny_config(method="mimic", teacher_workdir=f"{teacher_dir},{teacher_dir}", num_steps=2)
  result = train_and_evaluate(config, str(tmp_path / "ens"), progress=False)
  assert result["teacher_cached"] and 0.0 <= result["test_accuracy"] <= 1.0


def test_teacher_is_never_written(tmp_path, teacher_dir):
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(teacher_dir) for p in fs}
  config = tiny_config(method="mimic", teacher_workdir=teacher_dir, num_steps=2, jitter=1)
  train_and_evaluate(config, str(tmp_path / "s"), progress=False)
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(teacher_dir) for p in fs}
  assert before == after
  student_vars, _ = params_of(tmp_path / "s")
  assert set(student_vars["params"]) == {"dense_0", "head"}  # only the student's own layers


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
  config = tiny_config(model_kwargs={"hidden": (32,), "dropout_hidden": 0.2}, jitter=1, num_steps=10,
                       checkpoint_every_steps=3)
  train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
  with pytest.raises(StopTraining):
    train_and_evaluate(config, str(tmp_path / "resumed"), progress=False, callbacks=[crash_after(7)])
  assert params_of(tmp_path / "resumed")[1] == 6  # the last checkpoint before the "crash"
  train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
  assert_trees_equal(params_of(tmp_path / "straight")[0], params_of(tmp_path / "resumed")[0], exact=True)


CONFIG_FILE = textwrap.dedent("""
    from kdjax.config import default_stage_config
    def get_config():
      c = default_stage_config()
      c.dataset = "digits"; c.model = "mlp"; c.model_kwargs = {"hidden": (64,), "dropout_hidden": 0.2}
      c.batch_size = 16; c.num_steps = 400; c.checkpoint_every_steps = 5; c.log_every_steps = 5
      c.jitter = 1; c.eval_batch_size = 160; c.keep_checkpoints = 3
      return c
""")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
  config_path = tmp_path / "config.py"
  config_path.write_text(CONFIG_FILE)
  command = [sys.executable, "-m", "kdjax.cli", "train", "--config", str(config_path), "--no-progress"]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(command + ["--workdir", str(killed_dir)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  ckpt_dir = killed_dir / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    steps = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []) if d.isdigit()]
    if len(steps) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(command + ["--workdir", str(killed_dir)], env=env, check=True, capture_output=True)
  # The uninterrupted reference runs in this process: the same program on the same 8 devices.
  assert main(["train", "--config", str(config_path), "--no-progress", "--workdir", str(tmp_path / "straight")]) == 0
  killed, step = params_of(killed_dir)
  straight, _ = params_of(tmp_path / "straight")
  assert step == 400
  assert_trees_equal(straight, killed, exact=True)


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path):
  config = tiny_config(num_steps=8, checkpoint_every_steps=4)
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir), progress=False)
  # Damage every file of the newest checkpoint (as a bad disk would); step 4 must survive.
  for root, _, files in os.walk(workdir / "checkpoints" / "8"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  state = create_train_state(models.get("mlp", hidden=(32,), num_classes=10), optax.adam(1e-3),
                             jnp.zeros((1, 8, 8, 1)), seed=0)
  restored = ckpt.Checkpointer(str(workdir)).restore_latest(
      jax.tree.map(np.asarray, serialization.to_state_dict(state)))
  assert int(restored["step"]) == 4
  # Re-running the stage resumes from step 4 and finishes; the result equals an undamaged run.
  train_and_evaluate(config, str(workdir), progress=False)
  train_and_evaluate(config, str(tmp_path / "clean"), progress=False)
  assert_trees_equal(params_of(workdir)[0], params_of(tmp_path / "clean")[0], exact=True)


def test_nan_in_batch_stops_with_step_and_keeps_checkpoint(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.random((64, 4, 4, 1)).astype(np.float32)
  x[epoch_order(0, 0, 64)[16 * 3 + 1], 2, 2, 0] = np.nan  # in the batch of step 3
  np.savez(tmp_path / "nan.npz", x_train=x, y_train=np.arange(64) % 4, x_test=np.zeros_like(x[:8]),
           y_test=np.arange(8) % 4)
  config = tiny_config(dataset=str(tmp_path / "nan.npz"), num_steps=8, checkpoint_every_steps=1)
  with pytest.raises(NonFiniteError, match=r"step 3: the input batch contains NaN"):
    train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert params_of(tmp_path / "run")[1] == 3  # steps 0-2 done and saved


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  # A finite but huge input overflows the logits: the loss of the step that meets it is inf.
  rng = np.random.default_rng(0)
  x = rng.random((64, 4, 4, 1)).astype(np.float32)
  order = epoch_order(0, 0, 64)
  x[order[16 * 2 + 5]] = 3e38  # in the batch of step 2
  np.savez(tmp_path / "huge.npz", x_train=x, y_train=np.arange(64) % 4, x_test=x[:8] * 0, y_test=np.arange(8) % 4)
  config = tiny_config(dataset=str(tmp_path / "huge.npz"), num_steps=8, checkpoint_every_steps=1,
                       log_every_steps=1)
  with pytest.raises(NonFiniteError, match=r"step 2: the loss or its gradients became NaN/inf"):
    train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  variables, step = params_of(tmp_path / "run")
  assert step == 2  # the state after steps 0 and 1; the failed update never reached a checkpoint
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(variables))


def test_missing_teacher_checkpoint_is_explained(tmp_path):
  config = tiny_config(method="mimic", teacher_workdir=str(tmp_path / "nowhere"))
  with pytest.raises(MissingCheckpointError, match="no teacher checkpoint in .*nowhere"):
    train_and_evaluate(config, str(tmp_path / "s"), progress=False)
  config = tiny_config(method="mimic")
  with pytest.raises(ValueError, match="needs a teacher"):
    train_and_evaluate(config, str(tmp_path / "s2"), progress=False)


def test_unknown_names_list_the_valid_ones(tmp_path):
  from kdjax.methods.objective import METHODS
  with pytest.raises(UnknownNameError, match="unknown method 'nope'; expected one of: "
                     + ", ".join(sorted(METHODS)) + "$"):
    train_and_evaluate(tiny_config(method="nope"), str(tmp_path / "a"), progress=False)
  with pytest.raises(UnknownNameError, match="unknown model 'nope'"):
    train_and_evaluate(tiny_config(model="nope"), str(tmp_path / "b"), progress=False)
  with pytest.raises(UnknownNameError, match="loss field for method 'soft_targets'.*temperature"):
    make_objective("soft_targets", {"temprature": 3.0})
  config = tiny_config()
  config.lock()
  with pytest.raises(UnknownNameError, match="unknown config key 'lerning_rate'.*learning_rate"):
    apply_overrides(config, {"lerning_rate": "0.1"})
  with pytest.raises(ValueError, match="batch_size 12 must be divisible by the number of devices"):
    train_and_evaluate(tiny_config(batch_size=12), str(tmp_path / "c"), progress=False)


def test_resume_with_a_different_config_is_refused(tmp_path):
  train_and_evaluate(tiny_config(num_steps=2), str(tmp_path / "run"), progress=False)
  with pytest.raises(ValueError, match=r"different config \(fields \['learning_rate'\]"):
    train_and_evaluate(tiny_config(num_steps=2, learning_rate=0.5), str(tmp_path / "run"), progress=False)


def sgd_learning_rates(config, num_steps):
  """The learning rate of each update of ``make_optimizer(config)``: SGD on a gradient of 1 moves by -lr."""
  tx = make_optimizer(config, num_steps)
  params = jnp.zeros(())
  opt_state = tx.init(params)
  rates = []
  for _ in range(num_steps):
    updates, opt_state = tx.update(jnp.ones(()), opt_state, params)
    rates.append(-float(updates))
  return rates


def test_default_schedule_is_constant():
  config = tiny_config(optimizer="sgd", momentum=0.0, learning_rate=0.1)
  assert config.lr_schedule == "constant" and config.lr_boundaries == () and config.lr_decay_factor == 0.1
  np.testing.assert_allclose(sgd_learning_rates(config, 4), [0.1] * 4, rtol=1e-6)


def test_step_schedule_drops_the_learning_rate_at_the_boundaries():
  # 8 updates, boundaries 1/4, 1/2, 3/4 -> updates 2, 4 and 6 (0-based) are the first at each lower rate.
  config = tiny_config(optimizer="sgd", momentum=0.0, learning_rate=0.1, lr_schedule="step",
                       lr_boundaries=(0.25, 0.5, 0.75), lr_decay_factor=0.5)
  np.testing.assert_allclose(sgd_learning_rates(config, 8), [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125],
                             rtol=1e-6)
  # Fractions are rounded, not truncated: 0.29 * 100 and 0.57 * 100 are 28.99... and 56.99... in floats.
  schedule = make_lr_schedule(tiny_config(learning_rate=1.0, lr_schedule="step", lr_boundaries=(0.29, 0.57),
                                          lr_decay_factor=0.1), 100)
  for step, want in [(0, 1.0), (28, 1.0), (29, 0.1), (56, 0.1), (57, 0.01), (99, 0.01)]:
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)
  # RepDistiller: 240 epochs of 781 steps (CIFAR-100, batch 64), LR 0.05 x0.1 at epochs 150, 180, 210
  # = steps 117150, 140580, 164010.
  schedule = make_lr_schedule(tiny_config(learning_rate=0.05, lr_schedule="step",
                                          lr_boundaries=(150 / 240, 180 / 240, 210 / 240)), 240 * 781)
  for step, want in [(0, 0.05), (117149, 0.05), (117150, 0.005), (140579, 0.005), (140580, 5e-4),
                     (164009, 5e-4), (164010, 5e-5), (240 * 781 - 1, 5e-5)]:
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5)


@pytest.mark.parametrize("fields, match", [
    ({}, r"lr_schedule 'step' needs lr_boundaries.*got \(\)"),
    ({"lr_boundaries": (0.5, 0.5)}, r"lr_boundaries must be .*strictly increasing.*got \(0\.5, 0\.5\)"),
    ({"lr_boundaries": (0.75, 0.5)}, r"lr_boundaries must be .*got \(0\.75, 0\.5\)"),
    ({"lr_boundaries": (150, 180, 210)}, r"lr_boundaries must be fractions.*got \(150, 180, 210\)"),
    ({"lr_boundaries": (0.0, 0.5)}, r"lr_boundaries must be .*between 0 and 1.*got \(0\.0, 0\.5\)"),
    ({"lr_boundaries": (0.5, 1.0)}, r"lr_boundaries must be .*got \(0\.5, 1\.0\)"),
    ({"lr_boundaries": (0.5,), "lr_decay_factor": 0.0}, r"lr_decay_factor must be > 0, got 0\.0"),
    ({"lr_boundaries": (0.5,), "lr_decay_factor": -0.1}, r"lr_decay_factor must be > 0, got -0\.1"),
])
def test_bad_step_schedule_fields_are_named(fields, match):
  with pytest.raises(ValueError, match=match):
    make_optimizer(tiny_config(lr_schedule="step", **fields), 100)


def test_unknown_schedule_lists_the_valid_ones_before_config_json_is_written(tmp_path):
  with pytest.raises(UnknownNameError, match="unknown lr_schedule 'steps'; expected one of: constant, cosine, step"):
    make_optimizer(tiny_config(lr_schedule="steps"), 100)
  # A bad schedule fails before the work directory records the config, so the fixed config can use it.
  with pytest.raises(ValueError, match="lr_decay_factor must be > 0"):
    train_and_evaluate(tiny_config(lr_schedule="step", lr_boundaries=(0.5,), lr_decay_factor=0.0),
                       str(tmp_path / "run"), progress=False)
  assert ckpt.read_config(str(tmp_path / "run")) is None


def test_step_schedule_config_survives_the_config_json_round_trip(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(num_steps=2, lr_schedule="step", lr_boundaries=(0.5,), lr_decay_factor=0.1)
  train_and_evaluate(config, workdir, progress=False)
  assert ckpt.read_config(workdir)["lr_boundaries"] == [0.5]  # JSON has no tuples
  train_and_evaluate(config, workdir, progress=False)  # the same config with its tuple is not "changed"
  with pytest.raises(ValueError, match=r"different config \(fields \['lr_boundaries'\]"):
    train_and_evaluate(tiny_config(num_steps=2, lr_schedule="step", lr_boundaries=(0.75,)), workdir, progress=False)


def test_run_recorded_before_the_schedule_fields_existed_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(num_steps=2), workdir, progress=False)
  old = ckpt.read_config(workdir)
  del old["lr_boundaries"], old["lr_decay_factor"]
  ckpt.write_config(workdir, old)
  train_and_evaluate(tiny_config(num_steps=2), workdir, progress=False)  # it ran with their defaults
  ckpt.write_config(workdir, old)
  with pytest.raises(ValueError, match=r"fields \['lr_boundaries', 'lr_schedule'\] differ"):
    train_and_evaluate(tiny_config(num_steps=2, lr_schedule="step", lr_boundaries=(0.5,)), workdir, progress=False)


@pytest.mark.parametrize("paper, variant, steps_per_epoch, want", [
    # RepDistiller: x0.1 at epochs 150, 180, 210 of 240 (CIFAR-100, batch 64: 781 steps an epoch).
    ("fitnets", "teacher", 781, {150 * 781: 0.1, 180 * 781: 0.1, 210 * 781: 0.1}),
    ("fitnets", "student_fitnet", 781, {150 * 781: 0.1, 180 * 781: 0.1, 210 * 781: 0.1}),
    ("fitnets", "student_fitnet_stage1", 781, None),  # RepDistiller's init(): constant LR
    # The AT authors' cifar.py: x0.2 at epochs 60, 120, 160 of 200 (CIFAR-10, batch 128: 390 steps).
    ("attention_transfer", "student_at_kd", 390, {60 * 390: 0.2, 120 * 390: 0.2, 160 * 390: 0.2}),
    # FSP: x0.1 at 32k / 48k of 64k, 11k / 16k of 21k, stage 1 at 16k / 24k of 32k iterations.
    ("fsp", "teacher", None, {32000: 0.1, 48000: 0.1}),
    ("fsp", "student_fsp", None, {11000: 0.1, 16000: 0.1}),
    ("fsp", "student_fsp_stage1", None, {16000: 0.1, 24000: 0.1}),
])
def test_full_paper_configs_step_at_the_papers_epochs(paper, variant, steps_per_epoch, want):
  c = reproduce.load_paper(paper).get_config(variant + ",full")
  num_steps = c.num_steps or c.num_epochs * steps_per_epoch
  make_optimizer(c, num_steps)
  if want is None:
    assert c.lr_schedule == "constant"
  else:
    assert c.lr_schedule == "step"
    assert step_boundaries(c.lr_boundaries, c.lr_decay_factor, num_steps) == pytest.approx(want)


class TwoOptimizerState(flax.struct.PyTreeNode):
  """A stage state unlike TrainState: two parameter groups with two optimizer states."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: object
  critic: jax.Array
  critic_opt_state: object
  rng: jax.Array


def two_optimizer_program(num_steps=6):
  """A toy stage program: the student (SGD) fits noisy targets a critic (Adam) moves towards."""
  model = models.get("mlp", hidden=(8,), num_classes=3)
  student_tx, critic_tx = optax.sgd(0.1, momentum=0.9), optax.adam(1e-2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  state = TwoOptimizerState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={},
                            opt_state=student_tx.init(variables["params"]), critic=jnp.zeros((3,)),
                            critic_opt_state=critic_tx.init(jnp.zeros((3,))), rng=jax.random.PRNGKey(1))

  def step(state, batch):
    noise = jax.random.normal(jax.random.fold_in(state.rng, state.step), (3,))
    def student_loss(params):
      logits = model.apply({"params": params}, batch["image"])
      return jnp.mean(jnp.square(logits - state.critic - noise))
    loss, grads = jax.value_and_grad(student_loss)(state.params)
    updates, opt_state = student_tx.update(grads, state.opt_state, state.params)
    critic_grad = jax.grad(lambda c: jnp.sum(jnp.square(c - jnp.mean(batch["image"]))))(state.critic)
    critic_updates, critic_opt_state = critic_tx.update(critic_grad, state.critic_opt_state, state.critic)
    new, nonfinite = train.skip_if_nonfinite(
        train.all_finite(loss, grads), (optax.apply_updates(state.params, updates), opt_state),
        (state.params, state.opt_state))
    return state.replace(step=state.step + 1, params=new[0], opt_state=new[1],
                         critic=optax.apply_updates(state.critic, critic_updates),
                         critic_opt_state=critic_opt_state), {"loss": train.mean_metric(loss), "nonfinite": nonfinite}

  rng = np.random.default_rng(0)
  data = rng.normal(size=(num_steps, 8, 4)).astype(np.float32)

  def batches(start):
    return ({"image": jnp.asarray(data[s])} for s in range(start, num_steps))
  return state, step, batches


def run_fit(workdir, callbacks=(), num_steps=6):
  state, step, batches = two_optimizer_program(num_steps)
  return train.fit(state, step, batches=batches, num_steps=num_steps, workdir=str(workdir),
                   mesh=parallel.make_mesh(), evaluate=lambda s: {"critic": float(jnp.sum(s.critic))},
                   checkpoint_every_steps=2, log_every_steps=1, progress=False, callbacks=callbacks)


def test_fit_resumes_a_state_with_two_optimizers_bit_identically(tmp_path):
  straight = run_fit(tmp_path / "straight")
  with pytest.raises(StopTraining):
    run_fit(tmp_path / "resumed", callbacks=[crash_after(5)])
  template = serialization.to_state_dict(two_optimizer_program()[0])
  latest = ckpt.Checkpointer(str(tmp_path / "resumed")).restore_latest(jax.tree.map(np.asarray, template))
  assert int(latest["step"]) == 4  # the last checkpoint before the "crash"
  resumed = run_fit(tmp_path / "resumed")
  assert straight["critic"] == resumed["critic"] and straight["steps"] == 6
  full = [ckpt.Checkpointer(str(tmp_path / d)).restore_latest(jax.tree.map(np.asarray, template))
          for d in ("straight", "resumed")]
  assert int(full[0]["step"]) == int(full[1]["step"]) == 6
  assert_trees_equal(full[0], full[1], exact=True)  # both optimizer states included
  # The student's variables sit where teacher loading reads them.
  assert set(full[1]["params"]) == {"dense_0", "head"}


def test_fit_requires_the_nonfinite_metric(tmp_path):
  state, step, batches = two_optimizer_program()

  def unguarded(state, batch):
    new_state, metrics = step(state, batch)
    return new_state, {"loss": metrics["loss"]}
  with pytest.raises(ValueError, match=r"must report a 'nonfinite' metric.*\['loss'\]"):
    train.fit(state, unguarded, batches=batches, num_steps=6, workdir=str(tmp_path / "run"),
              mesh=parallel.make_mesh(), evaluate=dict, progress=False)


def test_a_teacher_given_to_a_method_that_uses_none_is_refused_before_config_json(tmp_path, teacher_dir):
  with pytest.raises(ValueError, match="method 'supervised' uses no teacher, but teacher_workdir="):
    train_and_evaluate(tiny_config(teacher_workdir=teacher_dir), str(tmp_path / "run"), progress=False)
  assert ckpt.read_config(str(tmp_path / "run")) is None


def test_a_run_checkpointed_before_the_stage_runner_resumes(tmp_path):
  # The checkpoint layout of TrainState runs before the stage runner: its fields, the optimizer state as optax's
  # own pytree. Such a run must resume from it, not be moved aside as unreadable and retrained.
  config = tiny_config(num_steps=8, checkpoint_every_steps=4)
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir), progress=False)
  state = create_train_state(models.get("mlp", hidden=(32,), num_classes=10), optax.adam(1e-3),
                             jnp.zeros((1, 8, 8, 1)), seed=0)
  old_layout = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state, "rng": state.rng, "aux_params": state.aux_params}
  checkpointer = ckpt.Checkpointer(str(workdir))
  restored = checkpointer.restore_latest(jax.tree.map(np.asarray, old_layout))
  checkpointer.close()
  assert int(restored["step"]) == 8
  assert not (workdir / ckpt.UNREADABLE_DIR).exists()
  assert train_and_evaluate(config, str(workdir), progress=False)["steps"] == 8
  assert not (workdir / ckpt.UNREADABLE_DIR).exists()


def test_held_out_classes_train_on_the_rest_and_write_retrieval_of_the_exported_model(tmp_path):
  config = tiny_config(held_out_classes=(7, 8, 9), embedding_feature="hidden_0")
  result = train_and_evaluate(config, str(tmp_path), progress=False)
  assert ckpt.read_config(str(tmp_path))["num_classes"] == 7
  digits = train.kdata.load("digits")
  assert result["test_examples"] == int(np.sum(np.asarray(digits.test.labels) < 7))
  # The retrieval numbers are those of the exported model's feature on the held-out test examples.
  variables, _ = params_of(tmp_path)
  held = np.flatnonzero(np.asarray(digits.test.labels) >= 7)
  images, labels = digits.test.get(held)
  out = models.apply_model(models.get("mlp", hidden=(32,), num_classes=7), variables, images, features=("hidden_0",))
  from kdjax.retrieval import retrieval_metrics
  want = retrieval_metrics(np.asarray(out.features["hidden_0"]), labels)
  assert result["retrieval"]["queries"] == len(held)
  for key in ("recall@1", "recall@5", "mAP"):
    np.testing.assert_allclose(result["retrieval"][key], want[key], rtol=1e-6)
  # embedding_normalize: the same ranking on the L2-normalised feature (cosine).
  feature = np.asarray(out.features["hidden_0"], np.float64)
  want_cosine = retrieval_metrics(feature / np.linalg.norm(feature, axis=1, keepdims=True), labels)
  state = train.TrainState(step=0, params=variables["params"], batch_stats={}, opt_state=None, rng=None)
  got_cosine = train.evaluate_retrieval(models.get("mlp", hidden=(32,), num_classes=7), state,
                                        train.kdata.hold_out_classes(digits, (7, 8, 9)).retrieval,
                                        parallel.make_mesh(), feature="hidden_0", batch_size=160, normalize=True)
  assert got_cosine == pytest.approx(want_cosine, rel=1e-6)
  with pytest.raises(UnknownNameError, match="embedding"):  # a feature the model does not have
    train_and_evaluate(tiny_config(held_out_classes=(9,)), str(tmp_path / "no_feature"), progress=False)


def test_classes_train_and_test_a_stage_on_those_classes_only(tmp_path):
  result = train_and_evaluate(tiny_config(classes=(5, 6, 7, 8, 9)), str(tmp_path), progress=False)
  assert ckpt.read_config(str(tmp_path))["num_classes"] == 5
  digits = train.kdata.load("digits")
  assert result["test_examples"] == int(np.sum(np.asarray(digits.test.labels) >= 5))
  assert "retrieval" not in result


def test_report_train_accuracy_measures_the_labelled_training_examples_only(tmp_path):
  # 100 labelled digits plus the unlabelled rest as a transfer set: the reported train accuracy is the exported
  # model's, in eval mode, on exactly those 100 examples (the transfer-set protocol's budget rule reads it).
  config = tiny_config(labelled_examples=100, include_unlabelled=True, report_train_accuracy=True, split_seed=3)
  result = train_and_evaluate(config, str(tmp_path), progress=False)
  assert result["train_examples"] == 100
  digits = train.kdata.load("digits")
  labelled, _ = train.kdata.stratified_split(digits.train.labels, 100, seed=3)
  images, labels = digits.train.get(np.sort(labelled))
  variables, _ = params_of(tmp_path)
  logits = models.apply_model(models.get("mlp", hidden=(32,), num_classes=10), variables, images).logits
  assert result["train_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)), abs=1e-6)
  assert "train_accuracy" not in train_and_evaluate(tiny_config(), str(tmp_path / "off"), progress=False)


def test_a_stage_trained_on_a_train_only_file_is_tested_on_test_dataset(tmp_path):
  digits = train.kdata.load("digits")
  path = str(tmp_path / "inputs.npz")
  np.savez(path, x_train=digits.train.images[:200], y_train=digits.train.labels[:200])
  result = train_and_evaluate(tiny_config(dataset=path, test_dataset="digits"), str(tmp_path / "run"),
                              progress=False)
  assert result["test_examples"] == 300
  with pytest.raises(ValueError, match="train-only file needs --config.test_dataset"):
    train_and_evaluate(tiny_config(dataset=path), str(tmp_path / "no_test"), progress=False)
  assert not (tmp_path / "no_test" / "config.json").exists()


class CountState(flax.struct.PyTreeNode):
  step: jax.Array
  counts: jax.Array  # [classes] examples seen per class


def class_count_program(seen_batches: list):
  """A stage that trains no model: one pass over the training split, counting examples per class."""
  def init_state(setup):
    return CountState(step=jnp.zeros((), jnp.int32), counts=jnp.zeros((setup.dataset.num_classes,)))

  def make_step(setup):
    def step(state, batch, teacher_variables):
      del teacher_variables
      hits = jax.nn.one_hot(batch["label"], setup.dataset.num_classes) * batch["weight"][:, None]
      return state.replace(step=state.step + 1, counts=state.counts + hits.sum(0)), {
          "nonfinite": (jnp.float32(0.0), jnp.float32(1.0))}
    return step

  def batches(setup):
    size = setup.config.batch_size
    def from_step(start):
      passes = list(train.kdata.eval_batches(setup.transfer_set.split, batch_size=size))
      for s in range(start, setup.num_steps):
        seen_batches.append(s)
        yield parallel.shard_batch({k: passes[s][k] for k in ("label", "weight")}, setup.mesh)
    return from_step

  def evaluate(setup, state):
    counts = np.asarray(state.counts)
    np.save(os.path.join(setup.workdir, "counts.npy"), counts)
    return {"examples": float(counts.sum())}

  return train.StageProgram(init_state, make_step, evaluate=evaluate, batches=batches, exports_model=False)


def test_a_stage_that_exports_no_model_runs_its_own_batches_and_resumes(tmp_path, monkeypatch):
  seen: list[int] = []
  monkeypatch.setattr(train, "make_method", lambda name, loss: class_count_program(seen))
  config = tiny_config(batch_size=160, num_steps=10, checkpoint_every_steps=3, model="no_such_model")
  with pytest.raises(StopTraining):
    train_and_evaluate(config, str(tmp_path), progress=False, callbacks=[crash_after(4)])
  result = train_and_evaluate(config, str(tmp_path), progress=False)
  assert seen[:4] == [0, 1, 2, 3] and seen[-7:] == list(range(3, 10))  # resumed from step 3's checkpoint
  assert result["extra"] == {"examples": 1497.0} and "test_accuracy" not in result
  np.testing.assert_array_equal(np.load(tmp_path / "counts.npy"),
                                np.bincount(train.kdata.load("digits").train.labels, minlength=10))
