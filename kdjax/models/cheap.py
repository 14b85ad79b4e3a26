"""Cheap convolution blocks and the nets built from them (Crowley, Gray & Storkey, "Moonshine: Distilling
with Cheap Convolutions", NeurIPS 2018; PAPERS.md §11).

Moonshine's students are the teacher's architecture with every 3×3 convolution of each residual block
replaced by a cheap block (§11(a)); stems, heads and the 1×1 shortcut convolutions stay as they are.
With ``N`` input and ``M`` output channels (``N = M`` inside a group), the blocks are:

* ``conv`` — the standard dense 3×3 convolution (the teacher; ``9·N·M`` weights).
* ``G(g)`` — grouped + pointwise: a 3×3 convolution ``N → N`` in ``g`` groups (each filter sees ``N/g``
  channels; ``9·N²/g`` weights), BatchNorm, ReLU, then a 1×1 convolution ``N → M`` (``N·M`` weights). The
  stride, if any, is on the grouped convolution.
* depthwise — ``G(N)``: the grouped convolution with one channel per group (``9·N`` weights).
* ``B(b)`` — bottleneck: 1×1 ``N → M/b``, BN-ReLU, 3×3 ``M/b → M/b``, BN-ReLU, 1×1 ``M/b → M``.
* ``BG(b, g)`` — bottleneck + grouped: as ``B(b)`` with the 3×3 convolution in ``g`` groups.

The block replaces the convolution only; the BN-ReLU that the residual block applies around each
convolution is the residual block's own, so a cheap block's output goes through it as before.

**Groups versus channels per group.** The paper's ``G(g)`` is *g groups*. The official code
(``BayesWatch/pytorch-moonshine``, ``models/blocks.py``) has both conventions, and its ``G`` letter means
the other one: ``DConvA{g}`` and ``A{g}B{b}`` use **g groups**, but ``DConvG{k}`` and ``G{k}B{b}`` use
``groups = channels / k``, i.e. **k channels per group**. kdjax therefore never uses a bare number for a
grouping: :class:`CheapBlock` takes ``groups=`` (number of groups) or ``channels_per_group=`` or
``depthwise=True``, and :func:`parse_block` reads these strings:

=================  =====================================================  =================================
string             meaning                                                :class:`CheapBlock`
=================  =====================================================  =================================
``conv``           dense 3×3 (the teacher's block)                        ``CheapBlock()``
``G(4)``           paper notation: 4 groups, + pointwise                  ``groups=4``
``G(N)``, ``DW``   depthwise + pointwise                                  ``depthwise=True``
``B(2)``           bottleneck, 3×3 on ``M/2`` channels                    ``bottleneck=2``
``BG(2,4)``        bottleneck ``M/2``, 3×3 in 4 groups                    ``bottleneck=2, groups=4``
``DConvA4``        code name: 4 groups, + pointwise  (= ``G(4)``)         ``groups=4``
``DConvG8``        code name: **8 channels per group**, + pointwise       ``channels_per_group=8``
``DConv``          code name: depthwise + pointwise                       ``depthwise=True``
``ConvB2``         code name: bottleneck 2 (= ``B(2)``)                   ``bottleneck=2``
``A4B2``           code name: bottleneck 2, 4 groups (= ``BG(2,4)``)      ``bottleneck=2, groups=4``
``G8B2``           code name: bottleneck 2, **8 channels per group**      ``bottleneck=2, channels_per_group=8``
``DConvB2``        code name: bottleneck 2, depthwise 3×3                 ``bottleneck=2, depthwise=True``
=================  =====================================================  =================================

So ``G8B2`` on a 64-channel block has a 32-channel bottleneck in 32/8 = 4 groups — the same layer as
``BG(2,4)`` there, but ``G8B2`` on 128 channels has 8 groups. The bottleneck width is ``M/b`` (the block's
*output* channels over b), as in the code's ``out_planes // b``.

Nets (all registered, see ``kdjax list models``):

* :class:`CheapWideResNet` — the zoo's :class:`kdjax.models.cifar.WideResNet` (pre-activation blocks) with
  ``block`` in both 3×3 convolutions of every residual block. ``block='conv'`` is exactly the zoo's WRN
  (same parameter tree and outputs); the features are the same (``stage1..3`` group outputs before the
  BN-ReLU, the tensors the official code's attention transfer uses), so AT hooks are unchanged. Registered
  as ``wrn_{d}_{k}_{block}`` for WRN-40-2, WRN-16-2 and the small protocol nets WRN-10-1 / WRN-10-2 (also
  registered as plain ``wrn_10_1``/``wrn_10_2``), with blocks ``g2``, ``g4`` (2 / 4 **groups**), ``dw``
  (depthwise), ``b2`` and ``bg2_4`` (bottleneck 2, 4 groups).
* :class:`CheapResNet` — the ImageNet ResNet-34 layout (7×7/2 stem, max pool, basic blocks (3, 4, 6, 3),
  widths 64…512, post-activation as torchvision and the official ``models/resnet.py``) with ``block`` in
  both 3×3 convolutions of each basic block; ``resnet34_imagenet`` and ``resnet34_imagenet_{block}``,
  224×224 inputs; features ``stage1..4`` (the four group outputs Moonshine's ImageNet AT uses).

Parameters follow the official code: bias-free convolutions, ``N(0, 2 / (k·k·out))`` initialisation
(``fan_out`` counts the full output channels, grouped or not, as PyTorch does), BatchNorm momentum 0.9
(PyTorch 0.1), epsilon 1e-5, scale 1 and offset 0.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.batch_norm import BatchNorm
from kdjax.models.cifar import CIFAR_INPUT, PreActBlock, _check_nhwc, _torch_linear_kernel_init
from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register
from kdjax.models.zoo_layers import ConvBN, pooled_classifier

__all__ = ["BLOCK_NAMES", "CheapBlock", "CheapConv", "CheapResNet", "CheapWideResNet", "parse_block"]

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class CheapBlock:
  """What replaces one 3×3 convolution (see the module docstring for the paper and code names).

  Attributes:
    groups: the 3×3 convolution is split into this many groups (paper ``G(g)``, code ``DConvA{g}``).
    channels_per_group: the 3×3 convolution has groups of this many channels, ``groups = C / k`` (code
      ``DConvG{k}`` / ``G{k}B{b}``).
    depthwise: one channel per group (paper ``G(N)``, code ``DConv``).
    bottleneck: ``b``: 1×1 down to ``M/b`` channels before the 3×3 and 1×1 back up after it (paper ``B(b)``
      or, with a grouping, ``BG(b, g)``). ``None``: no bottleneck.

  At most one of ``groups``, ``channels_per_group``, ``depthwise`` may be set. With none of them and no
  bottleneck the block is the dense 3×3 convolution itself. ``groups=1`` is *not* the dense convolution:
  it is ``G(1)``, a dense 3×3 ``N → N`` followed by BN-ReLU and a 1×1 ``N → M``.
  """
  groups: int | None = None
  channels_per_group: int | None = None
  depthwise: bool = False
  bottleneck: int | None = None

  def __post_init__(self):
    chosen = [n for n, v in (("groups", self.groups), ("channels_per_group", self.channels_per_group),
                             ("depthwise", self.depthwise or None)) if v is not None]
    if len(chosen) > 1:
      raise ValueError(f"CheapBlock: give at most one of groups=, channels_per_group=, depthwise=; got "
                       f"{', '.join(chosen)} ({self})")
    for name in ("groups", "channels_per_group", "bottleneck"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"CheapBlock: {name} must be a positive integer or None; got {value!r}")

  @property
  def grouped(self) -> bool:
    return self.groups is not None or self.channels_per_group is not None or self.depthwise

  @property
  def is_dense(self) -> bool:
    """The standard 3×3 convolution (nothing is replaced)."""
    return not self.grouped and self.bottleneck is None

  def num_groups(self, channels: int, *, layer: str = "") -> int:
    """The group count of the 3×3 convolution over ``channels`` input channels (1 if not grouped).

    Raises ValueError naming ``layer``, the channels, the grouping and the valid choices when it does not
    divide.
    """
    if self.depthwise:
      return channels
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    where = f"layer {layer!r}: " if layer else ""
    if self.groups is not None:
      if channels % self.groups:
        raise ValueError(
            f"{where}{self.label()} splits the 3×3 convolution's {channels} input channels into {self.groups} "
            f"groups, but {self.groups} does not divide {channels}; valid group counts for {channels} channels: "
            f"{', '.join(map(str, divisors))} (or use channels_per_group= / depthwise=)")
      return self.groups
    if self.channels_per_group is not None:
      if channels % self.channels_per_group:
        raise ValueError(
            f"{where}{self.label()} asks for groups of {self.channels_per_group} channels, but "
            f"{self.channels_per_group} does not divide the 3×3 convolution's {channels} input channels; valid "
            f"channels_per_group for {channels} channels: {', '.join(map(str, divisors))}")
      return channels // self.channels_per_group
    return 1

  def bottleneck_width(self, out_channels: int, *, layer: str = "") -> int:
    """``M / b``; raises ValueError (naming the layer and valid factors) when ``b`` does not divide ``M``."""
    b = self.bottleneck or 1
    if out_channels % b:
      divisors = [d for d in range(1, out_channels + 1) if out_channels % d == 0]
      where = f"layer {layer!r}: " if layer else ""
      raise ValueError(
          f"{where}{self.label()} reduces the block's {out_channels} output channels by the bottleneck factor "
          f"{b}, but {b} does not divide {out_channels}; valid factors: {', '.join(map(str, divisors))}")
    return out_channels // b

  def label(self) -> str:
    """The paper-style name: ``conv``, ``G(4)``, ``G(N)``, ``G(N/8)`` (8 channels per group), ``B(2)``,
    ``BG(2,4)``, ``BG(2,N/8)``, ``BG(2,N)``."""
    if self.depthwise:
      g = "N"
    elif self.groups is not None:
      g = str(self.groups)
    elif self.channels_per_group is not None:
      g = f"N/{self.channels_per_group}"
    else:
      g = None
    if self.bottleneck is None:
      return "conv" if g is None else f"G({g})"
    return f"B({self.bottleneck})" if g is None else f"BG({self.bottleneck},{g})"


_PAPER = re.compile(r"^(?:(G)\((\d+|N|N/\d+)\)|(B)\((\d+)\)|(BG)\((\d+),(\d+|N|N/\d+)\))$")
_CODE = re.compile(r"^(?:DConv(?:(A|G)(\d+))?|ConvB(\d+)|(A|G)(\d+)B(\d+)|DConvB(\d+))$")


def _grouping(letter: str, value: str) -> dict:
  if value == "N":
    return {"depthwise": True}
  if value.startswith("N/"):  # the label of k channels per group: g = N/k
    return {"channels_per_group": int(value[2:])}
  return {"groups": int(value)} if letter == "A" else {"channels_per_group": int(value)}


def parse_block(spec: str | CheapBlock | None) -> CheapBlock:
  """A :class:`CheapBlock` from a paper-style or official-code name (table in the module docstring).

  Paper style (``G(g)`` = g groups): ``conv``, ``G(4)``, ``G(N)``/``DW``/``depthwise``, ``G(N/8)`` (8
  channels per group), ``B(2)``, ``BG(2,4)``, ``BG(2,N/8)`` — every :meth:`CheapBlock.label` parses back.
  Code style (``A`` = groups, ``G`` = channels per group): ``DConvA4``, ``DConvG8``, ``DConv``, ``ConvB2``,
  ``A4B2``, ``G8B2``, ``DConvB2``; ``Conv`` is the dense convolution.
  """
  if isinstance(spec, CheapBlock):
    return spec
  if spec is None:
    return CheapBlock()
  if not isinstance(spec, str):
    raise TypeError(f"a cheap block is a CheapBlock or a name such as 'G(4)' or 'DConvG8'; got {spec!r}")
  text = spec.strip()
  if text.lower() in ("conv", "dense"):
    return CheapBlock()
  if text.lower() in ("dw", "depthwise"):
    return CheapBlock(depthwise=True)
  m = _PAPER.match(text.replace(" ", ""))
  if m:
    if m.group(1):
      return CheapBlock(**_grouping("A", m.group(2)))
    if m.group(3):
      return CheapBlock(bottleneck=int(m.group(4)))
    return CheapBlock(bottleneck=int(m.group(6)), **_grouping("A", m.group(7)))
  m = _CODE.match(text)
  if m:
    if text.startswith("DConvB"):
      return CheapBlock(bottleneck=int(m.group(7)), depthwise=True)
    if text.startswith("DConv"):
      return CheapBlock(depthwise=True) if m.group(1) is None else CheapBlock(**_grouping(m.group(1), m.group(2)))
    if text.startswith("ConvB"):
      return CheapBlock(bottleneck=int(m.group(3)))
    return CheapBlock(bottleneck=int(m.group(6)), **_grouping(m.group(4), m.group(5)))
  raise ValueError(
      f"unknown cheap block {spec!r}; expected a paper name — 'conv', 'G(g)' (g groups), 'G(N)' or 'DW' "
      "(depthwise), 'B(b)', 'BG(b,g)' — or an official-code name — 'DConvA<g>' (g groups), 'DConvG<k>' (k "
      "channels per group), 'DConv', 'ConvB<b>', 'A<g>B<b>', 'G<k>B<b>', 'DConvB<b>'")


# Registry suffixes (``wrn_40_2_g4`` …) and their blocks; ``g4`` is 4 GROUPS (the paper's G(4)).
BLOCK_NAMES: dict[str, CheapBlock] = {
    "g2": CheapBlock(groups=2),
    "g4": CheapBlock(groups=4),
    "dw": CheapBlock(depthwise=True),
    "b2": CheapBlock(bottleneck=2),
    "bg2_4": CheapBlock(bottleneck=2, groups=4),
}


def _batch_norm(train: bool, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def grouped_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]], groups: int) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, strides, padding, feature_group_count=groups)`` for NHWC/HWIO,
  computed the way XLA:CPU runs fast.

  XLA:CPU's grouped convolutions, and above all their gradients, are one to two orders of magnitude slower
  than the dense ones (about 10 s per step for a WRN-10-1 with G(4) blocks at batch 128 on 2 cores, against
  0.4 s for the dense net), so:

  * one group: kdjax's convolution (:func:`kdjax.models.conv.conv_general_dilated`, oneDNN on CPU);
  * depthwise (one input and one output channel per group): the sum over kernel taps of shifted, strided
    slices of the padded input times the tap's per-channel weights (elementwise work, fast in both
    directions);
  * otherwise: one dense convolution per group on its channel slice (kdjax's convolution again), concatenated.

  Same values as the grouped convolution up to float rounding, and the same parameter layout (HWIO with
  ``I = C_in / groups``), so checkpoints are interchangeable; gradients of any order are those of these
  operations.
  """
  from kdjax.models.conv import conv_general_dilated
  dn = ("NHWC", "HWIO", "NHWC")
  cin, cout = x.shape[-1], kernel.shape[-1]
  if cin % groups or cout % groups or kernel.shape[2] != cin // groups:
    raise ValueError(f"grouped_conv: {groups} groups need input channels {cin} and output channels {cout} "
                     f"divisible by {groups} and a kernel with {cin // max(groups, 1)} input channels; got kernel "
                     f"{kernel.shape}")
  if groups == 1:
    return conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)
  if kernel.shape[2] == 1 and cout == cin:  # depthwise, channel multiplier 1
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
      for j in range(kw):
        tap = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out
  cin_g, cout_g = cin // groups, cout // groups
  outs = [conv_general_dilated(x[..., g * cin_g:(g + 1) * cin_g], kernel[..., g * cout_g:(g + 1) * cout_g],
                               strides, padding, dimension_numbers=dn) for g in range(groups)]
  return jnp.concatenate(outs, axis=-1)


