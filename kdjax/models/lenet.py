"""LeNet-5 and LeNet-5-half: the convolutional pair of Lopes et al. 2017's data-free KD (MNIST).

The public code of the paper (``iRapha/replayed_distillation``, ``models/lenet.py`` and
``models/lenet_half.py``) trains LeNet-5 on MNIST resized to 32×32 and distils it into a net with half the
convolution filters: conv 5×5 (6 filters; half: 3), ReLU, 2×2 max-pool, conv 5×5 (16; half: 8), ReLU, 2×2
max-pool, dense 120, ReLU, dense 84, ReLU, dense ``num_classes``; every convolution ``VALID``.

Difference from the code: the code *resizes* the 28×28 MNIST digits to 32×32 (its ``mnist_conv`` dataset);
here a 28×28 input is zero-padded by 2 pixels on each side to ``input_size`` (LeCun et al. 1998's own way
of centring MNIST in a 32×32 field), so the model takes the pipeline's 28×28 images as they are. A 32×32
input is used unchanged.

Features: ``pre_relu_0 … pre_relu_3`` (the two convolutions and the two hidden dense layers before their
ReLU, NHWC for the convolutions: what data-free KD records), ``block_0``, ``block_1`` (post-ReLU conv
maps before pooling), ``hidden_0``, ``hidden_1`` (post-ReLU dense), ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register


class LeNet5(nn.Module):
  """LeNet-5 without the original's subsampling weights and RBF output (the code's TensorFlow version).

  Attributes:
    channels: filters of the two 5×5 convolutions.
    dense: widths of the two hidden dense layers.
    num_classes: outputs.
    input_size: a smaller square input is zero-padded to this side (28 → 32 for MNIST).
  """
  channels: Sequence[int] = (6, 16)
  dense: Sequence[int] = (120, 84)
  num_classes: int = 10
  input_size: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no dropout, no BatchNorm
    if x.ndim != 4:
      raise ValueError(f"LeNet5 expects NHWC input [batch, H, W, C]; got shape {x.shape}")
    pad_h, pad_w = self.input_size - x.shape[1], self.input_size - x.shape[2]
    if pad_h < 0 or pad_w < 0:
      raise ValueError(f"LeNet5 takes inputs of at most {self.input_size}x{self.input_size} (input_size); got "
                       f"{x.shape[1]}x{x.shape[2]}")
    if pad_h or pad_w:
      x = jnp.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)])
    for i, width in enumerate(self.channels):
      x = Conv(width, (5, 5), padding="VALID", name=f"conv_{i}")(x)
      sow_feature(self, f"pre_relu_{i}", x)
      x = nn.relu(x)
      sow_feature(self, f"block_{i}", x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    for j, width in enumerate(self.dense):
      x = nn.Dense(width, name=f"fc_{j}")(x)
      sow_feature(self, f"pre_relu_{len(self.channels) + j}", x)
      x = nn.relu(x)
      sow_feature(self, f"hidden_{j}", x)
    logits = nn.Dense(self.num_classes, name="head")(x)
    sow_feature(self, "logits", logits)
    return logits


@register("lenet5", input_shape=(28, 28, 1),
          description="LeNet-5 (conv 6-16, dense 120-84; 28x28 zero-padded to 32x32), Lopes et al. 2017's conv teacher")
def lenet5(**kwargs) -> LeNet5:
  return LeNet5(**kwargs)


@register("lenet5_half", input_shape=(28, 28, 1),
          description="LeNet-5 with half the conv filters (3-8, dense 120-84), Lopes et al. 2017's conv student")
def lenet5_half(**kwargs) -> LeNet5:
  kwargs = {"channels": (3, 8), **kwargs}
  return LeNet5(**kwargs)
