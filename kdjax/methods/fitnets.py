"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015, arXiv 1412.6550).

Two training stages (PAPERS.md §3):

* Stage 1 (hints, Eq. 3): the student up to its *guided* layer, followed by a learned regressor
  (:class:`ConvRegressor`, built by :func:`make_regressor`), is trained to reproduce the teacher's *hint*
  layer with :func:`hint_loss`.
* Stage 2 (KD, Eq. 2): the whole student is trained with :func:`kd_loss_no_t2`, a cross-entropy on the
  labels plus ``λ`` times the cross-entropy to the teacher's temperature-softened outputs, **without** the
  ``τ²`` factor of Hinton et al.; ``λ`` is annealed linearly from 4 to 1 (:func:`annealed_weight`).

The losses are pure functions of arrays; they work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. They
do **not** apply ``jax.lax.stop_gradient`` to the teacher's inputs: the train step does that (DESIGN.md),
so the same functions serve when a caller wants gradients on both sides. Features are NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.errors import check_class_ids, check_positive, check_same_shape, unknown_name
from kdjax.models.batch_norm import BatchNorm

_REDUCTIONS = ("mean", "paper")
_ACTIVATIONS = ("relu", "maxout", "none")
_REGRESSOR_MODES = ("paper", "same")


def hint_loss(
    student_feat: jax.Array,
    teacher_feat: jax.Array,
    *,
    reduction: str = "mean",
    names: tuple[str, str] | None = None,
) -> jax.Array:
  """Per-example FitNets hint loss between a regressed guided layer and a hint layer.

  Args:
    student_feat: ``r(v_g(x))``, the student's guided-layer output *after* the regressor,
      ``[batch, ...]`` (``[batch, H, W, C]`` for conv hints).
    teacher_feat: ``u_h(x)``, the teacher's hint-layer output, same shape.
    reduction: ``'mean'`` (default) — mean over every non-batch element of the squared difference,
      ``mean_{h,w,c} (r - u)²``; ``'paper'`` — the paper's ``½ Σ_{h,w,c} (r - u)²`` (Eq. 3).
    names: optional ``(guided_layer_name, hint_layer_name)`` used in the shape-mismatch error.

  Returns:
    ``[batch]`` per-example losses. With ``reduction='mean'`` their batch mean is RepDistiller's
    ``HintLoss`` (``nn.MSELoss()``, a mean over all N·C·H·W elements).

  Paper vs public code:
    * The paper (Eq. 3) and its code (``FitNets/costs/HintCost.py``) use ``½ ‖u_h - r(v_g)‖²``: a sum over
      an example's features with factor ½, then a mean over the batch (``reduction='paper'``).
    * RepDistiller (``distiller_zoo/FitNet.py``) and mdistiller use ``nn.MSELoss()``: a mean over *all*
      elements, no ½ (``reduction='mean'``), with hint weight β = 100. kdjax defaults to this form because
      it is what later work, the golden references and most reproductions use, and its scale does not
      depend on the feature size; ``'paper'`` is ``C·H·W/2`` times larger.
    * The FitNets code switches to a cross-entropy form for sigmoid/tanh hint layers (and, through an
      indentation bug, returns nothing there); kdjax always uses the squared error.
  """
  if reduction not in _REDUCTIONS:
    raise unknown_name("hint_loss reduction", reduction, _REDUCTIONS)
  what = "hint_loss"
  if names is not None:
    what = f"hint_loss(guided layer {names[0]!r}, hint layer {names[1]!r})"
  try:
    check_same_shape(what, student_feat, teacher_feat)
  except ValueError as err:
    # The usual cause is a missing or mis-sized regressor; say how to fix it.
    raise ValueError(
        f"{err}; map the guided layer onto the hint's shape with a regressor "
        "(kdjax.methods.fitnets.make_regressor)") from None
  # float32 or wider: float16 squares overflow past 256. In float32 they overflow past ~1.8e19 (features
  # differing by more than ~4e9), where the loss is inf and the step's non-finite guard stops training.
  dtype = jnp.promote_types(jnp.result_type(student_feat, teacher_feat), jnp.float32)
  sq = jnp.square(student_feat.astype(dtype) - teacher_feat.astype(dtype))
  axes = tuple(range(1, sq.ndim))
  if reduction == "mean":
    return jnp.mean(sq, axis=axes)
  return 0.5 * jnp.sum(sq, axis=axes)


