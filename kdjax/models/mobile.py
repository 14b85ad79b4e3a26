"""Mobile networks used as students in the KD survey: MobileNet v1/v2, ShuffleNet v1/v2 and
MobileFaceNet, plus the CIFAR-sized MobileNetV2 / ShuffleNet v1 / v2 of the CRD benchmark
(Tian et al., "Contrastive Representation Distillation", ICLR 2020; RepDistiller's
``models/mobilenetv2.py``, ``ShuffleNetv1.py``, ``ShuffleNetv2.py``).

All take NHWC images and return logits ``[batch, num_classes]`` (MobileFaceNet without a head
returns its embedding). Features: ``stem``, ``stage1`` … ``stageN`` (one per group of blocks at
one resolution / one row of the paper's architecture table), ``head`` (a final 1x1 conv, where
the network has one), ``pooled`` (``[B, C]``), ``embedding`` (MobileFaceNet), ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.features import sow_feature
from kdjax.models.registry import register
from kdjax.models.zoo_layers import (
  ConvBN,
  batch_norm,
  channel_shuffle,
  check_nhwc,
  conv_init,
  make_divisible,
  pooled_classifier,
)

# ---------------------------------------------------------------------------------------------
# MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
# Vision Applications", 2017)
# ---------------------------------------------------------------------------------------------

# Paper Table 1, one tuple per resolution: (output channels, stride) of each depthwise-separable
# layer.
MOBILENET_V1_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)


class MobileNetV1(nn.Module):
  """MobileNet: a 3x3/2 conv then 13 depthwise-separable layers (3x3 depthwise conv-BN-ReLU,
  1x1 pointwise conv-BN-ReLU), global average pool, FC.

  ``alpha`` is the paper's width multiplier: every layer's channels become ``int(alpha * c)``,
  cutting cost and parameters by about ``alpha^2`` (paper Table 6: 1.0, 0.75, 0.5, 0.25).

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem`` (H/2, 32 alpha),
  ``stage1`` … ``stage5`` (H/2, H/4, H/8, H/16, H/32), ``pooled`` (``[B, 1024 alpha]``),
  ``logits``.
  """
  num_classes: int = 1000
  alpha: float = 1.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    x = ConvBN(int(32 * self.alpha), (3, 3), 2, name="conv_stem")(x, train=train)
    sow_feature(self, "stem", x)
    layer = 0
    for i, stage in enumerate(MOBILENET_V1_STAGES):
      for channels, stride in stage:
        layer += 1
        in_channels = x.shape[-1]
        x = ConvBN(in_channels, (3, 3), stride, groups=in_channels,
                   name=f"dw{layer}")(x, train=train)
        x = ConvBN(int(channels * self.alpha), (1, 1), name=f"pw{layer}")(x, train=train)
      sow_feature(self, f"stage{i + 1}", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, dropout=self.dropout, name="fc")


@register("mobilenet_v1", input_shape=(224, 224, 3),
          description="MobileNet v1 (Howard et al. 2017), width multiplier alpha "
                      "(1.0: 4.2M params, 569M MACs)")
def mobilenet_v1(**kwargs) -> MobileNetV1:
  return MobileNetV1(**kwargs)


# ---------------------------------------------------------------------------------------------
# MobileNet v2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
# CVPR 2018)
# ---------------------------------------------------------------------------------------------

# Paper Table 2: (expansion t, output channels c, repeats n, first stride s).
MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

# RepDistiller's CIFAR variant keeps 32x32 inputs at 2x2 before pooling by not striding the
# 24-channel group (its stem still strides by 2).
MOBILENET_V2_CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """Inverted residual with linear bottleneck: 1x1 expand (x t), 3x3 depthwise, 1x1 linear
  projection (no activation: ReLU on the low-dimensional bottleneck would destroy information,
  paper §3.2); identity shortcut when stride 1 and shapes match.

  ``always_expand`` keeps the 1x1 expansion even for ``t = 1`` (RepDistiller's CIFAR network
  does; torchvision skips it). ``act`` is ``"relu6"`` in the paper, ``"relu"`` in RepDistiller,
  ``"prelu"`` in MobileFaceNet.
  """
  features: int
  strides: int
  expand_ratio: int
  always_expand: bool = False
  act: str = "relu6"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    hidden = round(in_channels * self.expand_ratio)
    y = x
    if self.expand_ratio != 1 or self.always_expand:
      y = ConvBN(hidden, (1, 1), act=self.act, name="expand")(y, train=train)
    y = ConvBN(hidden, (3, 3), self.strides, groups=hidden, act=self.act,
               name="depthwise")(y, train=train)
    y = ConvBN(self.features, (1, 1), act=None, name="project")(y, train=train)
    if self.strides == 1 and in_channels == self.features:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2: 3x3/2 conv (32), 17 inverted residual blocks in 7 groups (Table 2), 1x1 conv
  to 1280, global average pool, dropout, FC.

  ``width_mult`` scales every channel count (paper's width multiplier; the last 1280 is only
  scaled up, never down). Channels are rounded to a multiple of ``round_nearest`` (8, as the
  reference implementation does) or, with ``round_nearest=None``, truncated (RepDistiller).

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem``, ``stage1`` … ``stage7``
  (one per row of Table 2), ``head`` (the 1280-channel 1x1 conv), ``pooled``, ``logits``.
  """
  num_classes: int = 1000
  width_mult: float = 1.0
  settings: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_SETTINGS
  round_nearest: int | None = 8
  stem_channels: int = 32
  last_channels: int = 1280
  always_expand: bool = False
  act: str = "relu6"
  dropout: float = 0.2

  def _channels(self, c: float) -> int:
    return make_divisible(c, self.round_nearest) if self.round_nearest else int(c)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    x = ConvBN(self._channels(self.stem_channels * self.width_mult), (3, 3), 2, act=self.act,
               name="conv_stem")(x, train=train)
    sow_feature(self, "stem", x)
    for i, (t, c, n, s) in enumerate(self.settings):
      out = self._channels(c * self.width_mult)
      for j in range(n):
        x = InvertedResidual(out, s if j == 0 else 1, t, self.always_expand, self.act,
                             name=f"block{i + 1}_{j}")(x, train=train)
      sow_feature(self, f"stage{i + 1}", x)
    last = self._channels(self.last_channels * max(1.0, self.width_mult))
    x = ConvBN(last, (1, 1), act=self.act, name="conv_head")(x, train=train)
    sow_feature(self, "head", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, dropout=self.dropout,
                             name="classifier")


