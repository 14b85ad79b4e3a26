"""DarkRank losses: golden parity with RKD's HardDarkRank, brute-force Plackett-Luce references, transforms."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden
from jax.test_util import check_grads

from kdjax import models
from kdjax.methods import darkrank as dr

# --- NumPy references, written from the formulas (float64, loops, no shared code) ------------------------------


def np_scores(emb, query, *, score, alpha=3.0, beta=3.0, scale=3.5, power=2.0, eps=1e-12):
  """Scores of every example as a candidate for ``query``."""
  x = np.asarray(emb, np.float64)
  if score == "code":
    x = math.sqrt(scale) * x / np.linalg.norm(x, axis=1, keepdims=True)
    return -np.maximum(np.sum((x - x[query]) ** 2, axis=1), eps) ** power
  return -alpha * np.sqrt(np.maximum(np.sum((x - x[query]) ** 2, axis=1), eps)) ** beta


def np_perm_prob(scores, order):
  """The Plackett-Luce probability of ``order`` as the product of its stage-wise choices."""
  prob = 1.0
  for i, item in enumerate(order):
    prob *= math.exp(scores[item]) / sum(math.exp(scores[j]) for j in order[i:])
  return prob


def np_queries(batch, queries):
  return range(batch) if queries == "all" else range(batch // 2)


def np_candidates(teacher_scores, query, length):
  """Teacher's top ``length`` others, best first, by a stable sort of all indices except the query."""
  others = [i for i in range(len(teacher_scores)) if i != query]
  return sorted(others, key=lambda i: -teacher_scores[i])[:length]


def np_soft(student, teacher, *, length, queries="all", **kw):
  losses = []
  for q in np_queries(len(student), queries):
    s, t = np_scores(student, q, **kw), np_scores(teacher, q, **kw)
    cands = np_candidates(t, q, length)
    kl = 0.0
    for order in itertools.permutations(cands):
      p_t, p_s = np_perm_prob(t, order), np_perm_prob(s, order)
      kl += p_t * math.log(p_t / p_s)
    losses.append(kl)
  return np.mean(losses)


def np_hard(student, teacher, *, length, queries="all", **kw):
  losses = []
  for q in np_queries(len(student), queries):
    s, t = np_scores(student, q, **kw), np_scores(teacher, q, **kw)
    length_q = len(student) - 1 if length is None else length
    losses.append(-math.log(np_perm_prob(s, np_candidates(t, q, length_q))))
  return np.mean(losses)


def embeddings(seed, batch, dim, normalize=True):
  x = np.random.default_rng(seed).normal(size=(batch, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x


# --- golden parity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [1, 2, 3])
def test_hard_rank_loss_matches_rkd_golden(case):
  g = load_golden(f"darkrank_hard_case{case}")
  teacher = jnp.asarray(g["teacher_embed"])

  def loss(student):
    return dr.hard_rank_loss(student, teacher, alpha=float(g["alpha"]), beta=float(g["beta"]),
                             list_length=int(g["permute_len"]), eps=float(g["pdist_eps"]))
  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(g["student_embed"]))
  np.testing.assert_allclose(value, g["loss"], rtol=1e-4)
  want = g["grad_student_embed"]
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


# --- brute-force references ------------------------------------------------------------------------------------


@pytest.mark.parametrize("score,queries,length", [("paper", "all", 3), ("code", "first_half", 4),
                                                  ("code", "all", 2), ("paper", "first_half", 5)])
def test_soft_rank_loss_equals_enumeration_of_all_permutations(score, queries, length):
  student, teacher = embeddings(0, 6, 5), embeddings(1, 6, 7)
  kw = {"score": score, "alpha": 2.0, "beta": 2.5, "scale": 1.5, "power": 1.5}
  got = jax.jit(lambda s, t: dr.soft_rank_loss(s, t, list_length=length, queries=queries, **kw))(student, teacher)
  np.testing.assert_allclose(got, np_soft(student, teacher, length=length, queries=queries, **kw), rtol=1e-5)


@pytest.mark.parametrize("score,queries,length", [("code", "first_half", None), ("paper", "all", None),
                                                  ("code", "all", 3)])
def test_hard_rank_loss_equals_the_listmle_product(score, queries, length):
  """``None`` is the authors' ListMLE over every other example of the batch (with their first-half queries)."""
  student, teacher = embeddings(2, 8, 4), embeddings(3, 8, 6)
  kw = {"score": score, "scale": 1.5, "power": 1.0}
  got = jax.jit(lambda s, t: dr.hard_rank_loss(s, t, list_length=length, queries=queries, **kw))(student, teacher)
  np.testing.assert_allclose(got, np_hard(student, teacher, length=length, queries=queries, **kw), rtol=1e-5)


def test_listmle_by_hand_on_three_items():
  e = math.e
  want = (2 - math.log(e**2 + e + 1)) + (1 - math.log(e + 1)) + 0.0
  np.testing.assert_allclose(dr.plackett_luce_log_prob(jnp.array([2.0, 1.0, 0.0])), want, rtol=1e-6)


def test_plackett_luce_sums_to_one_and_the_sorted_order_is_most_likely():
  scores = jnp.array([1.3, -0.2, 0.7, 2.1])
  perms = dr.permutations(4)
  assert perms.shape == (24, 4) and (perms[0] == np.arange(4)).all()
  log_p = dr.plackett_luce_log_prob(scores[perms])
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_p)), 1.0, rtol=1e-6)
  assert tuple(perms[int(jnp.argmax(log_p))]) == tuple(np.argsort(-np.asarray(scores)))


