"""Attention transfer: activation maps and losses (golden parity with both reference codes), pooling,
invariances, and gradient-based attention with double back-propagation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_pairs_match_golden
from jax.test_util import check_grads

from kdjax.errors import UnknownNameError
from kdjax.methods import attention_transfer as at
from kdjax.methods.objective import make_objective
from kdjax.models import ModelOutput


def _randn(seed, shape, dtype=np.float32):
  """Test inputs from NumPy: jax.random compiles a kernel per shape, seconds on a busy CPU."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _pairs(g):
  n = int(g["num_pairs"])
  return ([_nhwc(g[f"student_feats_{i}"]) for i in range(n)],
          [_nhwc(g[f"teacher_feats_{i}"]) for i in range(n)])


@pytest.mark.parametrize("name", ["at_repdistiller", "at_zagoruyko"])
@pytest.mark.parametrize("case", [1, 2, 3])
def test_attention_loss_matches_golden(golden, name, case):
  g = golden(f"{name}_case{case}")
  students, teachers = _pairs(g)
  p = float(g["p"])

  @jax.jit
  def run(students):
    per_pair = [jnp.mean(at.attention_loss(s, t, p=p)) for s, t in zip(students, teachers)]
    total = lambda ss: jnp.mean(at.attention_loss_pairs(ss, teachers, p=p))
    return per_pair, jax.value_and_grad(total)(students)

  per_pair, (loss, grads) = run(students)
  assert_pairs_match_golden(g, per_pair, loss, grads)


def test_attention_map_is_unit_norm_and_scale_invariant():
  f = np.asarray(_randn(0, (3, 4, 5, 6)))
  maps = jax.jit(jax.vmap(at.attention_map))(np.stack([f, 0.01 * f, 7.0 * f]))
  a = maps[0]
  assert a.shape == (3, 20)
  np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(maps[1], a, rtol=1e-5)
  np.testing.assert_allclose(maps[2], a, rtol=1e-5)
  # row-major over (H, W), the references' NCHW view(N, -1) order
  q = np.mean(f[1] ** 2, -1)
  np.testing.assert_allclose(a[1].reshape(4, 5), q / np.linalg.norm(q), rtol=1e-5)


def test_attention_map_odd_and_fractional_p_use_abs():
  f = np.asarray(_randn(0, (2, 3, 3, 4)), np.float64)
  maps = jax.jit(lambda f: [at.attention_map(f, p=p) for p in (1, 3.0, 1.5)])(f.astype(np.float32))
  for p, a in zip((1, 3.0, 1.5), maps):
    want = np.mean(np.abs(f) ** p, -1).reshape(2, -1)
    np.testing.assert_allclose(a, want / np.linalg.norm(want, axis=-1, keepdims=True), rtol=1e-5)
    assert np.all(np.asarray(a) >= 0)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_identical_features_give_zero_loss_and_zero_grad_and_dead_maps_stay_finite(mode):
  f = _randn(0, (2, 4, 4, 3))
  zeros = jnp.zeros_like(f)

  @jax.jit
  def run(f):
    same = jax.value_and_grad(lambda s: at.attention_loss(s, f, mode=mode).sum())(f)
    dead = jax.value_and_grad(lambda s: at.attention_loss(s, zeros, mode=mode).sum())(zeros)
    return same, dead, at.attention_map(zeros)

  (loss, grad), (dead_loss, dead_grad), dead_map = run(f)
  assert float(loss) == 0.0
  assert np.all(np.isfinite(grad)) and np.allclose(grad, 0.0)
  np.testing.assert_array_equal(dead_map, 0.0)
  assert float(dead_loss) == 0.0 and np.all(np.isfinite(dead_grad))


def test_paper_mode_is_the_non_squared_norm_over_the_map_size():
  s = _randn(0, (3, 4, 4, 2))
  t = _randn(1, (3, 4, 4, 5))
  code, paper = jax.jit(lambda s, t: (at.attention_loss(s, t), at.attention_loss(s, t, mode="paper")))(s, t)
  assert code.shape == paper.shape == (3,)
  # code: mean_hw Δ² = ‖Δ‖²/16; paper: ‖Δ‖/16 (H·W = 16)
  np.testing.assert_allclose(paper, np.sqrt(code * 16) / 16, rtol=1e-5)


