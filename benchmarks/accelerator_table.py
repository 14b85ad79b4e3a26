"""The accelerator table (issue 13 §3): what a GPU/TPU user reads before choosing kdjax.

One command measures, in one process and in interleaved timing rounds (every row of a run sees the same
machine state), kdjax's distillation train step as ``kdjax train`` builds it (``step_throughput.Config``:
``kdjax.train.make_train_step`` through the method registry, ``jax.jit`` with the state donated, every
device in a ``("data",)`` mesh, the mesh platform's kernels — stock ``lax`` convolutions and Flax-equivalent
BatchNorm on GPU/TPU):

* the CIFAR pairs (default resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_16_2, 32x32x3, 100 classes) at batch
  64, 256 and 1024, and the ImageNet-shaped pair resnet50 -> resnet18 (224x224x3, 1000 classes) at 128 per
  chip; Hinton KD (T = 4, alpha = 0.9), SGD momentum 0.9, weight decay 5e-4; ``--dtype`` (default bfloat16:
  parameters, optimizer state, inputs and activations in bfloat16);
* rows: ``live`` (teacher forward inside the step), ``cached`` (teacher logits read from the batch) and
  ``student_only`` (the plain supervised student step), plus, for the live-teacher overhead check, the
  teacher's eval-mode forward alone (``teacher_forward``), jitted on the same batch;
* per row: images/s and step time (median over timed groups of ``--sync-every`` steps), FLOPs per step
  (XLA's cost analysis: of the lowered program on accelerators, where the compiled one misses cuDNN's
  convolutions; see benchmarks/README.md), achieved FLOP/s and its fraction of the chip's dense bf16 and TF32
  peaks (``step_throughput.PEAK_FLOPS``), device memory (``jax.Device.memory_stats()["peak_bytes_in_use"]``
  where the backend has it, else "n/a", and the program's own bytes by XLA's memory analysis), and the
  largest batch that fits (doubling from the pair's largest swept batch until out-of-memory, then bisecting;
  capped; skipped on CPU unless ``--max-batch``);
* with ``--torch-python`` (an interpreter with PyTorch), the same steps in PyTorch (``torch_reference.py
  --serve-many``; one worker process, its rounds interleaved with kdjax's): ``eager`` (channels-last, bf16
  autocast when ``--dtype bfloat16``) and ``compile`` (the same under ``torch.compile``), and each kdjax row's
  images/s over theirs;
* the live-teacher overhead: live step time / (teacher forward alone + student-only step), target <= 1.05.

It writes ``--out`` (JSON: device, settings, notes, rows, overhead, largest batches, targets) and a Markdown
file next to it (``--md``, default ``--out`` with ``.md``) ready to paste into a README.

Usage::

  python benchmarks/accelerator_table.py --out benchmarks/results/<device>.json [--torch-python PY]
  python benchmarks/accelerator_table.py --tiny --out /tmp/cpu_tiny.json      # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_throughput as st  # noqa: E402 - the benchmark machinery this table reuses

from kdjax import models, parallel  # noqa: E402
from kdjax.models import kernels, onednn  # noqa: E402

TORCH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
MODES = ("live", "cached", "student_only")
TORCH_VARIANTS = ("eager", "compile")
TARGETS = {"imagenet_kd_vs_pytorch_eager": 1.3, "imagenet_kd_vs_torch_compile": 1.0, "live_teacher_overhead": 1.05}
# KD (T = 4, alpha = 0.9) and the plain student step, by row mode: (benchmark method, registered method).
MODE_METHODS = {"live": ("kd", "soft_targets"), "cached": ("kd", "soft_targets"),
                "student_only": ("student_only", "supervised")}


@dataclasses.dataclass(frozen=True)
class Group:
  """One (pair, input shape, batch) block of the table."""
  kind: str  # "cifar" or "imagenet"
  teacher: str
  student: str
  image_size: int
  num_classes: int
  batch: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  def key(self) -> dict[str, Any]:
    return {"group": self.kind, "teacher": self.teacher, "student": self.student, "image_size": self.image_size,
            "batch": self.batch}


class TeacherForward:
  """The teacher's eval-mode forward alone (logits), jitted on the row's batch: the overhead check's term."""

  def __init__(self, group: Group, dtype: str, mesh, seed: int = 0):
    self.record: dict[str, Any] = {"method": "teacher_forward", "objective": None, **group.key, "dtype": dtype,
                                   "mode": "teacher_forward", "framework": "kdjax"}
    self.batch_size = group.batch
    with kernels.platform(mesh.devices.flat[0].platform, devices=mesh.size):
      model = models.get(group.teacher, num_classes=group.num_classes)
      example = jnp.zeros((1, *group.image_shape), jnp.float32)
      # The same initialisation as the live step's teacher (step_throughput.Config: PRNGKey(seed + 1)).
      variables = st._cast(model.init(jax.random.PRNGKey(seed + 1), example, train=False), jnp.dtype(dtype))
      rng = np.random.default_rng(seed)
      image = rng.standard_normal((group.batch, *group.image_shape)).astype(jnp.dtype(dtype))
      self.variables = parallel.replicate(variables, mesh)
      self.image = parallel.shard_batch({"image": image}, mesh)["image"]

      def forward(variables, image):
        out = model.apply(variables, image, train=False)
        return out[0] if isinstance(out, tuple) else out

      lowered = jax.jit(forward).lower(self.variables, self.image)
      compiled = lowered.compile()
      # FLOPs from the lowered program (backend-independent; the compiled one misses cuDNN's convolutions on
      # GPU), and, where oneDNN custom calls hide the convolutions from XLA's analysis, from the same forward
      # lowered with XLA's own convolutions (as step_throughput.Config does for the steps).
      source = "lowered (pre-optimisation HLO)"
      if "kdjax_onednn_conv" in lowered.as_text():
        with onednn.policy("off"):
          lowered = jax.jit(lambda *args: forward(*args)).lower(self.variables, self.image)
        source += " with XLA's convolutions"
    flops = st.step_flops(lowered)
    self.record.update(flops_per_step=flops or None, program_bytes=st.program_bytes(compiled), flops_source=source)
    self.fn = compiled
    self.times: list[float] = []

  def warmup(self, n: int = 2) -> None:
    for _ in range(max(n, 1)):
      out = self.fn(self.variables, self.image)
    jax.block_until_ready(out)

  def run(self, k: int, sync_every: int) -> None:
    done = 0
    while done < k:
      n = min(sync_every, k - done)
      t0 = time.perf_counter()
      for _ in range(n):
        out = self.fn(self.variables, self.image)
      jax.block_until_ready(out)
      self.times.append((time.perf_counter() - t0) / n)
      done += n


