"""Run logging: a JSONL metrics file per run, a console progress bar, TensorBoard if installed."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes ``{"step": s, "time": t, **metrics}`` lines to ``workdir/metrics.jsonl``.

  Also shows a tqdm progress bar (``progress=True``) and writes TensorBoard event files when
  ``tensorboardX`` is importable. Only process 0 writes.
  """

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, progress: bool = True,
               description: str = ""):
    import jax
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._bar = None
    self._tb = None
    self._shown = initial_step
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, METRICS_FILE), "a")
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, unit="step",
                       leave=False, file=sys.stderr, dynamic_ncols=True)
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
    if self._bar is not None and "train/loss" in metrics:
      self._bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", refresh=False)

  def advance(self, step: int) -> None:
    if self._bar is not None and step > self._shown:
      self._bar.update(step - self._shown)
      self._shown = step

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
