"""Hinton et al. (2015) soft targets: golden parity with RepDistiller, properties, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden
from jax.test_util import check_grads

from kdjax.methods import soft_targets


@pytest.mark.parametrize("name", [f"kd_T{t}_case{c}" for t in (4, 20) for c in (1, 2, 3)])
def test_matches_repdistiller_distill_kl(name):
  g = load_golden(name)
  temperature = float(g["T"])

  def batch_loss(student):
    return jnp.mean(soft_targets.soft_target_loss(student, g["teacher_logits"], temperature=temperature))

  loss, grad = jax.value_and_grad(batch_loss)(jnp.asarray(g["student_logits"]))
  np.testing.assert_allclose(loss, g["loss"], rtol=1e-4)
  np.testing.assert_allclose(grad, g["grad_student_logits"], rtol=1e-4,
                             atol=1e-6 * np.abs(g["grad_student_logits"]).max())


def _logits(key, shape=(4, 7), scale=3.0):
  return scale * jax.random.normal(jax.random.key(key), shape)


def test_zero_loss_and_gradient_when_student_equals_teacher():
  z = _logits(0)
  loss = soft_targets.soft_target_loss(z, z, temperature=3.0)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  grad = jax.grad(lambda s: soft_targets.soft_target_loss(s, z, temperature=3.0).sum())(z)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_gradient_is_t_times_probability_difference(temperature):
  # d/dz_s [T^2 KL(p_t || q_s)] = T (q_s - p_t): the T^2 factor undoes the 1/T^2 scaling (§2).
  zs, zt = _logits(1), _logits(2)
  grad = jax.grad(lambda s: soft_targets.soft_target_loss(s, zt, temperature=temperature).sum())(zs)
  expected = temperature * (jax.nn.softmax(zs / temperature) - jax.nn.softmax(zt / temperature))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_t_squared_keeps_gradient_magnitude_stable_at_high_temperature():
  zs, zt = _logits(3), _logits(4)
  def grad_norm(temperature, scaled):
    def f(s):
      loss = soft_targets.soft_target_loss(s, zt, temperature=temperature)
      return (loss if scaled else loss / temperature**2).sum()
    return float(jnp.linalg.norm(jax.grad(f)(zs)))
  # With T^2 the soft-term gradient is T-invariant for large T; without it, it falls as 1/T^2.
  assert grad_norm(50.0, True) / grad_norm(100.0, True) == pytest.approx(1.0, rel=1e-2)
  assert grad_norm(50.0, False) / grad_norm(100.0, False) == pytest.approx(4.0, rel=1e-2)


def test_high_temperature_limit_is_logit_matching():
  # Hinton §2: for T >> |z| and zero-mean logits, T^2-scaled distillation has the gradient
  # (z_s - z_t) / K, i.e. that of the logit regression 1/(2K) ||z_s - z_t||^2.
  zs, zt = _logits(5), _logits(6)
  zs, zt = zs - zs.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)
  num_classes = zs.shape[-1]
  grad = jax.grad(lambda s: soft_targets.soft_target_loss(s, zt, temperature=1000.0).sum())(zs)
  np.testing.assert_allclose(grad, (zs - zt) / num_classes, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
def test_finite_for_extreme_logits(temperature):
  zs = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]])
  zt = jnp.array([[-1e4, 1e4, 0.0], [1e4, -1e4, -5.0]])
  loss, grad = jax.value_and_grad(
      lambda s: soft_targets.soft_target_loss(s, zt, temperature=temperature).sum())(zs)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  assert loss > 0


def test_check_grads_jit_and_vmap():
  zs, zt = _logits(7, (3, 5), 1.0), _logits(8, (3, 5), 1.0)
  with jax.enable_x64(True):
    zs64, zt64 = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    check_grads(lambda s: soft_targets.soft_target_loss(s, zt64, temperature=2.0), (zs64,), order=2)
  eager = soft_targets.soft_target_loss(zs, zt, temperature=2.0)
  jitted = jax.jit(lambda s, t: soft_targets.soft_target_loss(s, t, temperature=2.0))(zs, zt)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  vmapped = jax.vmap(lambda s, t: soft_targets.soft_target_loss(s, t, temperature=2.0))(zs, zt)
  np.testing.assert_allclose(vmapped, eager, rtol=1e-6)


def test_distillation_loss_mixes_soft_and_masked_hard_terms():
  zs, zt = _logits(9, (3, 4)), _logits(10, (3, 4))
  labels = jnp.array([0, 2, 3])
  mask = jnp.array([1.0, 0.0, 1.0])
  got = soft_targets.distillation_loss(zs, zt, labels, temperature=4.0, alpha=0.9, label_mask=mask)
  soft = 16.0 * jnp.sum(jax.nn.softmax(zt / 4) * (jax.nn.log_softmax(zt / 4) - jax.nn.log_softmax(zs / 4)), -1)
  hard = -jax.nn.log_softmax(zs)[jnp.arange(3), labels]
  np.testing.assert_allclose(got, 0.9 * soft + 0.1 * hard * mask, rtol=1e-5)


def test_ensemble_means_by_hand():
  members = jnp.log(jnp.array([[[0.7, 0.2, 0.1]], [[0.1, 0.6, 0.3]]]))  # [2 members, 1, 3]
  arithmetic = jnp.exp(soft_targets.ensemble_log_probs(members, temperature=1.0, mean="arithmetic"))
  np.testing.assert_allclose(arithmetic, [[0.4, 0.4, 0.2]], rtol=1e-5)
  geometric = jnp.exp(soft_targets.ensemble_log_probs(members, temperature=1.0, mean="geometric"))
  unnormalised = np.sqrt(np.array([0.07, 0.12, 0.03]))
  np.testing.assert_allclose(geometric, [unnormalised / unnormalised.sum()], rtol=1e-5)
  # An ensemble of one teacher is that teacher.
  zs, zt = _logits(11, (2, 3)), _logits(12, (2, 3))
  one = soft_targets.distillation_loss(zs, zt[None], jnp.zeros(2, jnp.int32), temperature=2.0, alpha=1.0)
  np.testing.assert_allclose(one, soft_targets.soft_target_loss(zs, zt, temperature=2.0), rtol=1e-5)


def test_bad_inputs_name_what_was_expected():
  with pytest.raises(ValueError, match=r"student \(2, 3\) and teacher \(2, 4\)"):
    soft_targets.soft_target_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), temperature=1.0)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      soft_targets.soft_target_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=bad)
  with pytest.raises(ValueError, match="labels must have shape"):
    soft_targets.hard_label_loss(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="alpha"):
    soft_targets.make_objective(temperature=4.0, alpha=1.5, ensemble_mean="arithmetic")


def test_task_loss_is_masked_ce_at_alpha_0_else_distillation_loss():
  s = jax.random.normal(jax.random.key(0), (4, 5))
  t = jax.random.normal(jax.random.key(1), (4, 5))
  labels, mask = jnp.array([0, 1, 2, 3]), jnp.array([1.0, 0.0, 1.0, 1.0])
  ce = soft_targets.hard_label_loss(s, labels) * mask
  np.testing.assert_allclose(soft_targets.task_loss(s, t, labels, label_mask=mask, alpha=0.0, temperature=4.0), ce)
  np.testing.assert_allclose(  # alpha = 0 never reads the teacher
      soft_targets.task_loss(s, jnp.full_like(t, jnp.nan), labels, label_mask=mask, alpha=0.0, temperature=4.0), ce)
  np.testing.assert_allclose(
      soft_targets.task_loss(s, t, labels, label_mask=mask, alpha=0.9, temperature=4.0),
      soft_targets.distillation_loss(s, t, labels, label_mask=mask, alpha=0.9, temperature=4.0))