def test_paper_mode_scale_by_hand():
  """The paper's (β/2)·‖a_s − a_t‖₂ with β divided by H·W (and the batch size, by the batch mean)."""
  def one_hot_map(h, w, i, j):  # a single active position: the normalised map is that one-hot vector
    f = np.zeros((1, h, w, 3), np.float32)
    f[0, i, j, :] = 2.0
    return f
  # example 0, 2×2 maps: one-hot at (0, 0) vs one-hot at (0, 1): ‖Δ‖ = √2, H·W = 4
  # example 1, 2×2 maps: all-equal map (1/2 everywhere) vs one-hot at (0, 0): Δ = (−1/2, 1/2, 1/2, 1/2), ‖Δ‖ = 1
  s = np.concatenate([one_hot_map(2, 2, 0, 0), np.ones((1, 2, 2, 3), np.float32)])
  t = np.concatenate([one_hot_map(2, 2, 0, 1), one_hot_map(2, 2, 0, 0)])
  # 4×4 maps: one-hot at (0, 0) vs (3, 3): ‖Δ‖ = √2, H·W = 16
  s4, t4 = one_hot_map(4, 4, 0, 0), one_hot_map(4, 4, 3, 3)
  paper, code, paper4 = jax.jit(lambda s, t, s4, t4: (
      at.attention_loss(s, t, mode="paper"), at.attention_loss(s, t), at.attention_loss(s4, t4, mode="paper")))(
          s, t, s4, t4)
  np.testing.assert_allclose(paper, [np.sqrt(2) / 4, 1 / 4], rtol=1e-6)
  np.testing.assert_allclose(code, [2 / 4, 1 / 4], rtol=1e-6)
  np.testing.assert_allclose(paper4, [np.sqrt(2) / 16], rtol=1e-6)
  # the objective weights it by β/2 (paper) and adds the task loss; zero logits: CE = log(10)
  objective = make_objective("attention_transfer", {"student_layers": ("a",), "teacher_layers": ("a",),
                                                    "beta": 1000.0, "mode": "paper"})
  logits = jnp.zeros((2, 10))
  batch = {"label": jnp.zeros(2, jnp.int32), "label_mask": jnp.ones(2)}
  loss, extras = objective.fn(ModelOutput(logits, {"a": s}, {}), ModelOutput(logits, {"a": t}, {}), batch, None)
  np.testing.assert_allclose(loss, np.log(10) + 500 * np.array([np.sqrt(2) / 4, 1 / 4]), rtol=1e-5)
  np.testing.assert_allclose(extras["attention"], [np.sqrt(2) / 4, 1 / 4], rtol=1e-6)


def test_larger_map_is_average_pooled_like_adaptive_avg_pool():
  s = _randn(0, (2, 8, 8, 3))
  t = _randn(1, (2, 4, 4, 5))
  pooled = s.reshape(2, 4, 2, 4, 2, 3).mean((2, 4))
  got = jax.jit(lambda s, t, pooled: [at.attention_loss(s, t), at.attention_loss(pooled, t),
                                      at.attention_loss(t, s), at.attention_loss(t, pooled)])(s, t, pooled)
  np.testing.assert_allclose(got[0], got[1], rtol=1e-6)
  # and the teacher side, when the teacher is larger
  np.testing.assert_allclose(got[2], got[3], rtol=1e-6)