@register("mobilenet_v2", input_shape=(224, 224, 3),
          description="MobileNetV2 (Sandler et al. 2018), width multiplier "
                      "(1.0: 3.5M params, 300M MACs)")
def mobilenet_v2(**kwargs) -> MobileNetV2:
  return MobileNetV2(**kwargs)


@register("mobilenet_v2_cifar", input_shape=(32, 32, 3),
          description="CIFAR MobileNetV2 of CRD/RepDistiller (t=6, width 0.5, ReLU), "
                      "100 classes, 0.81M params")
def mobilenet_v2_cifar(**kwargs) -> MobileNetV2:
  defaults = {"num_classes": 100, "width_mult": 0.5, "settings": MOBILENET_V2_CIFAR_SETTINGS,
              "round_nearest": None, "always_expand": True, "act": "relu", "dropout": 0.0}
  return MobileNetV2(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------
# ShuffleNet v1 (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
# for Mobile Devices", CVPR 2018)
# ---------------------------------------------------------------------------------------------

# Paper Table 1: output channels of Stages 2-4 for each number of groups g (ShuffleNet 1x).
SHUFFLENET_V1_CHANNELS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
    4: (272, 544, 1088), 8: (384, 768, 1536)}


def _round_to(value: float, multiple: int) -> int:
  return max(multiple, int(value / multiple + 0.5) * multiple)


