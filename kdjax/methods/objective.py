"""How a paper's loss plugs into the shared training step.

An :class:`Objective` wraps a function
``fn(student: ModelOutput, teacher: ModelOutput | None, batch: dict, step) -> (loss [batch], extras)``
where ``teacher.logits`` is ``[batch, classes]`` for one teacher or ``[members, batch, classes]``
for an ensemble, already under ``stop_gradient``, and ``extras`` maps metric names to per-example
values that are logged as means. The step averages ``loss`` over the batch and differentiates it.

A method with trainable parameters of its own (the FitNets regressor) gives ``init_aux``; its
parameters then live in ``TrainState.aux_params``, are trained with the student, are passed to
``fn`` as ``aux=``, and are dropped when the stage ends (the next stage starts from the student).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import ml_collections

from kdjax.errors import unknown_name


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


# Method name (config.method) -> (module, its objective builder, its config.loss defaults).
METHODS = {
    "supervised": ("kdjax.methods.supervised", "make_objective", "default_loss_config"),
    "soft_targets": ("kdjax.methods.soft_targets", "make_objective", "default_loss_config"),
    "mimic": ("kdjax.methods.mimic", "make_objective", "default_loss_config"),
    "attention_transfer": ("kdjax.methods.attention_transfer", "make_objective", "default_loss_config"),
    "fitnets_hint": ("kdjax.methods.fitnets", "make_hint_objective", "hint_loss_config"),
    "fitnets_kd": ("kdjax.methods.fitnets", "make_kd_objective", "kd_loss_config"),
    "fitnets_one_stage": ("kdjax.methods.fitnets", "make_one_stage_objective", "one_stage_loss_config"),
    "fsp": ("kdjax.methods.fsp", "make_objective", "default_loss_config"),
}


def _method(name: str):
  if name not in METHODS:
    raise unknown_name("method", name, METHODS)
  module_name, make, defaults = METHODS[name]
  module = importlib.import_module(module_name)
  return getattr(module, make), getattr(module, defaults)


def default_loss_config(name: str) -> dict:
  """The ``config.loss`` fields of method ``name`` with their defaults."""
  return _method(name)[1]()


def make_objective(name: str, loss_config: ml_collections.ConfigDict | dict) -> Objective:
  """Builds method ``name``'s objective from its ``config.loss`` fields (unknown fields are errors)."""
  make, defaults_fn = _method(name)
  defaults = defaults_fn()
  given = dict(loss_config)
  unknown = set(given) - set(defaults)
  if unknown:
    raise unknown_name(f"loss field for method {name!r}", sorted(unknown)[0], defaults)
  return make(**{**defaults, **given})
