"""Data that would silently give a wrong result is refused with the file, split and index (issue 12).

Labels are class ids in ``[0, num_classes)`` (never ``max + 1`` classes built from a stray label, never
truncated floats), each split is scaled by its own dtype, float images holding 0-255 pixel values, NaN test
images, empty splits and mismatched shapes are refused, and a resumed run checks that its data did not change.
"""

import numpy as np
import pytest

from kdjax import data as kdata
from kdjax.config import default_stage_config
from kdjax.data.sources import fingerprint
from kdjax.errors import DataError
from kdjax.train import train_and_evaluate


def arrays(n=40, shape=(4, 4, 1), classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"x_train": rng.random((n, *shape)).astype(np.float32), "y_train": np.arange(n) % classes,
          "x_test": rng.random((12, *shape)).astype(np.float32), "y_test": np.arange(12) % classes}


def load(tmp_path, **replace):
  path = tmp_path / "data.npz"
  np.savez(path, **{**arrays(), **replace})
  return kdata.load(str(path))


def with_label(key, index, value, n):
  labels = np.arange(n) % 4
  labels[index] = value
  return {key: labels}


@pytest.mark.parametrize("replace, match", [
    (with_label("y_train", 5, -1, 40), r"y_train\[5\] = -1 is not a class id in \[0, 4\)"),
    (with_label("y_train", 7, 255, 40), r"y_train implies 256 classes .* classes 4, 5, \.\.\., 254 never occur"),
    (with_label("y_test", 3, 4, 12), r"y_test\[3\] = 4 is not a class id in \[0, 4\) \(max\(y_train\) \+ 1 = 4"),
    ({"y_train": (np.arange(40) % 4) + np.where(np.arange(40) == 9, 0.5, 0.0)},
     r"y_train must hold integer class ids; index 9 is .*1.5.* never rounded or truncated"),
    ({"y_train": np.eye(4)[np.arange(40) % 4]}, r"y_train must be a 1-D array .*one-hot"),
    ({"x_train": np.zeros((0, 4, 4, 1), np.float32), "y_train": np.zeros(0, np.int64)}, r"the train split is empty"),
    ({"x_test": np.zeros((12, 5, 5, 1), np.float32)}, r"x_test has examples of shape \(5, 5, 1\), x_train \(4, 4, 1\)"),
    ({"x_test": np.where(np.arange(12)[:, None, None, None] == 2, np.nan, 0.5).astype(np.float32)},
     r"x_test contains NaN or inf \(example index 2; 1 example"),
    ({"x_train": np.round(arrays()["x_train"] * 255).astype(np.float32)},
     r"x_train holds whole numbers from 0 to 255 as float32: these look like 0-255 pixel values"),
    ({"x_train": (arrays()["x_train"] * 255).astype(np.uint8), "x_test": arrays()["x_test"] * 200},
     r"x_train \(uint8\) and x_test \(float32\) are on different scales"),
    ({"x_train": np.zeros((40, 4, 4, 1), np.int64)}, r"x_train has dtype int64; store images as uint8"),
])
def test_bad_arrays_are_refused_naming_file_split_and_index(tmp_path, replace, match):
  with pytest.raises(DataError, match=match):
    load(tmp_path, **replace)


def test_num_classes_comes_from_the_file_when_given(tmp_path):
  dataset = load(tmp_path, num_classes=np.int64(6))  # classes 4 and 5 have no examples, and that is declared
  assert dataset.num_classes == 6
  with pytest.raises(DataError, match=r"y_train\[1\] = 1 is not a class id in \[0, 1\) \(num_classes=1 in the file"):
    load(tmp_path, num_classes=np.int64(1))


