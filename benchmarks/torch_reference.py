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

``--serve-many`` is the worker of ``accelerator_table.py``: one process builds any number of steps
(:class:`TableStep`: teacher/student by name — the CIFAR ResNets above and the ImageNet ResNet-18/50,
torchvision's if it is importable, else :class:`ImageNetResNet` written from the ResNet paper's
description with torchvision's "v1.5" stride placement, as kdjax's — at any batch, image size and class
count; KD with a live teacher, KD from cached logits, the plain student step, or the teacher forward alone;
on CUDA or CPU; bfloat16 autocast, channels-last memory format and ``torch.compile`` as options) and times
them on request, one JSON line in and out per request::

  {"op": "build", "id": 3, "spec": {"teacher": "resnet50", "student": "resnet18", "batch": 128,
   "image_size": 224, "num_classes": 1000, "mode": "live", "device": "cuda", "amp_bf16": true,
   "channels_last": true, "compile": false}}          -> {"id": 3, "ready": true, "info": {...}} or {"error": ...}
  {"op": "run", "id": 3, "steps": 10, "sync_every": 10} -> {"times": [seconds per step, one per group]}
  {"op": "quit"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

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


class ImageNetBlock(nn.Module):
  """torchvision's ResNet blocks: basic (two 3x3) or bottleneck (1x1, 3x3 with the stride — "v1.5" —, 1x1 x4),
  post-activation, 1x1-conv+BN projection shortcut when the shape changes."""

  def __init__(self, cin: int, width: int, stride: int, bottleneck: bool):
    super().__init__()
    cout = width * (4 if bottleneck else 1)
    if bottleneck:
      layers = [nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    else:
      layers = [nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)]
    self.body = nn.Sequential(*layers)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    return F.relu(self.body(x) + (x if self.proj is None else self.proj(x)))


class ImageNetResNet(nn.Module):
  """ImageNet ResNet (He et al. 2016, Table 1): 7x7/2 conv-BN-ReLU, 3x3/2 max pool, four stages 64..512 wide
  (stride 1, 2, 2, 2), global average pool, one linear layer."""

  def __init__(self, blocks, bottleneck: bool, num_classes: int = 1000):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                              nn.MaxPool2d(3, 2, 1))
    layers, cin = [], 64
    for stage, n in enumerate(blocks):
      width = 64 * 2**stage
      for i in range(n):
        layers.append(ImageNetBlock(cin, width, 2 if stage > 0 and i == 0 else 1, bottleneck))
        cin = width * (4 if bottleneck else 1)
    self.blocks = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def make_model(name: str, num_classes: int) -> nn.Module:
  """A model by kdjax's zoo name; ``ValueError`` for names this reference does not implement."""
  cifar = {"resnet8x4": 8, "resnet32x4": 32}
  if name in cifar:
    return CifarResNet(cifar[name], num_classes=num_classes)
  imagenet = {"resnet18": ([2, 2, 2, 2], False), "resnet34_imagenet": ([3, 4, 6, 3], False),
              "resnet50": ([3, 4, 6, 3], True)}
  if name in imagenet:
    try:
      import torchvision  # noqa: PLC0415 - optional
      return getattr(torchvision.models, name.replace("_imagenet", ""))(num_classes=num_classes)
    except ImportError:
      return ImageNetResNet(*imagenet[name], num_classes=num_classes)
  raise ValueError(f"torch_reference has no model {name!r}; it implements {', '.join([*cifar, *imagenet])}")


