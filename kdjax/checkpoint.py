"""Orbax checkpoints of a run: student state, optimizer, step and RNG; teachers read-only.

A checkpoint holds ``{"step", "params", "batch_stats", "opt_state", "rng"}``. The data position
is the step (the pipeline rebuilds any step's batch from it), so a resumed run continues exactly
where the last checkpoint left it. Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a write cut short never replaces the last good checkpoint; if the
newest checkpoint is unreadable anyway (a damaged disk, a hand-edited file), :meth:`Checkpointer.restore_latest`
moves it aside to ``checkpoints_unreadable/`` (nothing is deleted), falls back to the one before
it and says so. Only a checkpoint whose *content* is bad is moved: an error of the machine (out of
memory, a permission or I/O error) propagates and leaves every checkpoint where it is
(:func:`is_corrupt_checkpoint_error`). A teacher's checkpoint is only ever read.

:class:`WorkdirLock` keeps a second process out of a work directory while a run uses it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdjax.errors import MissingCheckpointError, UnfinishedRunError, WorkdirError, WorkdirInUseError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
UNREADABLE_DIR = "checkpoints_unreadable"
RESULTS_FILE = "results.json"
LOCK_FILE = ".kdjax.lock"

# tensorstore reports errors as ValueError("<STATUS>: ..."); these statuses are the machine's trouble, not the file's.
_MACHINE_STATUSES = ("PERMISSION_DENIED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED",
                     "CANCELLED", "UNAUTHENTICATED")
_CORRUPT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def is_corrupt_checkpoint_error(error: BaseException) -> bool:
  """Whether ``error`` from restoring a checkpoint means the checkpoint itself is unreadable.

  True for bad content: unparsable metadata (``ValueError``, ``json.JSONDecodeError``), missing files of a
  partial checkpoint (``FileNotFoundError``), tensorstore's ``NOT_FOUND``/``DATA_LOSS``/``INVALID_ARGUMENT``
  reports, a ``KeyError``/``TypeError`` from a damaged tree. False (the error must propagate, the checkpoint
  stays) for the machine's trouble: ``MemoryError``, any other ``OSError`` (permissions, EIO, a full disk,
  a stale NFS handle), tensorstore's ``PERMISSION_DENIED``/``UNAVAILABLE``/``RESOURCE_EXHAUSTED`` etc., and
  anything not listed (an unknown error is not evidence that the file is bad). The whole ``__cause__``/
  ``__context__`` chain is looked at: a machine error anywhere in it wins.
  """
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and not isinstance(e, _CORRUPT_OS_ERRORS)):
      return False
    if isinstance(e, ValueError) and str(e).lstrip().startswith(_MACHINE_STATUSES):
      return False
  return isinstance(chain[0], (ValueError, KeyError, TypeError, EOFError, *_CORRUPT_OS_ERRORS))


class Checkpointer:
  """Saves and restores the training state of one work directory."""

  def __init__(self, workdir: str, *, keep: int = 2):
    if not (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1):
      raise ValueError(f"keep_checkpoints must be an integer >= 1 (the newest checkpoint is what a finished run "
                       f"is re-evaluated and resumed from); got {keep!r}")
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of ``state`` at ``step``; it is committed atomically."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore_latest(self, abstract_state: dict[str, Any]) -> dict[str, Any] | None:
    """The newest readable checkpoint restored into ``abstract_state``'s structure, or ``None``.

    A checkpoint whose content is bad (:func:`is_corrupt_checkpoint_error`) is moved to
    ``checkpoints_unreadable/`` and the one before it is tried; any other error (out of memory, I/O,
    permissions) propagates with every checkpoint left in place, so a later run can still resume.
    """
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:
        if not is_corrupt_checkpoint_error(e):
          raise
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


class WorkdirLock:
  """An exclusive lock on a work directory, held while a run uses it (``with WorkdirLock(workdir): ...``).

  The lock is ``fcntl.flock`` on ``workdir/.kdjax.lock``, which also records the holder's pid, host and start
  time. The operating system drops a ``flock`` when its process ends in any way (SIGKILL included), so a lock
  file left by a dead process never blocks: the next run takes it over. A second process (or a second run in
  this process) gets :class:`~kdjax.errors.WorkdirInUseError` naming the holder. Only JAX process 0 locks
  (the hosts of a multi-host run share one work directory). ``flock`` may be advisory-only on some network
  file systems.

  Entering also checks that ``workdir`` can be used: one that is a file, or that cannot be created or
  written, raises :class:`~kdjax.errors.WorkdirError` before anything is written. A directory this lock
  created is removed again on an error inside the ``with`` block if nothing else was written to it.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None
    self._created = False

  def __enter__(self) -> WorkdirLock:
    check_workdir(self.workdir)
    self._created = not os.path.isdir(self.workdir)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      if jax.process_index() != 0:
        return self
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _workdir_error(self.workdir, e) from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirInUseError(
            f"work directory {self.workdir!r} is in use by another kdjax run ({holder}); two runs in one "
            "directory would overwrite each other's checkpoints. Wait for it to finish, stop it (kill the pid), "
            "or use another --workdir") from None
      raise _workdir_error(self.workdir, e) from e
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
    self._fd = fd
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
      if exc_type is not None and self._created and os.listdir(self.workdir) == [LOCK_FILE]:
        os.remove(self.path)  # a run refused before it wrote anything leaves no trace
        os.rmdir(self.workdir)


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
    return f"pid {info['pid']} on host {info['host']}, started {started}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"


