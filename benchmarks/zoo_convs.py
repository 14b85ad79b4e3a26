"""Train-mode forward + backward of zoo models with oneDNN convolutions on and off (one CPU device).

Every kdjax model convolves through ``kdjax.models.conv.conv_general_dilated``; with one CPU device its
float32 convolutions run on oneDNN (``kdjax.models.onednn``), with several devices — or
``KDJAX_ONEDNN=0`` — on XLA's own kernels (with kdjax's rewritten stride-2 and 1×1 gradients). This times
``jax.grad`` of a cross-entropy through each model (BatchNorm in training mode), both ways, interleaved::

  python benchmarks/zoo_convs.py --models resnet18,resnet50,vgg16,densenet121,inception_v3,mobilenet_v2 \
      --batch 16 --size 64 --out benchmarks/results/cpu_zoo_convs.json

Grouped and depthwise convolutions (MobileNet, ShuffleNet) stay on XLA either way.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kdjax  # noqa: F401 - applies kdjax's XLA:CPU flag before the backend starts
from kdjax import models
from kdjax.models import onednn

MIN_SIZE = {"inception_v3": 75}  # smaller inputs vanish in its stem


def build(name: str, batch: int, size: int, policy: str):
  size = max(size, MIN_SIZE.get(name, 0))
  net = models.get(name, num_classes=100)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 100, batch))
  variables = net.init(jax.random.key(0), x[:1], train=False)

  def loss(params, state):
    out, _ = net.apply({**state, "params": params}, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1)})
    logits = out[0] if isinstance(out, tuple) else out
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  with onednn.policy(policy):  # decided at trace time: compile inside the block
    step = jax.jit(jax.grad(loss)).lower(params, state).compile()
  jax.block_until_ready(step(params, state))
  return size, lambda: jax.block_until_ready(step(params, state))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet18,resnet50,vgg16,densenet121,inception_v3,mobilenet_v2")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="timed calls per configuration and round")
  p.add_argument("--out", default="")
  a = p.parse_args()
  if len(jax.devices()) != 1 or jax.devices()[0].platform != "cpu":
    raise SystemExit(f"run on one CPU device (found {jax.devices()})")
  print(f"# oneDNN: {onednn.status()}", flush=True)
  configs = {}
  for name in a.models.split(","):
    for policy in ("off", "on"):
      t0 = time.perf_counter()
      size, run = build(name, a.batch, a.size, policy)
      configs[name, policy] = (size, run, [])
      print(f"# built {name} oneDNN {policy}: {time.perf_counter() - t0:.1f} s", flush=True)
  for _ in range(a.rounds):  # interleaved, so both variants see the same machine load
    for _key, (_, run, times) in configs.items():
      for _ in range(a.steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
  records = []
  for name in a.models.split(","):
    (size, _, off), (_, _, on) = configs[name, "off"], configs[name, "on"]
    rec = {"model": name, "batch": a.batch, "size": size, "xla_s_median": float(np.median(off)),
           "onednn_s_median": float(np.median(on)), "speedup": float(np.median(off) / np.median(on)),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "onednn_version": onednn.status()["onednn_version"]}
    records.append(rec)
    print(f"{name:14s} {a.batch}x{size}x{size}: XLA {rec['xla_s_median']:.3f} s  oneDNN "
          f"{rec['onednn_s_median']:.3f} s  speed-up {rec['speedup']:.2f}x", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(records, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
