"""Hinton, Vinyals & Dean (2015), *Distilling the Knowledge in a Neural Network* (arXiv 1503.02531).

The student matches the teacher's output distribution softened by a temperature ``T``:
``p^T = softmax(z / T)``. The soft term is the KL divergence KL(p^T_teacher ‖ p^T_student),
which differs from the paper's cross-entropy with soft targets only by the teacher's entropy,
a constant for the student, so gradients are identical. Because the soft-term gradients scale
as ``1/T²`` the paper multiplies the term by ``T²`` (§2), so that the hard/soft balance does
not move when ``T`` changes.

Everything here is a pure function of arrays, per example (shape ``[batch]``), safe under
``jit``, ``grad`` and ``vmap``. Teacher inputs are *not* wrapped in ``stop_gradient`` here:
the training step does that (a loss is just a function of its arguments).

Paper vs public code:

* Reduction. The public references (RepDistiller ``DistillKL``, attention-transfer
  ``utils.distillation`` after its 2018 "fix KL" commit, mdistiller) sum the KL over classes
  and average over the batch ("batchmean"): the batch mean of :func:`soft_target_loss` equals
  their value exactly (tested against ``golden/kd_T4``, ``kd_T20``). The pre-2018 attention-
  transfer code (copied by Moonshine and Rocket Launching) averaged over batch *and* classes
  and multiplied by ``2T²`` — not reproduced here.
* Weighting. Hinton writes a weighted average of the soft and the hard objective with a
  "considerably lower weight" on the hard one; RepDistiller/AT call the *soft* weight ``α``
  (``α·KD + (1−α)·CE``, α = 0.9, T = 4). :func:`distillation_loss` takes ``alpha`` as the
  soft weight, so both read the same; Hinton's MNIST run (hard labels plus soft targets at
  T = 20) is ``alpha`` close to 1.

Numerics (tested in ``tests/test_loss_numerics.py``): logits are promoted to at least float32 before
they are divided by ``T`` (float16/bfloat16 logits at a low temperature would overflow), and the results
are float32. A teacher class with logit ``-inf`` (a masked class) has probability 0 and contributes 0
(``p·log p = 0``), so the loss stays finite as long as each teacher row has one finite logit and the
student's logits are finite; a row of only ``-inf`` has no distribution and gives NaN. Hard labels
outside ``[0, classes)`` are refused eagerly; under ``jit`` (where they cannot be checked without a host
sync) they give NaN, never a silently wrapped class, so the training step's non-finite guard stops the
run. ``temperature`` (finite, > 0) and ``alpha`` (in ``[0, 1]``) are checked eagerly when concrete.
An empty batch gives an empty result.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from kdjax.errors import check_class_ids, check_positive, check_same_shape, check_unit_interval


def _at_least_float32(x: jax.Array) -> jax.Array:
  """``x`` as float32 or wider: the tempered softmax of float16 logits overflows at a low temperature."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def soft_target_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                     temperature: float) -> jax.Array:
  """Per-example ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (Hinton et al. 2015, §2).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: ``[..., classes]``, same shape.
    temperature: ``T > 0``; the same ``T`` softens both distributions.

  Returns:
    ``[...]`` (one value per example). Its batch mean is RepDistiller's ``DistillKL(T)``.
    The gradient w.r.t. the student logits is ``T · (softmax(z_s/T) − softmax(z_t/T))``.
  """
  check_same_shape("soft_target_loss logits", student_logits, teacher_logits)
  check_positive("temperature", temperature)
  teacher_log_probs = jax.nn.log_softmax(_at_least_float32(teacher_logits) / temperature, axis=-1)
  return soft_target_loss_from_log_probs(student_logits, teacher_log_probs, temperature=temperature)


def soft_target_loss_from_log_probs(student_logits: jax.Array, teacher_log_probs: jax.Array, *,
                                    temperature: float) -> jax.Array:
  """Like :func:`soft_target_loss` but with the teacher's tempered log-probabilities given.

  Use it for teacher ensembles (:func:`ensemble_log_probs`), whose soft targets are a mean of
  distributions rather than a softmax of one set of logits.

  Args:
    student_logits: ``[..., classes]``.
    teacher_log_probs: ``[..., classes]``, ``log p^T_teacher`` (already at temperature ``T``).
    temperature: ``T > 0``.

  Returns:
    ``[...]``, ``T² · Σ_c p_t (log p_t − log_softmax(z_s/T))``.
  """
  check_same_shape("soft_target_loss logits", student_logits, teacher_log_probs)
  check_positive("temperature", temperature)
  student_log_probs = jax.nn.log_softmax(_at_least_float32(student_logits) / temperature, axis=-1)
  teacher_log_probs = _at_least_float32(teacher_log_probs)
  teacher_probs = jnp.exp(teacher_log_probs)
  # p·log p is 0 where p is 0: a class the teacher masks with -inf (log p = -inf, 0·-inf = NaN) contributes 0.
  # The unselected branch's gradient is multiplied by p = 0, so the gradient stays finite too.
  terms = jnp.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
  return temperature**2 * jnp.sum(terms, axis=-1)


