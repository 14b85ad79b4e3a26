"""Per-layer convolution timings of resnet8x4's train step: forward, input gradient (dx), filter gradient (dw).

The profile behind ``benchmarks/README.md`` ("Where the time goes on CPU") compared these layer by layer
between XLA:CPU and PyTorch's oneDNN. Batch 64, NHWC in JAX and NCHW in PyTorch, median of 12 calls each::

  python benchmarks/conv_layers.py                                   # JAX: lax, kdjax's XLA path, oneDNN
  /work/torchvenv/bin/python benchmarks/conv_layers.py --framework torch

In JAX each pass is timed three ways: ``lax`` (XLA's own), ``xla`` (``kdjax.models.conv.conv_general_dilated``
with oneDNN off: XLA's forward, rewritten gradients for 1×1 and stride-2 3×3 layers) and ``onednn``
(the same function with oneDNN's kernels, ``kdjax.models.onednn``; kdjax's default on one CPU device).
"""

from __future__ import annotations

import argparse
import time

# (in channels, out channels, input size, kernel, stride): resnet8x4's ten convolutions.
LAYERS = [(3, 32, 32, 3, 1), (32, 64, 32, 3, 1), (64, 64, 32, 3, 1), (32, 64, 32, 1, 1), (64, 128, 32, 3, 2),
          (128, 128, 16, 3, 1), (64, 128, 32, 1, 2), (128, 256, 16, 3, 2), (256, 256, 8, 3, 1), (128, 256, 16, 1, 2)]
BATCH = 64


def median_ms(run, repeats: int = 12) -> float:
  run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return 1e3 * sorted(times)[len(times) // 2]


def jax_rows():
  import jax
  from jax import lax

  import kdjax  # noqa: F401 - applies kdjax's XLA:CPU flag before the backend starts
  from kdjax.models import onednn
  from kdjax.models.conv import conv_general_dilated

  # lax: XLA's own gradients; xla: kdjax's XLA path (rewritten 1x1 and stride-2 gradients, used with several
  # devices or oneDNN off); onednn: the default on one CPU device (kdjax.models.onednn).
  variants = (("lax", lax.conv_general_dilated, "off"), ("xla", conv_general_dilated, "off"),
              ("onednn", conv_general_dilated, "on"))
  for cin, cout, size, k, s in LAYERS:
    x = jax.random.normal(jax.random.key(0), (BATCH, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
    pad = ((k // 2, k // 2),) * 2
    times = {}
    for label, fn, policy in variants:
      with onednn.policy(policy):  # decides at trace time: trace (first call) inside the block
        conv = jax.jit(lambda x, w, fn=fn: fn(x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")))
        g = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, w).shape)
        dx = jax.jit(lambda w, g, conv=conv: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
        dw = jax.jit(lambda x, g, conv=conv: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
        jax.block_until_ready((conv(x, w), dx(w, g), dw(x, g)))
      times[f"fwd_{label}"] = median_ms(lambda: conv(x, w).block_until_ready())
      times[f"dx_{label}"] = median_ms(lambda: dx(w, g).block_until_ready())
      times[f"dw_{label}"] = median_ms(lambda: dw(x, g).block_until_ready())
    yield (cin, cout, size, k, s), times


def torch_rows():
  import torch

  for cin, cout, size, k, s in LAYERS:
    x, w = torch.randn(BATCH, cin, size, size), torch.randn(cout, cin, k, k) * 0.05
    y = torch.nn.functional.conv2d(x, w, stride=s, padding=k // 2)
    g = torch.randn_like(y)

    def backward(mask):
      return torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [k // 2] * 2, [1, 1], False, [0, 0], 1,
                                                 mask)
    times = {"fwd": median_ms(lambda: torch.nn.functional.conv2d(x, w, stride=s, padding=k // 2)),
             "dx": median_ms(lambda: backward([True, False, False])),
             "dw": median_ms(lambda: backward([False, True, False]))}
    yield (cin, cout, size, k, s), times


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--framework", choices=("jax", "torch"), default="jax")
  a = p.parse_args()
  totals: dict[str, float] = {}
  for (cin, cout, size, k, s), times in (jax_rows() if a.framework == "jax" else torch_rows()):
    print(f"{cin:3d}->{cout:3d} {k}x{k} s{s} @{size:2d}: " + "  ".join(f"{n} {t:6.1f}" for n, t in times.items()),
          flush=True)
    for n, t in times.items():
      totals[n] = totals.get(n, 0.0) + t
  print("total (ms): " + "  ".join(f"{n} {t:.1f}" for n, t in totals.items()))


if __name__ == "__main__":
  main()
