"""The CIFAR model family of the public KD benchmark tables (CRD, Tian et al. ICLR 2020).

Re-implemented from the definitions in HobbitLong/RepDistiller ``models/`` (commit b84f547):
``resnet.py`` (CIFAR ResNets, He et al. 2016, and the 4x-wide ``resnet8x4``/``resnet32x4``),
``wrn.py`` (Wide ResNets, Zagoruyko & Komodakis 2016, identical to the attention-transfer code's) and
``vgg.py`` (CIFAR VGG with BatchNorm and a single linear classifier; RepDistiller's ``vgg8/11/13``
registry entries point at the ``*_bn`` variants). Parameter counts, layer order, padding and
initialisation follow those files, so PyTorch checkpoints can be mapped weight by weight.

Every model is ``model(x, *, train=False) -> logits`` with NHWC input ``[batch, 32, 32, 3]`` and
sows the features RepDistiller's ``forward(x, is_feat=True, preact=...)`` returns, under flat names:

* ``stem``: f0 (the same tensor in both lists);
* ``stageK`` (K = 1..3, or 1..4 for VGG): fK of the ``preact=False`` list;
* ``stageK_preact``: fK of the ``preact=True`` list;
* ``pooled``: the last list entry (flattened, the classifier's input);
* ``logits``: the returned logits.

So a method ported from RepDistiller reads ``stageK`` where it called ``preact=False`` and
``stageK_preact`` where it called ``preact=True`` (AB, the BN-before-ReLU features). What those
tensors are differs by family and is spelled out in each class docstring.

BatchNorm everywhere: ``momentum=0.9`` (PyTorch's 0.1), ``epsilon=1e-5``, batch statistics in
training mode and running statistics in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.batch_norm import BatchNorm
from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register

CIFAR_INPUT = (32, 32, 3)

# PyTorch's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and the WRN/VGG files'
# ``normal_(0, sqrt(2 / (k*k*out)))`` are the same distribution: N(0, 2 / fan_out), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# ``nn.Linear``'s default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance 1/(3 fan_in).
_torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int):
  """``nn.Linear``'s default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _batch_norm(train: bool, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv3x3(features: int, strides: int = 1, *, use_bias: bool = False, name: str) -> nn.Conv:
  # Explicit padding 1 (PyTorch's ``padding=1``), not "SAME": for a stride-2 conv on an even
  # input, "SAME" pads only at the bottom/right and would shift every window by one pixel
  # relative to the PyTorch reference.
  return Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
              use_bias=use_bias, kernel_init=_conv_init, name=name)


def _conv1x1(features: int, strides: int = 1, *, name: str) -> nn.Conv:
  return Conv(features, (1, 1), strides=(strides, strides), padding="VALID", use_bias=False,
              kernel_init=_conv_init, name=name)


