"""Embedding models for metric learning (DarkRank, re-identification): a classifier whose penultimate layer is
an embedding, exposed as the feature ``embedding`` (L2-normalised where asked) for rank losses and retrieval."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.features import sow_feature
from kdjax.models.registry import register


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(‖x‖₂, eps)`` along the last axis (``torch.nn.functional.normalize``; a zero row stays zero)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class EmbeddingMLP(nn.Module):
  """ReLU MLP -> linear embedding -> linear classifier.

  The layout of the DarkRank authors' ``reid.py`` on an MLP trunk: the classifier reads the embedding as it is,
  and the metric losses and retrieval read its L2-normalised copy (their ``l2_norm`` layer).

  Features: ``hidden_0 … hidden_{n-1}`` (post-ReLU), ``embedding_unnormalized`` (``[batch, embedding_dim]``),
  ``embedding`` (the same divided by its L2 norm when ``l2_normalize``, else identical), ``logits``.
  Input: any ``[batch, ...]``; it is flattened.

  Attributes:
    hidden: widths of the ReLU layers before the embedding.
    embedding_dim: the embedding's width.
    num_classes: classifier outputs.
    l2_normalize: whether the ``embedding`` feature is L2-normalised.
    dropout_hidden: dropout after each hidden layer in training.
  """
  hidden: Sequence[int] = (256,)
  embedding_dim: int = 64
  num_classes: int = 10
  l2_normalize: bool = True
  dropout_hidden: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
      sow_feature(self, f"hidden_{i}", x)
      x = nn.Dropout(self.dropout_hidden, deterministic=not train)(x)
    embedding = nn.Dense(self.embedding_dim, name="projection")(x)
    sow_feature(self, "embedding_unnormalized", embedding)
    sow_feature(self, "embedding", l2_normalize(embedding) if self.l2_normalize else embedding)
    logits = nn.Dense(self.num_classes, name="head")(embedding)
    sow_feature(self, "logits", logits)
    return logits


@register("embedding_mlp", input_shape=(28, 28, 1),
          description="ReLU MLP with a linear embedding layer (feature 'embedding', L2-normalised) and a linear "
                      "classifier on it (default 784-256-64-10; DarkRank's small-scale teacher)")
def embedding_mlp(**kwargs) -> EmbeddingMLP:
  return EmbeddingMLP(**kwargs)
