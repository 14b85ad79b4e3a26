"""Orbax checkpoints of a run: student state, optimizer, step and RNG; teachers read-only.

A checkpoint holds ``{"step", "params", "batch_stats", "opt_state", "rng"}``. The data position
is the step (the pipeline rebuilds any step's batch from it), so a resumed run continues exactly
where the last checkpoint left it. Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a write cut short never replaces the last good checkpoint; if the
newest checkpoint is unreadable anyway (a damaged disk, a hand-edited file), :meth:`Checkpointer.restore_latest`
moves it aside to ``checkpoints_unreadable/`` (nothing is deleted), falls back to the one before
it and says so. A teacher's checkpoint is only ever read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from kdjax.errors import MissingCheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
UNREADABLE_DIR = "checkpoints_unreadable"


class Checkpointer:
  """Saves and restores the training state of one work directory."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of ``state`` at ``step``; it is committed atomically."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore_latest(self, abstract_state: dict[str, Any]) -> dict[str, Any] | None:
    """The newest readable checkpoint restored into ``abstract_state``'s structure, or ``None``."""
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
        moved = self._set_aside(step)
        log.warning("checkpoint at step %d in %s is unreadable (%s: %s); moved it to %s and trying an "
                    "older one", step, self.directory, type(e).__name__, str(e)[:200], moved)
    return None

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (kept for inspection, never deleted)."""
    aside = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, f"{step}-{int(time.time())}")
    os.replace(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until pending saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_config(workdir: str, config_dict: dict[str, Any]) -> None:
  """Records the run's configuration (used to rebuild a teacher from its own run)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_config(workdir: str) -> dict[str, Any] | None:
  """The configuration a run in ``workdir`` recorded, or ``None``."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_teacher_variables(workdir: str) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reads a finished run's model variables, read-only.

  Returns:
    ``(variables, config_dict, step)`` where ``variables`` is ``{"params": ..., "batch_stats": ...}``
    (``batch_stats`` only if the model has BatchNorm).

  Raises:
    MissingCheckpointError: no run or no readable checkpoint in ``workdir``.
  """
  config = read_config(workdir)
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if config is None or not os.path.isdir(directory):
    raise MissingCheckpointError(
        f"no teacher checkpoint in {workdir!r}: expected {CONFIG_FILE} and {CHECKPOINT_DIR}/ written by "
        "a finished `kdjax train` run of the teacher (train the teacher first, or fix teacher_workdir)")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:  # noqa: BLE001
      log.warning("teacher checkpoint %s step %d unreadable (%s); trying an older one", directory, step, e)
      continue
    variables = {"params": restored["params"]}
    if restored.get("batch_stats"):
      variables["batch_stats"] = restored["batch_stats"]
    variables = jax.tree.map(jax.numpy.asarray, variables)
    return variables, config, int(restored["step"])
  raise MissingCheckpointError(f"no readable checkpoint in {directory!r} (teacher run not finished?)")