def _check_nhwc(model: nn.Module, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"{type(model).__name__} expects NHWC input [batch, H, W, C]; got shape {x.shape}")


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (post-activation basic blocks)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  """Post-activation residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

  The shortcut is the identity, or a 1x1 conv + BN when the stride or the width changes
  (He et al. 2016's option B, as in RepDistiller's ``downsample``).

  Returns ``(out, preact)``: the block output and the same tensor before its final ReLU
  (``[batch, H/strides, W/strides, features]`` each).
  """
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    y = _conv3x3(self.features, self.strides, name="conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = _conv3x3(self.features, name="conv2")(y)
    y = _batch_norm(train, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv1x1(self.features, self.strides, name="downsample_conv")(x)
      shortcut = _batch_norm(train, "downsample_bn")(shortcut)
    else:
      shortcut = x
    preact = y + shortcut
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """CIFAR ResNet of depth ``6n + 2`` (He et al. 2016, §4.2), RepDistiller ``models/resnet.py``.

  Stem conv3x3-BN-ReLU, then three groups of ``n`` basic blocks (strides 1, 2, 2), global
  average pooling and a linear classifier. ``widths = (stem, group1, group2, group3)``:
  ``(16, 16, 32, 64)`` for resnet8..110, ``(32, 64, 128, 256)`` for the 4x-wide ``*x4`` nets.

  Features (input ``[B, 32, 32, 3]``; ``w = widths``):
    * ``stem``: ``[B, 32, 32, w0]`` post-ReLU stem output (RepDistiller f0).
    * ``stage1``/``stage2``/``stage3``: ``[B, 32, 32, w1]``, ``[B, 16, 16, w2]``, ``[B, 8, 8, w3]``,
      the group outputs, **post**-ReLU (f1..f3 with ``preact=False``).
    * ``stage1_preact``..``stage3_preact``: the same tensors **before** the last block's final
      ReLU, i.e. BN(conv) + shortcut (f1..f3 with ``preact=True``).
    * ``pooled``: ``[B, w3]`` globally averaged ``stage3`` (the classifier's input).
    * ``logits``: ``[B, num_classes]``.

  RepDistiller pools with ``AvgPool2d(8)``; for 32x32 inputs that is exactly the global mean used
  here, which also keeps other input sizes working.
  """
  depth: int = 32
  widths: Sequence[int] = (16, 16, 32, 64)
  num_classes: int = 100

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    _check_nhwc(self, x)
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"CifarResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...); got {self.depth}")
    if len(self.widths) != 4:
      raise ValueError(f"widths must be (stem, group1, group2, group3); got {tuple(self.widths)}")
    blocks_per_group = (self.depth - 2) // 6
    x = _conv3x3(self.widths[0], name="conv1")(x)
    x = nn.relu(_batch_norm(train, "bn1")(x))
    sow_feature(self, "stem", x)
    for group, width in enumerate(self.widths[1:]):
      for i in range(blocks_per_group):
        strides = 2 if group > 0 and i == 0 else 1
        x, preact = BasicBlock(width, strides, name=f"layer{group + 1}_{i}")(x, train=train)
      sow_feature(self, f"stage{group + 1}", x)
      sow_feature(self, f"stage{group + 1}_preact", preact)
    x = jnp.mean(x, axis=(1, 2))
    sow_feature(self, "pooled", x)
    logits = nn.Dense(self.num_classes, kernel_init=_torch_linear_kernel_init,
                      bias_init=_torch_linear_bias_init(x.shape[-1]), name="fc")(x)
    sow_feature(self, "logits", logits)
    return logits


# --------------------------------------------------------------------------------------------
# Wide ResNet (pre-activation blocks)
# --------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
  """Pre-activation WRN block: ``conv2(dropout(relu(bn2(conv1(relu(bn1(x))))))) + shortcut``.

  When the width changes the shortcut is a 1x1 conv applied to the *activated* input
  ``relu(bn1(x))``, otherwise it is ``x`` itself (WRN paper / RepDistiller ``wrn.py``).

  Returns ``(out, bn1_out)``: the residual sum ``[B, H/strides, W/strides, features]`` and
  ``bn1(x)`` before its ReLU (``[B, H, W, C_in]``), which is how RepDistiller defines the
  ``preact`` version of the previous group's output.
  """
  features: int
  strides: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    normed = _batch_norm(train, "bn1")(x)
    activated = nn.relu(normed)
    y = _conv3x3(self.features, self.strides, name="conv1")(activated)
    y = nn.relu(_batch_norm(train, "bn2")(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = _conv3x3(self.features, name="conv2")(y)
    # The reference only checks the width; a stride with unchanged width never occurs in
    # WRN-d-k but would need the projection too, so it is included in the test.
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv1x1(self.features, self.strides, name="shortcut")(activated)
    else:
      shortcut = x
    return y + shortcut, normed


class WideResNet(nn.Module):
  """WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016), RepDistiller ``models/wrn.py``.

  Stem conv3x3 (16 channels, no BN/ReLU: the first block pre-activates it), three groups of
  ``(d - 4) / 6`` pre-activation blocks with widths ``16k, 32k, 64k`` (strides 1, 2, 2), then
  BN-ReLU, global average pooling and a linear classifier.

  Features (input ``[B, 32, 32, 3]``):
    * ``stem``: ``[B, 32, 32, 16]`` the stem conv output, no BN/ReLU (RepDistiller f0).
    * ``stage1``/``stage2``/``stage3``: ``[B, 32, 32, 16k]``, ``[B, 16, 16, 32k]``,
      ``[B, 8, 8, 64k]``, the raw group outputs (residual sums) **before** the BN-ReLU that the
      next group (or the head) applies. These are RepDistiller's f1..f3 with ``preact=False`` and
      exactly the tensors the attention-transfer code (``cifar.py``'s ``g0, g1, g2``) uses.
    * ``stage1_preact``..``stage3_preact``: the same after that BN but before its ReLU (f1..f3
      with ``preact=True``: the first block of the next group's ``bn1``, and the head's BN
      for ``stage3``). ``relu(stageK_preact)`` is what the next group consumes.
    * ``pooled``: ``[B, 64k]`` after the final BN-ReLU and global pooling.
    * ``logits``: ``[B, num_classes]``.

  Unlike RepDistiller, which re-applies those BNs to produce the ``preact`` list (so in training
  mode their running statistics get updated twice per step), the BN outputs are captured from
  the forward pass itself.

  ``num_groups < 3`` keeps only the first groups (same layer names), then the same BN-ReLU, global
  pooling and ``fc`` head on the last kept map (``bn_final``'s output is ``stage{num_groups}_preact``):
  Rocket Launching's "bottom" light net is WRN-40-k with ``num_groups=2`` (a 16x16 map for 32x32 inputs).
  """
  depth: int = 16
  widen_factor: int = 1
  num_classes: int = 100
  dropout: float = 0.0
  num_groups: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    _check_nhwc(self, x)
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got {self.depth}")
    if self.num_groups not in (1, 2, 3):
      raise ValueError(f"WideResNet num_groups must be 1, 2 or 3; got {self.num_groups}")
    blocks_per_group = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)[:self.num_groups]
    x = _conv3x3(16, name="conv1")(x)
    sow_feature(self, "stem", x)
    for group, width in enumerate(widths):
      for i in range(blocks_per_group):
        strides = 2 if group > 0 and i == 0 else 1
        x, normed_input = PreActBlock(width, strides, self.dropout,
                                      name=f"block{group + 1}_{i}")(x, train=train)
        if group > 0 and i == 0:
          sow_feature(self, f"stage{group}_preact", normed_input)
      sow_feature(self, f"stage{group + 1}", x)
    x = _batch_norm(train, "bn_final")(x)
    sow_feature(self, f"stage{self.num_groups}_preact", x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    sow_feature(self, "pooled", x)
    logits = nn.Dense(self.num_classes, kernel_init=_torch_linear_kernel_init,
                      bias_init=nn.initializers.zeros, name="fc")(x)
    sow_feature(self, "logits", logits)
    return logits


# --------------------------------------------------------------------------------------------
# CIFAR VGG with BatchNorm
# --------------------------------------------------------------------------------------------

# Per-block conv widths of RepDistiller's ``vgg.py`` configurations (five blocks each).
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),                       # vgg8
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),           # vgg11
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),    # vgg13
}