def test_soft_loss_is_zero_for_embeddings_equal_up_to_scale_with_the_code_parametrisation():
  teacher = embeddings(4, 6, 8, normalize=False)
  zero = dr.soft_rank_loss(3.7 * teacher, teacher, list_length=4, score="code")
  np.testing.assert_allclose(zero, 0.0, atol=1e-6)
  # The paper's score uses the distances as they are: a rescaled student ranks alike but is more/less peaked.
  assert dr.soft_rank_loss(3.7 * teacher, teacher, list_length=4, score="paper") > 1e-3
  assert dr.soft_rank_loss(embeddings(5, 6, 8), teacher, list_length=4, score="code") > 1e-3


def test_plackett_luce_is_shift_invariant_and_the_soft_loss_translation_invariant():
  scores = jnp.array([[0.3, -1.0, 2.0], [1.0, 1.0, -0.5]])
  np.testing.assert_allclose(dr.plackett_luce_log_prob(scores + 7.5), dr.plackett_luce_log_prob(scores), rtol=1e-5)
  x = embeddings(6, 5, 3, normalize=False)
  np.testing.assert_allclose(dr.soft_rank_loss(x + 5.0, x, list_length=4, beta=2.0), 0.0, atol=1e-5)


def test_query_is_masked_out_not_dropped_by_sort_position():
  """An exact duplicate of the query (distance 0, ties with the query itself) stays its first candidate."""
  teacher = embeddings(7, 5, 3)
  teacher[1] = teacher[0]
  scores = dr.rank_scores(jnp.asarray(teacher), 5)
  cands = np.asarray(dr.teacher_candidates(scores, 4))
  assert cands[0, 0] == 1 and cands[1, 0] == 0
  assert all(q not in cands[q] for q in range(5))
  assert all(sorted(cands[q]) == sorted(set(range(5)) - {q}) for q in range(5))


def test_batch_hard_triplet_loss_by_brute_force():
  x = embeddings(8, 6, 3, normalize=False)
  labels = np.array([0, 1, 2, 0, 1, 2])
  got = dr.batch_hard_triplet_loss(jnp.asarray(x), jnp.asarray(labels), margin=0.5)
  d = np.linalg.norm(x[:, None] - x[None], axis=-1)
  want = [max(0.0, 0.5 + max(d[a, p] for p in range(6) if p != a and labels[p] == labels[a])
              - min(d[a, n] for n in range(6) if labels[n] != labels[a])) for a in range(6)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  lonely = dr.batch_hard_triplet_loss(jnp.asarray(x[:3]), jnp.asarray(labels[:3]), margin=0.5)
  np.testing.assert_array_equal(lonely, 0.0)  # no positives: no loss


# --- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [dr.soft_rank_loss, dr.hard_rank_loss])
def test_jit_equals_eager_and_vmap_equals_loop(loss):
  student, teacher = embeddings(9, 3 * 6, 4).reshape(3, 6, 4), embeddings(10, 3 * 6, 5).reshape(3, 6, 5)
  fn = lambda s, t: loss(s, t, list_length=3, score="code")
  np.testing.assert_allclose(jax.jit(fn)(student[0], teacher[0]), fn(student[0], teacher[0]), rtol=1e-6)
  looped = [jax.jit(fn)(s, t) for s, t in zip(student, teacher)]
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(student, teacher), looped, rtol=1e-5)
  grads = jax.jit(jax.vmap(jax.grad(fn)))(student, teacher)
  np.testing.assert_allclose(grads[1], jax.jit(jax.grad(fn))(student[1], teacher[1]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss,score", [(dr.soft_rank_loss, "paper"), (dr.hard_rank_loss, "code"),
                                        (dr.soft_rank_loss, "code")])
