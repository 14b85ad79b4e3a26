"""The ImageNet-scale model zoo (kdjax.models.server / inception / ion / mobile).

What runs, and why (the file has to stay around two minutes on two CPU cores, where XLA's
compile time for these deep networks, not their FLOPs, is the cost):

* Parameter counts, for every registered configuration, against the figure of the paper or of
  the reference implementation (source in a comment on each), by shape inference only
  (``count_params`` uses ``jax.eval_shape``: nothing is allocated or compiled).
* Multiply-adds of the mobile networks, whose papers state them: the convolution and dense
  MACs read off the traced program, and XLA's cost analysis of the lowered program (which
  also counts BatchNorm, activations, pooling and residual adds, so sits a few percent above).
* Feature names of every model via ``feature_names`` (shape inference).
* One eval-mode forward pass of every model, batch 2, at a small input (32x32; 64 for ION so
  the IRNN sweeps have some length; 75x75 for Inception v3, its minimum).
* One SGD training step (cross-entropy, BatchNorm statistics updated) for a representative
  subset: ResNet-18 (residual blocks, projection shortcuts), ShuffleNet v1 CIFAR (group
  convolutions, channel shuffle, concat shortcuts) and ION (gradients through the
  ``lax.scan`` IRNN sweeps and skip pooling); MobileNetV2 (depthwise convs, inverted
  residuals) trains as the student of the ResNet-50 -> MobileNetV2 distillation step. The rest
  (DenseNet-121, both Inceptions, SE-ResNet-50, VGG-16, MobileNet v1, the ShuffleNets,
  MobileFaceNet ...) run forward only: their training-step compiles take 10-70 s each here.

Two shortcuts keep compiles short, neither affecting what is checked: programs are compiled
with XLA's backend optimisations off (they change speed, not results), and variables for the
forward/training smoke tests come from a NumPy filler shaped by ``jax.eval_shape(model.init)``
rather than from running ``model.init`` (whose compile costs as much as the forward's;
``init`` itself is traced by the shape-inference tests and run for the IRNN context module).
VGG-16 and ION run with fc6/fc7 narrowed to 64 units in those smoke tests: their 100M-weight FC
layers would take seconds and gigabytes to fill; the full sizes are covered by the counts.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.models import ion as ion_lib
from kdjax.models import zoo_layers

# XLA backend optimisation off: compile time for these nets drops ~4x; results are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------

# (registry name, kwargs, exact count). Sources:
EXACT_COUNTS = [
    # torchvision ResNet18_Weights.IMAGENET1K_V1 "num_params".
    ("resnet18", {}, 11_689_512),
    # torchvision ResNet50_Weights "num_params".
    ("resnet50", {}, 25_557_032),
    # torchvision VGG16_Weights "num_params".
    ("vgg16", {}, 138_357_544),
    # torchvision GoogLeNet_Weights "num_params" (no aux heads). torchvision's "5x5" branch
    # uses a 3x3 kernel (kept for its weights): wide_kernel=3 reproduces it.
    ("inception_v1", {"wide_kernel": 3}, 6_624_904),
    # The paper's 5x5 kernels: the above + 16 * sum(5x5-reduce * 5x5) over the nine modules
    # (16 = 25 - 9; the sum is 23,808 from paper Table 1) = 6,624,904 + 380,928.
    ("inception_v1", {}, 7_005_832),
    # torchvision googlenet(aux_logits=True): + two heads of C*128 + 256 (1x1 conv + BN),
    # 2048*1024 + 1024, 1024*1000 + 1000, with C = 512 (on 4a) and 528 (on 4d).
    ("inception_v1", {"wide_kernel": 3, "aux_logits": True}, 13_004_888),
    # torchvision Inception_V3_Weights "num_params" 27,161,264, which includes AuxLogits.
    ("inception_v3", {"aux_logits": True}, 27_161_264),
    # Without the aux head: 27,161,264 - (768*128 + 256 + 128*25*768 + 1536 + 768*1000 + 1000).
    ("inception_v3", {}, 23_834_568),
    # torchvision DenseNet121_Weights "num_params".
    ("densenet121", {}, 7_978_856),
    # Cadene pretrainedmodels se_resnet50: ResNet-50 + 2,530,992 SE weights (2C^2/16 + C/16 + C
    # per block); the SE paper (Table 1) rounds to 28.1M.
    ("se_resnet50", {}, 28_088_024),
    # Keras applications MobileNet(alpha=1.0): 4,253,864 total minus 21,888 non-trainable BN
    # moving statistics; the paper (Table 1 / Table 8) gives 4.2M.
    ("mobilenet_v1", {}, 4_231_976),
    # torchvision MobileNet_V2_Weights "num_params" (the paper says 3.4M).
    ("mobilenet_v2", {}, 3_504_872),
    # torchvision ShuffleNet_V2_X{0_5,1_0,1_5,2_0}_Weights "num_params".
    ("shufflenet_v2", {}, 2_278_604),
    ("shufflenet_v2", {"scale": 0.5}, 1_366_792),
    ("shufflenet_v2", {"scale": 1.5}, 3_503_624),
    ("shufflenet_v2", {"scale": 2.0}, 7_393_996),
    # RepDistiller models/mobilenetv2.py mobile_half(num_classes=100) (the CRD table's
    # "MobileNetV2"), summed layer by layer from its definition; quoted as 0.81M.
    ("mobilenet_v2_cifar", {}, 812_836),
    # RepDistiller models/ShuffleNetv1.py ShuffleV1(num_classes=100), layer by layer; 0.95M.
    ("shufflenet_v1_cifar", {}, 949_258),
    # RepDistiller models/ShuffleNetv2.py ShuffleV2(num_classes=100), layer by layer; 1.36M.
    ("shufflenet_v2_cifar", {}, 1_355_528),
    # ION has no published count. VGG-16 138,357,544 + context module 4,457,984 (1x1 convs
    # 512->512, 2048->512, 2048->512 with biases; 2 IRNNs x 4 directions x 512^2 recurrent
    # weights) + skip scale 1,792 (256+512+512+512 channels) + 1x1 fuse 1792*512 + 512.
    ("ion", {}, 143_735_336),
]


@pytest.mark.parametrize("name,kwargs,expected", EXACT_COUNTS,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
                              for n, kw, _ in EXACT_COUNTS])
def test_parameter_count_matches_reference(name, kwargs, expected):
  spec = models.spec(name)
  assert models.count_params(models.get(name, **kwargs), spec.input_shape) == expected


# (name, kwargs, figure, unit the source rounds to). Papers that only give rounded counts.
ROUNDED_COUNTS = [
    # ShuffleNet v1 1x, g=3: mmpretrain's model zoo lists 1.87M (the paper gives no count);
    # ours is 1,865,728 from paper Table 1's widths.
    ("shufflenet_v1", {}, 1.87e6, 1e4),
    # MobileNet paper Table 6 (width multiplier): 1.0 -> 4.2M, 0.75 -> 2.6M, 0.5 -> 1.3M,
    # 0.25 -> 0.5M.
    ("mobilenet_v1", {"alpha": 0.75}, 2.6e6, 1e5),
    ("mobilenet_v1", {"alpha": 0.5}, 1.3e6, 1e5),
    ("mobilenet_v1", {"alpha": 0.25}, 0.5e6, 1e5),
    # SE paper: SE-ResNet-50 28.1M.
    ("se_resnet50", {}, 28.1e6, 1e5),
]


@pytest.mark.parametrize("name,kwargs,figure,unit", ROUNDED_COUNTS,
                         ids=[f"{n}-{kw}" for n, kw, _, _ in ROUNDED_COUNTS])
def test_parameter_count_matches_paper_rounding(name, kwargs, figure, unit):
  count = models.count_params(models.get(name, **kwargs), models.spec(name).input_shape)
  assert abs(count - figure) <= unit / 2, count


def test_mobilefacenet_parameter_count():
  # Ours: 1,003,136 (conv/linear weights, BN affine, and 7,552 per-channel PReLU slopes). The
  # paper (Table 2, and "less than 1 million" in its abstract) gives 0.99M; without the PReLU
  # slopes our count is 995,584, so the paper evidently left those out. Asserted to 1.5%.
  count = models.count_params(models.get("mobilefacenet"), (112, 112, 3))
  assert count == 1_003_136
  assert abs(count - 0.99e6) / 0.99e6 < 0.015
  prelu = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(
      jax.eval_shape(models.get("mobilefacenet").init, jax.random.key(0),
                     jnp.zeros((1, 112, 112, 3)))["params"])
              if path[-1].key == "slope")
  assert count - prelu == 995_584


# ---------------------------------------------------------------------------------------------
# Multiply-adds
# ---------------------------------------------------------------------------------------------


def _conv_dense_macs(jaxpr) -> int:
  """Multiply-accumulates of every convolution and matrix product in a (nested) jaxpr."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // out_features
    elif eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns"):
          total += _conv_dense_macs(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          total += _conv_dense_macs(sub.jaxpr)
  return total


def _macs(model, input_shape):
  """(conv+dense MACs, XLA cost-analysis flops / 2) of one eval forward; tracing/lowering only."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  traced = jax.jit(lambda v, x: model.apply(v, x)).trace(variables, x)
  lowered = traced.lower()
  cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return _conv_dense_macs(traced.jaxpr.jaxpr), cost["flops"] / 2


# (name, kwargs, paper's multiply-adds). Sources:
PAPER_MACS = [
    ("mobilenet_v1", {}, 569e6),  # MobileNets paper, Table 1 / Table 8: 569M Mult-Adds.
    ("mobilenet_v1", {"alpha": 0.5}, 149e6),  # MobileNets Table 6: 0.5 MobileNet-224, 149M.
    ("mobilenet_v2", {}, 300e6),  # MobileNetV2 paper, Table 4: 300M.
    ("shufflenet_v1", {}, 137e6),  # ShuffleNet Table 1, g=3 complexity 137M ("140" in Table 2).
    ("shufflenet_v1", {"groups": 8}, 137e6),  # ShuffleNet Table 1, g=8: 137M.
    ("shufflenet_v2", {}, 146e6),  # ShuffleNet V2 paper, Table 8: 1x, 146M FLOPs (= MACs).
    ("mobilefacenet", {}, 221e6),  # MobileFaceNets paper, Table 2: 221M MAdds at 112x112.
]


@pytest.mark.parametrize("name,kwargs,paper", PAPER_MACS,
                         ids=[f"{n}-{kw}" for n, kw, _ in PAPER_MACS])
def test_multiply_adds_match_paper(name, kwargs, paper):
  conv_macs, xla_macs = _macs(models.get(name, **kwargs), models.spec(name).input_shape)
  # The papers count convolution and FC multiply-adds: ours agree to 1%.
  assert abs(conv_macs / paper - 1) < 0.01, conv_macs
  # XLA's count (flops ~ 2 x MACs) adds BN/activation/pooling arithmetic: 2-9% more here.
  assert 1.0 <= xla_macs / paper < 1.10, xla_macs


# ---------------------------------------------------------------------------------------------
# Features, forward passes and training steps
# ---------------------------------------------------------------------------------------------


def _stages(n):
  return {f"stage{i}" for i in range(1, n + 1)}


# (name, kwargs for the smoke tests, input side, expected feature names)
ZOO = {
    "resnet18": ({}, 32, {"stem", "pooled", "logits"} | _stages(4)),
    "resnet50": ({}, 32, {"stem", "pooled", "logits"} | _stages(4)),
    "se_resnet50": ({}, 32, {"stem", "pooled", "logits"} | _stages(4)),
    "densenet121": ({}, 32, {"stem", "pooled", "logits"} | _stages(4)),
    "vgg16": ({"fc_features": 64}, 32, {"pooled", "embedding", "logits"} | _stages(5)),
    "inception_v1": ({"aux_logits": True}, 32,
                     {"stem", "pooled", "logits", "aux1_logits", "aux2_logits"} | _stages(3)),
    "inception_v3": ({"aux_logits": True}, 75,
                     {"stem", "pooled", "logits", "aux_logits"} | _stages(3)),
    "ion": ({"fc_features": 64}, 64, {"context", "pooled", "embedding", "logits"} | _stages(5)),
    "mobilenet_v1": ({}, 32, {"stem", "pooled", "logits"} | _stages(5)),
    "mobilenet_v2": ({}, 32, {"stem", "head", "pooled", "logits"} | _stages(7)),
    "mobilenet_v2_cifar": ({}, 32, {"stem", "head", "pooled", "logits"} | _stages(7)),
    "shufflenet_v1": ({}, 32, {"stem", "pooled", "logits"} | _stages(3)),
    "shufflenet_v1_cifar": ({}, 32, {"stem", "pooled", "logits"} | _stages(3)),
    "shufflenet_v2": ({}, 32, {"stem", "head", "pooled", "logits"} | _stages(3)),
    "shufflenet_v2_cifar": ({}, 32, {"stem", "head", "pooled", "logits"} | _stages(3)),
    "mobilefacenet": ({}, 32, {"stem", "head", "pooled", "embedding", "logits"} | _stages(3)),
}
DISTILLED = ("resnet50", "mobilenet_v2")  # exercised by the distillation step below
TRAINED = tuple(sorted(set(ZOO) - set(DISTILLED)))  # every other model
# The models whose training step takes longest to compile run with `pytest -m slow` (CI runs both).
SLOW_TO_COMPILE = ("densenet121", "inception_v1", "inception_v3", "ion", "mobilefacenet", "mobilenet_v2_cifar",
                   "se_resnet50", "shufflenet_v1", "shufflenet_v1_cifar", "shufflenet_v2", "shufflenet_v2_cifar")


def test_every_zoo_model_is_covered():
  zoo_names = {n for n in models.names()
               if models.spec(n).factory.__module__.split(".")[-1] in ("server", "inception",
                                                                        "ion", "mobile")}
  assert zoo_names == set(ZOO)


def _build(name, num_classes=10):
  kwargs, side, _ = ZOO[name]
  return models.get(name, num_classes=num_classes, **kwargs), side


@pytest.mark.parametrize("name", sorted(ZOO))
def test_feature_names(name):
  model, side = _build(name)
  assert set(models.feature_names(model, jnp.zeros((1, side, side, 3)))) == ZOO[name][2]


def _synthetic_variables(model, x, seed=0):
  """Variables shaped like ``model.init(key, x)``'s, filled with NumPy (nothing compiled).

  Kernels ~ He-normal over fan-in, BN scale/var 1 and bias/mean 0, PReLU slopes 0.25, IRNN
  recurrences identity: a well-scaled network, which is all a smoke test needs.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name in ("scale", "var", "skip_scale"):
      value = np.ones(shape)
    elif name == "bias":
      # Small non-zero biases: with zero BatchNorm shifts, a BN that follows BN -> linear conv (ShuffleNet's
      # depthwise -> pointwise) sees exactly zero-mean inputs and its running mean could never move.
      value = 0.1 * rng.normal(size=shape)
    elif name == "mean":
      value = np.zeros(shape)
    elif name == "slope":
      value = np.full(shape, 0.25)
    elif name.startswith("w_hh"):
      value = np.eye(*shape)
    else:
      value = rng.normal(size=shape) * np.sqrt(2.0 / math.prod(shape[:-1]))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))


