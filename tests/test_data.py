"""The shared input pipeline: offline sets, TFDS (mock), npz, transfer sets, determinism, errors."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data
from kdjax.errors import DatasetUnavailableError, NonFiniteError, UnknownNameError


@pytest.mark.parametrize("name, shape, train, test", [
    ("digits", (8, 8, 1), 1497, 300), ("mnist5k", (28, 28, 1), 4000, 1000), ("mnist1d", (40, 1, 1), 4000, 1000)])
def test_builtin_offline_sets(name, shape, train, test):
  ds = data.load(name)
  assert (len(ds.train), len(ds.test), ds.example_shape, ds.num_classes) == (train, test, shape, 10)
  images, labels = ds.train.get(np.arange(5))
  assert images.dtype == np.float32 and labels.dtype == np.int32 and images.shape == (5, *shape)
  assert set(np.unique(ds.test.labels)) == set(range(10))


def test_mnist5k_split_is_stratified_and_values_in_unit_range():
  ds = data.load("mnist5k")
  assert np.all(np.bincount(ds.test.labels) == 100)
  assert ds.train.images.min() >= 0.0 and ds.train.images.max() <= 1.0


def test_stratified_split_exact_size_and_balance():
  labels = np.repeat(np.arange(4), [10, 20, 30, 40])
  first, rest = data.stratified_split(labels, 25, seed=3)
  assert len(first) == 25 and len(rest) == 75 and not set(first) & set(rest)
  counts = np.bincount(labels[first])
  assert np.all(np.abs(counts - np.array([2.5, 5, 7.5, 10])) <= 0.5)  # proportional, rounded
  again, _ = data.stratified_split(labels, 25, seed=3)
  np.testing.assert_array_equal(first, again)


def test_transfer_set_labels_only_the_chosen_examples():
  ds = data.load("digits")
  transfer = data.make_transfer_set(ds, labelled_examples=200, include_unlabelled=True, split_seed=1)
  assert len(transfer) == len(ds.train) and transfer.label_mask.sum() == 200
  labelled_only = data.make_transfer_set(ds, labelled_examples=200, include_unlabelled=False, split_seed=1)
  assert len(labelled_only) == 200 and labelled_only.label_mask.all()
  np.testing.assert_array_equal(np.flatnonzero(transfer.label_mask), labelled_only.indices)


def test_batches_are_a_pure_function_of_seed_and_step():
  ds = data.load("digits")
  transfer = data.make_transfer_set(ds)
  a = data.TrainBatches(transfer, batch_size=32, seed=5, jitter=1)
  b = data.TrainBatches(transfer, batch_size=32, seed=5, jitter=1)
  for step in (0, 7, a.steps_per_epoch + 3):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  epoch0 = np.concatenate([a.indices(s) for s in range(a.steps_per_epoch)])
  assert len(set(epoch0.tolist())) == len(epoch0)  # no repeats within an epoch
  assert not np.array_equal(a.indices(0), a.indices(a.steps_per_epoch))  # reshuffled per epoch
  assert not np.array_equal(a.indices(0), data.TrainBatches(transfer, batch_size=32, seed=6).indices(0))


def test_jitter_shifts_within_bound():
  image = np.zeros((1, 9, 9, 1), np.float32)
  image[0, 4, 4, 0] = 1.0
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(50):
    out = data.jitter_images(image, 2, rng)
    y, x = np.argwhere(out[0, :, :, 0] == 1.0)[0]
    assert abs(y - 4) <= 2 and abs(x - 4) <= 2 and out.sum() == 1.0
    seen.add((y, x))
  assert len(seen) > 5


def test_nan_in_a_batch_names_the_step():
  ds = data.load("digits")
  images = ds.train.images.copy()
  images[17, 0, 0, 0] = np.nan
  split = data.sources.ArraySplit(images, ds.train.labels)
  transfer = data.TransferSet(split, np.arange(len(split)), np.ones(len(split), np.float32))
  batches = data.TrainBatches(transfer, batch_size=len(split), seed=0)
  with pytest.raises(NonFiniteError, match="step 3: the input batch contains NaN"):
    batches.batch(3)


def test_eval_batches_pad_with_zero_weight():
  ds = data.load("digits")
  batches = list(data.eval_batches(ds.test, batch_size=128))
  assert [b["image"].shape[0] for b in batches] == [128, 128, 128]
  assert sum(b["weight"].sum() for b in batches) == len(ds.test)


def test_prefetch_reraises_errors_from_the_worker():
  def items():
    yield 1
    raise NonFiniteError("step 1: bad")
  stream = data.prefetch(items(), transfer=lambda x: x * 10)
  assert next(stream) == 10
  with pytest.raises(NonFiniteError, match="step 1"):
    next(stream)


def test_tfds_catalogue_dataset_through_data_source_mock():
  with tfds.testing.mock_data(num_examples=24):
    ds = data.load("mnist")
    assert ds.num_classes == 10 and ds.example_shape == (28, 28, 1) and len(ds.train) == 24
    images, labels = ds.train.get(np.array([0, 3]))
    assert images.dtype == np.float32 and images.max() <= 1.0 and labels.shape == (2,)


def test_unprepared_tfds_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(DatasetUnavailableError, match="tfds build mnist"):
    data.load("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_lists_builtins():
  with pytest.raises(UnknownNameError, match="digits, mnist1d, mnist5k"):
    data.load("no_such_dataset_xyz")


def test_user_npz(tmp_path):
  path = os.path.join(tmp_path, "mine.npz")
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 255, (20, 4, 4, 3), dtype=np.uint8), y_train=np.arange(20) % 3,
           x_test=rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8), y_test=np.arange(6) % 3)
  ds = data.load(path)
  assert ds.num_classes == 3 and ds.example_shape == (4, 4, 3) and ds.train.images.max() <= 1.0
  np.savez(path, x_train=np.zeros((2, 2)))
  with pytest.raises(ValueError, match="missing"):
    data.load(path)
  with pytest.raises(DatasetUnavailableError, match="does not exist"):
    data.load(os.path.join(tmp_path, "absent.npz"))


def test_hflip_and_standardize():
  ds = data.load("digits")
  transfer = data.make_transfer_set(ds)
  plain = data.TrainBatches(transfer, batch_size=64, seed=0).batch(0)["image"]
  flipped = data.TrainBatches(transfer, batch_size=64, seed=0, hflip=True).batch(0)["image"]
  is_flipped = np.array([np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p) for f, p in zip(flipped, plain)])
  unchanged = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain)])
  assert np.all(is_flipped | unchanged) and 10 < is_flipped.sum() < 54
  standardized = data.standardize(ds, [0.5], [0.25])
  images, _ = standardized.test.get(np.arange(3))
  np.testing.assert_allclose(images, (ds.test.images[:3] - 0.5) / 0.25, rtol=1e-6)
  with pytest.raises(ValueError, match="one value per channel"):
    data.standardize(ds, [0.5, 0.5, 0.5], [1, 1, 1])


def test_held_out_classes_relabel_the_seen_ones_and_keep_the_held_out_test_examples():
  ds = data.load("digits")
  split = data.hold_out_classes(ds, (7, 2))
  assert split.num_classes == 8
  train_labels = np.asarray(ds.train.labels)
  assert len(split.train) == int(np.sum(~np.isin(train_labels, (2, 7))))
  images, labels = split.train.get(np.arange(len(split.train)))
  seen = [c for c in range(10) if c not in (2, 7)]
  want_images, want_labels = ds.train.get(np.flatnonzero(~np.isin(train_labels, (2, 7))))
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(np.asarray(seen)[labels], want_labels)  # 0..7 in ascending original order
  np.testing.assert_array_equal(split.train.labels, labels)
  _, retrieval_labels = split.retrieval.get(np.arange(len(split.retrieval)))
  assert set(retrieval_labels.tolist()) == {2, 7}  # original ids, test split only
  assert len(split.retrieval) == int(np.sum(np.isin(np.asarray(ds.test.labels), (2, 7))))
  assert len(split.test) + len(split.retrieval) == len(ds.test)


@pytest.mark.parametrize("classes, match", [
    ((10,), r"distinct class ids in \[0, 10\)"), ((3, 3), "distinct"), (tuple(range(10)), "leaves no class")])
def test_bad_held_out_classes_are_named(classes, match):
  with pytest.raises(ValueError, match=match):
    data.hold_out_classes(data.load("digits"), classes)


def test_keep_classes_selects_and_relabels_train_and_test():
  ds = data.load("digits")
  target = data.keep_classes(ds, (9, 5, 7))
  assert target.num_classes == 3 and target.retrieval is None
  for full, kept in ((ds.train, target.train), (ds.test, target.test)):
    want = np.flatnonzero(np.isin(np.asarray(full.labels), (5, 7, 9)))
    images, labels = kept.get(np.arange(len(kept)))
    want_images, want_labels = full.get(want)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(np.array([5, 7, 9])[labels], want_labels)  # 5 -> 0, 7 -> 1, 9 -> 2


@pytest.mark.parametrize("classes, match", [((10,), r"classes must be distinct class ids in \[0, 10\)"),
                                            ((1, 1), "distinct"), ((), "at least one class")])
def test_bad_kept_classes_are_named(classes, match):
  with pytest.raises(ValueError, match=match):
    data.keep_classes(data.load("digits"), classes)


def test_a_held_out_class_with_one_test_example_is_refused(tmp_path):
  path = os.path.join(tmp_path, "few.npz")
  np.savez(path, x_train=np.zeros((6, 2, 2, 1)), y_train=np.array([0, 0, 1, 1, 2, 2]),
           x_test=np.zeros((4, 2, 2, 1)), y_test=np.array([0, 1, 1, 2]))
  with pytest.raises(ValueError, match=r"\{2: 1\}.*fewer than 2 test examples"):
    data.hold_out_classes(data.load(path), (1, 2))


def test_train_only_npz_is_tested_on_another_dataset(tmp_path):
  path = os.path.join(tmp_path, "train_only.npz")
  digits = data.load("digits")
  np.savez(path, x_train=digits.train.images[:50], y_train=np.arange(50) % 10)
  with pytest.raises(ValueError, match="a train-only file needs --config.test_dataset"):
    data.load(path)
  ds = data.with_test_split(data.load(path, require_test=False), digits)
  assert len(ds.test) == 300 and ds.num_classes == 10
  with pytest.raises(ValueError, match=r"examples of shape \(28, 28, 1\)"):
    data.with_test_split(data.load(path, require_test=False), data.load("mnist5k"))
  np.savez(path, x_train=digits.train.images[:50], y_train=np.arange(50) % 4)
  with pytest.raises(ValueError, match="has 10 classes, but the training dataset"):
    data.with_test_split(data.load(path, require_test=False), digits)


def test_class_balanced_batches_are_p_classes_by_k_examples_and_a_function_of_the_step():
  ds = data.load("digits")
  transfer = data.make_transfer_set(ds)
  batches = data.ClassBalancedBatches(transfer, classes_per_batch=4, examples_per_class=3, seed=5)
  first = batches.batch(7)
  labels = first["label"].reshape(3, 4)  # example-major: row k = the k-th example of each class
  assert len(set(labels[0].tolist())) == 4 and (labels == labels[0]).all()
  assert len(set(first["index"].tolist())) == 12
  np.testing.assert_array_equal(first["image"], data.ClassBalancedBatches(
      transfer, classes_per_batch=4, examples_per_class=3, seed=5).batch(7)["image"])
  assert not np.array_equal(batches.indices(8), batches.indices(7))
  with pytest.raises(ValueError, match="need 11 classes with at least 3 labelled examples"):
    data.ClassBalancedBatches(transfer, classes_per_batch=11, examples_per_class=3, seed=0)


def test_tfds_attribute_labels_and_resized_images_through_data_source_mock():
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load("celeb_a", label_feature="attributes/Attractive", image_size=(32, 24))
    assert ds.num_classes == 2 and ds.example_shape == (32, 24, 3)
    images, labels = ds.train.get(np.arange(6))
    assert images.shape == (6, 32, 24, 3) and set(labels.tolist()) <= {0, 1} and labels.dtype == np.int32
    source = tfds.data_source("celeb_a", split="train")
    want = [int(source[i]["attributes"]["Attractive"]) for i in range(6)]
    assert labels.tolist() == want
    with pytest.raises(UnknownNameError, match=r"label feature.*'attributes/Atractive'.*attributes/Attractive"):
      data.load("celeb_a", label_feature="attributes/Atractive")
    with pytest.raises(data.sources.DataError, match="set --config.num_classes"):
      data.load("celeb_a", label_feature="identity/Identity_No")
    assert data.load("celeb_a", label_feature="identity/Identity_No", num_classes=10178).num_classes == 10178
  with pytest.raises(ValueError, match="apply to TFDS datasets"):
    data.load("digits", label_feature="attributes/Attractive")


def test_resize_centre_crops_to_the_aspect_then_resizes():
  images = np.zeros((1, 8, 4, 1), np.float32)
  images[:, 2:6] = 1.0  # the centre 4x4 square is white, the 2-row bands above and below black
  out = data.sources.resize_images(images, (2, 2))
  np.testing.assert_allclose(out, np.ones((1, 2, 2, 1)), atol=1e-6)  # the crop keeps only the centre square
