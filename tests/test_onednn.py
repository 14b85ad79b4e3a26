"""oneDNN convolutions as XLA custom calls (kdjax.models.onednn): built where its wheels and a compiler are,
equal to lax's convolution in values and in first and second derivatives, and used only when it should be.

The suite runs on 8 host devices, where policy ``auto`` keeps XLA's convolutions; the tests here force
``policy("on")`` to exercise the oneDNN path itself, including inside the library's train step."""

import importlib.metadata
import os
import platform
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from jax import lax

from kdjax import models, parallel
from kdjax.methods import attention_transfer
from kdjax.methods.objective import make_objective
from kdjax.models import onednn
from kdjax.models.conv import conv_general_dilated
from kdjax.train import create_train_state, make_train_step

NHWC = ("NHWC", "HWIO", "NHWC")


def _installed(distribution):
  try:
    importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


@pytest.fixture(scope="module")
def need_onednn():
  if not onednn.available():
    pytest.skip(f"oneDNN convolutions unavailable here: {onednn.status()['unavailable_because']}")


def test_builds_wherever_its_wheels_and_a_compiler_are_installed():
  """On Linux x86-64 with kdjax's dependencies and a C++ compiler (CI), the build must succeed."""
  prerequisites = (sys.platform.startswith("linux") and platform.machine() == "x86_64"
                   and _installed("onednn-cpu-gomp") and _installed("onednn-devel-cpu-gomp")
                   and shutil.which(os.environ.get("CXX") or "c++"))
  if not prerequisites:
    pytest.skip("not Linux x86-64 with the oneDNN wheels and a C++ compiler; the XLA fallback is used")
  info = onednn.status()
  assert info["unavailable_because"] is None, info["unavailable_because"]
  assert info["onednn_version"].startswith("3.")


def _conv(fn, stride, padding):
  return lambda x, w: fn(x, w, (stride, stride), padding, dimension_numbers=NHWC)


