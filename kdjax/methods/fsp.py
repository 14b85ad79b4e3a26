"""FSP: flow of solution procedure (Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation", CVPR 2017).

The FSP matrix of two feature maps of the *same* network is their channel-by-channel Gram matrix averaged
over positions (:func:`fsp_matrix`); it describes how one layer's solution flows into the next. In stage 1
the student is trained to match the teacher's FSP matrices (:func:`fsp_loss`) — nothing else; stage 2 is
plain task training from the stage-1 weights (PAPERS.md §12). Student and teacher must have the same channel
counts where FSP matrices are taken (the paper's students only drop residual units).

The losses are pure functions of arrays and work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. They do
**not** apply ``jax.lax.stop_gradient`` to the teacher's features: the train step does that. Features are
NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdjax.errors import unknown_name
from kdjax.methods.pooling import pool_to

_MODES = ("code", "paper")
_POOLS = ("avg", "max")


def fsp_matrix(bottom: jax.Array, top: jax.Array, *, pool: str = "avg") -> jax.Array:
  """FSP matrix between a lower feature map and a higher one of the same network.

  Args:
    bottom: ``[batch, H_b, W_b, C_bot]`` (the earlier layer).
    top: ``[batch, H_t, W_t, C_top]`` (the later layer).
    pool: if the spatial sizes differ, the larger map is pooled to the smaller one (integer ratios only):
      ``'avg'`` (default; RepDistiller's ``adaptive_avg_pool2d``) or ``'max'`` (the paper).

  Returns:
    ``[batch, C_top, C_bot]``: ``G[n, a, b] = (1/(h·w)) Σ_{h,w} top[n, h, w, a] · bottom[n, h, w, b]``.

  Paper vs code: the paper writes ``G`` as ``C_bot × C_top`` (first layer's channels first); RepDistiller
  (and kdjax) store the transpose, which the loss does not see. The paper max-pools the larger map;
  RepDistiller average-pools it, to a square ``(H_min, H_min)`` from H alone; kdjax pools each spatial axis
  to the smaller size (identical for square maps) and defaults to average pooling, the code that produced
  the published re-implementation numbers and the golden references.
  """
  if pool not in _POOLS:
    raise unknown_name("fsp_matrix pool", pool, _POOLS)
  if bottom.ndim != 4 or top.ndim != 4 or bottom.shape[0] != top.shape[0]:
    raise ValueError(
        f"fsp_matrix expects two NHWC maps [batch, H, W, C] with the same batch; got bottom "
        f"{bottom.shape} and top {top.shape}")
  size = (min(bottom.shape[1], top.shape[1]), min(bottom.shape[2], top.shape[2]))
  what = f"fsp_matrix(bottom {bottom.shape}, top {top.shape})"
  dtype = jnp.promote_types(jnp.result_type(bottom, top), jnp.float32)  # float16 products overflow past 65504
  bottom = pool_to(bottom.astype(dtype), size, kind=pool, what=what)
  top = pool_to(top.astype(dtype), size, kind=pool, what=what)
  # HIGHEST: GPUs/TPUs otherwise run float32 contractions in TF32/bfloat16, far from the references.
  gram = jnp.einsum("nhwa,nhwb->nab", top, bottom, precision=jax.lax.Precision.HIGHEST)
  return gram / (size[0] * size[1])


def fsp_distance(student_fsp: jax.Array, teacher_fsp: jax.Array, *, mode: str = "code") -> jax.Array:
  """Per-example distance between two FSP matrices ``[batch, C_top, C_bot]`` -> ``[batch]``.

  ``mode='code'`` (default): ``mean_{a,b} (G_s - G_t)²`` — its batch mean is RepDistiller's per-pair
  value (a mean over N·C_top·C_bot). ``mode='paper'``: ``Σ_{a,b} (G_s - G_t)²``, the squared Frobenius
  norm of the paper's loss, ``C_top·C_bot`` times larger.
  """
  if mode not in _MODES:
    raise unknown_name("fsp mode", mode, _MODES)
  if student_fsp.shape != teacher_fsp.shape:
    raise ValueError(
        f"fsp_distance: student and teacher FSP matrices must have the same shape; got student "
        f"{student_fsp.shape} and teacher {teacher_fsp.shape}")
  # float32 or wider (float16 squares overflow past 256); in float32 entries differing by more than ~4e9 give inf.
  dtype = jnp.promote_types(jnp.result_type(student_fsp, teacher_fsp), jnp.float32)
  sq = jnp.square(student_fsp.astype(dtype) - teacher_fsp.astype(dtype))
  return jnp.mean(sq, axis=(1, 2)) if mode == "code" else jnp.sum(sq, axis=(1, 2))


def fsp_loss(
    student_feats: Sequence[jax.Array],
    teacher_feats: Sequence[jax.Array],
    *,
    mode: str = "code",
    weights: Sequence[float] | jax.Array | None = None,
    pool: str | None = None,
) -> jax.Array:
  """Per-example FSP loss over consecutive feature pairs, ``[batch]``.

  Args:
    student_feats: ``L >= 2`` NHWC maps of the student, in network order; pair ``i`` is the FSP matrix of
      maps ``(i, i+1)``, ``i = 0..L-2`` (for the paper's ResNets: each section's input and output).
    teacher_feats: the teacher's ``L`` maps at the same points. ``student_feats[i]`` and
      ``teacher_feats[i]`` must have the same channel count; their spatial sizes may differ.
    mode: ``'code'`` (default) or ``'paper'``, see below.
    weights: per-pair weights ``λ_i`` (``L-1`` values); default all 1 (the paper sets all λ_i equal;
      RepDistiller has none).
    pool: ``'avg'`` or ``'max'`` for spatial mismatches inside a pair (see :func:`fsp_matrix`); default
      ``'avg'`` in ``'code'`` mode, ``'max'`` in ``'paper'`` mode.

  Returns:
    ``[batch]``: ``Σ_i λ_i · d(G_i^S, G_i^T)`` with ``d`` from :func:`fsp_distance`. In ``'code'`` mode the
    batch mean equals RepDistiller's ``sum(FSP(...)(g_s, g_t))`` (``mean`` of squared differences over
    N·C_top·C_bot per pair, summed over pairs).

  Paper vs code: the paper's loss is ``(1/N) Σ_x Σ_i λ_i ‖G_i^T - G_i^S‖₂²`` — a sum of squares over matrix
  entries, averaged over examples (``mode='paper'``, which also max-pools). RepDistiller, the only public
  implementation, divides by ``C_top·C_bot`` too and average-pools. kdjax defaults to the code because its
  values are the golden references and its scale does not grow with the channel counts; rescale the
  learning rate or weight (by about ``C_top·C_bot``) when switching.
  """
  if mode not in _MODES:
    raise unknown_name("fsp mode", mode, _MODES)
  if pool is None:
    pool = "avg" if mode == "code" else "max"
  n = len(student_feats)
  if n != len(teacher_feats) or n < 2:
    raise ValueError(
        f"fsp_loss needs the same number (>= 2) of student and teacher feature maps; got {n} student "
        f"and {len(teacher_feats)} teacher")
  for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
    if s.ndim != 4 or t.ndim != 4:
      raise ValueError(
          f"fsp_loss expects NHWC maps [batch, H, W, C]; at index {i} got student {s.shape} and "
          f"teacher {t.shape}")
    if s.shape[-1] != t.shape[-1]:
      raise ValueError(
          f"fsp_loss: FSP needs equal student and teacher channel counts at every index; at index {i} "
          f"the student has {s.shape[-1]} channels {s.shape} and the teacher {t.shape[-1]} {t.shape}")
    if s.shape[0] != t.shape[0]:
      raise ValueError(
          f"fsp_loss: student and teacher batch sizes differ at index {i}: student {s.shape}, "
          f"teacher {t.shape}")
  if weights is not None and len(weights) != n - 1:
    raise ValueError(f"fsp_loss: weights needs one value per pair ({n - 1}); got {len(weights)}")
  total = 0.0
  for i in range(n - 1):
    g_s = fsp_matrix(student_feats[i], student_feats[i + 1], pool=pool)
    g_t = fsp_matrix(teacher_feats[i], teacher_feats[i + 1], pool=pool)
    d = fsp_distance(g_s, g_t, mode=mode)
    total = total + (d if weights is None else weights[i] * d)
  return total


# --- the training objective of stage 1 (kdjax train / reproduce) ---------------------------------------


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``fsp`` (stage-1) method: the paper's form by default."""
  return {"student_layers": ("stem", "stage1", "stage2", "stage3"),
          "teacher_layers": ("stem", "stage1", "stage2", "stage3"), "mode": "paper", "weights": ()}


def make_objective(*, student_layers, teacher_layers, mode: str, weights):
  """Stage 1 of the paper (Algorithm 1): the FSP loss alone, no task loss.

  ``student_layers[i]``/``teacher_layers[i]`` are the maps whose consecutive pairs give the FSP
  matrices (e.g. each section's input and output). Stage 2 is plain training from the stage-1
  weights: method ``supervised`` with ``init_from`` = the stage-1 run (no FSP term, §4.2).
  ``mode='paper'`` (default here: faithful to the paper's stage) sums squares over matrix entries
  and max-pools; ``'code'`` is RepDistiller's mean and average pooling.
  """
  from kdjax.methods.objective import Objective
  student_layers, teacher_layers = tuple(student_layers), tuple(teacher_layers)
  if len(student_layers) != len(teacher_layers) or len(student_layers) < 2:
    raise ValueError(f"fsp needs the same number (>= 2) of student_layers and teacher_layers; got "
                     f"{student_layers} and {teacher_layers}")
  weights = tuple(weights) or None

  def fn(student, teacher, batch, progress):
    del batch, progress
    loss = fsp_loss([student.features[n] for n in student_layers], [teacher.features[n] for n in teacher_layers],
                    mode=mode, weights=weights)
    return loss, {"fsp": loss}
  return Objective(fn, needs_teacher=True, student_features=student_layers, teacher_features=teacher_layers)
