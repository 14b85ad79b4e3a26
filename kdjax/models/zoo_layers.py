"""Layers shared by the ImageNet-scale model zoo (:mod:`~kdjax.models.server`,
:mod:`~kdjax.models.inception`, :mod:`~kdjax.models.ion`, :mod:`~kdjax.models.mobile`).

Everything is NHWC. Padding follows PyTorch's symmetric ``k // 2`` convention rather than
Flax's ``"SAME"``: with stride 2 on an even input ``"SAME"`` pads only bottom/right, which
shifts every strided layer by a pixel relative to the reference implementations (same shapes,
different numbers), and would make ported weights or golden values disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.batch_norm import BatchNorm
from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature

# He-normal over fan-out: what torchvision uses for the convolutions of ResNet, VGG,
# DenseNet and MobileNet, keeping activations' variance stable through ReLU stacks.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Padding = str | Sequence[tuple[int, int]] | None


def check_nhwc(model: nn.Module, x: jax.Array) -> None:
  """Raises a readable error unless ``x`` is an NHWC batch ``[B, H, W, C]``."""
  if x.ndim != 4:
    raise ValueError(f"{type(model).__name__} expects NHWC images [batch, H, W, C]; "
                     f"got shape {x.shape}")


def torch_padding(kernel: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """PyTorch-style symmetric padding ``k // 2`` on each side of each spatial axis."""
  return tuple((k // 2, k // 2) for k in kernel)


def batch_norm(train: bool, *, epsilon: float = 1e-5, name: str | None = None,
               scale_init: Callable = nn.initializers.ones) -> BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, ``epsilon`` 1e-5)."""
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                   scale_init=scale_init, name=name)


class PReLU(nn.Module):
  """Per-channel PReLU (``torch.nn.PReLU(C)``); Flax's ``nn.PReLU`` learns one shared slope.

  MobileFaceNet's parameter budget counts one slope per channel, hence this module.
  """
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("slope", nn.initializers.constant(self.init_slope), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "relu6": nn.relu6}


class ConvBN(nn.Module):
  """Bias-free convolution, BatchNorm, then an activation (``"relu"``, ``"relu6"``,
  ``"prelu"`` or ``None`` for a linear layer, e.g. MobileNetV2's projection).

  Attributes:
    features: output channels.
    kernel: ``(kh, kw)``.
    strides: int or ``(sh, sw)``.
    padding: ``None`` for PyTorch's symmetric ``k // 2``, else anything ``nn.Conv`` accepts.
    groups: ``feature_group_count`` (``features == groups == C_in`` is depthwise).
    act: activation name or ``None``.
    bn_epsilon: 1e-5 (PyTorch) by default; the Inception family uses 1e-3.
    zero_init_bn: initialise BN's scale to 0 (so a residual branch starts as identity).
  """
  features: int
  kernel: tuple[int, int] = (3, 3)
  strides: int | tuple[int, int] = 1
  padding: Padding = None
  groups: int = 1
  act: str | None = "relu"
  bn_epsilon: float = 1e-5
  zero_init_bn: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    padding = torch_padding(self.kernel) if self.padding is None else self.padding
    x = Conv(self.features, self.kernel, strides=strides, padding=padding,
             feature_group_count=self.groups, use_bias=False, kernel_init=conv_init,
             name="conv")(x)
    scale_init = nn.initializers.zeros if self.zero_init_bn else nn.initializers.ones
    x = batch_norm(train, epsilon=self.bn_epsilon, scale_init=scale_init, name="bn")(x)
    if self.act == "prelu":
      return PReLU(name="prelu")(x)
    if self.act is not None:
      return ACTIVATIONS[self.act](x)
    return x


def global_avg_pool(x: jax.Array) -> jax.Array:
  """``[B, H, W, C] -> [B, C]``."""
  return jnp.mean(x, axis=(1, 2))


def pooled_classifier(module: nn.Module, x: jax.Array, *, num_classes: int, train: bool, dropout: float = 0.0,
                      name: str = "fc") -> jax.Array:
  """The zoo's common head: global average pool, optional dropout, one dense layer named ``name``.

  Call it from a model's compact ``__call__`` (the layers become that model's submodules); it sows the
  ``pooled`` (``[B, C]``) and ``logits`` features on ``module``.
  """
  x = global_avg_pool(x)
  sow_feature(module, "pooled", x)
  if dropout:
    x = nn.Dropout(dropout, deterministic=not train)(x)
  logits = nn.Dense(num_classes, name=name)(x)
  sow_feature(module, "logits", logits)
  return logits


def vgg_fc_head(module: nn.Module, x: jax.Array, *, fc_features: int, num_classes: int, dropout: float,
                train: bool) -> jax.Array:
  """VGG's classifier (shared by VGG-16 and ION): flatten, fc6 and fc7 (ReLU, dropout), then ``classifier``.

  Call it from a model's compact ``__call__``; it sows fc7's output as ``embedding`` and ``logits``.
  """
  x = x.reshape(x.shape[0], -1)
  for name in ("fc6", "fc7"):
    x = nn.relu(nn.Dense(fc_features, name=name)(x))
    if name == "fc7":
      sow_feature(module, "embedding", x)
    x = nn.Dropout(dropout, deterministic=not train)(x)
  logits = nn.Dense(num_classes, name="classifier")(x)
  sow_feature(module, "logits", logits)
  return logits


def _bins(size: int, out: int) -> list[tuple[int, int]]:
  """PyTorch's adaptive-pooling bins: ``[floor(i*size/out), ceil((i+1)*size/out))``."""
  return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_pool(x: jax.Array, output_size: tuple[int, int],
                  reduce: Callable[..., jax.Array] = jnp.mean) -> jax.Array:
  """Adaptive pooling (``nn.AdaptiveAvgPool2d`` / ``AdaptiveMaxPool2d`` semantics).

  ``[B, H, W, C] -> [B, oh, ow, C]``. When ``H < oh`` the bins overlap and values repeat (how
  torchvision's VGG accepts 32x32 inputs: its 1x1 conv5 map becomes a constant 7x7 grid).
  ``reduce`` is ``jnp.mean`` (average) or ``jnp.max`` (max, i.e. ROI pooling of the whole map).
  """
  b, h, w, c = x.shape
  oh, ow = output_size
  if (h, w) == (oh, ow):
    return x
  if h % oh == 0 and w % ow == 0:  # equal, non-overlapping bins: one reshape
    return reduce(x.reshape(b, oh, h // oh, ow, w // ow, c), axis=(2, 4))
  # Each bin is a rectangle (row interval x column interval), and both the mean and the max
  # over a rectangle factor into a reduction over its rows then over its columns: pooling
  # rows then columns needs oh + ow slices instead of oh * ow.
  x = jnp.stack([reduce(x[:, h0:h1], axis=1) for h0, h1 in _bins(h, oh)], axis=1)
  return jnp.stack([reduce(x[:, :, w0:w1], axis=2) for w0, w1 in _bins(w, ow)], axis=2)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Max pooling with PyTorch's ``ceil_mode=True`` (the last window may hang off the edge).

  Used where the reference network does so (GoogLeNet, SENet's stem), so feature-map sizes match
  for every input size, not just 224.
  """
  def extra(size):
    out = math.ceil((size + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= size + padding:  # PyTorch drops a window starting in the padding
      out -= 1
    return (out - 1) * stride + window - size - padding
  pads = ((padding, extra(x.shape[1])), (padding, extra(x.shape[2])))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle: view channels as ``[groups, C/groups]``, transpose, flatten.

  Lets the next grouped convolution see channels from every group of the previous one.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h, w, groups, c // groups).swapaxes(3, 4).reshape(b, h, w, c)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds a scaled channel count to a multiple of ``divisor`` (MobileNetV2's rule), never
  going below 90% of ``value``."""
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis``.

  The clamp is applied to the squared norm so the gradient stays finite at ``x = 0`` (a ReLU
  map can be all zero at a position), where ``d sqrt / d s`` would be infinite.
  """
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))

