"""Moonshine: cheap blocks (parameter counts, G(1) = 3×3 + 1×1, groups vs channels per group), MAC counts,
the AT loss scaling and old-style KD, and short runs of the small and full configs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Capture
from jax.test_util import check_grads

from kdjax import cli, models, reproduce
from kdjax import train as ktrain
from kdjax.methods import attention_transfer as at
from kdjax.methods import moonshine as ms
from kdjax.models import cheap
from kdjax.models.macs import count_macs, describe_model


def _params(module, shape):
  """The parameter shapes (shape inference only: no computation, fast on a loaded machine)."""
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)["params"]


def _count(tree) -> int:
  return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


# --- cheap blocks: parameter counts (PAPERS.md §11(e)) -----------------------------------------------------


@pytest.mark.parametrize("n, m, g", [(16, 16, 1), (16, 16, 2), (16, 32, 4), (32, 32, 32)])
def test_grouped_block_parameter_count(n, m, g):
  p = _params(cheap.CheapConv(m, block=cheap.CheapBlock(groups=g)), (6, 6, n))
  assert p["grouped"]["kernel"].shape == (3, 3, n // g, n)        # grouped 3×3: N²·9/g weights
  assert p["pointwise"]["kernel"].shape == (1, 1, n, m)           # pointwise: N·M (N² inside a group)
  assert _count(p) == n * n * 9 // g + 2 * n + n * m              # + the inner BN's scale and offset


@pytest.mark.parametrize("b, g", [(2, None), (4, None), (2, 4), (2, 1)])
def test_bottleneck_block_parameter_count(b, g):
  n, m = 32, 64
  p = _params(cheap.CheapConv(m, block=cheap.CheapBlock(bottleneck=b, groups=g)), (6, 6, n))
  w = m // b                                                       # the code's out_planes // b
  assert _count(p) == n * w + 2 * w + 9 * w * w // (g or 1) + 2 * w + w * m


def test_depthwise_is_groups_equal_channels():
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
  dw, g8 = cheap.CheapConv(12, block="DW"), cheap.CheapConv(12, block=cheap.CheapBlock(groups=8))
  v = jax.jit(dw.init)(jax.random.key(0), x)
  assert v["params"]["grouped"]["kernel"].shape == (3, 3, 1, 8)
  assert cheap.parse_block("G(N)").num_groups(8) == 8 and cheap.parse_block("DConv").num_groups(8) == 8
  np.testing.assert_allclose(jax.jit(dw.apply)(v, x), jax.jit(g8.apply)(v, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels, groups, stride", [(8, 8, 2), (16, 4, 1), (16, 2, 2)])
def test_grouped_conv_equals_lax_values_and_gradients(channels, groups, stride):
  """The CPU-friendly grouped convolution (depthwise taps / per-group dense convs) is lax's grouped conv."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 8, channels))
  w = jax.random.normal(jax.random.key(1), (3, 3, channels // groups, channels))
  pads = ((1, 1), (1, 1))

  def ours(x, w):
    return jnp.sum(jnp.sin(cheap.grouped_conv(x, w, (stride, stride), pads, groups)))

  def ref(x, w):
    return jnp.sum(jnp.sin(jax.lax.conv_general_dilated(x, w, (stride, stride), pads, feature_group_count=groups,
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                        precision="highest")))
  got, want = jax.jit(jax.value_and_grad(ours, (0, 1)))(x, w), jax.jit(jax.value_and_grad(ref, (0, 1)))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_whole_student_parameter_count_by_formula():
  """WRN-10-1 with G(4): the teacher's count minus its block 3×3s plus the cheap blocks (shortcuts unchanged)."""
  shape = (28, 28, 1)
  teacher = _count(_params(models.get("wrn_10_1", num_classes=10), shape))
  student = _count(_params(models.get("wrn_10_1_g4", num_classes=10), shape))
  convs = [(16, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]  # (in, out) of conv1, conv2 per group
  dense = sum(9 * i * o for i, o in convs)
  grouped = sum(9 * i * i // 4 + 2 * i + i * o for i, o in convs)
  assert student == teacher - dense + grouped


# --- G(1) = dense 3×3 + 1×1; the dense block is the zoo's WRN ----------------------------------------------


def test_g1_block_equals_dense_3x3_then_1x1():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  block = cheap.CheapConv(5, strides=2, block=cheap.CheapBlock(groups=1))
  v = jax.jit(block.init)(jax.random.key(1), x)
  k = jax.random.split(jax.random.key(2), 4)
  stats = {"bn": {"mean": jax.random.normal(k[0], (4,)), "var": 0.5 + jax.random.uniform(k[1], (4,))}}
  params = jax.tree.map(lambda a: a, v["params"])
  params["bn"] = {"scale": 1 + jax.random.normal(k[2], (4,)) * 0.1, "bias": jax.random.normal(k[3], (4,)) * 0.1}
  got = jax.jit(block.apply)({"params": params, "batch_stats": stats}, x)

  def conv(inp, w, stride, pad):
    return jax.lax.conv_general_dilated(inp, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
  y = conv(x, params["grouped"]["kernel"], 2, ((1, 1), (1, 1)))            # dense 3×3 (one group), stride 2
  y = (y - stats["bn"]["mean"]) / jnp.sqrt(stats["bn"]["var"] + 1e-5) * params["bn"]["scale"] + params["bn"]["bias"]
  want = conv(jax.nn.relu(y), params["pointwise"]["kernel"], 1, "VALID")  # then 1×1
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_dense_block_is_the_zoo_wrn():
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  zoo, ours = models.cifar.WideResNet(depth=10, widen_factor=1, num_classes=7), models.get("wrn_10_1", num_classes=7)
  v = jax.jit(zoo.init)(jax.random.key(3), x)
  assert jax.tree.structure(v) == jax.tree.structure(jax.eval_shape(ours.init, jax.random.key(3), x))
  np.testing.assert_allclose(jax.jit(ours.apply)(v, x), jax.jit(zoo.apply)(v, x), rtol=1e-6, atol=1e-6)


def test_shortcut_stays_dense_and_features_are_the_group_outputs():
  v = _params(models.get("wrn_10_2_dw", num_classes=10), (16, 16, 3))
  assert v["block2_0"]["shortcut"]["kernel"].shape == (1, 1, 32, 64)   # 1×1 projection, not replaced
  assert v["conv1"]["kernel"].shape == (3, 3, 3, 16)                    # the stem is not replaced either
  assert v["block2_0"]["conv1"]["grouped"]["kernel"].shape == (3, 3, 1, 32)
  _, feats, _ = describe_model(models.get("wrn_10_2_dw", num_classes=10), (16, 16, 3))
  assert {"stage1", "stage2", "stage3"} <= set(feats)


# --- groups vs channels per group (§11(f)) ------------------------------------------------------------------


def test_code_names_map_to_groups_or_channels_per_group():
  assert cheap.parse_block("DConvA4") == cheap.parse_block("G(4)") == cheap.CheapBlock(groups=4)
  assert cheap.parse_block("DConvG8") == cheap.CheapBlock(channels_per_group=8)
  assert cheap.parse_block("A4B2") == cheap.parse_block("BG(2,4)") == cheap.CheapBlock(bottleneck=2, groups=4)
  assert cheap.parse_block("G8B2") == cheap.CheapBlock(bottleneck=2, channels_per_group=8)
  assert cheap.parse_block("ConvB2") == cheap.parse_block("B(2)") and cheap.parse_block("Conv").is_dense
  # G8 = groups of 8 channels: 128 channels -> 16 groups, whereas G(8) = 8 groups of 16 channels.
  assert cheap.parse_block("DConvG8").num_groups(128) == 16 and cheap.parse_block("G(8)").num_groups(128) == 8
  for spec in ("G(4)", "DConvG8", "G8B2", "BG(2,N)", "DConvB2", "conv"):
    assert cheap.parse_block(cheap.parse_block(spec).label()) == cheap.parse_block(spec)


def test_g8b2_kernel_differs_from_bg2_8_on_the_params():
  """On WRN-10-2's first group (32 channels, bottleneck 16): G8B2 = 2 groups of 8, BG(2,8) = 8 groups of 2."""
  shape = (8, 8, 1)
  code = _params(models.get("wrn_10_2", num_classes=10, block="G8B2"), shape)
  paper = _params(models.get("wrn_10_2", num_classes=10, block="BG(2,8)"), shape)
  assert code["block1_0"]["conv2"]["conv"]["kernel"].shape == (3, 3, 8, 16)
  assert paper["block1_0"]["conv2"]["conv"]["kernel"].shape == (3, 3, 2, 16)


def test_registered_g4_means_four_groups():
  p = _params(models.get("wrn_10_2_g4", num_classes=10), (8, 8, 1))
  for name, c in (("block1_0", 32), ("block2_0", 64), ("block3_0", 128)):
    assert p[name]["conv2"]["grouped"]["kernel"].shape == (3, 3, c // 4, c)


def test_errors_name_layer_channels_groups_and_choices():
  with pytest.raises(ValueError, match=r"block1_0/conv1.*16 input channels into 3 groups.*1, 2, 4, 8, 16"):
    _params(models.get("wrn_10_1", num_classes=10, block="G(3)"), (8, 8, 1))
  with pytest.raises(ValueError, match=r"block1_0/conv1.*groups of 5 channels.*16"):
    _params(models.get("wrn_10_1", num_classes=10, block="DConvG5"), (8, 8, 1))
  with pytest.raises(ValueError, match=r"bottleneck factor 3, but 3 does not divide 16; valid factors: 1, 2, 4"):
    _params(models.get("wrn_10_1", num_classes=10, block="B(3)"), (8, 8, 1))
  with pytest.raises(ValueError, match="at most one of groups=, channels_per_group=, depthwise="):
    cheap.CheapBlock(groups=2, depthwise=True)
  with pytest.raises(ValueError, match="unknown cheap block 'G4'.*DConvG<k>"):
    cheap.parse_block("G4")


# --- MACs and `kdjax list models` ---------------------------------------------------------------------------


def test_macs_by_hand():
  n, m, g, hw = 8, 12, 4, 5
  block = cheap.CheapConv(m, block=cheap.CheapBlock(groups=g))
  assert count_macs(block, (hw, hw, n)) == hw * hw * n * 9 * (n // g) + hw * hw * n * m
  assert count_macs(models.get("mlp", hidden=(7,), num_classes=3), (4, 4, 1)) == 16 * 7 + 7 * 3


def test_list_models_shows_cheap_variants_with_macs(monkeypatch, capsys):
  for name in ("wrn_40_2_g2", "wrn_40_2_g4", "wrn_40_2_dw", "wrn_40_2_b2", "wrn_40_2_bg2_4", "wrn_16_2_g4",
               "wrn_10_2_bg2_4", "resnet34_imagenet_g4"):
    assert name in models.names()
  monkeypatch.setattr(models, "names", lambda: ["wrn_10_1", "wrn_10_1_dw"])
  cli.main(["list", "models"])
  out = capsys.readouterr().out
  dense = describe_model(models.get("wrn_10_1"), models.spec("wrn_10_1").input_shape)
  assert f"{dense[0]:>12,d} params {dense[2] / 1e6:>10,.1f}M MACs" in out
  assert "wrn_10_1_dw" in out and "G(N): depthwise" in out


# --- the loss -------------------------------------------------------------------------------------------------


def _feats(key, n, shapes=((4, 4, 3), (2, 2, 5))):
  keys = jax.random.split(key, len(shapes))
  return [jax.random.normal(k, (n, *s)) for k, s in zip(keys, shapes)]


def test_at_term_hand_value_and_beta_three_over_n():
  s = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)   # map [1, 0, 0, 0]
  t = jnp.ones((1, 2, 2, 1))                             # map [.5, .5, .5, .5]
  logits, labels, mask = jnp.zeros((1, 3)), jnp.array([0]), jnp.array([0.0])  # unlabelled: no CE
  for n in (1, 3, 4):
    loss, parts = ms.moonshine_loss(logits, logits, [s] * n, [t] * n, labels, label_mask=mask, beta=1000.0)
    np.testing.assert_allclose(parts["attention"], [0.25 * n], rtol=1e-6)       # mean_hw (a_s - a_t)² = 1/4
    np.testing.assert_allclose(loss, [1000.0 * 3 / n * 0.25 * n], rtol=1e-6)     # β·3/n per point: 750 for any n


def test_loss_matches_attention_transfer_and_old_kd():
  k = jax.random.split(jax.random.key(0), 4)
  sf, tf = _feats(k[0], 6), _feats(k[1], 6)
  s_logits, t_logits = jax.random.normal(k[2], (6, 10)), 3 * jax.random.normal(k[3], (6, 10))
  labels, mask = jnp.arange(6) % 10, jnp.array([1, 1, 0, 1, 0, 1.0])
  loss, parts = ms.moonshine_loss(s_logits, t_logits, sf, tf, labels, label_mask=mask, beta=100.0, alpha=0.0)
  at_sum = at.attention_loss_pairs(sf, tf, mode="code")
  ce = -jax.nn.log_softmax(s_logits)[jnp.arange(6), labels] * mask
  np.testing.assert_allclose(loss, ce + 100.0 * 3 / 2 * at_sum, rtol=1e-5)
  # Old-style KD: F.kl_div's element mean over B·C, times 2T²α, plus (1 − α)·CE (masked).
  T, alpha = 4.0, 0.9
  loss, _ = ms.moonshine_loss(s_logits, t_logits, sf, tf, labels, label_mask=mask, beta=0.0, alpha=alpha,
                              temperature=T)
  p_t = np.asarray(jax.nn.softmax(t_logits / T))
  kl_elements = p_t * (np.log(p_t) - np.asarray(jax.nn.log_softmax(s_logits / T)))
  torch_mean = kl_elements.mean()  # reduction over all B·C elements
  np.testing.assert_allclose(np.mean(loss), torch_mean * 2 * T * T * alpha + (1 - alpha) * np.mean(ce), rtol=1e-5)
  loss_bm, _ = ms.moonshine_loss(s_logits, t_logits, sf, tf, labels, label_mask=mask, beta=0.0, alpha=alpha,
                                 temperature=T, kd_form="batchmean")
  np.testing.assert_allclose(np.mean(loss_bm), kl_elements.sum(1).mean() * T * T * alpha + (1 - alpha) * np.mean(ce),
                             rtol=1e-5)


def test_loss_under_jit_and_grad():
  k = jax.random.split(jax.random.key(1), 4)
  sf, tf = _feats(k[0], 4), _feats(k[1], 4)
  s_logits, t_logits = jax.random.normal(k[2], (4, 5)), jax.random.normal(k[3], (4, 5))
  labels, mask = jnp.array([0, 1, 2, 3]), jnp.array([1.0, 0.0, 1.0, 1.0])

  def total(s_logits, s0, s1):
    loss, _ = ms.moonshine_loss(s_logits, t_logits, [s0, s1], tf, labels, label_mask=mask, alpha=0.5)
    return jnp.mean(loss)
  eager = total(s_logits, *sf)
  np.testing.assert_allclose(jax.jit(total)(s_logits, *sf), eager, rtol=1e-5)
  def independent(s_logits, s0, s1):  # the same objective written from its parts (AT code loss, old KD, masked CE)
    ce = -jax.nn.log_softmax(s_logits)[jnp.arange(4), labels] * mask
    kd = ms.old_kd_loss(s_logits, t_logits, temperature=4.0)
    return jnp.mean(0.5 * ce + 0.5 * kd + 1000.0 * 3 / 2 * at.attention_loss_pairs([s0, s1], tf, mode="code"))
  np.testing.assert_allclose(eager, independent(s_logits, *sf), rtol=1e-5)
  grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(s_logits, *sf)
  want = jax.grad(independent, argnums=(0, 1, 2))(s_logits, *sf)
  for g, w in zip(grads, want):
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # The KD and CE parts alone against finite differences (the AT part's curvature at β = 1000 is too high for
  # float32 differences; its gradient is attention_transfer's, tested there).
  check_grads(lambda z: jnp.mean(ms.moonshine_loss(z, t_logits, sf, tf, labels, label_mask=mask, beta=0.0,
                                                   alpha=0.5)[0]), (s_logits,), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)


def test_loss_argument_errors():
  z, y, m = jnp.zeros((2, 3)), jnp.zeros(2, int), jnp.ones(2)
  f = _feats(jax.random.key(0), 2)
  with pytest.raises(ValueError, match="alpha"):
    ms.moonshine_loss(z, z, f, f, y, label_mask=m, alpha=1.5)
  with pytest.raises(ValueError, match="as many student as teacher AT points"):
    ms.moonshine_loss(z, z, f, f[:1], y, label_mask=m)
  with pytest.raises(ValueError, match="kd_form"):
    ms.make_objective(student_layers=("stage1",), teacher_layers=("stage1",), beta=1.0, alpha=0.0,
                      temperature=4.0, kd_form="new")


def test_student_builder():
  assert ms.student_model("wrn_40_2", "G(4)") == ("wrn_40_2_g4", {})
  assert ms.student_model("wrn_40_2", "A4B2") == ("wrn_40_2_bg2_4", {})
  assert ms.student_model("wrn_10_2", "DConvG8") == ("wrn_10_2", {"block": "G(N/8)"})
  assert ms.student_model("resnet34_imagenet", "DW") == ("resnet34_imagenet_dw", {})
  assert ms.student_model("wrn_16_2", "conv") == ("wrn_16_2", {})
  with pytest.raises(ValueError, match="registered cheap variants for"):
    ms.student_model("wrn_40_2", "DConvG8")
  with pytest.raises(ValueError, match="has no cheap variants"):
    ms.student_model("resnet8", "G(2)")


# --- configs and short runs ---------------------------------------------------------------------------------


def test_protocol_configs():
  paper = reproduce.load_paper("moonshine")
  teacher = paper.get_config("teacher")
  assert teacher.labelled_examples == 1000 and not teacher.include_unlabelled and teacher.jitter == 2
  # one recipe for the teacher and its students, as in the paper
  assert teacher.num_steps == paper.STEPS and teacher.learning_rate == paper.LEARNING_RATE
  for block in paper.BLOCKS:
    scratch, student = paper.get_config(f"{block}_scratch"), paper.get_config(f"{block}_at")
    assert scratch.model == student.model == f"{teacher.model}_{block}"
    assert not scratch.include_unlabelled and student.include_unlabelled and scratch.method == "supervised"
    assert student.method == "moonshine" and student.teacher_workdir == "@teacher" and student.loss.beta == 1000.0
    assert scratch.num_steps == student.num_steps == paper.STEPS
    assert scratch.jitter == student.jitter == 2 and scratch.learning_rate == student.learning_rate == 3e-3
  assert set(paper.PROTOCOL) <= set(paper.VARIANTS) and paper.PROTOCOL[0] == "teacher"
  full = paper.get_config("g4_at,full")
  assert full.model == "wrn_40_2_g4" and full.optimizer == "sgd" and full.num_epochs == 200
  imagenet = paper.get_config("imagenet_dw_at,full")
  assert imagenet.model == "resnet34_imagenet_dw" and len(imagenet.loss.student_layers) == 4
  with pytest.raises(ValueError, match="imagenet_teacher,full"):
    paper.get_config("imagenet_teacher")


def _tiny(c, path, steps=2):
  c.dataset, c.batch_size, c.num_steps, c.num_epochs, c.eval_batch_size = path, 8, steps, 0, 8
  c.labelled_examples, c.log_every_steps = 0, 1
  return c


@pytest.mark.slow  # three stages compiled: 374 s measured on the loaded 2-core machine (load average 12)
def test_small_config_smoke(tmp_path):
  """teacher then ``g4_at`` (AT at the three groups) then ``dw_scratch``, two steps each, on 28×28×1 noise."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / "tiny.npz")
  np.savez(path, x_train=rng.integers(0, 255, (16, 28, 28, 1), np.uint8), y_train=np.arange(16) % 10,
           x_test=rng.integers(0, 255, (8, 28, 28, 1), np.uint8), y_test=np.arange(8) % 10)
  paper = reproduce.load_paper("moonshine")
  ktrain.train_and_evaluate(_tiny(paper.get_config("teacher"), path), str(tmp_path / "t"), progress=False)
  c = _tiny(paper.get_config("g4_at"), path)
  c.teacher_workdir = str(tmp_path / "t")
  capture = Capture()
  result = ktrain.train_and_evaluate(c, str(tmp_path / "s"), progress=False, callbacks=[capture])
  assert result["steps"] == 2 and 0.0 <= result["test_accuracy"] <= 1.0
  assert "grouped" in capture.state.params["block1_0"]["conv1"]
  result = ktrain.train_and_evaluate(_tiny(paper.get_config("dw_scratch"), path), str(tmp_path / "d"), progress=False)
  assert result["steps"] == 2


@pytest.mark.slow  # two WRN stages compiled: 242 s measured on the loaded 2-core machine
def test_full_config_smoke(tmp_path):
  """``teacher,full`` and ``bg2_4_at,full`` (SGD recipe, crops/flips) for 2 steps on tiny CIFAR-shaped inputs;
  WRN-40-2 is cut to depth 10 through model_kwargs to keep the compile short."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / "tiny_cifar.npz")
  np.savez(path, x_train=rng.integers(0, 255, (16, 8, 8, 3), np.uint8), y_train=np.arange(16) % 10,
           x_test=rng.integers(0, 255, (8, 8, 8, 3), np.uint8), y_test=np.arange(8) % 10)
  paper = reproduce.load_paper("moonshine")
  teacher = _tiny(paper.get_config("teacher,full"), path)
  assert teacher.model == "wrn_40_2" and teacher.optimizer == "sgd" and teacher.hflip
  teacher.model_kwargs = {"depth": 10}
  ktrain.train_and_evaluate(teacher, str(tmp_path / "t"), progress=False)
  c = _tiny(paper.get_config("bg2_4_at,full"), path)
  c.model_kwargs = {"depth": 10}
  c.teacher_workdir = str(tmp_path / "t")
  result = ktrain.train_and_evaluate(c, str(tmp_path / "s"), progress=False)
  assert result["steps"] == 2 and np.isfinite(result["train"]["loss"])


def test_pareto_script_joins_both_protocols_and_reads_the_shared_teacher_once(tmp_path):
  """``papers/moonshine/pareto.py run_a run_b``: per-variant test errors (mean ± sample std over seeds), the
  teacher that both runs trained read from the first run only, parameters from the registered models."""
  from kdjax.config import load_module, papers_dir
  pareto = load_module(papers_dir() / "moonshine" / "pareto.py")
  accuracies = {("a", "teacher"): (0.96, 0.94), ("a", "dw_scratch"): (0.90, 0.88),
                ("b", "teacher"): (0.0, 0.0), ("b", "g2_at"): (0.95,)}
  for (run, variant), per_seed in accuracies.items():
    for seed, accuracy in enumerate(per_seed):
      stage = tmp_path / run / f"seed_{seed}" / variant
      stage.mkdir(parents=True)
      (stage / "results.json").write_text(json.dumps({"test_accuracy": accuracy}))
  out = tmp_path / "out"
  assert pareto.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
  rows = {row["variant"]: row for row in json.loads((out / "pareto.json").read_text())}
  assert set(rows) == {"teacher", "dw_scratch", "g2_at"}
  assert rows["teacher"]["seeds"] == 2 and rows["teacher"]["error_mean"] == pytest.approx(0.05)
  assert rows["teacher"]["error_std"] == pytest.approx(math.sqrt(2) * 0.01)
  assert rows["g2_at"]["seeds"] == 1 and rows["g2_at"]["error_std"] == 0.0
  assert rows["teacher"]["params"] == 77_562 and rows["dw_scratch"]["params"] == 13_962
  assert rows["dw_scratch"]["params"] < rows["g2_at"]["params"] < rows["teacher"]["params"]
  assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| dw_scratch | wrn_10_1_dw | 13,962 |" in (out / "pareto.md").read_text()
