"""The CIFAR benchmark family (RepDistiller resnet/wrn/vgg), the Maxout layer and the FitNets MNIST nets."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.models import cifar, maxout

CIFAR_NAMES = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
               "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
               "vgg8", "vgg11", "vgg13"]

# Trainable parameters with num_classes=100, PyTorch convention (conv/linear weights and biases
# plus BatchNorm weight+bias; running mean/var are buffers in PyTorch and ``batch_stats`` here,
# so neither side counts them). No exact integers are published: each figure was derived by
# counting the layers of HobbitLong/RepDistiller models/{resnet,wrn,vgg}.py (commit b84f547,
# the vgg names = its ``*_bn`` variants, as in its ``model_dict``), with an independent
# layer-by-layer tally. The rounded figures are the ones quoted for the CRD benchmark (CRD
# paper / RepDistiller tables) and, for WRNs, the AT paper (Zagoruyko & Komodakis 2017, Table 1,
# CIFAR-10 head: subtract 90 * (width of the last group + 1)).
EXPECTED_PARAMS = {
    "resnet8": 83_892,         # ~0.08M; 16-16-32-64, n=1
    "resnet14": 181_108,       # ~0.18M; n=2
    "resnet20": 278_324,       # ~0.28M (CRD student); n=3
    "resnet32": 472_756,       # ~0.47M (CRD student); n=5
    "resnet44": 667_188,       # ~0.67M; n=7
    "resnet56": 861_620,       # ~0.86M (CRD teacher); n=9
    "resnet110": 1_736_564,    # ~1.73M (CRD teacher); n=18
    "resnet8x4": 1_233_540,    # ~1.23M (CRD student); 32-64-128-256, n=1
    "resnet32x4": 7_433_860,   # ~7.43M (CRD teacher); n=5
    "wrn_16_1": 180_916,       # ~0.18M (AT: 0.2M; with 10 classes 175,066)
    "wrn_16_2": 703_284,       # ~0.70M (CRD student; AT: 0.7M)
    "wrn_40_1": 569_780,       # ~0.57M (CRD student; AT: 0.6M)
    "wrn_40_2": 2_255_156,     # ~2.25M (CRD teacher; AT: 2.2M; with 10 classes 2,243,546)
    "vgg8": 3_965_028,         # ~3.96M (CRD student); cfg S, conv biases + BN
    "vgg11": 9_277_284,        # ~9.28M; cfg A
    "vgg13": 9_462_180,        # ~9.46M (CRD teacher); cfg B
}


def _shapes(model, input_shape=(2, 32, 32, 3)):
  """(param/batch_stats shapes, feature shapes) by shape inference only."""
  def run(x):
    variables = model.init(jax.random.key(0), x)
    out = models.apply_model(model, variables, x, features=models.feature_names(model, x))
    return variables, out.features
  return jax.eval_shape(run, jax.ShapeDtypeStruct(input_shape, jnp.float32))


def _expected_features(name: str, batch: int = 2) -> dict[str, tuple[int, ...]]:
  """Feature shapes from the reference definitions (32x32 input, 100 classes)."""
  b = batch
  if name.startswith("resnet"):
    w = (32, 64, 128, 256) if name.endswith("x4") else (16, 16, 32, 64)
    stages = {"stage1": (b, 32, 32, w[1]), "stage2": (b, 16, 16, w[2]), "stage3": (b, 8, 8, w[3])}
    stem, pooled = (b, 32, 32, w[0]), (b, w[3])
  elif name.startswith("wrn"):
    k = int(name.split("_")[2])
    stages = {"stage1": (b, 32, 32, 16 * k), "stage2": (b, 16, 16, 32 * k), "stage3": (b, 8, 8, 64 * k)}
    stem, pooled = (b, 32, 32, 16), (b, 64 * k)
  else:  # vgg: no pool before block 4 at 32x32, so blocks 3 and 4 are both 4x4
    stages = {"stage1": (b, 16, 16, 128), "stage2": (b, 8, 8, 256), "stage3": (b, 4, 4, 512),
              "stage4": (b, 4, 4, 512)}
    stem, pooled = (b, 32, 32, 64), (b, 512)
  expected = {"stem": stem, "pooled": pooled, "logits": (b, 100)}
  for key, shape in stages.items():
    expected[key] = expected[f"{key}_preact"] = shape
  return expected


def test_all_benchmark_names_are_registered():
  assert set(CIFAR_NAMES) <= set(models.names())
  for name in CIFAR_NAMES:
    assert models.spec(name).input_shape == (32, 32, 3)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_parameter_count_matches_reference(name):
  model = models.get(name)
  assert models.count_params(model, models.spec(name).input_shape) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_feature_names_and_nhwc_shapes(name):
  variables, features = _shapes(models.get(name))
  got = {key: value.shape for key, value in features.items()}
  assert got == _expected_features(name)
  # Every BN has running mean/var (PyTorch's buffers) beside its scale/bias (PyTorch's weight/bias).
  stats = flax.traverse_util.flatten_dict(variables["batch_stats"], sep="/")
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert stats
  for key, value in stats.items():
    module = key.rsplit("/", 1)[0]
    assert value.shape == params[f"{module}/scale"].shape == params[f"{module}/bias"].shape


def test_num_classes_is_configurable():
  assert models.count_params(models.get("resnet8", num_classes=10), (32, 32, 3)) == 83_892 - 90 * (64 + 1)


def test_stride2_conv_pads_like_pytorch():
  # PyTorch's padding=1 with stride 2 centres output (i, j) on input (2i, 2j); Flax's "SAME"
  # would centre it on (2i+1, 2j+1). A centre-tap kernel therefore reads x[::2, ::2].
  conv = cifar._conv3x3(1, 2, name="c")
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)
  x = jnp.arange(36.0).reshape(1, 6, 6, 1)
  y = conv.apply({"params": {"kernel": kernel}}, x)
  np.testing.assert_array_equal(y[0, :, :, 0], x[0, ::2, ::2, 0])


def _numpy_variables(model, x):
  """He-scaled random variables built with NumPy from the shapes of ``model.init``.

  Running the Flax initialisers eagerly compiles one XLA random kernel per distinct shape, which
  costs more than the whole training step on a shared 2-core machine; the initialisers themselves
  are checked in ``test_initialisers_follow_reference``.
  """
  rng = np.random.default_rng(0)
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x))
  values = {}
  for path, leaf in shapes.items():
    if path[-1] == "kernel":
      values[path] = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif path[-1] in ("scale", "var"):
      values[path] = np.ones(leaf.shape)
    else:
      values[path] = np.zeros(leaf.shape)
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def test_initialisers_follow_reference():
  # Convs: N(0, 2 / (k*k*out)) (kaiming_normal fan_out / the WRN+VGG normal_); BN: scale 1, bias 0.
  kernel = cifar._conv_init(jax.random.key(0), (3, 3, 64, 128))
  assert abs(float(kernel.std()) / np.sqrt(2.0 / (9 * 128)) - 1) < 0.02
  assert abs(float(kernel.mean())) < 1e-3
  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both weight and bias.
  bound = 1 / np.sqrt(64)
  weight = cifar._torch_linear_kernel_init(jax.random.key(1), (64, 100))
  bias = cifar._torch_linear_bias_init(64)(jax.random.key(2), (100,))
  assert float(jnp.abs(weight).max()) <= bound and float(jnp.abs(weight).max()) > 0.9 * bound
  assert float(jnp.abs(bias).max()) <= bound


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "resnet8x4"])
def test_forward_and_one_sgd_step(name):
  model = models.get(name)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3)) + 0.5
  labels = jnp.array([3, 97])
  variables = _numpy_variables(model, x)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.1, momentum=0.9)
  last = "stage4" if name.startswith("vgg") else "stage3"
  names = ["stem", "stage1", "stage1_preact", "stage3", "stage3_preact", last, "pooled", "logits"]

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      out = models.apply_model(model, {"params": p, "batch_stats": stats}, x, train=True,
                               features=names)
      loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
      return loss, out
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), out, loss, grads

  new_params, out, loss, grads = step(params, stats, tx.init(params))
  assert out.logits.shape == (2, 100) and np.isfinite(float(loss))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))
  # Train mode updates the BN running statistics, eval mode leaves them alone.
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), out.batch_stats, stats)
  assert all(jax.tree.leaves(changed))
  evaluated = models.apply_model(model, variables, x, train=False)
  jax.tree.map(np.testing.assert_array_equal, evaluated.batch_stats, stats)
  assert evaluated.logits.shape == (2, 100)

  f = out.features
  np.testing.assert_array_equal(f["logits"], out.logits)
  # How the pre-/post-activation pairs relate, per family.
  if name.startswith("wrn"):
    # stageK is the raw residual sum; stageK_preact = BN(stageK) in batch mode; pooled = mean relu.
    s1, p1 = np.asarray(f["stage1"]), np.asarray(f["stage1_preact"])
    mean, var = s1.mean(axis=(0, 1, 2)), s1.var(axis=(0, 1, 2))
    np.testing.assert_allclose(p1, (s1 - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=1e-3)
    assert (s1 < 0).any() and (p1 < 0).any()
    np.testing.assert_allclose(f["pooled"], jnp.maximum(f["stage3_preact"], 0).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
  else:
    for k in ("stage1", "stage3"):
      np.testing.assert_array_equal(f[k], jnp.maximum(f[f"{k}_preact"], 0))
      assert (np.asarray(f[f"{k}_preact"]) < 0).any()
    np.testing.assert_allclose(f["pooled"], f[last].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Maxout
# --------------------------------------------------------------------------------------------


def test_maxout_matches_hand_computation():
  # 1x1 conv on a 1x2 image with 2 input channels, 2 units x 3 pieces. Pieces of unit c are the
  # consecutive conv channels 3c..3c+2 (pylearn2's grouping).
  layer = maxout.Maxout(features=2, pieces=3, kernel_size=(1, 1), padding="VALID")
  x = jnp.array([[[[1.0, 2.0], [-1.0, 0.5]]]])                        # [1, 1, 2, 2]
  kernel = jnp.array([[1.0, 0.0, -1.0, 2.0, 0.5, 0.0],
                      [0.0, 1.0, 1.0, -1.0, 0.0, -2.0]]).reshape(1, 1, 2, 6)
  bias = jnp.array([0.0, 0.5, 0.0, 0.0, 1.0, 0.0])
  y = layer.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)
  # pixel (1, 2):    z = [1, 2.5, 1, 0, 1.5, -4]  -> units [max(1, 2.5, 1), max(0, 1.5, -4)] = [2.5, 1.5]
  # pixel (-1, 0.5): z = [-1, 1, 1.5, -2.5, 0.5, -1] -> [1.5, 0.5]
  np.testing.assert_allclose(y, [[[[2.5, 1.5], [1.5, 0.5]]]])
  assert jax.eval_shape(layer.init, jax.random.key(0), x)["params"]["conv"]["kernel"].shape == (1, 1, 2, 6)


def test_maxout_dense_and_pieces_one_is_linear():
  dense = maxout.MaxoutDense(features=1, pieces=2)
  params = {"dense": {"kernel": jnp.array([[1.0, -1.0]]), "bias": jnp.zeros(2)}}
  # max(x, -x) = |x|: a 2-piece maxout unit can represent the absolute value.
  np.testing.assert_allclose(dense.apply({"params": params}, jnp.array([[-3.0], [2.0]])), [[3.0], [2.0]])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 5, 5, 2)), jnp.float32)
  conv = {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  expected = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
  got = maxout.Maxout(features=3, pieces=1).apply({"params": {"conv": conv}}, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_max_pool_ceil_keeps_partial_windows():
  # 5 pixels, window 4, stride 2: ceil((5-4)/2)+1 = 2 windows, [0..3] and the partial [2..4].
  x = jnp.array([1.0, 7.0, 2.0, 3.0, 9.0]).reshape(1, 1, 5, 1)
  y = maxout.max_pool_ceil(jnp.broadcast_to(x, (1, 5, 5, 1)), 4, 2)
  assert y.shape == (1, 2, 2, 1)
  np.testing.assert_array_equal(y[0, 0, :, 0], [7.0, 9.0])


def test_fitnet_mnist_nets():
  # FitNets (Romero et al. 2015) quotes ~361K (teacher) and ~30K (student) parameters.
  assert models.count_params(models.get("fitnet_mnist_teacher"), (28, 28, 1)) == 361_066
  assert models.count_params(models.get("fitnet_mnist_student"), (28, 28, 1)) == 30_130
  _, teacher = _shapes(models.get("fitnet_mnist_teacher"), (2, 28, 28, 1))
  _, student = _shapes(models.get("fitnet_mnist_student"), (2, 28, 28, 1))
  assert {k: v.shape for k, v in teacher.items()} == {
      "layer1": (2, 10, 10, 48), "layer2": (2, 4, 4, 48), "layer3": (2, 3, 3, 24), "logits": (2, 10)}
  assert [student[f"layer{i}"].shape for i in range(1, 7)] == [
      (2, 24, 24, 16), (2, 10, 10, 16), (2, 12, 12, 16), (2, 4, 4, 16), (2, 8, 8, 12), (2, 3, 3, 12)]
  # The hint pair of the paper's MNIST experiment: student layer 4 <- teacher layer 2 (same 4x4 grid).
  assert student["layer4"].shape[1:3] == teacher["layer2"].shape[1:3]