class ShuffleUnitV1(nn.Module):
  """ShuffleNet unit (paper Fig. 2b/c): 1x1 group conv-BN-ReLU, channel shuffle, 3x3 depthwise
  conv-BN (no ReLU), 1x1 group conv-BN; added to the input (stride 1) or concatenated with a
  3x3/2 average pool of it (stride 2, so the branch outputs ``features - C_in`` channels);
  ReLU.

  Attributes:
    features: the unit's output channels.
    mid_channels: bottleneck width (a quarter of the output, paper §3.3).
    group_first: group the first 1x1 conv (False for the first unit of Stage 2, whose input has
      too few channels to split, paper §3.3).
  """
  features: int
  strides: int
  groups: int
  mid_channels: int
  group_first: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    branch_out = self.features - in_channels if self.strides == 2 else self.features
    first_groups = self.groups if self.group_first else 1
    y = ConvBN(self.mid_channels, (1, 1), groups=first_groups, name="gconv1")(x, train=train)
    if first_groups > 1:
      y = channel_shuffle(y, first_groups)
    y = ConvBN(self.mid_channels, (3, 3), self.strides, groups=self.mid_channels, act=None,
               name="depthwise")(y, train=train)
    y = ConvBN(branch_out, (1, 1), groups=self.groups, act=None, name="gconv2")(y, train=train)
    if self.strides == 2:
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      return nn.relu(jnp.concatenate([y, shortcut], axis=-1))
    return nn.relu(x + y)


class ShuffleNetV1(nn.Module):
  """ShuffleNet v1: 3x3/2 conv (24), 3x3/2 max pool, Stages 2-4 of (4, 8, 4) units (first one
  strided), global average pool, FC.

  ``groups`` (g = 1, 2, 3, 4, 8) picks the stage widths of paper Table 1 (all ~140 MFLOPs at
  1x); ``scale`` is the paper's "ShuffleNet s x" (every layer's channels times s; rounded so
  that group convolutions divide evenly).

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem`` (after the max pool),
  ``stage1`` … ``stage3`` (the paper's Stages 2-4), ``pooled``, ``logits``.

  Attributes:
    cifar_stem: RepDistiller's CIFAR stem: a 1x1 conv (24) with stride 1 and no max pool.
    mid_from_branch: bottleneck width = (branch output)/4 in strided units, as RepDistiller
      computes it, instead of (unit output)/4 as in the paper and its official code.
  """
  num_classes: int = 1000
  groups: int = 3
  scale: float = 1.0
  stage_repeats: Sequence[int] = (4, 8, 4)
  cifar_stem: bool = False
  mid_from_branch: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    g = self.groups
    if g not in SHUFFLENET_V1_CHANNELS:
      raise ValueError(f"ShuffleNet v1 groups must be one of {sorted(SHUFFLENET_V1_CHANNELS)}; "
                       f"got {g}")
    stem = _round_to(24 * self.scale, g)
    if self.cifar_stem:
      x = ConvBN(stem, (1, 1), name="conv1")(x, train=train)
    else:
      x = ConvBN(stem, (3, 3), 2, name="conv1")(x, train=train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    sow_feature(self, "stem", x)
    stages = zip(SHUFFLENET_V1_CHANNELS[g], self.stage_repeats, strict=True)
    for i, (base, repeats) in enumerate(stages):
      out = _round_to(base * self.scale, 4 * g)
      for j in range(repeats):
        strides = 2 if j == 0 else 1
        branch = out - x.shape[-1] if strides == 2 else out
        mid = (branch if self.mid_from_branch else out) // 4
        x = ShuffleUnitV1(out, strides, g, mid, group_first=not (i == 0 and j == 0),
                          name=f"stage{i + 2}_{j}")(x, train=train)
      sow_feature(self, f"stage{i + 1}", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, name="fc")


@register("shufflenet_v1", input_shape=(224, 224, 3),
          description="ShuffleNet v1 (Zhang et al. 2018), groups g and scale s "
                      "(g=3, 1x: 1.87M params, 137M MACs)")
def shufflenet_v1(**kwargs) -> ShuffleNetV1:
  return ShuffleNetV1(**kwargs)


@register("shufflenet_v1_cifar", input_shape=(32, 32, 3),
          description="CIFAR ShuffleNet v1 of CRD/RepDistiller (g=3, 1x1 stem), 100 classes, "
                      "0.95M params")
def shufflenet_v1_cifar(**kwargs) -> ShuffleNetV1:
  defaults = {"num_classes": 100, "groups": 3, "cifar_stem": True, "mid_from_branch": True}
  return ShuffleNetV1(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------
# ShuffleNet V2 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
# Design", ECCV 2018)
# ---------------------------------------------------------------------------------------------

# Paper Table 5: output channels of Stages 2-4 and of Conv5 for each scale.
SHUFFLENET_V2_CHANNELS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024), 2.0: (244, 488, 976, 2048)}


