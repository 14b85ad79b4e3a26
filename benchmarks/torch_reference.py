"""PyTorch eager reference for the KD train step of ``step_throughput.py`` (side-by-side number).

Not part of kdjax and not a dependency: it needs PyTorch, installed into its own virtualenv so the
project's stays clean (see ``benchmarks/README.md``)::

  python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy
  /work/torchvenv/bin/python benchmarks/torch_reference.py --steps 20

The models are the CIFAR ResNets of RepDistiller ``models/resnet.py`` (``resnet32x4`` teacher,
``resnet8x4`` student: conv3x3-BN-ReLU stem, three groups of post-activation basic blocks with a
1x1-conv+BN projection shortcut when the shape changes, 8x8 average pooling, one linear layer),
written here from their published description. The step is RepDistiller's ``train_distill`` for
``--distill kd``: teacher in eval mode under ``no_grad``, student in train mode, loss
``0.1 * CE + 0.9 * T^2 * KL(softmax(t/T) || softmax(s/T))`` with ``T = 4`` (batch mean), SGD with
momentum 0.9 and weight decay 5e-4; batch 64 of ``3x32x32`` images, 100 classes. PyTorch runs its
default CPU convolution path (oneDNN) in NCHW float32 with all cores (``torch.get_num_threads()``).

``--serve`` turns it into a worker driven over stdin/stdout by ``step_throughput.py
--torch-python``, which interleaves timing rounds of this step with kdjax's so both see the same
machine load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.b1(self.c1(x)))
    y = self.b2(self.c2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class CifarResNet(nn.Module):
  """CIFAR ResNet of depth 6n+2 with widths (stem, group1, group2, group3)."""

  def __init__(self, depth: int, widths=(32, 64, 128, 256), num_classes: int = 100):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                              nn.ReLU())
    layers, cin = [], widths[0]
    for g, w in enumerate(widths[1:]):
      for i in range(n):
        layers.append(Block(cin, w, 2 if g > 0 and i == 0 else 1))
        cin = w
    self.blocks = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.fc(F.avg_pool2d(x, x.shape[-1]).flatten(1))


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.9):
  soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
  return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


class KDStep:
  """One KD train step, resnet32x4 -> resnet8x4 (or ``student_only``: plain CE step)."""

  def __init__(self, batch: int = 64, student_only: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.teacher = CifarResNet(32).eval()
    self.student = CifarResNet(8).train()
    self.student_only = student_only
    self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = np.random.default_rng(seed)
    self.x = torch.from_numpy(gen.standard_normal((batch, 3, 32, 32), np.float32))
    self.y = torch.from_numpy(gen.integers(0, 100, batch))
    self.batch = batch

  def __call__(self) -> float:
    if self.student_only:
      loss = F.cross_entropy(self.student(self.x), self.y)
    else:
      with torch.no_grad():
        t = self.teacher(self.x)
      loss = kd_loss(self.student(self.x), t, self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.item()

  def time(self, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self()
      out.append(time.perf_counter() - t0)
    return out


def info() -> dict:
  return {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "mkldnn": bool(torch.backends.mkldnn.is_available())}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--student-only", action="store_true")
  p.add_argument("--serve", action="store_true", help="worker mode: read step counts on stdin")
  a = p.parse_args()
  step = KDStep(a.batch, a.student_only)
  for _ in range(a.warmup):
    step()
  if a.serve:
    print(json.dumps({"ready": True, **info()}), flush=True)
    for line in sys.stdin:
      n = int(line)
      if n <= 0:
        break
      print(json.dumps({"times": step.time(n)}), flush=True)
    return
  times = np.asarray(step.time(a.steps))
  print(json.dumps({**info(), "batch": a.batch, "student_only": a.student_only,
                    "median_s": float(np.median(times)), "images_per_s": a.batch / float(np.median(times))}))


if __name__ == "__main__":
  main()
