"""The stage runner: setup, the shared distillation step, and the one ``fit`` loop every stage runs.

A stage has three parts (DESIGN.md, "Stages"):

* :func:`setup_stage` checks the config and builds the data, transfer set, student, teachers,
  optimizer and mesh (:class:`Setup`), and records ``config.json``;
* a step builder chosen by the method's registry entry
  (:data:`kdjax.methods.objective.METHODS`): an :class:`~kdjax.methods.objective.Objective` runs on the
  shared distillation step (:func:`make_train_step`, wrapped by :func:`objective_program`), a paper
  with its own training brings a :class:`StageProgram` (its state, its step, what to evaluate);
* :func:`fit`, which knows no paper: resume from the last good checkpoint, the jitted step over the
  batches, checkpoints, logging, the non-finite guard, evaluation and ``results.json``.

Every step is ``(state, batch, *args) -> (state, metrics)``, jitted once with the state donated. The
teacher's variables are a separate argument: never differentiated (``stop_gradient`` on everything
the teacher outputs), never updated, never saved with the student. Randomness inside a step is
``fold_in(state.rng, state.step)``, so it depends on the step alone. Metrics are ``(sum, count)``
pairs, exact when added over steps, devices and hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization
from jax.experimental import multihost_utils

from kdjax import checkpoint as ckpt
from kdjax import data as kdata
from kdjax import models, parallel
from kdjax.config import check_keys, default_stage_config
from kdjax.data.sources import fingerprint as data_fingerprint
from kdjax.errors import NonFiniteError, UnknownNameError, unknown_name
from kdjax.logging_utils import MetricWriter
from kdjax.methods.objective import Objective, make_method
from kdjax.models.features import ModelOutput

log = logging.getLogger(__name__)

Metrics = dict[str, tuple[jax.Array, jax.Array]]


class StageProgress(NamedTuple):
  """Where a step is in its stage, as objectives see it: schedules are fractions of the stage.

  Attributes:
    step: int32 scalar (traced inside the step), the number of updates done before this one.
    total_steps: the stage length (a Python int, fixed when the step is built).
  """
  step: jax.Array
  total_steps: int

  @property
  def fraction(self) -> jax.Array:
    """``step / total_steps`` as float32, in [0, 1)."""
    return jnp.asarray(self.step, jnp.float32) / max(self.total_steps, 1)


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training (and goes into a checkpoint).

  Attributes:
    step: int32 scalar, the number of updates done.
    params: student parameters.
    batch_stats: student BatchNorm statistics (``{}`` if none).
    opt_state: optimizer state.
    rng: a raw ``uint32[2]`` PRNG key; step ``s`` uses ``fold_in(rng, s)``.
    aux_params: the method's own trainable parameters (the FitNets regressor), ``{}`` if none;
      optimised together with ``params`` (the optimizer state covers ``(params, aux_params)``).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  aux_params: Any = flax.struct.field(default_factory=dict)


# TrainState's checkpoint layout stays the one runs before the stage runner wrote (its fields with the optimizer
# state as optax's own pytree), so those runs resume and re-evaluate instead of being taken for unreadable.
serialization.register_serialization_state(
    TrainState, lambda state: {f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
    lambda target, restored: target.replace(**restored), override=True)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, example_input: jax.Array,
                       seed: int, *, objective: Objective | None = None, teacher_models: Sequence[nn.Module] = (),
                       teacher_variables: Sequence[Any] = (), init_variables: Mapping[str, Any] | None = None
                       ) -> TrainState:
  """Initialises the student from ``seed`` (parameters and the step RNG derive from it).

  ``objective.init_aux`` (if any) initialises the method's own parameters from the student's and
  the teacher's outputs on ``example_input``. ``init_variables`` (``{"params", "batch_stats"}``
  subtrees by top-level layer name) replace the fresh layers of the same names (two-stage methods).
  """
  init_key, step_key, aux_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  # One compiled program: op by op, init compiles each layer's operations separately (tens of small compiles
  # per stage, most of a short test's time).
  variables = jax.jit(lambda key, x: model.init({"params": key, "dropout": key}, x, train=False))(init_key,
                                                                                                   example_input)
  params, batch_stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
  if init_variables:
    params.update(init_variables.get("params", {}))
    batch_stats.update(init_variables.get("batch_stats", {}))
  aux_params = {}
  if objective is not None and objective.init_aux is not None:
    student_out = models.apply_model(model, _variables(params, batch_stats), example_input,
                                     features=objective.student_features)
    teacher_out = teacher_forward(teacher_models, teacher_variables, example_input,
                                  features=objective.teacher_features) if teacher_models else None
    aux_params = objective.init_aux(aux_key, student_out, teacher_out)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init((params, aux_params)), rng=step_key, aux_params=aux_params)


def _variables(params, batch_stats) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def teacher_forward(teacher_models: Sequence[nn.Module], teacher_variables: Sequence[Any], x: jax.Array, *,
                    features: Sequence[str] = ()) -> ModelOutput:
  """Runs the teacher(s) in evaluation mode under ``stop_gradient``.

  Returns logits ``[batch, classes]`` for one teacher, ``[members, batch, classes]`` for an
  ensemble; ``features`` are those of the first (or only) member.
  """
  outputs = [models.apply_model(m, v, x, train=False, features=features if i == 0 else ())
             for i, (m, v) in enumerate(zip(teacher_models, teacher_variables))]
  logits = outputs[0].logits if len(outputs) == 1 else jnp.stack([o.logits for o in outputs])
  return jax.lax.stop_gradient(ModelOutput(logits, outputs[0].features, {}))


def mean_metric(values: jax.Array, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  values = values.astype(jnp.float32)
  if weight is None:
    return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
  return jnp.sum(values * weight), jnp.sum(weight)


def make_train_step(*, student: nn.Module, objective: Objective, tx: optax.GradientTransformation,
                    teacher_models: Sequence[nn.Module] = (), cached_teacher: bool = False,
                    total_steps: int = 0) -> Callable:
  """Builds the un-jitted step ``step(state, batch, teacher_variables) -> (state, metrics)``.

  Args:
    student: the student model.
    objective: the method's objective.
    tx: the optimizer.
    teacher_models: the teacher model(s) (several = an ensemble); their variables are the
      step's third argument, a tuple with one entry per model.
    cached_teacher: read teacher logits from ``batch["teacher_logits"]`` (``[batch, members,
      classes]``, precomputed by :func:`precompute_teacher_logits`) instead of running the teacher.
    total_steps: the stage length, passed to the objective in its :class:`StageProgress`.

  A non-finite loss or gradient leaves the state unchanged (except ``step``) and sets the
  ``nonfinite`` metric, so a NaN never reaches the parameters or a checkpoint.
  """
  if objective.needs_teacher and not (teacher_models or cached_teacher):
    raise ValueError("this method needs a teacher: set teacher_workdir (or pass teacher_models)")
  if cached_teacher and objective.teacher_features:
    raise ValueError(f"teacher features {objective.teacher_features} cannot be cached; run the teacher live")

  def step(state: TrainState, batch: dict[str, jax.Array], teacher_variables: Sequence[Any] = ()):
    rng = jax.random.fold_in(state.rng, state.step)
    progress = StageProgress(state.step, total_steps)
    teacher = None
    if cached_teacher or teacher_models:
      teacher = teacher_output(batch, teacher_models, teacher_variables, cached=cached_teacher,
                               features=objective.teacher_features)

    def loss_fn(trainable):
      params, aux_params = trainable
      out = models.apply_model(student, _variables(params, state.batch_stats), batch["image"], train=True,
                               rngs={"dropout": rng}, features=objective.student_features)
      if objective.init_aux is None:
        per_example, extras = objective.fn(out, teacher, batch, progress)
      else:
        per_example, extras = objective.fn(out, teacher, batch, progress, aux=aux_params)
      return jnp.mean(per_example), (out, per_example, extras)

    trainable = (state.params, state.aux_params)
    (loss, (out, per_example, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params, aux_params = optax.apply_updates(trainable, updates)
    (params, aux_params, batch_stats, opt_state), nonfinite = skip_if_nonfinite(
        all_finite(loss, grads), (params, aux_params, out.batch_stats, opt_state),
        (state.params, state.aux_params, state.batch_stats, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              aux_params=aux_params)
    correct = (jnp.argmax(out.logits, -1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss": mean_metric(per_example),
               "train_accuracy": mean_metric(correct, batch["label_mask"]),
               "nonfinite": nonfinite}
    metrics.update({k: mean_metric(v) for k, v in extras.items()})
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module) -> Callable:
  """``eval_step(params, batch_stats, batch) -> metrics`` (accuracy, errors, loss; padding-weighted)."""
  def eval_step(params, batch_stats, batch):
    logits = models.apply_model(model, _variables(params, batch_stats), batch["image"], train=False).logits
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1)[:, 0]
    w = batch["weight"]
    return {"accuracy": mean_metric(correct, w), "errors": (jnp.sum((1 - correct) * w), jnp.float32(1.0)),
            "cross_entropy": mean_metric(ce, w)}
  return eval_step


def add_metrics(total: Metrics | None, new: Metrics) -> Metrics:
  """Adds ``(sum, count)`` pairs (on device; no host sync)."""
  return new if total is None else jax.tree.map(jnp.add, total, new)


def summarize(metrics: Metrics) -> dict[str, float]:
  """``{name: sum / count}`` on the host (a sync point: call it only to log)."""
  host = jax.device_get(metrics)
  return {k: float(s) / float(c) if float(c) else float("nan") for k, (s, c) in host.items()}


LR_SCHEDULES = ("constant", "cosine", "step")


def _is_real(x) -> bool:
  return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)


def step_boundaries(lr_boundaries: Sequence[float], lr_decay_factor: float, num_steps: int) -> dict[int, float]:
  """The ``{step: scale}`` map of the ``step`` schedule, after checking its two config fields.

  Each fraction ``b`` becomes the step ``round(b * num_steps)``; fractions that round to the same step
  multiply their factors there (only in runs with very few steps).

  Raises:
    ValueError: ``lr_boundaries`` empty, not strictly increasing or not in (0, 1), or
      ``lr_decay_factor`` not > 0; the message names the field and the value given.
  """
  boundaries = tuple(lr_boundaries)
  if not boundaries:
    raise ValueError("lr_schedule 'step' needs lr_boundaries: the fractions of the stage's steps where the "
                     "learning rate drops, e.g. (0.625, 0.75, 0.875); got ()")
  if (not all(_is_real(b) and 0 < b < 1 for b in boundaries)
      or any(a >= b for a, b in zip(boundaries, boundaries[1:]))):
    raise ValueError("lr_boundaries must be fractions of the stage's steps, strictly between 0 and 1 and "
                     f"strictly increasing (e.g. (0.625, 0.75, 0.875) for epochs 150/180/210 of 240); "
                     f"got {lr_boundaries!r}")
  if not (_is_real(lr_decay_factor) and lr_decay_factor > 0):
    raise ValueError(f"lr_decay_factor must be > 0, got {lr_decay_factor!r}")
  scales: dict[int, float] = {}
  for b in boundaries:
    step = int(round(b * num_steps))
    scales[step] = scales.get(step, 1.0) * float(lr_decay_factor)
  return scales


def make_lr_schedule(config: ml_collections.ConfigDict, num_steps: int) -> float | optax.Schedule:
  """The learning rate of ``config`` over a stage of ``num_steps`` updates: a float or an optax schedule.

  * ``constant``: ``learning_rate`` throughout.
  * ``cosine``: cosine decay from ``learning_rate`` to 0 over ``num_steps``.
  * ``step``: piecewise constant (``optax.piecewise_constant_schedule``): ``learning_rate`` times
    ``lr_decay_factor ** k`` from the ``k``-th boundary on, where the boundaries are the fractions
    ``lr_boundaries`` of ``num_steps`` rounded to whole steps. The update with count
    ``round(b * num_steps)`` (0-based) is the first at the lower rate, as PyTorch's ``MultiStepLR``
    stepped once per epoch when ``b * num_steps`` is a whole epoch.
  """
  if config.lr_schedule == "constant":
    return config.learning_rate
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.learning_rate, max(num_steps, 1))
  if config.lr_schedule == "step":
    return optax.piecewise_constant_schedule(
        config.learning_rate, step_boundaries(config.lr_boundaries, config.lr_decay_factor, num_steps))
  raise unknown_name("lr_schedule", config.lr_schedule, LR_SCHEDULES)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """The optimizer of ``config`` (``adam`` | ``sgd`` | ``rmsprop``; LR from :func:`make_lr_schedule`)."""
  lr = make_lr_schedule(config, num_steps)
  makers = {
      "adam": lambda: optax.adam(lr),
      "sgd": lambda: optax.sgd(lr, momentum=config.momentum or None, nesterov=False),
      "rmsprop": lambda: optax.rmsprop(lr, decay=0.9, momentum=config.momentum or None),
  }
  if config.optimizer not in makers:
    raise UnknownNameError(f"unknown optimizer {config.optimizer!r}; expected one of: {', '.join(makers)}")
  tx = makers[config.optimizer]()
  if config.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  if config.trainable:
    tx = freeze_all_but(tx, tuple(config.trainable))
  return tx


def freeze_all_but(tx: optax.GradientTransformation, trainable: tuple[str, ...]) -> optax.GradientTransformation:
  """Applies ``tx`` to the named top-level student layers (and the method's own parameters) only.

  The optimizer sees ``(student_params, aux_params)``; every other student layer gets a zero update
  (FitNets stage 1 trains the layers up to the guided one, §3.1).
  """
  def labels(tree):
    params, aux = tree
    unknown = set(trainable) - set(params)
    if unknown:
      raise UnknownNameError(f"unknown trainable layer(s) {sorted(unknown)}; the student's top-level layers "
                             f"are: {', '.join(sorted(params))}")
    return ({k: jax.tree.map(lambda _: "train" if k in trainable else "freeze", v) for k, v in params.items()},
            jax.tree.map(lambda _: "train", aux))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def build_model(name: str, model_kwargs: Mapping[str, Any], num_classes: int) -> nn.Module:
  """A registry model with ``num_classes`` outputs."""
  return models.get(name, **{"num_classes": num_classes, **dict(model_kwargs)})


def load_teachers(teacher_workdir: str, *, allow_partial: bool = False, example_shape: Sequence[int] | None = None,
                  num_classes: int | None = None) -> tuple[list[nn.Module], list[Any]]:
  """Rebuilds each teacher (comma-separated work directories) from its own run's config, read-only.

  Args:
    teacher_workdir: one run, or several comma-separated (an ensemble).
    allow_partial: accept a run that did not finish (no ``results.json``, fewer steps than its config) or whose
      newest checkpoint is unreadable (its newest readable one is used). By default such a run is refused
      (:class:`~kdjax.errors.UnfinishedRunError`, saying what is missing).
    example_shape: the student's input shape (one example); each teacher must accept it.
    num_classes: the student's class count; each teacher must output as many logits.

  Raises:
    ValueError: a teacher whose class count or input shape does not fit (the message names every member of an
      ensemble with its class count and the inputs it was trained on).
  """
  workdirs = [w for w in teacher_workdir.split(",") if w]
  teacher_models, teacher_variables, described, counts = [], [], [], set()
  for workdir in workdirs:
    variables, tconfig, _ = ckpt.load_teacher_variables(workdir, require_finished=not allow_partial)
    teacher_models.append(build_model(tconfig["model"], tconfig.get("model_kwargs", {}), tconfig["num_classes"]))
    teacher_variables.append(variables)
    counts.add(int(tconfig["num_classes"]))
    described.append(f"{workdir} ({tconfig['model']}, {tconfig['num_classes']} classes, trained on "
                     f"{tconfig.get('dataset', '?')!r}"
                     + (f" with inputs {tuple(tconfig['example_shape'])})" if "example_shape" in tconfig else ")"))
  members = "; ".join(described)
  if len(workdirs) > 1 and len(counts) > 1:
    raise ValueError(f"the ensemble's teachers differ in class count, so their outputs cannot be averaged: {members}")
  if example_shape is not None:
    example = jax.ShapeDtypeStruct((1, *example_shape), jnp.float32)
    for model, variables, text in zip(teacher_models, teacher_variables, described):
      try:
        logits = jax.eval_shape(lambda v, x, m=model: models.apply_model(m, v, x, train=False).logits,
                                variables, example)
      except Exception as e:  # noqa: BLE001 - shape errors of any layer; re-raised with the teacher named
        raise ValueError(f"teacher {text} cannot take this stage's inputs of shape {tuple(example_shape)} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         + ("ensemble: " + members + "; " if len(workdirs) > 1 else "")
                         + "train the teacher on the same dataset, or fix --config.dataset") from None
      if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(f"teacher {text} outputs {logits.shape[-1]} classes, but this stage's dataset has "
                         f"{num_classes}" + (f" (ensemble: {members})" if len(workdirs) > 1 else "")
                         + "; distil from a teacher trained on the same classes (the same dataset and "
                         "classes and held_out_classes)")
  return teacher_models, teacher_variables


def load_layers(workdir: str, layers: tuple[str, ...], *, allow_partial: bool = False) -> dict[str, Any]:
  """The named top-level layers (params and BatchNorm statistics) of a finished run, read-only.

  Empty ``layers`` = every layer. An unknown name lists the layers the run has. An unfinished run is refused
  unless ``allow_partial`` (as for teachers, :func:`load_teachers`).
  """
  variables, _, _ = ckpt.load_teacher_variables(workdir, require_finished=not allow_partial)
  available = set(variables["params"]) | set(variables.get("batch_stats", {}))
  layers = layers or tuple(sorted(available))
  unknown = set(layers) - available
  if unknown:
    raise UnknownNameError(f"init_layers {sorted(unknown)} are not in the run {workdir!r}; its layers are: "
                           f"{', '.join(sorted(available))}")
  return {kind: {k: v for k, v in variables.get(kind, {}).items() if k in layers}
          for kind in ("params", "batch_stats")}


class _PositionSplit:
  """Adapts a transfer set to the ``get(indices)`` interface of a split (for teacher caching)."""

  def __init__(self, transfer_set: kdata.TransferSet):
    self.transfer_set = transfer_set

  def __len__(self):
    return len(self.transfer_set)

  def get(self, positions):
    return self.transfer_set.split.get(self.transfer_set.indices[positions])


def precompute_teacher_logits(teacher_models: Sequence[nn.Module], teacher_variables: Sequence[Any],
                              transfer_set: kdata.TransferSet, mesh, *, batch_size: int) -> np.ndarray:
  """Teacher logits for every transfer-set example, once: ``[members, n, classes]`` on the host."""
  batch_size = _round_up(batch_size, mesh.size)

  @jax.jit
  def forward(variables, images):
    return jnp.stack([models.apply_model(m, v, images, train=False).logits  # [batch, members, classes]
                      for m, v in zip(teacher_models, variables)], axis=1)

  variables = parallel.replicate(tuple(teacher_variables), mesh)
  chunks = []
  for batch in kdata.eval_batches(_PositionSplit(transfer_set), batch_size=batch_size,
                                  host_slice=parallel.process_slice(batch_size)):
    logits = forward(variables, parallel.shard_batch({"image": batch["image"]}, mesh)["image"])
    if jax.process_count() > 1:
      logits = multihost_utils.process_allgather(logits, tiled=True)  # the batch axis from every host
    chunks.append(np.asarray(logits))
  logits = np.concatenate(chunks, axis=0)[:len(transfer_set)]  # drop the last batch's padding
  return logits.swapaxes(0, 1)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def evaluate(model: nn.Module, state: TrainState, split, mesh, *, batch_size: int,
             eval_step: Callable | None = None) -> dict[str, float]:
  """Accuracy, error count and cross-entropy of ``state``'s model on a whole split."""
  batch_size = _round_up(batch_size, mesh.size)
  eval_step = eval_step or jax.jit(make_eval_step(model))
  total = None
  for batch in kdata.eval_batches(split, batch_size=batch_size, host_slice=parallel.process_slice(batch_size)):
    batch.pop("index")
    total = add_metrics(total, eval_step(state.params, state.batch_stats, parallel.shard_batch(batch, mesh)))
  result = summarize(total)
  result["errors"] = int(round(float(jax.device_get(total["errors"][0]))))
  result["examples"] = len(split)
  return result


def labelled_training_examples(transfer_set: kdata.TransferSet) -> kdata.SubsetSplit:
  """The examples of ``transfer_set`` whose labels the stage may use (not the teacher-labelled rest)."""
  return kdata.SubsetSplit(transfer_set.split, transfer_set.indices[np.asarray(transfer_set.label_mask) > 0])


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


# --- the stage runner: setup, a method's step builder, and one fit loop -------------------------------


@dataclasses.dataclass
class Setup:
  """What :func:`setup_stage` builds for one stage; a method's step builder reads it.

  Attributes:
    config: the stage config (validated).
    workdir: the stage's work directory (``config.json`` is already written).
    mesh: the ``("data",)`` device mesh.
    dataset: the loaded (and standardised) dataset; ``dataset.test`` is evaluated at the end
      (``config.test_dataset``'s test split when that is set), ``dataset.retrieval`` is the
      held-out-class retrieval set when ``config.held_out_classes`` is set.
    transfer_set: the training examples the stage iterates over (labelled and unlabelled).
    student: the model the stage exports (``config.model``): the state's ``params``/``batch_stats``
      are its variables, and later stages load them as a teacher or through ``init_from``. ``None``
      for a stage that exports no model (:attr:`StageProgram.exports_model`).
    teacher_models, teacher_variables: the teacher(s) of ``config.teacher_workdir`` (empty if the
      method uses none); the variables are host arrays, never trained.
    num_steps: the stage length in updates.
    tx: the optimizer of the config (learning-rate schedule over ``num_steps``).
    cached_teacher: batches carry ``teacher_logits`` ``[batch, members, classes]`` computed once,
      and the step must not run the teacher (see :func:`teacher_output`).
    example: a zero input batch of one example, for initialisation.
    init_variables: layers copied from ``config.init_from`` (``None`` if not set).
    kernels: what the layers compute with on this mesh (:func:`kdjax.models.kernels.describe`).
  """
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  dataset: kdata.Dataset
  transfer_set: kdata.TransferSet
  student: nn.Module | None
  teacher_models: list
  teacher_variables: list
  num_steps: int
  tx: optax.GradientTransformation
  cached_teacher: bool
  example: jax.Array
  init_variables: dict[str, Any] | None
  kernels: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """A method's own stage, for training that is not "one teacher forward + one student update".

  The shared :func:`fit` loop runs it: resume, checkpoints, logging, the non-finite guard and
  evaluation are the loop's, the state and the step are the method's.

  Attributes:
    init_state: ``init_state(setup) -> state``: any pytree of arrays that Flax can serialise (a
      ``flax.struct`` dataclass, dicts, optax states). It must have ``step`` (int32 scalar, the
      number of updates done) and ``params``/``batch_stats``: the variables of ``setup.student``,
      the model the stage exports (more parameter groups and optimizer states go in other fields).
    make_step: ``make_step(setup) -> step(state, batch, teacher_variables) -> (state, metrics)``,
      un-jitted (the loop jits it once, donating the state). ``metrics`` maps names to ``(sum,
      count)`` pairs and includes ``"nonfinite"`` (see :func:`skip_if_nonfinite`).
    needs_teacher: whether the stage reads ``config.teacher_workdir``.
    cacheable_teacher: the step reads only the teacher's logits (through :func:`teacher_output`), so
      they may be computed once when the inputs are not augmented.
    evaluate: ``evaluate(setup, state) -> dict`` of further results (e.g. a jointly trained
      teacher's test accuracy), written under ``"extra"`` in ``results.json``; the exported student's
      test accuracy is always measured by the loop. A stage that produces an artefact (statistics,
      a dataset) writes it here, into ``setup.workdir``.
    batches: ``batches(setup) -> batches(start_step)``, the stage's own batch source: it yields the
      device batches of steps ``start_step .. num_steps-1`` and must be a pure function of the seed
      and the step (so a resumed run continues exactly). ``None``: :func:`stage_batches`, shuffled
      epochs of the transfer set.
    exports_model: ``False`` for a stage that trains no model (it records statistics or optimises
      inputs): no student is built from ``config.model`` (``setup.student`` is ``None``), the state
      needs no ``params``/``batch_stats``, and the loop measures no test accuracy (``results.json``
      holds ``extra`` and ``steps``).
    stage_length: ``stage_length(config, dataset, transfer_set) -> int``, the stage's number of steps
      when ``config.num_steps`` is 0 (e.g. one batch per class, or classes × optimisation steps), so a
      user need not work it out; ``None``: ``num_epochs`` passes over the transfer set.
    teacher_features_only: the stage reads only the teacher's intermediate features, never its logits, so a
      teacher trained on other classes (another task: Knowledge Projection's source task) is accepted.
  """
  init_state: Callable[[Setup], Any]
  make_step: Callable[[Setup], Callable]
  needs_teacher: bool = False
  cacheable_teacher: bool = False
  evaluate: Callable[[Setup, Any], dict[str, Any]] | None = None
  batches: Callable[[Setup], Callable[[int], Iterator[dict[str, jax.Array]]]] | None = None
  exports_model: bool = True
  stage_length: Callable[[ml_collections.ConfigDict, kdata.Dataset, kdata.TransferSet], int] | None = None
  teacher_features_only: bool = False


def objective_program(objective: Objective) -> StageProgram:
  """The shared distillation step (:func:`make_train_step`) as a stage program."""
  def init_state(setup: Setup) -> TrainState:
    return create_train_state(setup.student, setup.tx, setup.example, setup.config.seed, objective=objective,
                              teacher_models=setup.teacher_models, teacher_variables=setup.teacher_variables,
                              init_variables=setup.init_variables)

  def make_step(setup: Setup) -> Callable:
    return make_train_step(student=setup.student, objective=objective, tx=setup.tx,
                           teacher_models=() if setup.cached_teacher else tuple(setup.teacher_models),
                           cached_teacher=setup.cached_teacher, total_steps=setup.num_steps)
  return StageProgram(init_state, make_step, needs_teacher=objective.needs_teacher,
                      cacheable_teacher=objective.needs_teacher and not objective.teacher_features)


def as_program(method: Objective | StageProgram) -> StageProgram:
  return method if isinstance(method, StageProgram) else objective_program(method)


def teacher_output(batch: Mapping[str, jax.Array], teacher_models: Sequence[nn.Module],
                   teacher_variables: Sequence[Any], *, cached: bool, features: Sequence[str] = ()) -> ModelOutput:
  """The teacher's output for ``batch``: from ``batch["teacher_logits"]`` when ``cached``, else a live
  forward pass of ``teacher_models`` (both under ``stop_gradient``)."""
  if cached:
    logits = jnp.swapaxes(batch["teacher_logits"], 0, 1)  # [members, batch, classes]
    return ModelOutput(jax.lax.stop_gradient(logits[0] if logits.shape[0] == 1 else logits), {}, {})
  return teacher_forward(teacher_models, teacher_variables, batch["image"], features=features)


# Fields that change only how a run is evaluated, logged or checkpointed, never what it computes: a resumed run may
# change them (e.g. a smaller eval_batch_size after running out of memory at the evaluation).
EVALUATION_ONLY_FIELDS = ("eval_batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                          "report_train_accuracy")
# Entries setup_stage adds to config.json beyond the config's own fields; a run recorded before one of them existed
# resumes without it being compared.
RECORDED_FIELDS = ("data_fingerprint", "example_shape", "partial_teachers")
# Recorded in config.json but free to differ on resume (the log says so): what the layers computed with.
NOTED_FIELDS = ("kernels",)
# Config fields kdjax.config.default_stage_config may not define yet; setup adds them with these defaults.
EXTRA_STAGE_FIELDS = {"allow_partial_teacher": False, "num_classes": 0}


def ensure_stage_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the fields of :data:`EXTRA_STAGE_FIELDS` that ``config`` lacks (with their defaults), in place.

  ``allow_partial_teacher``: accept an unfinished teacher or ``init_from`` run (:func:`load_teachers`).
  ``num_classes``: the dataset's class count when its labels do not show it (an ``.npz`` whose classes do not
  all occur in ``y_train``); 0 = from the data. ``config.json`` records the count used.
  """
  missing = {k: v for k, v in EXTRA_STAGE_FIELDS.items() if k not in config}
  if missing:
    with config.unlocked():
      for key, value in missing.items():
        config[key] = value
  return config


def _is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def check_stage_config(config: ml_collections.ConfigDict) -> None:
  """Checks the numeric fields of a stage config before anything is loaded or written.

  Raises:
    ValueError: a field of the wrong type or out of range; the message names the field, the value given
      and what is expected.
  """
  why = {
      "batch_size": "the number of training examples per step",
      "eval_batch_size": "the number of test examples evaluated at once; lower it if evaluation runs out of memory",
      "log_every_steps": "metrics are written every this many steps",
      "checkpoint_every_steps": "a checkpoint is written every this many steps and at the end",
      "keep_checkpoints": "the newest checkpoints kept; with none, a finished run could not be re-evaluated and "
                          "a rerun would train it again",
      "num_steps": "0 = num_epochs epochs of the transfer set",
      "num_epochs": "used when num_steps is 0; both 0 = a stage of no steps, which keeps its initial state",
      "jitter": "random shifts of up to this many pixels; 0 = none",
      "labelled_examples": "0 = every training example keeps its label",
      "seed": "the run's random seed",
      "split_seed": "which examples keep their labels",
      "num_classes": "the dataset's class count; 0 = from the data",
  }
  minimum = {"batch_size": 1, "eval_batch_size": 1, "log_every_steps": 1, "checkpoint_every_steps": 1,
             "keep_checkpoints": 1, "num_steps": 0, "num_epochs": 0, "jitter": 0, "labelled_examples": 0,
             "seed": 0, "split_seed": 0, "num_classes": 0}
  for name, low in minimum.items():
    value = config[name]
    if not (_is_int(value) and value >= low):
      raise ValueError(f"{name} must be an integer >= {low} ({why[name]}); got {value!r}. "
                       f"Fix it with --config.{name}=N")
  if not (_is_real(config.learning_rate) and np.isfinite(config.learning_rate) and config.learning_rate > 0):
    raise ValueError(f"learning_rate must be a finite number > 0; got {config.learning_rate!r}")
  for name in ("momentum", "weight_decay"):
    if not (_is_real(config[name]) and np.isfinite(config[name]) and config[name] >= 0):
      raise ValueError(f"{name} must be a finite number >= 0; got {config[name]!r}")
  if not isinstance(config.get("allow_partial_teacher", False), bool):
    raise ValueError(f"allow_partial_teacher must be true or false; got {config.allow_partial_teacher!r}")


def check_stage_data(config: ml_collections.ConfigDict, dataset: kdata.Dataset, transfer_set: kdata.TransferSet,
                     program: StageProgram) -> None:
  """Checks that the data fits the config before anything is written: batch size against the transfer set,
  augmentation against the image layout, test (and retrieval) inputs against the training inputs.

  Raises:
    ValueError: naming the fields (or splits), what was expected and what was given.
  """
  if program.batches is None and config.batch_size > len(transfer_set):
    raise ValueError(f"batch_size={config.batch_size} is larger than the transfer set of dataset "
                     f"{config.dataset!r} ({len(transfer_set)} examples"
                     + (f", labelled_examples={config.labelled_examples}, include_unlabelled=False"
                        if len(transfer_set) < len(dataset.train) else "")
                     + f"); use --config.batch_size={len(transfer_set)} or less")
  if config.labelled_examples >= len(dataset.train):
    log.warning("labelled_examples=%d is not below the %d training examples of %r: every example keeps its label "
                "(the protocol's labelled/unlabelled split does not exist on this dataset)", config.labelled_examples,
                len(dataset.train), config.dataset)
  shape = tuple(dataset.example_shape)
  if (config.jitter or config.hflip) and len(shape) != 3:
    raise ValueError(f"jitter={config.jitter} / hflip={config.hflip} shift or flip images of shape (height, width, "
                     f"channels), but dataset {config.dataset!r} has examples of shape {shape}; reshape the "
                     "images (e.g. (28, 28, 1)) or set --config.jitter=0 --config.hflip=false")
  for name, split in (("test", dataset.test), ("retrieval", dataset.retrieval)):
    if split is not None and tuple(split.example_shape) != shape:
      raise ValueError(f"the {name} examples of {config.test_dataset or config.dataset!r} have shape "
                       f"{tuple(split.example_shape)}, but the training examples have {shape}; both must match")
    if split is not None and len(split) == 0:
      raise ValueError(f"the {name} split of {config.test_dataset or config.dataset!r} is empty")


def check_model_input(model: nn.Module, name: str, example_shape: Sequence[int], *, dataset: str) -> None:
  """Raises ValueError, naming the model, the dataset and the shape, if ``model`` cannot take ``example_shape``
  inputs (traced with ``jax.eval_shape``: nothing is computed)."""
  example = jax.ShapeDtypeStruct((1, *example_shape), jnp.float32)
  key = jax.random.PRNGKey(0)
  try:
    jax.eval_shape(lambda x: model.init({"params": key, "dropout": key}, x, train=False), example)
  except Exception as e:  # noqa: BLE001 - any layer's shape error, re-raised with the model and data named
    raise ValueError(f"model {name!r} cannot take the examples of dataset {dataset!r} (shape {tuple(example_shape)}): "
                     f"{type(e).__name__}: {str(e).splitlines()[0][:200]}; pick a model for this input shape "
                     "(`kdjax list models`) or reshape the data") from None


def check_resumable(workdir: str, saved_config: dict[str, Any]) -> None:
  """Refuses to resume ``workdir`` with a config that differs from the one it recorded.

  A run recorded before a field was added to :func:`default_stage_config` ran with that field's
  default, so a missing field counts as its default. The :data:`EVALUATION_ONLY_FIELDS` may change; the
  :data:`RECORDED_FIELDS` are compared only when the run recorded them. A changed data fingerprint gets its own
  message (the data file changed under the run).
  """
  previous = ckpt.read_config(workdir)
  if previous is None:
    return
  defaults = json.loads(json.dumps({**config_to_dict(default_stage_config()), **EXTRA_STAGE_FIELDS}))
  previous = {**{k: v for k, v in defaults.items() if k not in previous}, **previous}
  ignored = set(EVALUATION_ONLY_FIELDS) | set(NOTED_FIELDS) | {k for k in RECORDED_FIELDS if k not in previous}
  for key in NOTED_FIELDS:
    if key in previous and previous[key] != saved_config.get(key):
      log.warning("resuming %s on other kernels: %s was %s, now %s (results may differ in the last digits)",
                  workdir, key, previous[key], saved_config.get(key))
  if previous.get("data_fingerprint", saved_config.get("data_fingerprint")) != saved_config.get("data_fingerprint"):
    raise ValueError(f"the data of {saved_config.get('dataset')!r} changed since the run in {workdir} started "
                     f"(data fingerprint {previous['data_fingerprint']} then, {saved_config['data_fingerprint']} "
                     "now); resuming would train one model on two datasets. Restore the original data, or use a "
                     "new --workdir")
  changed = sorted(k for k in set(previous) | set(saved_config)
                   if k not in ignored and previous.get(k) != saved_config.get(k))
  if changed:
    raise ValueError(f"{workdir} holds a run with a different config (fields {changed} differ: "
                     + ", ".join(f"{k} was {previous.get(k)!r}, now {saved_config.get(k)!r}" for k in changed[:5])
                     + "); use a new --workdir or the same config to resume (only "
                     f"{', '.join(EVALUATION_ONLY_FIELDS)} may change on resume)")


def setup_stage(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> tuple[Setup, StageProgram]:
  """Checks the config, loads the data and teachers, builds the method, records ``config.json``.

  Everything that can be wrong with the config, the data and the teachers is found before ``config.json``
  is written (or the work directory created), so a corrected config can use the same work directory.
  """
  check_keys(config)
  ensure_stage_fields(config)
  check_stage_config(config)
  program = as_program(make_method(config.method, config.loss))  # bad method/loss fields fail first
  if config.teacher_workdir and not program.needs_teacher:
    raise ValueError(f"method {config.method!r} uses no teacher, but teacher_workdir={config.teacher_workdir!r} "
                     "was given; remove --config.teacher_workdir (or pick a distillation method)")
  if program.needs_teacher and not config.teacher_workdir:
    raise ValueError(f"method {config.method!r} needs a teacher: set --config.teacher_workdir=DIR "
                     "(a finished teacher run; comma-separated for an ensemble)")
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  ckpt.check_workdir(workdir)
  used_kernels = prepare_kernels(mesh)  # before anything below traces a model

  dataset = load_stage_dataset(config)
  transfer_set = kdata.make_transfer_set(dataset, labelled_examples=config.labelled_examples,
                                         include_unlabelled=config.include_unlabelled,
                                         split_seed=config.split_seed)
  check_stage_data(config, dataset, transfer_set, program)
  student = build_model(config.model, config.model_kwargs, dataset.num_classes) if program.exports_model else None
  if student is not None:
    check_model_input(student, config.model, dataset.example_shape, dataset=config.dataset)
  teacher_models, teacher_variables, partial = [], [], {}
  if program.needs_teacher:
    teacher_models, teacher_variables = load_teachers(
        config.teacher_workdir, allow_partial=config.allow_partial_teacher, example_shape=dataset.example_shape,
        num_classes=None if program.teacher_features_only else dataset.num_classes)
  init_variables = None
  if config.init_from:
    init_variables = load_layers(config.init_from, tuple(config.init_layers),
                                 allow_partial=config.allow_partial_teacher)
  if config.allow_partial_teacher:
    used = [w for w in config.teacher_workdir.split(",") if w] + ([config.init_from] if config.init_from else [])
    partial = {w: reasons for w in used if (reasons := ckpt.unfinished_reasons(w))}
    for w, reasons in partial.items():
      log.warning("using the unfinished run %s (allow_partial_teacher): %s", w, "; ".join(reasons))

  if config.num_steps > 0:
    num_steps = config.num_steps
  elif program.stage_length is not None:
    num_steps = int(program.stage_length(config, dataset, transfer_set))
  else:
    num_steps = config.num_epochs * (len(transfer_set) // config.batch_size)
  tx = make_optimizer(config, num_steps)  # bad optimizer/schedule fields fail before config.json is written
  saved_config = {**config_to_dict(config), "num_classes": dataset.num_classes, "num_steps": num_steps,
                  "example_shape": list(dataset.example_shape), "data_fingerprint": data_fingerprint(dataset),
                  "kernels": used_kernels}
  if partial:
    saved_config["partial_teachers"] = partial
  saved_config = json.loads(json.dumps(saved_config))  # as it reads back (tuples become lists)
  check_resumable(workdir, saved_config)
  ckpt.write_config(workdir, saved_config)

  augmented = bool(config.jitter or config.hflip)
  cached = bool(program.needs_teacher and program.cacheable_teacher and config.cache_teacher and not augmented)
  if program.needs_teacher and config.cache_teacher and augmented:
    log.info("teacher runs live: inputs are augmented, so cached teacher outputs would not match them")
  setup = Setup(config=config, workdir=workdir, mesh=mesh, dataset=dataset, transfer_set=transfer_set,
                student=student, teacher_models=teacher_models, teacher_variables=teacher_variables,
                num_steps=num_steps, tx=tx, cached_teacher=cached,
                example=jnp.zeros((1, *dataset.example_shape), jnp.float32), init_variables=init_variables,
                kernels=used_kernels)
  return setup, program


def mesh_platform(mesh) -> str:
  return mesh.devices.flat[0].platform


def prepare_kernels(mesh) -> dict[str, str]:
  """Builds what the stage's layers will use before anything is traced (oneDNN on a one-CPU-device mesh) and
  says what they compute with (:func:`kdjax.models.kernels.describe`, recorded in config.json/results.json)."""
  from kdjax.models import kernels, onednn
  platform = mesh_platform(mesh)
  if platform == "cpu" and kernels.mode() == "auto" and mesh.size == 1 and onednn.active_policy() != "off":
    onednn.prepare()
  with kernels.platform(platform, devices=mesh.size):
    return kernels.describe()


def load_stage_dataset(config: ml_collections.ConfigDict) -> kdata.Dataset:
  """The stage's dataset: ``config.dataset``, tested on ``config.test_dataset`` (if set), standardised,
  restricted to ``config.classes`` (if set, relabelled 0..k-1), with ``config.held_out_classes`` (ids
  after that relabelling) split off as the retrieval set (if set)."""
  num_classes = config.get("num_classes", 0) or None
  tfds_options = {"label_feature": config.get("label_feature", "label"),
                  "image_size": tuple(config.get("image_size", ())) or None}
  dataset = kdata.load(config.dataset, data_dir=config.data_dir or None, require_test=not config.test_dataset,
                       num_classes=num_classes, **(tfds_options if not config.dataset.endswith(".npz") else {}))
  if config.test_dataset:
    dataset = kdata.with_test_split(dataset, kdata.load(config.test_dataset, data_dir=config.data_dir or None,
                                                        num_classes=num_classes, **tfds_options))
  if config.image_mean:
    dataset = kdata.standardize(dataset, config.image_mean, config.image_std)
  if config.get("classes", ()):
    dataset = kdata.keep_classes(dataset, config.classes)
  if config.held_out_classes:
    dataset = kdata.hold_out_classes(dataset, config.held_out_classes)
  return dataset


def evaluate_retrieval(model: nn.Module, state: Any, split, mesh, *, feature: str, batch_size: int,
                       normalize: bool = False, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Leave-one-out retrieval on ``split`` (:func:`kdjax.retrieval.retrieval_metrics`) with the model's
  ``feature`` (flattened per example, L2-normalised when ``normalize``) as the embedding."""
  from kdjax.retrieval import retrieval_metrics
  batch_size = _round_up(batch_size, mesh.size)

  @jax.jit
  def embed(params, batch_stats, images):
    out = models.apply_model(model, _variables(params, batch_stats), images, train=False, features=(feature,))
    return out.features[feature].reshape(images.shape[0], -1)

  chunks = []
  for batch in kdata.eval_batches(split, batch_size=batch_size, host_slice=parallel.process_slice(batch_size)):
    emb = embed(state.params, state.batch_stats, parallel.shard_batch({"image": batch["image"]}, mesh)["image"])
    if jax.process_count() > 1:
      emb = multihost_utils.process_allgather(emb, tiled=True)
    chunks.append(np.asarray(emb))
  embeddings = np.concatenate(chunks)[:len(split)].astype(np.float64)
  if normalize:
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  return retrieval_metrics(embeddings, np.asarray(split.labels), ks=ks)


def stage_batches(setup: Setup) -> Callable[[int], Iterator[dict[str, jax.Array]]]:
  """``batches(start_step)``: the stage's device batches from ``start_step`` on, prefetched.

  With a cached teacher the teacher's logits for the whole transfer set are computed on the first
  call that has steps left (a finished run that only re-evaluates never runs the teacher).
  """
  config = setup.config

  def batches(start_step: int) -> Iterator[dict[str, jax.Array]]:
    teacher_logits = None
    if setup.cached_teacher and start_step < setup.num_steps:
      teacher_logits = precompute_teacher_logits(setup.teacher_models, setup.teacher_variables,
                                                 setup.transfer_set, setup.mesh, batch_size=config.eval_batch_size)
    source = kdata.TrainBatches(setup.transfer_set, batch_size=config.batch_size, seed=config.seed,
                                jitter=config.jitter, hflip=config.hflip, teacher_logits=teacher_logits,
                                host_slice=parallel.process_slice(config.batch_size))
    return kdata.prefetch((source.batch(s) for s in range(start_step, setup.num_steps)),
                          functools.partial(parallel.shard_batch, mesh=setup.mesh))
  return batches


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, progress: bool = True,
                       callbacks: Sequence[Callable[[int, Any], None]] = ()) -> dict[str, Any]:
  """Runs one training stage in ``workdir`` and returns its evaluation.

  The stage is set up by :func:`setup_stage`, its state and step come from the method's registry
  entry (an :class:`~kdjax.methods.objective.Objective` for the shared distillation step, or the
  paper's own :class:`StageProgram`), and :func:`fit` runs it. Re-running on the same ``workdir``
  resumes from the last good checkpoint (a finished run just re-evaluates). The resumed run computes
  exactly what an uninterrupted one does: the batch, the augmentation and the dropout mask of a step
  depend only on the seed and the step.

  Args:
    config: a stage config (see :func:`kdjax.config.default_stage_config`).
    workdir: where checkpoints, ``config.json``, ``metrics.jsonl`` and ``results.json`` go.
    mesh: device mesh (default: every device).
    progress: show a progress bar.
    callbacks: passed to :func:`fit` (called after each step).

  Returns:
    ``{"test_accuracy", "test_errors", "test_examples", "test_cross_entropy", "steps", "teacher_cached",
    "train": {...last metrics}, "extra": {...}}`` (plus ``train_accuracy``/``train_examples`` with
    ``config.report_train_accuracy``), also written to ``workdir/results.json``.
  """
  with ckpt.WorkdirLock(workdir):  # one run per work directory; a refused config leaves no trace
    return _train_and_evaluate_locked(config, workdir, mesh=mesh, progress=progress, callbacks=callbacks)