class TableStep:
  """One configuration of ``accelerator_table.py``'s PyTorch rows (see the module docstring for ``spec``).

  The KD loss is RepDistiller's (above), computed in float32 on the logits; under ``amp_bf16`` the models run
  in ``torch.autocast(dtype=torch.bfloat16)`` with float32 parameters and optimizer state (PyTorch's mixed
  precision; kdjax's bfloat16 rows keep parameters in bfloat16 too). ``compile`` wraps the models and the
  loss in ``torch.compile`` (default mode); the optimizer step stays eager (``foreach`` SGD).
  """

  def __init__(self, *, teacher: str | None, student: str, batch: int, image_size: int, num_classes: int,
               mode: str, device: str = "cpu", amp_bf16: bool = False, channels_last: bool = False,
               compile: bool = False, seed: int = 0):
    if mode not in ("live", "cached", "student_only", "teacher_forward"):
      raise ValueError(f"mode {mode!r}: expected live, cached, student_only or teacher_forward")
    torch.manual_seed(seed)
    self.device, self.mode, self.amp = torch.device(device), mode, amp_bf16
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = np.random.default_rng(seed)
    self.x = torch.from_numpy(gen.standard_normal((batch, 3, image_size, image_size), np.float32)).to(
        self.device).contiguous(memory_format=fmt)
    self.y = torch.from_numpy(gen.integers(0, num_classes, batch)).to(self.device)
    self.cached = torch.from_numpy(gen.standard_normal((batch, num_classes), np.float32)).to(self.device)
    self.teacher = self.student = None
    if mode in ("live", "teacher_forward"):
      self.teacher = make_model(teacher, num_classes).to(self.device, memory_format=fmt).eval()
    if mode != "teacher_forward":
      self.student = make_model(student, num_classes).to(self.device, memory_format=fmt).train()
      self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    self.loss_fn = kd_loss
    if compile:
      self.teacher = torch.compile(self.teacher) if self.teacher is not None else None
      self.student = torch.compile(self.student) if self.student is not None else None
      self.loss_fn = torch.compile(kd_loss)

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

  def __call__(self):
    if self.mode == "teacher_forward":
      with torch.no_grad(), self._autocast():
        return self.teacher(self.x)
    with self._autocast():
      if self.mode == "live":
        with torch.no_grad():
          t = self.teacher(self.x)
      s = self.student(self.x)
    if self.mode == "student_only":
      loss = F.cross_entropy(s.float(), self.y)
    else:
      loss = self.loss_fn(s.float(), (t if self.mode == "live" else self.cached).float(), self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def sync(self, out) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
    else:
      out.sum().item()

  def time(self, steps: int, sync_every: int) -> list[float]:
    """Seconds per step, one value per group of ``sync_every`` steps dispatched between host syncs."""
    times, done = [], 0
    while done < steps:
      n = min(sync_every, steps - done)
      t0 = time.perf_counter()
      for _ in range(n):
        out = self()
      self.sync(out)
      times.append((time.perf_counter() - t0) / n)
      done += n
    return times


def serve_many(warmup: int) -> None:
  """The ``--serve-many`` loop (module docstring)."""
  steps: dict[int, TableStep] = {}
  torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms (warm-up excluded)
  for line in sys.stdin:
    req = json.loads(line)
    try:
      if req["op"] == "quit":
        break
      if req["op"] == "build":
        spec = dict(req["spec"])
        cuda = spec.get("device") == "cuda"
        before = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
          torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step = TableStep(**spec)
        step.sync(step())  # the first call compiles (torch.compile) and warms up cuDNN's algorithm choice
        for _ in range(warmup):
          out = step()
        step.sync(out)
        steps[req["id"]] = step
        peak = torch.cuda.max_memory_allocated() - before if cuda else None
        print(json.dumps({"id": req["id"], "ready": True, "build_s": time.perf_counter() - t0,
                          "peak_memory_bytes": peak, "info": info()}), flush=True)
      elif req["op"] == "run":
        print(json.dumps({"times": steps[req["id"]].time(int(req["steps"]), int(req.get("sync_every", 1)))}),
              flush=True)
      else:
        raise ValueError(f"unknown op {req['op']!r}")
    except Exception as e:  # noqa: BLE001 - reported to the driver, which leaves the row out and says why
      print(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3)}),
            flush=True)


def info() -> dict:
  out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
         "mkldnn": bool(torch.backends.mkldnn.is_available()), "cuda": torch.cuda.is_available()}
  if torch.cuda.is_available():
    out.update(cuda_device=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version())
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--student-only", action="store_true")
  p.add_argument("--serve", action="store_true", help="worker mode: read step counts on stdin")
  p.add_argument("--serve-many", action="store_true", help="accelerator_table.py's worker (module docstring)")
  a = p.parse_args()
  if a.serve_many:
    serve_many(a.warmup)
    return
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
