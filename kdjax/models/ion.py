"""Inside-Outside Net (Bell, Zitnick, Bala & Girshick, "Inside-Outside Net: Detecting Objects
in Context with Skip Pooling and Recurrent Neural Networks", CVPR 2016), as an image-level
backbone.

ION is a Fast R-CNN detector on VGG-16 with two additions, both kept here:

* **Outside (context)**: a 2x stacked four-directional IRNN over conv5_3 (paper Fig. 3). A 1x1
  conv computes the input-to-hidden term once and it is copied to four plain ReLU RNNs sweeping
  the map left-to-right, right-to-left, top-to-bottom and bottom-to-top,
  ``h_t = max(W_hh h_{t-1} + x_t, 0)`` (paper Eq. 1), with ``W_hh`` initialised to the identity
  ("IRNN", Le et al. 2015). The four outputs are concatenated (4 x 512), a 1x1 conv merges the
  first IRNN's hidden-to-output with the second's input-to-hidden, the second IRNN runs, and a
  1x1 conv + ReLU gives 512-channel context features the size of conv5. After two stacked
  sweeps every position has seen the whole image.
* **Inside (skip pooling)**: descriptors are pooled from conv3_3, conv4_3, conv5_3 and the
  context features, each L2-normalised, concatenated, re-scaled by a learned per-channel scale
  and reduced by a 1x1 conv to 512 x 7 x 7, the shape VGG-16's fc6 expects.

There are no region proposals here: the whole image is the single region of interest, so the
ROI max-pooling becomes an adaptive max pool of each map to ``roi_size x roi_size`` (7, as in
the paper; 1 gives plain global max pooling). fc6/fc7 (4096, as VGG-16) then give an
image-level feature (``embedding``) and a linear layer the logits. The optional semantic
segmentation regulariser and the box-regression head are detection-specific and omitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.conv import Conv
from kdjax.models.features import sow_feature
from kdjax.models.registry import register
from kdjax.models.server import VGG16_STAGES
from kdjax.models.zoo_layers import adaptive_pool, check_nhwc, conv_init, l2_normalize, vgg_fc_head

DIRECTIONS = ("right", "left", "down", "up")


def _identity_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """IRNN initialisation: the recurrent matrix starts as the identity, so at first each sweep
  simply accumulates (ReLU-clipped) inputs along its direction, and gradients pass back along
  the sequence unscaled (Le et al. 2015's remedy for vanishing/exploding gradients)."""
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


def irnn_sweep(x: jax.Array, w_hh: jax.Array | None, axis: int, reverse: bool) -> jax.Array:
  """One directional ReLU RNN over a feature map with ``jax.lax.scan``.

  Args:
    x: ``[B, H, W, C]``, the input-to-hidden term at each position (already computed by a 1x1
      conv, so the recurrence needs no input matrix).
    w_hh: ``[C, C]`` hidden-to-hidden matrix, or ``None`` for the identity (a pure accumulator;
      the paper reports similar accuracy).
    axis: 2 to sweep along rows (left/right), 1 along columns (down/up).
    reverse: sweep from the last position to the first.

  Returns:
    ``[B, H, W, C]`` hidden states, ``h_t = relu(h_{t-1} @ w_hh + x_t)``, ``h_{-1} = 0``.
  """
  steps = jnp.moveaxis(x, axis, 0)  # [L, B, other, C]: scan over the swept axis

  def step(h, x_t):
    recurrent = h if w_hh is None else h @ w_hh
    h = nn.relu(recurrent + x_t)
    return h, h

  _, hidden = jax.lax.scan(step, jnp.zeros_like(steps[0]), steps, reverse=reverse)
  return jnp.moveaxis(hidden, 0, axis)


class FourDirectionIRNN(nn.Module):
  """Four IRNN sweeps (right, left, down, up) of the same input; outputs concatenated.

  ``[B, H, W, C] -> [B, H, W, 4C]``. Each direction has its own identity-initialised ``C x C``
  recurrent matrix (``learn_recurrence=False`` fixes them to the identity, no parameters).
  """
  learn_recurrence: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    outputs = []
    for direction in DIRECTIONS:
      w_hh = (self.param(f"w_hh_{direction}", _identity_init, (channels, channels))
              if self.learn_recurrence else None)
      axis = 2 if direction in ("right", "left") else 1
      outputs.append(irnn_sweep(x, w_hh, axis, reverse=direction in ("left", "up")))
    return jnp.concatenate(outputs, axis=-1)


class IRNNContext(nn.Module):
  """ION's context module (paper Fig. 3): 1x1 conv, 4-dir IRNN, 1x1 conv, 4-dir IRNN,
  1x1 conv + ReLU. ``[B, H, W, C_in] -> [B, H, W, features]`` (same grid as conv5)."""
  hidden: int = 512
  features: int = 512
  learn_recurrence: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Input-to-hidden transition, shared by the four directions ("4x copy" in Fig. 3).
    h = Conv(self.hidden, (1, 1), kernel_init=conv_init, name="input_to_hidden1")(x)
    h = FourDirectionIRNN(self.learn_recurrence, name="irnn1")(h)
    # One 1x1 conv plays the first IRNN's hidden-to-output and the second's input-to-hidden.
    h = Conv(self.hidden, (1, 1), kernel_init=conv_init, name="input_to_hidden2")(h)
    h = FourDirectionIRNN(self.learn_recurrence, name="irnn2")(h)
    return nn.relu(Conv(self.features, (1, 1), kernel_init=conv_init,
                        name="hidden_to_output")(h))


class ION(nn.Module):
  """Inside-Outside Net as an image classifier / feature extractor (see the module docstring).

  Input ``[B, H, W, 3]`` (224 standard; >= 32). Features: ``stage1`` … ``stage5`` (VGG-16's
  conv1_2 … conv5_3, post-ReLU; no pool5, as in Fast R-CNN, so conv5 is H/16), ``context``
  (``[B, H/16, W/16, 512]``), ``pooled`` (the fused skip-pooled descriptor,
  ``[B, roi_size, roi_size, 512]``), ``embedding`` (fc7, ``[B, 4096]``), ``logits``.

  Attributes:
    roi_size: side of the pooled grid (whole image as the one ROI).
    skip_scale_init: initial value of the per-channel scale after L2 normalisation. Unit-norm
      descriptors are orders of magnitude smaller than raw VGG activations; a large initial scale
      (1000, our reading of the paper's choice) restores the magnitude fc6 was trained on.
    learn_recurrence: learn the IRNN matrices (identity-initialised) or fix them to identity.
  """
  num_classes: int = 1000
  roi_size: int = 7
  context_hidden: int = 512
  learn_recurrence: bool = True
  skip_scale_init: float = 1000.0
  fused_channels: int = 512
  fc_features: int = 4096
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_nhwc(self, x)
    maps = {}
    for i, widths in enumerate(VGG16_STAGES):
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j, width in enumerate(widths):
        x = nn.relu(Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                         name=f"conv{i + 1}_{j + 1}")(x))
      maps[f"stage{i + 1}"] = x
      sow_feature(self, f"stage{i + 1}", x)
    context = IRNNContext(self.context_hidden, VGG16_STAGES[-1][-1], self.learn_recurrence,
                          name="context_module")(x)
    sow_feature(self, "context", context)

    # Skip pooling: pool each map over the whole-image ROI, L2-normalise per position across
    # channels (so layers with very different activation scales contribute comparably),
    # concatenate, re-scale, reduce with a 1x1 conv.
    grid = (self.roi_size, self.roi_size)
    pooled = [l2_normalize(adaptive_pool(m, grid, jnp.max))
              for m in (maps["stage3"], maps["stage4"], maps["stage5"], context)]
    x = jnp.concatenate(pooled, axis=-1)
    scale = self.param("skip_scale", nn.initializers.constant(self.skip_scale_init),
                       (x.shape[-1],))
    x = Conv(self.fused_channels, (1, 1), kernel_init=conv_init, name="skip_fuse")(x * scale)
    sow_feature(self, "pooled", x)

    return vgg_fc_head(self, x, fc_features=self.fc_features, num_classes=self.num_classes, dropout=self.dropout,
                       train=train)


@register("ion", input_shape=(224, 224, 3),
          description="Inside-Outside Net (Bell et al. 2016): VGG-16, 2x 4-dir IRNN context, "
                      "skip pooling over the whole image")
def ion(**kwargs) -> ION:
  return ION(**kwargs)
