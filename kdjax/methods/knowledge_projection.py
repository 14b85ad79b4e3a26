"""Knowledge Projection (Zhang, Ning, He, "Knowledge Projection for Effective Design of Thinner and Faster Deep
Neural Networks", arXiv 1710.09505).

A teacher pre-trained on a large *source* task helps a thin student learn a *target* task with few labels. A
1×1-convolution **projection** maps the teacher's feature map at an intermediate layer ``T_p`` onto the channels
of the student's **injection layer** ``S_i`` (same spatial size). Two routes share the student's upper layers:

* student route: ``x → S_1 .. S_i → S_{i+1} .. S_N`` (the deployed model);
* projection route: ``x → T_1 .. T_p`` (frozen) ``→ P → S_{i+1} .. S_N``.

Both are trained jointly, the projection route is pruned away during training, and the student is deployed and
evaluated **alone**. No code was released (PAPERS.md §10: only the abstract is verified [V-abs]); what comes from
where, part by part:

* Setting (teacher from a source task, few target labels, thinner student) [V-abs].
* Projection from an intermediate teacher layer into an intermediate student layer [V-abs]; that it is a 1×1
  convolution followed by BatchNorm and ReLU is a reconstruction [M] (:class:`Projection`). The ReLU makes the
  projected map live where the student's post-ReLU injection feature lives (``block_i`` of :class:`InjectableCNN`
  is taken after the ReLU, before pooling). The projection's BatchNorm keeps running statistics (used by the
  validation loss and the projection route's test accuracy); the student's upper BatchNorms keep the statistics
  of the **student route** only, so the exported model's statistics are those of the deployed route.
* Shared upper layers and the joint loss [M] (:func:`knowledge_projection_loss`), per example:
  ``CE(y, S(x)) + λ(t) · CE(y, S_{i+1..N}(P(T_{1..p}(x)))) + μ · mean((S_{1..i}(x) − sg[P(T_{1..p}(x))])²)``;
  μ = 0 by default (PAPERS.md §10(a) calls the L2 term optional). The L2 target is under ``stop_gradient`` so the
  term moves the student's lower layers towards the projection, never the projection towards the student (with
  both free the pair could shrink together to zero).
* "Iterative pruning of the projection route" [V-abs wording; schedule M] (:func:`route_schedule`): with
  ``d(t) = clip(1 − t / (f · T), 0, 1)`` for update ``t`` of ``T`` and ``f = prune_until`` (0.6, PAPERS.md
  §10(e)), ``route_pruning`` is

  - ``"lambda"`` (default): the route's loss weight is ``λ · d(t)`` — PAPERS.md §10(e)'s concrete recipe, and a
    smooth hand-over from the route to the student;
  - ``"magnitude"``: the projection's 1×1 kernel is magnitude-pruned — only the ``ceil(d(t) · n)`` largest of its
    ``n`` weights survive (ties: lower flat index first), the rest are set to zero for good — and the route's
    weight is ``λ`` while any weight survives, 0 after (the issue's "projection route's weight pruned to zero");
    :func:`magnitude_mask`;
  - ``"both"``: both at once;
  - ``"none"``: λ fixed, nothing pruned (the ablation: the student must then do without the route at test time
    although it never trained without it).

  ``"lambda"`` is the default because it is the only schedule PAPERS.md spells out, and because pruning a 1×1
  kernel that a BatchNorm follows changes the route abruptly (BatchNorm rescales whatever survives).
* Injection-pair selection [V-abs: "adaptively selected ... by evaluating a joint loss function"; procedure M]
  (:func:`make_select_program`): every candidate ``(T_p, S_i)`` at the same resolution is trained briefly with the
  full route (λ, no pruning) on the labelled target images minus a validation split (``validation_fraction``,
  stratified, drawn with the run's seed), its joint loss measured on the validation split, all candidates
  recorded (``results.json`` ``extra`` and ``selection.json``), and the lowest-loss pair written for the
  Knowledge Projection stage (``pair="@kp_select/selection.json"``).
* The FitNets-style baseline from the same pair (``route="hint"``): ``CE + β · mean((R(S_{1..i}(x)) −
  T_p(x))²)`` with FitNets' 1×1-conv-BN-ReLU regressor ``R`` (RepDistiller's ``ConvReg``, the same shape as the
  projection, pointing the other way; :func:`kdjax.methods.fitnets.make_regressor`) and β = 100 (RepDistiller).
* Small-scale protocol (teacher on MNIST 0–4, target 5–9 with 50 labels per class, student 8-16-32) [PAPERS.md
  §10(e), a reconstruction].

The student is :class:`InjectableCNN`, the zoo's ``small_cnn`` (:class:`kdjax.models.cnn.SmallCNN`) with the same
parameter tree and an ``injected`` input at a named block, so the exported parameters are those of ``small_cnn``
and load anywhere it does. The projection (or regressor) and the teacher never enter the exported ``params``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.errors import unknown_name
from kdjax.methods import fitnets
from kdjax.models.batch_norm import BatchNorm
from kdjax.models.cnn import SmallCNN
from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature

ROUTE_PRUNING = ("lambda", "magnitude", "both", "none")
ROUTES = ("projection", "hint")
STUDENT_MODELS = ("small_cnn",)
SELECTION_FILE = "selection.json"


# --- models ---------------------------------------------------------------------------------------------------


class InjectableCNN(SmallCNN):
  """:class:`~kdjax.models.cnn.SmallCNN` (same layers, same parameter names) that can be entered at a block.

  ``model(x)`` is the student route, identical to ``SmallCNN``. ``model(None, injected=h, inject_at="block_k")``
  runs only what follows block ``k``'s ReLU (its pooling, the later blocks, the dense layer and the head) on
  ``h`` ``[batch, H_k, W_k, C_k]``: the student's upper layers ``S_{k+1..N}`` of the projection route. Features
  as ``SmallCNN`` (``block_k`` is then ``h`` itself).
  """

  @nn.compact
  def __call__(self, x: jax.Array | None, *, train: bool = False, injected: jax.Array | None = None,
               inject_at: str | None = None) -> jax.Array:
    first = 0
    if injected is not None:
      k = block_index(inject_at, len(self.channels))
      x, first = injected, k + 1
      if x.ndim != 4 or x.shape[-1] != self.channels[k]:
        raise ValueError(f"InjectableCNN: the injected map at {inject_at!r} must be [batch, H, W, "
                         f"{self.channels[k]}]; got shape {x.shape}")
      sow_feature(self, inject_at, x)
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    elif x is None or x.ndim != 4:
      raise ValueError(f"InjectableCNN expects NHWC input [batch, H, W, C]; got {None if x is None else x.shape}")
    for i in range(first, len(self.channels)):
      x = Conv(self.channels[i], (3, 3), padding="SAME", use_bias=not self.use_batchnorm, name=f"conv_{i}")(x)
      if self.use_batchnorm:
        x = BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn_{i}")(x)
      x = nn.relu(x)
      sow_feature(self, f"block_{i}", x)
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense, name="fc")(x))
    sow_feature(self, "dense", x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, name="head")(x)
    sow_feature(self, "logits", logits)
    return logits


def block_index(name: str | None, num_blocks: int) -> int:
  """``"block_k"`` -> ``k``; anything else is an error listing the valid injection layers."""
  valid = [f"block_{k}" for k in range(num_blocks)]
  if name not in valid:
    raise unknown_name("student injection layer", str(name), valid)
  return int(name.rsplit("_", 1)[1])


class Projection(nn.Module):
  """The projection ``P``: 1×1 convolution ``C_T → C_S`` (no bias), BatchNorm, ReLU [M].

  ``[batch, H, W, C_T] -> [batch, H, W, features]``. Parameters ``conv/kernel`` ``[1, 1, C_T, C_S]`` (the weights
  magnitude pruning acts on) and ``bn/{scale,bias}``.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = Conv(self.features, (1, 1), padding="SAME", use_bias=False, name="conv")(x)
    x = BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.relu(x)


