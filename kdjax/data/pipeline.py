"""The one input pipeline: transfer sets, deterministic order, augmentation, batching, prefetch.

Determinism: the example order of epoch ``e`` is a pure function of ``(seed, e)`` and the
augmentation of step ``s`` a pure function of ``(seed, s)``, so the batch of any step can be
rebuilt from the step alone: a resumed run needs only its step to continue exactly where it
stopped (the "data position" of a checkpoint is its step).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator

import numpy as np

from kdjax.data.sources import Dataset, stratified_split
from kdjax.errors import NonFiniteError


@dataclasses.dataclass
class TransferSet:
  """The examples a stage trains on, and which of them carry a usable label.

  Attributes:
    split: the dataset split the indices refer to.
    indices: ``[n]`` indices into ``split``.
    label_mask: ``[n]`` 1.0 where the example's label may be used, 0.0 for the unlabelled part
      of a transfer set (those examples are labelled only by the teacher).
  """
  split: object
  indices: np.ndarray
  label_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)


def make_transfer_set(dataset: Dataset, *, labelled_examples: int = 0, include_unlabelled: bool = True,
                      split_seed: int = 0) -> TransferSet:
  """Splits the training set into a labelled part and an unlabelled transfer part.

  Args:
    dataset: the dataset.
    labelled_examples: how many training examples keep their label (stratified by class, chosen
      with ``split_seed``); 0 means all of them.
    include_unlabelled: train on the labelled part *and* the unlabelled rest (the teacher labels
      those), or on the labelled part only.
    split_seed: seed of the stratified choice, so teacher and students of one run agree on it.
  """
  n = len(dataset.train)
  if labelled_examples <= 0 or labelled_examples >= n:
    return TransferSet(dataset.train, np.arange(n), np.ones(n, np.float32))
  labelled, unlabelled = stratified_split(dataset.train.labels, labelled_examples, seed=split_seed)
  if not include_unlabelled:
    return TransferSet(dataset.train, labelled, np.ones(len(labelled), np.float32))
  indices = np.arange(n)
  return TransferSet(dataset.train, indices, np.isin(indices, labelled).astype(np.float32))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of ``epoch``: a pure function of ``(seed, epoch)``."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def jitter_images(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Shifts each NHWC image by up to ``max_shift`` pixels in each direction (zero fill).

  Hinton et al. (2015) train the MNIST teacher "with input jitter of up to 2 pixels"; with
  ``max_shift=4`` this is the CIFAR recipes' zero-padded random crop (``RandomCrop(32, padding=4)``).
  """
  if max_shift <= 0:
    return images
  b, h, w = images.shape[:3]
  padded = np.pad(images, [(0, 0), (max_shift, max_shift), (max_shift, max_shift)]
                  + [(0, 0)] * (images.ndim - 3))
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, b))
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def check_augmentation(example_shape, *, jitter: int, hflip: bool) -> None:
  """Refuses augmentation that cannot apply: shifts or flips of examples that are not ``(H, W, C)`` images."""
  shape = tuple(example_shape)
  if (jitter or hflip) and len(shape) != 3:
    raise ValueError(f"jitter={jitter} / hflip={hflip} shift or flip images of shape (height, width, channels); "
                     f"the examples have shape {shape}")
  if jitter < 0:
    raise ValueError(f"jitter must be >= 0 pixels; got {jitter}")


def augmented_checked_images(images: np.ndarray, positions: np.ndarray, *, seed: int, step: int, jitter: int,
                             hflip: bool) -> np.ndarray:
  """Step ``step``'s augmentation of a batch (a pure function of ``(seed, step)``), refusing NaN/inf inputs.

  ``jitter``: random shifts of up to that many pixels (:func:`jitter_images`); ``hflip``: each image
  flipped left-right with probability 1/2 (CIFAR recipes). ``positions`` (transfer-set positions) name
  the bad examples in the error.
  """
  if jitter or hflip:
    rng = np.random.default_rng([seed, 1, step])
    images = jitter_images(images, jitter, rng)
    if hflip:
      flip = rng.random(len(images)) < 0.5
      images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  if not np.isfinite(images).all():
    bad = positions[~np.isfinite(images.reshape(len(images), -1)).all(axis=1)]
    raise NonFiniteError(f"step {step}: the input batch contains NaN or inf (transfer-set positions "
                         f"{bad[:10].tolist()}); training stopped before this step, the last "
                         "checkpoint is kept")
  return images


class TrainBatches:
  """Batches of a :class:`TransferSet` by step: ``batch(step)`` is deterministic.

  Each batch is a dict of host arrays: ``image``, ``label`` (int32), ``label_mask`` (float32),
  ``index`` (position in the transfer set, to look up cached teacher outputs), plus
  ``teacher_logits`` when ``teacher_logits`` (``[members, n, classes]``) is given. The last
  incomplete batch of an epoch is dropped so every step has the same shape (one compilation).
  """

  def __init__(self, transfer_set: TransferSet, *, batch_size: int, seed: int, jitter: int = 0,
               hflip: bool = False, teacher_logits: np.ndarray | None = None, host_slice: slice | None = None):
    if batch_size <= 0 or batch_size > len(transfer_set):
      raise ValueError(f"batch_size must be in [1, {len(transfer_set)}] (the transfer set size); "
                       f"got {batch_size}")
    check_augmentation(transfer_set.split.example_shape, jitter=jitter, hflip=hflip)
    self.transfer_set = transfer_set
    self.batch_size, self.seed, self.jitter, self.hflip = batch_size, seed, jitter, hflip
    self.teacher_logits = teacher_logits
    self.host_slice = host_slice or slice(None)
    self.steps_per_epoch = len(transfer_set) // batch_size

  def indices(self, step: int) -> np.ndarray:
    """Transfer-set positions of the global batch of ``step``."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    order = epoch_order(self.seed, epoch, len(self.transfer_set))
    return order[pos * self.batch_size:(pos + 1) * self.batch_size]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The (this process's part of the) batch of ``step``; raises on NaN/inf inputs."""
    positions = self.indices(step)[self.host_slice]
    images, labels = self.transfer_set.split.get(self.transfer_set.indices[positions])
    images = augmented_checked_images(images, positions, seed=self.seed, step=step, jitter=self.jitter,
                                      hflip=self.hflip)
    out = {"image": images, "label": labels, "label_mask": self.transfer_set.label_mask[positions],
           "index": positions.astype(np.int32)}
    if self.teacher_logits is not None:
      out["teacher_logits"] = self.teacher_logits[:, positions].swapaxes(0, 1)  # [batch, members, K]
    return out


