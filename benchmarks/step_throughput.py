"""Step throughput of kdjax's distillation train step (issue 3).

For each method and (teacher, student) pair this builds the library's real step
(:func:`kdjax.train.make_train_step`, ``jax.jit`` with the state donated, on a ``("data",)`` mesh over
every device), excludes compilation and warm-up, and measures images/s and achieved FLOP/s (FLOPs per
step from XLA's cost analysis of the compiled step, or of the lowered step where custom calls — oneDNN
convolutions on CPU, cuDNN on GPU — hide convolutions from it). A large matmul timed on the same device gives the
reference FLOP/s; each step's FLOP/s is reported as a fraction of it (and of the chip's peak where known).

All configurations are compiled and warmed up first, then timed in interleaved rounds (round-robin, a few
steps each), so every row of one run sees the same machine load; ratios between rows of one run are the
numbers to trust on a shared machine. ``--torch-python`` adds the PyTorch eager reference step of
``torch_reference.py`` (run in its own interpreter/virtualenv) to the same rotation.

Usage::

  python benchmarks/step_throughput.py --methods kd,fitnets,at,fsp \
      --pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2 --batch 64 --steps 20 --out results/cpu.json \
      [--cached-teacher] [--student-only] [--dtype bfloat16] [--torch-python /work/torchvenv/bin/python]

Methods: ``kd`` = ``soft_targets`` (T = 4, α = 0.9); ``fitnets`` = ``fitnets_one_stage`` (CE + 100 · hint
loss through a 3x3 conv regressor on ``stage2``, RepDistiller's FitNet); ``at`` = ``attention_transfer``
(β = 1000 on stage1..3); ``fsp`` = ``fsp`` (stage-1 FSP loss on stem, stage1..3, RepDistiller's ``'code'``
scale: the paper's sum of squares diverges from random weights at this learning rate); ``rocket`` =
``rocket_launching`` (the pair's teacher is the booster, trained jointly with the student: WRN-40-k → WRN-16-k
pairs, the code's interval sharing); ``adversarial`` = ``adversarial`` (a student update and a discriminator
update per step); ``gradient_at`` = ``attention_transfer_gradient`` (student and teacher input gradients and
double backprop). With ``--student-only`` every row gets ``time_vs_student_only``, its step time over the plain
student step's of the same pair in the same run. ``--cached-teacher`` adds
the KD step reading precomputed teacher logits from the batch (teacher features cannot be cached, so only
``kd``); ``--student-only`` adds the plain supervised student step (method ``supervised``). The optimizer is
SGD (momentum 0.9, weight decay 5e-4), as in RepDistiller.

``--dtype bfloat16`` keeps parameters, optimizer state, inputs and activations in bfloat16 (pure bf16
training; Flax still reduces BatchNorm statistics in float32 and keeps the student's running statistics in
float32) and times a bf16 matmul too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models, parallel, train
from kdjax.config import default_stage_config
from kdjax.methods.objective import make_method
from kdjax.models import kernels, onednn

# Stands, in a loss config below, for the pair's teacher model name (Rocket Launching's booster is trained
# jointly with the student, so the "teacher" of a pair is built inside the method's step).
TEACHER = "<pair teacher>"
# Benchmark name -> (registered kdjax method, loss-config overrides).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "kd": ("soft_targets", {"temperature": 4.0, "alpha": 0.9, "ensemble_mean": "arithmetic"}),
    "fitnets": ("fitnets_one_stage", {}),
    "at": ("attention_transfer", {}),
    "fsp": ("fsp", {"mode": "code"}),
    # Methods with their own stage program. Rocket: the pair's teacher is the booster, trained jointly with
    # the student (the code's interval sharing for a WRN-40-k / WRN-16-k pair).
    "rocket": ("rocket_launching", {"booster_model": TEACHER, "booster_model_kwargs": {}}),
    "adversarial": ("adversarial", {}),
    "gradient_at": ("attention_transfer_gradient", {}),
}
NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)

# Dense (no sparsity) peak FLOP/s per chip by device kind (``jax.Device.device_kind``): ``bfloat16`` on the
# tensor cores / MXUs, ``tf32`` on the tensor cores (what XLA runs float32 dots and convolutions with on
# Ampere and later by default), ``float32`` without tensor cores. Vendor spec sheets, cited in
# benchmarks/README.md ("Peak FLOP/s"); NVIDIA quotes tensor-core figures "with sparsity", i.e. twice the dense
# figure, which is what is halved here. TPUs have no TF32 (float32 matmuls run as bf16 passes), hence no entry.
PEAK_FLOPS = {
    "NVIDIA H200": {"bfloat16": 989.4e12, "float32": 66.9e12, "tf32": 494.7e12},  # SXM
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4e12, "float32": 66.9e12, "tf32": 494.7e12},  # SXM
    "NVIDIA H100 PCIe": {"bfloat16": 756.5e12, "float32": 51e12, "tf32": 378e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 19.5e12, "tf32": 156e12},  # SXM4 and PCIe, 40 and 80 GB
    "NVIDIA L4": {"bfloat16": 121e12, "float32": 30.3e12, "tf32": 60e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12},  # v5p
}


def peak_flops(device_kind: str) -> dict[str, float]:
  """The :data:`PEAK_FLOPS` entry of ``device_kind``: the exact kind, else the longest key it starts with
  followed by a non-alphanumeric character ("NVIDIA A100-SXM4-80GB" -> "NVIDIA A100"; "NVIDIA L40S" is not
  "NVIDIA L4"; "TPU v5 lite" is not "TPU v5"); ``{}`` for an unknown chip."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  keys = [k for k in PEAK_FLOPS if device_kind.startswith(k) and not device_kind[len(k)].isalnum()]
  return PEAK_FLOPS[max(keys, key=len)] if keys else {}


