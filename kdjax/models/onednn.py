"""oneDNN convolutions inside jitted JAX programs on CPU (XLA FFI custom calls).

XLA:CPU computes convolutions and their two gradients with Eigen. On the CIFAR ResNet layers of the
KD benchmark (batch 64, 2 cores, ``python benchmarks/conv_layers.py``) oneDNN — the library behind
PyTorch's CPU convolutions — is faster on every 3×3 pass (forward and input gradient 1.2–1.6×, stride-2
input gradient 3.8×, filter gradient 1.1–1.9×) and on 1×1 filter gradients (2.5–5×), a little slower on
1×1 forward and input-gradient passes (by up to 2 ms); that kept kdjax's KD step below PyTorch's eager one
(issue 3). This module puts oneDNN's kernels inside the XLA program:

* ``onednn_conv.cc`` (beside this file) defines three XLA FFI handlers — forward, backward-data and
  backward-weights convolution, float32, NHWC activations, HWIO kernels, any strides and explicit
  paddings — and caches one oneDNN primitive per shape.
* It is compiled by :func:`prepare` — before anything is traced: ``kdjax train``/``reproduce`` call it when
  they set up a stage, a library user calls it once — never from inside a trace, with the system C++
  compiler (``$CXX``, else ``c++``) against jaxlib's FFI headers and the ``onednn-cpu-gomp``/
  ``onednn-devel-cpu-gomp`` wheels (kdjax's dependencies on Linux x86-64), into ``$KDJAX_CACHE_DIR``
  (default ``~/.cache/kdjax``), keyed by the source, the compiler and flags, and the jaxlib and oneDNN
  versions, so it is built once per machine and per upgrade (about 5 s).
* :func:`conv` and the two gradient functions form a closed set of ``jax.custom_vjp`` functions — the
  derivative of each is a combination of the others — so gradients of any order (gradient-based
  attention transfer differentiates through the input gradient) run on oneDNN too. ``jax.jvp`` is not
  available, as for any ``custom_vjp`` function. Under ``vmap`` the calls run one batch element after
  another.

:func:`kdjax.models.conv.conv_general_dilated` (every kdjax model's convolution) calls it when
:func:`use_for` says so: policy ``auto`` (the default) uses oneDNN for float32 NHWC convolutions when
the program runs on a single CPU device and :func:`prepare` has loaded the library (a trace never builds
it: unprepared, ``auto`` uses XLA's convolutions and warns once). With several devices, a custom call
inside a sharded program would be replicated rather than split by XLA's partitioner, so there XLA's own
convolutions stay (several *host* devices on one CPU are a testing setup; they were also slower than one device using
every core). ``KDJAX_ONEDNN=0`` (or ``policy("off")``) turns it off; ``KDJAX_ONEDNN=1`` forces it,
raising if it cannot be built. Where it cannot be built under ``auto`` (no compiler, no oneDNN wheel,
another platform) kdjax warns once and uses XLA's convolutions; :func:`status` says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator

import jax
import numpy as np

__all__ = ["active_policy", "available", "conv", "conv_backward_data", "conv_backward_weights", "policy", "prepare",
           "status", "use_for", "would_use"]

_SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
_HANDLERS = {"kdjax_onednn_conv_forward": "KdjaxOnednnConvForward",
             "kdjax_onednn_conv_backward_data": "KdjaxOnednnConvBackwardData",
             "kdjax_onednn_conv_backward_weights": "KdjaxOnednnConvBackwardWeights"}
_POLICIES = ("auto", "on", "off")
_ENV_POLICY = {"": "auto", "auto": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off",
               "false": "off"}


class OnednnUnavailableError(RuntimeError):
  """oneDNN convolutions were required (``KDJAX_ONEDNN=1`` or ``policy("on")``) but cannot be built."""


# ------------------------------------------------------------------ building and loading


def _dist_file(distribution: str, suffix: str) -> pathlib.Path | None:
  from importlib import metadata
  try:
    files = metadata.files(distribution) or []
  except metadata.PackageNotFoundError:
    return None
  for f in files:
    if str(f).replace(os.sep, "/").endswith(suffix):
      path = pathlib.Path(f.locate()).resolve()
      if path.exists():
        return path
  return None


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
  """(include directory, ``libdnnl.so.3``) from ``$KDJAX_ONEDNN_ROOT`` or the oneDNN wheels."""
  root = os.environ.get("KDJAX_ONEDNN_ROOT")
  if root:
    include, library = pathlib.Path(root, "include"), pathlib.Path(root, "lib", "libdnnl.so.3")
  else:
    header = _dist_file("onednn-devel-cpu-gomp", "/oneapi/dnnl/dnnl.hpp")
    library = _dist_file("onednn-cpu-gomp", "/libdnnl.so.3")
    if header is None or library is None:
      missing = [d for d, f in (("onednn-devel-cpu-gomp", header), ("onednn-cpu-gomp", library)) if f is None]
      raise OnednnUnavailableError(f"the oneDNN wheels are not installed (missing: {', '.join(missing)}; "
                                   "`pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0`, "
                                   "or set KDJAX_ONEDNN_ROOT to a oneDNN 3.x install with include/ and lib/)")
    include = header.parents[2]
  if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists() or not library.exists():
    raise OnednnUnavailableError(f"no oneDNN headers under {include} or no library at {library}")
  return include, library


def _version(distribution: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(distribution)
  except metadata.PackageNotFoundError:
    return ""


def _onednn_identity(include: pathlib.Path) -> str:
  """The oneDNN the library is built against: the wheels' versions and the version header's contents (a
  ``$KDJAX_ONEDNN_ROOT`` install has no wheel), so an upgraded oneDNN gets its own build."""
  header = include / "oneapi" / "dnnl" / "dnnl_version.h"
  text = header.read_text() if header.exists() else ""
  return "\0".join([_version("onednn-cpu-gomp"), _version("onednn-devel-cpu-gomp"), text])


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("KDJAX_CACHE_DIR")
  if not root:
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kdjax")
  return pathlib.Path(root) / "onednn"


def _library_path(include: pathlib.Path, command: list[str]) -> pathlib.Path:
  """Where the library built with ``command`` against the oneDNN at ``include`` is cached: the name hashes the
  source, jaxlib's version, oneDNN's identity and the command, so a change to any of them builds anew."""
  key = hashlib.sha256("\0".join([_SOURCE.read_text(), _version("jaxlib"), _onednn_identity(include), *command])
                       .encode())
  return _cache_dir() / f"libkdjax_onednn_{key.hexdigest()[:16]}.so"


def _build() -> pathlib.Path:
  """Compiles ``onednn_conv.cc`` (once per source, compiler, jaxlib and oneDNN) and returns the library."""
  if not sys.platform.startswith("linux"):
    raise OnednnUnavailableError(f"oneDNN convolutions are built on Linux only (this is {sys.platform})")
  include, library = _find_onednn()
  cxx = os.environ.get("CXX") or "c++"
  if shutil.which(cxx) is None:
    raise OnednnUnavailableError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
  jax_include = pathlib.Path(jax.ffi.include_dir())
  flags = ["-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax_include}", f"-I{include}"]
  link = [str(library), f"-Wl,-rpath,{library.parent}"]  # found again at load time through the rpath
  target = _library_path(include, [cxx, *flags, *link])
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent builders (pytest-xdist workers) never see half a file.
  fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    command = [cxx, *flags, str(_SOURCE), "-o", partial, *link]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
      tail = "\n".join(done.stderr.strip().splitlines()[-15:])
      raise OnednnUnavailableError(f"compiling {_SOURCE.name} failed ({' '.join(command)}):\n{tail}")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _load() -> None:
  """Builds, loads and registers the handlers once per process; raises OnednnUnavailableError."""
  with _lock:
    if "error" in _loaded:
      raise _loaded["error"]
    if "library" in _loaded:
      return
    try:
      path = _build()
      library = ctypes.CDLL(str(path))
      for target, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
      version = library.KdjaxOnednnVersion()
    except OnednnUnavailableError as e:
      _loaded["error"] = e
      raise
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
      _loaded["error"] = OnednnUnavailableError(f"loading the oneDNN convolutions failed: {e}")
      raise _loaded["error"] from e
    _loaded["library"] = library
    _loaded["path"] = path
    _loaded["version"] = f"{version // 10000}.{version // 100 % 100}.{version % 100}"


def prepare() -> bool:
  """Builds (once per machine) and loads the oneDNN convolutions, outside any trace; whether they are usable.

  Call it before tracing a model that should use them (``kdjax train``/``reproduce`` do, when their program
  runs on one CPU device); :func:`status` says why not when it returns False.
  """
  return available()


def available() -> bool:
  """Whether the oneDNN convolutions can be used in this process (builds them on the first call: call it,
  or :func:`prepare`, outside a trace)."""
  try:
    _load()
  except OnednnUnavailableError:
    return False
  return True


def status() -> dict[str, str | None]:
  """The policy in force, and the built library and oneDNN version or why there is none."""
  ok = available()
  return {"policy": _current_policy(), "library": str(_loaded.get("path")) if ok else None,
          "onednn_version": _loaded.get("version") if ok else None,
          "unavailable_because": None if ok else str(_loaded["error"])}


# ------------------------------------------------------------------ when to use it

# Set by ``policy(...)``; a context variable, so threads and async tasks each see their own.
_policy_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdjax_onednn_policy", default=None)


def active_policy() -> str:
  """The policy in force: ``policy(...)``'s, else ``$KDJAX_ONEDNN``'s, else ``auto``."""
  return _current_policy()


def _current_policy() -> str:
  if _policy_override.get() is not None:
    return _policy_override.get()
  raw = os.environ.get("KDJAX_ONEDNN", "").strip().lower()
  if raw not in _ENV_POLICY:
    raise ValueError(f"KDJAX_ONEDNN={raw!r}: expected one of auto, 1/on, 0/off")
  return _ENV_POLICY[raw]


@contextlib.contextmanager
def policy(mode: str) -> Iterator[None]:
  """Within the block, functions *traced* there use oneDNN per ``mode``: ``auto``, ``on`` or ``off``.

  It acts at trace time: a function jitted and traced before the block keeps what it was traced with.
  """
  if mode not in _POLICIES:
    raise ValueError(f"oneDNN policy {mode!r}: expected one of {', '.join(_POLICIES)}")
  if mode == "on":
    available()  # build now, outside the trace; if it cannot be built, use_for raises the reason
  token = _policy_override.set(mode)
  try:
    yield
  finally:
    _policy_override.reset(token)


_warned: list[bool] = []


def _not_prepared() -> str:
  return ("the oneDNN convolutions were not built before tracing: call kdjax.models.onednn.prepare() first "
          "(kdjax train and reproduce do)")


def would_use(*, devices: int) -> bool:
  """Whether a program on ``devices`` CPU device(s), traced now, would send float32 NHWC convolutions to oneDNN."""
  mode = _current_policy()
  if mode == "off" or (mode == "auto" and devices != 1):
    return False
  return "library" in _loaded


def use_for(x_shape, w_shape, strides, padding, dtype) -> bool:
  """Whether a convolution traced now, with these shapes (NHWC/HWIO) and dtype, goes to oneDNN.

  Never builds the library (that is :func:`prepare`'s job, outside any trace).
  """
  mode = _current_policy()
  if mode == "off":
    return False
  shape_ok = (len(x_shape) == 4 and len(w_shape) == 4 and x_shape[3] == w_shape[2]
              and np.dtype(dtype) == np.float32 and min(*x_shape, *w_shape) > 0
              and all(p >= 0 for pair in padding for p in pair)
              and all(o > 0 for o in _output_hw(x_shape, w_shape, strides, padding)))
  if mode == "auto":
    from kdjax.models import kernels  # the program's platform and devices (the trainer's mesh), else the process's
    if not (shape_ok and kernels.target_devices() == 1 and kernels.target_platform() == "cpu"):
      return False
    if "library" not in _loaded:
      if not _warned:
        _warned.append(True)
        reason = _loaded["error"] if "error" in _loaded else _not_prepared()
        warnings.warn(f"kdjax: using XLA's CPU convolutions, not oneDNN's: {reason}", stacklevel=3)
      return False
    return True
  if not shape_ok:
    return False
  if "error" in _loaded:  # "on": the reason it could not be built
    raise _loaded["error"]
  if "library" not in _loaded:
    raise OnednnUnavailableError(f"KDJAX_ONEDNN=1 / policy('on'): {_not_prepared()}")
  return True


# ------------------------------------------------------------------ the three convolutions


def _output_hw(x_shape, w_shape, strides, padding) -> tuple[int, int]:
  return tuple((x_shape[1 + i] + padding[i][0] + padding[i][1] - w_shape[i]) // strides[i] + 1 for i in range(2))


def _call(target: str, shape, dtype, a, b, strides, padding):
  (pt, pb), (pl, pr) = padding
  attrs = {"sh": strides[0], "sw": strides[1], "pt": pt, "pb": pb, "pl": pl, "pr": pr}
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")
  return call(a, b, **{k: np.int64(v) for k, v in attrs.items()})


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
  """``lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))``.

  Args:
    x: [N, H, W, C] float32 input.
    w: [KH, KW, C, O] float32 kernel.
    strides: (row, column) strides.
    padding: ((top, bottom), (left, right)) zero padding, non-negative.

  Returns:
    [N, OH, OW, O] float32, ``OH = (H + top + bottom − KH) // row_stride + 1`` (likewise OW).
  """
  oh, ow = _output_hw(x.shape, w.shape, strides, padding)
  return _call("kdjax_onednn_conv_forward", (x.shape[0], oh, ow, w.shape[3]), x.dtype, x, w, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_backward_data(g, w, x_shape: tuple[int, ...], strides, padding):
  """The input gradient of :func:`conv`: ``∂/∂x Σ conv(x, w) · g`` for an input of shape ``x_shape``."""
  return _call("kdjax_onednn_conv_backward_data", tuple(x_shape), g.dtype, g, w, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_backward_weights(x, g, w_shape: tuple[int, ...], strides, padding):
  """The kernel gradient of :func:`conv`: ``∂/∂w Σ conv(x, w) · g`` for a kernel of shape ``w_shape``."""
  if tuple(w_shape[:2]) == (1, 1) and tuple(strides) != (1, 1) and tuple(map(tuple, padding)) == ((0, 0), (0, 0)):
    # oneDNN 3.2's jit_1x1 AVX2 backward-weights kernel returns wrong values for some strided 1x1 shapes (e.g.
    # 8x8 input, 4 -> 6 channels, stride 2, measured on an AMD EPYC); a 1x1 convolution with stride s is the
    # stride-1 one on every s-th pixel, which takes another, correct kernel and does less work.
    oh, ow = g.shape[1:3]
    x, strides = x[:, :oh * strides[0]:strides[0], :ow * strides[1]:strides[1]], (1, 1)
  return _call("kdjax_onednn_conv_backward_weights", tuple(w_shape), x.dtype, x, g, strides, padding)


# Each function is bilinear, so each derivative is another of the three (c is the incoming cotangent):
#   conv(x, w):               ∂x = backward_data(c, w),    ∂w = backward_weights(x, c)
#   backward_data(g, w):      ∂g = conv(c, w),             ∂w = backward_weights(c, g)
#   backward_weights(x, g):   ∂x = backward_data(g, c),    ∂g = conv(x, c)


def _conv_fwd(x, w, strides, padding):
  return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, c):
  x, w = residuals
  return (conv_backward_data(c, w, x.shape, strides, padding),
          conv_backward_weights(x, c, w.shape, strides, padding))


def _data_fwd(g, w, x_shape, strides, padding):
  return conv_backward_data(g, w, x_shape, strides, padding), (g, w)


def _data_bwd(x_shape, strides, padding, residuals, c):
  g, w = residuals
  return conv(c, w, strides, padding), conv_backward_weights(c, g, w.shape, strides, padding)


def _weights_fwd(x, g, w_shape, strides, padding):
  return conv_backward_weights(x, g, w_shape, strides, padding), (x, g)


def _weights_bwd(w_shape, strides, padding, residuals, c):
  x, g = residuals
  return conv_backward_data(g, c, x.shape, strides, padding), conv(x, c, strides, padding)


conv.defvjp(_conv_fwd, _conv_bwd)
conv_backward_data.defvjp(_data_fwd, _data_bwd)
conv_backward_weights.defvjp(_weights_fwd, _weights_bwd)