def _train_and_evaluate_locked(config, workdir, *, mesh, progress, callbacks) -> dict[str, Any]:
  from kdjax.models import kernels
  mesh = mesh or parallel.make_mesh()
  with kernels.platform(mesh_platform(mesh), devices=mesh.size):  # every layer traced here: the mesh's kernels
    return _run_stage(config, workdir, mesh=mesh, progress=progress, callbacks=callbacks)


def _run_stage(config, workdir, *, mesh, progress, callbacks) -> dict[str, Any]:
  setup, program = setup_stage(config, workdir, mesh=mesh)
  state = program.init_state(setup)
  step = program.make_step(setup)

  def evaluate_stage(state) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if program.exports_model:
      result = evaluate(setup.student, state, setup.dataset.test, setup.mesh, batch_size=config.eval_batch_size)
      summary = {"test_accuracy": result["accuracy"], "test_errors": result["errors"],
                 "test_examples": result["examples"], "test_cross_entropy": result["cross_entropy"]}
      if config.get("report_train_accuracy", False):  # e.g. a protocol's "student alone fits its labels" budget
        train = evaluate(setup.student, state, labelled_training_examples(setup.transfer_set), setup.mesh,
                         batch_size=config.eval_batch_size)
        summary.update(train_accuracy=train["accuracy"], train_examples=train["examples"])
      if setup.dataset.retrieval is not None:
        summary["retrieval"] = evaluate_retrieval(setup.student, state, setup.dataset.retrieval, setup.mesh,
                                                  feature=config.embedding_feature,
                                                  normalize=config.embedding_normalize,
                                                  batch_size=config.eval_batch_size)
    if program.evaluate is not None:
      summary["extra"] = program.evaluate(setup, state)
    return summary

  # The step's third argument: the teacher variables, replicated (none when their logits come with the batches).
  teacher_variables = () if setup.cached_teacher else parallel.replicate(tuple(setup.teacher_variables), setup.mesh)
  batches = program.batches(setup) if program.batches is not None else stage_batches(setup)
  return fit(state, step, batches=batches, num_steps=setup.num_steps, workdir=workdir,
             mesh=setup.mesh, evaluate=evaluate_stage, step_args=(teacher_variables,),
             checkpoint_every_steps=config.checkpoint_every_steps, log_every_steps=config.log_every_steps,
             keep_checkpoints=config.keep_checkpoints, progress=progress, callbacks=callbacks,
             results={"teacher_cached": setup.cached_teacher, "kernels": setup.kernels})