class CifarVGG(nn.Module):
  """CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015, adapted), RepDistiller ``models/vgg.py``.

  Five blocks of conv3x3(+bias)-BN(-ReLU) layers; 2x2 max pooling after blocks 0, 1 and 2 (and
  after block 3 only for 64x64 inputs, as in the reference, so 32x32 inputs reach blocks 3 and 4
  at 4x4); then ReLU, global average pooling and one linear layer (no FC stack).

  Features (input ``[B, 32, 32, 3]``; ``c = config``, last width of each block):
    * ``stem``: ``[B, 32, 32, c0]`` block 0 output after its ReLU (f0).
    * ``stage1``..``stage4``: ``[B, 16, 16, c1]``, ``[B, 8, 8, c2]``, ``[B, 4, 4, c3]``,
      ``[B, 4, 4, c4]``: block outputs **post**-ReLU, before pooling (f1..f4, ``preact=False``).
    * ``stage1_preact``..``stage4_preact``: the same **before** the ReLU, i.e. the last BN's output
      (f1..f4 with ``preact=True``).
    * ``pooled``: ``[B, c4]`` globally averaged ``stage4``.
    * ``logits``: ``[B, num_classes]``.
  """
  config: Sequence[Sequence[int]] = VGG_CONFIGS["S"]
  num_classes: int = 100

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    _check_nhwc(self, x)
    if len(self.config) != 5:
      raise ValueError(f"CifarVGG config must list five blocks; got {len(self.config)}")
    input_height = x.shape[1]
    for block, widths in enumerate(self.config):
      # pool0..pool2 always; pool3 only when the input is 64x64 (Tiny-ImageNet-sized), exactly
      # the reference's rule.
      if block in (1, 2, 3) or (block == 4 and input_height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, width in enumerate(widths):
        if i > 0:
          x = nn.relu(x)
        x = _conv3x3(width, use_bias=True, name=f"block{block}_conv{i}")(x)
        x = _batch_norm(train, f"block{block}_bn{i}")(x)
      preact = x
      x = nn.relu(x)
      if block == 0:
        sow_feature(self, "stem", x)
      else:
        sow_feature(self, f"stage{block}", x)
        sow_feature(self, f"stage{block}_preact", preact)
    x = jnp.mean(x, axis=(1, 2))
    sow_feature(self, "pooled", x)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros, name="classifier")(x)
    sow_feature(self, "logits", logits)
    return logits


