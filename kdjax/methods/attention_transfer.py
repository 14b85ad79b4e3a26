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

* paper, Eq. 2: ``L_task + (β/2) Σ_j attention_loss(..., mode='paper')`` per example, β = 10³, where
  ``attention_loss(mode='paper') = ‖a_s − a_t‖₂ / (H·W)``: the paper divides β "by the number of elements
  in the attention map and the batch size"; the loss divides by H·W and the step's batch mean by the batch
  size;
* released code: ``L_task + β · Σ_j mean_batch attention_loss(..., mode='code')``, β = 10³, no ½ — the form
  every public implementation (and kdjax's default) uses.

Training stages: ``attention_transfer`` (:func:`make_objective`, activation AT on the shared distillation
step) and ``attention_transfer_gradient`` (:func:`make_gradient_program`, its own step, because both input
gradients are computed inside the jitted step and the student's is differentiated again).

The losses are pure functions of arrays and work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. The
activation losses do **not** apply ``jax.lax.stop_gradient`` to the teacher's features: the train step
does that. (The gradient-based loss computes the teacher's input gradient itself, from the teacher's
parameters, so it stops that gradient itself.) Features are NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

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

  Numerics: each example's features are first divided by their largest magnitude (a constant for the
  gradient: the normalised map does not depend on it), so ``|feat|^p`` neither overflows (features of 1e10
  would give inf and a zero map with zero gradient in float32) nor underflows, in any float dtype; the
  computation runs in float32 or wider. This differs from the references only for features whose map norm
  ``‖mean_c |feat|^p‖₂`` is below their 1e-12 epsilon (magnitudes below ~1e-6 for p = 2), where the
  references return an unnormalised, nearly zero map and kdjax the normalised one. An empty batch gives
  ``[0, H*W]``.
  """
  check_positive("p", p)
  if feat.ndim != 4:
    raise ValueError(f"attention_map expects an NHWC feature [batch, H, W, C]; got shape {feat.shape}")
  feat = jnp.asarray(feat)
  feat = feat.astype(jnp.promote_types(feat.dtype, jnp.float32))
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(feat), axis=(1, 2, 3), keepdims=True))
  feat = feat / jnp.where(scale > 0, scale, 1.0)  # the map is scale-free; this keeps |feat|^p in range
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
  q = jnp.mean(q, axis=-1).reshape(feat.shape[0], feat.shape[1] * feat.shape[2])  # not -1: batch 0 is allowed
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
    mode: ``'code'`` (default) — ``mean_{hw} (a_s - a_t)²`` per example; ``'paper'`` —
      ``‖a_s - a_t‖₂ / (H·W)`` (the non-squared L2 distance divided by the number of elements of the
      compared maps) per example.

  Returns:
    ``[batch]``. In ``'code'`` mode the batch mean equals the released codes' per-pair value
    (``at_loss`` of szagoruyko/attention-transfer, RepDistiller's ``Attention``: a mean over N·H·W). In
    ``'paper'`` mode the batch mean is the paper's per-layer term before ``β/2``: ``Σ_b ‖a_s - a_t‖₂``
    divided by the map's H·W and the batch size. Multiply by β (code) or β/2 (paper) in the caller; see
    the module docstring.

  Paper vs code (both ``szagoruyko/attention-transfer`` and RepDistiller):
    * The paper (Eq. 2) penalises the non-squared L2 distance ``‖a_s - a_t‖₂`` per example, weighted by
      β/2 with "β = 10³ divided by the number of elements in the attention map and the batch size"
      (PAPERS.md §5(a)): ``'paper'`` mode returns ``‖a_s - a_t‖₂ / (H·W)`` (H·W after any pooling), and the step's
      batch mean supplies the division by the batch size. The code uses the **mean of squared**
      differences over N·H·W, times β (no ½). kdjax defaults to the code: its results are the ones
      reported and reproduced, and the squared form is smooth at 0 (the norm's gradient there is taken as
      0 in ``'paper'`` mode).
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
  return _safe_norm(a_s - a_t, axis=-1) / a_s.shape[-1]


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


def input_gradient(loss_fn: LossFn, params: Any, x: jax.Array, *, has_aux: bool = False):
  """Gradient attention ``J = ∂L/∂x``, the same shape as ``x``.

  Args:
    loss_fn: ``loss_fn(params, x)`` returning per-example losses ``[batch]`` (preferred) or a scalar; a
      vector is summed first, so each example's ``J`` is the gradient of that example's own loss. (The
      gradient of a batch-*mean* scalar is ``1/batch`` times smaller; a net whose examples interact, e.g.
      BatchNorm in training mode, couples the examples' gradients.) Close over labels, ``train`` flags and
      RNGs. With ``has_aux`` it returns ``(losses, aux)``.
    params: the parameters ``loss_fn`` is evaluated at. Differentiating the result w.r.t. them is double
      back-propagation, which ``jax.grad`` does as is.
    x: the input batch, ``[batch, ...]``, floating point.
    has_aux: ``loss_fn`` also returns auxiliary outputs (e.g. the logits of the same forward pass).

  Returns:
    ``J`` (shape of ``x``), or ``(J, (losses, aux))`` with ``has_aux`` — the losses and ``aux`` of the same
    forward pass, still differentiable w.r.t. ``params``.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"input_gradient: gradient attention needs floating-point inputs (∂L/∂x); got x of dtype "
                    f"{x.dtype}, shape {x.shape} (integer inputs, e.g. token ids, have no input gradient)")

  def total(inputs):
    out = loss_fn(params, inputs)
    losses, aux = out if has_aux else (out, None)
    if losses.ndim > 1 or (losses.ndim == 1 and losses.shape[0] != x.shape[0]):
      raise ValueError(
          f"input_gradient: loss_fn must return a scalar or per-example losses [batch={x.shape[0]}]; "
          f"got shape {losses.shape}")
    return jnp.sum(losses), (losses, aux)
  j, (losses, aux) = jax.grad(total, has_aux=True)(x)
  return (j, (losses, aux)) if has_aux else j


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
  authors' ``beta * sum(at_losses)``, β = 10³, on the mean squared difference over H·W) or ``β/2`` in
  ``'paper'`` mode (Eq. 2, β = 10³ on ``‖a_s − a_t‖₂ / (H_j·W_j)``; with the step's batch mean this is the
  paper's β "divided by the number of elements in the attention map and the batch size"). The task term is
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


# --- gradient-based attention transfer as a training stage ---------------------------------------------

GRADIENT_VARIANTS = ("teacher", "flip")


def gradient_loss_config() -> dict:
  """``config.loss`` fields of the ``attention_transfer_gradient`` method (see :func:`make_gradient_program`)."""
  return {"variant": "teacher", "beta": 1000.0, "per_element": True, "alpha": 0.0, "temperature": 4.0}


def _check_gradient_fields(variant: str, beta: float, per_element: bool, alpha: float, temperature: float) -> None:
  if variant not in GRADIENT_VARIANTS:
    raise unknown_name("attention_transfer_gradient variant", variant, GRADIENT_VARIANTS)
  if isinstance(beta, bool) or not isinstance(beta, int | float) or beta < 0:
    raise ValueError(f"attention_transfer_gradient: beta must be a number >= 0; got {beta!r}")
  if not isinstance(per_element, bool):
    raise ValueError(f"attention_transfer_gradient: per_element must be True or False; got {per_element!r}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"attention_transfer_gradient: alpha (the KD soft-term weight) must be in [0, 1]; got {alpha}")
  if variant == "flip" and alpha > 0:
    raise ValueError(f"attention_transfer_gradient: variant 'flip' trains one net without a teacher, so there are "
                     f"no soft targets; alpha must be 0, got {alpha}")
  check_positive("temperature", temperature)


def _check_teacher_inputs(teacher, teacher_variables, example: jax.Array, num_classes: int) -> None:
  """Fails early, naming the shapes, when the teacher cannot read the student's inputs or labels."""
  from kdjax.models import apply_model
  try:
    logits = jax.eval_shape(lambda v, x: apply_model(teacher, v, x, train=False).logits, teacher_variables, example)
  except Exception as e:  # Flax's shape errors do not say which net or why the shapes must agree
    raise ValueError(
        f"attention_transfer_gradient: the teacher ({type(teacher).__name__}) cannot take the student's inputs "
        f"of shape {tuple(example.shape[1:])} ({type(e).__name__}: {e}). Gradient attention compares ∂L/∂x of "
        "both nets at the same input, so the teacher must have been trained on inputs of the student's shape "
        "(the same dataset)") from e
  if logits.shape[-1] != num_classes:
    raise ValueError(
        f"attention_transfer_gradient: the teacher has {logits.shape[-1]} classes and the student's dataset "
        f"{num_classes}; both input gradients are of the cross-entropy with the same labels, so they must agree")


def make_gradient_program(*, variant: str, beta: float, per_element: bool, alpha: float, temperature: float):
  """Gradient-based attention transfer (§3.2) as a stage: a :class:`kdjax.train.StageProgram`.

  Per example ``b`` (``m_b`` = 1 for labelled examples, 0 for unlabelled ones):

  * ``variant='teacher'``: ``task_b + w · m_b · ‖J_S(x)_b − J_T(x)_b‖₂``;
  * ``variant='flip'`` (no teacher): ``task_b + w · m_b · ‖J(x)_b − flip(J(flip(x)))_b‖₂``, flipping W;

  with ``J = ∂(Σ_b m_b · CE_b)/∂x`` (:func:`input_gradient`: each labelled example's own cross-entropy
  gradient, not the ``1/batch`` smaller gradient of a batch mean), ``w = (β/2) / D`` where ``D`` is the
  number of input elements (``H·W·C``; ``per_element=False``: ``D = 1``), and ``task = m · CE``
  (``alpha = 0``) or Hinton's ``α·T²·KL + (1−α)·m·CE`` (``alpha > 0``, "gradient AT + KD"; the teacher's
  logits come from the same forward pass as ``J_T``). The step minimises the batch mean by double
  back-propagation through ``J_S`` (``jax.grad`` of a loss that calls ``jax.grad`` w.r.t. ``x``), inside
  the jitted step.

  Sources and choices (PAPERS.md §5(a); the authors never released gradient AT, so no public code exists):

  * Paper: the objective ``L(W_S, x) + (β/2) ‖J_S − J_T‖₂`` with the non-squared L2 norm of the raw
    (unnormalised) input gradients, ``J = ∂L/∂x`` of each net's own task loss, and the flip-invariance
    regulariser ``L(W, x) + (β/2) ‖J(x) − flip(J(flip(x)))‖₂`` for one net.
  * Reconstruction — β's scale: the paper gives no β for gradient AT. kdjax carries over the rule it states
    for activation AT, "β = 10³ divided by the number of elements in the attention map and the batch size":
    the attention map here is ``J`` (``D`` elements) and the batch mean does the batch-size division; so the
    default is β = 10³ with ``per_element=True``, a weight of ``500 / D`` on the norm (0.64 for 28×28×1).
  * Choice — per-example ``J``: the gradient of each example's own loss (a sum over the batch), so the
    term does not shrink with the batch size as it would for the gradient of a batch-mean loss.
  * Choice — the student is in training mode for ``J_S`` (one forward pass gives the task loss, ``J_S``
    and the new BatchNorm statistics, as autograd on a training-mode loss would); with BatchNorm the
    batch statistics couple the examples, so ``J_S`` of one example also carries the others' losses.
    Nets without BatchNorm (the MLPs of the small-scale protocol) are unaffected. The teacher runs in
    evaluation mode (running statistics, no dropout) under ``stop_gradient``, as every teacher in kdjax.
    The flipped forward pass of ``'flip'`` uses its own dropout key and its BatchNorm statistics are
    discarded (the state keeps those of the original batch).
  * Choice — unlabelled transfer examples (``label_mask`` 0): ``J`` needs a label, so they contribute
    neither CE nor the gradient term (only the KD soft term when ``alpha > 0``). The paper trains on fully
    labelled CIFAR, where every example counts; pseudo-labels (the teacher's argmax) were not used because
    the paper does not describe them.
  * The ``J`` of both nets is of the cross-entropy also when ``alpha > 0`` (the paper's ``L`` is the task
    loss).

  Args:
    variant: ``'teacher'`` (student matches a teacher's input gradients; needs ``teacher_workdir``, one
      teacher, run live because its input gradient is needed) or ``'flip'`` (flip invariance, no teacher;
      inputs ``[batch, H, W, C]``).
    beta: the paper's β (≥ 0); the weight on the per-example norm is ``β/2`` (divided by ``D`` if
      ``per_element``).
    per_element: divide β by the number of input elements (the paper's rule for activation AT, above).
    alpha: KD soft-term weight in ``[0, 1]`` (``'teacher'`` only); 0 = cross-entropy only.
    temperature: KD temperature (used when ``alpha > 0``).

  Returns:
    A :class:`kdjax.train.StageProgram` whose state is a :class:`kdjax.train.TrainState` (the student's
    ``params``/``batch_stats``, its optimizer state, step and RNG). The step's metrics: ``loss``,
    ``cross_entropy`` and ``gradient_attention`` (the unweighted norm, both averaged over labelled
    examples), ``train_accuracy``, ``nonfinite``.

  Raises:
    TypeError: (at the first step) inputs that are not floating point, which have no input gradient.
    ValueError: bad loss fields; a teacher that cannot read the student's inputs or has another number of
      classes; several teachers; ``'flip'`` on inputs that are not ``[batch, H, W, C]``.
  """
  from kdjax import train as ktrain
  from kdjax.methods.soft_targets import hard_label_loss, task_loss
  from kdjax.models import apply_model
  _check_gradient_fields(variant, beta, per_element, alpha, temperature)
  with_teacher = variant == "teacher"

  def init_state(setup):
    return ktrain.create_train_state(setup.student, setup.tx, setup.example, setup.config.seed,
                                     init_variables=setup.init_variables)

  def make_step(setup):
    student, tx = setup.student, setup.tx
    example_shape = tuple(setup.example.shape[1:])
    weight = beta / 2 / (math.prod(example_shape) if per_element else 1)
    teacher = None
    if with_teacher:
      if len(setup.teacher_models) != 1:
        raise ValueError(f"attention_transfer_gradient takes one teacher (its input gradient is matched); got "
                         f"{len(setup.teacher_models)} in teacher_workdir")
      teacher = setup.teacher_models[0]
      _check_teacher_inputs(teacher, setup.teacher_variables[0], setup.example, setup.dataset.num_classes)
    elif len(example_shape) != 3:
      raise ValueError(f"attention_transfer_gradient variant 'flip' mirrors images [batch, H, W, C] along W; the "
                       f"dataset's examples have shape {example_shape}")

    def step(state, batch, teacher_variables=()):
      x = batch["image"]
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"attention_transfer_gradient needs floating-point inputs: the attention is the input "
                        f"gradient ∂L/∂x; got images of dtype {x.dtype}, shape {x.shape}")
      rng = jax.random.fold_in(state.rng, state.step)
      mask = batch["label_mask"].astype(jnp.float32)
      labels = jnp.where(mask > 0, batch["label"], 0)

      teacher_logits = j_t = None
      if teacher is not None:
        def teacher_ce(variables, inputs):
          logits = apply_model(teacher, variables, inputs, train=False).logits
          return hard_label_loss(logits, labels) * mask, logits
        j_t, (_, teacher_logits) = input_gradient(teacher_ce, teacher_variables[0], x, has_aux=True)
        j_t, teacher_logits = jax.lax.stop_gradient((j_t, teacher_logits))

      def student_ce(key):
        def fn(params, inputs):
          out = apply_model(student, ktrain._variables(params, state.batch_stats), inputs, train=True,
                            rngs={"dropout": key})
          return hard_label_loss(out.logits, labels) * mask, out
        return fn

      def loss_fn(trainable):
        params, _ = trainable
        j_s, (ce, out) = input_gradient(student_ce(rng), params, x, has_aux=True)
        if teacher is not None:
          distance = gradient_attention_distance(j_s, j_t)
        else:
          j_flip, _ = input_gradient(student_ce(jax.random.fold_in(rng, 1)), params, jnp.flip(x, axis=2),
                                     has_aux=True)
          distance = gradient_attention_distance(j_s, jnp.flip(j_flip, axis=2))
        distance = distance * mask
        task = ce if alpha == 0 else task_loss(out.logits, teacher_logits, batch["label"], label_mask=mask,
                                               alpha=alpha, temperature=temperature)
        per_example = task + weight * distance
        return jnp.mean(per_example), (out, per_example, ce, distance)

      trainable = (state.params, state.aux_params)
      (loss, (out, per_example, ce, distance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, state.opt_state, trainable)
      params, aux_params = optax.apply_updates(trainable, updates)
      (params, aux_params, batch_stats, opt_state), nonfinite = ktrain.skip_if_nonfinite(
          ktrain.all_finite(loss, grads), (params, aux_params, out.batch_stats, opt_state),
          (state.params, state.aux_params, state.batch_stats, state.opt_state))
      new_state = state.replace(step=state.step + 1, params=params, aux_params=aux_params, batch_stats=batch_stats,
                                opt_state=opt_state)
      correct = (jnp.argmax(out.logits, -1) == batch["label"]).astype(jnp.float32)
      metrics = {"loss": ktrain.mean_metric(per_example),
                 "cross_entropy": ktrain.mean_metric(ce, mask),
                 "gradient_attention": ktrain.mean_metric(distance, mask),
                 "train_accuracy": ktrain.mean_metric(correct, mask),
                 "nonfinite": nonfinite}
      return new_state, metrics

    return step

  return ktrain.StageProgram(init_state, make_step, needs_teacher=with_teacher, cacheable_teacher=False)
