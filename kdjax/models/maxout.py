"""Maxout layers (Goodfellow et al. 2013) and the FitNets MNIST maxout nets (Romero et al. 2015).

A maxout unit is the maximum of ``k`` affine "pieces": a maxout conv layer with ``C`` output
channels is a conv to ``k*C`` channels followed by a max over each group of ``k``. The pieces of
one unit are *consecutive* channels (unit ``c`` = max of channels ``c*k .. c*k + k-1``), the
grouping pylearn2 uses (``z[i::k]`` over pieces ``i``), so kernels map one-to-one.

The FitNets MNIST nets follow the paper's §4 / appendix (teacher: maxout conv 48-48-24; FitNet: six
maxout convs 16-16-16-16-12-12, pooling after every second) with the kernel sizes, paddings and
overlapping pools of the pylearn2 configurations (Goodfellow's ``scripts/papers/maxout/mnist.yaml``
for the teacher, ``FitNets/yaml/MNIST_fitnet_valid.yaml`` in net-titech/distillation for the
student). pylearn2 pools in "ceil mode": a last, partial window is kept at the bottom/right edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register


def maxout_pieces(x: jax.Array, pieces: int) -> jax.Array:
  """Max over consecutive groups of ``pieces`` channels: ``[..., C*pieces] -> [..., C]``."""
  if x.shape[-1] % pieces:
    raise ValueError(f"maxout: {x.shape[-1]} channels are not a multiple of {pieces} pieces")
  return x.reshape(*x.shape[:-1], x.shape[-1] // pieces, pieces).max(axis=-1)


class Maxout(nn.Module):
  """Maxout convolution: conv to ``features * pieces`` channels, then max over the pieces.

  Input ``[B, H, W, C_in]``, output ``[B, H', W', features]`` (``H'`` as for the conv).
  ``pieces=1`` is a plain linear conv.
  """
  features: int
  pieces: int = 2
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    z = Conv(self.features * self.pieces, tuple(self.kernel_size), strides=tuple(self.strides),
             padding=self.padding, use_bias=self.use_bias, kernel_init=self.kernel_init,
             name="conv")(x)
    return maxout_pieces(z, self.pieces)


class MaxoutDense(nn.Module):
  """Fully connected maxout layer: ``[B, D] -> [B, features]`` via ``features * pieces`` affine units."""
  features: int
  pieces: int = 2
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    z = nn.Dense(self.features * self.pieces, kernel_init=self.kernel_init, name="dense")(x)
    return maxout_pieces(z, self.pieces)


def max_pool_ceil(x: jax.Array, size: int, stride: int) -> jax.Array:
  """Max pooling with pylearn2 / cuda-convnet output size ``ceil((n - size) / stride) + 1``.

  The overhanging last window is padded with ``-inf`` so it takes the max of the pixels it covers.
  ``[B, H, W, C] -> [B, H', W', C]``.
  """
  if size == 1 and stride == 1:
    return x
  pads = []
  for n in x.shape[1:3]:
    out = math.ceil(max(n - size, 0) / stride) + 1
    pads.append((0, max((out - 1) * stride + size - n, 0)))
  return nn.max_pool(x, (size, size), strides=(stride, stride), padding=pads)


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  """``U(-bound, bound)``, pylearn2's ``irange`` initialisation."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class MaxoutConvNet(nn.Module):
  """A stack of maxout conv layers, each optionally followed by an overlapping max pool, then a
  linear softmax layer on the flattened map (the pylearn2 ``MLP`` of the maxout/FitNets papers).

  ``layers`` holds one ``(channels, pieces, kernel, padding, pool_size, pool_stride)`` tuple per
  layer (``pool_size=1`` means no pooling). Biases are tied (one per channel). Kernels start
  from ``U(-init_range, init_range)`` and biases at 0, pylearn2's ``irange`` initialisation
  (0.005 in the FitNets configurations).

  Features: ``layer1 .. layerN``: ``[B, H_i, W_i, channels_i]`` each layer's output after maxout
  and pooling (the paper's 1-based layer numbering; FitNets' MNIST hint pairs student ``layer4``
  with teacher ``layer2``); ``logits``: ``[B, num_classes]``.
  """
  layers: Sequence[tuple[int, int, int, int, int, int]]
  num_classes: int = 10
  dropout_input: float = 0.0
  dropout_hidden: float = 0.0
  init_range: float = 0.005

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"{type(self).__name__} expects NHWC input [batch, H, W, C]; got shape {x.shape}")
    x = nn.Dropout(self.dropout_input, deterministic=not train)(x)
    init = _symmetric_uniform(self.init_range)
    for i, (channels, pieces, kernel, pad, pool_size, pool_stride) in enumerate(self.layers):
      x = Maxout(channels, pieces, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                 kernel_init=init, name=f"maxout{i + 1}")(x)
      x = max_pool_ceil(x, pool_size, pool_stride)
      sow_feature(self, f"layer{i + 1}", x)
      x = nn.Dropout(self.dropout_hidden, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, kernel_init=init, name="softmax")(x)
    sow_feature(self, "logits", logits)
    return logits


# Goodfellow et al.'s MNIST conv maxout net (kernels 8/8/5, pads 0/3/3, pools 4/2, 4/2, 2/2) with
# 2 pieces in every layer, as the FitNets paper describes its teacher (PAPERS.md §3(c)). With tied
# biases this has 361,066 parameters = the paper's "~361K" (Goodfellow's yaml uses 4 pieces in the
# third layer, 418,714 tied; with its default untied per-position biases, 471,994).
FITNET_MNIST_TEACHER = ((48, 2, 8, 0, 4, 2), (48, 2, 8, 3, 4, 2), (24, 2, 5, 3, 2, 2))
# The FitNets MNIST student (net-titech/distillation ``MNIST_fitnet_valid.yaml``: kernels
# 5/3/5/3/3/3, pads 0/0/3/0/3/0, pools after layers 2, 4, 6) with 2 pieces everywhere: 30,130
# parameters with tied biases = the paper's "~30K" (the yaml gives layers 5-6 four pieces: 36,226).
FITNET_MNIST_STUDENT = ((16, 2, 5, 0, 1, 1), (16, 2, 3, 0, 4, 2), (16, 2, 5, 3, 1, 1),
                        (16, 2, 3, 0, 4, 2), (12, 2, 3, 3, 1, 1), (12, 2, 3, 0, 2, 2))


@register("fitnet_mnist_teacher", input_shape=(28, 28, 1),
          description="FitNets MNIST teacher: 3 maxout conv layers 48-48-24, ~361K params (Romero 2015)")
def fitnet_mnist_teacher(**kwargs) -> MaxoutConvNet:
  return MaxoutConvNet(**{"layers": FITNET_MNIST_TEACHER, **kwargs})


@register("fitnet_mnist_student", input_shape=(28, 28, 1),
          description="FitNets MNIST student: 6 maxout conv layers 16-16-16-16-12-12, ~30K params (Romero 2015)")
def fitnet_mnist_student(**kwargs) -> MaxoutConvNet:
  return MaxoutConvNet(**{"layers": FITNET_MNIST_STUDENT, **kwargs})