# --- losses and schedules (pure functions of arrays) ------------------------------------------------------------


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], axis=-1)[:, 0]


def knowledge_projection_loss(student_logits: jax.Array, projection_logits: jax.Array, labels: jax.Array, *,
                              route_weight: jax.Array | float, label_mask: jax.Array | None = None,
                              student_feature: jax.Array | None = None, projected_feature: jax.Array | None = None,
                              mu: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The joint loss of both routes, per example [M, PAPERS.md §10(a)].

  ``CE(y, s) + λ · CE(y, p) + μ · mean_{h,w,c}((S_i − sg[P])²)`` with student-route logits ``s`` and
  projection-route logits ``p``.

  Args:
    student_logits: ``[batch, classes]``, the student route.
    projection_logits: ``[batch, classes]``, the projection route.
    labels: ``[batch]`` class ids (any value where ``label_mask`` is 0).
    route_weight: λ(t) ≥ 0, a scalar (traced inside a step; see :func:`route_schedule`).
    label_mask: optional ``[batch]`` 0/1; unlabelled examples contribute nothing (both terms need labels).
    student_feature: ``S_{1..i}(x)`` ``[batch, H, W, C_S]``, for ``mu > 0``.
    projected_feature: ``P(T_{1..p}(x))``, same shape; a constant target (``stop_gradient``) in the L2 term.
    mu: weight of the optional L2 term (0 = off, the default).

  Returns:
    ``(loss [batch], parts)``: ``student_cross_entropy``, ``projection_cross_entropy`` (and ``feature_l2`` when
    ``mu > 0``), each per example before its weight.
  """
  if student_logits.shape != projection_logits.shape:
    raise ValueError(f"knowledge_projection_loss: student-route logits {student_logits.shape} and projection-route "
                     f"logits {projection_logits.shape} must have the same shape")
  mask = jnp.ones(labels.shape, jnp.float32) if label_mask is None else label_mask.astype(jnp.float32)
  safe = jnp.where(mask > 0, labels, 0)
  student_ce = _cross_entropy(student_logits, safe) * mask
  projection_ce = _cross_entropy(projection_logits, safe) * mask
  loss = student_ce + route_weight * projection_ce
  parts = {"student_cross_entropy": student_ce, "projection_cross_entropy": projection_ce}
  if mu > 0:
    if student_feature is None or projected_feature is None or student_feature.shape != projected_feature.shape:
      raise ValueError("knowledge_projection_loss: mu > 0 needs student_feature and projected_feature of one shape; "
                       f"got {getattr(student_feature, 'shape', None)} and {getattr(projected_feature, 'shape', None)}")
    diff = student_feature.astype(jnp.float32) - jax.lax.stop_gradient(projected_feature).astype(jnp.float32)
    l2 = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
    loss = loss + mu * l2
    parts["feature_l2"] = l2
  return loss, parts


def route_schedule(step: jax.Array | int, total_steps: int, *, lam: float, route_pruning: str,
                   prune_until: float = 0.6) -> tuple[jax.Array, jax.Array]:
  """``(route weight λ(t), kept fraction of projection weights k(t))`` for update ``step`` of ``total_steps``.

  With ``d(t) = clip(1 − t / (prune_until · total_steps), 0, 1)``: ``"lambda"`` → ``(λ·d, 1)``; ``"magnitude"`` →
  ``(λ·[d > 0], d)``; ``"both"`` → ``(λ·d, d)``; ``"none"`` → ``(λ, 1)``. E.g. T = 100, f = 0.6: d(0) = 1,
  d(30) = 0.5, d(60) = d(99) = 0. Jit-safe in ``step``.
  """
  if route_pruning not in ROUTE_PRUNING:
    raise unknown_name("route_pruning", route_pruning, ROUTE_PRUNING)
  horizon = max(prune_until * max(total_steps, 1), 1e-9)
  d = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / horizon, 0.0, 1.0)
  one = jnp.ones((), jnp.float32)
  if route_pruning == "lambda":
    return lam * d, one
  if route_pruning == "magnitude":
    return lam * (d > 0).astype(jnp.float32), d
  if route_pruning == "both":
    return lam * d, d
  return lam * one, one


def magnitude_mask(kernel: jax.Array, kept_fraction: jax.Array | float) -> jax.Array:
  """0/1 mask of ``kernel``'s shape keeping its ``ceil(kept_fraction · n)`` largest-magnitude entries.

  Ties are broken by flat index (the lower index is kept), so the mask is deterministic; already-zero
  (pruned) weights rank last, so pruning is monotone. Jit-safe in ``kept_fraction``.
  """
  flat = jnp.abs(kernel).reshape(-1)
  n = flat.size
  order = jnp.argsort(-flat, stable=True)              # largest first, lower index first among ties
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  keep = jnp.ceil(jnp.asarray(kept_fraction, jnp.float32) * n - 1e-4).astype(jnp.int32)
  return (rank < keep).astype(kernel.dtype).reshape(kernel.shape)


# --- injection pairs --------------------------------------------------------------------------------------------


def parse_pair(text: str) -> tuple[str, str]:
  """``"teacher_layer=student_layer"`` -> ``(teacher_layer, student_layer)``."""
  teacher_layer, sep, student_layer = str(text).partition("=")
  if not sep or not teacher_layer.strip() or not student_layer.strip():
    raise ValueError(f"an injection pair is written 'teacher_layer=student_layer' (e.g. 'block_1=block_1'); "
                     f"got {text!r}")
  return teacher_layer.strip(), student_layer.strip()


def read_pair(pair: str) -> tuple[str, str]:
  """The pair of ``pair``: ``"teacher_layer=student_layer"``, or a ``selection.json`` written by the selection
  stage (its ``"pair"``)."""
  if str(pair).endswith(".json"):
    if not os.path.exists(pair):
      raise FileNotFoundError(f"pair={pair!r}: no such selection file; run the selection stage "
                              "(method knowledge_projection_select) first and pass its selection.json, or give "
                              "'teacher_layer=student_layer' (\"@variant/...\" is resolved by kdjax reproduce only)")
    with open(pair) as f:
      chosen = json.load(f).get("pair")
    if not chosen:
      raise ValueError(f"{pair} holds no 'pair'; it is not a selection file of knowledge_projection_select")
    return parse_pair(chosen)
  return parse_pair(pair)


def check_pair(teacher_layer: str, student_layer: str, teacher_shapes: Mapping[str, Sequence[int]],
               student_shapes: Mapping[str, Sequence[int]]) -> None:
  """Checks that both layers exist and have the same spatial size.

  Raises:
    UnknownNameError: an unknown layer (the message lists that network's layers).
    ValueError: different resolutions; the message names both layers and both shapes.
  """
  if teacher_layer not in teacher_shapes:
    raise unknown_name("teacher layer", teacher_layer, teacher_shapes)
  if student_layer not in student_shapes:
    raise unknown_name("student injection layer", student_layer, student_shapes)
  t, s = tuple(teacher_shapes[teacher_layer]), tuple(student_shapes[student_layer])
  if len(t) != 4 or len(s) != 4 or t[1:3] != s[1:3]:
    raise ValueError(f"injection pair teacher {teacher_layer!r} (shape {t}) -> student {student_layer!r} (shape {s}): "
                     "a 1×1 projection needs NHWC maps of the same height and width; pick layers at the same "
                     "resolution")


def feature_shapes(model: nn.Module, variables: Any, example: jax.Array, names: Sequence[str] | None = None
                   ) -> dict[str, tuple[int, ...]]:
  """Shapes of every 4-D (NHWC) feature ``model`` sows on ``example`` (computed with ``jax.eval_shape``)."""
  def run(v, x):
    _, state = model.apply(v, x, train=False, mutable=["intermediates"])
    return state["intermediates"]

  from kdjax.models.features import flatten_features
  tree = jax.eval_shape(run, variables, example)
  flat = flatten_features(flax.core.unfreeze(tree))
  shapes = {k: tuple(v.shape) for k, v in flat.items() if len(v.shape) == 4}
  return shapes if names is None else {k: shapes[k] for k in names if k in shapes}


# --- one candidate's trainable parts and its joint step -----------------------------------------------------------


def _vars(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


class _Route:
  """One injection pair's pieces: student, projection (or regressor), the layers and the loss settings."""

  def __init__(self, student: InjectableCNN, teacher_layer: str, student_layer: str, teacher_channels: int,
               student_channels: int, *, route: str, mu: float, beta: float):
    self.student, self.teacher_layer, self.student_layer = student, teacher_layer, student_layer
    self.route, self.mu, self.beta = route, mu, beta
    if route == "projection":
      self.module = Projection(features=student_channels)
      self.in_channels = teacher_channels
    else:
      self.module = fitnets.ConvRegressor(features=teacher_channels, kernel_size=(1, 1), padding="SAME",
                                          activation="relu", use_batchnorm=True)
      self.in_channels = student_channels

  def init(self, key: jax.Array, spatial: tuple[int, int]) -> tuple[Any, Any]:
    variables = self.module.init(key, jnp.zeros((1, *spatial, self.in_channels), jnp.float32), train=False)
    return dict(variables["params"]), dict(variables.get("batch_stats", {}))

  def losses(self, params, batch_stats, route_params, route_batch_stats, images, labels, mask, teacher_feature, *,
             route_weight, train: bool, rng=None):
    """``(per-example loss, parts, new student batch_stats, new route batch_stats, student logits)``."""
    rngs = {"dropout": rng} if rng is not None else None
    out, updates = self.student.apply(_vars(params, batch_stats), images, train=train, rngs=rngs,
                                      mutable=(["batch_stats"] if train and batch_stats else []) + ["intermediates"])
    student_feature = updates["intermediates"][self.student_layer]
    new_stats = updates.get("batch_stats", batch_stats)
    if self.route == "hint":
      regressed = fitnets._apply_regressor(self.module, route_params, student_feature)
      hint = fitnets.hint_loss(regressed, teacher_feature, reduction="mean",
                               names=(self.student_layer, self.teacher_layer))
      student_ce = _cross_entropy(out, jnp.where(mask > 0, labels, 0)) * mask
      return student_ce + self.beta * hint, {"student_cross_entropy": student_ce, "hint": hint}, new_stats, \
          route_batch_stats, out
    route_stats = route_batch_stats
    if train:
      projected, route_updates = self.module.apply(_vars(route_params, route_batch_stats), teacher_feature,
                                                   train=True, mutable=["batch_stats"])
      route_stats = route_updates["batch_stats"]
    else:
      projected = self.module.apply(_vars(route_params, route_batch_stats), teacher_feature, train=False)
    # The projection route's BatchNorm updates of the shared upper layers are dropped: the exported student keeps
    # the statistics of its own route.
    projection_logits = self.student.apply(_vars(params, batch_stats), None, train=train, rngs=rngs,
                                           injected=projected, inject_at=self.student_layer,
                                           mutable=["batch_stats"] if train and batch_stats else False)
    if train and batch_stats:
      projection_logits = projection_logits[0]
    loss, parts = knowledge_projection_loss(out, projection_logits, labels, route_weight=route_weight,
                                            label_mask=mask, student_feature=student_feature,
                                            projected_feature=projected, mu=self.mu)
    return loss, parts, new_stats, route_stats, out


def teacher_features(teacher_models, teacher_variables, images, layers: Sequence[str]) -> dict[str, jax.Array]:
  """The teacher's (first member's) features ``layers`` under ``stop_gradient``, in evaluation mode."""
  from kdjax.train import teacher_forward
  return dict(teacher_forward(teacher_models, teacher_variables, images, features=tuple(layers)).features)


def _joint_update(route: _Route, tx, cand: dict, images, labels, mask, teacher_feature, *, route_weight, kept,
                  rng, prune: bool):
  """One optimiser update of a candidate ``{params, batch_stats, route_params, route_batch_stats, opt_state}``."""
  from kdjax import train as ktrain
  route_params = cand["route_params"]
  if prune:
    kernel = route_params["conv"]["kernel"]
    route_params = {**route_params, "conv": {**route_params["conv"], "kernel": kernel * magnitude_mask(kernel, kept)}}

  def loss_fn(trainable):
    params, rparams = trainable
    loss, parts, stats, rstats, logits = route.losses(params, cand["batch_stats"], rparams, cand["route_batch_stats"],
                                                      images, labels, mask, teacher_feature,
                                                      route_weight=route_weight, train=True, rng=rng)
    return jnp.mean(loss), (loss, parts, stats, rstats, logits)

  trainable = (cand["params"], route_params)
  (loss, (per_example, parts, stats, rstats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, cand["opt_state"], trainable)
  params, new_route = optax.apply_updates(trainable, updates)
  if prune:  # pruned weights stay exactly zero (the mask's zeros also got no gradient)
    mask_now = magnitude_mask(route_params["conv"]["kernel"], kept)
    new_route = {**new_route, "conv": {**new_route["conv"], "kernel": new_route["conv"]["kernel"] * mask_now}}
  new = {"params": params, "batch_stats": stats, "route_params": new_route, "route_batch_stats": rstats,
         "opt_state": opt_state}
  old = {**cand, "route_params": route_params}
  kept_state, nonfinite = ktrain.skip_if_nonfinite(ktrain.all_finite(loss, grads), new, old)
  return kept_state, per_example, parts, logits, nonfinite


# --- configuration ----------------------------------------------------------------------------------------------


def default_loss_config() -> dict:
  """``config.loss`` of ``knowledge_projection`` (the KP stage, and the hint baseline with ``route="hint"``)."""
  return {"pair": "block_1=block_1", "route": "projection", "lam": 1.0, "route_pruning": "lambda",
          "prune_until": 0.6, "mu": 0.0, "beta": 100.0}


def default_select_config() -> dict:
  """``config.loss`` of ``knowledge_projection_select`` (the injection-pair selection stage)."""
  return {"candidates": ("block_0=block_0", "block_1=block_1", "block_2=block_2"), "lam": 1.0, "mu": 0.0,
          "validation_fraction": 0.2}


def _check_settings(*, lam: float, mu: float, prune_until: float = 0.6, beta: float = 1.0) -> None:
  for name, value, ok, what in (("lam", lam, lam >= 0, ">= 0"), ("mu", mu, mu >= 0, ">= 0"),
                                ("prune_until", prune_until, 0 < prune_until <= 1, "in (0, 1]"),
                                ("beta", beta, beta >= 0, ">= 0")):
    if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and ok):
      raise ValueError(f"knowledge projection: loss field {name} must be a number {what}; got {value!r}")


def _student_of(setup) -> InjectableCNN:
  from kdjax import train as ktrain
  config = setup.config
  if config.model not in STUDENT_MODELS:
    raise ValueError(f"knowledge projection enters the student at an injection layer, which kdjax's "
                     f"{', '.join(STUDENT_MODELS)} supports; got model={config.model!r}. Use "
                     "--config.model=small_cnn (model_kwargs channels/dense set its size)")
  zoo = ktrain.build_model(config.model, config.model_kwargs, setup.dataset.num_classes)
  return InjectableCNN(**{f.name: getattr(zoo, f.name) for f in SmallCNN.__dataclass_fields__.values()
                          if f.name not in ("parent", "name")})


def _routes(setup, pairs: Sequence[tuple[str, str]], *, route: str, mu: float, beta: float) -> list[_Route]:
  """The candidates' routes, after checking every pair against the two networks' feature shapes."""
  student = _student_of(setup)
  key = jax.random.PRNGKey(0)
  student_vars = jax.eval_shape(lambda x: student.init({"params": key, "dropout": key}, x, train=False), setup.example)
  student_shapes = feature_shapes(student, student_vars, setup.example)
  teacher = setup.teacher_models[0]
  teacher_shapes = feature_shapes(teacher, setup.teacher_variables[0], setup.example)
  routes = []
  for teacher_layer, student_layer in pairs:
    check_pair(teacher_layer, student_layer, teacher_shapes, student_shapes)
    routes.append(_Route(student, teacher_layer, student_layer, teacher_shapes[teacher_layer][-1],
                         student_shapes[student_layer][-1], route=route, mu=mu, beta=beta))
  return routes


def _init_candidate(setup, route: _Route, key: jax.Array, spatial) -> dict:
  student_key, route_key = jax.random.split(key)
  variables = route.student.init({"params": student_key, "dropout": student_key}, setup.example, train=False)
  params, batch_stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
  if setup.init_variables:
    params.update(setup.init_variables.get("params", {}))
    batch_stats.update(setup.init_variables.get("batch_stats", {}))
  route_params, route_stats = route.init(route_key, spatial)
  return {"params": params, "batch_stats": batch_stats, "route_params": route_params,
          "route_batch_stats": route_stats, "opt_state": setup.tx.init((params, route_params))}


def _spatial(setup, route: _Route) -> tuple[int, int]:
  shapes = feature_shapes(setup.teacher_models[0], setup.teacher_variables[0], setup.example, [route.teacher_layer])
  return tuple(shapes[route.teacher_layer][1:3])


# --- the Knowledge Projection stage (and the hint baseline) -------------------------------------------------------


class KPState(flax.struct.PyTreeNode):
  """The KP stage's state. ``params``/``batch_stats`` are the student alone (``small_cnn``'s tree, exported);
  the projection (or hint regressor) lives in ``route_params``/``route_batch_stats`` and is never exported; the
  teacher is not in the state at all.

  Attributes:
    step: int32 scalar, updates done.
    params, batch_stats: the student.
    route_params, route_batch_stats: the projection ``P`` (``route="projection"``) or the regressor ``R``.
    opt_state: one optimizer state over ``(params, route_params)``.
    rng: raw PRNG key; update ``s`` uses ``fold_in(rng, s)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  route_params: Any
  route_batch_stats: Any
  opt_state: Any
  rng: jax.Array


def make_stage_program(*, pair: str, route: str, lam: float, route_pruning: str, prune_until: float, mu: float,
                       beta: float):
  """The ``knowledge_projection`` stage: student and projection trained jointly, the route pruned away.

  ``route="projection"`` is Knowledge Projection; ``route="hint"`` the FitNets-style baseline from the same pair
  (``lam``, ``route_pruning``, ``prune_until``, ``mu`` unused). ``pair``: ``"teacher_layer=student_layer"`` or a
  selection stage's ``selection.json`` (``"@kp_select/selection.json"`` in a protocol).
  """
  from kdjax import train as ktrain
  if route not in ROUTES:
    raise unknown_name("route", route, ROUTES)
  if route_pruning not in ROUTE_PRUNING:
    raise unknown_name("route_pruning", route_pruning, ROUTE_PRUNING)
  _check_settings(lam=lam, mu=mu, prune_until=prune_until, beta=beta)
  chosen = read_pair(pair)
  prune = route == "projection" and route_pruning in ("magnitude", "both")

  def route_of(setup) -> _Route:
    return _routes(setup, [chosen], route=route, mu=mu, beta=beta)[0]

  def init_state(setup) -> KPState:
    r = route_of(setup)
    init_key, step_key = jax.random.split(jax.random.PRNGKey(setup.config.seed))
    cand = _init_candidate(setup, r, init_key, _spatial(setup, r))
    return KPState(step=jnp.zeros((), jnp.int32), rng=step_key, **cand)

  def make_step(setup):
    r, tx, total = route_of(setup), setup.tx, setup.num_steps
    teacher_models = tuple(setup.teacher_models)

    def step(state: KPState, batch, teacher_variables=()):
      rng = jax.random.fold_in(state.rng, state.step)
      feature = teacher_features(teacher_models, teacher_variables, batch["image"], [r.teacher_layer])[r.teacher_layer]
      weight, kept = route_schedule(state.step, total, lam=lam, route_pruning=route_pruning, prune_until=prune_until)
      cand = {"params": state.params, "batch_stats": state.batch_stats, "route_params": state.route_params,
              "route_batch_stats": state.route_batch_stats, "opt_state": state.opt_state}
      new, per_example, parts, logits, nonfinite = _joint_update(
          r, tx, cand, batch["image"], batch["label"], batch["label_mask"], feature, route_weight=weight, kept=kept,
          rng=rng, prune=prune)
      mask = batch["label_mask"]
      metrics = {"loss": ktrain.mean_metric(per_example),
                 "train_accuracy": ktrain.mean_metric(jnp.argmax(logits, -1) == batch["label"], mask),
                 "nonfinite": nonfinite}
      metrics.update({k: ktrain.mean_metric(v, mask if "cross_entropy" in k else None) for k, v in parts.items()})
      if route == "projection":
        metrics["route_weight"] = (weight, jnp.float32(1.0))
        metrics["projection_kept_fraction"] = (kept, jnp.float32(1.0))
      return state.replace(step=state.step + 1, **new), metrics
    return step

  def evaluate(setup, state: KPState) -> dict[str, Any]:
    r = route_of(setup)
    last = max(setup.num_steps - 1, 0)
    weight, kept = route_schedule(last, setup.num_steps, lam=lam, route_pruning=route_pruning,
                                  prune_until=prune_until)
    extra = {"teacher_layer": r.teacher_layer, "student_layer": r.student_layer, "route": route}
    if route == "projection":
      host = jax.device_get(state)
      kernel = np.asarray(host.route_params["conv"]["kernel"])
      extra.update({"route_weight_last_step": float(weight), "projection_nonzero_fraction": float(
          np.mean(kernel != 0)), "projection_route_test_accuracy": _route_accuracy(setup, r, host)})
    return extra

  return ktrain.StageProgram(init_state, make_step, needs_teacher=True, cacheable_teacher=False, evaluate=evaluate,
                             teacher_features_only=True)


def _route_accuracy(setup, r: _Route, host) -> float:
  """Test accuracy of the projection route (teacher → P → student upper layers), evaluation mode."""
  from kdjax import data as kdata

  @jax.jit
  def logits_of(params, batch_stats, rparams, rstats, teacher_variables, images):
    feature = teacher_features(setup.teacher_models, teacher_variables, images, [r.teacher_layer])[r.teacher_layer]
    projected = r.module.apply(_vars(rparams, rstats), feature, train=False)
    return r.student.apply(_vars(params, batch_stats), None, train=False, injected=projected,
                           inject_at=r.student_layer)

  correct = total = 0.0
  for batch in kdata.eval_batches(setup.dataset.test, batch_size=setup.config.eval_batch_size):
    logits = logits_of(host.params, host.batch_stats, host.route_params, host.route_batch_stats,
                       tuple(setup.teacher_variables), batch["image"])
    correct += float(np.sum((np.argmax(np.asarray(logits), -1) == batch["label"]) * batch["weight"]))
    total += float(np.sum(batch["weight"]))
  return correct / max(total, 1.0)


# --- the injection-pair selection stage -------------------------------------------------------------------------


class SelectState(flax.struct.PyTreeNode):
  """Every candidate's student, projection and optimizer state (``candidates["c<k>"]``, k in config order)."""
  step: jax.Array
  candidates: Any
  rng: jax.Array


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(train positions, validation positions)`` of a stratified split of ``labels``, drawn with ``seed``."""
  from kdjax.data import stratified_split
  n = len(labels)
  num_val = int(round(fraction * n))
  if not 0 < num_val < n:
    raise ValueError(f"validation_fraction={fraction} of {n} labelled examples leaves no validation or no training "
                     "example; use a fraction in (0, 1) that keeps at least one of each")
  val, train = stratified_split(labels, num_val, seed=seed)
  return train, val


def select_pair(losses: Mapping[str, float]) -> str:
  """The candidate with the lowest validation joint loss (the first in order among equal losses)."""
  finite = {k: v for k, v in losses.items() if math.isfinite(v)}
  if not finite:
    raise ValueError(f"no candidate has a finite validation loss: {dict(losses)}")
  return min(finite, key=lambda k: (finite[k], list(losses).index(k)))


def make_select_program(*, candidates: Sequence[str], lam: float, mu: float, validation_fraction: float):
  """The ``knowledge_projection_select`` stage (exports no model): brief joint training of each candidate pair
  (full route, λ = ``lam``, no pruning) on the labelled images minus a validation split, then the validation
  joint loss of each; writes ``selection.json`` (``pair``, every candidate's losses) into the work directory."""
  from kdjax import data as kdata
  from kdjax import parallel
  from kdjax import train as ktrain
  pairs = [parse_pair(c) for c in candidates]
  if not pairs:
    raise ValueError("knowledge_projection_select: candidates is empty; give at least one 'teacher=student' pair")
  if len(set(pairs)) != len(pairs):
    raise ValueError(f"knowledge_projection_select: candidates repeat a pair: {tuple(candidates)}")
  _check_settings(lam=lam, mu=mu)
  if not (isinstance(validation_fraction, float) and 0 < validation_fraction < 1):
    raise ValueError(f"validation_fraction must be a float in (0, 1); got {validation_fraction!r}")
  names = [f"{t}={s}" for t, s in pairs]

  def split_of(setup):
    labelled = ktrain.labelled_training_examples(setup.transfer_set)
    train_pos, val_pos = validation_split(np.asarray(labelled.labels), validation_fraction, setup.config.seed)
    return labelled, train_pos, val_pos

  def init_state(setup) -> SelectState:
    routes = _routes(setup, pairs, route="projection", mu=mu, beta=0.0)
    init_key, step_key = jax.random.split(jax.random.PRNGKey(setup.config.seed))
    keys = jax.random.split(init_key, len(routes))
    cands = {f"c{k}": _init_candidate(setup, r, keys[k], _spatial(setup, r)) for k, r in enumerate(routes)}
    return SelectState(step=jnp.zeros((), jnp.int32), candidates=cands, rng=step_key)

  def make_step(setup):
    routes, tx = _routes(setup, pairs, route="projection", mu=mu, beta=0.0), setup.tx
    teacher_models = tuple(setup.teacher_models)
    layers = sorted({r.teacher_layer for r in routes})

    def step(state: SelectState, batch, teacher_variables=()):
      rng = jax.random.fold_in(state.rng, state.step)
      feats = teacher_features(teacher_models, teacher_variables, batch["image"], layers)
      new_cands, metrics, flags = {}, {}, []
      for k, r in enumerate(routes):
        new_cands[f"c{k}"], per_example, parts, _, nonfinite = _joint_update(
            r, tx, state.candidates[f"c{k}"], batch["image"], batch["label"], batch["label_mask"],
            feats[r.teacher_layer], route_weight=jnp.float32(lam), kept=1.0, rng=jax.random.fold_in(rng, k),
            prune=False)
        metrics[f"loss_c{k}"] = ktrain.mean_metric(per_example)
        flags.append(nonfinite[0])
      metrics["nonfinite"] = (jnp.max(jnp.stack(flags)), jnp.float32(1.0))
      return state.replace(step=state.step + 1, candidates=new_cands), metrics
    return step

  def batches(setup):
    labelled, train_pos, _ = split_of(setup)
    train_set = kdata.TransferSet(labelled, train_pos, np.ones(len(train_pos), np.float32))
    source = kdata.TrainBatches(train_set, batch_size=setup.config.batch_size, seed=setup.config.seed,
                                jitter=setup.config.jitter, hflip=setup.config.hflip,
                                host_slice=parallel.process_slice(setup.config.batch_size))

    def from_step(start_step: int):
      return kdata.prefetch((source.batch(s) for s in range(start_step, setup.num_steps)),
                            lambda b: parallel.shard_batch(b, setup.mesh))
    return from_step

  def evaluate(setup, state: SelectState) -> dict[str, Any]:
    routes = _routes(setup, pairs, route="projection", mu=mu, beta=0.0)
    labelled, _, val_pos = split_of(setup)
    images, labels = labelled.get(val_pos)  # one batch: the split is a few dozen images
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    host = jax.device_get(state.candidates)
    teacher_variables = tuple(setup.teacher_variables)
    table = []
    for k, r in enumerate(routes):
      cand = host[f"c{k}"]

      def losses(cand, teacher_variables, images, labels, r=r):
        feature = teacher_features(setup.teacher_models, teacher_variables, images, [r.teacher_layer])[r.teacher_layer]
        loss, parts, _, _, logits = r.losses(cand["params"], cand["batch_stats"], cand["route_params"],
                                             cand["route_batch_stats"], images, labels, jnp.ones(labels.shape),
                                             feature, route_weight=lam, train=False)
        return jnp.mean(loss), {k: jnp.mean(v) for k, v in parts.items()}, jnp.mean(jnp.argmax(logits, -1) == labels)
      loss, parts, accuracy = jax.jit(losses)(cand, teacher_variables, images, labels)
      table.append({"candidate": names[k], "teacher_layer": r.teacher_layer, "student_layer": r.student_layer,
                    "validation_joint_loss": float(loss), "validation_student_accuracy": float(accuracy),
                    **{f"validation_{p}": float(v) for p, v in parts.items()}})
    chosen = select_pair({row["candidate"]: row["validation_joint_loss"] for row in table})
    record = {"pair": chosen, "candidates": table, "validation_examples": int(len(val_pos)),
              "training_examples": int(len(labelled) - len(val_pos)), "steps": int(setup.num_steps),
              "lam": lam, "mu": mu, "seed": int(setup.config.seed)}
    with open(os.path.join(setup.workdir, SELECTION_FILE), "w") as f:
      json.dump(record, f, indent=2)
    extra: dict[str, Any] = {"pair": chosen, "chosen_index": float(names.index(chosen))}
    for k, row in enumerate(table):
      extra[f"validation_joint_loss_c{k}"] = row["validation_joint_loss"]
    return extra

  return ktrain.StageProgram(init_state, make_step, needs_teacher=True, cacheable_teacher=False, evaluate=evaluate,
                             batches=batches, exports_model=False, teacher_features_only=True)
