"""FitNets: hint loss (golden parity with RepDistiller), regressors, stage-2 KD without τ², λ annealing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax.errors import UnknownNameError
from kdjax.methods import fitnets


def _randn(seed, shape, dtype=np.float32):
  """Test inputs from NumPy: jax.random compiles a kernel per shape, seconds on a busy CPU."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _assert_grad_close(got, want_nchw):
  want = np.transpose(want_nchw, (0, 2, 3, 1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("case", [1, 2, 3])
def test_hint_loss_matches_repdistiller_golden(golden, case):
  g = golden(f"fitnet_hint_case{case}")
  s, t = _nhwc(g["student_feat"]), _nhwc(g["teacher_feat"])

  def batch_loss(s):
    return jnp.mean(fitnets.hint_loss(s, t))

  loss, grad = jax.value_and_grad(batch_loss)(s)
  np.testing.assert_allclose(loss, g["loss"], rtol=1e-4)
  _assert_grad_close(grad, g["grad_student_feat"])


def test_hint_loss_is_per_example_and_paper_form_is_half_sum():
  s = _randn(0, (3, 4, 4, 5))
  t = _randn(1, (3, 4, 4, 5))
  mean = fitnets.hint_loss(s, t)
  paper = fitnets.hint_loss(s, t, reduction="paper")
  assert mean.shape == paper.shape == (3,)
  np.testing.assert_allclose(mean[1], np.mean((np.asarray(s[1]) - np.asarray(t[1])) ** 2), rtol=1e-6)
  np.testing.assert_allclose(paper, mean * (4 * 4 * 5) / 2, rtol=1e-5)


def test_hint_loss_zero_with_zero_grad_when_equal():
  s = _randn(0, (2, 3, 3, 4))
  for reduction in ("mean", "paper"):
    loss, grad = jax.value_and_grad(lambda a: fitnets.hint_loss(a, s, reduction=reduction).sum())(s)
    assert float(loss) == 0.0
    assert not np.any(grad)


def test_hint_loss_grads_jit_and_vmap():
  s = _randn(0, (2, 2, 2, 3))
  t = _randn(1, (2, 2, 2, 3))
  for reduction in ("mean", "paper"):
    check_grads(jax.jit(lambda a: fitnets.hint_loss(a, t, reduction=reduction)), (s,), order=1, modes=["rev"])
  np.testing.assert_allclose(jax.jit(fitnets.hint_loss)(s, t), fitnets.hint_loss(s, t), rtol=1e-6)
  stacked_s, stacked_t = jnp.stack([s, t]), jnp.stack([t, s])
  vmapped = jax.jit(jax.vmap(fitnets.hint_loss))(stacked_s, stacked_t)
  np.testing.assert_allclose(vmapped[0], fitnets.hint_loss(s, t), rtol=1e-6)


def test_hint_loss_shape_mismatch_names_layers_and_shapes():
  s, t = jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 4, 4, 16))
  with pytest.raises(ValueError, match=r"'student:stage2'.*'teacher:stage2'.*\(2, 4, 4, 8\).*\(2, 4, 4, 16\)"):
    fitnets.hint_loss(s, t, names=("student:stage2", "teacher:stage2"))
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 8\).*\(2, 4, 4, 16\)"):
    fitnets.hint_loss(s, t)
  with pytest.raises(UnknownNameError, match="mean, paper"):
    fitnets.hint_loss(s, s, reduction="sum")


def test_paper_regressor_valid_kernel_maps_guided_onto_hint():
  guided, hint = (2, 8, 7, 4), (2, 5, 5, 6)
  x = _randn(0, guided)
  for activation in ("relu", "maxout", "none"):
    reg = fitnets.make_regressor(guided, hint, activation=activation, maxout_pieces=3)
    assert reg.kernel_size == (4, 3) and reg.padding == "VALID" and not reg.use_batchnorm
    # shapes only (eval_shape): running three Flax inits eagerly costs seconds on a busy CPU
    variables = jax.eval_shape(reg.init, jax.random.key(1), x)
    assert jax.eval_shape(reg.apply, variables, x).shape == hint
    pieces = 3 if activation == "maxout" else 1
    assert variables["params"]["conv"]["kernel"].shape == (4, 3, 4, 6 * pieces)
  # the regressed guided layer plugs straight into the hint loss, with gradients to the regressor
  reg = fitnets.make_regressor(guided, hint, activation="relu")
  variables = jax.jit(reg.init)(jax.random.key(1), x)
  t = _randn(2, hint)

  @jax.jit
  def run(v):
    out = reg.apply(v, x)
    return out, jax.grad(lambda v: fitnets.hint_loss(reg.apply(v, x), t).mean())(v)

  out, grads = run(variables)
  assert out.shape == hint and float(out.min()) >= 0.0
  assert np.any(grads["params"]["conv"]["kernel"])