class ClassBalancedBatches:
  """Batches of ``P`` classes × ``K`` examples by step (metric learning: DarkRank, re-identification).

  Step ``s`` draws ``classes_per_batch`` distinct classes, then ``examples_per_class`` distinct examples of
  each, from a generator seeded by ``(seed, s)``: a pure function of the step, so a resumed run continues
  exactly (classes and examples are drawn with replacement across steps, as P×K samplers do). The batch is
  ordered example-major — positions ``k·P .. k·P + P − 1`` hold the ``k``-th example of each class — so its
  first ``P`` rows have one example per class and every one of them has its same-class partners later in the
  batch (DarkRank's "first half of the batch" queries, with ``K = 2``). Only labelled examples of the transfer
  set are used. Each batch is a dict like :class:`TrainBatches`'s (``image``, ``label``, ``label_mask``,
  ``index``), with the same augmentation (``jitter``, ``hflip``) and NaN check.
  """

  def __init__(self, transfer_set: TransferSet, *, classes_per_batch: int, examples_per_class: int, seed: int,
               jitter: int = 0, hflip: bool = False, host_slice: slice | None = None):
    check_augmentation(transfer_set.split.example_shape, jitter=jitter, hflip=hflip)
    labelled = np.flatnonzero(transfer_set.label_mask > 0)
    labels = np.asarray(transfer_set.split.labels)[transfer_set.indices[labelled]]
    classes, counts = np.unique(labels, return_counts=True)
    if examples_per_class < 1 or classes_per_batch < 1:
      raise ValueError(f"classes_per_batch and examples_per_class must be >= 1; got {classes_per_batch} and "
                       f"{examples_per_class}")
    usable = classes[counts >= examples_per_class]
    if len(usable) < classes_per_batch:
      raise ValueError(f"batches of {classes_per_batch} classes x {examples_per_class} examples need "
                       f"{classes_per_batch} classes with at least {examples_per_class} labelled examples each; "
                       f"the transfer set has {len(usable)} such classes (of {len(classes)})")
    self.transfer_set, self.seed, self.jitter, self.hflip = transfer_set, seed, jitter, hflip
    self.classes_per_batch, self.examples_per_class = classes_per_batch, examples_per_class
    self.batch_size = classes_per_batch * examples_per_class
    self.host_slice = host_slice or slice(None)
    self.members = {int(c): labelled[labels == c] for c in usable}  # transfer-set positions per class
    self.classes = np.asarray(sorted(self.members))

  def indices(self, step: int) -> np.ndarray:
    """Transfer-set positions of the global batch of ``step`` (example-major)."""
    rng = np.random.default_rng([self.seed, 2, step])
    chosen = rng.choice(self.classes, size=self.classes_per_batch, replace=False)
    per_class = np.stack([rng.choice(self.members[int(c)], size=self.examples_per_class, replace=False)
                          for c in chosen])  # [P, K]
    return per_class.T.reshape(-1)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The (this process's part of the) batch of ``step``, augmented as :class:`TrainBatches` does."""
    positions = self.indices(step)[self.host_slice]
    images, labels = self.transfer_set.split.get(self.transfer_set.indices[positions])
    images = augmented_checked_images(images, positions, seed=self.seed, step=step, jitter=self.jitter,
                                      hflip=self.hflip)
    return {"image": images, "label": labels, "label_mask": self.transfer_set.label_mask[positions],
            "index": positions.astype(np.int32)}


def eval_batches(split, *, batch_size: int, host_slice: slice | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Sequential batches over a whole split, the last one padded with ``weight = 0`` examples.

  Every batch has the same shape, so the evaluation step compiles once.
  """
  if not (isinstance(batch_size, int | np.integer) and batch_size >= 1):
    raise ValueError(f"eval_batches: batch_size must be an integer >= 1 (eval_batch_size); got {batch_size!r}")
  n = len(split)
  host_slice = host_slice or slice(None)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    weight = (idx < n).astype(np.float32)
    images, labels = split.get(np.minimum(idx, n - 1))
    yield {"image": images[host_slice], "label": labels[host_slice], "weight": weight[host_slice],
           "index": idx[host_slice].astype(np.int32)}


def prefetch(batches: Iterator, transfer, size: int = 2) -> Iterator:
  """Prepares and transfers the next ``size`` batches in a background thread.

  ``transfer`` (e.g. :func:`kdjax.parallel.shard_batch` bound to a mesh) runs in the thread so the
  host-to-device copy overlaps the previous step. Exceptions (a NaN batch, say) are re-raised in
  the consumer, at the step where they happened.
  """
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()
  stop = threading.Event()

  def worker():
    try:
      for item in batches:
        if stop.is_set():
          return
        q.put(transfer(item))
      q.put(sentinel)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      q.put(e)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is sentinel:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
