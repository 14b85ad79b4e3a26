"""One registry of model names, used by configs, the CLI and ``kdjax list models``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.errors import unknown_name


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model factory.

  Attributes:
    name: registry name, e.g. ``"mlp"`` or ``"resnet8x4"``.
    factory: ``factory(**kwargs) -> flax.linen.Module``.
    input_shape: shape of one example (no batch axis) the default configuration expects;
      used to count parameters and list feature names.
    description: one line for ``kdjax list models``.
  """
  name: str
  factory: Callable[..., nn.Module]
  input_shape: tuple[int, ...]
  description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, input_shape: tuple[int, ...], description: str):
  """Decorator registering ``factory`` under ``name``."""
  def decorate(factory):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelSpec(name, factory, tuple(input_shape), description)
    return factory
  return decorate


def names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` of ``name``; an unknown name lists the known ones."""
  if name not in _REGISTRY:
    raise unknown_name("model", name, _REGISTRY)
  return _REGISTRY[name]


def get(name: str, **kwargs) -> nn.Module:
  """Builds the model registered as ``name`` (e.g. ``get("mlp", hidden=(800, 800))``)."""
  factory = spec(name).factory
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise TypeError(f"model {name!r} rejected its arguments {sorted(kwargs)}: {e}") from e


def count_params(model: nn.Module, input_shape: tuple[int, ...]) -> int:
  """Number of parameters of ``model`` for one input of ``input_shape`` (shape inference only)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes.get("params", {})))