def memory_stats() -> dict[str, Any] | None:
  """``jax.Device.memory_stats()`` of the first device (``None`` where the backend has none, e.g. CPU)."""
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None


def program_bytes(compiled) -> int | None:
  """Device bytes one execution of ``compiled`` needs by XLA's memory analysis (arguments + outputs +
  temporaries - donated/aliased), on every backend; ``None`` where the analysis is unavailable."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - getattr(m, "alias_size_in_bytes", 0))
  return int(total)


def device_description() -> dict[str, Any]:
  d = jax.devices()[0]
  desc = {"device": d.device_kind, "platform": d.platform, "device_count": jax.device_count()}
  if d.platform == "cpu":
    model = platform.processor() or platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
      pass
    desc.update(cpu_model=model, cpu_cores=os.cpu_count())
  desc.update(jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
  return desc


def step_flops(stage) -> float:
  """FLOPs of one execution from XLA's cost analysis of a ``Lowered`` or ``Compiled`` step (a dict, or a
  list of dicts on older JAX)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float((cost or {}).get("flops", 0.0))


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


class Config:
  """One benchmarked step: compiled, warmed up, and able to run ``k`` more steps."""

  def __init__(self, *, name: str, method: str, teacher: str, student: str, batch: int, dtype: str,
               mode: str, mesh, seed: int = 0, compile: bool = True, image_shape: tuple[int, ...] = IMAGE_SHAPE,
               num_classes: int = NUM_CLASSES):
    # Trace as `kdjax train` does: the layers take the mesh platform's kernels (stock lax convolutions and
    # Flax-equivalent BatchNorm on GPU/TPU, the CPU fast paths on CPU).
    with kernels.platform(mesh.devices.flat[0].platform, devices=mesh.size):
      self._build(name=name, method=method, teacher=teacher, student=student, batch=batch, dtype=dtype, mode=mode,
                  mesh=mesh, seed=seed, compile=compile, image_shape=tuple(image_shape), num_classes=num_classes)

  def _build(self, *, name, method, teacher, student, batch, dtype, mode, mesh, seed, compile, image_shape,
             num_classes):
    self.record: dict[str, Any] = {"method": name, "objective": method, "teacher": teacher, "student": student,
                                   "batch": batch, "dtype": dtype, "mode": mode, "framework": "kdjax"}
    self.batch_size = batch
    dt = jnp.dtype(dtype)
    cfg = default_stage_config()
    cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay = "sgd", 0.05, 0.9, 5e-4
    tx = train.make_optimizer(cfg, 1000)
    loss = METHODS[name][1] if name in METHODS else {}
    loss = {k: (teacher if v == TEACHER else v) for k, v in loss.items()}  # e.g. Rocket's booster = the pair's teacher
    # Every method's step as `kdjax train` builds it: the shared distillation step for an Objective, the
    # paper's own stage program otherwise (Rocket Launching, adversarial KD, gradient-based AT).
    program = train.as_program(make_method(method, loss))
    student_model = models.get(student, num_classes=num_classes)
    teacher_models, teacher_vars = (), ()
    example = jnp.zeros((1, *image_shape), jnp.float32)
    if mode == "live" and program.needs_teacher:
      tm = models.get(teacher, num_classes=num_classes)
      teacher_models = (tm,)
      teacher_vars = (tm.init(jax.random.PRNGKey(seed + 1), example, train=False),)
    cfg.seed = seed
    # No data is read: the stage programs only ask the dataset for its class count and example shape.
    dataset = types.SimpleNamespace(num_classes=num_classes, example_shape=image_shape, test=None)
    setup = train.Setup(config=cfg, workdir="", mesh=mesh, dataset=dataset, transfer_set=None, student=student_model,
                        teacher_models=list(teacher_models), teacher_variables=list(teacher_vars), num_steps=1000,
                        tx=tx, cached_teacher=mode == "cached", example=example, init_variables=None)
    state = program.init_state(setup)
    if dt != jnp.float32:
      if not isinstance(state, train.TrainState):
        raise SystemExit(f"--dtype {dtype} is implemented for the shared distillation step only, not {method!r}")
      params, aux = _cast(state.params, dt), _cast(state.aux_params, dt)
      # The student's BatchNorm running statistics stay float32 (Flax updates them in float32).
      state = state.replace(params=params, aux_params=aux, opt_state=tx.init((params, aux)))
      teacher_vars = _cast(teacher_vars, dt)
    rng = np.random.default_rng(seed)
    host = {"image": rng.standard_normal((batch, *image_shape)).astype(dt),
            "label": rng.integers(0, num_classes, batch).astype(np.int32),
            "label_mask": np.ones(batch, np.float32)}
    if mode == "cached":
      host["teacher_logits"] = rng.standard_normal((batch, 1, num_classes)).astype(np.float32)
    step = program.make_step(setup)
    self.state = parallel.replicate(state, mesh)
    self.batch = parallel.shard_batch(host, mesh)
    self.teacher_args = parallel.replicate(teacher_vars, mesh)
    t0 = time.perf_counter()
    jitted = jax.jit(step, donate_argnums=(0,))
    lowered = jitted.lower(self.state, self.batch, self.teacher_args)
    self.lowered_flops = step_flops(lowered)
    if not compile:
      return
    compiled = lowered.compile()
    self.record["compile_s"] = time.perf_counter() - t0
    # On GPU the compiled program's convolutions are cuDNN custom calls that XLA's cost analysis does not
    # count (it reported ~0.9 GFLOP for a ~190 GFLOP step on an H200), so there the FLOPs come from the
    # backend-independent analysis of the lowered (pre-optimisation) program; on CPU from the compiled one.
    on_cpu = jax.devices()[0].platform == "cpu"
    # XLA's cost analysis does not count custom calls either, so where the convolutions are oneDNN's
    # (kdjax.models.onednn) the FLOPs come from the same step lowered with XLA's own convolutions.
    self.record["onednn_convolutions"] = "kdjax_onednn_conv" in lowered.as_text()
    if self.record["onednn_convolutions"]:
      with onednn.policy("off"):
        self.lowered_flops = step_flops(jax.jit(lambda *a: step(*a)).lower(self.state, self.batch,
                                                                            self.teacher_args))
      self.record["flops_per_step"] = self.lowered_flops
      self.record["flops_source"] = "lowered (pre-optimisation HLO) with XLA's convolutions"
    else:
      self.record["flops_per_step"] = step_flops(compiled if on_cpu else lowered)
      self.record["flops_source"] = "compiled" if on_cpu else "lowered (pre-optimisation HLO)"
    self.record["program_bytes"] = program_bytes(compiled)
    self.step = compiled
    self.times: list[float] = []

  def warmup(self, n: int = 2) -> None:
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.batch, self.teacher_args)
    jax.block_until_ready((self.state, metrics))
    if not np.isfinite(float(jax.device_get(metrics["loss"][0]))):
      print(f"# warning: {self.record['method']} {self.record['teacher']}->{self.record['student']}: "
            "non-finite loss in warm-up (updates are skipped; the cost per step is the same)", flush=True)

  def run(self, k: int, sync_every: int) -> None:
    done = 0
    while done < k:
      n = min(sync_every, k - done)
      t0 = time.perf_counter()
      for _ in range(n):
        self.state, _ = self.step(self.state, self.batch, self.teacher_args)
      jax.block_until_ready(self.state)
      self.times.append((time.perf_counter() - t0) / n)
      done += n


