"""FSP: matrices, per-pair and total losses (golden parity with RepDistiller), paper form, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_pairs_match_golden
from jax.test_util import check_grads

from kdjax.errors import UnknownNameError
from kdjax.methods import fsp


def _randn(seed, shape, dtype=np.float32):
  """Test inputs from NumPy: jax.random compiles a kernel per shape, seconds on a busy CPU."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("case", [1, 2, 3])
def test_fsp_loss_matches_repdistiller_golden(golden, case):
  g = golden(f"fsp_case{case}")
  n = int(g["num_maps"])
  students = [_nhwc(g[f"student_feats_{i}"]) for i in range(n)]
  teachers = [_nhwc(g[f"teacher_feats_{i}"]) for i in range(n)]

  @jax.jit
  def run(students):
    per_pair = [jnp.mean(fsp.fsp_distance(fsp.fsp_matrix(students[i], students[i + 1]),
                                          fsp.fsp_matrix(teachers[i], teachers[i + 1])))
                for i in range(n - 1)]
    total = lambda ss: jnp.mean(fsp.fsp_loss(ss, teachers))
    return per_pair, jax.value_and_grad(total)(students)

  per_pair, (loss, grads) = run(students)
  assert_pairs_match_golden(g, per_pair, loss, grads)


def test_fsp_matrix_is_position_averaged_gram_and_pools_the_larger_map():
  bottom = np.asarray(_randn(0, (2, 8, 8, 3)), np.float64)
  top = np.asarray(_randn(1, (2, 4, 4, 5)), np.float64)
  pooled_avg = bottom.reshape(2, 4, 2, 4, 2, 3).mean((2, 4))
  pooled_max = bottom.reshape(2, 4, 2, 4, 2, 3).max((2, 4))
  same = np.asarray(_randn(2, (2, 4, 4, 3)), np.float64)
  got = jax.jit(lambda b, t, s: (fsp.fsp_matrix(b, t), fsp.fsp_matrix(b, t, pool="max"),
                                 fsp.fsp_matrix(s, t), fsp.fsp_matrix(t, b)))(
                                     *(a.astype(np.float32) for a in (bottom, top, same)))
  ref = lambda b, t: np.einsum("nhwa,nhwb->nab", t, b) / 16
  assert got[0].shape == (2, 5, 3)
  np.testing.assert_allclose(got[0], ref(pooled_avg, top), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], ref(pooled_max, top), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[2], ref(same, top), rtol=1e-5, atol=1e-6)
  # a larger *top* is pooled too
  np.testing.assert_allclose(got[3], ref(top, pooled_avg), rtol=1e-5, atol=1e-6)


def test_permuting_channels_permutes_rows_and_columns():
  bottom, top = _randn(0, (2, 4, 4, 3)), _randn(1, (2, 4, 4, 5))
  perm_b, perm_t = np.array([2, 0, 1]), np.array([4, 1, 3, 0, 2])
  g, g_perm = jax.jit(lambda b, t: (fsp.fsp_matrix(b, t), fsp.fsp_matrix(b[..., perm_b], t[..., perm_t])))(
      bottom, top)
  np.testing.assert_allclose(g_perm, np.asarray(g)[:, perm_t][:, :, perm_b], rtol=1e-6)


def test_identical_nets_give_zero_loss_and_zero_grad():
  feats = [_randn(0, (2, 4, 4, 3)), _randn(1, (2, 4, 4, 4)), _randn(2, (2, 2, 2, 4))]
  for mode in ("code", "paper"):
    # both sides as arguments: a teacher closed over as a jit constant is constant-folded in another
    # summation order, which leaves ~1e-15 instead of an exact 0
    loss, grads = jax.jit(jax.value_and_grad(lambda s, t: fsp.fsp_loss(s, t, mode=mode).sum()))(feats, feats)
    assert float(loss) == 0.0
    assert not any(np.any(g) for g in grads)


