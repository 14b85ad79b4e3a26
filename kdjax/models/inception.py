"""Inception networks: GoogLeNet / Inception v1 (Szegedy et al., "Going Deeper with
Convolutions", CVPR 2015) and Inception v3 (Szegedy et al., "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016).

Both use BatchNorm after every convolution with epsilon 1e-3 (the TensorFlow/torchvision
setting these networks were trained with; the original GoogLeNet had no BN and used LRN, which
modern re-implementations drop). Auxiliary classifiers are optional (``aux_logits=True``); their
logits are exposed as features (``aux1_logits``/``aux2_logits`` for v1, ``aux_logits`` for v3)
so a training loss can add them, while the module itself returns the main logits only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.features import sow_feature
from kdjax.models.registry import register
from kdjax.models.zoo_layers import (
  ConvBN,
  adaptive_pool,
  check_nhwc,
  global_avg_pool,
  max_pool_ceil,
  pooled_classifier,
)

_EPS = 1e-3


def _conv(features: int, kernel: tuple[int, int], strides: int = 1, padding=None,
          name: str | None = None) -> ConvBN:
  """Conv-BN(eps 1e-3)-ReLU, the unit both Inception papers are built from."""
  return ConvBN(features, kernel, strides, padding=padding, bn_epsilon=_EPS, name=name)


# ---------------------------------------------------------------------------------------------
# GoogLeNet / Inception v1
# ---------------------------------------------------------------------------------------------

# Table 1 of the paper: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module.
GOOGLENET_MODULES: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


class InceptionModuleV1(nn.Module):
  """Four parallel branches concatenated: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3 max pool->1x1.

  ``wide_kernel`` is the "5x5" branch's kernel: 5 in the paper; torchvision's ``googlenet``
  uses 3 there (a known slip it keeps for compatibility with its weights), which is what its
  documented 6,624,904 parameter count reflects.
  """
  widths: tuple[int, int, int, int, int, int]
  wide_kernel: int = 5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    n1, r3, n3, r5, n5, pool_proj = self.widths
    k = self.wide_kernel
    b1 = _conv(n1, (1, 1), name="branch1")(x, train=train)
    b2 = _conv(r3, (1, 1), name="branch2_reduce")(x, train=train)
    b2 = _conv(n3, (3, 3), name="branch2")(b2, train=train)
    b3 = _conv(r5, (1, 1), name="branch3_reduce")(x, train=train)
    b3 = _conv(n5, (k, k), name="branch3")(b3, train=train)
    b4 = max_pool_ceil(x, 3, 1, padding=1)
    b4 = _conv(pool_proj, (1, 1), name="branch4")(b4, train=train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxHeadV1(nn.Module):
  """GoogLeNet's auxiliary classifier: avg pool to 4x4, 1x1 conv 128, FC 1024, dropout 0.7, FC.

  The paper pools 5x5/3 (giving 4x4 only for 224 input); like torchvision we pool adaptively
  to 4x4 so any input size gives the same 2048-d FC input.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = adaptive_pool(x, (4, 4))
    x = _conv(128, (1, 1), name="conv")(x, train=train)
    x = nn.relu(nn.Dense(1024, name="fc1")(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.7, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc2")(x)


class InceptionV1(nn.Module):
  """GoogLeNet (Inception v1) with BatchNorm.

  Stem 7x7/2 conv, 3x3/2 max pool, 1x1 conv, 3x3 conv (192), 3x3/2 max pool; Inception (3a,3b),
  pool, (4a-4e), pool, (5a,5b); global average pool, dropout 0.4, FC. Max pools use PyTorch's
  ``ceil_mode`` as the Caffe original did. LRN is omitted (BN replaces it).

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stem`` (H/8, 192 ch),
  ``stage1`` (after 3b, H/8, 480), ``stage2`` (after 4e, H/16, 832), ``stage3`` (after 5b,
  H/32, 1024), ``pooled`` (``[B, 1024]``), ``logits``; with ``aux_logits`` also
  ``aux1_logits``/``aux2_logits`` (heads on 4a and 4d).

  Attributes:
    wide_kernel: 5 (paper) or 3 (torchvision-compatible); see :class:`InceptionModuleV1`.
    aux_logits: build the two auxiliary classifiers (the paper trains with them, weight 0.3).
  """
  num_classes: int = 1000
  dropout: float = 0.4
  aux_logits: bool = False
  wide_kernel: int = 5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    x = _conv(64, (7, 7), 2, name="conv1")(x, train=train)
    x = max_pool_ceil(x, 3, 2)
    x = _conv(64, (1, 1), name="conv2")(x, train=train)
    x = _conv(192, (3, 3), name="conv3")(x, train=train)
    x = max_pool_ceil(x, 3, 2)
    sow_feature(self, "stem", x)
    stage = 1
    for key, widths in GOOGLENET_MODULES.items():
      if key in ("4a", "5a"):
        x = max_pool_ceil(x, 3, 2)
      x = InceptionModuleV1(widths, self.wide_kernel, name=f"inception{key}")(x, train=train)
      if self.aux_logits and key in ("4a", "4d"):
        aux_name = "aux1" if key == "4a" else "aux2"
        aux = AuxHeadV1(self.num_classes, name=aux_name)(x, train=train)
        sow_feature(self, f"{aux_name}_logits", aux)
      if key in ("3b", "4e", "5b"):
        sow_feature(self, f"stage{stage}", x)
        stage += 1
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, dropout=self.dropout, name="fc")


@register("inception_v1", input_shape=(224, 224, 3),
          description="GoogLeNet / Inception v1 with BN (Szegedy et al. 2015), 5x5 branches, "
                      "7.0M params")
def inception_v1(**kwargs) -> InceptionV1:
  return InceptionV1(**kwargs)


# ---------------------------------------------------------------------------------------------
# Inception v3
# ---------------------------------------------------------------------------------------------


class InceptionA(nn.Module):
  """35x35 module (paper Fig. 5: the 5x5 factorised into two 3x3), with a 5x5 branch as in the
  released model: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg pool->1x1(pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    b1 = _conv(64, (1, 1), name="branch1x1")(x, train=train)
    b5 = _conv(48, (1, 1), name="branch5x5_1")(x, train=train)
    b5 = _conv(64, (5, 5), name="branch5x5_2")(b5, train=train)
    b3 = _conv(64, (1, 1), name="branch3x3dbl_1")(x, train=train)
    b3 = _conv(96, (3, 3), name="branch3x3dbl_2")(b3, train=train)
    b3 = _conv(96, (3, 3), name="branch3x3dbl_3")(b3, train=train)
    bp = nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    bp = _conv(self.pool_features, (1, 1), name="branch_pool")(bp, train=train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 grid reduction (paper Fig. 10): stride-2 convs in parallel with a max pool,
  so the grid shrinks without a representational bottleneck."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    b3 = _conv(384, (3, 3), 2, padding="VALID", name="branch3x3")(x, train=train)
    bd = _conv(64, (1, 1), name="branch3x3dbl_1")(x, train=train)
    bd = _conv(96, (3, 3), name="branch3x3dbl_2")(bd, train=train)
    bd = _conv(96, (3, 3), 2, padding="VALID", name="branch3x3dbl_3")(bd, train=train)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """17x17 module with n x n convolutions factorised into 1x7 and 7x1 (paper Fig. 6)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    c7 = self.channels_7x7
    b1 = _conv(192, (1, 1), name="branch1x1")(x, train=train)
    b7 = _conv(c7, (1, 1), name="branch7x7_1")(x, train=train)
    b7 = _conv(c7, (1, 7), name="branch7x7_2")(b7, train=train)
    b7 = _conv(192, (7, 1), name="branch7x7_3")(b7, train=train)
    bd = _conv(c7, (1, 1), name="branch7x7dbl_1")(x, train=train)
    bd = _conv(c7, (7, 1), name="branch7x7dbl_2")(bd, train=train)
    bd = _conv(c7, (1, 7), name="branch7x7dbl_3")(bd, train=train)
    bd = _conv(c7, (7, 1), name="branch7x7dbl_4")(bd, train=train)
    bd = _conv(192, (1, 7), name="branch7x7dbl_5")(bd, train=train)
    bp = nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    bp = _conv(192, (1, 1), name="branch_pool")(bp, train=train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 grid reduction."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    b3 = _conv(192, (1, 1), name="branch3x3_1")(x, train=train)
    b3 = _conv(320, (3, 3), 2, padding="VALID", name="branch3x3_2")(b3, train=train)
    b7 = _conv(192, (1, 1), name="branch7x7x3_1")(x, train=train)
    b7 = _conv(192, (1, 7), name="branch7x7x3_2")(b7, train=train)
    b7 = _conv(192, (7, 1), name="branch7x7x3_3")(b7, train=train)
    b7 = _conv(192, (3, 3), 2, padding="VALID", name="branch7x7x3_4")(b7, train=train)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """8x8 module with expanded filter banks (paper Fig. 7): the 3x3s split into parallel 1x3 and
  3x1 outputs, promoting high-dimensional representations at the coarsest grid."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    b1 = _conv(320, (1, 1), name="branch1x1")(x, train=train)
    b3 = _conv(384, (1, 1), name="branch3x3_1")(x, train=train)
    b3 = jnp.concatenate([_conv(384, (1, 3), name="branch3x3_2a")(b3, train=train),
                          _conv(384, (3, 1), name="branch3x3_2b")(b3, train=train)], axis=-1)
    bd = _conv(448, (1, 1), name="branch3x3dbl_1")(x, train=train)
    bd = _conv(384, (3, 3), name="branch3x3dbl_2")(bd, train=train)
    bd = jnp.concatenate([_conv(384, (1, 3), name="branch3x3dbl_3a")(bd, train=train),
                          _conv(384, (3, 1), name="branch3x3dbl_3b")(bd, train=train)], axis=-1)
    bp = nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    bp = _conv(192, (1, 1), name="branch_pool")(bp, train=train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class AuxHeadV3(nn.Module):
  """Inception v3's BN-auxiliary classifier on the 17x17 grid: 5x5/3 avg pool, 1x1 conv 128,
  5x5 conv 768, global pool, FC.

  For inputs below 299 the 17x17 grid shrinks (3x3 at the minimum 75x75); there the pool window
  is clipped to the map and the 5x5 conv is zero-padded, so the head still runs with the same
  parameters (at 299 both are exactly the paper's).
  """
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    window = min(5, x.shape[1], x.shape[2])
    x = nn.avg_pool(x, (window, window), strides=(3, 3))
    x = _conv(128, (1, 1), name="conv0")(x, train=train)
    padding = "VALID" if min(x.shape[1:3]) >= 5 else None
    x = _conv(768, (5, 5), padding=padding, name="conv1")(x, train=train)
    return nn.Dense(self.num_classes, name="fc")(global_avg_pool(x))


class InceptionV3(nn.Module):
  """Inception v3 (the torchvision / TF-slim layout).

  Stem: 3x3/2 conv 32, 3x3 conv 32, 3x3 conv 64, 3x3/2 max pool, 1x1 conv 80, 3x3 conv 192,
  3x3/2 max pool; 3 x InceptionA (35x35), InceptionB, 4 x InceptionC (17x17), InceptionD,
  2 x InceptionE (8x8); global average pool, dropout 0.5, FC.

  Input ``[B, H, W, 3]``: 299x299 standard, >= 75x75. Features: ``stem`` (35x35x192 at 299),
  ``stage1`` (Mixed_5d, 35x35x288), ``stage2`` (Mixed_6e, 17x17x768), ``stage3`` (Mixed_7c,
  8x8x2048), ``pooled`` (``[B, 2048]``), ``logits``; ``aux_logits`` when ``aux_logits=True``.
  """
  num_classes: int = 1000
  dropout: float = 0.5
  aux_logits: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    if min(x.shape[1:3]) < 75:
      raise ValueError(f"InceptionV3 needs inputs of at least 75x75; got {x.shape}")
    x = _conv(32, (3, 3), 2, padding="VALID", name="Conv2d_1a_3x3")(x, train=train)
    x = _conv(32, (3, 3), padding="VALID", name="Conv2d_2a_3x3")(x, train=train)
    x = _conv(64, (3, 3), name="Conv2d_2b_3x3")(x, train=train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = _conv(80, (1, 1), name="Conv2d_3b_1x1")(x, train=train)
    x = _conv(192, (3, 3), padding="VALID", name="Conv2d_4a_3x3")(x, train=train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    sow_feature(self, "stem", x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, name=name)(x, train=train)
    sow_feature(self, "stage1", x)
    x = InceptionB(name="Mixed_6a")(x, train=train)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x, train=train)
    sow_feature(self, "stage2", x)
    if self.aux_logits:
      sow_feature(self, "aux_logits", AuxHeadV3(self.num_classes, name="AuxLogits")(x, train=train))
    x = InceptionD(name="Mixed_7a")(x, train=train)
    x = InceptionE(name="Mixed_7b")(x, train=train)
    x = InceptionE(name="Mixed_7c")(x, train=train)
    sow_feature(self, "stage3", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, dropout=self.dropout, name="fc")


@register("inception_v3", input_shape=(299, 299, 3),
          description="Inception v3 (Szegedy et al. 2016), 23.8M params "
                      "(27.2M with aux_logits=True)")
def inception_v3(**kwargs) -> InceptionV3:
  return InceptionV3(**kwargs)