def ensemble_log_probs(member_logits: jax.Array, *, temperature: float,
                       mean: Literal["arithmetic", "geometric"] = "arithmetic") -> jax.Array:
  """Soft targets of a teacher ensemble (Hinton et al. 2015, §2 and §5).

  Args:
    member_logits: ``[members, ..., classes]``, one slice per teacher.
    temperature: ``T > 0``; every member is softened at ``T`` before averaging.
    mean: ``"arithmetic"``: ``log mean_m softmax(z_m/T)``; ``"geometric"``: the renormalised
      geometric mean, ``log_softmax(mean_m log_softmax(z_m/T))``. The paper allows both.

  Returns:
    ``[..., classes]`` log-probabilities of the ensemble's soft targets.
  """
  check_positive("temperature", temperature)
  log_probs = jax.nn.log_softmax(_at_least_float32(member_logits) / temperature, axis=-1)
  if mean == "arithmetic":
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(member_logits.shape[0])
  if mean == "geometric":
    return jax.nn.log_softmax(jnp.mean(log_probs, axis=0), axis=-1)
  raise ValueError(f"mean must be 'arithmetic' or 'geometric', got {mean!r}")


def hard_label_loss(student_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy with integer labels at ``T = 1``: ``[batch, classes] -> [batch]``.

  Labels outside ``[0, classes)`` raise eagerly (the first bad index named); traced ones give NaN.
  """
  labels = jnp.asarray(labels)
  if labels.shape != student_logits.shape[:-1]:
    raise ValueError(f"labels must have shape {student_logits.shape[:-1]} (the logits' batch shape); "
                     f"got {labels.shape}")
  num_classes = student_logits.shape[-1]
  check_class_ids("labels", labels, num_classes)
  log_probs = jax.nn.log_softmax(_at_least_float32(student_logits), axis=-1)
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  picked = jnp.take_along_axis(log_probs, jnp.clip(labels, 0, num_classes - 1)[..., None], axis=-1)[..., 0]
  return jnp.where(valid, -picked, jnp.nan)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
                      temperature: float, alpha: float, label_mask: jax.Array | None = None,
                      ensemble_mean: Literal["arithmetic", "geometric"] = "arithmetic") -> jax.Array:
  """Hinton's full objective: ``α · T² · KL(p^T_t ‖ p^T_s) + (1 − α) · CE(y, softmax(z_s))``.

  The hard term uses the *same* student logits at ``T = 1``; ``T²`` multiplies only the soft
  term. On a transfer set where only some examples carry labels, ``label_mask`` (1 = labelled)
  drops the hard term of the others; they still get the soft term.

  Args:
    student_logits: ``[batch, classes]``.
    teacher_logits: ``[batch, classes]``, or ``[members, batch, classes]`` for an ensemble
      (combined by :func:`ensemble_log_probs` with ``ensemble_mean``).
    labels: ``[batch]`` integer labels (any value where ``label_mask`` is 0).
    temperature: ``T > 0``.
    alpha: weight of the soft term in ``[0, 1]``; ``1 − alpha`` weighs the hard term.
    label_mask: optional ``[batch]`` of 0/1.
    ensemble_mean: how ensemble members' distributions are averaged.

  Returns:
    ``[batch]``.
  """
  check_positive("temperature", temperature)
  check_unit_interval("alpha (the soft-term weight)", alpha)
  if teacher_logits.ndim == student_logits.ndim + 1:
    teacher_log_probs = ensemble_log_probs(teacher_logits, temperature=temperature, mean=ensemble_mean)
  else:
    check_same_shape("distillation_loss logits", student_logits, teacher_logits)
    teacher_log_probs = jax.nn.log_softmax(_at_least_float32(teacher_logits) / temperature, axis=-1)
  soft = soft_target_loss_from_log_probs(student_logits, teacher_log_probs, temperature=temperature)
  hard = hard_label_loss(student_logits, jnp.where(label_mask > 0, labels, 0) if label_mask is not None
                         else labels)
  if label_mask is not None:
    hard = hard * label_mask
  return alpha * soft + (1.0 - alpha) * hard


def task_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *, label_mask: jax.Array,
              alpha: float, temperature: float) -> jax.Array:
  """The task term a feature-distillation method adds its own term to: ``[batch]``.

  Cross-entropy on the labelled examples when ``alpha == 0`` (the teacher's logits are not used), else
  Hinton's :func:`distillation_loss` with weight ``alpha`` on the soft term — how the AT and
  RepDistiller codes combine their feature losses with plain training or with KD.
  """
  check_unit_interval("alpha (the soft-term weight)", alpha)
  if alpha > 0:
    return distillation_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                             label_mask=label_mask)
  return hard_label_loss(student_logits, labels) * label_mask


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``soft_targets`` method (RepDistiller/AT defaults)."""
  return {"temperature": 4.0, "alpha": 0.9, "ensemble_mean": "arithmetic"}


def make_objective(*, temperature: float, alpha: float, ensemble_mean: str):
  """The training objective: :func:`distillation_loss` with the batch's labels and label mask."""
  from kdjax.methods.objective import Objective
  check_positive("temperature", temperature)
  check_unit_interval("alpha (the soft-term weight)", alpha)

  def fn(student, teacher, batch, progress):
    del progress
    loss = distillation_loss(student.logits, teacher.logits, batch["label"], temperature=temperature,
                             alpha=alpha, label_mask=batch["label_mask"], ensemble_mean=ensemble_mean)
    return loss, {}
  return Objective(fn, needs_teacher=True)