# --------------------------------------------------------------------------------------------
# Registry (names exactly as RepDistiller's ``models/__init__.py::model_dict``)
# --------------------------------------------------------------------------------------------


def _register_resnet(name: str, depth: int, widths: tuple[int, ...]) -> None:
  def factory(**kwargs) -> CifarResNet:
    return CifarResNet(**{"depth": depth, "widths": widths, **kwargs})
  factory.__name__ = name
  kind = "4x-wide " if widths[0] == 32 else ""
  register(name, input_shape=CIFAR_INPUT,
           description=f"{kind}CIFAR ResNet-{depth}, widths {widths} (RepDistiller resnet.py)")(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
  _register_resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
for _depth in (8, 32):
  _register_resnet(f"resnet{_depth}x4", _depth, (32, 64, 128, 256))


def _register_wrn(depth: int, widen_factor: int) -> None:
  name = f"wrn_{depth}_{widen_factor}"

  def factory(**kwargs) -> WideResNet:
    return WideResNet(**{"depth": depth, "widen_factor": widen_factor, **kwargs})
  factory.__name__ = name
  register(name, input_shape=CIFAR_INPUT,
           description=f"Wide ResNet WRN-{depth}-{widen_factor}, pre-activation (RepDistiller wrn.py)")(factory)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
  _register_wrn(_depth, _k)


def _register_wrn_bottom(depth: int, widen_factor: int) -> None:
  name = f"wrn_{depth}_{widen_factor}_bottom"

  def factory(**kwargs) -> WideResNet:
    return WideResNet(**{"depth": depth, "widen_factor": widen_factor, "num_groups": 2, **kwargs})
  factory.__name__ = name
  register(name, input_shape=CIFAR_INPUT,
           description=f"the first two groups of WRN-{depth}-{widen_factor} + own BN-ReLU, pool, fc on the 16x16 map "
                       "(Rocket Launching's 'bottom' light net)")(factory)


for _depth, _k in ((40, 1), (40, 2)):
  _register_wrn_bottom(_depth, _k)


def _register_vgg(name: str, config: str) -> None:
  def factory(**kwargs) -> CifarVGG:
    return CifarVGG(**{"config": VGG_CONFIGS[config], **kwargs})
  factory.__name__ = name
  register(name, input_shape=CIFAR_INPUT,
           description=f"CIFAR VGG with BatchNorm, config {config} (RepDistiller vgg.py {name}_bn)")(factory)


_register_vgg("vgg8", "S")
_register_vgg("vgg11", "A")
_register_vgg("vgg13", "B")
