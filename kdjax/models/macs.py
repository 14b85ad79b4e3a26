"""Multiply-accumulate counts of a model's forward pass, by walking its jaxpr.

:func:`count_macs` traces ``model.apply`` for one example (shapes only, nothing is computed) and sums, over
every convolution (``conv_general_dilated``) and matrix product (``dot_general``) in the program,
including those inside nested calls (``pjit``, ``custom_vjp``/``custom_jvp``, control flow):

* convolution: ``prod(output shape) · prod(kernel spatial shape) · C_in / groups`` — one MAC per kernel tap
  per output element, so a grouped convolution counts ``1/groups`` of the dense one and a depthwise one
  ``9`` per output element for a 3×3 kernel;
* matrix product: ``prod(output shape) · prod(contracted dimensions)``.

Elementwise work (BatchNorm, activations, pooling, additions) is not counted: the MAC figures of
Moonshine's tables and of most compression papers count convolutions and fully connected layers only.
The trace runs with kdjax's oneDNN convolutions turned off (:func:`kdjax.models.onednn.policy`), so every
convolution appears as ``conv_general_dilated``. Inside a ``scan``/``while`` loop a body is counted once
(no zoo model loops over layers). Counts are for the batch of one example.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import onednn

__all__ = ["count_macs", "jaxpr_macs"]


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    kernel_spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
    in_per_group = rhs.shape[dn.rhs_spec[1]]  # the kernel's input-feature axis is already C_in / groups
    del lhs
    return math.prod(out.shape) * math.prod(kernel_spatial) * in_per_group
  if name == "dot_general":
    lhs = eqn.invars[0].aval
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract_lhs)
  return 0


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    values = value if isinstance(value, tuple | list) else (value,)
    for v in values:
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def jaxpr_macs(jaxpr) -> int:
  """MACs of the convolutions and matrix products of a (closed) jaxpr, nested calls included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    if eqn.primitive.name in ("custom_vjp_call", "custom_vjp_call_jaxpr", "custom_jvp_call"):
      # Count the primal function once (not its derivative rules).
      primal = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
      if primal is not None:
        total += jaxpr_macs(primal)
      continue
    for sub in _sub_jaxprs(eqn):
      total += jaxpr_macs(sub)
  return total


@functools.cache
def _cached(model: nn.Module, input_shape: tuple[int, ...]) -> int:
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with onednn.policy("off"):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return jaxpr_macs(jaxpr)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
  """Multiply-accumulates of ``model``'s forward pass (evaluation mode) for ONE input of ``input_shape``.

  Counted from the traced program (module docstring); cached per (model, input shape), as Flax modules are
  hashable dataclasses.
  """
  return _cached(model, tuple(int(d) for d in input_shape))


def describe_model(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, list[str], int]:
  """``(parameters, feature names, MACs)`` of ``model`` for one input of ``input_shape``, from ONE trace of
  ``model.init`` (which runs the forward pass once, in evaluation mode): the same parameter count and feature
  names as :func:`kdjax.models.features.describe` and the MACs of :func:`count_macs`, at the cost of one
  shape-only trace (``kdjax list models``)."""
  from kdjax.models.features import INTERMEDIATES, flatten_features
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with onednn.policy("off"):
    jaxpr, shapes = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x, train=False, mutable=True),
                                   return_shape=True)(x)
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes.get("params", {})))
  features = list(flatten_features(shapes.get(INTERMEDIATES, {})))
  return params, features, jaxpr_macs(jaxpr)