def test_check_grads(loss, score):
  student, teacher = embeddings(11, 5, 3), embeddings(12, 5, 4)
  fn = lambda s: loss(s, jnp.asarray(teacher), list_length=3, score=score, alpha=1.0, beta=2.0, power=1.0,
                      scale=1.0)
  with jax.enable_x64(True):
    check_grads(jax.jit(fn), (jnp.asarray(student, jnp.float64),), order=1, modes=("rev",), eps=1e-4)


def test_teacher_gets_no_gradient_through_the_candidates_and_student_gets_one():
  student, teacher = embeddings(13, 6, 3), embeddings(14, 6, 3)
  grad = jax.jit(jax.grad(lambda s: dr.hard_rank_loss(s, teacher, list_length=3)))(student)
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_duplicate_rows_give_finite_gradients():
  x = embeddings(15, 5, 3)
  x[2] = x[1]
  for loss in (dr.soft_rank_loss, dr.hard_rank_loss):
    for score in ("paper", "code"):
      grad = jax.jit(jax.grad(lambda s: loss(s, x, list_length=3, score=score, beta=0.5, power=0.5)))(x)
      assert np.isfinite(grad).all(), (loss.__name__, score)


# --- errors --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_explained():
  s, t = embeddings(16, 5, 3), embeddings(17, 5, 4)
  with pytest.raises(ValueError, match=r"list_length=5 .* at least 6 examples .* got batch size 5"):
    dr.hard_rank_loss(s, t, list_length=5)
  with pytest.raises(ValueError, match=r"student_emb and teacher_emb .* same batch size.*\(6, 4\)"):
    dr.soft_rank_loss(s, embeddings(18, 6, 4), list_length=2)
  with pytest.raises(ValueError, match=r"list_length=9 is too long.*enumerates all.*<= 8"):
    dr.soft_rank_loss(embeddings(19, 10, 3), embeddings(20, 10, 3), list_length=9)
  with pytest.raises(ValueError, match=r"student_emb must be \[batch, dim\]"):
    dr.hard_rank_loss(s[0], t, list_length=2)
  with pytest.raises(ValueError, match="unknown score"):
    dr.hard_rank_loss(s, t, list_length=2, score="squared")
  with pytest.raises(ValueError, match="unknown hard_rank_loss queries"):
    dr.hard_rank_loss(s, t, list_length=2, queries="half")
  with pytest.raises(ValueError, match="alpha must be > 0"):
    dr.hard_rank_loss(s, t, list_length=2, alpha=0.0)
  with pytest.raises(ValueError, match="positive int"):
    dr.hard_rank_loss(s, t, list_length=0)


# --- the embedding model ---------------------------------------------------------------------------------------


def test_embedding_mlp_exposes_a_unit_norm_embedding_and_classifies_from_it():
  model = models.get("embedding_mlp", hidden=(12,), embedding_dim=5, num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 1)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  out = models.apply_model(model, variables, x, features=("embedding", "embedding_unnormalized"))
  assert out.logits.shape == (4, 3) and out.features["embedding"].shape == (4, 5)
  np.testing.assert_allclose(jnp.linalg.norm(out.features["embedding"], axis=1), 1.0, rtol=1e-5)
  raw = out.features["embedding_unnormalized"]
  head = variables["params"]["head"]
  np.testing.assert_allclose(out.logits, raw @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)
  plain = models.get("embedding_mlp", hidden=(12,), embedding_dim=5, num_classes=3, l2_normalize=False)
  out = models.apply_model(plain, variables, x, features=("embedding",))
  np.testing.assert_allclose(out.features["embedding"], raw, rtol=1e-6)