def fit(state: Any, step: Callable, *, batches: Callable[[int], Iterable[dict[str, jax.Array]]], num_steps: int,
        workdir: str, mesh, evaluate: Callable[[Any], dict[str, Any]], step_args: tuple = (),
        checkpoint_every_steps: int = 500, log_every_steps: int = 100, keep_checkpoints: int = 2,
        progress: bool = True, callbacks: Sequence[Callable[[int, Any], None]] = (),
        results: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The training loop of every stage; it knows nothing of any paper.

  Resumes ``state`` from the newest readable checkpoint in ``workdir``, runs the remaining steps of
  ``step`` (jitted once here, the state donated) over ``batches(start_step)``, logs the step metrics
  every ``log_every_steps`` (``metrics.jsonl``, TensorBoard, the progress bar), checkpoints every
  ``checkpoint_every_steps`` and at the end, stops with :class:`~kdjax.errors.NonFiniteError` when a
  step reports ``nonfinite`` (the last good checkpoint is kept), and finally writes ``evaluate(state)``
  with ``results`` to ``results.json``.

  Args:
    state: the initial state, any Flax-serialisable pytree with a ``step`` field (int32 scalar).
    step: ``step(state, batch, *step_args) -> (state, metrics)``, un-jitted; ``metrics`` maps names to
      ``(sum, count)`` pairs and must include ``"nonfinite"``.
    batches: ``batches(start_step)`` yields the device batches of steps ``start_step .. num_steps-1``.
    num_steps: the stage length.
    workdir: where ``checkpoints/``, ``metrics.jsonl`` and ``results.json`` go.
    mesh: the state is replicated over it.
    evaluate: ``evaluate(state) -> dict`` of results (``test_accuracy`` etc.).
    step_args: further arguments of ``step`` (e.g. the replicated teacher variables).
    callbacks: ``callback(steps_done, state)`` after every step, after any checkpoint due at that
      step was started (tests use one to simulate a crash).
    results: further entries of ``results.json``.

  Returns:
    ``{**evaluate(state), "steps": num_steps, "train": {last logged train metrics}, **results}``.

  Raises:
    ValueError: ``checkpoint_every_steps``, ``log_every_steps`` or ``keep_checkpoints`` < 1, or ``workdir``
      holds a finished run (``results.json``) but no checkpoint could be restored: it is never retrained over.
  """
  for name, value in (("checkpoint_every_steps", checkpoint_every_steps), ("log_every_steps", log_every_steps),
                      ("keep_checkpoints", keep_checkpoints)):
    if not (_is_int(value) and value >= 1):
      raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
  checkpointer = ckpt.Checkpointer(workdir, keep=keep_checkpoints)
  try:
    template = serialization.to_state_dict(state)
    restored = checkpointer.restore_latest(jax.tree.map(np.asarray, template))
    results_path = os.path.join(workdir, ckpt.RESULTS_FILE)
    if restored is None and os.path.exists(results_path):
      raise ValueError(
          f"{workdir} holds a finished run ({ckpt.RESULTS_FILE}) but no readable checkpoint (see "
          f"{ckpt.UNREADABLE_DIR}/ for any set aside); it is not retrained over. To train it again, move "
          f"{results_path} away; to keep it, restore its checkpoints/")
    if restored is not None:
      state = serialization.from_state_dict(state, restored)
      log.info("resumed %s at step %d", workdir, int(state.step))
    state = parallel.replicate(state, mesh)
    start_step = int(jax.device_get(state.step))
    step_fn = jax.jit(step, donate_argnums=(0,))
    writer = MetricWriter(workdir, total_steps=num_steps, initial_step=start_step, progress=progress,
                          description=os.path.basename(os.path.normpath(workdir)))
    last_train: dict[str, float] = {}
    try:
      window, flags, window_start = None, [], start_step
      for done, batch in enumerate(batches(start_step) if start_step < num_steps else (), start=start_step + 1):
        state, metrics = step_fn(state, batch, *step_args)
        if "nonfinite" not in metrics:
          raise ValueError(f"the stage's step must report a 'nonfinite' metric (see kdjax.train.skip_if_nonfinite); "
                           f"it reported {sorted(metrics)}")
        window = add_metrics(window, metrics)
        flags.append(metrics["nonfinite"][0])
        save_now = done % checkpoint_every_steps == 0 or done == num_steps
        if done % log_every_steps == 0 or save_now:
          _raise_if_nonfinite(flags, window_start, checkpointer)
          last_train = summarize(window)
          writer.write(done, {f"train/{k}": v for k, v in last_train.items() if k != "nonfinite"})
          window, flags, window_start = None, [], done
        if save_now:
          checkpointer.save(done, serialization.to_state_dict(state))
        writer.advance(done)
        for callback in callbacks:
          callback(done, state)
        if done == num_steps:
          break
      if start_step == num_steps and checkpointer.manager.latest_step() != num_steps:
        checkpointer.save(num_steps, serialization.to_state_dict(state))  # a 0-step stage keeps its start
      checkpointer.wait()
      summary = {**evaluate(state), "steps": num_steps, **(results or {}), "train": last_train}
    finally:
      writer.close()
  finally:
    checkpointer.close()
  writer.write_json("results.json", summary)
  return summary


def skip_if_nonfinite(finite: jax.Array, new: Any, old: Any) -> tuple[Any, tuple[jax.Array, jax.Array]]:
  """``(new if finite else old, nonfinite metric)``: the guard every stage step applies to its update.

  ``finite`` is a boolean scalar (e.g. :func:`all_finite` of the loss and gradients). A NaN then
  never reaches the parameters or a checkpoint, and :func:`fit` stops at the step that met it.
  """
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return kept, (1.0 - finite.astype(jnp.float32), jnp.float32(1.0))


def all_finite(*trees) -> jax.Array:
  """Whether every leaf of ``trees`` is finite (a boolean scalar)."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _raise_if_nonfinite(flags: list[jax.Array], window_start: int, checkpointer) -> None:
  if not flags:
    return
  host = np.asarray(jax.device_get(jnp.stack(flags)))
  if host.any():
    bad = window_start + int(np.argmax(host > 0))  # the step (0-based) whose update failed
    checkpointer.wait()
    raise NonFiniteError(f"step {bad}: the loss or its gradients became NaN/inf; the update was skipped and "
                         f"training stopped. The last good checkpoint in {checkpointer.directory} is kept "
                         "(lower the learning rate or check the inputs)")
