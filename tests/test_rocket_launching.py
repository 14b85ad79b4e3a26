"""Rocket Launching: the hint and its gradient block, parameter sharing, and the joint training stage."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import Capture, StopTraining, set_fields
from jax.test_util import check_grads

from kdjax import checkpoint as ckpt
from kdjax import data as kdata
from kdjax import models, parallel, reproduce
from kdjax import train as ktrain
from kdjax.config import default_stage_config
from kdjax.methods import rocket_launching as rl

BOOSTER = {"hidden": (32, 32, 32)}
LIGHT = {"hidden": (32, 16)}


def rocket_config(**fields):
  """A joint stage on sklearn digits (8x8): booster MLP 32-32-32, light MLP 32-16 sharing dense_0."""
  c = default_stage_config()
  c.dataset = "digits"
  c.model = "mlp"
  c.model_kwargs = dict(LIGHT)
  c.batch_size = 16
  c.num_steps = 8
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.eval_batch_size = 160
  c.method = "rocket_launching"
  c.loss = ml_collections.ConfigDict({**rl.default_loss_config(), "booster_model": "mlp",
                                      "booster_model_kwargs": dict(BOOSTER), "shared_layers": ("dense_0",)})
  return set_fields(c, fields)



def _pair(light_kwargs=LIGHT, booster_kwargs=BOOSTER, classes=5, inputs=6):
  light = models.get("mlp", num_classes=classes, **light_kwargs)
  booster = models.get("mlp", num_classes=classes, **booster_kwargs)
  x = jnp.zeros((1, inputs))
  light_params, booster_params = light.init(jax.random.PRNGKey(0), x)["params"], booster.init(
      jax.random.PRNGKey(1), x)["params"]
  return light, booster, light_params, booster_params


# --- the losses -------------------------------------------------------------------------------------------


def test_hint_and_joint_loss_by_hand():
  light = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]], np.float32)
  booster = np.array([[2.0, 0.0, 0.5], [1.0, -1.0, 1.0]], np.float32)
  labels = np.array([0, 2])
  np.testing.assert_allclose(rl.rocket_hint_loss(light, booster), [1 + 4 + 0, 1 + 1 + 4], rtol=1e-6)

  def ce(z, y):
    return np.log(np.exp(z).sum()) - z[y]
  loss, parts = rl.rocket_loss(light, booster, labels, gamma=0.03, label_mask=np.array([1.0, 0.0]))
  want = [ce(light[0], 0) + ce(booster[0], 0) + 0.03 * 5, 0.03 * 6]  # example 1 is unlabelled: hint only
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(parts["hint"], [5, 6], rtol=1e-6)
  # the code's ((y_b - y_s)**2).sum() / batch_size is the batch mean
  np.testing.assert_allclose(np.mean(rl.rocket_hint_loss(light, booster)), ((booster - light) ** 2).sum() / 2)


def test_kd_term_forms_and_teacher_requirement():
  rng = np.random.default_rng(0)
  light, booster, teacher = (rng.normal(size=(4, 10)).astype(np.float32) for _ in range(3))
  labels = rng.integers(0, 10, 4)
  base, _ = rl.rocket_loss(light, booster, labels)
  hinton, parts = rl.rocket_loss(light, booster, labels, teacher_logits=teacher, alpha=0.9, temperature=4.0)
  code, _ = rl.rocket_loss(light, booster, labels, teacher_logits=teacher, alpha=0.9, temperature=4.0,
                           kd_form="code")
  np.testing.assert_allclose(hinton - base, 0.9 * parts["kd"], rtol=1e-5)
  np.testing.assert_allclose(code - base, 0.9 * parts["kd"] * 2 / 10, rtol=1e-4)  # old kl_div mean · 2T²
  assert np.all(parts["kd"] > 0)
  with pytest.raises(ValueError, match="teacher_logits"):
    rl.rocket_loss(light, booster, labels, alpha=0.9)
  with pytest.raises(ValueError, match="gamma"):
    rl.rocket_loss(light, booster, labels, gamma=-1.0)


def test_jit_grad_vmap():
  rng = np.random.default_rng(1)
  light, booster = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2))
  labels = jnp.array([0, 1, 3])
  eager = rl.rocket_loss(light, booster, labels)[0]
  np.testing.assert_allclose(jax.jit(lambda a, b: rl.rocket_loss(a, b, labels)[0])(light, booster), eager,
                             rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda a, b: rl.rocket_hint_loss(a[None], b[None])[0])(light, booster),
                             rl.rocket_hint_loss(light, booster), rtol=1e-6)
  check_grads(lambda a, b: jnp.sum(rl.rocket_loss(a, b, labels, gradient_block=False)[0]), (light, booster),
              order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
  g_light, g_booster = jax.grad(lambda a, b: jnp.sum(rl.rocket_hint_loss(a, b)), argnums=(0, 1))(light, booster)
  np.testing.assert_allclose(g_light, 2 * (light - booster), rtol=1e-5)
  assert not np.any(g_booster)  # gradient block


@pytest.mark.parametrize("gradient_block", [True, False])
def test_hint_gradient_on_booster_only_and_shared_params(gradient_block):
  light, booster, light_params, booster_full = _pair()
  mapping = rl.share_map(light_params, booster_full, ("dense_0",))
  booster_only = rl.split_booster(booster_full, mapping)
  assert "dense_0" not in booster_only and set(booster_only) == {"dense_1", "dense_2", "head"}
  x = jax.random.normal(jax.random.PRNGKey(2), (7, 6))

  def hint(light_params, booster_only):
    l_logits = light.apply({"params": light_params}, x)
    z_logits = booster.apply({"params": rl.booster_variables(booster_only, light_params, mapping)}, x)
    return jnp.mean(rl.rocket_hint_loss(l_logits, z_logits, gradient_block=gradient_block))

  g_light, g_booster = jax.grad(hint, argnums=(0, 1))(light_params, booster_only)
  booster_norms = [float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g_booster)]
  if gradient_block:
    assert booster_norms == [0.0] * len(booster_norms)  # exactly zero on every booster-only parameter
  else:
    assert min(booster_norms) > 0
  assert float(jnp.abs(g_light["dense_0"]["kernel"]).max()) > 0  # shared layer: through the light path
  assert float(jnp.abs(g_light["dense_1"]["kernel"]).max()) > 0  # light-only layer


def test_shared_leaves_are_the_light_nets_arrays():
  _, _, light_params, booster_full = _pair()
  mapping = rl.share_map(light_params, booster_full, ("dense_0",))
  assert mapping == {("dense_0", "bias"): ("dense_0", "bias"), ("dense_0", "kernel"): ("dense_0", "kernel")}
  merged = rl.booster_variables(rl.split_booster(booster_full, mapping), light_params, mapping)
  assert merged["dense_0"]["kernel"] is light_params["dense_0"]["kernel"]
  assert merged["dense_2"]["kernel"] is booster_full["dense_2"]["kernel"]
  # renamed sharing: booster_layer=light_layer
  renamed = rl.share_map({"first": light_params["dense_0"]}, booster_full, ("dense_0=first",))
  assert renamed[("dense_0", "kernel")] == ("first", "kernel")


def test_bad_sharing_errors_name_the_layer_and_the_shapes():
  _, _, light_params, booster_full = _pair()
  with pytest.raises(Exception, match=r"dense_7.*dense_0.*dense_2"):  # booster's layers listed
    rl.share_map(light_params, booster_full, ("dense_7=dense_0",))
  with pytest.raises(Exception, match=r"light net.*dense_5.*dense_0.*head"):  # the light net's layers listed
    rl.share_map(light_params, booster_full, ("dense_5",))
  with pytest.raises(ValueError, match=r"dense_1/kernel has shape \(32, 16\).*booster's dense_1/kernel has shape "
                                       r"\(32, 32\)"):
    rl.share_map(light_params, booster_full, ("dense_1",))
  with pytest.raises(ValueError, match="real boolean"):
    rl.make_stage_program(**{**rl.default_loss_config(), "gradient_block": "False"})
  with pytest.raises(ValueError, match="tuple of layer names"):
    rl.make_stage_program(**{**rl.default_loss_config(), "shared_layers": "dense_0"})
  with pytest.raises(Exception, match="wrn_40_1"):  # an unknown booster lists the registered models
    rl.make_stage_program(**{**rl.default_loss_config(), "booster_model": "wrn_40_9"})


def _shapes(name, **kwargs):
  model = models.get(name, num_classes=10, **kwargs)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 32, 32, 3)))["params"]


def test_wrn_interval_and_bottom_schemes():
  booster = _shapes("wrn_40_1")
  interval = rl.share_map(_shapes("wrn_16_1"), booster, ("all_convs",))
  layers = {"/".join(p[:-1]) for p in interval}
  want = {"conv1"} | {f"block{g}_{i}/conv{c}" for g in (1, 2, 3) for i in (0, 1) for c in (1, 2)}
  assert layers == want | {"block2_0/shortcut", "block3_0/shortcut"}  # stem + the first 2 blocks of each group
  assert not any("bn" in p or p[0] == "fc" for p in layers)          # BatchNorms and the head are the light's own
  bottom_light = _shapes("wrn_40_1_bottom")
  bottom = {"/".join(p[:-1]) for p in rl.share_map(bottom_light, booster, ("all_convs",))}
  assert len(bottom) == 1 + 2 * 6 * 2 + 1 and not any(p.startswith("block3") for p in bottom)
  assert bottom_light["fc"]["kernel"].shape == (32, 10)  # own head on the 16x16, 32-channel map
  assert not any(k.startswith("block3") for k in bottom_light)
  model = models.get("wrn_40_1_bottom", num_classes=10)
  assert "stage2_preact" in models.feature_names(model, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="num_groups"):
    _shapes("wrn_16_1", num_groups=4)


# --- the training stage -------------------------------------------------------------------------------------


def test_exported_light_net_matches_the_joint_forward_and_loads_as_teacher(tmp_path):
  capture = Capture()
  workdir = str(tmp_path / "rocket")
  result = ktrain.train_and_evaluate(rocket_config(), workdir, progress=False, callbacks=[capture])
  train = result["train"]
  assert {"loss", "hint", "light_cross_entropy", "booster_cross_entropy", "train_accuracy",
          "booster_train_accuracy"} <= set(train)
  state = capture.state
  assert int(state.step) == 8 and "dense_0" not in state.booster_params
  (teacher,), (variables,) = ktrain.load_teachers(workdir)
  assert tuple(teacher.hidden) == LIGHT["hidden"] and teacher.num_classes == 10
  jax.tree.map(np.testing.assert_array_equal, variables["params"], state.params)
  test = kdata.load("digits").test
  images, labels = test.get(np.arange(len(test)))
  x = jnp.asarray(images, jnp.float32)
  booster = ktrain.build_model("mlp", BOOSTER, 10)
  mapping = rl.share_map(state.params, booster.init(jax.random.PRNGKey(0), x[:1])["params"], ("dense_0",))
  light_logits, booster_logits = rl.joint_forward(teacher, booster, state, x, mapping)
  np.testing.assert_array_equal(models.apply_model(teacher, variables, x).logits, light_logits)
  errors = int(np.sum(np.argmax(booster_logits, -1) != labels))
  assert result["extra"]["booster_test_errors"] == errors  # the booster is evaluated with the shared weights
  assert result["extra"]["booster_test_accuracy"] == pytest.approx(1 - errors / len(test), abs=1e-6)


def test_resumed_joint_run_is_bit_identical(tmp_path):
  kwargs = dict(model_kwargs={**LIGHT, "dropout_hidden": 0.2}, jitter=1, num_steps=10, checkpoint_every_steps=3,
                loss_booster_model_kwargs={**BOOSTER, "dropout_hidden": 0.2})
  straight, resumed = Capture(), Capture()
  ktrain.train_and_evaluate(rocket_config(**kwargs), str(tmp_path / "straight"), progress=False, callbacks=[straight])

  def crash(done, state):
    if done == 7:
      raise StopTraining("simulated crash after step 7")
  with pytest.raises(StopTraining):
    ktrain.train_and_evaluate(rocket_config(**kwargs), str(tmp_path / "resumed"), progress=False, callbacks=[crash])
  assert ckpt.load_teacher_variables(str(tmp_path / "resumed"))[2] == 6
  ktrain.train_and_evaluate(rocket_config(**kwargs), str(tmp_path / "resumed"), progress=False, callbacks=[resumed])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state), jax.device_get(resumed.state))


def test_step_compiles_once_and_no_block_moves_the_booster_differently(tmp_path):
  counts = {}
  finals = {}
  for block in (True, False):
    setup, program = ktrain.setup_stage(rocket_config(loss_gradient_block=block, loss_gamma=1.0),
                                 str(tmp_path / f"b{block}"))
    raw = program.make_step(setup)
    traces = []

    def step(state, batch, teacher_variables=(), raw=raw, traces=traces):
      traces.append(1)
      return raw(state, batch, teacher_variables)
    jitted = jax.jit(step, donate_argnums=(0,))
    state = parallel.replicate(program.init_state(setup), setup.mesh)
    for batch in ktrain.stage_batches(setup)(0):
      state, metrics = jitted(state, batch)
      assert float(metrics["nonfinite"][0]) == 0.0
    counts[block] = (len(traces), jitted._cache_size())
    finals[block] = jax.device_get(state)
  assert counts == {True: (1, 1), False: (1, 1)}
  # same start, same batches: only the hint's path into the booster differs
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), finals[True].booster_params,
                      finals[False].booster_params)
  assert max(jax.tree.leaves(diff)) > 0


def test_rocket_with_kd_reads_a_cached_teacher_and_param_share_off(tmp_path):
  teacher_dir = str(tmp_path / "teacher")
  teacher = rocket_config(method="supervised", model_kwargs=dict(BOOSTER), num_steps=4)
  teacher.loss = ml_collections.ConfigDict()
  ktrain.train_and_evaluate(teacher, teacher_dir, progress=False)
  result = ktrain.train_and_evaluate(rocket_config(loss_alpha=0.9, teacher_workdir=teacher_dir, num_steps=4),
                              str(tmp_path / "rkd"), progress=False)
  assert result["teacher_cached"] and result["train"]["kd"] > 0
  with pytest.raises(ValueError, match="uses no teacher"):
    ktrain.train_and_evaluate(rocket_config(teacher_workdir=teacher_dir), str(tmp_path / "x"), progress=False)
  setup, program = ktrain.setup_stage(rocket_config(loss_param_share=False), str(tmp_path / "ns"))
  state = program.init_state(setup)
  assert "dense_0" in state.booster_params  # nothing shared: the booster keeps its own first layer


# --- the paper's configs -----------------------------------------------------------------------------------


def test_paper_configs_build():
  paper = reproduce.load_paper("rocket_launching")
  assert paper.PROTOCOL[0] == "teacher" and set(paper.PROTOCOL) <= set(paper.VARIANTS)
  for variant in paper.VARIANTS:
    for scale in ("", ",full"):
      if variant == "student_rocket_bottom" and not scale:
        with pytest.raises(ValueError, match="full"):
          paper.get_config(variant)
        continue
      c = paper.get_config(variant + scale)
      assert c.batch_size % 8 == 0
      if c.method == "rocket_launching":
        assert isinstance(c.loss.gradient_block, bool) and isinstance(c.loss.param_share, bool)
  small = paper.get_config("student_rocket_no_block")
  assert small.loss.gradient_block is False and small.loss.shared_layers == ("dense_0",)
  assert small.loss.booster_model_kwargs.hidden == (512, 512, 512) and small.model_kwargs.hidden == (512, 64)
  for variant, epochs in (("student_rocket", (60, 120, 160)), ("student_rocket_bottom", (70, 130, 190))):
    c = paper.get_config(variant + ",full")
    assert ktrain.step_boundaries(c.lr_boundaries, c.lr_decay_factor, 200 * 390) == pytest.approx(
        {e * 390: 0.2 for e in epochs})
    assert (c.optimizer, c.learning_rate, c.momentum, c.weight_decay, c.num_epochs) == ("sgd", 0.1, 0.9, 5e-4, 200)


@pytest.mark.slow
def test_full_config_smoke(tmp_path):
  """``student_rocket,full`` (WRN-16-1 light, interval sharing, SGD, crops/flips) for 2 steps on tiny inputs.

  The booster is cut from WRN-40-1 to WRN-22-1 (3 blocks a group, so the interval scheme still leaves it blocks
  of its own) to keep the compile short; the WRN-40-1 sharing map is checked above without compiling.
  """
  rng = np.random.default_rng(0)
  path = str(tmp_path / "tiny_cifar.npz")
  np.savez(path, x_train=rng.integers(0, 255, (16, 8, 8, 3), np.uint8), y_train=np.arange(16) % 10,
           x_test=rng.integers(0, 255, (8, 8, 8, 3), np.uint8), y_test=np.arange(8) % 10)
  c = reproduce.load_paper("rocket_launching").get_config("student_rocket,full")
  c.dataset, c.batch_size, c.num_steps, c.eval_batch_size = path, 8, 2, 8
  assert c.loss.booster_model == "wrn_40_1" and c.model == "wrn_16_1" and c.jitter == 4 and c.hflip
  c.loss.booster_model_kwargs.depth = 22
  capture = Capture()
  result = ktrain.train_and_evaluate(c, str(tmp_path / "full"), progress=False, callbacks=[capture])
  assert result["steps"] == 2 and "booster_test_accuracy" in result["extra"]
  assert "conv1" not in capture.state.booster_params and "block3_2" in capture.state.booster_params
  assert "block1_0" in capture.state.booster_params  # its BatchNorms stay the booster's own
  assert "conv1" not in capture.state.booster_params["block1_0"]
