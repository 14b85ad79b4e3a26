"""Data-free KD (Lopes et al. 2017): metadata = NumPy statistics, spectral records, objectives, reconstruction
(vmapped, lowers its objective, resumes mid-way without redoing classes), errors for wrong teachers/classes."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import StopTraining, crash_after, set_fields
from jax.test_util import check_grads
from test_train import tiny_config

from kdjax import data as kdata
from kdjax import models, parallel, train
from kdjax.methods import data_free as df

TEACHER = {"hidden": (12, 8)}



def one_device():
  return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(tiny_config(model_kwargs=dict(TEACHER), num_steps=40, batch_size=32), workdir,
                           progress=False, mesh=one_device())
  return workdir


def metadata_config(teacher_dir, **fields):
  c = tiny_config(method="data_free_metadata", teacher_workdir=teacher_dir, num_steps=20, batch_size=16)
  c.loss = ml_collections.ConfigDict({**df.default_metadata_config(), "spectral_fraction": 0.3})
  return set_fields(c, fields)


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory, teacher_dir):
  workdir = str(tmp_path_factory.mktemp("metadata"))
  train.train_and_evaluate(metadata_config(teacher_dir), workdir, progress=False, mesh=one_device())
  return workdir


def reconstruct_config(teacher_dir, metadata_dir, kind="top_layer", *, n=6, adam_steps=20, per_step=5, **fields):
  c = tiny_config(method="data_free_reconstruct", teacher_workdir=teacher_dir, log_every_steps=1,
                  num_steps=0)  # the stage's own length: classes x adam_steps / per_step
  c.loss = ml_collections.ConfigDict({**df.default_reconstruct_config(),
                                      "metadata": os.path.join(metadata_dir, df.METADATA_FILE), "kind": kind,
                                      "examples_per_class": n, "adam_steps": adam_steps,
                                      "iterations_per_step": per_step, "learning_rate": 0.05})
  for key, value in fields.items():
    c[key] = value
  return c


def teacher_activations(teacher_dir, images):
  """Pre-ReLU activations of every layer (and logits / 8) of the trained tiny teacher, in float64."""
  variables, tconfig, _ = train.ckpt.load_teacher_variables(teacher_dir)
  teacher = models.get(tconfig["model"], num_classes=10, **tconfig["model_kwargs"])
  out = models.apply_model(teacher, variables, jnp.asarray(images), features=("pre_relu_0", "pre_relu_1"))
  return [np.asarray(out.features["pre_relu_0"], np.float64), np.asarray(out.features["pre_relu_1"], np.float64),
          np.asarray(out.logits, np.float64) / 8.0]


# --- pure pieces ---------------------------------------------------------------------------------------


def test_objectives_by_hand_and_gradients():
  top, target = jnp.array([1.0, -2.0, 0.5]), jnp.array([2.0, 1.0, -1.0])
  # relu: top -> (1, 0, .5), target -> (2, 1, 0): ((1)² + (1)² + (.5)²) / 3
  np.testing.assert_allclose(df.top_layer_objective(top, target), 2.25 / 3, rtol=1e-6)
  layers = [jnp.array([1.0, -1.0]), jnp.array([3.0])]
  targets = [jnp.array([0.0, 2.0]), jnp.array([1.0])]
  # layer 0: ((1)² + (2)²)/2 / 2 = 1.25; layer 1: (2)² / 1 / 1 = 4
  np.testing.assert_allclose(df.all_layers_objective(layers, targets), 5.25, rtol=1e-6)
  signal = jnp.array([1.0, 2.0, 3.0, 4.0])
  basis_a, basis_b = jnp.eye(4)[:, :2], jnp.array([[1.0], [1.0]])
  value = df.spectral_objective(signal, [(0, 4), (2, 4)], [basis_a, basis_b], [jnp.array([0.0, 0.0]), jnp.array([5.0])])
  np.testing.assert_allclose(value, (1 + 4) / 2 + (7 - 5) ** 2, rtol=1e-6)
  x = jnp.array([0.7, 1.3, 0.4])  # away from the ReLU kinks
  check_grads(lambda a: df.top_layer_objective(a, jnp.array([0.2, 2.0, 1.0])), (x,), order=1, modes=["rev"])
  check_grads(lambda a: df.spectral_objective(jnp.concatenate([a, a]), [(0, 6)], [jnp.ones((6, 2)) / 3],
                                              [jnp.array([1.0, 2.0])]), (x,), order=1, modes=["rev"])


def test_moments_equal_numpy_and_ignore_padding():
  rng = np.random.default_rng(0)
  values = rng.normal(5.0, 1.0, (40, 3)).astype(np.float32)
  weights = (np.arange(40) < 33).astype(np.float32)  # the last 7 rows are padding
  rows = values[:33].astype(np.float64)
  shift = values[:8].mean(0)  # a rough mean, as the stage's first batch of a class gives
  count, first, second = df.moment_sums(jnp.asarray(values), jnp.asarray(weights), shift=jnp.asarray(shift))
  mean, cov = df.finish_moments(np.asarray(count)[None], np.asarray(first)[None], np.asarray(second)[None], shift)
  assert count == 33
  np.testing.assert_allclose(mean[0], rows.mean(0), rtol=1e-6)
  np.testing.assert_allclose(cov[0], np.cov(rows.T, bias=True), rtol=1e-4, atol=1e-6)
  _, _, diagonal = df.moment_sums(jnp.asarray(values), jnp.asarray(weights), shift=jnp.asarray(shift), full=False)
  np.testing.assert_allclose(diagonal, np.diagonal(np.asarray(second)), rtol=1e-6)
  plan = df.metadata_plan(np.array([0, 1, 0, 1, 0, 2, 2, 0]), np.array([1, 1, 1, 1, 0, 1, 1, 1]), num_classes=3,
                          num_steps=6, multiple=2)
  assert (plan.steps_per_class, plan.batch_size) == (2, 2)  # class 0 has 3 labelled examples: 2 batches of 2
  np.testing.assert_array_equal(plan.positions(0)[0], [0, 2])
  np.testing.assert_array_equal(plan.positions(1)[1], [True, False])  # position 7, then padding
  with pytest.raises(ValueError, match="num_steps must be a multiple of the 3 classes"):
    df.metadata_plan(np.array([0, 0, 1, 1, 2, 2]), np.ones(6), num_classes=3, num_steps=4, multiple=1)


def test_top_eigenpairs_reproduce_the_matrix_to_the_kept_rank():
  rng = np.random.default_rng(1)
  f = np.abs(rng.normal(size=(50, 9)))
  matrix = f.T @ f / 50  # a co-activation graph: symmetric, non-negative, PSD
  for rank in (1, 3, 9):
    values, vectors = df.top_eigenpairs(matrix, rank)
    u, s, vt = np.linalg.svd(matrix)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart-Young: the best rank-k approximation
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, best, atol=1e-10)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(rank), atol=1e-10)
  np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, matrix, atol=1e-10)  # full rank: exact
  assert df.spectral_graphs([4, 3, 2], "all_layers_spectral") == [(0, 9)]
  assert df.spectral_graphs([4, 3, 2], "layer_pairs_spectral") == [(0, 7), (4, 9)]
  assert df.spectral_rank(522, 0.1) == 53 and df.spectral_rank(10, 0.05) == 1


def test_gaussian_sampling_has_the_recorded_covariance_and_code_sampling_its_square():
  cov = np.array([[[2.0, 0.6], [0.6, 0.5]]])
  mean = jnp.array([1.0, -1.0])
  for sampling, expected in (("gaussian", cov[0]), ("code", cov[0] @ cov[0])):
    factor = df.sampling_factors(cov, target_sampling=sampling)[0]
    draws = np.asarray(df.sample_targets(jax.random.PRNGKey(0), mean, jnp.asarray(factor, jnp.float32), 40000))
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(np.cov(draws.T), expected, rtol=0.05, atol=0.02)
  var = np.array([[4.0, 0.25]])
  np.testing.assert_allclose(df.sampling_factors(var)[0], [2.0, 0.5])
  draws = np.asarray(df.sample_targets(jax.random.PRNGKey(1), mean, jnp.asarray([2.0, 0.5]), 40000))
  np.testing.assert_allclose(draws.std(0), [2.0, 0.5], rtol=0.03)


# --- stage 1: metadata ---------------------------------------------------------------------------------


def test_metadata_of_a_tiny_net_equals_numpy_statistics(tmp_path, teacher_dir):
  # 8 devices, 2 padded batches per class, 1000 labelled examples (the unlabelled rest must not count), a
  # per-unit record for the 12-unit layer and a resumed pass: every path of the stage against statistics
  # computed directly.
  # The pass is killed after batch 7 and resumed from the checkpoint of batch 5: the sums must still count
  # every example exactly once.
  config = metadata_config(teacher_dir, labelled_examples=1000, loss_covariance_max_units=10, checkpoint_every_steps=5)
  with pytest.raises(StopTraining):
    train.train_and_evaluate(config, str(tmp_path), progress=False, callbacks=[crash_after(7)])
  steps_run = []
  result = train.train_and_evaluate(config, str(tmp_path), progress=False,
                                    callbacks=[lambda done, state: steps_run.append(done)])
  assert steps_run == list(range(6, 21))
  dataset = kdata.load("digits")
  transfer = kdata.make_transfer_set(dataset, labelled_examples=1000, split_seed=0)
  keep = transfer.indices[transfer.label_mask > 0]
  images, labels = dataset.train.get(keep)
  acts = teacher_activations(teacher_dir, images)
  meta = df.read_metadata(str(tmp_path / df.METADATA_FILE))
  assert meta.info["examples"] == 1000 and meta.info["layer_names"] == ["pre_relu_0", "pre_relu_1", "top"]
  assert "test_accuracy" not in result  # a stage that exports no model
  np.testing.assert_array_equal(meta.arrays["count"], np.bincount(labels, minlength=10))
  signal = np.concatenate([np.maximum(a, 0) / np.sqrt(a.shape[1]) for a in acts[1:]], axis=1)  # spectral layers
  assert meta.info["spectral_layers"] == ["pre_relu_1", "top"]
  for c in range(10):
    rows = [a[labels == c] for a in acts]
    np.testing.assert_allclose(meta.arrays["mean__pre_relu_0"][c], rows[0].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(meta.arrays["var__pre_relu_0"][c], rows[0].var(0), rtol=1e-3, atol=1e-5)
    for name, r in (("pre_relu_1", rows[1]), ("top", rows[2])):
      np.testing.assert_allclose(meta.arrays[f"mean__{name}"][c], r.mean(0), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(meta.arrays[f"cov__{name}"][c], np.cov(r.T, bias=True), rtol=1e-3, atol=1e-5)
    f = signal[labels == c]
    second = f.T @ f / len(f)
    vectors, values = meta.arrays["spectral_all__vectors"][c], meta.arrays["spectral_all__values"][c]
    k = len(values)
    assert k == df.spectral_rank(18, 0.3)
    u, s, vt = np.linalg.svd(second)  # the spectral metadata reproduces the graph it came from to rank k
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, (u[:, :k] * s[:k]) @ vt[:k], atol=2e-4)
    np.testing.assert_allclose(meta.arrays["spectral_all__coeff_mean"][c], f.mean(0) @ vectors, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(meta.arrays["spectral_all__coeff_cov"][c], vectors.T @ np.cov(f.T, bias=True) @ vectors,
                               rtol=1e-3, atol=1e-5)
    pair = meta.arrays["spectral_pair0__vectors"][c]
    assert pair.shape == (18, df.spectral_rank(18, 0.3))  # 8 + 10 nodes: the one pair of the two spectral layers
  info = json.loads((tmp_path / df.METADATA_JSON).read_text())
  assert info["teacher"]["model"] == "mlp" and info["teacher"]["model_kwargs"] == {"hidden": [12, 8]}
  assert info["kinds"]["top_layer"]["bytes"] == 10 * (10 + 100) * 4
  assert result["extra"]["metadata_kib_top_layer"] == info["kinds"]["top_layer"]["bytes"] / 1024


def test_a_class_without_examples_is_refused(tmp_path, teacher_dir):
  dataset = kdata.load("digits")
  x, y = dataset.train.get(np.arange(len(dataset.train)))
  keep = y != 3
  path = str(tmp_path / "no_three.npz")
  np.savez(path, x_train=x[keep], y_train=y[keep], x_test=x[:20], y_test=np.arange(20) % 10, num_classes=10)
  with pytest.raises(ValueError, match=r"class\(es\) \[3\] have fewer than 2 labelled training examples"):
    train.train_and_evaluate(metadata_config(teacher_dir, dataset=path), str(tmp_path / "meta"), progress=False,
                             mesh=one_device())


# --- stage 2: reconstruction ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["top_layer", "layer_pairs_spectral"])  # the other two kinds: below
def test_reconstruction_lowers_its_objective(tmp_path, teacher_dir, metadata_dir, kind):
  result = train.train_and_evaluate(reconstruct_config(teacher_dir, metadata_dir, kind), str(tmp_path),
                                    progress=False, mesh=one_device())
  extra = result["extra"]
  assert result["steps"] == 10 * 20 // 5  # num_steps = 0: the stage's own length, classes x iterations
  assert extra["objective_final"] < 0.5 * extra["objective_initial"], extra
  with np.load(tmp_path / df.RECONSTRUCTED_FILE) as data:
    assert data["x_train"].shape == (60, 8, 8, 1)
    np.testing.assert_array_equal(data["y_train"], np.repeat(np.arange(10), 6))
  assert (tmp_path / df.RECONSTRUCTED_PNG).stat().st_size > 1000


@pytest.mark.slow  # ~15 s; the default run keeps the killed-and-resumed reconstruction
def test_reconstruction_on_eight_devices_equals_one_device(tmp_path, teacher_dir, metadata_dir):
  config = reconstruct_config(teacher_dir, metadata_dir, "all_layers_spectral", n=8)
  one = train.train_and_evaluate(config, str(tmp_path / "one"), progress=False, mesh=one_device())
  train.train_and_evaluate(config, str(tmp_path / "eight"), progress=False)  # 8 devices, 1 example each
  assert one["extra"]["objective_final"] < 0.5 * one["extra"]["objective_initial"]  # the spectral objective falls
  with np.load(tmp_path / "one" / df.RECONSTRUCTED_FILE) as a, np.load(tmp_path / "eight" / df.RECONSTRUCTED_FILE) as b:
    np.testing.assert_allclose(a["x_train"], b["x_train"], rtol=1e-4, atol=1e-5)


def test_vmapped_class_program_equals_optimising_each_example_alone():
  teacher = models.get("mlp", hidden=(6,), num_classes=3)
  variables = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  targets = {"top": jax.random.normal(jax.random.PRNGKey(1), (5, 3))}

  def loss(x, target, bases, v):
    return df.top_layer_objective(models.apply_model(teacher, v, x[None]).logits[0] / 2.0, target["top"])
  tx = optax.adam(0.05)
  x0 = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
  together, _, values = jax.jit(lambda x: df.optimise_class(df.class_values_and_grads(loss), tx, x, tx.init(x),
                                                            targets, {}, variables, iterations=10))(x0)

  @jax.jit
  def alone(x, target):  # one example, its own Adam, a plain gradient: no vmap anywhere
    def iteration(_, carry):
      x, opt = carry
      updates, opt = tx.update(jax.grad(loss)(x, target, {}, variables), opt, x)
      return optax.apply_updates(x, updates), opt
    return jax.lax.fori_loop(0, 10, iteration, (x, tx.init(x)))[0]
  expected = jnp.stack([alone(x0[i], {"top": targets["top"][i]}) for i in range(5)])
  np.testing.assert_allclose(together, expected, rtol=1e-5, atol=1e-6)
  assert values.shape == (5,)


def test_reconstruction_killed_mid_way_resumes_without_redoing_finished_classes(tmp_path, teacher_dir, metadata_dir):
  # 2 fit steps per class, a checkpoint every 2 steps: the "crash" after step 7 (class 3) leaves the checkpoint
  # of step 6, where classes 0-2 are final and classes 3-9 still hold their initial inputs.
  config = reconstruct_config(teacher_dir, metadata_dir, "all_layers", adam_steps=10, per_step=5,
                              checkpoint_every_steps=2)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"), progress=False, mesh=one_device())
  with pytest.raises(StopTraining):
    train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False, mesh=one_device(),
                             callbacks=[crash_after(7)])
  checkpointer = train.ckpt.Checkpointer(str(tmp_path / "resumed"))
  template = jax.tree.map(np.asarray, train.serialization.to_state_dict(
      jax.device_get(_fresh_state(config, tmp_path / "probe"))))
  saved = checkpointer.restore_latest(template)
  checkpointer.close()
  assert int(saved["step"]) == 6
  start = np.asarray(df.initial_inputs(0, 10, 6, (8, 8, 1), init_mean=0.15, init_std=0.1))
  assert all(not np.allclose(saved["inputs"][c], start[c]) for c in range(3))
  np.testing.assert_array_equal(saved["inputs"][3:], start[3:])
  steps_run = []
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False, mesh=one_device(),
                                     callbacks=[lambda done, state: steps_run.append(done)])
  assert steps_run == list(range(7, 21))  # classes 0-2 are not optimised again
  assert resumed["extra"] == straight["extra"]
  assert straight["extra"]["objective_final"] < 0.5 * straight["extra"]["objective_initial"]  # all_layers lowers it
  with np.load(tmp_path / "straight" / df.RECONSTRUCTED_FILE) as a, \
       np.load(tmp_path / "resumed" / df.RECONSTRUCTED_FILE) as b:
    np.testing.assert_array_equal(a["x_train"], b["x_train"])


def _fresh_state(config, workdir):
  setup, program = train.setup_stage(config, str(workdir), mesh=one_device())
  return program.init_state(setup)


def test_noise_and_distillation_on_the_reconstructed_set(tmp_path, teacher_dir, metadata_dir):
  noise = reconstruct_config(teacher_dir, metadata_dir, "noise", adam_steps=0, per_step=1)
  noise.loss.adam_steps = 0
  result = train.train_and_evaluate(noise, str(tmp_path / "noise"), progress=False, mesh=one_device())
  assert result["steps"] == 10 and 0.0 <= result["extra"]["teacher_agreement"] <= 1.0
  with np.load(tmp_path / "noise" / df.RECONSTRUCTED_FILE) as data:
    np.testing.assert_allclose(data["x_train"].mean(), 0.15, atol=0.01)
    np.testing.assert_allclose(data["x_train"].std(), 0.1, atol=0.01)
  distil = tiny_config(method="soft_targets", teacher_workdir=teacher_dir, test_dataset="digits", num_steps=4,
                       dataset=str(tmp_path / "noise" / df.RECONSTRUCTED_FILE))
  distil.loss = {"temperature": 8.0, "alpha": 1.0, "ensemble_mean": "arithmetic"}
  result = train.train_and_evaluate(distil, str(tmp_path / "distil"), progress=False, mesh=one_device())
  assert result["test_examples"] == 300  # evaluated on the real digits test split


# --- errors ---------------------------------------------------------------------------------------------


def test_metadata_from_another_teacher_is_refused(tmp_path, teacher_dir, metadata_dir):
  other_arch = str(tmp_path / "other_arch")
  train.train_and_evaluate(tiny_config(model_kwargs={"hidden": (12, 9)}, num_steps=1), other_arch, progress=False,
                           mesh=one_device())
  with pytest.raises(ValueError, match=r"model_kwargs=.*record metadata from this teacher"):
    train.train_and_evaluate(reconstruct_config(other_arch, metadata_dir), str(tmp_path / "a"), progress=False,
                             mesh=one_device())
  other_weights = str(tmp_path / "other_weights")
  train.train_and_evaluate(tiny_config(model_kwargs=dict(TEACHER), num_steps=1), other_weights, progress=False,
                           mesh=one_device())
  with pytest.raises(ValueError, match="a teacher with other weights"):
    train.train_and_evaluate(reconstruct_config(other_weights, metadata_dir), str(tmp_path / "b"), progress=False,
                             mesh=one_device())


def test_bad_reconstruction_settings_are_named(tmp_path, teacher_dir, metadata_dir):
  config = reconstruct_config(teacher_dir, metadata_dir)
  config.num_steps = 7
  with pytest.raises(ValueError, match=r"set num_steps=0 \(that length\) or 40"):
    train.train_and_evaluate(config, str(tmp_path / "a"), progress=False, mesh=one_device())
  with pytest.raises(ValueError, match="unknown kind 'spectral'"):
    df.make_reconstruct_program(**{**df.default_reconstruct_config(), "kind": "spectral"})
  with pytest.raises(ValueError, match="multiple of iterations_per_step"):
    df.make_reconstruct_program(**{**df.default_reconstruct_config(), "adam_steps": 30, "iterations_per_step": 20})
  with pytest.raises(FileNotFoundError, match="run the data_free_metadata stage"):
    df.read_metadata(str(tmp_path / "missing.npz"))


def test_protocol_configs_chain_their_stages_and_full_configs_build():
  from kdjax import reproduce
  paper = reproduce.load_paper("data_free")
  configs = {}
  for i, variant in enumerate(paper.PROTOCOL):
    config = paper.get_config(variant)
    reproduce.resolve_run_references(config, seed_dir="/runs/s0", variant=variant, done=paper.PROTOCOL[:i])
    configs[variant] = config
  assert configs["metadata"].teacher_workdir == "/runs/s0/teacher"
  assert configs["reconstruct_all_layers"].loss.metadata == "/runs/s0/metadata/metadata.npz"
  assert configs["reconstruct_all_layers"].num_steps == 0 and configs["metadata"].num_steps == 0  # stage lengths
  assert configs["student_all_layers"].dataset == "/runs/s0/reconstruct_all_layers/reconstructed.npz"
  assert configs["student_all_layers"].test_dataset == "mnist5k" and configs["student_real_kd"].dataset == "mnist5k"
  assert {configs[v].loss.alpha for v in paper.PROTOCOL if v.startswith("student_")} == {1.0}  # no labels
  full = {v: paper.get_config(v + ",full") for v in paper.VARIANTS}
  assert (full["teacher"].model, full["student_real_kd"].model_kwargs.hidden) == ("mlp_teacher", (800, 800))
  assert full["reconstruct_top_layer"].loss.examples_per_class == 6400
  assert (full["conv_teacher"].model, full["conv_student_top_layer"].model) == ("lenet5", "lenet5_half")
  assert full["celeba_metadata"].dataset == "celeb_a"
  with pytest.raises(ValueError, match="full-scale setting"):
    paper.get_config("celeba_teacher")


def test_metadata_stage_length_is_one_batch_per_class():
  program = df.make_metadata_program(**df.default_metadata_config())
  assert program.stage_length(None, train.kdata.load("digits"), None) == 10


def test_celeba_full_config_reads_an_attribute_as_the_class_at_224(tmp_path):
  import tensorflow_datasets as tfds

  from kdjax import reproduce
  config = reproduce.load_paper("data_free").get_config("celeba_teacher,full")
  with tfds.testing.mock_data(num_examples=4):
    dataset = train.load_stage_dataset(config)
  assert dataset.num_classes == 2 and dataset.example_shape == (224, 224, 3)
