"""The shared model mechanism: registry, named features, MLP/CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.errors import UnknownNameError


def test_unknown_model_lists_known_names():
  with pytest.raises(UnknownNameError, match="mlp.*small_cnn|small_cnn"):
    models.get("no_such_net")


def test_missing_feature_lists_available_names():
  model = models.get("small_cnn")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(UnknownNameError, match="block_0, block_1, dense, logits"):
    models.apply_model(model, variables, jnp.zeros((1, 28, 28, 1)), features=["block_7"])


def test_features_are_nhwc_and_logits_match():
  model = models.get("small_cnn", channels=(4, 8), dense=16)
  x = jnp.ones((3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  out = models.apply_model(model, variables, x, features=["block_0", "block_1", "logits"])
  assert out.features["block_0"].shape == (3, 28, 28, 4)
  assert out.features["block_1"].shape == (3, 14, 14, 8)
  np.testing.assert_array_equal(out.features["logits"], out.logits)


def test_train_mode_updates_batch_stats_eval_mode_does_not():
  model = models.get("small_cnn", channels=(4,), dense=8)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)) + 3.0
  variables = model.init(jax.random.key(0), x)
  train_out = models.apply_model(model, variables, x, train=True)
  eval_out = models.apply_model(model, variables, x, train=False)
  assert not np.allclose(train_out.batch_stats["bn_0"]["mean"], variables["batch_stats"]["bn_0"]["mean"])
  np.testing.assert_array_equal(eval_out.batch_stats["bn_0"]["mean"], variables["batch_stats"]["bn_0"]["mean"])


def test_linear_bottleneck_is_linear_and_counts_params():
  model = models.get("mlp", hidden=(20,), bottleneck=4, num_classes=3)
  assert models.count_params(model, (10,)) == 10 * 4 + (4 * 20 + 20) + (20 * 3 + 3)
  x = jax.random.normal(jax.random.key(0), (2, 10))
  variables = model.init(jax.random.key(0), x)
  out = models.apply_model(model, variables, x, features=["bottleneck"])
  kernel = variables["params"]["linear_bottleneck"]["kernel"]
  np.testing.assert_allclose(out.features["bottleneck"], x @ kernel, rtol=1e-5, atol=1e-6)


def test_feature_names_listing():
  assert models.feature_names(models.get("mimic_mlp"), jnp.zeros((1, 784))) == [
      "bottleneck", "hidden_0", "logits", "pre_relu_0"]