def test_each_split_is_scaled_by_its_own_dtype(tmp_path):
  base = arrays()
  train_uint8 = (base["x_train"] * 255).astype(np.uint8)
  dataset = load(tmp_path, x_train=train_uint8)  # uint8 train, float test in [0, 1]
  np.testing.assert_allclose(dataset.train.images, train_uint8 / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(dataset.test.images, base["x_test"])  # not divided by 255 a second time
  whole_float_labels = load(tmp_path, y_train=(np.arange(40) % 4).astype(np.float64))
  np.testing.assert_array_equal(whole_float_labels.train.labels, np.arange(40) % 4)


def test_the_fingerprint_follows_the_data():
  a = kdata.Dataset("a", kdata.sources.ArraySplit(np.zeros((4, 2)), np.arange(4)), None, 4)
  b = kdata.Dataset("a", kdata.sources.ArraySplit(np.zeros((4, 2)), np.arange(4)), None, 4)
  assert fingerprint(a) == fingerprint(b)
  b.train.images[3, 1] = 1e-6
  assert fingerprint(a) != fingerprint(b)


def test_a_data_file_changed_under_a_resumed_run_is_refused(tmp_path):
  path = tmp_path / "data.npz"
  np.savez(path, **arrays())
  c = default_stage_config()
  c.dataset, c.model, c.model_kwargs = str(path), "mlp", {"hidden": (8,)}
  c.batch_size, c.num_steps, c.eval_batch_size = 8, 2, 16
  train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  train_and_evaluate(c, str(tmp_path / "run"), progress=False)  # unchanged: re-evaluates
  np.savez(path, **arrays(seed=1))
  with pytest.raises(ValueError, match=r"the data of .*data.npz' changed since the run in .* started \(data "
                                       r"fingerprint [0-9a-f]{16} then, [0-9a-f]{16} now\)"):
    train_and_evaluate(c, str(tmp_path / "run"), progress=False)


def test_an_explicit_num_classes_admits_classes_without_examples_and_checks_the_labels(tmp_path):
  path = tmp_path / "data.npz"
  np.savez(path, **arrays())  # labels 0..3
  c = default_stage_config()
  c.dataset, c.model, c.model_kwargs = str(path), "mlp", {"hidden": (8,)}
  c.batch_size, c.num_steps, c.eval_batch_size = 8, 1, 16
  c.num_classes = 6
  train_and_evaluate(c, str(tmp_path / "six"), progress=False)
  import json
  assert json.loads((tmp_path / "six" / "config.json").read_text())["num_classes"] == 6
  c.num_classes = 3
  with pytest.raises(DataError, match=r"y_train\[3\] = 3 is not a class id in \[0, 3\) \(num_classes=3 given"):
    train_and_evaluate(c, str(tmp_path / "three"), progress=False)
  with pytest.raises(DataError, match=r"dataset 'digits' has 10 classes \(its metadata\), but num_classes=3"):
    kdata.load("digits", num_classes=3)


def test_the_pipeline_names_bad_batch_and_augmentation_arguments():
  flat = kdata.Dataset("flat", kdata.sources.ArraySplit(np.zeros((8, 64), np.float32), np.arange(8) % 2), None, 2)
  transfer = kdata.make_transfer_set(flat)
  with pytest.raises(ValueError, match=r"jitter=2 / hflip=False shift or flip images .* shape \(64,\)"):
    kdata.TrainBatches(transfer, batch_size=4, seed=0, jitter=2)
  with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1 \(eval_batch_size\); got 0"):
    next(kdata.eval_batches(flat.train, batch_size=0))


def test_tfds_records_with_labels_outside_the_metadata_classes_are_named():
  records = [{"image": np.full((2, 2, 1), 255, np.uint8), "label": label} for label in (0, 1, 3)]
  split = kdata.sources.TfdsSplit(records, num_classes=3, name="TFDS 'toy' split 'train'")
  images, labels = split.get(np.array([0, 1]))
  np.testing.assert_array_equal(images, np.ones((2, 2, 2, 1), np.float32))  # uint8 / 255
  with pytest.raises(DataError, match=r"TFDS 'toy' split 'train': record 2 has label 3, not a class id in \[0, 3\)"):
    split.get(np.array([1, 2]))
  with pytest.raises(DataError, match="TFDS 'toy' split 'test' is empty"):
    kdata.sources.TfdsSplit([], num_classes=3, name="TFDS 'toy' split 'test'")
