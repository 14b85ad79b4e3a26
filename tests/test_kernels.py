"""Platform paths (issue 13 §1): the CPU fast paths (custom VJPs, oneDNN) vs stock JAX, decided at trace time.

The accelerator path is tested on CPU by forcing it (``kernels.use("stock")``, or ``kernels.platform("gpu")`` —
what the trainer sets from a GPU mesh).
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import StopTraining, assert_trees_close, crash_after

from kdjax import checkpoint as ckpt
from kdjax import models, parallel
from kdjax.config import default_stage_config
from kdjax.models import kernels, onednn
from kdjax.train import train_and_evaluate

# A ResNet with a stride-2 3×3 convolution and a 1×1 projection shortcut (both custom-VJP cases) and BatchNorm.
NET = {"widths": (4, 4, 8, 8), "num_classes": 10}


def _net_and_input(seed=0):
  model = models.get("resnet8", **NET)
  x = jax.random.normal(jax.random.key(seed), (2, 8, 8, 3))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x


def _logits(model, variables, train):
  def f(x):
    if train:
      out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return out
    return model.apply(variables, x)
  return f


# eval mode (batch statistics fixed) is the slower compile and the narrower case: in the slow run
@pytest.mark.parametrize("train", [pytest.param(False, marks=pytest.mark.slow), True])
def test_forward_mode_autodiff_on_the_accelerator_path_agrees_with_reverse_mode_on_the_fast_path(train):
  model, variables, x = _net_and_input()
  v = jax.random.normal(jax.random.key(2), x.shape)
  u = jax.random.normal(jax.random.key(3), (2, 10))
  f = _logits(model, variables, train)
  with kernels.use("stock"):
    out, jv = jax.jvp(f, (x,), (v,))            # forward mode: raised TypeError before the stock path existed
    _, lin = jax.linearize(f, x)
    np.testing.assert_allclose(lin(v), jv, rtol=1e-5, atol=1e-6)
  _, pullback = jax.vjp(f, x)                   # reverse mode through the CPU fast path's custom VJPs
  (ju,) = pullback(u)
  # <u, J v> = <Jᵀ u, v>: forward mode on one path equals reverse mode on the other.
  np.testing.assert_allclose(float(jnp.vdot(u, jv)), float(jnp.vdot(ju, v)), rtol=1e-4)
  np.testing.assert_allclose(out, f(x), rtol=1e-5, atol=1e-5)  # same function on both paths


def test_hessian_vector_product_on_the_stock_path():
  model, variables, x = _net_and_input()

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
  tangent = jax.tree.map(jnp.ones_like, variables["params"])
  with kernels.use("stock"):
    hvp = jax.jvp(jax.grad(loss), (variables["params"],), (tangent,))[1]
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(hvp))


def test_forward_mode_on_the_fast_path_says_how_to_turn_it_off():
  model, variables, x = _net_and_input()
  assert kernels.fast_paths()  # the suite runs on CPU, mode auto
  with pytest.raises(TypeError, match=r"kernels.use\('stock'\).*KDJAX_KERNELS=stock"):
    jax.jvp(_logits(model, variables, train=True), (x,), (x,))


@pytest.mark.parametrize("where", ["stock mode", "gpu platform"])
def test_the_accelerator_path_traces_no_custom_derivative(where):
  model, variables, x = _net_and_input()

  def make_loss():  # a new function per trace: JAX caches traces per function, and the path is fixed at trace time
    def loss(x):
      out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return jnp.sum(out)
    return loss
  assert "custom_vjp_call" in str(jax.make_jaxpr(make_loss())(x))  # CPU fast path
  context = kernels.use("stock") if where == "stock mode" else kernels.platform("gpu")
  with context:
    assert not kernels.fast_paths()
    jaxpr = str(jax.make_jaxpr(make_loss())(x))
    jax.grad(make_loss())(x)
  assert "custom_vjp" not in jaxpr and "kdjax_onednn" not in jaxpr and "conv_general_dilated" in jaxpr


def test_stock_batch_norm_is_flax_batch_norm():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 3 + 1
  ours, theirs = models.BatchNorm(momentum=0.9), nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = theirs.init(jax.random.key(1), x, use_running_average=False)
  with kernels.use("stock"):
    y, new = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  want, want_new = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert_trees_close(new, want_new)


def test_mode_and_platform_are_named_and_validated(monkeypatch):
  monkeypatch.setenv("KDJAX_KERNELS", "fast")
  with pytest.raises(ValueError, match="KDJAX_KERNELS='fast': expected one of auto, stock"):
    kernels.mode()
  monkeypatch.setenv("KDJAX_KERNELS", "stock")
  assert not kernels.fast_paths() and kernels.describe()["convolution"].startswith("stock")
  monkeypatch.delenv("KDJAX_KERNELS")
  with pytest.raises(ValueError, match="expected one of auto, stock"):
    with kernels.use("cuda"):
      pass
  with kernels.platform("tpu", devices=4):
    assert (kernels.target_platform(), kernels.target_devices(), kernels.fast_paths()) == ("tpu", 4, False)
    assert kernels.describe()["batch_norm"].startswith("stock")
  assert kernels.target_devices() == 8 and kernels.describe()["batch_norm"].startswith("kdjax CPU")


def test_onednn_is_never_built_inside_a_trace(monkeypatch, tmp_path):
  def build():
    raise AssertionError("oneDNN built while tracing")
  monkeypatch.setattr(onednn, "_loaded", {})
  monkeypatch.setattr(onednn, "_warned", [])
  monkeypatch.setattr(onednn, "_build", build)
  args = ((1, 4, 4, 1), (3, 3, 1, 1), (1, 1), ((1, 1), (1, 1)), jnp.float32)
  with kernels.platform("cpu", devices=1), pytest.warns(UserWarning, match=r"not built before tracing.*prepare\(\)"):
    assert onednn.use_for(*args) is False  # auto: XLA's convolutions, a warning
  token = onednn._policy_override.set("on")
  try:
    with pytest.raises(onednn.OnednnUnavailableError, match="not built before tracing"):
      onednn.use_for(*args)
  finally:
    onednn._policy_override.reset(token)


def test_the_library_cache_key_includes_the_onednn_version(monkeypatch, tmp_path):
  monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path))
  versions = {"jaxlib": "0.10.2", "onednn-cpu-gomp": "2023.2.0", "onednn-devel-cpu-gomp": "2023.2.0"}
  monkeypatch.setattr(onednn, "_version", lambda name: versions.get(name, ""))
  first = onednn._library_path(tmp_path, ["c++", "-O2"])
  assert first == onednn._library_path(tmp_path, ["c++", "-O2"])
  versions["onednn-cpu-gomp"] = "2024.0.0"
  assert onednn._library_path(tmp_path, ["c++", "-O2"]) != first


def _conv_config(**fields):
  c = default_stage_config()
  c.dataset = "digits"
  c.model = "resnet8"
  c.model_kwargs = {"widths": (4, 4, 8, 8)}
  c.batch_size, c.num_steps, c.checkpoint_every_steps, c.eval_batch_size = 16, 6, 2, 160
  for key, value in fields.items():
    c[key] = value
  return c


def test_the_default_user_path_one_cpu_device_with_onednn_trains_and_resumes_bit_exactly(tmp_path):
  # What most users run: one CPU device, oneDNN on (the suite's other tests see 8 devices, where it is off).
  one = parallel.make_mesh(jax.devices()[:1])
  config = _conv_config()
  straight = train_and_evaluate(config, str(tmp_path / "straight"), mesh=one, progress=False)
  with pytest.raises(StopTraining):
    train_and_evaluate(config, str(tmp_path / "resumed"), mesh=one, progress=False, callbacks=[crash_after(3)])
  resumed = train_and_evaluate(config, str(tmp_path / "resumed"), mesh=one, progress=False)
  a, b = (ckpt.load_teacher_variables(str(tmp_path / d))[0] for d in ("straight", "resumed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert straight["test_accuracy"] == resumed["test_accuracy"]
  recorded = json.loads((tmp_path / "straight" / "config.json").read_text())["kernels"]
  assert recorded == straight["kernels"] and recorded["platform"] == "cpu"
  if onednn.available():  # Linux x86-64 with the wheels and a compiler: CI
    assert recorded["convolution"].startswith("oneDNN 3.")


@pytest.mark.slow  # two short runs, ~26 s: the default run keeps the same-kernels resume test above
def test_a_run_resumed_on_other_kernels_continues_and_says_so(tmp_path, caplog):
  config = _conv_config(num_steps=4)
  with pytest.raises(StopTraining):
    train_and_evaluate(config, str(tmp_path), progress=False, callbacks=[crash_after(3)])
  with kernels.use("stock"), caplog.at_level(logging.WARNING):
    result = train_and_evaluate(config, str(tmp_path), progress=False)
  assert result["steps"] == 4 and result["kernels"]["convolution"].startswith("stock")
  assert "resuming" in caplog.text and "on other kernels" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("name", models.names())
def test_forward_mode_traces_through_every_zoo_model_on_the_accelerator_path(name):
  spec = models.spec(name)
  model = spec.factory()
  x = jnp.zeros((2, *spec.input_shape), jnp.float32)
  with kernels.use("stock"):
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x))
    for train in (False, True):
      def jvp(variables, x, train=train):  # traced only (eval_shape); raises where forward mode cannot go
        def f(x):
          return model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False,
                             rngs={"dropout": jax.random.key(2)})
        return jax.jvp(f, (x,), (x,))
      assert jax.tree.leaves(jax.eval_shape(jvp, variables, x))
