"""A small convolutional network for the offline image sets (MNIST-sized inputs)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from kdjax.models.batch_norm import BatchNorm
from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register


class SmallCNN(nn.Module):
  """Conv(3x3)-[BN]-ReLU-MaxPool(2) blocks, then a ReLU dense layer and a linear head.

  Features: ``block_i`` (post-ReLU, before pooling, NHWC), ``dense``, ``logits``.
  Input: ``[batch, H, W, C]``.
  """
  channels: Sequence[int] = (32, 64)
  dense: int = 128
  num_classes: int = 10
  use_batchnorm: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"SmallCNN expects NHWC input [batch, H, W, C]; got shape {x.shape}")
    for i, width in enumerate(self.channels):
      x = Conv(width, (3, 3), padding="SAME", use_bias=not self.use_batchnorm, name=f"conv_{i}")(x)
      if self.use_batchnorm:
        x = BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn_{i}")(x)
      x = nn.relu(x)
      sow_feature(self, f"block_{i}", x)
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense, name="fc")(x))
    sow_feature(self, "dense", x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, name="head")(x)
    sow_feature(self, "logits", logits)
    return logits


@register("small_cnn", input_shape=(28, 28, 1),
          description="2-block conv net with BatchNorm (32-64 channels, dense 128)")
def small_cnn(**kwargs) -> SmallCNN:
  return SmallCNN(**kwargs)
