"""How a paper's method plugs into the shared stage runner (:mod:`kdjax.train`).

A method's registry entry (:data:`METHODS`) builds one of two things from its ``config.loss`` fields:

* an :class:`Objective`, for methods that train as "one teacher forward + one student update": the
  shared distillation step (:func:`kdjax.train.make_train_step`) runs it;
* a :class:`kdjax.train.StageProgram`, the method's own state and step (joint training, alternating
  optimizers, double back-propagation, ...), run by the same :func:`kdjax.train.fit` loop.

An :class:`Objective` wraps a function
``fn(student: ModelOutput, teacher: ModelOutput | None, batch: dict, progress) -> (loss [batch], extras)``
where ``teacher.logits`` is ``[batch, classes]`` for one teacher or ``[members, batch, classes]``
for an ensemble, already under ``stop_gradient``, ``progress`` is a :class:`kdjax.train.StageProgress`
(``progress.step``, ``progress.total_steps``, ``progress.fraction``: schedules are fractions of the
stage), and ``extras`` maps metric names to per-example values that are logged as means. The step
averages ``loss`` over the batch and differentiates it.

A method with trainable parameters of its own (the FitNets regressor) gives ``init_aux``; its
parameters then live in ``TrainState.aux_params``, are trained with the student, are passed to
``fn`` as ``aux=``, and are dropped when the stage ends (the next stage starts from the student).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import ml_collections

from kdjax.errors import UnknownNameError, unknown_name


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective for :func:`kdjax.train.make_train_step`.

  Attributes:
    fn: the per-example objective (see module docstring).
    needs_teacher: whether ``fn`` reads the teacher's output.
    student_features: student feature names ``fn`` reads from ``student.features``.
    teacher_features: teacher feature names (a live teacher only; logits alone can be cached).
    init_aux: ``init_aux(rng, student: ModelOutput, teacher: ModelOutput | None) -> params`` of the
      method's own trainable parts, given outputs of the right shapes; ``None`` if it has none.
  """
  fn: Callable
  needs_teacher: bool = False
  student_features: tuple[str, ...] = ()
  teacher_features: tuple[str, ...] = ()
  init_aux: Callable | None = None


@dataclasses.dataclass(frozen=True)
class MethodEntry:
  """A ``config.method`` name's registry entry.

  Attributes:
    module: the paper's module.
    builder: the module's function ``builder(**loss_fields) -> Objective | StageProgram``.
    defaults: the module's function returning the ``config.loss`` fields with their defaults.
    description: one line for ``kdjax list methods``.
  """
  module: str
  builder: str
  defaults: str
  description: str


