"""kdjax: knowledge-distillation papers reimplemented in JAX/Flax.

Import the pure losses from :mod:`kdjax.methods`, the models from :mod:`kdjax.models`,
the input pipeline from :mod:`kdjax.data`, and the training pieces from :mod:`kdjax.train`.
"""

import os as _os

__version__ = "0.1.0"


def _xla_cpu_defaults() -> None:
  """Turns off XLA:CPU's YNNPACK fusions unless the user chose (``benchmarks/README.md``, issue 3).

  On jaxlib 0.10 (the only version it is set for) XLA:CPU hands convolutions, dots and the
  elementwise/reduction ops around them to YNNPACK as large fused subgraphs; for the CIFAR ResNet
  train steps that is 1.2-1.7x slower than XLA's own (Eigen) convolutions and loop fusions. Only
  effective if set before JAX starts its CPU backend; an ``XLA_FLAGS`` that already names the option,
  or ``KDJAX_XLA_CPU_DEFAULTS=0``, is kept.
  """
  if _os.environ.get("KDJAX_XLA_CPU_DEFAULTS", "1") == "0":
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  try:  # older jaxlibs abort on flags they do not know
    from importlib.metadata import version
    major, minor = (int(p) for p in version("jaxlib").split(".")[:2])
  except Exception:  # noqa: BLE001 - no jaxlib metadata: leave the flags alone
    return
  if (major, minor) == (0, 10):  # measured on 0.10 only; later jaxlibs may rename or drop the flag
    _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_xla_cpu_defaults()