def _check_features(features, names, batch):
  assert set(features) == names
  for name, value in features.items():
    assert np.all(np.isfinite(value)), name
    assert value.shape[0] == batch
    if name.startswith("stage") or name in ("stem", "head", "context"):
      assert value.ndim == 4, (name, value.shape)  # NHWC maps


def _with_stats(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_COMPILE else n
                                  for n in TRAINED])
def test_forward_and_training_step(name):
  """One evaluation-mode forward and one SGD step (train mode: BatchNorm batch statistics, dropout) of the
  model, compiled together as one program to keep the suite's compile time down."""
  model, side = _build(name)
  x = jax.random.normal(jax.random.key(1), (2, side, side, 3))
  y = jnp.array([3, 7])
  variables = _synthetic_variables(model, x)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.sgd(0.1)
  names = sorted(ZOO[name][2])

  def step(params, batch_stats, opt_state, x, y, key):
    def loss_fn(p):
      out = models.apply_model(model, _with_stats(p, batch_stats), x, train=True,
                               rngs={"dropout": key}, features=names)
      loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, y).mean()
      return loss, out
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    evaluated = models.apply_model(model, _with_stats(params, batch_stats), x, features=["logits"])
    return optax.apply_updates(params, updates), out.batch_stats, loss, out.features, evaluated

  args = (params, batch_stats, tx.init(params), x, y, jax.random.key(2))
  new_params, new_stats, loss, features, evaluated = _compile(step, *args)(*args)
  assert evaluated.logits.shape == (2, 10) and np.all(np.isfinite(evaluated.logits))
  np.testing.assert_array_equal(evaluated.features["logits"], evaluated.logits)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, evaluated.batch_stats, batch_stats)))  # eval: untouched
  assert np.isfinite(loss)
  _check_features(features, set(names), 2)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new_params)
  assert any(jax.tree.leaves(changed))
  if batch_stats:  # BatchNorm running statistics moved towards the batch's
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), batch_stats, new_stats)
    assert all(jax.tree.leaves(moved))


