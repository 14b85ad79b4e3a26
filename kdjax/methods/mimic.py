"""Ba & Caruana (NIPS 2014), *Do Deep Nets Really Need to be Deep?* (arXiv 1312.6184).

A shallow "mimic" net is trained by *regression* on the teacher's pre-softmax logits, on the
training set plus extra unlabelled data labelled by the teacher; no hard-label term. The
student architecture is :class:`kdjax.models.mlp.MLP` with ``bottleneck=k`` (registered as
``mimic_mlp``): a linear layer of ``k`` units without non-linearity factors the first weight
matrix, which the paper reports speeds up training.

Teacher inputs are not wrapped in ``stop_gradient`` here; the training step does that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.errors import check_same_shape


def logit_regression_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Per-example ``½ ‖z_s − z_t‖²`` over the logit dimensions (Ba & Caruana 2014, §2.2).

  The paper's objective is ``1/(2N) Σ_n ‖g(x_n) − z_n‖²``: the batch mean of this function.

  Relation to other code: torchdistill has no dedicated Ba & Caruana loss; its configs compose
  ``nn.MSELoss(reduction='sum')`` on logits, which is ``Σ_n Σ_k (z_s − z_t)²`` — exactly
  ``2 · sum(logit_regression_loss(...))`` (no ½, no batch mean; checked against
  ``golden/logit_mse_torchdistill``). ``F.mse_loss`` (mmcls-style ``Logits`` losses) is a
  mean over batch *and* classes, i.e. ``2/C`` times the batch mean here — the choice changes
  the effective learning rate by the number of classes.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: ``[..., classes]`` (same shape); regress *logits*, not probabilities.

  Returns:
    ``[...]``, one value per example.
  """
  check_same_shape("logit_regression_loss logits", student_logits, teacher_logits)
  # float32 or wider (float16 squares overflow past 256); in float32 logits differing by more than ~4e9 give inf,
  # which the training step's non-finite guard stops.
  dtype = jnp.promote_types(jnp.result_type(student_logits, teacher_logits), jnp.float32)
  return 0.5 * jnp.sum(jnp.square(student_logits.astype(dtype) - teacher_logits.astype(dtype)), axis=-1)


def ensemble_logits(member_logits: jax.Array) -> jax.Array:
  """The mimic target of a teacher ensemble: the members' logits averaged (the paper's choice).

  ``[members, ..., classes] -> [..., classes]``. (Averaging probabilities and taking a log gives
  different targets.)
  """
  return jnp.mean(member_logits, axis=0)


def mimic_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """:func:`logit_regression_loss` against one teacher ``[batch, classes]`` or the averaged logits
  of an ensemble ``[members, batch, classes]``; returns ``[batch]``."""
  if teacher_logits.ndim == student_logits.ndim + 1:
    teacher_logits = ensemble_logits(teacher_logits)
  return logit_regression_loss(student_logits, teacher_logits)


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``mimic`` method (none: the paper has no hyperparameter)."""
  return {}


def make_objective():
  """The training objective: :func:`mimic_loss`; labels are not used (the paper has no hard term)."""
  from kdjax.methods.objective import Objective

  def fn(student, teacher, batch, progress):
    del batch, progress
    return mimic_loss(student.logits, teacher.logits), {}
  return Objective(fn, needs_teacher=True)
