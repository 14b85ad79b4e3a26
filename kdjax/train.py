"""TrainState, the generic distillation step, and the train/evaluate loop of one stage.

The step is ``(state, batch) -> (state, metrics)``: built once by :func:`make_train_step` from a
student model, an :class:`~kdjax.methods.objective.Objective` and an optax optimizer, jitted
once with the state donated. The teacher's variables are a separate argument of the jitted
function (bind them with ``functools.partial``): never differentiated (``stop_gradient`` on
everything the teacher outputs), never updated, never saved with the student. Randomness inside
the step is ``fold_in(state.rng, state.step)``, so it depends on the step alone. Metrics are
``(sum, count)`` pairs, exact when added over steps, devices and hosts.

:func:`train_and_evaluate` runs one stage from a config: it resumes from the work directory's
last good checkpoint, trains on a ``("data",)`` mesh over every device, checkpoints, logs, and
evaluates on the test split.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from kdjax import checkpoint as ckpt
from kdjax import data as kdata
from kdjax import models, parallel
from kdjax.config import check_keys, default_stage_config
from kdjax.errors import NonFiniteError, UnknownNameError, unknown_name
from kdjax.logging_utils import MetricWriter
from kdjax.methods.objective import Objective, make_objective
from kdjax.models.features import ModelOutput

log = logging.getLogger(__name__)

Metrics = dict[str, tuple[jax.Array, jax.Array]]


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

  def as_dict(self) -> dict[str, Any]:
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state, "rng": self.rng, "aux_params": self.aux_params}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
    return cls(**d)


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
  variables = model.init({"params": init_key, "dropout": init_key}, example_input, train=False)
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


def _mean_metric(values: jax.Array, weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  values = values.astype(jnp.float32)
  if weight is None:
    return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
  return jnp.sum(values * weight), jnp.sum(weight)


def make_train_step(*, student: nn.Module, objective: Objective, tx: optax.GradientTransformation,
                    teacher_models: Sequence[nn.Module] = (), cached_teacher: bool = False) -> Callable:
  """Builds the un-jitted step ``step(state, batch, teacher_variables) -> (state, metrics)``.

  Args:
    student: the student model.
    objective: the method's objective.
    tx: the optimizer.
    teacher_models: the teacher model(s) (several = an ensemble); their variables are the
      step's third argument, a tuple with one entry per model.
    cached_teacher: read teacher logits from ``batch["teacher_logits"]`` (``[batch, members,
      classes]``, precomputed by :func:`precompute_teacher_logits`) instead of running the teacher.

  A non-finite loss or gradient leaves the state unchanged (except ``step``) and sets the
  ``nonfinite`` metric, so a NaN never reaches the parameters or a checkpoint.
  """
  if objective.needs_teacher and not (teacher_models or cached_teacher):
    raise ValueError("this method needs a teacher: set teacher_workdir (or pass teacher_models)")
  if cached_teacher and objective.teacher_features:
    raise ValueError(f"teacher features {objective.teacher_features} cannot be cached; run the teacher live")

  def step(state: TrainState, batch: dict[str, jax.Array], teacher_variables: Sequence[Any] = ()):
    rng = jax.random.fold_in(state.rng, state.step)
    teacher = None
    if cached_teacher:
      logits = jnp.swapaxes(batch["teacher_logits"], 0, 1)  # [members, batch, classes]
      teacher = ModelOutput(logits[0] if logits.shape[0] == 1 else logits, {}, {})
    elif teacher_models:
      teacher = teacher_forward(teacher_models, teacher_variables, batch["image"],
                                features=objective.teacher_features)

    def loss_fn(trainable):
      params, aux_params = trainable
      out = models.apply_model(student, _variables(params, state.batch_stats), batch["image"], train=True,
                               rngs={"dropout": rng}, features=objective.student_features)
      if objective.init_aux is None:
        per_example, extras = objective.fn(out, teacher, batch, state.step)
      else:
        per_example, extras = objective.fn(out, teacher, batch, state.step, aux=aux_params)
      return jnp.mean(per_example), (out, per_example, extras)

    trainable = (state.params, state.aux_params)
    (loss, (out, per_example, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params, aux_params = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              batch_stats=keep(out.batch_stats, state.batch_stats),
                              opt_state=keep(opt_state, state.opt_state),
                              aux_params=keep(aux_params, state.aux_params))
    correct = (jnp.argmax(out.logits, -1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss": _mean_metric(per_example),
               "train_accuracy": _mean_metric(correct, batch["label_mask"]),
               "nonfinite": (1.0 - finite.astype(jnp.float32), jnp.float32(1.0))}
    metrics.update({k: _mean_metric(v) for k, v in extras.items()})
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module) -> Callable:
  """``eval_step(params, batch_stats, batch) -> metrics`` (accuracy, errors, loss; padding-weighted)."""
  def eval_step(params, batch_stats, batch):
    logits = models.apply_model(model, _variables(params, batch_stats), batch["image"], train=False).logits
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1)[:, 0]
    w = batch["weight"]
    return {"accuracy": _mean_metric(correct, w), "errors": (jnp.sum((1 - correct) * w), jnp.float32(1.0)),
            "cross_entropy": _mean_metric(ce, w)}
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


def load_teachers(teacher_workdir: str) -> tuple[list[nn.Module], list[Any]]:
  """Rebuilds each teacher (comma-separated work directories) from its own run's config, read-only."""
  teacher_models, teacher_variables = [], []
  for workdir in [w for w in teacher_workdir.split(",") if w]:
    variables, tconfig, _ = ckpt.load_teacher_variables(workdir)
    teacher_models.append(build_model(tconfig["model"], tconfig.get("model_kwargs", {}), tconfig["num_classes"]))
    teacher_variables.append(variables)
  return teacher_models, teacher_variables