@pytest.mark.slow
def test_distillation_step_resnet50_to_mobilenetv2():
  """The library's KD step (kdjax.train.make_train_step, method soft_targets, T=4, alpha=0.9) with a
  ResNet-50 teacher (eval mode, frozen) and a MobileNetV2 student, 64x64 inputs, 10 classes, batch 2."""
  from kdjax.methods.objective import make_objective
  from kdjax.train import TrainState, make_train_step
  teacher = models.get("resnet50", num_classes=10)
  student = models.get("mobilenet_v2", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  t_vars = _synthetic_variables(teacher, x, seed=1)
  s_vars = _synthetic_variables(student, x, seed=2)
  tx = optax.sgd(0.1)
  objective = make_objective("soft_targets", {"temperature": 4.0, "alpha": 0.9})
  step = make_train_step(student=student, objective=objective, tx=tx, teacher_models=(teacher,))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=s_vars["params"], batch_stats=s_vars["batch_stats"],
                     opt_state=tx.init((s_vars["params"], {})), rng=jax.random.PRNGKey(3), aux_params={})
  batch = {"image": x, "label": jnp.array([1, 7], jnp.int32), "label_mask": jnp.ones(2)}
  args = (state, batch, (t_vars,))
  new_state, metrics = _compile(step, *args)(*args)
  assert float(metrics["nonfinite"][0]) == 0.0 and float(metrics["loss"][0]) > 0
  assert np.any(new_state.params["classifier"]["kernel"] != s_vars["params"]["classifier"]["kernel"])
  assert not np.allclose(new_state.batch_stats["conv_stem"]["bn"]["mean"],
                         s_vars["batch_stats"]["conv_stem"]["bn"]["mean"])


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_irnn_sweeps_match_a_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  w = (np.eye(5) + 0.1 * rng.normal(size=(5, 5))).astype(np.float32)
  for axis, reverse in ((2, False), (2, True), (1, False), (1, True)):
    got = np.asarray(ion_lib.irnn_sweep(jnp.asarray(x), jnp.asarray(w), axis, reverse))
    seq = np.moveaxis(x, axis, 0)
    order = range(seq.shape[0] - 1, -1, -1) if reverse else range(seq.shape[0])
    h, expected = np.zeros_like(seq[0]), np.zeros_like(seq)
    for t in order:
      h = np.maximum(h @ w + seq[t], 0)
      expected[t] = h
    np.testing.assert_allclose(got, np.moveaxis(expected, 0, axis), rtol=1e-5, atol=1e-5)