def test_grads_jit_and_vmap():
  s = _randn(0, (2, 2, 2, 3))
  t = _randn(1, (2, 2, 2, 2))
  for mode in ("code", "paper"):
    check_grads(jax.jit(lambda a: at.attention_loss(a, t, mode=mode)), (s,), order=1, modes=["rev"])
  jitted = jax.jit(at.attention_loss_pairs, static_argnames=("p", "mode"))
  np.testing.assert_allclose(jitted([s], [t]), at.attention_loss_pairs([s], [t]), rtol=1e-6)
  vmapped = jax.jit(jax.vmap(at.attention_loss))(jnp.stack([s, s]), jnp.stack([t, t]))
  np.testing.assert_allclose(vmapped[1], at.attention_loss(s, t), rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  f = jnp.ones((2, 4, 4, 3))
  with pytest.raises(ValueError, match="p must be > 0, got 0"):
    at.attention_map(f, p=0)
  with pytest.raises(ValueError, match="p must be > 0, got -1"):
    at.attention_loss(f, f, p=-1)
  with pytest.raises(ValueError, match=r"integer ratio.*\(6, 6\) -> \(4, 4\)"):
    at.attention_loss(jnp.ones((2, 6, 6, 3)), f)
  with pytest.raises(ValueError, match=r"batch sizes.*\(2, 4, 4, 3\).*\(3, 4, 4, 3\)"):
    at.attention_loss(f, jnp.ones((3, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"NHWC.*\(2, 16\)"):
    at.attention_loss(jnp.ones((2, 16)), f)
  with pytest.raises(ValueError, match="1 student and 2 teacher"):
    at.attention_loss_pairs([f], [f, f])
  with pytest.raises(UnknownNameError, match="code, paper"):
    at.attention_loss(f, f, mode="sum")


# --- gradient-based attention -------------------------------------------------------------------------

def _tiny_net(seed, hidden=5, classes=3):
  """A 2-layer tanh MLP on 4x4x1 images (smooth, so finite differences are meaningful)."""
  return {"w1": _randn(seed, (16, hidden)) * 0.5, "b1": jnp.zeros(hidden),
          "w2": _randn(seed + 100, (hidden, classes)) * 0.5, "b2": jnp.zeros(classes)}


def _per_example_ce(params, x, labels):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def _setup(dtype=jnp.float32):
  x = _randn(3, (3, 4, 4, 1), dtype)
  labels = jnp.array([0, 2, 1])
  cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
  return cast(_tiny_net(1)), cast(_tiny_net(2)), x, labels


def test_input_gradient_is_per_example():
  params, _, x, labels = _setup()
  loss_fn = lambda p, x: _per_example_ce(p, x, labels)

  @jax.jit
  def run(params, x):
    one = jax.grad(lambda xi: _per_example_ce(params, xi[None], labels[1:2])[0])(x[1])
    return at.input_gradient(loss_fn, params, x), one

  j, one = run(params, x)
  assert j.shape == x.shape
  np.testing.assert_allclose(j[1], one, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"scalar or per-example.*\(3, 3\)"):
    at.input_gradient(lambda p, x: jnp.zeros((x.shape[0], 3)) * x.sum(), params, x)


def test_gradient_attention_double_backprop_jit_and_teacher_frozen():
  student, teacher, x, labels = _setup()
  loss_fn = lambda p, x: _per_example_ce(p, x, labels)

  def total(student, teacher):
    task = loss_fn(student, x)
    return jnp.mean(task + 0.5 * at.gradient_attention_loss(loss_fn, student, loss_fn, teacher, x))

  grad_s, grad_t = jax.jit(jax.grad(total, argnums=(0, 1)))(student, teacher)
  assert all(np.any(g) for g in jax.tree.leaves(grad_s))
  assert not any(np.any(g) for g in jax.tree.leaves(grad_t))  # J_T is under stop_gradient
  # the attention term itself contributes (double backprop), not only the task loss
  task_only = jax.grad(lambda s: jnp.mean(loss_fn(s, x)))(student)
  assert not np.allclose(grad_s["w1"], task_only["w1"])
  same = jax.jit(lambda t: at.gradient_attention_loss(loss_fn, t, loss_fn, t, x))(teacher)
  np.testing.assert_allclose(same, 0.0)


def test_gradient_attention_and_flip_losses_match_finite_differences():
  with jax.enable_x64(True):
    student, teacher, x, labels = _setup(jnp.float64)
    loss_fn = lambda p, x: _per_example_ce(p, x, labels)
    grad_att = jax.jit(lambda s: at.gradient_attention_loss(loss_fn, s, loss_fn, teacher, x).sum())
    flip = jax.jit(lambda s: at.flip_invariance_loss(loss_fn, s, x).sum())
    direction = jax.tree.map(lambda a: _randn(9, a.shape, a.dtype), student)
    for fn in (grad_att, flip):
      check_grads(fn, (student,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)
      # and one explicit central difference along a random direction, against the jitted double backprop
      step = lambda c: fn(jax.tree.map(lambda a, d: a + c * d, student, direction))
      fd = (step(1e-6) - step(-1e-6)) / 2e-6
      grads = jax.jit(jax.grad(fn))(student)
      analytic = sum(np.vdot(grads[k], direction[k]) for k in student)
      np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_flip_invariance_zero_for_a_flip_invariant_loss():
  x = _randn(0, (2, 4, 4, 3))
  w = _randn(1, (4, 3))

  def symmetric(params, x):  # sums over W first, so L(flip(x)) = L(x)
    return jnp.tanh(jnp.einsum("nhwc,hc->n", x, params) + jnp.sum(x, axis=(1, 2, 3)) ** 2)

  # only the first column matters: J(x) lives in column 0, flip(J(flip(x))) in the last one
  asymmetric = lambda p, x: jnp.sum(x[:, :, 0, :] ** 2, axis=(1, 2)) * p.sum()
  zero, positive = jax.jit(lambda w, x: (at.flip_invariance_loss(symmetric, w, x),
                                         at.flip_invariance_loss(asymmetric, w, x)))(w, x)
  np.testing.assert_allclose(zero, 0.0, atol=1e-6)
  assert np.all(positive > 0)
  with pytest.raises(ValueError, match="non-batch axis"):
    at.flip_invariance_loss(symmetric, w, x, axis=0)