def test_maxout_regressor_is_max_over_consecutive_pieces():
  x = _randn(0, (2, 5, 5, 3))
  maxout = fitnets.ConvRegressor(features=4, kernel_size=(2, 2), activation="maxout", maxout_pieces=2)
  linear = fitnets.ConvRegressor(features=8, kernel_size=(2, 2), activation="none")

  @jax.jit
  def run(x):
    variables = maxout.init(jax.random.key(1), x)  # the same parameter tree as `linear`
    return maxout.apply(variables, x), linear.apply(variables, x)

  got, linear_out = run(x)
  np.testing.assert_allclose(got, linear_out.reshape(2, 4, 4, 4, 2).max(-1), rtol=1e-6)


def test_same_regressor_has_batchnorm_and_keeps_size():
  x = _randn(0, (2, 4, 4, 8))
  for k in (1, 3):
    reg = fitnets.make_regressor((2, 4, 4, 8), (4, 4, 16), mode="same", kernel_size=k)
    variables = jax.eval_shape(reg.init, jax.random.key(1), x)
    out, state = jax.eval_shape(lambda v: reg.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    assert out.shape == (2, 4, 4, 16)
    assert variables["params"]["conv"]["kernel"].shape == (k, k, 8, 16)
    assert "bias" not in variables["params"]["conv"]  # BatchNorm follows the conv
    assert state["batch_stats"]["bn"]["mean"].shape == (16,)


def test_regressor_errors_name_shapes():
  with pytest.raises(ValueError, match=r"'s:g'.*'t:h'.*\(2, 4, 4, 8\).*\(2, 6, 6, 8\)"):
    fitnets.make_regressor((2, 4, 4, 8), (2, 6, 6, 8), names=("s:g", "t:h"))
  with pytest.raises(ValueError, match=r"equal H, W.*\(8, 8, 4\).*\(4, 4, 4\)"):
    fitnets.make_regressor((8, 8, 4), (4, 4, 4), mode="same")
  with pytest.raises(UnknownNameError, match="maxout, none, relu"):
    fitnets.make_regressor((8, 8, 4), (4, 4, 4), activation="tanh")
  with pytest.raises(ValueError, match="kernel_size must be 1 or 3"):
    fitnets.make_regressor((4, 4, 4), (4, 4, 4), mode="same", kernel_size=5)


def _ref_kd_no_t2(zs, zt, y, tau, lam):
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  hard = -log_softmax(zs)[np.arange(len(y)), y]
  p_t = np.exp(log_softmax(zt / tau))
  soft = -(p_t * log_softmax(zs / tau)).sum(-1)
  return hard + lam * soft


def test_kd_loss_no_t2_formula_and_label_forms():
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(4, 6)).astype(np.float32) * 3, rng.normal(size=(4, 6)).astype(np.float32) * 3
  y = np.array([0, 5, 2, 2])
  got = fitnets.kd_loss_no_t2(zs, zt, y, temperature=3.0, soft_weight=4.0)
  assert got.shape == (4,)
  np.testing.assert_allclose(got, _ref_kd_no_t2(zs.astype(np.float64), zt.astype(np.float64), y, 3.0, 4.0),
                             rtol=1e-5)
  one_hot = jax.nn.one_hot(y, 6)
  np.testing.assert_allclose(fitnets.kd_loss_no_t2(zs, zt, one_hot, soft_weight=4.0), got, rtol=1e-6)


