"""How a paper's loss plugs into the shared training step.

An :class:`Objective` wraps a function
``fn(student: ModelOutput, teacher: ModelOutput | None, batch: dict, step) -> (loss [batch], extras)``
where ``teacher.logits`` is ``[batch, classes]`` for one teacher or ``[members, batch, classes]``
for an ensemble, already under ``stop_gradient``, and ``extras`` maps metric names to per-example
values that are logged as means. The step averages ``loss`` over the batch and differentiates it.
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
  """
  fn: Callable
  needs_teacher: bool = False
  student_features: tuple[str, ...] = ()
  teacher_features: tuple[str, ...] = ()


# Method name -> module defining make_objective(loss_config) and default_loss_config().
METHODS = {
    "supervised": "kdjax.methods.supervised",
    "soft_targets": "kdjax.methods.soft_targets",
    "mimic": "kdjax.methods.mimic",
}


def method_module(name: str):
  """The module implementing method ``name``; an unknown name lists the known ones."""
  if name not in METHODS:
    raise unknown_name("method", name, METHODS)
  return importlib.import_module(METHODS[name])


def make_objective(name: str, loss_config: ml_collections.ConfigDict | dict) -> Objective:
  """Builds method ``name``'s objective from its ``config.loss`` fields (unknown fields are errors)."""
  module = method_module(name)
  defaults = module.default_loss_config()
  given = dict(loss_config)
  unknown = set(given) - set(defaults)
  if unknown:
    raise unknown_name(f"loss field for method {name!r}", sorted(unknown)[0], defaults)
  return module.make_objective(**{**defaults, **given})
