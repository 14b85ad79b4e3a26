"""Rocket Launching (Zhou et al., "Rocket Launching: A Universal and Efficient Framework for Training
Well-performing Light Net", AAAI 2018, arXiv 1708.04106).

A big "booster" net and a small "light" net that share their bottom layers are trained **together from
scratch** on the labels; a hint pulls the light net's logits towards the booster's. At test time the light
net runs alone. PAPERS.md §7 gives the sources; what comes from where:

* Objective [paper + code ``rocket_interval.py::h``]: per example
  ``CE(y, l(x)) + CE(y, z(x)) + γ · Σ_c (z_c(x) − l_c(x))²`` with light logits ``l``, booster logits ``z``
  and γ = 0.03 (:func:`rocket_loss`, :func:`rocket_hint_loss`). The code's
  ``((y_b.detach() − y_s)**2).sum() / batch_size`` is the batch mean of the per-example class sum.
* Gradient block [paper + code]: inside the hint ``z`` is a constant, so the hint never moves the
  booster-only parameters; the shared layers still get the hint's gradient through the light path.
* Parameter sharing and sharing schemes [code]: the light net reuses the booster's convolution weights but
  keeps its **own** BatchNorm parameters and statistics and its own head. "Interval" (``rocket_interval.py``):
  booster WRN-40-k, light WRN-16-k, the light net's stem conv and the convs of the first 2 blocks of each group
  are the booster's (``shared_layers=("all_convs",)`` with ``wrn_40_k``/``wrn_16_k``: in kdjax both nets name
  those layers alike, ``conv1`` and ``block{g}_{i}/{conv1,conv2,shortcut}``). "Bottom" (``rocket_bottom.py``):
  the light net is the booster's first two groups with its own BNs and its own BN-pool-fc head on the 16×16 map
  (``wrn_40_k_bottom`` with ``shared_layers=("all_convs",)``).
* Optional KD from a separately trained teacher [code, ``utils.rocket_distillation``], the "rocket + KD"
  column: ``alpha > 0`` adds ``α · T² · KL(softmax(t/T) ‖ softmax(l/T))`` on the light logits (T = 4,
  α = 0.9) and keeps the light CE at full weight, as the code does. ``kd_form='hinton'`` (default) sums the KL
  over classes (the batch mean is "batchmean", the form every other kdjax method uses); ``kd_form='code'``
  reproduces the old ``F.kl_div`` default, which also averaged over the classes and multiplied by 2: the same
  term times ``2 / classes``.
* Small-scale pair [reconstruction, PAPERS.md §7(e)]: booster MLP 784-512-512-512-10, light MLP 784-512-64-10
  sharing ``dense_0``.

Where the code differs, and what kdjax does:

* ``--grad_block`` and ``--param_share`` are argparse ``type=bool`` flags, so ``--grad_block False`` is
  ``bool("False") == True``: the code's README ablation commands never turned anything off. Here
  ``gradient_block`` and ``param_share`` are real booleans.
* With ``param_share`` off the code still feeds the light groups from the booster's stem output (the light
  stem ``conv0_s`` is commented out); kdjax's ``param_share=False`` shares nothing (the paper's "without
  parameter sharing"); ``shared_layers=("conv1",)`` with ``param_share=True`` gives the code's variant.
* With a teacher (``--teacher_id``) the code always detaches the booster in the hint, whatever
  ``--grad_block`` says; kdjax honours ``gradient_block`` in both cases.
* On a transfer set with unlabelled examples (not in the paper) the two CE terms use labelled examples only
  and the hint (which needs no label) uses every example.

Everything here is a pure function of arrays (jit/grad/vmap-safe) except the stage program at the end, which
builds the joint train step from the shared pieces of :mod:`kdjax.train`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from kdjax.errors import check_positive, check_same_shape, unknown_name
from kdjax.methods.soft_targets import hard_label_loss, soft_target_loss

KD_FORMS = ("hinton", "code")
ALL_CONVS = "all_convs"
Path = tuple[str, ...]


# --- losses -------------------------------------------------------------------------------------------


def rocket_hint_loss(light_logits: jax.Array, booster_logits: jax.Array, *, gradient_block: bool = True) -> jax.Array:
  """Per-example logit hint ``Σ_c (z_c − l_c)²``: ``[batch, classes] × 2 -> [batch]``.

  Args:
    light_logits: ``l(x)``, ``[batch, classes]`` (pre-softmax).
    booster_logits: ``z(x)``, same shape.
    gradient_block: ``z`` is under ``stop_gradient`` (the paper's gradient block): the hint's gradient reaches
      only what ``l`` depends on. ``False`` lets the hint pull the booster too (the "without gradient block"
      ablation).

  Returns:
    ``[batch]``; its batch mean is the code's ``((y_b.detach() − y_s)**2).sum() / batch_size``
    (``rocket_interval.py``), before γ. Squared error summed over classes (not averaged), as the code.
  """
  check_same_shape("rocket_hint_loss logits (light, booster)", light_logits, booster_logits)
  if light_logits.ndim < 1:
    raise ValueError(f"rocket_hint_loss expects logits [batch, classes]; got shape {light_logits.shape}")
  target = jax.lax.stop_gradient(booster_logits) if gradient_block else booster_logits
  return jnp.sum(jnp.square(target - light_logits), axis=-1)


def rocket_kd_loss(light_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float,
                   kd_form: str = "hinton") -> jax.Array:
  """Per-example soft-target term of "rocket + KD", before ``α``: ``[batch]``.

  ``'hinton'``: ``T² · KL(softmax(t/T) ‖ softmax(l/T))`` (KL summed over classes); ``'code'``: the
  rocket code's ``F.kl_div(...) · 2T²`` with the old mean over batch *and* classes, i.e. the Hinton value
  times ``2 / classes``. ``teacher_logits`` is the separately trained teacher's, same shape as ``light_logits``.
  """
  if kd_form not in KD_FORMS:
    raise unknown_name("kd_form", kd_form, KD_FORMS)
  kd = soft_target_loss(light_logits, teacher_logits, temperature=temperature)
  return kd if kd_form == "hinton" else kd * (2.0 / light_logits.shape[-1])


def rocket_loss(light_logits: jax.Array, booster_logits: jax.Array, labels: jax.Array, *, gamma: float = 0.03,
                gradient_block: bool = True, label_mask: jax.Array | None = None,
                teacher_logits: jax.Array | None = None, alpha: float = 0.0, temperature: float = 4.0,
                kd_form: str = "hinton") -> tuple[jax.Array, dict[str, jax.Array]]:
  """The joint objective of booster and light net, per example.

  ``CE(y, l) + CE(y, z) + γ · hint(l, z) [+ α · KD(l, teacher)]`` (PAPERS.md §7(a); ``rocket_interval.py::h``).

  Args:
    light_logits: ``[batch, classes]``.
    booster_logits: ``[batch, classes]``.
    labels: ``[batch]`` integer labels (any value where ``label_mask`` is 0).
    gamma: hint weight γ ≥ 0 (paper/code: 0.03 with the per-example class sum); 0 = joint training without hint.
    gradient_block: see :func:`rocket_hint_loss`.
    label_mask: optional ``[batch]`` 0/1; unlabelled examples get no CE terms, only the hint (and KD).
    teacher_logits: ``[batch, classes]`` of a separately trained teacher; needed when ``alpha > 0``.
    alpha: weight of the extra KD term (0 = none; the code's "rocket + KD" uses 0.9).
    temperature: KD temperature ``T > 0`` (code: 4).
    kd_form: see :func:`rocket_kd_loss`.

  Returns:
    ``(loss [batch], parts)`` with ``parts`` = per-example ``light_cross_entropy``, ``booster_cross_entropy``,
    ``hint`` (and ``kd`` when ``alpha > 0``), each before its weight.
  """
  if gamma < 0:
    raise ValueError(f"gamma (the hint weight) must be >= 0, got {gamma}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha (the weight of the extra KD term) must be in [0, 1], got {alpha}")
  check_same_shape("rocket_loss logits (light, booster)", light_logits, booster_logits)
  mask = jnp.ones(labels.shape, jnp.float32) if label_mask is None else label_mask.astype(jnp.float32)
  safe_labels = jnp.where(mask > 0, labels, 0)
  light_ce = hard_label_loss(light_logits, safe_labels) * mask
  booster_ce = hard_label_loss(booster_logits, safe_labels) * mask
  hint = rocket_hint_loss(light_logits, booster_logits, gradient_block=gradient_block)
  loss = light_ce + booster_ce + gamma * hint
  parts = {"light_cross_entropy": light_ce, "booster_cross_entropy": booster_ce, "hint": hint}
  if alpha > 0:
    if teacher_logits is None:
      raise ValueError("rocket_loss: alpha > 0 (rocket + KD) needs teacher_logits [batch, classes]; got None")
    check_same_shape("rocket_loss logits (light, teacher)", light_logits, teacher_logits)
    kd = rocket_kd_loss(light_logits, jax.lax.stop_gradient(teacher_logits), temperature=temperature,
                        kd_form=kd_form)
    loss = loss + alpha * kd
    parts["kd"] = kd
  return loss, parts


# --- parameter sharing ----------------------------------------------------------------------------------


def _flat(tree: Mapping[str, Any]) -> dict[Path, Any]:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _join(path: Path) -> str:
  return "/".join(path)


def _split(name: str) -> Path:
  return tuple(p for p in name.strip().split("/") if p)


def _layers(flat: Mapping[Path, Any]) -> list[str]:
  """Every module path of a flattened parameter tree (top-level and nested), sorted."""
  names = set()
  for path in flat:
    for end in range(1, len(path)):
      names.add(_join(path[:end]))
  return sorted(names)


def conv_layers(light_params: Mapping[str, Any]) -> tuple[str, ...]:
  """The module paths of every convolution of a net (modules whose ``kernel`` is 4-D), e.g. ``block1_0/conv1``."""
  return tuple(sorted(_join(path[:-1]) for path, leaf in _flat(light_params).items()
                      if path[-1] == "kernel" and len(leaf.shape) == 4))


def share_map(light_params: Mapping[str, Any], booster_params: Mapping[str, Any],
              shared_layers: Sequence[str]) -> dict[Path, Path]:
  """The leaves the light net shares with the booster: ``{booster leaf path: light leaf path}``.

  Args:
    light_params: the light net's (full, standalone) parameter tree.
    booster_params: the booster's full parameter tree (as initialised).
    shared_layers: entries ``"layer"`` (the same module path in both nets, e.g. ``"dense_0"``,
      ``"block1_0/conv1"``), ``"booster_layer=light_layer"``, or ``"all_convs"`` (every convolution of the light
      net, each under the same path in the booster: the WRN interval and bottom schemes). Every parameter under
      a shared module is shared; BatchNorm *statistics* never are.

  Raises:
    ValueError: a layer the light net or the booster lacks (the message lists that net's layers), or a leaf
      whose shapes differ (both shapes named).
  """
  light, booster = _flat(light_params), _flat(booster_params)
  pairs: list[tuple[Path, Path]] = []
  for entry in shared_layers:
    if entry == ALL_CONVS:
      pairs.extend((_split(c), _split(c)) for c in conv_layers(light_params))
      continue
    booster_name, _, light_name = entry.partition("=")
    light_name = light_name or booster_name
    pairs.append((_split(booster_name), _split(light_name)))
  mapping: dict[Path, Path] = {}
  for booster_layer, light_layer in pairs:
    light_leaves = {p: v for p, v in light.items() if p[:len(light_layer)] == light_layer}
    if not light_layer or not light_leaves:
      raise unknown_name("shared layer of the light net", _join(light_layer), _layers(light))
    for light_path, light_leaf in light_leaves.items():
      booster_path = booster_layer + light_path[len(light_layer):]
      if not any(p[:len(booster_layer)] == booster_layer for p in booster) or not booster_layer:
        raise unknown_name(f"shared layer {_join(light_layer)!r}: booster layer", _join(booster_layer),
                           _layers(booster))
      if booster_path not in booster:
        held = sorted(_join(p) for p in booster if p[:len(booster_layer)] == booster_layer)
        raise ValueError(f"shared layer {_join(light_layer)!r}: the light net's {_join(light_path)} has no "
                         f"counterpart {_join(booster_path)} in the booster; the booster's "
                         f"{_join(booster_layer)} holds {held}")
      if tuple(booster[booster_path].shape) != tuple(light_leaf.shape):
        raise ValueError(f"shared layer {_join(light_layer)!r}: the light net's {_join(light_path)} has shape "
                         f"{tuple(light_leaf.shape)} but the booster's {_join(booster_path)} has shape "
                         f"{tuple(booster[booster_path].shape)}; shared layers must have the same shape")
      mapping[booster_path] = light_path
  return mapping


def split_booster(booster_params: Mapping[str, Any], mapping: Mapping[Path, Path]) -> dict[str, Any]:
  """The booster-only parameters: ``booster_params`` without the shared leaves (they live in the light net)."""
  return traverse_util.unflatten_dict({p: v for p, v in _flat(booster_params).items() if p not in mapping})


def booster_variables(booster_only: Mapping[str, Any], light_params: Mapping[str, Any],
                      mapping: Mapping[Path, Path]) -> dict[str, Any]:
  """The booster's full parameter tree: its own leaves plus the light net's shared leaves (the same arrays).

  Differentiating a function of the result w.r.t. ``light_params`` gives the shared layers the gradient of
  both nets.
  """
  flat = _flat(booster_only)
  light = _flat(light_params)
  flat.update({booster_path: light[light_path] for booster_path, light_path in mapping.items()})
  return traverse_util.unflatten_dict(flat)


# --- the training stage (kdjax train / reproduce) --------------------------------------------------------


class RocketState(flax.struct.PyTreeNode):
  """The joint state. ``params``/``batch_stats`` are the light net's full standalone variables (the exported
  student, shared layers included); the booster keeps only what it does not share.

  Attributes:
    step: int32 scalar, updates done.
    params, batch_stats: the light net (``setup.student``).
    booster_params: the booster-only parameters (shared leaves removed, see :func:`booster_variables`).
    booster_batch_stats: the booster's BatchNorm statistics (``{}`` if none); never shared.
    opt_state: one optimizer state over ``(params, booster_params)``.
    rng: raw PRNG key; step ``s`` uses ``fold_in(rng, s)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  booster_params: Any
  booster_batch_stats: Any
  opt_state: Any
  rng: jax.Array


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``rocket_launching`` method (the code's CIFAR interval defaults)."""
  return {"booster_model": "wrn_40_1", "booster_model_kwargs": {}, "gamma": 0.03, "gradient_block": True,
          "param_share": True, "shared_layers": (ALL_CONVS,), "alpha": 0.0, "temperature": 4.0,
          "kd_form": "hinton"}


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be a real boolean (True/False), got {value!r} of type {type(value).__name__}"
                     " (the original code's argparse type=bool flags turned every string, 'False' included, "
                     "into True)")


def make_stage_program(*, booster_model: str, booster_model_kwargs: Mapping[str, Any], gamma: float,
                       gradient_block: bool, param_share: bool, shared_layers: Sequence[str], alpha: float,
                       temperature: float, kd_form: str):
  """Rocket Launching as a :class:`kdjax.train.StageProgram`: booster and light net trained jointly.

  The light net is ``config.model`` (``setup.student``, exported); the booster is ``booster_model`` built with
  ``booster_model_kwargs`` and the dataset's classes. ``shared_layers`` (see :func:`share_map`) name what the
  light net takes from the booster when ``param_share``; ``param_share=False`` shares nothing. One optimizer
  (``setup.tx``) updates both nets; the step minimises :func:`rocket_loss`. ``alpha > 0`` adds KD from
  ``config.teacher_workdir`` (then the stage needs a teacher; its logits may be cached). ``results.json``'s
  ``extra`` holds the jointly trained booster's ``booster_test_accuracy`` and ``booster_test_errors``.
  """
  from kdjax import models
  from kdjax import train as ktrain

  if not isinstance(booster_model, str) or not booster_model:
    raise ValueError(f"booster_model must name a registered model (e.g. 'wrn_40_1'), got {booster_model!r}")
  models.spec(booster_model)  # an unknown name lists the registered models
  if gamma < 0:
    raise ValueError(f"gamma (the hint weight) must be >= 0, got {gamma}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha (the weight of the extra KD term) must be in [0, 1], got {alpha}")
  check_positive("temperature", temperature)
  if kd_form not in KD_FORMS:
    raise unknown_name("kd_form", kd_form, KD_FORMS)
  _check_bool("gradient_block", gradient_block)
  _check_bool("param_share", param_share)
  if isinstance(shared_layers, str):
    raise ValueError(f"shared_layers must be a tuple of layer names, got the string {shared_layers!r}; "
                     f"write ({shared_layers!r},)")
  shared_layers = tuple(shared_layers) if param_share else ()
  booster_kwargs = dict(booster_model_kwargs)
  needs_teacher = alpha > 0

  def booster_of(setup):
    return ktrain.build_model(booster_model, booster_kwargs, setup.dataset.num_classes)

  def init_state(setup) -> RocketState:
    light, booster = setup.student, booster_of(setup)
    light_key, booster_key, step_key = jax.random.split(jax.random.PRNGKey(setup.config.seed), 3)
    light_vars = light.init({"params": light_key, "dropout": light_key}, setup.example, train=False)
    booster_vars = booster.init({"params": booster_key, "dropout": booster_key}, setup.example, train=False)
    params, batch_stats = dict(light_vars["params"]), dict(light_vars.get("batch_stats", {}))
    if setup.init_variables:
      params.update(setup.init_variables.get("params", {}))
      batch_stats.update(setup.init_variables.get("batch_stats", {}))
    mapping = share_map(params, booster_vars["params"], shared_layers)
    booster_only = split_booster(booster_vars["params"], mapping)
    return RocketState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       booster_params=booster_only, booster_batch_stats=dict(booster_vars.get("batch_stats", {})),
                       opt_state=setup.tx.init((params, booster_only)), rng=step_key)

  def mapping_of(setup, light_params):
    booster = booster_of(setup)
    shapes = jax.eval_shape(lambda x: booster.init(jax.random.PRNGKey(0), x, train=False), setup.example)
    return share_map(light_params, shapes["params"], shared_layers)

  def make_step(setup):
    light, booster, tx = setup.student, booster_of(setup), setup.tx
    cached = setup.cached_teacher
    teacher_models = () if cached else tuple(setup.teacher_models)
    if needs_teacher and not (cached or teacher_models):
      raise ValueError("rocket_launching with alpha > 0 (rocket + KD) needs a teacher: set teacher_workdir")
    light_shapes = jax.eval_shape(lambda x: light.init(jax.random.PRNGKey(0), x, train=False), setup.example)
    mapping = mapping_of(setup, light_shapes["params"])

    def step(state: RocketState, batch, teacher_variables=()):
      light_rng, booster_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
      teacher_logits = None
      if needs_teacher:
        teacher_logits = ktrain.teacher_output(batch, teacher_models, teacher_variables, cached=cached).logits

      def loss_fn(trainable):
        params, booster_only = trainable
        light_out = models.apply_model(light, ktrain._variables(params, state.batch_stats), batch["image"], train=True,
                                       rngs={"dropout": light_rng})
        booster_params = booster_variables(booster_only, params, mapping)
        booster_out = models.apply_model(booster, ktrain._variables(booster_params, state.booster_batch_stats),
                                         batch["image"], train=True, rngs={"dropout": booster_rng})
        per_example, parts = rocket_loss(light_out.logits, booster_out.logits, batch["label"], gamma=gamma,
                                         gradient_block=gradient_block, label_mask=batch["label_mask"],
                                         teacher_logits=teacher_logits, alpha=alpha, temperature=temperature,
                                         kd_form=kd_form)
        return jnp.mean(per_example), (light_out, booster_out, per_example, parts)

      trainable = (state.params, state.booster_params)
      (loss, (light_out, booster_out, per_example, parts)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, state.opt_state, trainable)
      params, booster_only = optax.apply_updates(trainable, updates)
      new = (params, booster_only, light_out.batch_stats, booster_out.batch_stats, opt_state)
      old = (state.params, state.booster_params, state.batch_stats, state.booster_batch_stats, state.opt_state)
      (params, booster_only, batch_stats, booster_batch_stats, opt_state), nonfinite = ktrain.skip_if_nonfinite(
          ktrain.all_finite(loss, grads), new, old)
      new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                booster_params=booster_only, booster_batch_stats=booster_batch_stats,
                                opt_state=opt_state)
      mask, labels = batch["label_mask"], batch["label"]
      metrics = {"loss": ktrain.mean_metric(per_example),
                 "train_accuracy": ktrain.mean_metric(jnp.argmax(light_out.logits, -1) == labels, mask),
                 "booster_train_accuracy": ktrain.mean_metric(jnp.argmax(booster_out.logits, -1) == labels, mask),
                 "light_cross_entropy": ktrain.mean_metric(parts["light_cross_entropy"], mask),
                 "booster_cross_entropy": ktrain.mean_metric(parts["booster_cross_entropy"], mask),
                 "hint": ktrain.mean_metric(parts["hint"]),
                 "nonfinite": nonfinite}
      if "kd" in parts:
        metrics["kd"] = ktrain.mean_metric(parts["kd"])
      return new_state, metrics
    return step

  def evaluate_booster(setup, state: RocketState) -> dict[str, Any]:
    booster = booster_of(setup)
    mapping = mapping_of(setup, state.params)
    joint = _BoosterView(booster_variables(state.booster_params, state.params, mapping), state.booster_batch_stats)
    result = ktrain.evaluate(booster, joint, setup.dataset.test, setup.mesh, batch_size=setup.config.eval_batch_size)
    return {"booster_test_accuracy": result["accuracy"], "booster_test_errors": result["errors"]}

  return ktrain.StageProgram(init_state, make_step, needs_teacher=needs_teacher, cacheable_teacher=needs_teacher,
                      evaluate=evaluate_booster)


class _BoosterView:
  """What :func:`kdjax.train.evaluate` reads of a state: the booster's ``params`` and ``batch_stats``."""

  def __init__(self, params, batch_stats):
    self.params, self.batch_stats = params, batch_stats


def joint_forward(light, booster, state: RocketState, x: jax.Array, mapping: Mapping[Path, Path], *,
                  train: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(light_logits, booster_logits)`` of a :class:`RocketState` on ``x`` (evaluation mode by default)."""
  from kdjax import models
  from kdjax.train import _variables
  light_logits = models.apply_model(light, _variables(state.params, state.batch_stats), x, train=train).logits
  booster_params = booster_variables(state.booster_params, state.params, mapping)
  booster_logits = models.apply_model(booster, _variables(booster_params, state.booster_batch_stats), x,
                                      train=train).logits
  return light_logits, booster_logits
