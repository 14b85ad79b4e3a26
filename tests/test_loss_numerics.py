"""The losses' numerics across their inputs' range (issue 12): masked classes, float16, out-of-range labels and
hyperparameters, huge features, empty batches. Each case gave NaN, zeros, a wrapped class or an exception."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax.methods import attention_transfer as at
from kdjax.methods import fitnets, fsp, mimic
from kdjax.methods import soft_targets as st


def brute_force_kl(student, teacher, temperature):
  """``T² · Σ_c p_t (log p_t − log p_s)`` in float64 over the classes the teacher gives probability > 0."""
  s = np.asarray(student, np.float64) / temperature
  t = np.asarray(teacher, np.float64) / temperature
  log_ps = s - np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1, keepdims=True)) - s.max(-1, keepdims=True)
  finite = np.isfinite(t)
  t_max = np.max(np.where(finite, t, -np.inf), -1, keepdims=True)
  log_z = t_max + np.log(np.sum(np.where(finite, np.exp(np.where(finite, t, 0) - t_max), 0), -1, keepdims=True))
  log_pt = np.where(finite, t - log_z, -np.inf)
  terms = np.where(finite, np.exp(log_pt) * (np.where(finite, log_pt, 0) - log_ps), 0)
  return temperature**2 * terms.sum(-1)


def test_a_masked_teacher_class_contributes_zero_and_keeps_value_and_gradient_finite():
  student = jnp.array([[0.5, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 1.0]])
  teacher = jnp.array([[0.0, -jnp.inf, 1.0, 2.0], [-jnp.inf, -jnp.inf, 5.0, 0.0]])
  loss = st.soft_target_loss(student, teacher, temperature=2.0)
  np.testing.assert_allclose(loss, brute_force_kl(student, teacher, 2.0), rtol=1e-5)
  grad = jax.grad(lambda s: st.soft_target_loss(s, teacher, temperature=2.0).sum())(student)
  assert np.all(np.isfinite(grad))
  members = jnp.stack([teacher, jnp.where(jnp.isfinite(teacher), teacher + 1.0, -jnp.inf)])
  ensemble = st.distillation_loss(student, members, jnp.array([2, 3]), temperature=2.0, alpha=0.5)
  assert np.all(np.isfinite(ensemble))


def test_float16_logits_at_a_low_temperature_do_not_overflow():
  student = jnp.array([[60.0, -60.0, 10.0], [1.0, 2.0, 3.0]], jnp.float16)
  teacher = jnp.array([[-50.0, 40.0, 0.0], [3.0, 2.0, 1.0]], jnp.float16)
  for temperature in (0.01, 1.0, 20.0):
    loss = st.soft_target_loss(student, teacher, temperature=temperature)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, brute_force_kl(student, teacher, temperature), rtol=1e-4)
  hard = st.hard_label_loss(student, jnp.array([1, 0]))
  np.testing.assert_allclose(hard, [120.0, 2.4076059], rtol=1e-4)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"alpha \(the soft-term weight\) must be a number in \[0, 1\], got"):
    st.distillation_loss(z, z, jnp.array([0, 1]), temperature=4.0, alpha=alpha)
  with pytest.raises(ValueError, match="alpha"):
    st.make_objective(temperature=4.0, alpha=alpha, ensemble_mean="arithmetic")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperatures_are_refused_eagerly(temperature):
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="temperature must be"):
    st.soft_target_loss(z, z, temperature=temperature)


@pytest.mark.parametrize("bad", [-1, 3, 255])
def test_labels_outside_the_classes_are_refused_eagerly_and_are_nan_under_jit(bad):
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, bad])
  with pytest.raises(ValueError, match=rf"labels\[1\] = {bad} is not a class id in \[0, 3\)"):
    st.hard_label_loss(logits, labels)
  with pytest.raises(ValueError, match=rf"kd_loss_no_t2 labels\[1\] = {bad} is not a class id"):
    fitnets.kd_loss_no_t2(logits, logits, labels, soft_weight=1.0)
  traced = jax.jit(st.hard_label_loss)(logits, labels)
  assert np.isfinite(traced[0]) and np.isnan(traced[1])  # never a silently wrapped class
  assert np.isnan(jax.jit(lambda z, y: fitnets.kd_loss_no_t2(z, z, y, soft_weight=1.0))(logits, labels)[1])
  masked = st.distillation_loss(logits, logits, labels, temperature=2.0, alpha=0.5, label_mask=jnp.array([1, 0]))
  assert np.all(np.isfinite(masked))  # an unlabelled example's label is never read


def test_float_labels_are_refused_not_truncated():
  with pytest.raises(ValueError, match="labels must be integer class ids, got dtype float32"):
    st.hard_label_loss(jnp.zeros((2, 3)), jnp.array([0.0, 1.7]))


def test_attention_map_of_huge_or_float16_features_equals_the_map_of_the_unscaled_ones():
  feat = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  reference = at.attention_map(feat)
  for scaled in (feat * 1e10, feat * 1e-10, (feat * 1e3).astype(jnp.float16)):
    np.testing.assert_allclose(at.attention_map(scaled), reference, rtol=2e-3, atol=1e-6)
  teacher = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 5))
  grad = jax.grad(lambda f: at.attention_loss(f, teacher).sum())(feat)
  grad_huge = jax.grad(lambda f: at.attention_loss(f, teacher).sum())(feat * 1e10)
  assert np.abs(grad).max() > 0
  np.testing.assert_allclose(grad_huge * 1e10, grad, rtol=1e-3, atol=1e-6 * np.abs(grad).max())
  check_grads(lambda f: at.attention_loss(f, teacher, mode="code"), (feat,), order=1, modes=["rev"],
              atol=1e-2, rtol=1e-2)
  np.testing.assert_allclose(jax.jit(at.attention_map)(feat), reference, rtol=1e-6)
  assert np.all(at.attention_map(jnp.zeros((1, 2, 2, 3))) == 0)  # a dead map stays zero, not NaN


def test_every_loss_accepts_an_empty_batch():
  z, y, f = jnp.zeros((0, 10)), jnp.zeros((0,), jnp.int32), jnp.zeros((0, 4, 4, 3))
  results = {
      "soft_target_loss": st.soft_target_loss(z, z, temperature=4.0),
      "distillation_loss": st.distillation_loss(z, z, y, temperature=4.0, alpha=0.5),
      "hard_label_loss": st.hard_label_loss(z, y),
      "mimic_loss": mimic.mimic_loss(z, z),
      "attention_loss": at.attention_loss(f, f),
      "attention_loss paper": at.attention_loss(f, f, mode="paper"),
      "hint_loss": fitnets.hint_loss(f, f),
      "kd_loss_no_t2": fitnets.kd_loss_no_t2(z, z, y, soft_weight=1.0),
      "fsp_loss": fsp.fsp_loss([f, f], [f, f]),
  }
  for name, value in results.items():
    assert jnp.shape(value)[:1] == (0,) or jnp.shape(value) == (), name
  assert at.attention_map(f).shape == (0, 16)


def test_squared_error_losses_of_float16_inputs_do_not_overflow():
  a = jnp.full((2, 2, 2, 3), 300.0, jnp.float16)
  b = jnp.zeros((2, 2, 2, 3), jnp.float16)
  np.testing.assert_allclose(fitnets.hint_loss(a, b), [90000.0, 90000.0])  # 300² overflows float16 (max 65504)
  np.testing.assert_allclose(mimic.logit_regression_loss(a[:, 0, 0], b[:, 0, 0]), [135000.0, 135000.0])
  np.testing.assert_allclose(fsp.fsp_matrix(a, a)[0, 0, 0], 90000.0)
  np.testing.assert_allclose(fsp.fsp_distance(fsp.fsp_matrix(a, a), fsp.fsp_matrix(b, b)), [8.1e9, 8.1e9], rtol=1e-6)