def test_kd_loss_no_t2_has_no_temperature_squared():
  # d/dz_s of λ·H(P_T^τ, P_S^τ) is (λ/τ)(P_S^τ - P_T^τ): a τ² factor would make it λτ(...).
  zs = _randn(0, (3, 5))
  zt = _randn(1, (3, 5))
  y = jnp.array([0, 1, 2])
  tau, lam = 3.0, 2.0
  grad = jax.jit(jax.grad(lambda z: fitnets.kd_loss_no_t2(z, zt, y, temperature=tau, soft_weight=lam,
                                                          hard_weight=0.0).sum()))(zs)
  want = lam / tau * (jax.nn.softmax(zs / tau) - jax.nn.softmax(zt / tau))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_kd_loss_no_t2_with_annealed_weight_under_jit():
  zs = _randn(0, (3, 5))
  zt = _randn(1, (3, 5))
  y = jnp.array([0, 1, 2])

  @jax.jit
  def loss(step):
    lam = fitnets.annealed_weight(step, decay_steps=10)
    return fitnets.kd_loss_no_t2(zs, zt, y, soft_weight=lam)

  np.testing.assert_allclose(loss(5), fitnets.kd_loss_no_t2(zs, zt, y, soft_weight=2.5), rtol=1e-6)


def test_kd_loss_no_t2_bad_inputs():
  z = jnp.zeros((2, 3))
  y = jnp.array([0, 1])
  with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
    fitnets.kd_loss_no_t2(z, z, y, temperature=0.0, soft_weight=1.0)
  with pytest.raises(ValueError, match="soft_weight must be >= 0"):
    fitnets.kd_loss_no_t2(z, z, y, soft_weight=-1.0)
  with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
    fitnets.kd_loss_no_t2(z, jnp.zeros((2, 4)), y, soft_weight=1.0)


def test_annealed_weight_is_linear_then_flat():
  steps = jnp.array([0, 250, 500, 800])
  np.testing.assert_allclose(fitnets.annealed_weight(steps, decay_steps=500), [4.0, 2.5, 1.0, 1.0])
  np.testing.assert_allclose(
      jax.jit(lambda s: fitnets.annealed_weight(s, start=5.0, end=0.0, decay_steps=4))(1), 3.75)
  with pytest.raises(ValueError, match="decay_steps must be > 0"):
    fitnets.annealed_weight(0, decay_steps=0)


def test_one_stage_objective_trains_repdistillers_convreg_on_batch_statistics():
  """RepDistiller's ConvReg (3x3 conv, BN, ReLU): BN scale/bias are trained regressor parameters and the
  regressor normalises with the batch's statistics (it is training-only, so no running statistics)."""
  from kdjax.methods.objective import make_objective
  from kdjax.models.features import ModelOutput

  objective = make_objective("fitnets_one_stage", {})
  guided = jax.random.normal(jax.random.key(0), (4, 6, 6, 3)) * 5.0 + 3.0
  hint = jax.nn.relu(jax.random.normal(jax.random.key(1), (4, 6, 6, 5)))
  student = ModelOutput(logits=jnp.zeros((4, 10)), features={"stage2": guided}, batch_stats={})
  teacher = ModelOutput(logits=jnp.zeros((4, 10)), features={"stage2": hint}, batch_stats={})
  aux = objective.init_aux(jax.random.key(2), student, teacher)
  assert set(aux) == {"conv", "bn"} and set(aux["bn"]) == {"scale", "bias"} and "bias" not in aux["conv"]
  batch = {"label": jnp.zeros((4,), jnp.int32), "label_mask": jnp.ones((4,))}
  loss, _ = objective.fn(student, teacher, batch, None, aux=aux)
  # Batch statistics: at initialisation (scale 1, bias 0) the regressor output is relu(x_hat).
  reg = fitnets.make_regressor(guided.shape, hint.shape, mode="same", kernel_size=3)
  mapped = fitnets._apply_regressor(reg, aux, guided)
  conv_out = jax.lax.conv_general_dilated(guided, aux["conv"]["kernel"], (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  mean, var = conv_out.mean((0, 1, 2)), conv_out.var((0, 1, 2))
  np.testing.assert_allclose(mapped, jax.nn.relu((conv_out - mean) / jnp.sqrt(var + 1e-5)), rtol=1e-4, atol=1e-4)
  expected = 100.0 * fitnets.hint_loss(mapped, hint, reduction="mean") + 2.302585
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  grads = jax.grad(lambda a: objective.fn(student, teacher, batch, None, aux=a)[0].mean())(aux)
  assert float(jnp.abs(grads["bn"]["scale"]).sum()) > 0