class TorchConfig:
  """The PyTorch eager reference step, served by ``torch_reference.py --serve`` in another interpreter."""

  def __init__(self, python: str, batch: int, student_only: bool = False):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
    cmd = [python, script, "--serve", "--batch", str(batch)] + (["--student-only"] if student_only else [])
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(self.proc.stdout.readline())
    self.batch_size = batch
    self.record = {"method": "student_only" if student_only else "kd",
                   "teacher": None if student_only else "resnet32x4",
                   "student": "resnet8x4", "batch": batch, "dtype": "float32",
                   "mode": "student_only" if student_only else "live", "framework": "pytorch_eager",
                   "flops_per_step": None, **{f"torch_{k}": v for k, v in info.items() if k != "ready"}}
    self.times: list[float] = []

  def warmup(self, n: int = 0) -> None:
    del n  # the worker warms up before it reports ready

  def run(self, k: int, sync_every: int) -> None:
    del sync_every
    self.proc.stdin.write(f"{k}\n")
    self.proc.stdin.flush()
    self.times += json.loads(self.proc.stdout.readline())["times"]

  def close(self) -> None:
    self.proc.stdin.write("0\n")
    self.proc.stdin.flush()
    self.proc.wait(timeout=60)


def time_matmul(n: int, dtype, repeats: int) -> float:
  """FLOP/s of an ``n x n @ n x n`` matmul on the default device (median of ``repeats``)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  f(a, b).block_until_ready()
  inner = 1 if jax.devices()[0].platform == "cpu" else 20
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(a, b)
    out.block_until_ready()
    times.append((time.perf_counter() - t0) / inner)
  return 2.0 * n**3 / float(np.median(times))


def summarize(cfg, matmul: float, peak: float | None) -> dict[str, Any]:
  t = np.asarray(cfg.times)
  rec = dict(cfg.record)
  med = float(np.median(t))
  rec.update(steps_timed=int(t.size), step_s_median=med, step_s_min=float(t.min()),
             step_s_p90=float(np.percentile(t, 90)), images_per_s=cfg.batch_size / med,
             images_per_s_best=cfg.batch_size / float(t.min()))
  rec["matmul_flops_per_s"] = matmul
  _set_rates(rec, rec.get("flops_per_step"), peak)
  return rec


def _set_rates(rec: dict[str, Any], flops: float | None, peak: float | None) -> None:
  """``flops_per_s`` and its fractions of the matmul rate and of the chip's peak, from the median step."""
  rec["flops_per_s"] = flops / rec["step_s_median"] if flops else None
  rec["fraction_of_matmul"] = rec["flops_per_s"] / rec["matmul_flops_per_s"] if flops else None
  rec["fraction_of_peak"] = rec["flops_per_s"] / peak if (flops and peak) else None


