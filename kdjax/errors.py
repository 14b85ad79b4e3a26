"""Exceptions with messages written for people: what was expected, what was given."""

from __future__ import annotations

from collections.abc import Iterable


class UnknownNameError(ValueError):
  """An unknown paper, dataset, model, method, feature or config key was asked for."""


class MissingCheckpointError(FileNotFoundError):
  """A checkpoint (for example a teacher's) that a run needs does not exist."""


class DatasetUnavailableError(FileNotFoundError):
  """A dataset is not available on this machine; the message says how to get it."""


class NonFiniteError(FloatingPointError):
  """NaN or inf met in a batch or in training; the message names the step."""


class WorkdirError(OSError):
  """A work directory cannot be used: it is a file, it is not writable, or another process holds its lock."""


class WorkdirInUseError(WorkdirError):
  """Another process is running in the work directory (its lock names the process and host)."""


class UnfinishedRunError(ValueError):
  """A run used as a teacher (or by ``init_from``) did not finish, or its newest checkpoint is unreadable."""


class DataError(ValueError):
  """A dataset's arrays are unusable as given (labels out of range, wrong dtype, NaN, empty split, ...)."""


def unknown_name(kind: str, given: str, valid: Iterable[str]) -> UnknownNameError:
  """Builds the error for an unknown name, listing every valid one."""
  valid = sorted(valid)
  return UnknownNameError(
      f"unknown {kind} {given!r}; expected one of: {', '.join(valid) if valid else '(none)'}")


def check_positive(name: str, value) -> None:
  """Raises ValueError if a concrete hyperparameter is not > 0 (traced values pass through)."""
  try:
    concrete = float(value)
  except Exception:  # a tracer under jit/vmap: cannot be checked without a host sync
    return
  if not concrete > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")
  if concrete == float("inf"):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def concrete_value(x):
  """``x`` as a NumPy array when it is concrete (eager), ``None`` when it is traced (under jit/grad/vmap)."""
  import jax
  import numpy as np
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except jax.errors.ConcretizationTypeError:
    return None


def check_unit_interval(name: str, value) -> None:
  """Raises ValueError if a concrete hyperparameter is not in ``[0, 1]`` (traced values pass through)."""
  concrete = concrete_value(value)
  if concrete is not None and not (concrete.shape == () and 0.0 <= float(concrete) <= 1.0):
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_class_ids(name: str, labels, num_classes: int) -> None:
  """Raises ValueError if concrete integer ``labels`` are not class ids in ``[0, num_classes)``, naming the first
  bad index (traced labels pass through; the losses return NaN for them, which the training step's guard stops)."""
  concrete = concrete_value(labels)
  if concrete is None:
    return
  import numpy as np
  if concrete.dtype.kind not in "iu":
    raise ValueError(f"{name} must be integer class ids, got dtype {concrete.dtype}")
  bad = np.argwhere((concrete < 0) | (concrete >= num_classes))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f"{name}{list(index)} = {int(concrete[index])} is not a class id in [0, {num_classes}) "
                     f"({len(bad)} such label(s))")


def check_same_shape(what: str, student, teacher) -> None:
  """Raises ValueError when a student array and a teacher array differ in shape."""
  if tuple(student.shape) != tuple(teacher.shape):
    raise ValueError(
        f"{what}: student and teacher shapes must match; got student {tuple(student.shape)} "
        f"and teacher {tuple(teacher.shape)}")
