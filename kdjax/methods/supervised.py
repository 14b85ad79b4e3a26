"""The plain baseline: cross-entropy on the labelled examples (teachers, "student alone")."""

from __future__ import annotations

from kdjax.methods.objective import Objective
from kdjax.methods.soft_targets import hard_label_loss


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``supervised`` method (none)."""
  return {}


def make_objective() -> Objective:
  """Cross-entropy with integer labels, masked by ``batch["label_mask"]`` (unlabelled → 0)."""
  def fn(student, teacher, batch, progress):
    del teacher, progress
    return hard_label_loss(student.logits, batch["label"]) * batch["label_mask"], {}
  return Objective(fn)