def recount_flops(path: str) -> list[dict[str, Any]]:
  """Recomputes ``flops_per_step`` (and the rates derived from it) of every kdjax record in ``path``.

  The count comes from XLA's cost analysis of the *lowered* step, which does not depend on the backend
  (on CPU it is within 0.2% of the compiled count); the measured step times are kept.
  """
  with open(path) as f:
    records = json.load(f)
  mesh = parallel.make_mesh()
  for rec in records:
    if rec.get("framework") != "kdjax":
      continue
    cfg = Config(name=rec["method"], method=rec["objective"], teacher=rec["teacher"], student=rec["student"],
                 batch=rec["batch"], dtype=rec["dtype"], mode=rec["mode"], mesh=mesh, compile=False)
    flops = cfg.lowered_flops
    rec["flops_per_step_as_measured"] = rec.get("flops_per_step")
    rec["flops_per_step"] = flops
    rec["flops_source"] = f"lowered (pre-optimisation HLO), recounted with jax {jax.__version__}"
    _set_rates(rec, flops, rec.get("peak_flops_per_s"))
    print(f"{rec['method']:12s} {rec['mode']:12s} {rec['teacher']}->{rec['student']}: {flops / 1e9:7.1f} GFLOP/step, "
          f"{rec['flops_per_s'] / 1e12:7.2f} TFLOP/s, {100 * (rec['fraction_of_peak'] or 0):5.1f}% of peak", flush=True)
  with open(path, "w") as f:
    json.dump(records, f, indent=2)
  return records