CASES = [
    # (in, out, size, kernel, stride, padding)
    (4, 6, 8, 3, 1, ((1, 1), (1, 1))),   # the CIFAR 3x3
    (3, 5, 8, 3, 2, ((1, 1), (1, 1))),   # stride-2 3x3 (ResNet stage entry)
    (4, 6, 8, 1, 2, "VALID"),            # 1x1 projection shortcut
    (4, 6, 7, 3, 2, "SAME"),             # odd size, asymmetric SAME padding
    (2, 3, 9, 5, 3, ((2, 0), (1, 3))),   # kernel 5, stride 3, uneven explicit padding
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}to{c[1]}_{c[2]}px_k{c[3]}_s{c[4]}")
def test_conv_equals_lax_in_values_and_first_and_second_derivatives(need_onednn, case):
  cin, cout, size, k, stride, padding = case
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
  ref = _conv(lax.conv_general_dilated, stride, padding)
  ours = _conv(conv_general_dilated, stride, padding)

  def second(fn):  # reverse over reverse, as gradient-based attention transfer does
    return lambda x, w: jnp.sum(jnp.tanh(jax.grad(lambda x: jnp.sum(fn(x, w) ** 2))(x)))

  with onednn.policy("on"):
    assert "kdjax_onednn_conv_forward" in str(jax.make_jaxpr(ours)(x, w))
    y, vjp = jax.jit(lambda x, w: jax.vjp(ours, x, w))(x, w)
    second_ours = jax.jit(jax.grad(second(ours), (0, 1)))(x, w)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  assert_trees_close(y, y_ref)
  g = jax.random.normal(jax.random.key(2), y_ref.shape)
  assert_trees_close(vjp(g), vjp_ref(g), rtol=1e-4, atol=1e-4)
  assert_trees_close(second_ours, jax.grad(second(ref), (0, 1))(x, w), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_rectangular_kernels_and_unequal_strides(need_onednn):
  """Inception's 1×7 / 7×1 factorised kernels, and a stride that differs between rows and columns."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 3))
  for kernel, strides, padding in (((1, 7), (1, 1), ((0, 0), (3, 3))), ((7, 1), (2, 1), ((3, 3), (0, 0)))):
    w = jax.random.normal(jax.random.key(1), (*kernel, 3, 4))
    ours = lambda x, w, s=strides, p=padding: conv_general_dilated(x, w, s, p, dimension_numbers=NHWC)
    ref = lambda x, w, s=strides, p=padding: lax.conv_general_dilated(x, w, s, p, dimension_numbers=NHWC)
    with onednn.policy("on"):
      y, vjp = jax.jit(lambda x, w: jax.vjp(ours, x, w))(x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    assert_trees_close(y, y_ref)
    g = jax.random.normal(jax.random.key(2), y.shape)
    assert_trees_close(vjp(g), vjp_ref(g), rtol=1e-4, atol=1e-4)


def test_gradient_functions_are_each_others_derivatives(need_onednn):
  """The backward-data and backward-weights calls, differentiated directly, against lax's transposes."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  g = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  strides, padding = (2, 2), ((1, 1), (1, 1))
  with onednn.policy("on"):
    dx = lambda g, w: onednn.conv_backward_data(g, w, x.shape, strides, padding)
    dw = lambda x, g: onednn.conv_backward_weights(x, g, w.shape, strides, padding)
    ours = jax.jit(lambda: (jax.grad(lambda g, w: jnp.sum(jnp.sin(dx(g, w))), (0, 1))(g, w),
                            jax.grad(lambda x, g: jnp.sum(jnp.sin(dw(x, g))), (0, 1))(x, g)))()
  ref = _conv(lax.conv_general_dilated, 2, padding)
  ref_dx = lambda g, w: jax.vjp(lambda x_: ref(x_, w), x)[1](g)[0]
  ref_dw = lambda x, g: jax.vjp(lambda w_: ref(x, w_), w)[1](g)[0]
  want = (jax.grad(lambda g, w: jnp.sum(jnp.sin(ref_dx(g, w))), (0, 1))(g, w),
          jax.grad(lambda x, g: jnp.sum(jnp.sin(ref_dw(x, g))), (0, 1))(x, g))
  assert_trees_close(ours, want, rtol=1e-4, atol=1e-4)


def test_vmap_runs_each_element(need_onednn):
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 4))
  ours = _conv(conv_general_dilated, 1, "SAME")
  with onednn.policy("on"):
    got = jax.jit(jax.vmap(ours))(x, w)
  assert_trees_close(got, jax.vmap(_conv(lax.conv_general_dilated, 1, "SAME"))(x, w))


def test_policy_decides_at_trace_time():
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

  def traced(x, w):  # a new function each time: JAX caches traces per function, not per policy
    return str(jax.make_jaxpr(_conv(conv_general_dilated, 1, "SAME"))(x, w))

  # The suite has 8 host devices: "auto" keeps XLA's convolutions there.
  assert len(jax.devices()) == 8 and "kdjax_onednn" not in traced(x, w)
  with onednn.policy("off"):
    assert "kdjax_onednn" not in traced(x, w)
  if onednn.available():
    with onednn.policy("on"):
      assert "kdjax_onednn" in traced(x, w)
      # Not float32: XLA's own, whatever the policy.
      assert "kdjax_onednn" not in traced(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="expected one of auto, on, off"):
    with onednn.policy("fast"):
      pass


def test_bad_environment_policy_is_named(monkeypatch):
  monkeypatch.setenv("KDJAX_ONEDNN", "maybe")
  with pytest.raises(ValueError, match="KDJAX_ONEDNN='maybe'"):
    onednn.use_for((1, 4, 4, 1), (3, 3, 1, 1), (1, 1), ((1, 1), (1, 1)), jnp.float32)