class TorchWorker:
  """One ``torch_reference.py --serve-many`` process serving every PyTorch row of the run."""

  def __init__(self, python: str, script: str = TORCH_WORKER, warmup: int = 2):
    self.proc = subprocess.Popen([python, script, "--serve-many", "--warmup", str(warmup)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    self.next_id = 0

  def request(self, req: dict[str, Any]) -> dict[str, Any]:
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker exited (code {self.proc.poll()}); its stderr is above")
    return json.loads(line)

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=120)


class TorchRow:
  """A PyTorch row built and timed by the worker."""

  def __init__(self, worker: TorchWorker, group: Group, mode: str, variant: str, spec: dict[str, Any]):
    self.worker, self.id = worker, worker.next_id
    worker.next_id += 1
    self.batch_size = group.batch
    reply = worker.request({"op": "build", "id": self.id, "spec": spec})
    if "error" in reply:
      raise RuntimeError(reply["error"])
    self.record = {"method": MODE_METHODS[mode][0] if mode in MODE_METHODS else mode, "objective": None, **group.key,
                   "dtype": "bfloat16 autocast" if spec["amp_bf16"] else "float32", "mode": mode,
                   "framework": f"pytorch_{variant}", "flops_per_step": None, "program_bytes": None,
                   "peak_bytes_in_use": reply.get("peak_memory_bytes"), "compile_s": reply.get("build_s"),
                   **{f"torch_{k}": v for k, v in reply.get("info", {}).items()}}
    self.times: list[float] = []

  def warmup(self, n: int = 0) -> None:
    del n  # the worker warms up while building

  def run(self, k: int, sync_every: int) -> None:
    reply = self.worker.request({"op": "run", "id": self.id, "steps": k, "sync_every": sync_every})
    if "error" in reply:
      raise RuntimeError(reply["error"])
    self.times += reply["times"]


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def largest_batch(fits: Callable[[int], bool], start: int, *, cap: int, multiple: int = 1,
                  bisect_steps: int = 2) -> dict[str, Any]:
  """The largest batch ``b`` (a multiple of ``multiple``) with ``fits(b)``, searched by doubling from ``start``
  until a batch does not fit or ``cap`` is passed, then ``bisect_steps`` bisections between the last batch
  that fit and the first that did not.

  Returns ``{"largest", "first_failing", "capped", "tried"}``: ``largest`` is ``None`` when ``start`` itself
  does not fit; ``capped`` is true when every batch up to ``cap`` fitted (the true limit is higher).
  """
  if start % multiple:
    raise ValueError(f"largest_batch: start={start} is not a multiple of {multiple}")
  tried: list[tuple[int, bool]] = []

  def check(b: int) -> bool:
    ok = bool(fits(b))
    tried.append((b, ok))
    return ok

  if not check(start):
    return {"largest": None, "first_failing": start, "capped": False, "tried": tried}
  good, bad = start, None
  while bad is None and good * 2 <= cap:
    if check(good * 2):
      good *= 2
    else:
      bad = good * 2
  for _ in range(bisect_steps if bad is not None else 0):
    mid = (good + bad) // 2 // multiple * multiple
    if mid <= good or mid >= bad:
      break
    if check(mid):
      good = mid
    else:
      bad = mid
  return {"largest": good, "first_failing": bad, "capped": bad is None, "tried": tried}


def batch_fits(group: Group, mode: str, batch: int, dtype: str, mesh) -> bool:
  """Whether ``mode``'s step of ``group``'s pair compiles and runs one step at ``batch`` without running out of
  device memory; any other error propagates."""
  name, method = MODE_METHODS[mode]
  try:
    cfg = st.Config(name=name, method=method, teacher=group.teacher if mode != "student_only" else None,
                    student=group.student, batch=batch, dtype=dtype, mode=mode, mesh=mesh,
                    image_shape=group.image_shape, num_classes=group.num_classes)
    cfg.warmup(1)
    del cfg
    return True
  except Exception as e:  # noqa: BLE001 - only an out-of-memory error means "does not fit"
    if not is_out_of_memory(e):
      raise
    return False
  finally:
    gc.collect()


def default_groups(a, device_count: int) -> list[Group]:
  groups = []
  for pair in [p for p in a.cifar_pairs.split(",") if p]:
    teacher, student = pair.split(":")
    groups += [Group("cifar", teacher, student, a.cifar_size, 100, int(b)) for b in a.cifar_batches.split(",") if b]
  for pair in [p for p in a.imagenet_pairs.split(",") if p]:
    teacher, student = pair.split(":")
    batches = [int(b) for b in a.imagenet_batches.split(",") if b] or [a.imagenet_per_chip * device_count]
    groups += [Group("imagenet", teacher, student, a.imagenet_size, a.imagenet_classes, b) for b in batches]
  return groups


def _fmt(x, spec: str, na: str = "–") -> str:
  return na if x is None else format(x, spec)


def _bytes(x, na: str = "n/a") -> str:
  return na if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def markdown(table: dict[str, Any]) -> str:
  """The README-ready Markdown of a table (:func:`main`'s JSON)."""
  dev, s = table["device"], table["settings"]
  peaks = table["peak_flops_per_s_all_devices"]
  def tflops(x):
    return "–" if x is None else f"{x / 1e12:.1f}"

  lines = [f"Device: {dev['device']} x{dev['device_count']} ({dev.get('cpu_model', dev['platform'])}), jax "
           f"{dev['jax']}, kernels: {table['kernels']['convolution']} / {table['kernels']['batch_norm']}; dtype "
           f"{s['dtype']}; {s['steps']} timed steps per row in {s['rounds']} interleaved rounds, host sync every "
           f"{s['sync_every']} steps; matmul {s['matmul_size']}² {s['dtype']}: "
           f"{table['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s (one device); dense peaks of the {dev['device_count']} "
           f"device(s): bf16 {tflops(peaks.get('bfloat16'))} TFLOP/s, TF32 {tflops(peaks.get('tf32'))} TFLOP/s. "
           "FLOPs are the whole step's (all devices).", "",
           "| pair | input | batch | mode | framework | img/s | step (ms) | TFLOP/s | of bf16 peak | of TF32 peak | "
           "device peak mem | program mem | largest batch | kdjax ÷ eager | kdjax ÷ compile |",
           "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in table["rows"]:
    lb = r.get("largest_batch")
    lb_text = "–" if lb is None else ("does not fit" if lb["largest"] is None else
                                      f"{'≥ ' if lb['capped'] else ''}{lb['largest']}")
    lines.append(
        f"| {r['teacher'] or '–'} → {r['student']} | {r['image_size']}² | {r['batch']} | {r['mode']} "
        f"| {r['framework']} "
        f"| {r['images_per_s']:,.1f} | {1e3 * r['step_s_median']:.2f} "
        f"| {_fmt(r['flops_per_s'] and r['flops_per_s'] / 1e12, '.3g')} "
        f"| {_fmt(r.get('fraction_of_bf16_peak'), '.3f')} | {_fmt(r.get('fraction_of_tf32_peak'), '.3f')} "
        f"| {_bytes(r.get('peak_bytes_in_use'))} | {_bytes(r.get('program_bytes'), '–')} | {lb_text} "
        f"| {_fmt(r.get('ratio_vs_pytorch_eager'), '.2f')} | {_fmt(r.get('ratio_vs_torch_compile'), '.2f')} |")
  lines += ["", "Live-teacher overhead: the live KD step's time over (teacher forward alone + student-only step), "
            f"each timed in the same rounds (target ≤ {TARGETS['live_teacher_overhead']}).", "",
            "| pair | input | batch | live step (ms) | teacher forward (ms) | student-only step (ms) | overhead |",
            "|---|---|---:|---:|---:|---:|---:|"]
  for o in table["overhead"]:
    lines.append(f"| {o['teacher']} → {o['student']} | {o['image_size']}² | {o['batch']} | {1e3 * o['live_s']:.2f} "
                 f"| {1e3 * o['teacher_forward_s']:.2f} | {1e3 * o['student_only_s']:.2f} | **{o['ratio']:.3f}** |")
  if table["targets_measured"]:
    lines += ["", "Targets (issue 13):", ""]
    lines += [f"- {t['what']}: **{t['measured']:.2f}** (target {t['op']} {t['target']})" for t in
              table["targets_measured"]]
  if table["notes"]:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in table["notes"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="the JSON file to write")
  p.add_argument("--md", default="", help="the Markdown table (default: --out with .md)")
  p.add_argument("--cifar-pairs", default="resnet32x4:resnet8x4,wrn_40_2:wrn_16_2")
  p.add_argument("--cifar-batches", default="64,256,1024")
  p.add_argument("--cifar-size", type=int, default=32)
  p.add_argument("--imagenet-pairs", default="resnet50:resnet18")
  p.add_argument("--imagenet-batches", default="", help="default: --imagenet-per-chip x the device count")
  p.add_argument("--imagenet-per-chip", type=int, default=128)
  p.add_argument("--imagenet-size", type=int, default=224)
  p.add_argument("--imagenet-classes", type=int, default=1000)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--modes", default=",".join(MODES), help="rows per pair and batch: some of live,cached,student_only")
  p.add_argument("--steps", type=int, default=0, help="timed steps per row (default: 4 on CPU, 40 on accelerators)")
  p.add_argument("--round-steps", type=int, default=0, help="steps per row per round (default: 2 CPU, 10 accel.)")
  p.add_argument("--sync-every", type=int, default=0, help="steps between host syncs (default: 1 CPU, 10 accel.)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--matmul-size", type=int, default=0, help="default: 1024 on CPU, 8192 on accelerators")
  p.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=None,
                 help="search the largest batch that fits (default: on accelerators only)")
  p.add_argument("--max-batch-modes", default="live", help="row modes whose largest batch is searched")
  p.add_argument("--max-batch-doublings", type=int, default=4, help="cap: the start batch x 2^this")
  p.add_argument("--max-batch-bisections", type=int, default=1)
  p.add_argument("--torch-python", default="", help="an interpreter with PyTorch: add the PyTorch rows")
  p.add_argument("--torch-worker", default=TORCH_WORKER, help=argparse.SUPPRESS)  # tests use a stand-in
  p.add_argument("--torch-variants", default="eager,compile", help="some of eager,compile")
  p.add_argument("--torch-compile-groups", default="imagenet",
                 help="groups with torch.compile rows (compiling costs ~1 min per row): imagenet, cifar or all")
  p.add_argument("--tiny", action="store_true",
                 help="CPU smoke settings: resnet8 -> resnet8 at 16x16 and resnet18 -> resnet18 at 32x32, batch 8")
  a = p.parse_args(argv)
  if a.tiny:
    a.cifar_pairs, a.cifar_batches, a.cifar_size = "resnet8:resnet8", "8", 16
    a.imagenet_pairs, a.imagenet_batches, a.imagenet_size, a.imagenet_classes = "resnet18:resnet18", "8", 32, 10
  modes = [m for m in a.modes.split(",") if m]
  for m in modes:
    if m not in MODES:
      raise SystemExit(f"--modes: unknown mode {m!r}; expected some of {','.join(MODES)}")
  variants = [v for v in a.torch_variants.split(",") if v]
  for v in variants:
    if v not in TORCH_VARIANTS:
      raise SystemExit(f"--torch-variants: unknown variant {v!r}; expected some of {','.join(TORCH_VARIANTS)}")
  if a.torch_python:
    # JAX would otherwise reserve 75% of the GPU's memory at start and leave PyTorch the rest.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  dev = st.device_description()
  platform, on_cpu = dev["platform"], dev["platform"] == "cpu"
  if on_cpu:
    onednn.prepare()  # built before anything is traced, as kdjax train does
  mesh = parallel.make_mesh()
  steps = a.steps or (4 if on_cpu else 40)
  round_steps = a.round_steps or (2 if on_cpu else 10)
  sync_every = a.sync_every or (1 if on_cpu else 10)
  search_max = (not on_cpu) if a.max_batch is None else a.max_batch
  # The peaks of all the devices the step runs on (the FLOP counts are the whole step's).
  peaks = {k: v * jax.device_count() for k, v in st.peak_flops(dev["device"]).items()}
  with kernels.platform(platform, devices=mesh.size):
    used_kernels = kernels.describe()
  groups = default_groups(a, mesh.size)
  for g in groups:
    parallel.check_batch_size(g.batch, mesh)
  print(f"# device: {dev['device']} x{dev['device_count']}, jax {dev['jax']}, dtype {a.dtype}, {len(groups)} groups, "
        f"kernels: {used_kernels['convolution']}", flush=True)

  def mem_peak() -> int | None:
    stats = st.memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])

  rows: list = []
  row_group: dict[int, Group] = {}
  for g in groups:
    specs = [(m, *MODE_METHODS[m]) for m in modes]
    for mode, name, method in specs:
      t0 = time.perf_counter()
      cfg = st.Config(name=name, method=method, teacher=g.teacher if mode != "student_only" else None,
                      student=g.student, batch=g.batch, dtype=a.dtype, mode=mode, mesh=mesh,
                      image_shape=g.image_shape, num_classes=g.num_classes)
      cfg.record.update(g.key, teacher=g.teacher if mode != "student_only" else None)
      # The whole step's FLOPs over all devices: the lowered program's count (the compiled count of a program
      # sharded over several devices is one device's share; on one CPU device the two agree to 0.2%).
      cfg.record["flops_per_step"] = cfg.lowered_flops or None
      cfg.record["flops_source"] = ("lowered (pre-optimisation HLO), the whole step"
                                    + (" with XLA's convolutions" if cfg.record.get("onednn_convolutions") else ""))
      cfg.warmup(a.warmup)
      cfg.record["peak_bytes_in_use"] = mem_peak()
      print(f"# built {mode:15s} {g.teacher}->{g.student} {g.image_size}² batch {g.batch}: "
            f"{(cfg.record['flops_per_step'] or 0) / 1e9:9.2f} GFLOP/step, {time.perf_counter() - t0:6.1f} s",
            flush=True)
      rows.append(cfg)
      row_group[id(cfg)] = g
    if "live" in modes and "student_only" in modes:
      fwd = TeacherForward(g, a.dtype, mesh)
      fwd.warmup(a.warmup)
      fwd.record["peak_bytes_in_use"] = mem_peak()
      rows.append(fwd)
      row_group[id(fwd)] = g

  worker, failed = None, []
  if a.torch_python:
    worker = TorchWorker(a.torch_python, a.torch_worker, warmup=a.warmup)
    device = "cpu" if on_cpu else "cuda"
    for g in groups:
      for variant in variants:
        if variant == "compile" and a.torch_compile_groups not in ("all", g.kind):
          continue
        for mode in modes:
          spec = {"teacher": g.teacher, "student": g.student, "batch": g.batch, "image_size": g.image_size,
                  "num_classes": g.num_classes, "mode": mode, "device": device, "amp_bf16": a.dtype == "bfloat16",
                  "channels_last": True, "compile": variant == "compile"}
          try:
            row = TorchRow(worker, g, mode, variant, spec)
          except RuntimeError as e:
            failed.append(f"PyTorch {variant} {mode} {g.teacher}->{g.student} batch {g.batch}: {e}")
            print(f"# {failed[-1]}", flush=True)
            continue
          print(f"# built pytorch_{variant} {mode} {g.teacher}->{g.student} batch {g.batch}", flush=True)
          rows.append(row)
          row_group[id(row)] = g

  rounds = max(1, -(-steps // round_steps))
  for r in range(rounds):
    for cfg in (rows if r % 2 == 0 else rows[::-1]):
      cfg.run(round_steps, sync_every)
    print(f"# round {r + 1}/{rounds} done", flush=True)
  if worker is not None:
    worker.close()

  matmul_n = a.matmul_size or (1024 if on_cpu else 8192)
  matmul = st.time_matmul(matmul_n, jnp.dtype(a.dtype), repeats=5 if on_cpu else 10)
  records = []
  for cfg in rows:
    rec = st.summarize(cfg, matmul * jax.device_count(), peaks.get(a.dtype))  # the matmul rate of all devices
    if not rec.get("flops_per_step"):  # XLA's analysis returned nothing (PyTorch rows have no count)
      rec["flops_per_step"] = None
      st._set_rates(rec, None, None)
    f = rec["flops_per_s"]
    rec["fraction_of_bf16_peak"] = f / peaks["bfloat16"] if f and peaks.get("bfloat16") else None
    rec["fraction_of_tf32_peak"] = f / peaks["tf32"] if f and peaks.get("tf32") else None
    records.append(rec)

  def find(g: Group, mode: str, framework: str = "kdjax"):
    return next((r for r, c in zip(records, rows) if row_group[id(c)] == g and r["mode"] == mode
                 and r["framework"] == framework), None)

  overhead, targets = [], []
  for g in groups:
    for mode in modes:
      rec = find(g, mode)
      for variant, key in (("eager", "ratio_vs_pytorch_eager"), ("compile", "ratio_vs_torch_compile")):
        ref = find(g, mode, f"pytorch_{variant}")
        if rec is not None and ref is not None:
          rec[key] = rec["images_per_s"] / ref["images_per_s"]
          if g.kind == "imagenet" and mode == "live":
            target = TARGETS["imagenet_kd_vs_" + ("pytorch_eager" if variant == "eager" else "torch_compile")]
            targets.append({"what": f"ImageNet-shaped KD step ({g.teacher} → {g.student}, batch {g.batch}), kdjax ÷ "
                                    f"PyTorch {variant}", "measured": rec[key], "op": "≥", "target": target})
      plain = find(g, "student_only")
      if rec is not None and plain is not None and rec is not plain:
        rec["time_vs_student_only"] = rec["step_s_median"] / plain["step_s_median"]
    live, fwd, plain = find(g, "live"), find(g, "teacher_forward"), find(g, "student_only")
    if live and fwd and plain:
      ratio = live["step_s_median"] / (fwd["step_s_median"] + plain["step_s_median"])
      overhead.append({**g.key, "live_s": live["step_s_median"], "teacher_forward_s": fwd["step_s_median"],
                       "student_only_s": plain["step_s_median"], "ratio": ratio})
      live["live_teacher_overhead"] = ratio
  if overhead:
    worst = max(overhead, key=lambda o: o["ratio"])
    targets.append({"what": f"live-teacher overhead, worst row ({worst['teacher']} → {worst['student']}, batch "
                            f"{worst['batch']})", "measured": worst["ratio"], "op": "≤",
                    "target": TARGETS["live_teacher_overhead"]})

  # The largest batch that fits, per (pair, input, mode), after the timings so its attempts disturb none of them,
  # and with the timed rows' device buffers released so that they do not take memory from it.
  largest: list[dict[str, Any]] = []
  if search_max:
    for c in rows:
      for attr in ("state", "batch", "teacher_args", "step", "variables", "image", "fn"):
        if hasattr(c, attr):
          setattr(c, attr, None)
    gc.collect()
    search_modes = [m for m in a.max_batch_modes.split(",") if m in modes]
    seen = set()
    for g in groups:
      pair_key = (g.kind, g.teacher, g.student, g.image_size)
      if pair_key in seen:
        continue
      seen.add(pair_key)
      start = max(h.batch for h in groups if (h.kind, h.teacher, h.student, h.image_size) == pair_key)
      for mode in search_modes:
        def fits(b: int, g=g, mode=mode) -> bool:
          return batch_fits(g, mode, b, a.dtype, mesh)

        t0 = time.perf_counter()
        found = largest_batch(fits, start, cap=start * 2**a.max_batch_doublings, multiple=mesh.size,
                              bisect_steps=a.max_batch_bisections)
        found.update(group=g.kind, teacher=g.teacher, student=g.student, image_size=g.image_size, mode=mode,
                     search_s=time.perf_counter() - t0)
        print(f"# largest batch {mode} {g.teacher}->{g.student}: {found['largest']} "
              f"({'capped' if found['capped'] else 'first failing ' + str(found['first_failing'])})", flush=True)
        largest.append(found)
        for r, c in zip(records, rows):
          h = row_group[id(c)]
          same_pair = (h.kind, h.teacher, h.student, h.image_size) == pair_key
          if same_pair and r["mode"] == mode and r["framework"] == "kdjax":
            r["largest_batch"] = {k: found[k] for k in ("largest", "first_failing", "capped")}

  notes = list(failed)
  if on_cpu:
    notes.append("CPU: no device memory statistics (memory 'n/a'); the largest-batch search runs on accelerators "
                 "only (--max-batch to force it).")
  if platform == "gpu" and a.dtype == "float32":
    notes.append("float32 on Ampere or later: XLA runs dots and convolutions in TF32 by default; compare with the "
                 "TF32 peak.")
  if platform == "tpu":
    notes.append("TPU: bfloat16 is the native matmul type (float32 matmuls run as several bf16 passes); keep "
                 "--dtype bfloat16.")
    odd = sorted({g.batch for g in groups if (g.batch // mesh.size) % 128})
    notes.append("TPU: the per-chip batch should be a multiple of 128 (the MXU is 128x128)"
                 + (f"; rows at batch {', '.join(map(str, odd))} are not, and under-fill it." if odd else "."))
    notes.append("TPU: the step has no host syncs (metrics stay on device); the timer syncs once every "
                 f"{sync_every} steps.")
  if not search_max:
    notes.append("Largest batch: not searched in this run.")
  table = {
      "device": dev, "kernels": used_kernels, "peak_flops_per_s_all_devices": peaks, "matmul_flops_per_s": matmul,
      "settings": {"dtype": a.dtype, "steps": rounds * round_steps, "rounds": rounds, "round_steps": round_steps,
                   "sync_every": sync_every, "warmup": a.warmup, "matmul_size": matmul_n, "modes": modes,
                   "torch_variants": variants if a.torch_python else [],
                   "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                   "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                   "argv": sys.argv[1:] if argv is None else list(argv)},
      "targets": TARGETS, "targets_measured": targets, "notes": notes, "rows": records, "overhead": overhead,
      "largest_batch": largest}
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(table, f, indent=1)
  md_path = a.md or os.path.splitext(a.out)[0] + ".md"
  text = markdown(table)
  with open(md_path, "w") as f:
    f.write(text)
  print(text)
  print(f"wrote {a.out} and {md_path}")
  return table


if __name__ == "__main__":
  main()