def main(argv=None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="kd,fitnets,at,fsp")
  p.add_argument("--pairs", default="resnet32x4:resnet8x4,wrn_40_2:wrn_16_2")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after warm-up)")
  p.add_argument("--round-steps", type=int, default=0,
                 help="steps per configuration per interleaved round (default: 2 on CPU, 20 on accelerators)")
  p.add_argument("--sync-every", type=int, default=0,
                 help="steps dispatched between host syncs (default: 1 on CPU, 10 on accelerators)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--cached-teacher", action="store_true", help="add the KD step with precomputed teacher logits")
  p.add_argument("--student-only", action="store_true", help="add the plain student (supervised) step")
  p.add_argument("--no-live", action="store_true", help="skip the live-teacher rows")
  p.add_argument("--matmul-size", type=int, default=0, help="default: 2048 on CPU, 8192 on accelerators")
  p.add_argument("--torch-python", default="",
                 help="python with PyTorch: add torch_reference.py's KD step (and student step) to the rotation")
  p.add_argument("--out", default="")
  p.add_argument("--recount-flops", default="",
                 help="rewrite FILE.json's FLOP counts from the lowered (backend-independent) program, keeping "
                      "its timings: for tables measured where XLA's cost analysis misses cuDNN convolutions")
  a = p.parse_args(argv)
  if a.recount_flops:
    return recount_flops(a.recount_flops)

  dev = device_description()
  on_cpu = dev["platform"] == "cpu"
  if on_cpu:
    onednn.prepare()  # built before anything is traced (kdjax train does the same); the trace never builds it
  round_steps = a.round_steps or (2 if on_cpu else 20)
  sync_every = a.sync_every or (1 if on_cpu else 10)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(a.batch, mesh)
  methods = [m for m in a.methods.split(",") if m]
  pairs = [tuple(x.split(":")) for x in a.pairs.split(",") if x]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"unknown method {m!r}; expected some of {','.join(METHODS)}")
  print(f"# device: {dev['device']} x{dev['device_count']} ({dev.get('cpu_model', dev['platform'])}), "
        f"jax {dev['jax']}, dtype {a.dtype}", flush=True)

  configs: list = []
  for teacher, student in pairs:
    specs = [] if a.no_live else [(m, METHODS[m][0], "live") for m in methods]
    if a.cached_teacher:
      specs.append(("kd", METHODS["kd"][0], "cached"))
    if a.student_only:
      specs.append(("student_only", "supervised", "student_only"))
    for name, method, mode in specs:
      t0 = time.perf_counter()
      cfg = Config(name=name, method=method, teacher=teacher, student=student, batch=a.batch, dtype=a.dtype,
                   mode=mode, mesh=mesh)
      cfg.warmup(a.warmup)
      print(f"# built {name:12s} {mode:12s} {teacher}->{student}: {cfg.record['flops_per_step'] / 1e9:8.1f} "
            f"GFLOP/step, {time.perf_counter() - t0:5.1f} s compile+warm-up", flush=True)
      configs.append(cfg)
  torch_cfgs = []
  if a.torch_python:
    torch_cfgs.append(TorchConfig(a.torch_python, a.batch))
    if a.student_only:
      torch_cfgs.append(TorchConfig(a.torch_python, a.batch, student_only=True))
    configs += torch_cfgs

  rounds = max(1, -(-a.steps // round_steps))
  for r in range(rounds):
    order = configs if r % 2 == 0 else configs[::-1]
    for cfg in order:
      cfg.run(round_steps, sync_every)
    print(f"# round {r + 1}/{rounds} done", flush=True)
  for t in torch_cfgs:
    t.close()

  dtype = jnp.dtype(a.dtype)
  matmul_n = a.matmul_size or (2048 if on_cpu else 8192)
  matmul = time_matmul(matmul_n, dtype, repeats=5 if on_cpu else 10)
  peaks = peak_flops(dev["device"])
  peak = peaks.get(a.dtype)
  records = []
  for cfg in configs:
    rec = summarize(cfg, matmul, peak)
    rec.update(device=dev["device"], device_count=dev["device_count"], matmul_size=matmul_n,
               matmul_dtype=a.dtype, peak_flops_per_s=peak,
               **{k: v for k, v in dev.items() if k not in ("device", "device_count")})
    records.append(rec)

  # Ratios measured in this run: kdjax vs PyTorch, and distillation vs plain student training.
  def find(**kw):
    return next((r for r in records if all(r.get(k) == v for k, v in kw.items())), None)
  for rec in records:
    if rec["framework"] == "kdjax" and rec["mode"] in ("live", "cached", "student_only"):
      ref = find(framework="pytorch_eager", student=rec["student"],
                 mode="student_only" if rec["mode"] == "student_only" else "live")
      if ref is not None and (rec["method"] == "kd" or rec["mode"] == "student_only"):
        rec["ratio_vs_pytorch_eager"] = rec["images_per_s"] / ref["images_per_s"]
      plain = find(framework="kdjax", mode="student_only", student=rec["student"], teacher=rec["teacher"])
      if plain is not None and rec is not plain:
        rec["time_vs_student_only"] = rec["step_s_median"] / plain["step_s_median"]

  print(f"\n{'method':12s} {'mode':12s} {'framework':13s} {'teacher -> student':24s} {'img/s':>7s} {'best':>7s} "
        f"{'GFLOP/step':>10s} {'GFLOP/s':>8s} {'of mm':>6s} {'vs torch':>8s}")
  for rec in records:
    gf = rec["flops_per_step"]
    print(f"{rec['method']:12s} {rec['mode']:12s} {rec['framework']:13s} "
          f"{(rec['teacher'] or '-') + ' -> ' + rec['student']:24s} {rec['images_per_s']:7.1f} "
          f"{rec['images_per_s_best']:7.1f} {(gf or 0) / 1e9:10.1f} {(rec['flops_per_s'] or 0) / 1e9:8.1f} "
          f"{rec['fraction_of_matmul'] or 0:6.2f} {rec.get('ratio_vs_pytorch_eager', float('nan')):8.2f}")
  print(f"matmul {matmul_n}x{matmul_n} {a.dtype}: {matmul / 1e9:.1f} GFLOP/s"
        + (f"; peak {peak / 1e12:.1f} TFLOP/s" if peak else ""))
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(records, f, indent=1)
    print(f"wrote {a.out}")
  return records


if __name__ == "__main__":
  sys.exit(main() and 0)