class ShuffleUnitV2(nn.Module):
  """ShuffleNet V2 unit (paper Fig. 3c/d).

  Stride 1: channel split in halves; one half passes through untouched, the other goes through
  1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU (equal widths, no group convs:
  the paper's guidelines G1/G2). Stride 2: no split; the input feeds both a depthwise-3x3/2 +
  1x1 branch and the 1x1 / depthwise-3x3/2 / 1x1 branch, doubling the channels. Then the halves
  are concatenated and channel-shuffled (2 groups).
  """
  features: int
  strides: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    half = self.features // 2
    if self.strides == 1:
      keep, x = jnp.split(x, 2, axis=-1)
    else:
      c = x.shape[-1]
      keep = ConvBN(c, (3, 3), 2, groups=c, act=None, name="proj_depthwise")(x, train=train)
      keep = ConvBN(half, (1, 1), name="proj_pointwise")(keep, train=train)
    y = ConvBN(half, (1, 1), name="pointwise1")(x, train=train)
    y = ConvBN(half, (3, 3), self.strides, groups=half, act=None, name="depthwise")(
        y, train=train)
    y = ConvBN(half, (1, 1), name="pointwise2")(y, train=train)
    return channel_shuffle(jnp.concatenate([keep, y], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNet V2: 3x3/2 conv (24), 3x3/2 max pool, Stages 2-4 of (4, 8, 4) units (first one
  strided), 1x1 Conv5, global average pool, FC.

  ``scale`` in {0.5, 1.0, 1.5, 2.0} picks the widths of paper Table 5.

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem``, ``stage1`` … ``stage3``
  (the paper's Stages 2-4), ``head`` (Conv5), ``pooled``, ``logits``.

  Attributes:
    cifar_stem: RepDistiller's CIFAR stem: a 1x1 conv (24) with stride 1 and no max pool.
  """
  num_classes: int = 1000
  scale: float = 1.0
  stage_repeats: Sequence[int] = (4, 8, 4)
  cifar_stem: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    if self.scale not in SHUFFLENET_V2_CHANNELS:
      raise ValueError(f"ShuffleNet V2 scale must be one of {sorted(SHUFFLENET_V2_CHANNELS)}; "
                       f"got {self.scale}")
    *stage_channels, last = SHUFFLENET_V2_CHANNELS[self.scale]
    if self.cifar_stem:
      x = ConvBN(24, (1, 1), name="conv1")(x, train=train)
    else:
      x = ConvBN(24, (3, 3), 2, name="conv1")(x, train=train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    sow_feature(self, "stem", x)
    for i, (channels, repeats) in enumerate(zip(stage_channels, self.stage_repeats, strict=True)):
      for j in range(repeats):
        x = ShuffleUnitV2(channels, 2 if j == 0 else 1, name=f"stage{i + 2}_{j}")(x, train=train)
      sow_feature(self, f"stage{i + 1}", x)
    x = ConvBN(last, (1, 1), name="conv5")(x, train=train)
    sow_feature(self, "head", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, name="fc")


@register("shufflenet_v2", input_shape=(224, 224, 3),
          description="ShuffleNet V2 (Ma et al. 2018), scale 0.5/1/1.5/2 "
                      "(1x: 2.3M params, 146M MACs)")
def shufflenet_v2(**kwargs) -> ShuffleNetV2:
  return ShuffleNetV2(**kwargs)


@register("shufflenet_v2_cifar", input_shape=(32, 32, 3),
          description="CIFAR ShuffleNet V2 of CRD/RepDistiller (1x, 1x1 stem), 100 classes, "
                      "1.36M params")
def shufflenet_v2_cifar(**kwargs) -> ShuffleNetV2:
  return ShuffleNetV2(**{"num_classes": 100, "cifar_stem": True, **kwargs})


# ---------------------------------------------------------------------------------------------
# MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
# Verification on Mobile Devices", CCBR 2018)
# ---------------------------------------------------------------------------------------------

# Paper Table 1: bottleneck rows (t, c, n, s) between the depthwise 3x3 and the 1x1 conv 512.
MOBILEFACENET_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class MobileFaceNet(nn.Module):
  """MobileFaceNet: face-verification embedding network (PReLU throughout).

  3x3/2 conv 64, depthwise 3x3 conv 64, MobileNetV2 bottlenecks (Table 1 rows), 1x1 conv 512,
  then a *global depthwise convolution* (GDConv: a linear depthwise conv whose kernel covers
  the whole final map, 7x7 at 112x112 input; it weights spatial positions differently, unlike
  global average pooling, which the paper shows matters for faces) and a linear 1x1 conv to the
  embedding, each followed by BN.

  Output: with ``with_head=False`` (the default; the paper's network) there is no classifier
  and ``__call__`` returns the 128-d embedding itself, ``[B, embedding_dim]``, in place of
  logits (train it with a margin loss such as ArcFace, or use it as a feature). With
  ``with_head=True`` a linear layer on the embedding gives ``[B, num_classes]`` logits.

  Input ``[B, 112, 112, 3]`` standard; other sizes work (>= 32) but the GDConv kernel takes the
  size of the final map, so its parameters depend on the input size. Features: ``stem``
  (56x56), ``stage1`` (28x28), ``stage2`` (14x14), ``stage3`` (7x7), ``head`` (1x1 conv 512),
  ``pooled`` (GDConv output, ``[B, 512]``), ``embedding`` (``[B, 128]``), ``logits``.
  """
  embedding_dim: int = 128
  with_head: bool = False
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    x = ConvBN(64, (3, 3), 2, act="prelu", name="conv1")(x, train=train)
    x = ConvBN(64, (3, 3), groups=64, act="prelu", name="conv2_dw")(x, train=train)
    sow_feature(self, "stem", x)
    stage = 0
    for i, (t, c, n, s) in enumerate(MOBILEFACENET_SETTINGS):
      for j in range(n):
        x = InvertedResidual(c, s if j == 0 else 1, t, act="prelu",
                             name=f"bottleneck{i + 1}_{j}")(x, train=train)
      # A strided row followed by stride-1 rows at the same resolution form one stage.
      next_strided = i + 1 == len(MOBILEFACENET_SETTINGS) or MOBILEFACENET_SETTINGS[i + 1][3] > 1
      if next_strided:
        stage += 1
        sow_feature(self, f"stage{stage}", x)
    x = ConvBN(512, (1, 1), act="prelu", name="conv_1x1")(x, train=train)
    sow_feature(self, "head", x)
    x = ConvBN(512, tuple(x.shape[1:3]), padding="VALID", groups=512, act=None,
               name="gdconv")(x, train=train)
    x = x.reshape(x.shape[0], -1)
    sow_feature(self, "pooled", x)
    x = nn.Dense(self.embedding_dim, use_bias=False, kernel_init=conv_init, name="linear")(x)
    x = batch_norm(train, name="embedding_bn")(x)
    sow_feature(self, "embedding", x)
    if not self.with_head:
      sow_feature(self, "logits", x)
      return x
    logits = nn.Dense(self.num_classes, name="classifier")(x)
    sow_feature(self, "logits", logits)
    return logits


@register("mobilefacenet", input_shape=(112, 112, 3),
          description="MobileFaceNet (Chen et al. 2018): 128-d embedding (1.0M params, "
                      "221M MACs); num_classes= adds a head")
def mobilefacenet(**kwargs) -> MobileFaceNet:
  # Asking for a number of classes means asking for a classifier on the embedding.
  if "num_classes" in kwargs and "with_head" not in kwargs:
    kwargs = {**kwargs, "with_head": True}
  return MobileFaceNet(**kwargs)