def test_paper_form_sums_entries_and_weights_pairs():
  # equal spatial sizes, so the paper's max-pool default does not enter
  s = [_randn(0, (3, 4, 4, 2)), _randn(1, (3, 4, 4, 3)), _randn(2, (3, 4, 4, 4))]
  t = [_randn(3, (3, 4, 4, 2)), _randn(4, (3, 4, 4, 3)), _randn(5, (3, 4, 4, 4))]

  @jax.jit
  def run(s, t):
    pair = lambda i, mode: fsp.fsp_distance(fsp.fsp_matrix(s[i], s[i + 1]), fsp.fsp_matrix(t[i], t[i + 1]),
                                            mode=mode)
    return ([pair(i, m) for i in range(2) for m in ("code", "paper")],
            fsp.fsp_loss(s, t), fsp.fsp_loss(s, t, mode="paper", weights=[0.5, 2.0]))

  (c0, p0, c1, p1), code_total, paper_weighted = run(s, t)
  assert code_total.shape == (3,)
  np.testing.assert_allclose(p0, c0 * 3 * 2, rtol=1e-5)  # C_top * C_bot = 3 * 2
  np.testing.assert_allclose(p1, c1 * 4 * 3, rtol=1e-5)
  np.testing.assert_allclose(code_total, c0 + c1, rtol=1e-6)
  np.testing.assert_allclose(paper_weighted, 0.5 * p0 + 2.0 * p1, rtol=1e-6)


def test_paper_mode_max_pools_by_default():
  s = [_randn(0, (2, 4, 4, 2)), _randn(1, (2, 2, 2, 3))]
  t = [_randn(2, (2, 4, 4, 2)), _randn(3, (2, 2, 2, 3))]
  got = jax.jit(lambda s, t: (fsp.fsp_loss(s, t, mode="paper"), fsp.fsp_loss(s, t, mode="paper", pool="max"),
                              fsp.fsp_loss(s, t, mode="paper", pool="avg")))(s, t)
  np.testing.assert_allclose(got[0], got[1], rtol=1e-6)
  assert not np.allclose(got[0], got[2])


def test_grads_jit_and_vmap():
  s = [_randn(0, (2, 2, 2, 2)), _randn(1, (2, 2, 2, 3))]
  t = [_randn(2, (2, 2, 2, 2)), _randn(3, (2, 2, 2, 3))]
  for mode in ("code", "paper"):
    check_grads(jax.jit(lambda a, b: fsp.fsp_loss([a, b], t, mode=mode)), tuple(s), order=1, modes=["rev"])
  np.testing.assert_allclose(jax.jit(fsp.fsp_loss)(s, t), fsp.fsp_loss(s, t), rtol=1e-6)
  stack = lambda feats: [jnp.stack([f, f]) for f in feats]
  vmapped = jax.jit(jax.vmap(fsp.fsp_loss))(stack(s), stack(t))
  np.testing.assert_allclose(vmapped[1], fsp.fsp_loss(s, t), rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  a, b = jnp.ones((2, 4, 4, 8)), jnp.ones((2, 4, 4, 16))
  with pytest.raises(ValueError, match=r"index 1 the student has 8 channels.*teacher 16"):
    fsp.fsp_loss([a, a], [a, b])
  with pytest.raises(ValueError, match="2 student and 3 teacher"):
    fsp.fsp_loss([a, a], [a, a, a])
  with pytest.raises(ValueError, match=r">= 2.*1 student"):
    fsp.fsp_loss([a], [a])
  with pytest.raises(ValueError, match=r"integer ratio.*\(6, 6\) -> \(4, 4\)"):
    fsp.fsp_matrix(jnp.ones((2, 6, 6, 3)), a)
  with pytest.raises(ValueError, match=r"weights needs one value per pair \(1\); got 2"):
    fsp.fsp_loss([a, a], [a, a], weights=[1.0, 2.0])
  with pytest.raises(ValueError, match=r"same shape.*\(2, 8, 8\).*\(2, 16, 8\)"):
    fsp.fsp_distance(jnp.ones((2, 8, 8)), jnp.ones((2, 16, 8)))
  with pytest.raises(UnknownNameError, match="code, paper"):
    fsp.fsp_loss([a, a], [a, a], mode="mean")
  with pytest.raises(UnknownNameError, match="avg, max"):
    fsp.fsp_matrix(a, a, pool="min")
