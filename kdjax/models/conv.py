"""2-D convolution of kdjax's models: oneDNN's kernels on CPU, else faster gradients for two slow cases.

Everything below is the *CPU fast path*. It is taken only when :func:`kdjax.models.kernels.fast_paths` says
so at trace time — a program for a CPU device, kernel mode ``auto`` — and otherwise (GPU, TPU, or
``KDJAX_KERNELS=stock``) the convolution is exactly ``jax.lax.conv_general_dilated``, with no custom
derivative rule, so forward-mode autodiff works there.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (pass it to
``flax.linen.Conv(conv_general_dilated=...)``). For a float32 NHWC/HWIO convolution without dilation or
groups it first asks :func:`kdjax.models.onednn.use_for` — by default: a program on one CPU device with
the oneDNN library built — and if so computes the convolution and all its derivatives with oneDNN's
kernels (``kdjax/models/onednn.py``), the fastest CPU path measured.

Otherwise (several devices, other dtypes, oneDNN turned off or unavailable) the forward pass is XLA's own
convolution, and so are the values of both gradients; only *how* two gradients are computed changes, for
the shapes where the profile of the CIFAR ResNet training step found XLA:CPU's transposed convolutions
slow (``benchmarks/README.md``, 64 × 32 × 32 inputs, 2 cores):

* **Input gradient of a stride-2 3×3 convolution with padding 1** (the first convolution of a ResNet
  stage). XLA expresses it as a convolution over the zero-dilated output gradient, which XLA:CPU runs
  through a single-threaded col2im (56 ms for 64 → 128 channels). Here it is split into the four
  output phases of the stride: even rows/even columns see only the kernel's centre tap, even/odd the
  centre row's two outer taps, and so on, so the gradient is four small stride-1 convolutions of the
  output gradient with sub-kernels, interleaved (26 ms, the same multiply-adds as the forward pass).
* **Kernel and input gradients of a 1×1 convolution** (ResNet projection shortcuts). The kernel gradient
  is one matrix product ``xᵀ g`` over all positions (4.5 ms against 12.5 ms for XLA's filter-gradient
  convolution, which first transposes both operands); the input gradient is ``g wᵀ`` scattered back to
  the strided positions by an interior-padded ``lax.pad``.

Everything else (other kernels, strides, paddings, dilations, grouped convolutions) goes to
``jax.lax.conv_general_dilated`` unchanged, gradients included. The backward rules are written in
differentiable JAX operations, so reverse-over-reverse differentiation (gradient-based attention
transfer) works; forward-mode differentiation (``jax.jvp``) of the fast path is not available, as for
any ``jax.custom_vjp`` function: the error says to trace with ``kernels.use("stock")``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kdjax.models import kernels, onednn

__all__ = ["Conv", "conv_general_dilated"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False
  expected = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  try:
    given = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
  except (TypeError, ValueError):
    return False
  return given == expected


def _plain(dilation) -> bool:
  return dilation is None or all(d == 1 for d in dilation)


def _conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision)


def _conv2d_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def _pointwise(x, w, g, strides, precision):
  """Both gradients of a 1×1, unpadded convolution as matrix products."""
  sh, sw = strides
  n, h, wd, cin = x.shape
  ho, wo, cout = g.shape[1], g.shape[2], g.shape[3]
  xs = x[:, ::sh, ::sw, :][:, :ho, :wo, :]
  d_w = jnp.dot(xs.reshape(-1, cin).T, g.reshape(-1, cout), precision=precision).reshape(w.shape)
  d_xs = jnp.dot(g, w[0, 0].T, precision=precision)  # [n, ho, wo, cin]
  zero = jnp.zeros((), d_xs.dtype)
  d_x = lax.pad(d_xs, zero, ((0, 0, 0), (0, h - 1 - (ho - 1) * sh, sh - 1), (0, wd - 1 - (wo - 1) * sw, sw - 1),
                             (0, 0, 0)))
  return d_x, d_w


def _stride2_input_grad(g, w, precision):
  """Input gradient of a 3×3, stride-2, padding-1 convolution on an even-sized input, by output phases.

  In one dimension the forward pass is ``y[m] = Σ_k x[2m + k − 1] w[k]``, so ``∂x[2m] = g[m] w[1]`` and
  ``∂x[2m + 1] = g[m] w[2] + g[m + 1] w[0]``; in two dimensions the four (row, column) parities combine
  these. Each parity is a stride-1 convolution of ``g`` with the transposed sub-kernel (padded by one at
  the bottom/right for the ``m + 1`` terms); the four results are interleaved into the input's grid.
  """
  wt = jnp.swapaxes(w, 2, 3)  # [3, 3, out, in]: convolve the output gradient back to input channels
  taps = {"even": (1,), "odd": (2, 0)}
  pads = {"even": (0, 0), "odd": (0, 1)}

  def phase(rows: str, cols: str):
    kernel = jnp.stack([jnp.stack([wt[r, c] for c in taps[cols]]) for r in taps[rows]])
    return lax.conv_general_dilated(g, kernel, (1, 1), (pads[rows], pads[cols]), dimension_numbers=_NHWC,
                                    precision=precision)

  top = jnp.stack([phase("even", "even"), phase("even", "odd")], axis=3)    # [n, ho, wo, 2, cin]
  bottom = jnp.stack([phase("odd", "even"), phase("odd", "odd")], axis=3)
  n, ho, wo, _, cin = top.shape
  return jnp.stack([top, bottom], axis=2).reshape(n, 2 * ho, 2 * wo, cin)


def _conv2d_bwd(strides, padding, precision, residuals, g):
  x, w = residuals

  def xla_rule(x, w, g):
    return jax.vjp(lambda x_, w_: _conv(x_, w_, strides, padding, precision), x, w)[1](g)

  def cpu_rule(x, w, g):
    if _pointwise_applies(w.shape, padding):
      return _pointwise(x, w, g, strides, precision)
    # The stride-2 3×3 case: phases for the input gradient, XLA's own filter-gradient convolution.
    d_w = jax.vjp(lambda w_: _conv(x, w_, strides, padding, precision), w)[1](g)[0]
    return _stride2_input_grad(g, w, precision), d_w

  # Only XLA:CPU needs the rewrite; GPUs and TPUs keep their own (cuDNN, ...) gradient kernels.
  return tuple(lax.platform_dependent(x, w, g, cpu=cpu_rule, default=xla_rule))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _stride2_applies(x_shape, w_shape, strides, padding) -> bool:
  return (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (2, 2)
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
          and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0)


def _pointwise_applies(w_shape, padding) -> bool:
  return tuple(w_shape[:2]) == (1, 1) and all(p == (0, 0) for p in padding)


def _fast_path(x_shape, w_shape, strides, padding) -> bool:
  return _pointwise_applies(w_shape, padding) or _stride2_applies(x_shape, w_shape, strides, padding)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """``jax.lax.conv_general_dilated``; on the CPU fast path, oneDNN where it applies, else faster gradients for two
  NHWC cases.

  See the module docstring.

  Same arguments and result as ``jax.lax.conv_general_dilated``.
  """
  simple = (_is_nhwc(dimension_numbers, lhs.ndim) and _plain(lhs_dilation) and _plain(rhs_dilation)
            and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None)
  if simple and kernels.fast_paths():  # decided before any custom VJP is entered
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
      pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if lhs.dtype == rhs.dtype and onednn.use_for(lhs.shape, rhs.shape, strides, pads, lhs.dtype):
      return kernels.forward_mode_guard(onednn.conv, lhs, rhs, strides, pads)
    if _fast_path(lhs.shape, rhs.shape, strides, pads):
      return kernels.forward_mode_guard(_conv2d, lhs, rhs, strides, pads, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type)


def Conv(*args, **kwargs) -> nn.Conv:  # noqa: N802 - stands in for the class flax.linen.Conv
  """``flax.linen.Conv(...)`` computing with :func:`conv_general_dilated`: every kdjax model's convolution.

  The same module (class, parameter names, auto-names ``Conv_0``…), so parameter trees and checkpoints are
  those of ``nn.Conv``; grouped or dilated convolutions fall through to ``lax`` as the function does.
  """
  return nn.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)