def test_required_but_unbuildable_raises_with_the_reason(monkeypatch, tmp_path):
  monkeypatch.setattr(onednn, "_loaded", {"error": onednn.OnednnUnavailableError("no C++ compiler: 'c++'")})
  with onednn.policy("on"), pytest.raises(onednn.OnednnUnavailableError, match=r"no C\+\+ compiler"):
    jax.make_jaxpr(_conv(conv_general_dilated, 1, "SAME"))(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)))
  assert onednn.status()["unavailable_because"] == "no C++ compiler: 'c++'"


def _kd_step(mesh):
  student = models.get("resnet8", widths=(4, 4, 8, 8), num_classes=10)
  teacher = models.get("resnet14", widths=(4, 4, 8, 8), num_classes=10)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
           "label": (np.arange(16) % 10).astype(np.int32), "label_mask": np.ones(16, np.float32)}
  teacher_vars = teacher.init(jax.random.key(1), batch["image"][:1])
  objective = make_objective("soft_targets", {"temperature": 4.0, "alpha": 0.9})
  tx = optax.sgd(0.05, momentum=0.9)
  state = create_train_state(student, tx, jnp.asarray(batch["image"][:1]), seed=0, objective=objective,
                             teacher_models=[teacher], teacher_variables=[teacher_vars])
  step = make_train_step(student=student, objective=objective, tx=tx, teacher_models=(teacher,))
  args = (parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh), parallel.replicate((teacher_vars,), mesh))
  lowered = jax.jit(step).lower(*args)  # traced once: the policy in force now decides
  new_state, metrics = lowered.compile()(*args)
  return "kdjax_onednn" in lowered.as_text(), (new_state.params, new_state.batch_stats, metrics["loss"])


@pytest.mark.slow
def test_kd_train_step_with_onednn_equals_xla_on_one_and_eight_devices(need_onednn):
  one, eight = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()
  uses_xla, xla = _kd_step(one)
  with onednn.policy("on"):
    uses_one, on_one = _kd_step(one)
    uses_eight, on_eight = _kd_step(eight)  # custom calls are replicated by the partitioner: same result
  assert not uses_xla and uses_one and uses_eight
  assert_trees_close(on_one, xla, rtol=1e-4, atol=1e-5)
  assert_trees_close(on_eight, xla, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradient_attention_through_a_resnet_equals_xla(need_onednn):
  """Double back-propagation through a CIFAR ResNet: ∂/∂θ ‖∂L_S/∂x − ∂L_T/∂x‖ on oneDNN and on XLA."""
  net = models.get("resnet8", widths=(4, 4, 8, 8), num_classes=5)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.arange(4) % 5
  student = net.init(jax.random.key(1), x[:1], train=False)
  teacher = net.init(jax.random.key(2), x[:1], train=False)

  def per_example_ce(variables, inputs):
    logits = net.apply(variables, inputs, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  def loss(params):
    variables = {**student, "params": params}
    return jnp.mean(attention_transfer.gradient_attention_loss(per_example_ce, variables, per_example_ce, teacher, x))

  grad = jax.jit(jax.grad(loss))
  want = grad(student["params"])
  with onednn.policy("on"):
    got = jax.jit(jax.grad(loss))(student["params"])
  assert_trees_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "inception_v3"])
def test_zoo_model_gradients_with_onednn_equal_xla(need_onednn, name):
  """The zoo's convolutions go through the same function: 7×7 stride-2 stems, 1×7/7×1 kernels, biases."""
  net = models.get(name, num_classes=5)
  size = 75 if name == "inception_v3" else 32
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  variables = net.init(jax.random.key(1), x[:1], train=False)

  def loss(params):
    logits = net.apply({**variables, "params": params}, x, train=False)
    logits = logits[0] if isinstance(logits, tuple) else logits
    return jnp.sum(jnp.sin(logits))

  want = jax.jit(jax.grad(loss))(variables["params"])
  with onednn.policy("on"):
    lowered = jax.jit(jax.grad(loss)).lower(variables["params"])
  assert "kdjax_onednn" in lowered.as_text()
  got = lowered.compile()(variables["params"])
  assert_trees_close(got, want, rtol=2e-3, atol=1e-4)
