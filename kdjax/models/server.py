"""Server-scale ImageNet classifiers used as teachers (and students) in the KD survey:
VGG-16, ResNet-18/50, SE-ResNet-50 and DenseNet-121.

(GoogLeNet / Inception v3 live in :mod:`kdjax.models.inception`, the Inside-Outside Net in
:mod:`kdjax.models.ion`, the mobile networks in :mod:`kdjax.models.mobile`.)

All take NHWC images (224x224 is the standard size; anything from 32x32 up works) and return
logits ``[batch, num_classes]``. Named features (see :mod:`kdjax.models.features`): ``stem``,
``stage1`` … ``stageN``, ``pooled`` (the pooled vector or map fed to the classifier),
``embedding`` where there is a hidden FC layer, and ``logits``.

The parameter counts equal the reference implementations' (torchvision for VGG/ResNet/DenseNet,
Cadene's ``pretrainedmodels`` for SE-ResNet); ``tests/test_models_zoo.py`` checks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register
from kdjax.models.zoo_layers import (
  ConvBN,
  adaptive_pool,
  batch_norm,
  check_nhwc,
  conv_init,
  max_pool_ceil,
  pooled_classifier,
  vgg_fc_head,
)

# ---------------------------------------------------------------------------------------------
# VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
# Recognition", ICLR 2015), configuration D = VGG-16.
# ---------------------------------------------------------------------------------------------

VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
  """VGG: stacks of 3x3 convolutions (+ReLU) separated by 2x2 max pooling, then three FC layers.

  Input ``[B, H, W, 3]``. The last conv map is average-pooled to 7x7 (adaptive, as torchvision
  does, so inputs other than 224 keep the 7*7*512 FC input); FC 4096-4096-classes with dropout.

  Features: ``stage1`` … ``stage5`` (post-ReLU output of each conv stage's last conv, before
  its max pool: conv1_2, conv2_2, conv3_3, conv4_3, conv5_3; e.g. ``stage5`` is 14x14 for a
  224 input), ``pooled`` (``[B, 7, 7, 512]``), ``embedding`` (fc7, ``[B, 4096]``), ``logits``.
  """
  stages: Sequence[Sequence[int]] = VGG16_STAGES
  num_classes: int = 1000
  fc_features: int = 4096
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    for i, widths in enumerate(self.stages):
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j, width in enumerate(widths):
        x = nn.relu(Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                         name=f"conv{i + 1}_{j + 1}")(x))
      sow_feature(self, f"stage{i + 1}", x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2)) if min(x.shape[1:3]) >= 2 else x
    x = adaptive_pool(x, (7, 7))
    sow_feature(self, "pooled", x)
    return vgg_fc_head(self, x, fc_features=self.fc_features, num_classes=self.num_classes, dropout=self.dropout,
                       train=train)


@register("vgg16", input_shape=(224, 224, 3),
          description="VGG-16 (config D, Simonyan & Zisserman 2015), 138.4M params")
def vgg16(**kwargs) -> VGG:
  return VGG(**kwargs)


# ---------------------------------------------------------------------------------------------
# ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) and
# SE-ResNet (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).
# ---------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
  """SE block: global average pool -> FC(C/r) -> ReLU -> FC(C) -> sigmoid -> rescale channels.

  The FCs have biases (the paper's and Cadene's 1x1 convs do): 2C^2/r + C/r + C parameters.
  """
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(channels // self.reduction, name="fc1")(s))
    s = nn.sigmoid(nn.Dense(channels, name="fc2")(s))
    return x * s[:, None, None, :]


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut; ResNet-18/34."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    y = ConvBN(self.features, (3, 3), self.strides, name="conv1")(x, train=train)
    y = ConvBN(self.features, (3, 3), act=None, name="conv2")(y, train=train)
    if self.strides != 1 or x.shape[-1] != self.features:  # projection shortcut
      x = ConvBN(self.features, (1, 1), self.strides, act=None, name="downsample")(x, train=train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4), optional SE on the residual branch, then the shortcut.

  ``stride_in_1x1``: where the stride of a down-sampling block goes. torchvision ("ResNet v1.5")
  puts it on the 3x3 conv, which is slightly more accurate; the original Caffe ResNet and the
  SENet release (Cadene's ``se_resnet50``) put it on the first 1x1 conv. Parameter counts are
  the same either way.
  """
  features: int
  strides: int = 1
  se_reduction: int | None = None
  stride_in_1x1: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y = ConvBN(self.features, (1, 1), s1, name="conv1")(x, train=train)
    y = ConvBN(self.features, (3, 3), s3, name="conv2")(y, train=train)
    y = ConvBN(self.features * 4, (1, 1), act=None, name="conv3")(y, train=train)
    if self.se_reduction:
      y = SqueezeExcite(self.se_reduction, name="se")(y)
    if self.strides != 1 or x.shape[-1] != self.features * 4:  # projection shortcut
      x = ConvBN(self.features * 4, (1, 1), self.strides, act=None, name="downsample")(
          x, train=train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ImageNet ResNet: 7x7/2 conv, 3x3/2 max pool, four stages (64…512 wide, stride 1,2,2,2),
  global average pool, FC.

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem`` (after the max pool, H/4),
  ``stage1`` … ``stage4`` (H/4 … H/32), ``pooled`` (``[B, C]``), ``logits``.

  Attributes:
    stage_sizes: blocks per stage ((2,2,2,2) ResNet-18, (3,4,6,3) ResNet-50).
    bottleneck: bottleneck blocks (ResNet-50+) instead of basic blocks.
    se_reduction: add squeeze-and-excitation with this reduction ratio (SE-ResNet; 16 in SENet).
    stride_in_1x1: see :class:`Bottleneck`.
    stem_pool_ceil: SENet's stem max pool uses ``ceil_mode=True`` without padding; torchvision's
      pads by 1 (same 56x56 output at 224).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  num_classes: int = 1000
  width: int = 64
  se_reduction: int | None = None
  stride_in_1x1: bool = False
  stem_pool_ceil: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    x = ConvBN(self.width, (7, 7), 2, name="conv1")(x, train=train)
    if self.stem_pool_ceil:
      x = max_pool_ceil(x, 3, 2)
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    sow_feature(self, "stem", x)
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        name = f"layer{i + 1}_{j}"
        features = self.width * 2**i
        if self.bottleneck:
          block = Bottleneck(features, strides, self.se_reduction, self.stride_in_1x1, name=name)
        else:
          block = BasicBlock(features, strides, name=name)
        x = block(x, train=train)
      sow_feature(self, f"stage{i + 1}", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, name="fc")


@register("resnet18", input_shape=(224, 224, 3),
          description="ResNet-18 (He et al. 2016), ImageNet layout, 11.7M params")
def resnet18(**kwargs) -> ResNet:
  return ResNet(**{"stage_sizes": (2, 2, 2, 2), **kwargs})


@register("resnet50", input_shape=(224, 224, 3),
          description="ResNet-50 (He et al. 2016; stride on the 3x3 conv as in torchvision), "
                      "25.6M params")
def resnet50(**kwargs) -> ResNet:
  return ResNet(**{"stage_sizes": (3, 4, 6, 3), "bottleneck": True, **kwargs})


@register("se_resnet50", input_shape=(224, 224, 3),
          description="SE-ResNet-50 (Hu et al. 2018; SE ratio 16, Caffe-style strides), "
                      "28.1M params")
def se_resnet50(**kwargs) -> ResNet:
  return ResNet(**{"stage_sizes": (3, 4, 6, 3), "bottleneck": True, "se_reduction": 16,
                   "stride_in_1x1": True, "stem_pool_ceil": True, **kwargs})


# ---------------------------------------------------------------------------------------------
# DenseNet (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017), DenseNet-BC.
# ---------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
  """BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k); returns the ``k`` new channels only."""
  growth_rate: int
  bn_size: int = 4
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    y = nn.relu(batch_norm(train, name="norm1")(x))
    y = Conv(self.bn_size * self.growth_rate, (1, 1), use_bias=False, kernel_init=conv_init,
             name="conv1")(y)
    y = nn.relu(batch_norm(train, name="norm2")(y))
    y = Conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
             kernel_init=conv_init, name="conv2")(y)
    return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class DenseNet(nn.Module):
  """DenseNet-BC: 7x7/2 conv, 3x3/2 max pool, dense blocks joined by transitions
  (BN-ReLU-Conv1x1 halving channels, 2x2 average pool), BN-ReLU, global pool, FC.

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem`` (H/4), ``stage1`` … ``stage4``
  (each dense block's concatenated output; ``stage4`` after the final BN-ReLU, i.e. the map that
  is pooled), ``pooled`` (``[B, C]``), ``logits``.
  """
  block_config: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  drop_rate: float = 0.0
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    x = ConvBN(self.num_init_features, (7, 7), 2, name="conv0")(x, train=train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    sow_feature(self, "stem", x)
    for i, n_layers in enumerate(self.block_config):
      for j in range(n_layers):
        new = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate,
                         name=f"block{i + 1}_layer{j + 1}")(x, train=train)
        x = jnp.concatenate([x, new], axis=-1)
      if i < len(self.block_config) - 1:
        sow_feature(self, f"stage{i + 1}", x)
        x = nn.relu(batch_norm(train, name=f"transition{i + 1}_norm")(x))
        x = Conv(int(x.shape[-1] * self.compression), (1, 1), use_bias=False,
                 kernel_init=conv_init, name=f"transition{i + 1}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(batch_norm(train, name="norm5")(x))
    sow_feature(self, f"stage{len(self.block_config)}", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, name="classifier")


@register("densenet121", input_shape=(224, 224, 3),
          description="DenseNet-121 (Huang et al. 2017; BC, k=32, blocks 6-12-24-16), 8.0M params")
def densenet121(**kwargs) -> DenseNet:
  return DenseNet(**kwargs)
