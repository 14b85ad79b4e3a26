"""Ba & Caruana (2014) logit regression: golden parity with torchdistill's composition, properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden
from jax.test_util import check_grads

from kdjax.methods import mimic


@pytest.mark.parametrize("case", [1, 2, 3])
def test_twice_the_sum_equals_torchdistill_sum_mse(case):
  g = load_golden(f"logit_mse_torchdistill_case{case}")
  assert str(g["reduction"]) == "sum"

  def torchdistill_form(student):  # MSELoss(reduction='sum') = 2 * sum_n (1/2)||z_s - z_t||^2
    return 2.0 * jnp.sum(mimic.logit_regression_loss(student, g["teacher_logits"]))

  loss, grad = jax.value_and_grad(torchdistill_form)(jnp.asarray(g["student_logits"]))
  np.testing.assert_allclose(loss, g["loss"], rtol=1e-4)
  np.testing.assert_allclose(grad, g["grad_student_logits"], rtol=1e-4,
                             atol=1e-6 * np.abs(g["grad_student_logits"]).max())


def test_per_example_half_squared_error_by_hand():
  zs = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  zt = jnp.array([[1.0, 0.0, 1.0], [1.0, -1.0, 2.0]])
  np.testing.assert_allclose(mimic.logit_regression_loss(zs, zt), [4.0, 3.0])


def test_zero_and_gradient_properties():
  z = jax.random.normal(jax.random.key(0), (4, 6))
  np.testing.assert_allclose(mimic.logit_regression_loss(z, z), 0.0)
  zt = jax.random.normal(jax.random.key(1), (4, 6))
  grad = jax.grad(lambda s: mimic.logit_regression_loss(s, zt).sum())(z)
  np.testing.assert_allclose(grad, z - zt, rtol=1e-6)
  with jax.enable_x64(True):
    check_grads(lambda s: mimic.logit_regression_loss(s, np.asarray(zt, np.float64)),
                (np.asarray(z, np.float64),), order=2)
  np.testing.assert_allclose(jax.jit(mimic.logit_regression_loss)(z, zt), mimic.logit_regression_loss(z, zt))
  np.testing.assert_allclose(jax.vmap(mimic.logit_regression_loss)(z, zt), mimic.logit_regression_loss(z, zt))


def test_ensemble_target_is_the_averaged_logits():
  members = jnp.array([[[1.0, 3.0]], [[3.0, -1.0]]])
  np.testing.assert_allclose(mimic.ensemble_logits(members), [[2.0, 1.0]])
  np.testing.assert_allclose(mimic.mimic_loss(jnp.array([[2.0, 1.0]]), members), [0.0])


def test_shape_mismatch_is_explained():
  with pytest.raises(ValueError, match=r"student \(2, 5\) and teacher \(2, 6\)"):
    mimic.logit_regression_loss(jnp.zeros((2, 5)), jnp.zeros((2, 6)))