def load_layers(workdir: str, layers: tuple[str, ...]) -> dict[str, Any]:
  """The named top-level layers (params and BatchNorm statistics) of a finished run, read-only.

  Empty ``layers`` = every layer. An unknown name lists the layers the run has.
  """
  variables, _, _ = ckpt.load_teacher_variables(workdir)
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


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class StopTraining(Exception):
  """Raised by a test hook to interrupt a run between steps (simulates a crash)."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, progress: bool = True,
                       interrupt_after_step: int | None = None) -> dict[str, Any]:
  """Runs one training stage in ``workdir`` and returns its evaluation.

  Re-running on the same ``workdir`` resumes from the last good checkpoint (a finished run just
  re-evaluates). The resumed run computes exactly what an uninterrupted one does: the batch,
  the augmentation and the dropout mask of a step depend only on the seed and the step.

  Args:
    config: a stage config (see :func:`kdjax.config.default_stage_config`).
    workdir: where checkpoints, ``config.json``, ``metrics.jsonl`` and ``results.json`` go.
    mesh: device mesh (default: every device).
    progress: show a progress bar.
    interrupt_after_step: testing hook: raise :class:`StopTraining` after this step (after any
      checkpoint due at that step), as if the process had died there.

  Returns:
    ``{"test_accuracy", "test_errors", "test_examples", "steps", "train": {...last metrics}}``,
    also written to ``workdir/results.json``.
  """
  check_keys(config)
  objective = make_objective(config.method, config.loss)  # bad method/loss fields fail first
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  os.makedirs(workdir, exist_ok=True)

  dataset = kdata.load(config.dataset, data_dir=config.data_dir or None)
  if config.image_mean:
    dataset = kdata.standardize(dataset, config.image_mean, config.image_std)
  transfer_set = kdata.make_transfer_set(dataset, labelled_examples=config.labelled_examples,
                                         include_unlabelled=config.include_unlabelled,
                                         split_seed=config.split_seed)
  student = build_model(config.model, config.model_kwargs, dataset.num_classes)
  teacher_models, teacher_variables = ([], [])
  if objective.needs_teacher:
    if not config.teacher_workdir:
      raise ValueError(f"method {config.method!r} needs a teacher: set --config.teacher_workdir=DIR "
                       "(a finished teacher run; comma-separated for an ensemble)")
    teacher_models, teacher_variables = load_teachers(config.teacher_workdir)

  steps_per_epoch = len(transfer_set) // config.batch_size
  num_steps = config.num_steps if config.num_steps > 0 else config.num_epochs * steps_per_epoch
  tx = make_optimizer(config, num_steps)  # bad optimizer/schedule fields fail before config.json is written
  saved_config = {**config_to_dict(config), "num_classes": dataset.num_classes, "num_steps": num_steps}
  saved_config = json.loads(json.dumps(saved_config))  # as it reads back (tuples become lists)
  previous = ckpt.read_config(workdir)
  if previous is not None:
    # A run recorded before a field was added to default_stage_config ran with that field's default.
    defaults = json.loads(json.dumps(config_to_dict(default_stage_config())))
    previous = {**{k: v for k, v in defaults.items() if k not in previous}, **previous}
  if previous is not None and previous != saved_config:
    changed = sorted(k for k in set(previous) | set(saved_config) if previous.get(k) != saved_config.get(k))
    raise ValueError(f"{workdir} holds a run with a different config (fields {changed} differ); "
                     "use a new --workdir or the same config to resume")
  ckpt.write_config(workdir, saved_config)

  augmented = bool(config.jitter or config.hflip)
  cached = bool(objective.needs_teacher and config.cache_teacher and not augmented
                and not objective.teacher_features)
  if objective.needs_teacher and config.cache_teacher and augmented:
    log.info("teacher runs live: inputs are augmented, so cached teacher outputs would not match them")

  example = jnp.zeros((1, *dataset.example_shape), jnp.float32)
  init_variables = load_layers(config.init_from, tuple(config.init_layers)) if config.init_from else None
  state = create_train_state(student, tx, example, config.seed, objective=objective,
                             teacher_models=teacher_models, teacher_variables=teacher_variables,
                             init_variables=init_variables)
  checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(jax.tree.map(np.asarray, state.as_dict()))
  if restored is not None:
    state = TrainState.from_dict(restored)
    log.info("resumed %s at step %d", workdir, int(state.step))
  state = parallel.replicate(state, mesh)
  start_step = int(jax.device_get(state.step))
  teacher_logits = None
  if cached and start_step < num_steps:  # once per run; a finished run only re-evaluates
    teacher_logits = precompute_teacher_logits(teacher_models, teacher_variables, transfer_set, mesh,
                                               batch_size=config.eval_batch_size)

  step_fn = jax.jit(make_train_step(student=student, objective=objective, tx=tx,
                                    teacher_models=() if cached else tuple(teacher_models),
                                    cached_teacher=cached), donate_argnums=(0,))
  teacher_args = () if cached else parallel.replicate(tuple(teacher_variables), mesh)
  batches = kdata.TrainBatches(transfer_set, batch_size=config.batch_size, seed=config.seed, jitter=config.jitter,
                               hflip=config.hflip, teacher_logits=teacher_logits,
                               host_slice=parallel.process_slice(config.batch_size))
  writer = MetricWriter(workdir, total_steps=num_steps, initial_step=start_step, progress=progress,
                        description=os.path.basename(os.path.normpath(workdir)))
  last_train: dict[str, float] = {}
  try:
    window, flags, window_start = None, [], start_step
    stream = kdata.prefetch((batches.batch(s) for s in range(start_step, num_steps)),
                            functools.partial(parallel.shard_batch, mesh=mesh))
    for step, batch in zip(range(start_step, num_steps), stream):
      state, metrics = step_fn(state, batch, teacher_args)
      window = add_metrics(window, metrics)
      flags.append(metrics["nonfinite"][0])
      done = step + 1
      save_now = done % config.checkpoint_every_steps == 0 or done == num_steps
      if done % config.log_every_steps == 0 or save_now:
        _raise_if_nonfinite(flags, window_start, checkpointer)
        last_train = summarize(window)
        writer.write(done, {f"train/{k}": v for k, v in last_train.items() if k != "nonfinite"})
        window, flags, window_start = None, [], done
      if save_now:
        checkpointer.save(done, state.as_dict())
      writer.advance(done)
      if interrupt_after_step is not None and done == interrupt_after_step:
        checkpointer.wait()
        raise StopTraining(f"interrupted after step {done}")
    if start_step == num_steps and checkpointer.manager.latest_step() != num_steps:
      checkpointer.save(num_steps, state.as_dict())  # a 0-step stage still leaves its starting point
    checkpointer.wait()
    result = evaluate(student, state, dataset.test, mesh, batch_size=config.eval_batch_size)
  finally:
    writer.close()
    checkpointer.close()
  summary = {"test_accuracy": result["accuracy"], "test_errors": result["errors"],
             "test_examples": result["examples"], "test_cross_entropy": result["cross_entropy"],
             "steps": num_steps, "teacher_cached": cached, "train": last_train}
  writer.write_json("results.json", summary)
  return summary


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
