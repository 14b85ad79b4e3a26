"""Run logging: a JSONL metrics file per run, console progress, TensorBoard if installed."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
PROGRESS_LOG_SECONDS = 30.0

log = logging.getLogger(__name__)


def drop_rows_after(path: str, step: int) -> int:
  """Removes the rows of a metrics file whose ``step`` is after ``step`` (atomically); returns how many.

  A run resumed from its checkpoint at ``step`` computes the later steps again, so rows written after that
  checkpoint by the interrupted run would otherwise appear twice. Unparsable lines (a write cut short) go too.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row_step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      if row_step > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return dropped


class MetricWriter:
  """Writes ``{"step": s, "time": t, **metrics}`` lines to ``workdir/metrics.jsonl``.

  Progress (``progress=True``): a tqdm bar when stderr is a terminal; otherwise (a log file, CI, a batch
  job) a log line ``<description>: step s/N (p%), x steps/s, loss l`` at most every ``progress_seconds`` and at
  the end, so logs hold no carriage-return updates. TensorBoard event files are written when ``tensorboardX`` is
  importable. Only process 0 writes. Rows after ``initial_step`` left by an interrupted run are removed
  (:func:`drop_rows_after`), so a resumed run's file has each step once.
  """

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, progress: bool = True,
               description: str = "", progress_seconds: float = PROGRESS_LOG_SECONDS, stream=None):
    import jax
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._bar = None
    self._tb = None
    self._shown = initial_step
    self._total = total_steps
    self._description = description
    self._log_progress = False
    self._progress_seconds = progress_seconds
    self._last_log = self._start_time = time.monotonic()
    self._start_step = initial_step
    self._loss: float | None = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    dropped = drop_rows_after(path, initial_step)
    if dropped:
      log.info("%s: removed %d metrics row(s) after step %d (recomputed by this resumed run)", workdir, dropped,
               initial_step)
    self._file = open(path, "a")
    stream = stream if stream is not None else sys.stderr
    if progress and _is_terminal(stream):
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, unit="step",
                       leave=False, file=stream, dynamic_ncols=True)
    elif progress:
      self._log_progress = True
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
    if "train/loss" in metrics:
      self._loss = metrics["train/loss"]
    if self._bar is not None and "train/loss" in metrics:
      self._bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", refresh=False)

  def advance(self, step: int) -> None:
    if self._bar is not None and step > self._shown:
      self._bar.update(step - self._shown)
    self._shown = max(self._shown, step)
    if self._log_progress:
      now = time.monotonic()
      if now - self._last_log >= self._progress_seconds or step == self._total:
        self._last_log = now
        rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
        loss = f", loss {self._loss:.4g}" if self._loss is not None else ""
        log.info("%s: step %d/%d (%.0f%%), %.3g steps/s%s", self._description or self.workdir, step, self._total,
                 100.0 * step / max(self._total, 1), rate, loss)

  def write_json(self, name: str, payload: dict[str, Any]) -> None:
    if not self.enabled:
      return
    path = os.path.join(self.workdir, name)
    with open(path + ".tmp", "w") as f:
      json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._file.close()


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False