def _grouped_conv_fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                     preferred_element_type=None):
  """``flax.linen.Conv``'s ``conv_general_dilated`` hook routing grouped NHWC convolutions to
  :func:`grouped_conv` (Flax passes explicit paddings and NHWC/HWIO dimension numbers)."""
  del lhs_dilation, rhs_dilation, dimension_numbers, batch_group_count, precision, preferred_element_type
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return grouped_conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, feature_group_count)


def _conv(features: int, kernel: int, strides: int = 1, groups: int = 1, *, name: str) -> nn.Conv:
  pad = kernel // 2
  padding = ((pad, pad), (pad, pad))
  if groups == 1:
    return Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, use_bias=False,
                kernel_init=_conv_init, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, feature_group_count=groups,
                 use_bias=False, kernel_init=_conv_init, conv_general_dilated=_grouped_conv_fn, name=name)


class CheapConv(nn.Module):
  """A cheap replacement for one 3×3 convolution ``[B, H, W, N] -> [B, H/strides, W/strides, features]``.

  Layers (parameter names): grouped/depthwise ``G``: ``grouped`` (3×3, ``N → N``, g groups), ``bn``,
  ReLU, ``pointwise`` (1×1, ``N → M``). Bottleneck ``B``/``BG``: ``reduce`` (1×1, ``N → M/b``), ``bn1``,
  ReLU, ``conv`` (3×3, ``M/b → M/b``, g groups for BG), ``bn2``, ReLU, ``expand`` (1×1, ``M/b → M``).
  The stride is on the 3×3 convolution (as the official code). A dense ``block`` is a plain 3×3 convolution
  (parameter ``kernel``), but nets call :func:`cheap_conv3x3`, which gives it the zoo's parameter path.

  Attributes:
    features: ``M``, the output channels.
    strides: the 3×3 convolution's stride.
    block: a :class:`CheapBlock` or a name for :func:`parse_block`.
  """
  features: int
  strides: int = 1
  block: CheapBlock | str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    block = parse_block(self.block)
    layer = "/".join(self.scope.path) if self.scope is not None else ""
    channels = x.shape[-1]
    if block.is_dense:
      return _conv(self.features, 3, self.strides, name="conv")(x)
    if block.bottleneck is None:
      groups = block.num_groups(channels, layer=layer)
      y = _conv(channels, 3, self.strides, groups, name="grouped")(x)
      y = nn.relu(_batch_norm(train, "bn")(y))
      return _conv(self.features, 1, name="pointwise")(y)
    width = block.bottleneck_width(self.features, layer=layer)
    groups = block.num_groups(width, layer=layer)
    y = nn.relu(_batch_norm(train, "bn1")(_conv(width, 1, name="reduce")(x)))
    y = nn.relu(_batch_norm(train, "bn2")(_conv(width, 3, self.strides, groups, name="conv")(y)))
    return _conv(self.features, 1, name="expand")(y)