def test_irnn_context_is_identity_initialised_and_keeps_the_grid():
  module = ion_lib.IRNNContext(hidden=4, features=6)
  x = jnp.ones((1, 3, 5, 2))
  variables = jax.jit(module.init)(jax.random.key(0), x)
  for layer in ("irnn1", "irnn2"):
    for direction in ion_lib.DIRECTIONS:
      np.testing.assert_array_equal(variables["params"][layer][f"w_hh_{direction}"], np.eye(4))
  assert jax.jit(module.apply)(variables, x).shape == (1, 3, 5, 6)
  fixed = ion_lib.IRNNContext(hidden=4, features=6, learn_recurrence=False)
  assert "irnn1" not in jax.eval_shape(fixed.init, jax.random.key(0), x)["params"]


def test_channel_shuffle_interleaves_groups():
  x = jnp.arange(6.0).reshape(1, 1, 1, 6)
  np.testing.assert_array_equal(zoo_layers.channel_shuffle(x, 2).ravel(), [0, 3, 1, 4, 2, 5])
  np.testing.assert_array_equal(zoo_layers.channel_shuffle(x, 3).ravel(), [0, 2, 4, 1, 3, 5])


def test_adaptive_and_ceil_pooling_match_pytorch_semantics():
  x = jnp.arange(5.0).reshape(1, 5, 1, 1)
  # AdaptiveAvgPool to 3 bins of 5: [0,2), [1,4), [3,5).
  np.testing.assert_allclose(zoo_layers.adaptive_pool(x, (3, 1)).ravel(), [0.5, 2.0, 3.5])
  np.testing.assert_allclose(zoo_layers.adaptive_pool(x, (3, 1), jnp.max).ravel(), [1, 3, 4])
  # 1x1 -> 7x7 repeats (torchvision VGG on 32x32 input).
  assert zoo_layers.adaptive_pool(jnp.ones((1, 1, 1, 2)), (7, 7)).shape == (1, 7, 7, 2)
  # ceil_mode without padding: 56 -> 28 (floor mode: 27); 112 -> 56 (SENet stem).
  assert zoo_layers.max_pool_ceil(jnp.zeros((1, 56, 56, 1)), 3, 2).shape == (1, 28, 28, 1)
  assert zoo_layers.max_pool_ceil(jnp.zeros((1, 112, 112, 1)), 3, 2).shape == (1, 56, 56, 1)


def test_mobilefacenet_without_head_returns_the_embedding():
  x = jnp.zeros((2, 112, 112, 3))
  model = models.get("mobilefacenet")
  out = jax.eval_shape(lambda x: models.apply_model(model, model.init(jax.random.key(0), x), x,
                                                    features=["embedding", "pooled"]), x)
  assert out.logits.shape == (2, 128)
  assert out.features["embedding"].shape == (2, 128)
  assert out.features["pooled"].shape == (2, 512)  # the 7x7 global depthwise conv's output
  headed = models.get("mobilefacenet", num_classes=10)
  logits = jax.eval_shape(lambda x: headed.init_with_output(jax.random.key(0), x)[0], x)
  assert logits.shape == (2, 10)


def test_inception_v3_rejects_inputs_below_75():
  with pytest.raises(ValueError, match="75x75"):
    models.feature_names(models.get("inception_v3"), jnp.zeros((1, 64, 64, 3)))
