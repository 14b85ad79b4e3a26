"""DarkRank (Chen, Wang & Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample Similarities
Transfer", AAAI 2018, arXiv 1707.01220).

The student learns the teacher's *ranking* of the other examples of a batch: for a query ``q`` each candidate
``x_i`` gets the score ``S(x_i) = −α ‖x_q − x_i‖₂^β`` and a list of candidates gets the Plackett–Luce probability
``P(π | X) = Π_i exp(S(x_π(i))) / Σ_{k ≥ i} exp(S(x_π(k)))``. Two transfers (PAPERS.md §8(a); the PDF itself
was not at hand, so no section or equation numbers are cited):

* soft (ListNet-like, :func:`soft_rank_loss`): ``KL(P(·|X_T) ‖ P(·|X_S))`` over all ``n!`` orderings of the
  teacher's ``n = list_length`` nearest candidates;
* hard (ListMLE-like, :func:`hard_rank_loss`): ``−log P(π_T | X_S)``, the student's probability of the teacher's
  ordering ``π_T``.

The student's total objective (:func:`make_stage_program`) is its own classification (and optionally
metric-learning) loss plus ``λ`` times the rank loss, optionally plus Hinton KD on the logits.

Two parametrisations of the score (``score=``), both kept because they differ in more than notation:

* ``'paper'`` (default; the paper's formula and lenscloth/RKD's ``HardDarkRank``, the golden reference):
  ``S = −α · d^β`` with the non-squared Euclidean distance ``d = sqrt(max(‖x_q − x_i‖², eps))`` of the
  embeddings as given (RKD's ``pdist``; ``eps = 1e-12``). Defaults α = 3, β = 3 (RKD's; the paper's from memory, [M]).
* ``'code'`` (the authors' MXNet ops ``PYOP/listnet_loss.py``, ``listmle_loss.py``): the embeddings are
  L2-normalised (the ``l2_norm`` layer of ``reid.py``; done here inside the loss), multiplied by
  ``sqrt(scale)``, and ``S = −(‖x̂_q − x̂_i‖²)^power`` on the *squared* distance. This equals the paper's form
  on L2-normalised embeddings with ``α = scale^power`` and ``β = 2·power`` (the README command,
  ``--embedding-l2-norm 3.5 --score-power 2``, is α = 12.25, β = 4), but it is scale-invariant in the
  embeddings (student and teacher embeddings of any norms compare) and bounded (``d² ≤ 4·scale``).

Where the public code differs, and what kdjax does (each selectable):

* Queries (``queries=``). RKD uses every example of the batch as a query (``'all'``, default). The authors'
  ops use only the **first half** of the batch (``'first_half'``): their "even iterator" fills it with pairs of
  the same identity, so every such query has a true match among its candidates (with
  :class:`kdjax.data.ClassBalancedBatches` and 2 examples per class the first half is one example of each
  class). Candidates are always all the *other* examples of the batch; the query itself is excluded by a mask
  (never by ``argsort(...)[1:]``, which silently drops the wrong example when distances tie at 0).
* Hard list length (``list_length=``). RKD truncates the hard list to the teacher's top ``permute_len = 4``
  (the Plackett–Luce product and its denominators run over those 4 only); the authors' ListMLE ranks the whole
  remaining batch: ``list_length=None``.
* The authors' ListMLE returns ``−log(P + 1e-12)`` (capped near 27.6) while its hand-derived gradient is that of
  ``−log P``; kdjax computes ``−log P`` exactly in log space (``logsumexp``), so its gradient is the code's and
  its value is not capped.
* The authors' ListNet minimises the cross-entropy ``−Σ_π P_T(π) log P_S(π)``; kdjax's soft loss is the paper's
  KL, which differs by the teacher's entropy (a constant for the student: same gradient; KL is 0 at a perfect
  match).
* The authors' ListNet scales the teacher embedding by ``sqrt(scale)`` too; their ListMLE does not (it only
  ranks with it, which the scale does not change). Here both are always scored alike.
* Loss weight. The ops' ``grad_scale`` (``--loss-weight-listnet 16``) is applied to a mean over queries and
  then divided again by the batch size through the optimizer's ``rescale_grad = 1/batch`` (batch 8), whereas the
  softmax loss's per-example gradients are only averaged: relative to a batch-mean classification loss the
  effective ``λ`` is 16 / 8 = 2.

All losses here are pure functions of arrays (jit/grad/vmap-safe; the list length and query set are static).
The teacher embedding is not wrapped in ``stop_gradient`` here; the training step does that.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.errors import check_positive, unknown_name

SCORES = ("paper", "code")
QUERIES = ("all", "first_half")
# The soft loss enumerates list_length! orderings of list_length items per query: 8 is 40,320 x 8 gathers per
# query; 9 would be 362,880 x 9.
MAX_SOFT_LIST_LENGTH = 8


# --- scores and Plackett-Luce probabilities ---------------------------------------------------------------


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(‖x‖₂, eps)`` row-wise (``torch.nn.functional.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def rank_scores(embeddings: jax.Array, num_queries: int, *, score: str = "paper", alpha: float = 3.0,
                beta: float = 3.0, scale: float = 3.5, power: float = 2.0, eps: float = 1e-12) -> jax.Array:
  """Scores ``S[q, i]`` of every example ``i`` as a candidate for each of the first ``num_queries`` queries.

  Args:
    embeddings: ``[batch, dim]``.
    num_queries: ``Q ≤ batch``; query ``q`` is example ``q``.
    score: ``'paper'``: ``−α · sqrt(max(‖x_q − x_i‖², eps))^β`` on the embeddings as given; ``'code'``:
      ``−max(‖x̂_q − x̂_i‖², eps)^power`` with ``x̂ = sqrt(scale) · x / ‖x‖`` (see the module docstring).
    alpha, beta: the paper's α > 0, β > 0 (read by ``'paper'`` only).
    scale, power: the code's ``--embedding-l2-norm`` > 0 and ``--score-power`` > 0 (read by ``'code'`` only).
    eps: the clamp of the squared distance (RKD's ``pdist`` eps); it keeps the gradient finite at ``d = 0``
      (the query's own entry, which the losses mask out, and duplicate examples).

  Returns:
    ``[Q, batch]``; entry ``[q, q]`` (the query itself) is meaningless and must be masked by the caller.
  """
  if score not in SCORES:
    raise unknown_name("score (DarkRank parametrisation)", score, SCORES)
  x = embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32))  # bf16 embeddings are scored in f32
  if score == "code":
    check_positive("scale", scale)
    check_positive("power", power)
    x = math.sqrt(scale) * _normalize(x)
  else:
    check_positive("alpha", alpha)
    check_positive("beta", beta)
  # Differences, not ‖a‖² + ‖b‖² − 2a·b: no cancellation for near neighbours (the ones that decide rankings).
  squared = jnp.sum(jnp.square(x[:num_queries, None, :] - x[None, :, :]), axis=-1)
  squared = jnp.maximum(squared, eps)
  if score == "code":
    return -(squared ** power)
  return -alpha * jnp.sqrt(squared) ** beta


def plackett_luce_log_prob(scores: jax.Array) -> jax.Array:
  """``log P`` of the ordering in which ``scores`` are given, along the last axis.

  ``log P(π) = Σ_i [s_π(i) − logsumexp(s_π(i), ..., s_π(n))]`` for ``scores[..., i] = s_π(i)``; the suffix
  log-sum-exps are one reversed cumulative ``logsumexp`` (stable for any score range).

  Args:
    scores: ``[..., n]``, the scores of the items in ranked order (first = top).

  Returns:
    ``[...]``, ``≤ 0``; ``exp`` of it sums to 1 over the ``n!`` orderings of the same items.
  """
  suffix = jax.lax.cumlogsumexp(scores, axis=scores.ndim - 1, reverse=True)
  return jnp.sum(scores - suffix, axis=-1)


@functools.cache
def permutations(n: int) -> np.ndarray:
  """All ``n!`` orderings of ``range(n)`` as an ``[n!, n]`` int32 array (lexicographic; the identity first)."""
  return np.asarray(list(itertools.permutations(range(n))), np.int32).reshape(-1, n)


def teacher_candidates(teacher_scores: jax.Array, list_length: int) -> jax.Array:
  """Each query's top-``list_length`` candidates by the teacher's score, best first: ``[Q, L]`` example indices.

  ``teacher_scores`` is ``[Q, batch]`` from :func:`rank_scores` (query ``q`` is example ``q``). The query itself
  is removed by a mask, not by dropping the first sorted entry, so an exact duplicate of the query (distance 0)
  stays a candidate and the query never is. Ties go to the lower index (``jax.lax.top_k``).
  """
  num_queries, batch = teacher_scores.shape
  is_query = jnp.arange(batch)[None, :] == jnp.arange(num_queries)[:, None]
  _, candidates = jax.lax.top_k(jnp.where(is_query, -jnp.inf, teacher_scores), list_length)
  return candidates


# --- the two transfers ----------------------------------------------------------------------------------------


def _check_inputs(name: str, student_emb, teacher_emb, list_length, queries: str) -> tuple[int, int]:
  """``(num_queries, list_length)`` after checking shapes and the list length against the batch."""
  if queries not in QUERIES:
    raise unknown_name(f"{name} queries", queries, QUERIES)
  for arg, emb in (("student_emb", student_emb), ("teacher_emb", teacher_emb)):
    if emb.ndim != 2:
      raise ValueError(f"{name}: {arg} must be [batch, dim] embeddings; got shape {tuple(emb.shape)}")
  batch = student_emb.shape[0]
  if teacher_emb.shape[0] != batch:
    raise ValueError(f"{name}: student_emb and teacher_emb must hold the same examples (the same batch size); "
                     f"got student_emb {tuple(student_emb.shape)} and teacher_emb {tuple(teacher_emb.shape)} "
                     "(their dims may differ)")
  if batch < 2:
    raise ValueError(f"{name}: a query needs at least one other example in the batch; got batch size {batch}")
  if list_length is None:
    list_length = batch - 1
  if isinstance(list_length, bool) or not isinstance(list_length, int | np.integer) or list_length < 1:
    raise ValueError(f"{name}: list_length must be a positive int (or None = every other example of the batch); "
                     f"got {list_length!r}")
  if list_length > batch - 1:
    raise ValueError(f"{name}: list_length={list_length} candidates per query needs a batch of at least "
                     f"{list_length + 1} examples (the query and {list_length} others); got batch size {batch}. "
                     f"Use list_length <= {batch - 1} or a larger batch")
  num_queries = batch if queries == "all" else batch // 2
  return num_queries, int(list_length)


def _ranked_scores(student_emb, teacher_emb, num_queries, list_length, score_kwargs):
  """Student and teacher scores ``[Q, L]`` of each query's top-``L`` candidates, in the teacher's order."""
  student = rank_scores(student_emb, num_queries, **score_kwargs)
  teacher = rank_scores(teacher_emb, num_queries, **score_kwargs)
  candidates = teacher_candidates(teacher, list_length)  # [Q, L], the teacher's best first
  return (jnp.take_along_axis(student, candidates, axis=1), jnp.take_along_axis(teacher, candidates, axis=1))


def hard_rank_loss(student_emb: jax.Array, teacher_emb: jax.Array, *, list_length: int | None = 4,
                   queries: str = "all", score: str = "paper", alpha: float = 3.0, beta: float = 3.0,
                   scale: float = 3.5, power: float = 2.0, eps: float = 1e-12) -> jax.Array:
  """DarkRank's hard transfer (ListMLE): ``mean_q −log P_S(π_T(q))``, a scalar.

  For each query ``q`` the teacher orders the candidates (every other example of the batch) by its score, best
  first, and keeps the top ``L = list_length``: ``π_T``. The loss is the student's Plackett–Luce negative
  log-likelihood of that ordering, ``−Σ_{i<L} [s_i − logsumexp(s_i..s_{L−1})]`` with ``s_i`` the student's
  score of the teacher's ``i``-th candidate (PAPERS.md §8(a)), averaged over the queries.

  Args:
    student_emb: ``[batch, d_s]``.
    teacher_emb: ``[batch, d_t]`` (``d_t`` may differ from ``d_s``; same examples in the same order).
    list_length: ``L`` (RKD's ``permute_len``, default 4); ``None`` ranks every other example of the batch,
      as the authors' ListMLE does. At most ``batch − 1``.
    queries: ``'all'`` (RKD) or ``'first_half'`` (the authors' code); see the module docstring.
    score, alpha, beta, scale, power, eps: the score parametrisation, see :func:`rank_scores`.

  Returns:
    A scalar ``≥ 0``. With ``score='paper'``, ``queries='all'`` and a finite ``list_length`` it equals RKD's
    ``HardDarkRank(alpha, beta, permute_len)(student, teacher)`` (tested against ``golden/darkrank_hard``).

  Raises:
    ValueError: embeddings not 2-D or of different batch sizes, ``list_length`` not in ``[1, batch − 1]``, an
      unknown ``score``/``queries``, or a non-positive hyperparameter.
  """
  num_queries, length = _check_inputs("hard_rank_loss", student_emb, teacher_emb, list_length, queries)
  kwargs = {"score": score, "alpha": alpha, "beta": beta, "scale": scale, "power": power, "eps": eps}
  student_scores, _ = _ranked_scores(student_emb, teacher_emb, num_queries, length, kwargs)
  return -jnp.mean(plackett_luce_log_prob(student_scores))


def soft_rank_loss(student_emb: jax.Array, teacher_emb: jax.Array, *, list_length: int | None = 4,
                   queries: str = "all", score: str = "paper", alpha: float = 3.0, beta: float = 3.0,
                   scale: float = 3.5, power: float = 2.0, eps: float = 1e-12) -> jax.Array:
  """DarkRank's soft transfer (ListNet): ``mean_q KL(P_T ‖ P_S)`` over all orderings of ``q``'s candidates.

  The candidates of query ``q`` are the teacher's top ``n = list_length`` (the authors' ``--list-length 4``);
  ``P_T`` and ``P_S`` are the teacher's and the student's Plackett–Luce distributions over the ``n!``
  orderings of that same set (PAPERS.md §8(a)):
  ``Σ_π P_T(π) (log P_T(π) − log P_S(π))``, averaged over the queries. It is 0 exactly when the student's
  scores of the candidates equal the teacher's up to a common shift (e.g. with ``score='code'``, which
  L2-normalises, when the student's embeddings are the teacher's times any positive factor).

  Cost: ``n!·n`` per query, so ``list_length`` is limited to 8 (40,320 orderings).

  Args:
    student_emb: ``[batch, d_s]``.
    teacher_emb: ``[batch, d_t]``.
    list_length: ``n`` in ``[1, min(8, batch − 1)]``; ``None`` = every other example of the batch (only for
      batches of at most 9).
    queries, score, alpha, beta, scale, power, eps: as in :func:`hard_rank_loss`.

  Returns:
    A scalar ``≥ 0``.

  Raises:
    ValueError: as :func:`hard_rank_loss`, and ``list_length > 8``.
  """
  num_queries, length = _check_inputs("soft_rank_loss", student_emb, teacher_emb, list_length, queries)
  if length > MAX_SOFT_LIST_LENGTH:
    raise ValueError(f"soft_rank_loss: list_length={length} is too long: the soft loss enumerates all "
                     f"list_length! orderings per query (cost n!·n = {math.factorial(length) * length:,} "
                     f"score gathers per query); use list_length <= {MAX_SOFT_LIST_LENGTH} (the authors use 4), "
                     "or hard_rank_loss, which is linear in the list length")
  kwargs = {"score": score, "alpha": alpha, "beta": beta, "scale": scale, "power": power, "eps": eps}
  student_scores, teacher_scores = _ranked_scores(student_emb, teacher_emb, num_queries, length, kwargs)
  perms = jnp.asarray(permutations(length))  # [n!, n]
  student_log_p = plackett_luce_log_prob(student_scores[:, perms])  # [Q, n!]
  teacher_log_p = plackett_luce_log_prob(teacher_scores[:, perms])
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
  return jnp.mean(kl)



# --- the student's own metric-learning loss ------------------------------------------------------------------


def batch_hard_triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2,
                            eps: float = 1e-12) -> jax.Array:
  """Per-example batch-hard triplet loss ``max(0, margin + max_pos d(a, p) − min_neg d(a, n))``: ``[batch]``.

  A stand-in for the verification loss the DarkRank authors' student also trains with (their LMNN-style op,
  not reproduced): for each anchor, its farthest same-label example and its nearest other-label example in the
  batch (Hermans et al. 2017), with the Euclidean distance ``sqrt(max(d², eps))``. Anchors without a positive or
  without a negative in the batch get 0 (batches of P classes × K ≥ 2 examples have both).

  Args:
    embeddings: ``[batch, dim]``.
    labels: ``[batch]`` integer labels.
    margin: the margin ``≥ 0``.
    eps: the clamp of the squared distance (finite gradients at 0).
  """
  if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
    raise ValueError(f"batch_hard_triplet_loss expects embeddings [batch, dim] and labels [batch]; got "
                     f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  x = embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32))
  distances = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x[:, None] - x[None]), axis=-1), eps))
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(labels.shape[0], dtype=bool)
  hardest_positive = jnp.max(jnp.where(positive, distances, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(same, jnp.inf, distances), axis=1)
  valid = jnp.any(positive, axis=1) & jnp.any(~same, axis=1)
  loss = jax.nn.relu(margin + jnp.where(valid, hardest_positive - hardest_negative, 0.0))
  return jnp.where(valid, loss, 0.0)


# --- the training stage (kdjax train / reproduce) -------------------------------------------------------------

TRANSFERS = ("none", "hard", "soft")


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``darkrank`` method (defaults: the paper's α = β = 3, RKD's list of 4)."""
  return {"transfer": "soft", "rank_weight": 2.0, "list_length": 4, "queries": "all", "score": "paper",
          "alpha": 3.0, "beta": 3.0, "scale": 3.5, "power": 2.0, "examples_per_class": 2,
          "classification_weight": 1.0, "triplet_weight": 0.0, "triplet_margin": 0.2, "kd_weight": 0.0,
          "temperature": 4.0, "student_feature": "embedding", "teacher_feature": "embedding"}


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise unknown_name(name, value, choices)


def _check_weight(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
    raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def make_stage_program(*, transfer: str, rank_weight: float, list_length: int, queries: str, score: str,
                       alpha: float, beta: float, scale: float, power: float, examples_per_class: int,
                       classification_weight: float, triplet_weight: float, triplet_margin: float,
                       kd_weight: float, temperature: float, student_feature: str, teacher_feature: str):
  """DarkRank as a :class:`kdjax.train.StageProgram`: metric learning on class-balanced batches + rank transfer.

  Per step, on a batch of ``P = config.batch_size / examples_per_class`` classes × ``examples_per_class``
  examples (:class:`kdjax.data.ClassBalancedBatches`, a pure function of the seed and the step), the student
  (``config.model``, exporting the feature ``student_feature``) minimises

  ``classification_weight · CE + triplet_weight · batch-hard triplet + rank_weight · L_rank + kd_weight · KD``

  with ``L_rank`` = :func:`soft_rank_loss` or :func:`hard_rank_loss` between the student's and the teacher's
  (``config.teacher_workdir``, evaluation mode, under ``stop_gradient``) embeddings, and KD the Hinton term
  ``T²·KL`` on the logits (the authors add it at full weight with ``grad_scale = T²``). ``transfer='none'`` with
  ``kd_weight=0`` needs no teacher: the teacher itself and "student alone" are this stage too, on the same batches.
  ``list_length=0`` is ``None`` (every other example of the batch; hard transfer only beyond 9 examples).
  ``config.jitter``/``config.hflip`` augment the batches as :class:`kdata.TrainBatches` does (a pure function of
  the seed and the step). Retrieval on ``config.held_out_classes`` is measured by the runner for every stage (by
  ``config.embedding_feature``).
  """
  from kdjax import data as kdata
  from kdjax import models, parallel
  from kdjax import train as ktrain
  from kdjax.methods.soft_targets import hard_label_loss, soft_target_loss

  _check_choice("transfer", transfer, TRANSFERS)
  _check_choice("queries", queries, QUERIES)
  _check_choice("score", score, SCORES)
  for name, value in (("rank_weight", rank_weight), ("classification_weight", classification_weight),
                      ("triplet_weight", triplet_weight), ("triplet_margin", triplet_margin),
                      ("kd_weight", kd_weight)):
    _check_weight(name, value)
  for name, value in (("alpha", alpha), ("beta", beta), ("scale", scale), ("power", power),
                      ("temperature", temperature)):
    check_positive(name, value)
  if isinstance(list_length, bool) or not isinstance(list_length, int) or list_length < 0:
    raise ValueError(f"list_length must be an int >= 1, or 0 for the whole batch; got {list_length!r}")
  if transfer == "soft" and not 0 < list_length <= MAX_SOFT_LIST_LENGTH:
    raise ValueError(f"transfer='soft' enumerates list_length! orderings per query: list_length must be in "
                     f"[1, {MAX_SOFT_LIST_LENGTH}] (the authors use 4); got {list_length}")
  if isinstance(examples_per_class, bool) or not isinstance(examples_per_class, int) or examples_per_class < 2:
    raise ValueError(f"examples_per_class must be an int >= 2 (each query needs a same-class partner in its "
                     f"batch); got {examples_per_class!r}")
  rank = transfer != "none" and rank_weight > 0
  needs_teacher = rank or kd_weight > 0
  rank_loss = {"hard": hard_rank_loss, "soft": soft_rank_loss}.get(transfer)
  rank_kwargs = {"list_length": list_length or None, "queries": queries, "score": score, "alpha": alpha,
                 "beta": beta, "scale": scale, "power": power}

  def classes_per_batch(setup) -> int:
    batch_size = setup.config.batch_size
    if batch_size % examples_per_class:
      raise ValueError(f"batch_size={batch_size} must be a multiple of examples_per_class={examples_per_class} "
                       "(batches are P classes x K examples)")
    return batch_size // examples_per_class

  def init_state(setup):
    classes_per_batch(setup)
    return ktrain.create_train_state(setup.student, setup.tx, setup.example, setup.config.seed,
                                     init_variables=setup.init_variables)

  def batches(setup):
    source = kdata.ClassBalancedBatches(setup.transfer_set, classes_per_batch=classes_per_batch(setup),
                                        examples_per_class=examples_per_class, seed=setup.config.seed,
                                        jitter=setup.config.jitter, hflip=setup.config.hflip,
                                        host_slice=parallel.process_slice(setup.config.batch_size))

    def from_step(start_step: int):
      return kdata.prefetch((source.batch(s) for s in range(start_step, setup.num_steps)),
                            functools.partial(parallel.shard_batch, mesh=setup.mesh))
    return from_step

  def make_step(setup):
    student, tx = setup.student, setup.tx
    teacher_models = tuple(setup.teacher_models)
    if needs_teacher and len(teacher_models) != 1:
      raise ValueError(f"darkrank transfers from one teacher; config.teacher_workdir names {len(teacher_models)} "
                       "runs (give exactly one)")
    teacher_features = (teacher_feature,) if rank else ()
    student_features = (student_feature,) if (rank or triplet_weight > 0) else ()

    def step(state, batch, teacher_variables=()):
      rng = jax.random.fold_in(state.rng, state.step)
      teacher = None
      if needs_teacher:
        teacher = ktrain.teacher_forward(teacher_models, teacher_variables, batch["image"],
                                         features=teacher_features)
      labels, mask = batch["label"], batch["label_mask"]

      def loss_fn(trainable):
        params, _ = trainable  # (student, method parameters): the optimizer state covers both; DarkRank has none
        out = models.apply_model(student, ktrain._variables(params, state.batch_stats), batch["image"], train=True,
                                 rngs={"dropout": rng}, features=student_features)
        parts = {"cross_entropy": jnp.sum(hard_label_loss(out.logits, labels) * mask) / jnp.maximum(mask.sum(), 1)}
        total = classification_weight * parts["cross_entropy"]
        if triplet_weight > 0:
          parts["triplet"] = jnp.mean(batch_hard_triplet_loss(out.features[student_feature], labels,
                                                              margin=triplet_margin))
          total = total + triplet_weight * parts["triplet"]
        if rank:
          parts["rank"] = rank_loss(out.features[student_feature], teacher.features[teacher_feature], **rank_kwargs)
          total = total + rank_weight * parts["rank"]
        if kd_weight > 0:
          parts["kd"] = jnp.mean(soft_target_loss(out.logits, teacher.logits, temperature=temperature))
          total = total + kd_weight * parts["kd"]
        return total, (out, parts)

      trainable = (state.params, state.aux_params)
      (loss, (out, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, state.opt_state, trainable)
      params, _ = optax.apply_updates(trainable, updates)
      (params, batch_stats, opt_state), nonfinite = ktrain.skip_if_nonfinite(
          ktrain.all_finite(loss, grads), (params, out.batch_stats, opt_state),
          (state.params, state.batch_stats, state.opt_state))
      new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
      one = jnp.float32(1.0)
      metrics = {"loss": (loss.astype(jnp.float32), one),
                 "train_accuracy": ktrain.mean_metric(jnp.argmax(out.logits, -1) == labels, mask),
                 "nonfinite": nonfinite}
      metrics.update({name: (value.astype(jnp.float32), one) for name, value in parts.items()})
      return new_state, metrics
    return step

  return ktrain.StageProgram(init_state, make_step, needs_teacher=needs_teacher, cacheable_teacher=False,
                             batches=batches)