def cheap_conv3x3(features: int, strides: int, block: CheapBlock, *, name: str):
  """The 3×3 convolution of a residual block: the zoo's own ``Conv`` (parameters ``name/kernel``) when the
  block is dense, else a :class:`CheapConv` named ``name``."""
  if block.is_dense:
    return _conv(features, 3, strides, name=name)
  return CheapConv(features, strides, block, name=name)


class CheapPreActBlock(nn.Module):
  """:class:`kdjax.models.cifar.PreActBlock` with both 3×3 convolutions replaced by ``block``; the 1×1
  projection shortcut stays dense. Returns ``(out, bn1_out)`` as the zoo block does."""
  features: int
  strides: int = 1
  dropout: float = 0.0
  block: CheapBlock | str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    block = parse_block(self.block)
    normed = _batch_norm(train, "bn1")(x)
    activated = nn.relu(normed)
    y = cheap_conv3x3(self.features, self.strides, block, name="conv1")(activated, **_train(block, train))
    y = nn.relu(_batch_norm(train, "bn2")(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = cheap_conv3x3(self.features, 1, block, name="conv2")(y, **_train(block, train))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.strides, name="shortcut")(activated)  # never replaced (§11(c))
    else:
      shortcut = x
    return y + shortcut, normed


def _train(block: CheapBlock, train: bool) -> dict:
  return {} if block.is_dense else {"train": train}


class CheapWideResNet(nn.Module):
  """WRN-d-k (:class:`kdjax.models.cifar.WideResNet`) with every residual block's two 3×3 convolutions
  replaced by ``block`` (Moonshine's structural distillation, §11(a)).

  Same stem (a dense 3×3 conv), groups, strides, head, parameter names and features as the zoo's WRN —
  ``stem``, ``stage1..3`` (the raw group outputs before the BN-ReLU, where Moonshine's and the
  attention-transfer code's AT is taken), ``stage1_preact..stage3_preact``, ``pooled``, ``logits`` — so
  ``block='conv'`` is the zoo's net. Input ``[B, H, W, C]`` (32×32×3 for CIFAR; any size works).

  Attributes:
    depth: ``6n + 4``.
    widen_factor: k; widths ``16k, 32k, 64k``.
    block: :class:`CheapBlock` or name (``'G(4)'``, ``'DConvG8'``, …).
    num_classes, dropout: as the zoo's WRN.
  """
  depth: int = 16
  widen_factor: int = 1
  num_classes: int = 10
  dropout: float = 0.0
  block: CheapBlock | str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    _check_nhwc(self, x)
    block = parse_block(self.block)
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"CheapWideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got {self.depth}")
    blocks_per_group = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    x = _conv(16, 3, name="conv1")(x)
    sow_feature(self, "stem", x)
    for group, width in enumerate(widths):
      for i in range(blocks_per_group):
        strides = 2 if group > 0 and i == 0 else 1
        name = f"block{group + 1}_{i}"
        if block.is_dense:  # exactly the zoo's block (same module class and parameter tree)
          x, normed_input = PreActBlock(width, strides, self.dropout, name=name)(x, train=train)
        else:
          x, normed_input = CheapPreActBlock(width, strides, self.dropout, block, name=name)(x, train=train)
        if group > 0 and i == 0:
          sow_feature(self, f"stage{group}_preact", normed_input)
      sow_feature(self, f"stage{group + 1}", x)
    x = _batch_norm(train, "bn_final")(x)
    sow_feature(self, "stage3_preact", x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    sow_feature(self, "pooled", x)
    logits = nn.Dense(self.num_classes, kernel_init=_torch_linear_kernel_init, bias_init=nn.initializers.zeros,
                      name="fc")(x)
    sow_feature(self, "logits", logits)
    return logits


class CheapBasicBlock(nn.Module):
  """Post-activation ResNet basic block (torchvision, official ``models/resnet.py``) with cheap 3×3s:
  ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)``, shortcut = dense 1×1 conv + BN when the shape
  changes."""
  features: int
  strides: int = 1
  block: CheapBlock | str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    block = parse_block(self.block)
    y = cheap_conv3x3(self.features, self.strides, block, name="conv1")(x, **_train(block, train))
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = cheap_conv3x3(self.features, 1, block, name="conv2")(y, **_train(block, train))
    y = _batch_norm(train, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = ConvBN(self.features, (1, 1), self.strides, act=None, name="downsample")(x, train=train)
    return nn.relu(x + y)


class CheapResNet(nn.Module):
  """ImageNet ResNet with basic blocks (ResNet-34 by default) and cheap 3×3 convolutions in the blocks.

  7×7/2 conv-BN-ReLU stem and 3×3/2 max pool (dense), stages of basic blocks (widths 64·2^i, strides
  1, 2, 2, 2), global average pool, FC. Input ``[B, H, W, 3]`` (224 standard; ≥ 32). Features: ``stem``,
  ``stage1..4`` (post-ReLU block outputs, H/4 … H/32: Moonshine's four ImageNet AT points), ``pooled``,
  ``logits``. ``block='conv'`` has torchvision ResNet-34's 21.8M parameters.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  width: int = 64
  block: CheapBlock | str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    _check_nhwc(self, x)
    block = parse_block(self.block)
    x = ConvBN(self.width, (7, 7), 2, name="conv1")(x, train=train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    sow_feature(self, "stem", x)
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = CheapBasicBlock(self.width * 2**i, strides, block, name=f"layer{i + 1}_{j}")(x, train=train)
      sow_feature(self, f"stage{i + 1}", x)
    return pooled_classifier(self, x, num_classes=self.num_classes, train=train, name="fc")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _describe(block: CheapBlock) -> str:
  if block.is_dense:
    return "dense 3×3 convolutions"
  return {"g2": "G(2): 3×3 in 2 groups + 1×1 (code DConvA2)",
          "g4": "G(4): 3×3 in 4 groups + 1×1 (code DConvA4)",
          "dw": "G(N): depthwise 3×3 + 1×1 (code DConv)",
          "b2": "B(2): 1×1 to M/2, 3×3, 1×1 up (code ConvB2)",
          "bg2_4": "BG(2,4): 1×1 to M/2, 3×3 in 4 groups, 1×1 up (code A4B2)"}[
              next(k for k, v in BLOCK_NAMES.items() if v == block)]


def _register_wrn(depth: int, k: int, suffix: str | None) -> None:
  block = BLOCK_NAMES[suffix] if suffix else CheapBlock()
  name = f"wrn_{depth}_{k}" + (f"_{suffix}" if suffix else "")

  def factory(**kwargs) -> CheapWideResNet:
    return CheapWideResNet(**{"depth": depth, "widen_factor": k, "block": block, **kwargs})
  factory.__name__ = name
  register(name, input_shape=CIFAR_INPUT,
           description=f"Moonshine student: WRN-{depth}-{k} with {_describe(block)} in every block")(factory)


def _register_plain_wrn(depth: int, k: int) -> None:
  name = f"wrn_{depth}_{k}"

  def factory(**kwargs) -> CheapWideResNet:
    return CheapWideResNet(**{"depth": depth, "widen_factor": k, **kwargs})
  factory.__name__ = name
  register(name, input_shape=CIFAR_INPUT,
           description=f"Wide ResNet WRN-{depth}-{k}, one block per group (the zoo's WideResNet; Moonshine's "
                       "small-scale teacher; model_kwargs block='G(4)' etc. makes it cheap)")(factory)


for _depth, _k in ((10, 1), (10, 2)):  # the small protocol nets (PAPERS.md §11(e)); WRN-16/40 are cifar.py's
  _register_plain_wrn(_depth, _k)
for _depth, _k in ((10, 1), (10, 2), (16, 2), (40, 2)):
  for _suffix in BLOCK_NAMES:
    _register_wrn(_depth, _k, _suffix)


def _register_resnet(suffix: str | None) -> None:
  block = BLOCK_NAMES[suffix] if suffix else CheapBlock()
  name = "resnet34_imagenet" + (f"_{suffix}" if suffix else "")

  def factory(**kwargs) -> CheapResNet:
    return CheapResNet(**{"block": block, **kwargs})
  factory.__name__ = name
  what = "ResNet-34 (torchvision layout, ImageNet)" if not suffix else (
      f"Moonshine student: ResNet-34 (ImageNet) with {_describe(block)} in every basic block")
  register(name, input_shape=(224, 224, 3), description=what)(factory)


_register_resnet(None)
for _suffix in BLOCK_NAMES:
  _register_resnet(_suffix)
