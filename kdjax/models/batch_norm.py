"""BatchNorm whose per-channel batch reductions are fast on XLA:CPU.

A drop-in for ``flax.linen.BatchNorm`` as the models use it (feature axis last, statistics over every
other axis, same parameter names ``scale``/``bias`` and statistics ``mean``/``var``, same running-average
update and "fast variance" ``E[x²] − E[x]²``), so checkpoints and parameter trees are unchanged.

Why it exists (measured, ``benchmarks/README.md``): XLA:CPU lowers a column reduction — the sum over
``[N·H·W]`` for each channel of an NHWC map — to a loop that runs several times slower than memory bandwidth
allows (3.9 ms for a 64×32×32×64 float32 map against 0.8 ms for one elementwise pass), and a training-mode
BatchNorm needs four of them per layer (mean and mean square forward; the bias and scale gradients backward,
which autodiff writes as reductions over the broadcast axes). The same sum written as a matrix-vector product
``ones[P] @ x[P, C]`` runs at memory speed on CPU. ``batch_norm_train`` therefore computes every per-channel
sum as such a product, and its hand-written VJP does the same for the backward pass; on other platforms
(`jax.lax.platform_dependent`) it uses plain sums, because a float32 dot there may run in TF32.

On the stock path (any non-CPU platform, or ``KDJAX_KERNELS=stock``; :mod:`kdjax.models.kernels`, decided at
trace time) the training-mode statistics are plain means with no custom derivative rule — what
``flax.linen.BatchNorm`` computes (its "fast variance" ``E[x²] − E[x]²``, clipped at 0) — so forward-mode
autodiff works there.

The backward rule is the textbook BatchNorm gradient (Ioffe & Szegedy 2015, §3) with batch statistics::

  x̂ = (x − μ) / σ,   y = γ x̂ + β
  ∂β = Σ g,   ∂γ = Σ g x̂,   ∂x = γ / (σ P) · (P g − ∂β − x̂ ∂γ)

where sums run over the ``P`` positions of each channel. The rule is written in JAX operations, so
``jax.grad`` of a function of ``jax.grad`` (gradient-based attention transfer) differentiates through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import kernels

__all__ = ["BatchNorm", "batch_norm_train", "batch_norm_train_stock", "channel_sums"]


def _sums_by_dot(x2: jax.Array) -> jax.Array:
  ones = jnp.ones((x2.shape[0],), x2.dtype)
  return jnp.dot(ones, x2, precision=jax.lax.Precision.HIGHEST)


def _sums_by_reduce(x2: jax.Array) -> jax.Array:
  return jnp.sum(x2, axis=0)


def channel_sums(x: jax.Array) -> jax.Array:
  """Per-channel sum over every axis but the last: ``[..., C] -> [C]`` (a dot on CPU, a reduce elsewhere)."""
  x2 = x.reshape(-1, x.shape[-1])
  return jax.lax.platform_dependent(x2, cpu=_sums_by_dot, default=_sums_by_reduce)


def _normalize(x, mean, inv_std, scale, bias):
  """``(x − μ) · (γ / σ) + β`` in float32 (training and evaluation alike)."""
  return (x.astype(jnp.float32) - mean) * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)


def _forward(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  positions = x32.size // x32.shape[-1]
  mean = channel_sums(x32) / positions
  var = jnp.maximum(channel_sums(x32 * x32) / positions - mean * mean, 0.0)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return (_normalize(x32, mean, inv_std, scale, bias), mean, var), (x, mean, inv_std, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float = 1e-5):
  """Training-mode BatchNorm over all axes but the last.

  Args:
    x: ``[..., C]`` activations (any float dtype; statistics are computed in float32).
    scale: ``[C]`` γ.
    bias: ``[C]`` β.
    epsilon: added to the variance.

  Returns:
    ``(y, mean, var)``: ``y`` float32 with the shape of ``x``; the batch ``mean`` and biased ``var``
    (``[C]``, float32) for the running averages.
  """
  return _forward(x, scale, bias, epsilon)[0]


def _batch_norm_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inv_std, scale = residuals
  g, g_mean, g_var = (c.astype(jnp.float32) for c in cotangents)
  positions = g.size // g.shape[-1]
  x_hat = (x.astype(jnp.float32) - mean) * inv_std
  d_bias = channel_sums(g)
  d_scale = channel_sums(g * x_hat)
  d_x = (scale.astype(jnp.float32) * inv_std / positions) * (positions * g - d_bias - x_hat * d_scale)
  # The statistics' own cotangents (zero when, as in BatchNorm, they only feed the running averages).
  d_x = d_x + (g_mean + 2.0 * g_var * x_hat / inv_std) / positions
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


batch_norm_train.defvjp(_forward, _batch_norm_bwd)  # _forward returns (outputs, residuals)


def batch_norm_train_stock(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float = 1e-5):
  """:func:`batch_norm_train` in stock JAX operations (Flax's statistics; autodiff in every mode)."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x32, axis=axes)
  var = jnp.maximum(jnp.mean(x32 * x32, axis=axes) - mean * mean, 0.0)
  return _normalize(x32, mean, jax.lax.rsqrt(var + epsilon), scale, bias), mean, var


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` (feature axis −1) with CPU-fast batch statistics; see the module docstring.

  Attributes:
    use_running_average: normalise with the running statistics (evaluation) instead of the batch's.
    momentum: running-average decay (``0.9`` = PyTorch's ``momentum=0.1``).
    epsilon: added to the variance.
    dtype: output dtype; default: the promoted dtype of the input and the parameters.
    param_dtype: dtype of ``scale`` and ``bias``.
    scale_init, bias_init: initialisers of γ and β.

  Data parallelism: under ``jax.jit`` over a mesh the batch statistics are over the *global* batch (the
  compiler inserts the cross-device sums), as with Flax's module under ``jit``.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    out_dtype = self.dtype or jnp.result_type(x, scale)

    if use_running_average:
      return _normalize(x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon), scale, bias).astype(out_dtype)

    if kernels.fast_paths():  # decided before the custom VJP is entered
      y, mean, var = kernels.forward_mode_guard(batch_norm_train, x, scale, bias, self.epsilon)
    else:
      y, mean, var = batch_norm_train_stock(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient((mean, var))
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y.astype(out_dtype)
