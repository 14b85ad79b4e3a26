"""Which implementation kdjax's convolutions and BatchNorm trace: the CPU fast paths or stock JAX.

kdjax's layers have CPU fast paths (``kdjax.models.conv``: oneDNN convolutions and hand-written gradient rules;
``kdjax.models.batch_norm``: per-channel sums as dot products with a hand-written VJP). Each is a
``jax.custom_vjp`` function, so it defines reverse-mode derivatives only. They pay off on XLA:CPU alone; on a
GPU or TPU the stock ``lax`` convolution and a Flax-equivalent BatchNorm are what cuDNN/XLA optimise, and
they are differentiable in every mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``, Hessian-vector
products). So the path is chosen *when a layer is traced*, before any custom derivative is entered:

* mode ``auto`` (default): the fast paths when the program being traced runs on CPU, stock JAX otherwise.
  The platform is the one set by :func:`platform` (kdjax's trainer sets its mesh's platform around
  everything it traces), else ``jax.default_backend()``.
* mode ``stock``: stock JAX everywhere, CPU included (``KDJAX_KERNELS=stock`` or ``with use("stock"):``) —
  the way to run forward-mode autodiff on CPU, and how the tests exercise the accelerator path on CPU.

Like ``jax.default_matmul_precision``, both act at trace time: a function jitted and traced before a block
keeps what it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import jax

__all__ = ["ENV", "MODES", "describe", "fast_paths", "forward_mode_guard", "mode", "platform", "target_devices",
           "target_platform", "use"]

ENV = "KDJAX_KERNELS"
MODES = ("auto", "stock")

_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdjax_kernels_mode", default=None)
_platform: contextvars.ContextVar[tuple[str, int | None] | None] = contextvars.ContextVar("kdjax_kernels_platform",
                                                                                       default=None)


def mode() -> str:
  """The mode in force: ``use(...)``'s, else ``$KDJAX_KERNELS``, else ``auto``."""
  if _mode.get() is not None:
    return _mode.get()
  raw = os.environ.get(ENV, "").strip().lower() or "auto"
  if raw not in MODES:
    raise ValueError(f"{ENV}={raw!r}: expected one of {', '.join(MODES)}")
  return raw


def _check(name: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(f"kernel {name} {value!r}: expected one of {', '.join(choices)}")


@contextlib.contextmanager
def use(new_mode: str) -> Iterator[None]:
  """Within the block, layers *traced* there take ``new_mode``'s path (``"auto"`` or ``"stock"``)."""
  _check("mode", new_mode, MODES)
  token = _mode.set(new_mode)
  try:
    yield
  finally:
    _mode.reset(token)


@contextlib.contextmanager
def platform(name: str, *, devices: int | None = None) -> Iterator[None]:
  """Within the block, programs traced there are taken to run on ``name`` (``"cpu"``, ``"gpu"``, ``"tpu"``...),
  over ``devices`` devices (``None``: every device of the process) — what kdjax's trainer sets from its mesh."""
  token = _platform.set((str(name), devices))
  try:
    yield
  finally:
    _platform.reset(token)


def target_platform() -> str:
  """The platform of the program being traced: :func:`platform`'s, else ``jax.default_backend()``."""
  return _platform.get()[0] if _platform.get() else jax.default_backend()


def target_devices() -> int:
  """The device count of the program being traced: :func:`platform`'s, else every device of the process."""
  given = _platform.get()[1] if _platform.get() else None
  return given if given is not None else jax.device_count()


def fast_paths() -> bool:
  """Whether a layer traced now takes the CPU fast paths (custom VJPs) rather than stock JAX."""
  return mode() == "auto" and target_platform() == "cpu"


def forward_mode_guard(function, *args):
  """Calls the custom-VJP ``function``; a forward-mode trace gets an error that says how to avoid the fast path.

  JAX raises its own ``TypeError`` when ``jax.jvp``/``jax.jacfwd`` meets a ``custom_vjp`` function directly;
  when the function is inside a ``jax.jit`` that forward mode differentiates, JAX raises that error from its
  own frames and its message is unchanged — the remedy is the same.
  """
  try:
    return function(*args)
  except TypeError as e:
    if "forward-mode" not in str(e):
      raise
    raise TypeError(f"{e} kdjax's CPU fast paths (oneDNN convolutions, custom convolution gradients, fast "
                    "BatchNorm) define reverse-mode derivatives only; for jax.jvp / jax.jacfwd / jax.linearize trace "
                    f"the model with stock JAX layers: `with kdjax.models.kernels.use('stock'):` or {ENV}=stock "
                    "(the default on GPU/TPU).") from None


def describe(platform_name: str | None = None, *, devices: int | None = None) -> dict[str, str]:
  """What a program traced now on ``platform_name`` (default: as :func:`fast_paths` sees it) computes with.

  ``{"platform", "kernels", "convolution", "batch_norm"}``, as recorded in a run's ``config.json`` and
  ``results.json``. ``devices``: the program's device count (oneDNN needs exactly one CPU device).
  """
  from kdjax.models import onednn
  name = platform_name or target_platform()
  fast = mode() == "auto" and name == "cpu"
  if not fast:
    conv, bn = "stock lax.conv_general_dilated", "stock (Flax-equivalent batch statistics)"
  else:
    bn = "kdjax CPU (per-channel sums as dot products, custom VJP)"
    uses_onednn = onednn.would_use(devices=devices if devices is not None else target_devices())
    conv = (f"oneDNN {onednn.status()['onednn_version']} (float32 NHWC), else XLA" if uses_onednn
            else "XLA with kdjax's CPU gradient rules (stride-2 3x3, 1x1)")
  return {"platform": name, "kernels": mode(), "convolution": conv, "batch_norm": bn}
