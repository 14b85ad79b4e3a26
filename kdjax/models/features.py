"""The one mechanism by which every kdjax model exposes named intermediate features.

A model calls :func:`sow_feature` (Flax ``sow`` into the ``intermediates`` collection) for
every tensor a distillation method may want: stage outputs, hidden layers, embeddings.
A feature name must differ from the names of the module's submodules (Flax scopes).
Sowing is free when nobody asks: Flax only records it when ``intermediates`` is mutable,
and under ``jit`` anything unused is removed.

:func:`apply_model` runs a model and returns its logits, the requested features by flat
name (``"stage1"``, or ``"block0/out"`` for a feature sown inside a submodule) and the new
BatchNorm statistics. Feature maps are NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from kdjax.errors import unknown_name

INTERMEDIATES = "intermediates"


def sow_feature(module: nn.Module, name: str, value: jax.Array) -> None:
  """Records ``value`` under ``name`` (only when the caller asked for features)."""
  module.sow(INTERMEDIATES, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


class ModelOutput(NamedTuple):
  """What :func:`apply_model` returns.

  Attributes:
    logits: ``[batch, classes]`` (or ``[batch, dim]`` for embedding models).
    features: flat ``{name: array}`` of the requested features (empty if none requested).
    batch_stats: updated BatchNorm statistics in training mode, else the ones passed in
      (``{}`` for models without BatchNorm).
  """
  logits: jax.Array
  features: dict[str, jax.Array]
  batch_stats: Any


def flatten_features(tree: Mapping[str, Any], prefix: str = "") -> dict[str, jax.Array]:
  """Flattens a nested ``intermediates`` dict into ``{"a/b": array}``."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_features(value, prefix=name + "/"))
    else:
      flat[name] = value
  return flat


def apply_model(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *,
                train: bool = False, rngs: Mapping[str, jax.Array] | None = None,
                features: Sequence[str] = (), **kwargs) -> ModelOutput:
  """Runs ``model`` and collects the named ``features``.

  Args:
    model: a kdjax model (any Flax module whose ``__call__`` takes ``x`` and ``train=``).
    variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` only if the model has BN).
    x: input batch.
    train: training mode (BatchNorm batch statistics, dropout on).
    rngs: e.g. ``{"dropout": key}``; needed when ``train`` and the model uses dropout.
    features: names of the features to return; an unknown name raises an error that lists
      every name the model exposes.
    **kwargs: passed to the model's ``__call__``.

  Returns:
    A :class:`ModelOutput`.
  """
  mutable = []
  has_bn = "batch_stats" in variables
  if train and has_bn:
    mutable.append("batch_stats")
  if features:
    mutable.append(INTERMEDIATES)
  variables = {k: v for k, v in variables.items() if k != INTERMEDIATES}
  if mutable:
    logits, updates = model.apply(variables, x, train=train, rngs=rngs, mutable=mutable, **kwargs)
  else:
    logits, updates = model.apply(variables, x, train=train, rngs=rngs, **kwargs), {}
  batch_stats = updates.get("batch_stats", variables.get("batch_stats", {}))
  selected = {}
  if features:
    available = flatten_features(updates.get(INTERMEDIATES, {}))
    for name in features:
      if name not in available:
        raise unknown_name(f"feature of {type(model).__name__}", name, available)
      selected[name] = available[name]
  return ModelOutput(logits, selected, batch_stats)


def feature_names(model: nn.Module, example_input: jax.Array, **kwargs) -> list[str]:
  """Lists the feature names ``model`` exposes, found by shape inference (no FLOPs)."""
  return describe(model, example_input.shape[1:], **kwargs)[1]


def describe(model: nn.Module, input_shape: tuple[int, ...], **kwargs) -> tuple[int, list[str]]:
  """``(parameter count, feature names)`` of ``model`` for one input of ``input_shape``, by one
  shape-only trace (no FLOPs, no memory for weights)."""
  def trace(x):
    variables = model.init(jax.random.key(0), x, train=False, **kwargs)
    _, updates = model.apply(variables, x, train=False, mutable=[INTERMEDIATES], **kwargs)
    return variables.get("params", {}), flatten_features(updates.get(INTERMEDIATES, {}))
  params, features = jax.eval_shape(trace, jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)), list(features)