METHODS: dict[str, MethodEntry] = {
    "supervised": MethodEntry("kdjax.methods.supervised", "make_objective", "default_loss_config",
                              "cross-entropy on the labels (teachers, students alone)"),
    "soft_targets": MethodEntry("kdjax.methods.soft_targets", "make_objective", "default_loss_config",
                                "Hinton et al. 2015: temperature soft targets (+ hard labels, ensembles)"),
    "mimic": MethodEntry("kdjax.methods.mimic", "make_objective", "default_loss_config",
                         "Ba & Caruana 2014: L2 regression on the teacher's logits"),
    "attention_transfer": MethodEntry("kdjax.methods.attention_transfer", "make_objective", "default_loss_config",
                                      "Zagoruyko & Komodakis 2017: activation-based attention maps (+ KD)"),
    "attention_transfer_gradient": MethodEntry(
        "kdjax.methods.attention_transfer", "make_gradient_program", "gradient_loss_config",
        "Zagoruyko & Komodakis 2017: gradient-based attention (input gradients, double backprop; "
        "or flip invariance)"),
    "fitnets_hint": MethodEntry("kdjax.methods.fitnets", "make_hint_objective", "hint_loss_config",
                                "Romero et al. 2015 stage 1: hint regression through a learned regressor"),
    "fitnets_kd": MethodEntry("kdjax.methods.fitnets", "make_kd_objective", "kd_loss_config",
                              "Romero et al. 2015 stage 2: CE + annealed lambda * soft targets (no T^2)"),
    "fitnets_one_stage": MethodEntry("kdjax.methods.fitnets", "make_one_stage_objective", "one_stage_loss_config",
                                     "RepDistiller's one-stage FitNet: task + beta * hint MSE"),
    "fsp": MethodEntry("kdjax.methods.fsp", "make_objective", "default_loss_config",
                       "Yim et al. 2017 stage 1: FSP (Gram) matrices between layers"),
    "rocket_launching": MethodEntry(
        "kdjax.methods.rocket_launching", "make_stage_program", "default_loss_config",
        "Zhou et al. 2018: booster and light net trained jointly, logit hint with gradient block"),
    "adversarial": MethodEntry(
        "kdjax.methods.adversarial", "make_stage_program", "default_loss_config",
        "Xu et al. 2017: class-conditional discriminator on logits + L1 + CE, alternating updates"),
    "data_free_metadata": MethodEntry(
        "kdjax.methods.data_free", "make_metadata_program", "default_metadata_config",
        "Lopes et al. 2017 stage 1: record per-class activation metadata of a teacher (exports no model)"),
    "data_free_reconstruct": MethodEntry(
        "kdjax.methods.data_free", "make_reconstruct_program", "default_reconstruct_config",
        "Lopes et al. 2017 stage 2: reconstruct inputs from the metadata with Adam (exports no model)"),
    "darkrank": MethodEntry(
        "kdjax.methods.darkrank", "make_stage_program", "default_loss_config",
        "Chen et al. 2018: metric learning on P x K batches + soft/hard transfer of the teacher's rankings"),
    "moonshine": MethodEntry(
        "kdjax.methods.moonshine", "make_objective", "default_loss_config",
        "Crowley et al. 2018: cheap-convolution student (kdjax.models.cheap) + AT at every group, beta*3/n (+ old KD)"),
    "neuron_selection_select": MethodEntry(
        "kdjax.methods.neuron_selection", "make_select_program", "default_select_config",
        "Luo et al. 2016 stage 1: select teacher neurons by attribute AUC + decorrelation (exports no model)"),
    "neuron_selection": MethodEntry(
        "kdjax.methods.neuron_selection", "make_student_program", "default_student_config",
        "Luo et al. 2016 stage 2: regress the selected post-ReLU teacher neurons (or all/random; + soft labels)"),
    "knowledge_projection_select": MethodEntry(
        "kdjax.methods.knowledge_projection", "make_select_program", "default_select_config",
        "Zhang et al. 2017 stage 1: choose the (teacher, student) injection pair by validation joint loss "
        "(exports no model)"),
    "knowledge_projection": MethodEntry(
        "kdjax.methods.knowledge_projection", "make_stage_program", "default_loss_config",
        "Zhang et al. 2017: teacher layer -> 1x1 projection -> student upper layers, trained jointly with the "
        "student route and pruned away (route='hint': FitNets-style baseline)"),
}


def _method(name: str) -> tuple[Callable, Callable]:
  if name not in METHODS:
    raise unknown_name("method", name, METHODS)
  entry = METHODS[name]
  module = importlib.import_module(entry.module)
  return getattr(module, entry.builder), getattr(module, entry.defaults)


def default_loss_config(name: str) -> dict:
  """The ``config.loss`` fields of method ``name`` with their defaults."""
  return _method(name)[1]()


def make_method(name: str, loss_config: ml_collections.ConfigDict | dict) -> Any:
  """Builds method ``name`` from its ``config.loss`` fields (unknown fields are errors).

  Returns an :class:`Objective` or a :class:`kdjax.train.StageProgram`.
  """
  make, defaults_fn = _method(name)
  defaults = defaults_fn()
  given = dict(loss_config)
  unknown = set(given) - set(defaults)
  if unknown:
    raise unknown_name(f"loss field for method {name!r}", sorted(unknown)[0], defaults)
  return make(**{**defaults, **given})


def make_objective(name: str, loss_config: ml_collections.ConfigDict | dict) -> Objective:
  """Builds method ``name``'s :class:`Objective` (for methods that run on the shared step)."""
  method = make_method(name, loss_config)
  if not isinstance(method, Objective):
    raise UnknownNameError(f"method {name!r} brings its own stage program, not an Objective for the shared "
                           "step; use kdjax.methods.objective.make_method")
  return method


def needs_teacher(name: str, loss_config: ml_collections.ConfigDict | dict) -> bool:
  """Whether method ``name`` with these ``config.loss`` fields reads ``config.teacher_workdir``."""
  return bool(make_method(name, loss_config).needs_teacher)
