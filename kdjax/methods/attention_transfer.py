"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

Two kinds of attention are distilled (PAPERS.md §5):

* Activation-based (§3.1, the method the authors released): a spatial map per layer,
  ``Q = vec(mean_c |A_c|^p)``, L2-normalised per example (:func:`attention_map`); the student matches the
  teacher's maps at a few layer pairs (:func:`attention_loss`, :func:`attention_loss_pairs`).
* Gradient-based (§3.2, never released by the authors): the attention is the input gradient of the loss,
  ``J = ∂L/∂x``; the student matches the teacher's (:func:`gradient_attention_loss`), or, without a teacher,
  a net's gradient is asked to be flip-invariant (:func:`flip_invariance_loss`). Training with these needs
  double back-propagation, which is just ``jax.grad`` of a loss that itself calls ``jax.grad``.

Weights: no function here multiplies by the paper's ``β/2`` (or the code's ``β``); every loss returns the
unweighted distance and the caller (the train step, where all loss weights live) applies the weight:

* paper, Eq. 2: ``L_task + (β/2) Σ_j attention_loss(..., mode='paper')`` per example, β = 10³;
* released code: ``L_task + β · Σ_j mean_batch attention_loss(..., mode='code')``, β = 10³, no ½ — the form
  every public implementation (and kdjax's default) uses.

The losses are pure functions of arrays and work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. The
activation losses do **not** apply ``jax.lax.stop_gradient`` to the teacher's features: the train step
does that. (The gradient-based loss computes the teacher's input gradient itself, from the teacher's
parameters, so it stops that gradient itself.) Features are NHWC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.errors import check_positive, unknown_name
from kdjax.methods.pooling import pool_to

_MODES = ("code", "paper")
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps, kept to match the references


def _safe_norm(x: jax.Array, axis) -> jax.Array:
  """L2 norm whose gradient at 0 is 0 instead of NaN (sqrt'(0) = inf)."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def attention_map(feat: jax.Array, *, p: float = 2) -> jax.Array:
  """Activation-based spatial attention map, L2-normalised per example.

  Args:
    feat: ``[batch, H, W, C]`` activations.
    p: exponent (> 0); the paper's experiments and every released code use 2.

  Returns:
    ``[batch, H*W]``: ``q / max(‖q‖₂, 1e-12)`` with ``q = vec(mean_c |feat_c|^p)`` (row-major over H, W,
    the same order as the references' NCHW ``view(N, -1)``).

  Paper vs code: the paper (Eq. 1) sums over channels, ``F^p_sum(A) = Σ_c |A_c|^p``; the code takes the
  channel *mean* — the same map after normalisation, except through the 1e-12 epsilon; kdjax uses the mean
  (the code). The code raises to the power without ``abs`` (``x.pow(p)``), which differs from the paper for
  odd or fractional p (negative values, NaN); kdjax uses ``|x|^p`` as the paper writes, identical for even p.
  The epsilon is torch's ``F.normalize`` default and keeps dead (all-zero) maps finite; the norm's gradient
  at 0 is taken as 0.
  """
  check_positive("p", p)
  if feat.ndim != 4:
    raise ValueError(f"attention_map expects an NHWC feature [batch, H, W, C]; got shape {feat.shape}")
  try:
    concrete = float(p)
  except Exception:  # a traced p: the general power
    concrete = None
  if concrete is not None and concrete.is_integer():
    # integer_pow: exact and with a finite gradient at 0; even powers need no abs.
    k = int(concrete)
    q = feat ** k if k % 2 == 0 else jnp.abs(feat) ** k
  else:
    q = jnp.abs(feat) ** p
  q = jnp.mean(q, axis=-1).reshape(feat.shape[0], -1)
  norm = _safe_norm(q, axis=-1)
  return q / jnp.maximum(norm, _NORMALIZE_EPS)[:, None]


def attention_loss(
    student_feat: jax.Array,
    teacher_feat: jax.Array,
    *,
    p: float = 2,
    mode: str = "code",
) -> jax.Array:
  """Per-example activation attention-transfer loss for one (student, teacher) layer pair.

  Args:
    student_feat: ``[batch, H_s, W_s, C_s]``.
    teacher_feat: ``[batch, H_t, W_t, C_t]``; channel counts may differ (the map averages them out).
      If the spatial sizes differ, the larger feature map is average-pooled to the smaller one first
      (integer ratios only), as RepDistiller does.
    p: attention exponent (see :func:`attention_map`).
    mode: ``'code'`` (default) — ``mean_{hw} (a_s - a_t)²`` per example; ``'paper'`` — ``‖a_s - a_t‖₂``
      (non-squared) per example.

  Returns:
    ``[batch]``. In ``'code'`` mode the batch mean equals the released codes' per-pair value
    (``at_loss`` of szagoruyko/attention-transfer, RepDistiller's ``Attention``: a mean over N·H·W). Multiply
    by β (code) or β/2 (paper) in the caller; see the module docstring.

  Paper vs code (both ``szagoruyko/attention-transfer`` and RepDistiller):
    * The paper (Eq. 2) penalises the non-squared L2 distance ``‖a_s - a_t‖₂`` per example, summed over the
      batch, weighted by β/2 ("β = 10³ divided by the number of elements in the attention map and the batch
      size"); the code uses the **mean of squared** differences over N·H·W, times β (no ½). kdjax
      defaults to the code: its results are the ones reported and reproduced, and the squared form is
      smooth at 0 (the norm's gradient there is taken as 0 in ``'paper'`` mode).
    * The authors' code has no pooling and requires equal spatial sizes; RepDistiller pools the larger
      *feature* map with ``adaptive_avg_pool2d`` to ``(H_min, H_min)`` (square, from H only). kdjax pools each
      spatial axis to the smaller size, identical for square maps, and raises for non-integer ratios.
    * The paper's ``‖·‖_p`` with p = 2 is the L2 norm; kdjax always uses L2 for the distance and ``p`` only
      as the attention exponent.
    * With several GPUs the authors' ``data_parallel`` sums per-replica batch means, so their AT term scales
      with the GPU count; kdjax (one global batch mean) matches their one-GPU runs.
  """
  if mode not in _MODES:
    raise unknown_name("attention_loss mode", mode, _MODES)
  if student_feat.ndim != 4 or teacher_feat.ndim != 4:
    raise ValueError(
        f"attention_loss expects NHWC features [batch, H, W, C]; got student {student_feat.shape} and "
        f"teacher {teacher_feat.shape}")
  if student_feat.shape[0] != teacher_feat.shape[0]:
    raise ValueError(
        f"attention_loss: student and teacher batch sizes must match; got student {student_feat.shape} "
        f"and teacher {teacher_feat.shape}")
  size = (min(student_feat.shape[1], teacher_feat.shape[1]), min(student_feat.shape[2], teacher_feat.shape[2]))
  what = f"attention_loss(student {student_feat.shape}, teacher {teacher_feat.shape})"
  a_s = attention_map(pool_to(student_feat, size, what=what), p=p)
  a_t = attention_map(pool_to(teacher_feat, size, what=what), p=p)
  if mode == "code":
    return jnp.mean(jnp.square(a_s - a_t), axis=-1)
  return _safe_norm(a_s - a_t, axis=-1)


def attention_loss_pairs(
    student_feats: Sequence[jax.Array],
    teacher_feats: Sequence[jax.Array],
    *,
    p: float = 2,
    mode: str = "code",
) -> jax.Array:
  """Per-example attention-transfer loss summed over layer pairs: ``Σ_j attention_loss(s_j, t_j)``.

  ``student_feats[j]`` and ``teacher_feats[j]`` are the j-th pair (e.g. the outputs of each residual group,
  before the final BN-ReLU, as in the authors' ``cifar.py``). Returns ``[batch]``; its batch mean in
  ``'code'`` mode is RepDistiller's ``sum(loss_group)`` / the authors' ``sum(at_losses)`` (before β).
  """
  if len(student_feats) != len(teacher_feats) or not student_feats:
    raise ValueError(
        f"attention_loss_pairs needs the same non-zero number of student and teacher features; got "
        f"{len(student_feats)} student and {len(teacher_feats)} teacher")
  return sum(attention_loss(s, t, p=p, mode=mode) for s, t in zip(student_feats, teacher_feats))


# --- gradient-based attention transfer (§3.2) ---------------------------------------------------------

LossFn = Callable[[Any, jax.Array], jax.Array]


def input_gradient(loss_fn: LossFn, params: Any, x: jax.Array) -> jax.Array:
  """Gradient attention ``J = ∂L/∂x``, the same shape as ``x``.

  Args:
    loss_fn: ``loss_fn(params, x)`` returning per-example losses ``[batch]`` (preferred) or a scalar; a
      vector is summed first, so each example's ``J`` is the gradient of that example's own loss. (The
      gradient of a batch-*mean* scalar is ``1/batch`` times smaller; a net whose examples interact, e.g.
      BatchNorm in training mode, couples the examples' gradients.) Close over labels, ``train`` flags and
      RNGs.
    params: the parameters ``loss_fn`` is evaluated at. Differentiating the result w.r.t. them is double
      back-propagation, which ``jax.grad`` does as is.
    x: the input batch, ``[batch, ...]``.
  """
  def total(inputs):
    out = loss_fn(params, inputs)
    if out.ndim > 1 or (out.ndim == 1 and out.shape[0] != x.shape[0]):
      raise ValueError(
          f"input_gradient: loss_fn must return a scalar or per-example losses [batch={x.shape[0]}]; "
          f"got shape {out.shape}")
    return jnp.sum(out)
  return jax.grad(total)(x)


def gradient_attention_distance(student_grad: jax.Array, teacher_grad: jax.Array) -> jax.Array:
  """Per-example ``‖J_S - J_T‖₂`` over all non-batch axes, ``[batch]`` (no stop_gradient, no β/2)."""
  if student_grad.shape != teacher_grad.shape:
    raise ValueError(
        f"gradient attention: student and teacher input gradients must have the same shape; got student "
        f"{student_grad.shape} and teacher {teacher_grad.shape}")
  diff = (student_grad - teacher_grad).reshape(student_grad.shape[0], -1)
  return _safe_norm(diff, axis=-1)


def gradient_attention_loss(
    student_loss_fn: LossFn,
    student_params: Any,
    teacher_loss_fn: LossFn,
    teacher_params: Any,
    x: jax.Array,
) -> jax.Array:
  """Per-example gradient-based attention transfer: ``‖J_S(x) - stop_gradient(J_T(x))‖₂``, ``[batch]``.

  ``J = ∂L/∂x`` is computed by :func:`input_gradient` for each net (same ``x``, each net's own task loss).
  The paper's objective (§3.2) is ``L(W_S, x) + (β/2) ‖J_S - J_T‖₂``; multiply by ``β/2`` in the caller.
  Call this inside the student's loss and take ``jax.grad`` of that w.r.t. ``student_params``: the gradient
  flows through ``J_S`` (double back-propagation) and works under ``jax.jit``. ``J_T`` is under
  ``stop_gradient`` here, because this function, not the train step, computes it from the teacher's
  parameters.

  No public reference exists (the authors announced but never released this part). kdjax follows the
  paper's written form — a non-squared L2 norm of the raw (unnormalised) input gradients per example;
  its gradient at ``J_S = J_T`` is taken as 0.
  """
  j_s = input_gradient(student_loss_fn, student_params, x)
  j_t = jax.lax.stop_gradient(input_gradient(teacher_loss_fn, teacher_params, x))
  return gradient_attention_distance(j_s, j_t)


def flip_invariance_loss(loss_fn: LossFn, params: Any, x: jax.Array, *, axis: int = 2) -> jax.Array:
  """Per-example flip-invariance regulariser on gradient attention: ``‖J(x) - flip(J(flip(x)))‖₂``.

  ``x`` is an NHWC image batch; ``flip`` mirrors it horizontally (``axis=2``, W). The paper (§3.2) adds
  ``(β/2)`` times this to the task loss of a single net (no teacher), asking the input gradient of the
  mirrored image, mirrored back, to equal the gradient of the original; multiply by ``β/2`` in the caller.
  Both gradients depend on ``params`` and both are differentiated (it is one net's regulariser). Returns
  ``[batch]``. ``loss_fn`` as in :func:`input_gradient` (the mirrored image keeps its label).
  """
  if not -x.ndim < axis < x.ndim or axis % x.ndim == 0:
    raise ValueError(f"flip_invariance_loss: axis must be a non-batch axis of x {x.shape}; got {axis}")
  j = input_gradient(loss_fn, params, x)
  j_flip = jnp.flip(input_gradient(loss_fn, params, jnp.flip(x, axis=axis)), axis=axis)
  return gradient_attention_distance(j, j_flip)


# --- the training objective (kdjax train / reproduce) -------------------------------------------------


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``attention_transfer`` method (the authors' CIFAR defaults)."""
  return {"student_layers": ("stage1", "stage2", "stage3"), "teacher_layers": ("stage1", "stage2", "stage3"),
          "beta": 1000.0, "p": 2.0, "mode": "code", "alpha": 0.0, "temperature": 4.0}


def make_objective(*, student_layers, teacher_layers, beta: float, p: float, mode: str, alpha: float,
                   temperature: float):
  """Task loss plus activation attention transfer on the named layer pairs.

  Per example: ``task + w · Σ_j attention_loss(s_j, t_j)`` with ``w = β`` in ``'code'`` mode (the
  authors' ``beta * sum(at_losses)``, β = 10³) or ``β/2`` in ``'paper'`` mode (Eq. 2). The task term is
  cross-entropy on labelled examples (``alpha = 0``, "AT") or Hinton's ``α·T²·KL + (1−α)·CE``
  (``alpha > 0``, "AT+KD"; the authors use α = 0.9, T = 4).
  """
  from kdjax.methods.objective import Objective
  from kdjax.methods.soft_targets import task_loss
  student_layers, teacher_layers = tuple(student_layers), tuple(teacher_layers)
  if len(student_layers) != len(teacher_layers) or not student_layers:
    raise ValueError(f"attention_transfer needs as many student_layers as teacher_layers (>= 1); got "
                     f"{student_layers} and {teacher_layers}")
  if mode not in _MODES:
    raise unknown_name("attention_transfer mode", mode, _MODES)
  weight = beta if mode == "code" else beta / 2

  def fn(student, teacher, batch, progress):
    del progress
    at = attention_loss_pairs([student.features[n] for n in student_layers],
                              [teacher.features[n] for n in teacher_layers], p=p, mode=mode)
    task = task_loss(student.logits, teacher.logits, batch["label"], label_mask=batch["label_mask"], alpha=alpha,
                     temperature=temperature)
    return task + weight * at, {"attention": at}
  return Objective(fn, needs_teacher=True, student_features=student_layers, teacher_features=teacher_layers)