class ConvRegressor(nn.Module):
  """The FitNets regressor ``r``: maps the student's guided layer onto the teacher's hint layer.

  ``[batch, H_g, W_g, C_g] -> [batch, H_h, W_h, features]``. A convolution, optional BatchNorm, then
  the activation:

  * ``'relu'``: ``max(0, ·)``.
  * ``'maxout'``: the convolution has ``features · maxout_pieces`` output channels; each output channel
    is the max over its ``maxout_pieces`` consecutive channels (the paper's teachers are maxout nets and
    the regressor must use the hint layer's nonlinearity, §3.1 / PAPERS §3a).
  * ``'none'``: linear (for a pre-activation hint).

  Build it with :func:`make_regressor`, which picks the kernel from the two shapes. Parameters use Flax's
  default initialisers (the paper draws every weight from U(-0.005, 0.005)).
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  padding: str = "VALID"
  activation: str = "relu"
  maxout_pieces: int = 2
  use_batchnorm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.activation not in _ACTIVATIONS:
      raise unknown_name("regressor activation", self.activation, _ACTIVATIONS)
    if x.ndim != 4:
      raise ValueError(f"ConvRegressor expects an NHWC guided feature [batch, H, W, C]; got shape {x.shape}")
    pieces = self.maxout_pieces if self.activation == "maxout" else 1
    if pieces < 1:
      raise ValueError(f"maxout_pieces must be >= 1, got {self.maxout_pieces}")
    y = nn.Conv(self.features * pieces, tuple(self.kernel_size), padding=self.padding,
                use_bias=not self.use_batchnorm, name="conv")(x)
    if self.use_batchnorm:
      y = BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(y)
    if self.activation == "relu":
      y = nn.relu(y)
    elif self.activation == "maxout":
      # Consecutive channels form one unit's pieces, as in pylearn2's maxout layers.
      y = y.reshape(*y.shape[:-1], self.features, pieces).max(axis=-1)
    return y


def make_regressor(
    guided_shape: Sequence[int],
    hint_shape: Sequence[int],
    *,
    mode: str = "paper",
    activation: str = "relu",
    maxout_pieces: int = 2,
    kernel_size: int = 1,
    names: tuple[str, str] | None = None,
) -> ConvRegressor:
  """Builds the regressor that maps a guided feature of ``guided_shape`` to ``hint_shape``.

  Args:
    guided_shape: the student's guided-layer shape, NHWC ``[batch, H, W, C]`` or ``[H, W, C]``.
    hint_shape: the teacher's hint-layer shape, same layout.
    mode: ``'paper'`` (default) — the paper's convolutional regressor: a VALID convolution with kernel
      ``k_i = N_{g,i} - N_{h,i} + 1`` per spatial dimension, so its output has the hint's spatial size,
      followed by ``activation`` and no BatchNorm (§3.1, "convolutional regressor"); it needs the guided
      map to be at least as large as the hint (the FitNets code raises ``NotImplementedError`` when zero
      padding would be needed). ``'same'`` — the later codes' regressor (RepDistiller ``ConvReg``,
      AT's F-ActT adaptation): a ``kernel_size`` × ``kernel_size`` SAME convolution (1 or 3), BatchNorm
      and ``activation``; the spatial sizes must already match.
    activation: ``'relu'``, ``'maxout'`` (``maxout_pieces`` pieces) or ``'none'``; use the hint layer's
      own nonlinearity (a ReLU net's post-ReLU hint: ``'relu'``; the paper's maxout teachers: ``'maxout'``).
    maxout_pieces: pieces per maxout unit (the paper's conv layers use 2).
    kernel_size: the ``'same'`` mode kernel (1 or 3).
    names: optional ``(guided_layer_name, hint_layer_name)`` for error messages.

  RepDistiller's ``ConvReg`` also handles a guided map exactly twice (stride-2 conv) or half (transposed
  conv) the hint's size; kdjax covers a larger guided map with the paper's VALID kernel instead and does
  not up-sample.
  """
  if mode not in _REGRESSOR_MODES:
    raise unknown_name("regressor mode", mode, _REGRESSOR_MODES)
  if activation not in _ACTIVATIONS:
    raise unknown_name("regressor activation", activation, _ACTIVATIONS)
  guided, hint = tuple(guided_shape), tuple(hint_shape)
  if len(guided) not in (3, 4) or len(hint) not in (3, 4):
    raise ValueError(
        f"make_regressor expects NHWC shapes [batch, H, W, C] or [H, W, C]; got guided {guided} "
        f"and hint {hint}")
  (hg, wg, _), (hh, wh, ch) = guided[-3:], hint[-3:]
  label = ""
  if names is not None:
    label = f" (guided layer {names[0]!r}, hint layer {names[1]!r})"
  if mode == "paper":
    kh, kw = hg - hh + 1, wg - wh + 1
    if kh < 1 or kw < 1:
      raise ValueError(
          f"make_regressor{label}: the paper's VALID-conv regressor needs a guided map at least as large "
          f"as the hint; got guided {guided} and hint {hint} (spatial {(hg, wg)} < {(hh, wh)}); pick a "
          "shallower guided layer or a deeper hint layer")
    return ConvRegressor(features=ch, kernel_size=(kh, kw), padding="VALID", activation=activation,
                         maxout_pieces=maxout_pieces, use_batchnorm=False)
  if (hg, wg) != (hh, wh):
    raise ValueError(
        f"make_regressor{label}: mode 'same' keeps the spatial size, so guided and hint maps must have "
        f"equal H, W; got guided {guided} and hint {hint} (use mode='paper' for a larger guided map)")
  if kernel_size not in (1, 3):
    raise ValueError(f"make_regressor: kernel_size must be 1 or 3 in mode 'same', got {kernel_size}")
  return ConvRegressor(features=ch, kernel_size=(kernel_size, kernel_size), padding="SAME",
                       activation=activation, maxout_pieces=maxout_pieces, use_batchnorm=True)


def kd_loss_no_t2(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 3.0,
    soft_weight: float | jax.Array,
    hard_weight: float = 1.0,
) -> jax.Array:
  """Per-example FitNets stage-2 KD loss (Eq. 2): ``CE(y, P_S) + λ · H(P_T^τ, P_S^τ)``, no ``τ²``.

  Args:
    student_logits: ``a_S``, ``[batch, classes]``.
    teacher_logits: ``a_T``, ``[batch, classes]``. For an ensemble of teachers, average the logits
      (geometric mean of probabilities) before calling, as the paper allows.
    labels: integer class indices ``[batch]``, or target probabilities ``[batch, classes]``.
    temperature: ``τ`` (> 0); the paper uses 3.
    soft_weight: ``λ`` (>= 0), a float or a traced scalar such as :func:`annealed_weight` of the step.
    hard_weight: weight of the label term (the paper: 1; the FitNets code's ``λ_target``).

  Returns:
    ``[batch]``: ``hard_weight · (-Σ_k y_k log softmax(a_S)_k)
    + λ · (-Σ_k softmax(a_T/τ)_k log softmax(a_S/τ)_k)``.

  Paper vs code: the paper and its code (``FitNets/costs/KDCost.py``, which divides the softmax layer's
  weights by τ, the same as ``a/τ``) both use the soft *cross-entropy* with no ``τ²``; kdjax follows them.
  Hinton et al.'s ``τ²·KL`` (``kdjax.methods.soft_targets``) differs by the factor ``τ²`` (9 at τ = 3, a
  different balance against the label term) and, in value only, by the teacher's entropy (KL = H - H(P_T)).
  """
  check_positive("temperature", temperature)
  try:
    if float(soft_weight) < 0:
      raise ValueError(f"soft_weight must be >= 0, got {soft_weight!r}")
  except (TypeError, jax.errors.ConcretizationTypeError):
    pass  # traced (an annealed weight under jit): cannot be checked without a host sync
  check_same_shape("kd_loss_no_t2 logits", student_logits, teacher_logits)
  if student_logits.ndim != 2:
    raise ValueError(f"kd_loss_no_t2 expects logits [batch, classes]; got shape {student_logits.shape}")
  log_p_s = jax.nn.log_softmax(student_logits, axis=-1)
  labels = jnp.asarray(labels)
  if labels.ndim == 1:
    if labels.shape[0] != student_logits.shape[0]:
      raise ValueError(f"kd_loss_no_t2: labels {labels.shape} do not match logits {student_logits.shape}")
    num_classes = student_logits.shape[-1]
    check_class_ids("kd_loss_no_t2 labels", labels, num_classes)  # eager; traced bad labels give NaN below
    ids = labels.astype(jnp.int32)
    picked = jnp.take_along_axis(log_p_s, jnp.clip(ids, 0, num_classes - 1)[:, None], axis=-1)[:, 0]
    hard = jnp.where((ids >= 0) & (ids < num_classes), -picked, jnp.nan)
  else:
    check_same_shape("kd_loss_no_t2 labels (as probabilities) vs logits", labels, student_logits)
    hard = -jnp.sum(labels * log_p_s, axis=-1)
  p_t = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  log_p_s_tau = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  soft = -jnp.sum(p_t * log_p_s_tau, axis=-1)
  return hard_weight * hard + soft_weight * soft


def annealed_weight(
    step: int | jax.Array,
    *,
    start: float = 4.0,
    end: float = 1.0,
    decay_steps: int | float,
) -> jax.Array:
  """FitNets' soft-target weight ``λ``: linear from ``start`` at step 0 to ``end`` at ``decay_steps``, then flat.

  The paper initialises λ to 4 and decays it linearly to 1 over 500 epochs on CIFAR (150 epochs on MNIST);
  count ``step`` and ``decay_steps`` in the same unit (epochs, steps, or fractions of the stage as
  :func:`make_kd_objective` does). jit-safe: ``step`` may be traced.
  Code differences: the CIFAR yaml starts at 5 and saturates at epoch 400; the MNIST yaml decays to 0.
  """
  check_positive("decay_steps", decay_steps)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
  return start + (end - start) * frac


# --- the training objectives of the two stages (kdjax train / reproduce) -------------------------------


def hint_loss_config() -> dict:
  """``config.loss`` fields of stage 1 (``fitnets_hint``)."""
  return {"guided_layer": "stage2", "hint_layer": "stage2", "regressor": "paper",
          "regressor_activation": "relu", "kernel_size": 1, "reduction": "paper"}


def _regressor_for(student_feat, teacher_feat, *, guided_layer, hint_layer, regressor, regressor_activation,
                   kernel_size) -> ConvRegressor:
  return make_regressor(student_feat.shape, teacher_feat.shape, mode=regressor, activation=regressor_activation,
                        kernel_size=kernel_size, names=(f"student:{guided_layer}", f"teacher:{hint_layer}"))


def _apply_regressor(reg: ConvRegressor, params, guided: jax.Array) -> jax.Array:
  """The regressor in training mode. Its BatchNorm (mode ``'same'``, RepDistiller's ``ConvReg``) always
  normalises with the batch's statistics: the regressor only exists during training and is discarded,
  so running statistics would never be read and are not kept."""
  if not reg.use_batchnorm:
    return reg.apply({"params": params}, guided, train=True)
  unused_stats = {"bn": {"mean": jnp.zeros((reg.features,), jnp.float32),
                         "var": jnp.ones((reg.features,), jnp.float32)}}
  mapped, _ = reg.apply({"params": params, "batch_stats": unused_stats}, guided, train=True,
                        mutable=["batch_stats"])
  return mapped


def make_hint_objective(*, guided_layer: str, hint_layer: str, regressor: str, regressor_activation: str,
                        kernel_size: int, reduction: str):
  """Stage 1 (Eq. 3): train the student up to ``guided_layer`` plus the regressor on the hint loss.

  The regressor's parameters are the stage's auxiliary parameters (``TrainState.aux_params``) and are
  discarded afterwards. Restrict the trainable student layers with ``config.trainable`` (the layers
  up to the guided one); stage 2 copies them with ``config.init_from``/``config.init_layers``.
  """
  from kdjax.methods.objective import Objective
  reg_kwargs = dict(guided_layer=guided_layer, hint_layer=hint_layer, regressor=regressor,
                    regressor_activation=regressor_activation, kernel_size=kernel_size)

  def init_aux(rng, student, teacher):
    guided, hint = student.features[guided_layer], teacher.features[hint_layer]
    return _regressor_for(guided, hint, **reg_kwargs).init(rng, jnp.zeros(guided.shape, guided.dtype))["params"]

  def fn(student, teacher, batch, progress, *, aux):
    del batch, progress
    guided, hint = student.features[guided_layer], teacher.features[hint_layer]
    mapped = _apply_regressor(_regressor_for(guided, hint, **reg_kwargs), aux, guided)
    loss = hint_loss(mapped, hint, reduction=reduction,
                     names=(f"student:{guided_layer} (regressed)", f"teacher:{hint_layer}"))
    return loss, {"hint": loss}
  return Objective(fn, needs_teacher=True, student_features=(guided_layer,), teacher_features=(hint_layer,),
                   init_aux=init_aux)


def kd_loss_config() -> dict:
  """``config.loss`` fields of stage 2 (``fitnets_kd``): τ = 3, λ annealed 4 → 1 (§4.1)."""
  return {"temperature": 3.0, "lambda_start": 4.0, "lambda_end": 1.0, "lambda_decay_fraction": 1.0}


def make_kd_objective(*, temperature: float, lambda_start: float, lambda_end: float,
                      lambda_decay_fraction: float):
  """Stage 2 (Eq. 2): the whole student on ``CE + λ(step)·H(P_T^τ, P_S^τ)``, no τ², no hint term.

  ``λ`` goes linearly from ``lambda_start`` to ``lambda_end`` over the first ``lambda_decay_fraction`` of
  the stage's steps (the paper: 4 → 1 over its whole 500-epoch stage, so 1.0), then stays flat; being a
  fraction of the stage, the schedule fits any dataset size and epoch count. The label term is dropped
  for unlabelled transfer-set examples (``batch["label_mask"]``).
  """
  from kdjax.methods.objective import Objective
  from kdjax.methods.soft_targets import hard_label_loss
  check_positive("lambda_decay_fraction", lambda_decay_fraction)

  def fn(student, teacher, batch, progress):
    lam = annealed_weight(progress.fraction, start=lambda_start, end=lambda_end, decay_steps=lambda_decay_fraction)
    soft = kd_loss_no_t2(student.logits, teacher.logits, batch["label"], temperature=temperature,
                         soft_weight=lam, hard_weight=0.0)
    hard = hard_label_loss(student.logits, batch["label"]) * batch["label_mask"]
    return hard + soft, {"lambda": jnp.broadcast_to(lam, hard.shape)}
  return Objective(fn, needs_teacher=True)


def one_stage_loss_config() -> dict:
  """``config.loss`` fields of RepDistiller's one-stage FitNet: CE (+KD) + β·MSE hint all along."""
  return {"guided_layer": "stage2", "hint_layer": "stage2", "regressor": "same", "regressor_activation": "relu",
          "kernel_size": 3, "beta": 100.0, "alpha": 0.0, "temperature": 4.0}


def make_one_stage_objective(*, guided_layer: str, hint_layer: str, regressor: str, regressor_activation: str,
                             kernel_size: int, beta: float, alpha: float, temperature: float):
  """The one-stage variant used by RepDistiller/CRD tables (not the paper's recipe).

  Per example ``task + β · hint_loss(r(guided), hint, reduction='mean')`` through all of training,
  with ``task`` = CE (``alpha = 0``) or Hinton KD; β = 100 as in RepDistiller's scripts. With the default
  ``regressor='same'`` the regressor ``r`` is RepDistiller's ``ConvReg``: a 3×3 convolution, BatchNorm
  (batch statistics) and ReLU, matching the post-ReLU ``stageK`` hint.
  """
  from kdjax.methods.objective import Objective
  from kdjax.methods.soft_targets import task_loss
  hint_objective = make_hint_objective(guided_layer=guided_layer, hint_layer=hint_layer, regressor=regressor,
                                       regressor_activation=regressor_activation, kernel_size=kernel_size,
                                       reduction="mean")

  def fn(student, teacher, batch, progress, *, aux):
    hint, _ = hint_objective.fn(student, teacher, batch, progress, aux=aux)
    task = task_loss(student.logits, teacher.logits, batch["label"], label_mask=batch["label_mask"], alpha=alpha,
                     temperature=temperature)
    return task + beta * hint, {"hint": hint}
  return Objective(fn, needs_teacher=True, student_features=(guided_layer,), teacher_features=(hint_layer,),
                   init_aux=hint_objective.init_aux)