def _workdir_error(workdir: str, error: OSError) -> WorkdirError:
  reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
            errno.ENOTDIR: "a part of the path is a file"}.get(error.errno, error.strerror or str(error))
  return WorkdirError(f"cannot write to work directory {workdir!r}: {reason} ({type(error).__name__}); "
                      "choose a writable --workdir")


def check_workdir(workdir: str) -> None:
  """Raises :class:`~kdjax.errors.WorkdirError` if ``workdir`` exists but is not a directory, or exists but is
  not writable (``os.access``; the lock file's creation catches what ``os.access`` cannot, e.g. for root)."""
  if not workdir:
    raise WorkdirError("the work directory is empty; give --workdir DIR")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir!r} is a file, not a directory; give a directory path (it is created "
                       "if missing)")
  if os.path.isdir(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"cannot write to work directory {workdir!r}: permission denied; choose a writable "
                       "--workdir")


def write_config(workdir: str, config_dict: dict[str, Any]) -> None:
  """Records the run's configuration (used to rebuild a teacher from its own run). Only JAX process 0 writes: the
  processes of a multi-host run share the work directory, and two writers of one temporary file could each
  rename it away from under the other."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
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


def unfinished_reasons(workdir: str, config: dict[str, Any] | None = None) -> list[str]:
  """What is missing for ``workdir`` to be a finished run (empty list: finished).

  A finished run has its ``results.json`` (written after the last step and the evaluation) and a
  checkpoint at its config's ``num_steps``.
  """
  config = config if config is not None else read_config(workdir)
  reasons = []
  if not os.path.exists(os.path.join(workdir, RESULTS_FILE)):
    reasons.append(f"no {RESULTS_FILE} (the run never reached its evaluation)")
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
  want = (config or {}).get("num_steps")
  if want is not None and (not steps or steps[-1] < want):
    reasons.append(f"its newest checkpoint is at step {steps[-1] if steps else 'none'} of {want}")
  return reasons


def host_array_target(manager: ocp.CheckpointManager, step: int) -> Any:
  """The tree of checkpoint ``step`` as empty host (numpy) arrays: restoring into it reads every array whole on
  every process. Without a target Orbax would rebuild the saving run's device placement, which fails on another
  device count ("Topology mismatch") and, in a multi-process run, on every process but the one holding those
  devices ("no addressable shards")."""
  metadata = manager.item_metadata(step)
  return jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), getattr(metadata, "tree", metadata))


def load_teacher_variables(workdir: str, *, require_finished: bool = False
                           ) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reads a run's model variables (its newest readable checkpoint), read-only.

  With ``require_finished`` the run must be finished (:func:`unfinished_reasons`) and its newest
  checkpoint readable; otherwise an older checkpoint is used when the newest cannot be read.

  Returns:
    ``(variables, config_dict, step)`` where ``variables`` is ``{"params": ..., "batch_stats": ...}``
    (``batch_stats`` only if the model has BatchNorm).

  Raises:
    MissingCheckpointError: no run or no readable checkpoint in ``workdir``.
    UnfinishedRunError: ``require_finished`` and the run is not finished or its newest checkpoint is unreadable.
  """
  config = read_config(workdir)
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if config is None or not os.path.isdir(directory):
    raise MissingCheckpointError(
        f"no teacher checkpoint in {workdir!r}: expected {CONFIG_FILE} and {CHECKPOINT_DIR}/ written by "
        "a finished `kdjax train` run of the teacher (train the teacher first, or fix teacher_workdir)")
  if require_finished:
    reasons = unfinished_reasons(workdir, config)
    if reasons:
      raise UnfinishedRunError(f"the run in {workdir!r} is not finished: {'; '.join(reasons)}. Finish it "
                               f"(run the same `kdjax train` command again; it resumes), or accept it as it is "
                               "with --config.allow_partial_teacher=true (recorded in this run's config.json)")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(host_array_target(manager, step)))
      except Exception as e:
        if not is_corrupt_checkpoint_error(e):
          raise
        if require_finished:
          raise UnfinishedRunError(
              f"the newest checkpoint of {workdir!r} (step {step}) is unreadable ({type(e).__name__}: "
              f"{str(e)[:200]}); retrain that run, or accept its older checkpoint with "
              "--config.allow_partial_teacher=true") from e
        log.warning("checkpoint %s step %d unreadable (%s); trying an older one", directory, step, e)
        continue
      variables = {"params": restored["params"]}
      if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
      variables = jax.tree.map(jax.numpy.asarray, variables)
      return variables, config, int(restored["step"])
  finally:
    manager.close()
  raise MissingCheckpointError(f"no readable checkpoint in {directory!r} (teacher run not finished?)")
