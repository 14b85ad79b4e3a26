"""The CPU-fast layers behind the CIFAR models: BatchNorm with dot-product statistics, convolution with
hand-written gradients. Each must compute what the stock Flax/JAX layer computes, to float tolerance,
in values, first and second derivatives, under jit and on 8 devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from jax import lax

from kdjax import parallel
from kdjax.models.batch_norm import BatchNorm, batch_norm_train, channel_sums
from kdjax.models.conv import conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------- BatchNorm

def _bn_inputs():
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 2.0 + 1.0
  params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])}
  stats = {"mean": jnp.array([0.1, -0.2, 0.3]), "var": jnp.array([1.5, 0.5, 2.0])}
  return x, {"params": params, "batch_stats": stats}


def test_channel_sums_equal_jnp_sum():
  x = jax.random.normal(jax.random.key(1), (3, 4, 5, 6))
  assert_trees_close(channel_sums(x), jnp.sum(x, axis=(0, 1, 2)), rtol=1e-5)
  assert_trees_close(jax.jit(channel_sums)(x), jnp.sum(x, axis=(0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_matches_flax(train):
  x, variables = _bn_inputs()
  ours, flax_bn = (m(use_running_average=not train, momentum=0.9, epsilon=1e-5) for m in (BatchNorm, nn.BatchNorm))
  # Same variable names and shapes, so checkpoints of either load into the other.
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, flax_bn.init(jax.random.key(0), x))
  y_ours, new_ours = ours.apply(variables, x, mutable=["batch_stats"])
  y_flax, new_flax = flax_bn.apply(variables, x, mutable=["batch_stats"])
  assert_trees_close(y_ours, y_flax)
  assert_trees_close(new_ours, new_flax)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0] ** 3)

  assert_trees_close(jax.grad(loss(ours), (0, 1))(variables["params"], x),
                     jax.grad(loss(flax_bn), (0, 1))(variables["params"], x), rtol=2e-4, atol=2e-3)


def _bn_reference(x, scale, bias, epsilon=1e-5):
  mean = x.mean((0, 1, 2))
  var = (x * x).mean((0, 1, 2)) - mean * mean
  return (x - mean) * lax.rsqrt(var + epsilon) * scale + bias, mean, var


def test_batch_norm_second_derivatives_match_autodiff_of_the_formula():
  """Gradient-based attention transfer differentiates through the backward rule: it must be exact too."""
  x, variables = _bn_inputs()
  p = variables["params"]

  def outer(fn):
    def inner_loss(x, s, b):
      y, mean, var = fn(x, s, b)
      return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + jnp.sum(jnp.cos(var))  # statistics' cotangents too
    return lambda x, s, b: sum(jnp.sum(g ** 2) for g in jax.grad(inner_loss, (0, 1, 2))(x, s, b))

  ours = jax.grad(outer(lambda x, s, b: batch_norm_train(x, s, b, 1e-5)), (0, 1, 2))(x, p["scale"], p["bias"])
  ref = jax.grad(outer(_bn_reference), (0, 1, 2))(x, p["scale"], p["bias"])
  assert_trees_close(ours, ref, rtol=1e-3, atol=1e-3)


def test_batch_norm_bfloat16_input_keeps_float32_statistics():
  x, variables = _bn_inputs()
  y, new = BatchNorm(use_running_average=False, momentum=0.9).apply(variables, x.astype(jnp.bfloat16),
                                                                   mutable=["batch_stats"])
  assert y.dtype == jnp.float32  # promoted with the float32 parameters, as Flax does
  assert new["batch_stats"]["mean"].dtype == jnp.float32
  y_ref, _ = nn.BatchNorm(use_running_average=False, momentum=0.9).apply(variables, x.astype(jnp.bfloat16),
                                                                         mutable=["batch_stats"])
  assert_trees_close(y, y_ref, rtol=2e-2, atol=2e-2)


def test_batch_norm_statistics_are_global_over_8_devices():
  x = jax.random.normal(jax.random.key(3), (16, 4, 4, 3)) * 3.0 + 2.0
  module = BatchNorm(use_running_average=False, momentum=0.9)
  variables = module.init(jax.random.key(0), x)
  apply = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))
  single = apply(variables, x)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  sharded = apply(parallel.replicate(variables, mesh), parallel.shard_batch({"x": np.asarray(x)}, mesh)["x"])
  assert_trees_close(sharded, single, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- convolution

CONV_CASES = [
    # (in, out, size, kernel, stride, padding): the fast paths, then fall-through cases.
    (3, 5, 8, 3, 2, ((1, 1), (1, 1))),   # stride-2 3x3, input gradient by phases
    (4, 6, 8, 1, 2, "VALID"),            # 1x1 projection, stride 2
    (4, 6, 8, 1, 1, "VALID"),            # 1x1, stride 1
    (4, 6, 7, 1, 2, "VALID"),            # 1x1 stride 2 on an odd size (the last row/column is skipped)
    # the fall-through cases (XLA's own gradient) in the slow run
    pytest.param((4, 6, 7, 3, 2, ((1, 1), (1, 1))), marks=pytest.mark.slow),   # odd size
    pytest.param((4, 6, 8, 3, 1, "SAME"), marks=pytest.mark.slow),             # stride 1
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}_{c[2]}px_k{c[3]}_s{c[4]}")
def test_conv_matches_lax_in_values_and_first_and_second_derivatives(case):
  cin, cout, size, k, stride, padding = case
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))

  def conv(fn):
    return lambda x, w: fn(x, w, (stride, stride), padding, dimension_numbers=NHWC)

  ref, ours = conv(lax.conv_general_dilated), conv(conv_general_dilated)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  y_ours, vjp_ours = jax.jit(lambda x, w: jax.vjp(ours, x, w))(x, w)
  assert_trees_close(y_ours, y_ref)
  g = jax.random.normal(jax.random.key(2), y_ref.shape)
  assert_trees_close(vjp_ours(g), vjp_ref(g), rtol=1e-4, atol=1e-4)

  def second(fn):  # reverse over reverse, as gradient-based attention transfer does
    return lambda x, w: jnp.sum(jnp.tanh(jax.grad(lambda x: jnp.sum(fn(x, w) ** 2))(x)))

  assert_trees_close(jax.jit(jax.grad(second(ours), (0, 1)))(x, w), jax.grad(second(ref), (0, 1))(x, w),
                     rtol=1e-3, atol=1e-3)


def test_conv_in_flax_keeps_the_parameter_tree_and_runs_under_vmap():
  x = jnp.ones((2, 8, 8, 3))
  fast = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), conv_general_dilated=conv_general_dilated)
  stock = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)))
  v = fast.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, stock.init(jax.random.key(0), x))
  assert_trees_close(fast.apply(v, x), stock.apply(v, x))
  batched = jax.jit(jax.vmap(lambda x: fast.apply(v, x)))(jnp.ones((3, 2, 8, 8, 3)))
  assert batched.shape == (3, 2, 4, 4, 6)


def test_conv_fall_through_is_plain_lax():
  """Grouped and dilated convolutions, and non-NHWC layouts, are lax's own (no custom rule)."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  grouped = jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                                             feature_group_count=2))(x, w)
  assert "custom_vjp" not in str(grouped)
  pointwise = jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=NHWC))(
      x, jnp.ones((1, 1, 4, 4)))
  assert "custom_vjp" in str(pointwise)
