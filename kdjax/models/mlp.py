"""Multi-layer perceptrons: Hinton's MNIST nets and Ba & Caruana's shallow mimic nets."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from kdjax.models.features import sow_feature
from kdjax.models.registry import register


class MLP(nn.Module):
  """ReLU MLP with optional input/hidden dropout and an optional linear bottleneck.

  ``bottleneck=k`` factors the first weight matrix as ``W = U V`` (Ba & Caruana 2014, §2.3):
  the input is first mapped to ``k`` units by a bias-free *linear* layer ``V`` (no
  non-linearity: it adds no representational power, it only constrains ``W`` to rank ``k``
  and cuts parameters from ``H*D`` to ``k*(H+D)``), then ``U`` maps to the hidden layer.

  Features: ``bottleneck`` (if any), ``pre_relu_0 … pre_relu_{n-1}`` (each hidden layer before its
  ReLU: the activations Lopes et al. 2017 record, :mod:`kdjax.methods.data_free`), ``hidden_0 …
  hidden_{n-1}`` (post-ReLU), ``logits``.
  Input: any ``[batch, ...]``; it is flattened.
  """
  hidden: Sequence[int] = (800, 800)
  num_classes: int = 10
  bottleneck: int | None = None
  dropout_input: float = 0.0
  dropout_hidden: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_input, deterministic=not train)(x)
    if self.bottleneck:
      x = nn.Dense(self.bottleneck, use_bias=False, name="linear_bottleneck")(x)
      sow_feature(self, "bottleneck", x)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      sow_feature(self, f"pre_relu_{i}", x)
      x = nn.relu(x)
      sow_feature(self, f"hidden_{i}", x)
      x = nn.Dropout(self.dropout_hidden, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, name="head")(x)
    sow_feature(self, "logits", logits)
    return logits


@register("mlp", input_shape=(28, 28, 1),
          description="ReLU MLP (default 784-800-800-10, Hinton 2015's MNIST student)")
def mlp(**kwargs) -> MLP:
  return MLP(**kwargs)


@register("mlp_teacher", input_shape=(28, 28, 1),
          description="784-1200-1200-10 ReLU MLP with dropout 0.2/0.5 (Hinton 2015's MNIST teacher)")
def mlp_teacher(**kwargs) -> MLP:
  kwargs = {"hidden": (1200, 1200), "dropout_input": 0.2, "dropout_hidden": 0.5, **kwargs}
  return MLP(**kwargs)


@register("mimic_mlp", input_shape=(28, 28, 1),
          description="shallow mimic net: linear bottleneck 64 then one ReLU layer of 2000 (Ba & Caruana 2014)")
def mimic_mlp(**kwargs) -> MLP:
  kwargs = {"hidden": (2000,), "bottleneck": 64, **kwargs}
  return MLP(**kwargs)
