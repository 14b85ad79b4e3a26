"""Data-free knowledge distillation (Lopes, Fenu & Starner, "Data-Free Knowledge Distillation for Deep
Neural Networks", arXiv 1710.07535, NIPS 2017 LLD workshop).

A teacher is released with a little *metadata* (activation statistics recorded once on its training set);
a student is later distilled on inputs *reconstructed* from the metadata and the teacher alone, without
the original data. kdjax runs the paper's pipeline as three resumable stages, each writing its artefact
into its own work directory (PAPERS.md §6):

1. ``data_free_metadata`` (:func:`make_metadata_program`): one pass over the training split with the
   frozen teacher, one class per batch (:func:`metadata_plan`); per class it records the statistics of
   every kind below (float32 sums of activations centred by the class's first batch, finished in float64)
   and writes ``metadata.npz`` + ``metadata.json`` (what each array means, the teacher it came from —
   model, kwargs, layer shapes, a weights fingerprint, checked by stage 2 — and the bytes of each kind);
2. ``data_free_reconstruct`` (:func:`make_reconstruct_program`): reads only the metadata and the teacher;
   per class it samples activation targets from the class's statistics and optimises a batch of inputs
   with Adam against the frozen teacher (all examples of a class in one jitted, vmapped program; fit step
   ``s`` works on class ``s // steps_per_class``, so a killed run resumes at its class without redoing the
   finished ones); writes ``reconstructed.npz`` (a dataset the pipeline reads) and ``reconstructed.png``;
3. distillation on ``reconstructed.npz``: the ``soft_targets`` method with ``alpha=1`` (no labels),
   ``T = 8``, evaluated on the real test split (``config.test_dataset``).

Metadata kinds and their reconstruction objectives (per example; ``relu`` as in the code, so the optimiser
does not chase negative pre-activations the network cannot produce, PAPERS.md §6(f)):

* ``top_layer`` [paper §3 + code]: per class mean and covariance of the temperature-scaled logits
  ``z/T``; objective ``mean_c (relu(t_c) − relu(z_c/T))²`` (:func:`top_layer_objective`).
* ``all_layers`` [paper + code ``compute_layerwise_statistics``]: per class mean and covariance of every
  hidden layer's **pre-ReLU** activations and of ``z/T``; each layer's target is sampled from its own
  Gaussian; objective ``Σ_l (1/d_l) · mean_i (relu(t_l,i) − relu(a_l,i))²`` (:func:`all_layers_objective`;
  the code's ``(1/size) · reduce_mean``, so a layer weighs ``1/d_l²`` per unit). A layer with more than
  ``covariance_max_units`` units keeps per-unit standard deviations instead of a covariance, as the code
  does for layers whose covariance is unusable.
* ``all_layers_spectral`` and ``layer_pairs_spectral``: the paper describes spectral records of the
  network's activations (a graph whose nodes are neurons, compressed by its leading eigenvectors), but
  the released code never implemented them (its two spectral objectives *are* the all-layers loss, and its
  graph statistics use an undefined ``downscale_factor``; PAPERS.md §6(a)). What follows is **kdjax's
  reconstruction** from the paper's description, not a transcription:

  - the graph signal of an example is its activations as the objectives see them,
    ``f = concat_l relu(a_l) / √d_l`` over the recorded layers (hidden pre-ReLU and ``z/T``; the
    ``1/√d_l`` makes each layer count by its mean square, like the all-layers weights) that have at most
    ``covariance_max_units`` units (LeNet's 4,704-unit first convolution stays out of the graph);
  - per class the graph is the co-activation matrix ``M_c = E[f fᵀ | c]`` over the neurons of all layers
    (``all_layers_spectral``) or of each adjacent layer pair (``layer_pairs_spectral``, one graph per
    pair: smaller eigenproblems, as in the paper's motivation). ``f ≥ 0``, so ``M_c`` is a non-negative,
    symmetric adjacency; it is also positive semi-definite, so its top-``k`` eigenpairs ``(Λ_k, V_k)``
    give the best rank-``k`` approximation ``V_k Λ_k V_kᵀ`` of the graph (Eckart–Young) — the
    compression, with ``k = ceil(spectral_fraction · nodes)``;
  - the metadata are ``V_k``, ``Λ_k`` and the mean and covariance of the spectral coefficients
    ``V_kᵀ f`` per class (the graph Fourier transform of the activations on that graph, truncated to ``k``
    components); reconstruction samples coefficients from that Gaussian and minimises
    ``Σ_graphs mean_j ((V_kᵀ f(x))_j − s_j)²`` (:func:`spectral_objective`), i.e. the inputs' activations
    reproduce the spectral reconstruction ``V_k s``. Unlike ``all_layers`` the targets of all layers
    (of a pair) are sampled *jointly*, with their correlations.

* ``noise`` (baseline, no metadata used): the inputs are the optimisation's starting point,
  Gaussian noise ``N(init_mean, init_std²)``, labelled only by the teacher's soft outputs at distillation.

Where the code differs, and what kdjax does:

* Sampling: the code draws ``mean + ε @ cov`` (the covariance itself, not a square root), which has
  covariance ``cov²``. kdjax draws from the recorded Gaussian, ``mean + ε @ Sᵀ`` with ``S Sᵀ = cov``
  (``target_sampling="gaussian"``, default); ``"code"`` reproduces the code.
* Statistics: the code records them with its ``distill`` feed dict (dropout off, ``T = 8``); kdjax runs the
  teacher in evaluation mode (no dropout; Flax's inverted dropout needs no rescale) and divides the logits
  by the metadata stage's ``temperature``. Covariances are population covariances (``/ n``) like the
  code's online algorithm.
* The code re-initialises the input batch from ``N(0.15, 0.1)`` for MNIST (commented in the file; the
  committed default is CelebA's ``N(0.44, 0.29)``), runs 1000 Adam steps per batch (LR 0.07 in its README)
  and does not clip the inputs; kdjax's defaults are the MNIST ones, inputs unclipped.
* ``all_layers_dropout`` (fixed random dropout masks in the frozen teacher) is not implemented.

Everything above the stage programs is a pure function of arrays (jit/grad/vmap-safe) or host NumPy
post-processing of recorded sums (eigendecompositions in float64).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.errors import check_positive, unknown_name

KINDS = ("noise", "top_layer", "all_layers", "all_layers_spectral", "layer_pairs_spectral")
TARGET_SAMPLING = ("gaussian", "code")
TOP = "top"  # the metadata's name for the temperature-scaled logits z/T (the last recorded layer)
METADATA_FILE = "metadata.npz"
METADATA_JSON = "metadata.json"
RECONSTRUCTED_FILE = "reconstructed.npz"
RECONSTRUCTED_PNG = "reconstructed.png"


# --- statistics ---------------------------------------------------------------------------------------


def moment_sums(values: jax.Array, weights: jax.Array, *, shift: jax.Array, full: bool = True
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Count, sum and second-moment sum of shifted values of one batch (the metadata stage's batches each
  hold the examples of one class, so a batch costs ``batch · d²``, not ``classes`` times that).

  Args:
    values: ``[batch, d]``.
    weights: ``[batch]``, 1 for an example that counts, 0 for padding.
    shift: ``[d]``, subtracted before summing (a rough mean, so the float32 sums of squares do not
      cancel when :func:`finish_moments` subtracts the squared mean).
    full: the second moment as a ``[d, d]`` matrix; ``False``: its diagonal ``[d]`` only.

  Returns:
    ``(Σ w, Σ w (v − shift) [d], Σ w (v − shift)(v − shift)ᵀ [d, d] or its diagonal [d])``.
  """
  weights = weights.astype(values.dtype)
  centred = values - shift
  weighted = centred * weights[:, None]
  second = weighted.T @ centred if full else jnp.sum(weighted * centred, axis=0)
  return jnp.sum(weights), jnp.sum(weighted, axis=0), second


def finish_moments(count: np.ndarray, first: np.ndarray, second: np.ndarray, shift: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Means and population covariances (or variances) from :func:`moment_sums` totals, in float64.

  Args:
    count: ``[C]``; first: ``[C, d]``; second: ``[C, d, d]`` or ``[C, d]``; shift: ``[C, d]`` (or ``[d]``).

  Returns:
    ``(mean [C, d], cov [C, d, d])`` for full second moments, ``(mean [C, d], var [C, d])`` for diagonal
    ones. ``cov = Σ (v − m)(v − m)ᵀ / n`` (``/ n`` as the code's online algorithm).
  """
  n = np.asarray(count, np.float64)[:, None]
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  centred_mean = first / n
  mean = centred_mean + np.asarray(shift, np.float64)
  if second.ndim == 3:
    cov = second / n[:, :, None] - centred_mean[:, :, None] * centred_mean[:, None, :]
    return mean, (cov + np.swapaxes(cov, 1, 2)) / 2
  return mean, np.maximum(second / n - centred_mean ** 2, 0.0)


def activation_signal(layers: Sequence[jax.Array]) -> jax.Array:
  """The graph signal of the spectral kinds: ``concat_l relu(a_l) / √d_l``, ``[batch, Σ d_l]``.

  Args:
    layers: per recorded layer, ``[batch, ...]`` pre-ReLU activations (the last one ``z/T``).
  """
  parts = [jax.nn.relu(a.reshape(a.shape[0], -1)) / math.sqrt(math.prod(a.shape[1:])) for a in layers]
  return jnp.concatenate(parts, axis=-1)


def top_eigenpairs(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """The ``rank`` largest eigenvalues ``[k]`` and their eigenvectors ``[d, k]`` of a symmetric PSD matrix.

  ``V diag(λ) Vᵀ`` is then the best rank-``k`` approximation of ``matrix`` in the Frobenius norm. Computed in
  float64 with ``numpy.linalg.eigh``; each eigenvector's sign is fixed (largest-magnitude entry positive)
  so the metadata is deterministic.
  """
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"top_eigenpairs needs a square matrix; got shape {matrix.shape}")
  if not 1 <= rank <= matrix.shape[0]:
    raise ValueError(f"rank must be in [1, {matrix.shape[0]}] (the matrix size); got {rank}")
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  order = np.argsort(values)[::-1][:rank]
  values, vectors = values[order], vectors[:, order]
  signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(rank)])
  return values, vectors * np.where(signs == 0, 1.0, signs)


def spectral_rank(nodes: int, fraction: float) -> int:
  """``k = ceil(fraction · nodes)``, at least 1 and at most ``nodes``."""
  return int(min(nodes, max(1, math.ceil(fraction * nodes - 1e-9))))


def spectral_graphs(layer_units: Sequence[int], kind: str) -> list[tuple[int, int]]:
  """Node ranges ``[(start, stop)]`` of the signal that form each graph of a spectral kind.

  ``all_layers_spectral``: one graph over every node; ``layer_pairs_spectral``: one graph per adjacent
  pair of recorded layers (a single recorded layer gives one graph).
  """
  offsets = np.concatenate([[0], np.cumsum(layer_units)]).astype(int).tolist()
  if kind == "all_layers_spectral" or len(layer_units) == 1:
    return [(0, offsets[-1])]
  if kind == "layer_pairs_spectral":
    return [(offsets[i], offsets[i + 2]) for i in range(len(layer_units) - 1)]
  raise unknown_name("spectral kind", kind, ("all_layers_spectral", "layer_pairs_spectral"))


# --- sampling -----------------------------------------------------------------------------------------


def sampling_factors(spread: np.ndarray, *, target_sampling: str = "gaussian") -> np.ndarray:
  """The factors ``S`` of ``target = mean + ε Sᵀ`` (``ε ~ N(0, I)``) for every class.

  Args:
    spread: ``[C, d, d]`` covariances, or ``[C, d]`` per-unit variances.
    target_sampling: ``"gaussian"``: ``S`` is a square root of the covariance (``S Sᵀ = cov``, from its
      eigendecomposition with negative rounding errors clipped), so the targets follow the recorded
      Gaussian. ``"code"``: ``S = covᵀ``, the released code's ``means + gauss @ cov`` (covariance ``cov²``).

  Returns:
    ``[C, d, d]`` matrices for covariances; for variances the standard deviations ``[C, d]`` (a diagonal
    ``S``, kept as a vector; the code samples such layers with the standard deviation whatever the mode).
  """
  if target_sampling not in TARGET_SAMPLING:
    raise unknown_name("target_sampling", target_sampling, TARGET_SAMPLING)
  spread = np.asarray(spread, np.float64)
  if spread.ndim == 3:
    if target_sampling == "code":
      return np.swapaxes(spread, -1, -2)
    values, vectors = np.linalg.eigh(spread)
    return vectors * np.sqrt(np.maximum(values, 0.0))[:, None, :]
  if spread.ndim != 2:
    raise ValueError(f"spread must be [classes, d, d] covariances or [classes, d] variances; got {spread.shape}")
  return np.sqrt(np.maximum(spread, 0.0))


def sample_targets(key: jax.Array, mean: jax.Array, factor: jax.Array, num: int) -> jax.Array:
  """``num`` draws ``mean + ε factorᵀ`` (``[d], [d, d] -> [num, d]``), or ``mean + ε · factor`` for a
  diagonal factor given as its vector ``[d]``."""
  eps = jax.random.normal(key, (num, mean.shape[-1]), jnp.float32)
  return mean + (eps * factor if factor.ndim == 1 else eps @ factor.T)


# --- objectives (per example) -------------------------------------------------------------------------


def top_layer_objective(top: jax.Array, target: jax.Array) -> jax.Array:
  """``mean_c (relu(t_c) − relu(top_c))²``: ``[d], [d] -> []`` (the code's ``top_layer`` loss).

  ``top`` is the teacher's ``z/T`` for the input being optimised, ``target`` a draw from the class's
  record of ``z/T``.
  """
  return jnp.mean(jnp.square(jax.nn.relu(target) - jax.nn.relu(top)))


def all_layers_objective(layers: Sequence[jax.Array], targets: Sequence[jax.Array]) -> jax.Array:
  """``Σ_l (1/d_l) · mean_i (relu(t_l,i) − relu(a_l,i))²`` over the recorded layers (the code's
  ``all_layers`` loss): per layer ``[...]`` activations and targets of the same size, ``-> []``."""
  if len(layers) != len(targets):
    raise ValueError(f"all_layers_objective: {len(layers)} layers but {len(targets)} targets")
  total = jnp.float32(0.0)
  for a, t in zip(layers, targets):
    a, t = a.reshape(-1), t.reshape(-1)
    total = total + jnp.mean(jnp.square(jax.nn.relu(t) - jax.nn.relu(a))) / a.size
  return total


def spectral_objective(signal: jax.Array, graphs: Sequence[tuple[int, int]], bases: Sequence[jax.Array],
                       targets: Sequence[jax.Array]) -> jax.Array:
  """``Σ_g mean_j ((V_gᵀ f[g])_j − s_g,j)²``: the spectral coefficients of the example's activations on
  each graph ``g`` against sampled coefficients.

  Args:
    signal: ``f``, ``[D]`` (:func:`activation_signal` of one example).
    graphs: ``[(start, stop)]`` node ranges of ``f`` (:func:`spectral_graphs`).
    bases: per graph ``V_g``, ``[stop − start, k_g]`` (the class's kept eigenvectors).
    targets: per graph ``s_g``, ``[k_g]``.
  """
  total = jnp.float32(0.0)
  for (start, stop), basis, target in zip(graphs, bases, targets):
    total = total + jnp.mean(jnp.square(signal[start:stop] @ basis - target))
  return total


# --- the metadata file --------------------------------------------------------------------------------


@dataclasses.dataclass
class Metadata:
  """A loaded ``metadata.npz`` + ``metadata.json`` (see :func:`write_metadata` for the arrays)."""
  arrays: dict[str, np.ndarray]
  info: dict[str, Any]

  @property
  def layers(self) -> list[dict[str, Any]]:
    return self.info["layers"]

  @property
  def num_classes(self) -> int:
    return int(self.info["num_classes"])

  def kind_arrays(self, kind: str) -> list[str]:
    return list(self.info["kinds"][kind]["arrays"])


def read_metadata(path: str) -> Metadata:
  """Reads ``metadata.npz`` (and the ``metadata.json`` beside it); errors say what is missing."""
  if not isinstance(path, str) or not path:
    raise ValueError("metadata must be the path of a metadata.npz written by a data_free_metadata stage "
                     f"(e.g. '@metadata/metadata.npz' in a protocol); got {path!r}")
  json_path = os.path.join(os.path.dirname(path), METADATA_JSON)
  if path.startswith("@"):
    raise FileNotFoundError(f"metadata {path!r} names a protocol variant's file, which only `kdjax reproduce` "
                            "resolves; with `kdjax train` give the file: --config.loss.metadata=DIR/metadata.npz")
  if not os.path.exists(path) or not os.path.exists(json_path):
    raise FileNotFoundError(f"metadata {path!r} (and {METADATA_JSON} beside it) not found: run the "
                            "data_free_metadata stage of this teacher first, or fix loss.metadata")
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  with open(json_path) as f:
    info = json.load(f)
  return Metadata(arrays, info)


def teacher_fingerprint(variables: Any) -> str:
  """A short SHA-256 of the teacher's variables (names, shapes and values), to tie metadata to weights."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda p: str(p[0])):
    array = np.ascontiguousarray(np.asarray(leaf, np.float32))
    digest.update(str(path).encode())
    digest.update(str(array.shape).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def _teacher_description(setup) -> dict[str, Any]:
  """The teacher's model name and kwargs (from its run's config), classes and weights fingerprint."""
  from kdjax import checkpoint as ckpt
  teacher_dirs = [w for w in setup.config.teacher_workdir.split(",") if w]
  tconfig = ckpt.read_config(teacher_dirs[0]) or {}
  return {"model": tconfig.get("model"), "model_kwargs": tconfig.get("model_kwargs", {}),
          "num_classes": tconfig.get("num_classes"), "workdir": os.path.abspath(teacher_dirs[0]),
          "fingerprint": teacher_fingerprint(setup.teacher_variables[0])}


def _single_teacher(setup, stage: str):
  if len(setup.teacher_models) != 1:
    raise ValueError(f"{stage} needs exactly one teacher (teacher_workdir names {len(setup.teacher_models)} "
                     "runs); data-free KD records and reconstructs one network's activations")
  return setup.teacher_models[0]


def _pre_relu_names(teacher, example) -> list[str]:
  from kdjax import models
  names = models.feature_names(teacher, example)
  found = sorted((n for n in names if re.fullmatch(r"pre_relu_\d+", n)), key=lambda n: int(n.rsplit("_", 1)[1]))
  return found


def recorded_layers(teacher, example: jax.Array, layers: Sequence[str]) -> list[str]:
  """The teacher features whose statistics are recorded (the top layer ``z/T`` is added after them).

  Empty ``layers``: every ``pre_relu_<i>`` feature of the teacher, in order (kdjax's MLP and LeNet expose
  them). An unknown name lists the teacher's features.
  """
  from kdjax import models
  from kdjax.errors import UnknownNameError
  available = models.feature_names(teacher, example)
  if isinstance(layers, str):
    raise ValueError(f"layers must be a tuple of feature names, got the string {layers!r}; write ({layers!r},)")
  chosen = list(layers) or _pre_relu_names(teacher, example)
  if not layers and not chosen:
    raise UnknownNameError(f"the teacher {type(teacher).__name__} exposes no pre_relu_<i> features; name the "
                           f"hidden layers to record in loss.layers (its features: {', '.join(available)})")
  for name in chosen:
    if name not in available:
      raise unknown_name(f"feature of the teacher {type(teacher).__name__} (loss.layers)", name, available)
  return chosen


def _layer_shapes(teacher, variables, example, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
  from kdjax import models
  out = jax.eval_shape(lambda v, x: models.apply_model(teacher, v, x, features=tuple(names)), variables, example)
  shapes = {name: tuple(out.features[name].shape[1:]) for name in names}
  shapes[TOP] = tuple(out.logits.shape[1:])
  return shapes


# --- stage 1: record the metadata -------------------------------------------------------------------


class MetadataState(flax.struct.PyTreeNode):
  """Running per-class sums of the metadata stage (see :func:`moment_sums`).

  Attributes:
    step: int32 scalar, batches done; batch ``s`` holds examples of class ``s // steps_per_class`` only.
    count: ``[C]`` examples seen per class.
    shift: per recorded layer ``[C, d_l]`` (and ``"signal"``: ``[C, D]``): each class's first batch's mean.
    first: per layer ``[C, d_l]`` sums of shifted pre-ReLU activations; ``"signal"``: ``[C, D]``.
    second: per layer ``[C, d_l, d_l]`` (or ``[C, d_l]`` for a per-unit layer); ``"signal"``: ``[C, D, D]``.
  """
  step: jax.Array
  count: jax.Array
  shift: dict[str, jax.Array]
  first: dict[str, jax.Array]
  second: dict[str, jax.Array]


def default_metadata_config() -> dict:
  """``config.loss`` fields of the ``data_free_metadata`` stage."""
  return {"temperature": 8.0, "layers": (), "covariance_max_units": 2048, "spectral_fraction": 0.1}


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class MetadataPlan:
  """Which transfer-set positions each step of the metadata pass reads.

  Attributes:
    members: per class, the transfer-set positions of its labelled examples (ascending).
    steps_per_class: batches per class; step ``s`` reads class ``s // steps_per_class``.
    batch_size: examples per batch (padded with weight-0 examples), a multiple of the devices.
  """
  members: tuple[np.ndarray, ...]
  steps_per_class: int
  batch_size: int

  def positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``(positions [batch_size], valid [batch_size])`` of ``step``'s batch."""
    cls, chunk = divmod(step, self.steps_per_class)
    members = self.members[cls]
    chosen = members[chunk * self.batch_size:(chunk + 1) * self.batch_size]
    valid = np.arange(self.batch_size) < len(chosen)
    return np.resize(chosen, self.batch_size) if len(chosen) else np.full(self.batch_size, members[0]), valid


def metadata_plan(labels: np.ndarray, label_mask: np.ndarray, *, num_classes: int, num_steps: int, multiple: int
                  ) -> MetadataPlan:
  """The metadata pass: every labelled example once, ``num_steps / num_classes`` batches per class.

  Args:
    labels: ``[n]`` the transfer set's labels; label_mask: ``[n]`` (only labelled examples count).
    num_classes: ``C``; num_steps: the stage length, a multiple of ``C``.
    multiple: the batch size is rounded up to a multiple of this (the devices).

  Raises:
    ValueError: ``num_steps`` not a positive multiple of the classes, or a class with fewer than 2
      labelled examples (a covariance needs 2), naming the classes and what to set.
  """
  labels = np.asarray(labels)
  labelled = np.asarray(label_mask) > 0
  counts = np.bincount(labels[labelled], minlength=num_classes)
  empty = np.flatnonzero(counts < 2).tolist()
  if empty:
    raise ValueError(f"class(es) {empty} have fewer than 2 labelled training examples ({counts[empty].tolist()}); "
                     "per-class metadata (a mean and a covariance per class) needs at least 2 examples of every class")
  if num_steps < num_classes or num_steps % num_classes:
    raise ValueError(f"the data_free_metadata stage reads one class per batch, so num_steps must be a multiple of "
                     f"the {num_classes} classes (batches per class x classes); got num_steps={num_steps}: set "
                     f"--config.num_steps=0 (one batch per class) or a multiple of {num_classes}")
  steps_per_class = num_steps // num_classes
  members = tuple(np.flatnonzero(labelled & (labels == c)) for c in range(num_classes))
  batch_size = _round_up(max(-(-len(m) // steps_per_class) for m in members), multiple)
  return MetadataPlan(members, steps_per_class, batch_size)


def make_metadata_program(*, temperature: float, layers: Sequence[str], covariance_max_units: int,
                          spectral_fraction: float):
  """The metadata stage as a :class:`kdjax.train.StageProgram` (needs a teacher; exports no model).

  One pass over the training split (the transfer set's labelled examples) in ``num_steps`` batches, each
  of one class (``num_steps`` = classes × batches per class, :func:`metadata_plan`); the state sums, per
  class, the teacher's pre-ReLU activations of ``layers`` (default: every ``pre_relu_<i>`` feature), its
  logits ``/ temperature`` and the spectral signal (:func:`activation_signal`). ``evaluate``
  turns the sums into the metadata of every kind and writes ``metadata.npz`` and ``metadata.json``
  (:func:`write_metadata`) in the work directory.
  """
  from kdjax import data as kdata
  from kdjax import models, parallel
  from kdjax import train as ktrain

  check_positive("temperature", temperature)
  if not (isinstance(covariance_max_units, int) and covariance_max_units >= 1):
    raise ValueError(f"covariance_max_units must be an int >= 1, got {covariance_max_units!r}")
  if not 0 < spectral_fraction <= 1:
    raise ValueError(f"spectral_fraction (the fraction of each graph's eigenpairs kept) must be in (0, 1], got "
                     f"{spectral_fraction!r}")
  wanted = tuple(layers)

  def plan(setup):
    teacher = _single_teacher(setup, "data_free_metadata")
    names = recorded_layers(teacher, setup.example, wanted)
    shapes = _layer_shapes(teacher, setup.teacher_variables[0], setup.example, names)
    units = {name: math.prod(shape) for name, shape in shapes.items()}
    spectral = [name for name in (*names, TOP) if units[name] <= covariance_max_units]
    return teacher, names, shapes, units, spectral

  plans: dict[int, MetadataPlan] = {}  # by id(setup): a Setup is not hashable

  def planned(setup) -> MetadataPlan:
    if id(setup) not in plans:
      transfer = setup.transfer_set
      split_labels = getattr(transfer.split, "labels", None)
      labels = (np.asarray(split_labels)[transfer.indices] if split_labels is not None
                else np.asarray(transfer.split.get(transfer.indices)[1]))
      plans[id(setup)] = metadata_plan(labels, transfer.label_mask, num_classes=setup.dataset.num_classes,
                                       num_steps=setup.num_steps, multiple=setup.mesh.size * jax.process_count())
    return plans[id(setup)]

  def init_state(setup) -> MetadataState:
    planned(setup)  # a class without examples or a bad num_steps fails before anything runs
    _, names, _, units, spectral = plan(setup)
    num_classes = setup.dataset.num_classes
    shift, first, second = {}, {}, {}
    sizes = {name: units[name] for name in (*names, TOP)}
    sizes["signal"] = sum(units[name] for name in spectral)
    for name, d in sizes.items():
      shift[name] = jnp.zeros((num_classes, d), jnp.float32)
      first[name] = jnp.zeros((num_classes, d), jnp.float32)
      full = name == "signal" or d <= covariance_max_units
      second[name] = jnp.zeros((num_classes, d, d) if full else (num_classes, d), jnp.float32)
    return MetadataState(step=jnp.zeros((), jnp.int32), count=jnp.zeros((num_classes,), jnp.float32),
                         shift=shift, first=first, second=second)

  def make_step(setup) -> Callable:
    teacher, names, _, _, spectral = plan(setup)
    steps_per_class = planned(setup).steps_per_class

    def step(state: MetadataState, batch, teacher_variables=()):
      cls = state.step // steps_per_class
      class_start = state.step % steps_per_class == 0
      out = models.apply_model(teacher, teacher_variables[0], batch["image"], train=False, features=names)
      acts = {name: out.features[name].reshape(out.logits.shape[0], -1) for name in names}
      acts[TOP] = out.logits / temperature
      acts["signal"] = activation_signal([acts[name] for name in spectral])
      weights = batch["weight"]
      total = jnp.maximum(jnp.sum(weights), 1.0)
      shift, first, second = dict(state.shift), dict(state.first), dict(state.second)
      for name, values in acts.items():
        batch_mean = jnp.sum(values * weights[:, None], axis=0) / total
        class_shift = jnp.where(class_start, batch_mean, state.shift[name][cls])
        n, s1, s2 = moment_sums(values, weights, shift=class_shift, full=state.second[name].ndim == 3)
        shift[name] = shift[name].at[cls].set(class_shift)
        first[name] = first[name].at[cls].add(s1)
        second[name] = second[name].at[cls].add(s2)
      new_state = state.replace(step=state.step + 1, count=state.count.at[cls].add(n), shift=shift, first=first,
                                second=second)
      new_state, nonfinite = ktrain.skip_if_nonfinite(ktrain.all_finite(first, second), new_state,
                                                      state.replace(step=state.step + 1))
      return new_state, {"examples": (n, jnp.float32(1.0)), "nonfinite": nonfinite}
    return step

  def batches(setup) -> Callable[[int], Iterator[dict]]:
    transfer, metadata_steps = setup.transfer_set, planned(setup)
    host = parallel.process_slice(metadata_steps.batch_size)

    def host_batch(step: int) -> dict[str, np.ndarray]:
      positions, valid = metadata_steps.positions(step)
      images, labels = transfer.split.get(transfer.indices[positions[host]])
      return {"image": np.asarray(images, np.float32), "label": np.asarray(labels, np.int32),
              "weight": valid[host].astype(np.float32)}

    def source(start_step: int) -> Iterator[dict]:
      return kdata.prefetch((host_batch(s) for s in range(start_step, setup.num_steps)),
                            functools.partial(parallel.shard_batch, mesh=setup.mesh))
    return source

  def evaluate(setup, state: MetadataState) -> dict[str, Any]:
    _, names, shapes, units, spectral = plan(setup)
    host = jax.device_get(state)
    if int(host.step) == 0:
      return {}
    info = {"teacher": _teacher_description(setup), "dataset": setup.config.dataset,
            "examples": int(np.sum(host.count)), "temperature": float(temperature),
            "spectral_fraction": float(spectral_fraction), "covariance_max_units": int(covariance_max_units)}
    path, info = write_metadata(setup.workdir, host, names=names, shapes=shapes, spectral_layers=spectral,
                                num_classes=setup.dataset.num_classes, example_shape=setup.dataset.example_shape,
                                info=info, spectral_fraction=spectral_fraction)
    return {f"metadata_kib_{kind}": entry["bytes"] / 1024 for kind, entry in info["kinds"].items() if kind != "noise"}

  def stage_length(config, dataset, transfer_set) -> int:
    return dataset.num_classes  # num_steps = 0: one batch per class

  return ktrain.StageProgram(init_state, make_step, needs_teacher=True, evaluate=evaluate, batches=batches,
                             exports_model=False, stage_length=stage_length)


def write_metadata(workdir: str, state: MetadataState, *, names: Sequence[str], shapes: Mapping[str, tuple],
                   spectral_layers: Sequence[str], num_classes: int, example_shape: tuple, info: dict[str, Any],
                   spectral_fraction: float) -> tuple[str, dict[str, Any]]:
  """Turns the metadata stage's sums into ``metadata.npz`` and ``metadata.json`` in ``workdir``.

  Arrays (float32; ``C`` classes; layers in the order of ``layer_names``, the last ``"top"`` = ``z/T``):

  * ``count`` ``[C]``: training examples per class.
  * ``mean__<layer>`` ``[C, d]``: per-class mean of the flattened pre-ReLU activations (``z/T`` for top).
  * ``cov__<layer>`` ``[C, d, d]``: their per-class population covariance, or ``var__<layer>`` ``[C, d]``
    (per-unit variances) for a layer with more than ``covariance_max_units`` units.
  * ``spectral_<g>__vectors`` ``[C, n_g, k_g]``, ``spectral_<g>__values`` ``[C, k_g]``: the kept eigenpairs
    of each class's co-activation graph ``g`` (``g = all``, or ``pair<i>`` for layers ``i, i+1`` of the
    spectral layers); ``spectral_<g>__coeff_mean`` ``[C, k_g]`` and ``spectral_<g>__coeff_cov``
    ``[C, k_g, k_g]``: mean and covariance of the coefficients ``V_gᵀ f``.

  ``metadata.json`` describes every array, the layers (name, shape, units, full or per-unit), the
  spectral graphs (node ranges of the signal, rank), the teacher (model, kwargs, weights fingerprint), and
  for each kind the arrays it needs and their bytes.
  """
  arrays: dict[str, np.ndarray] = {"count": np.asarray(state.count).round().astype(np.int64)}
  count = np.asarray(state.count, np.float64)
  layer_info = []
  for name in (*names, TOP):
    mean, spread = finish_moments(count, state.first[name], state.second[name], state.shift[name])
    full = spread.ndim == 3
    arrays[f"mean__{name}"] = mean.astype(np.float32)
    arrays[f"{'cov' if full else 'var'}__{name}"] = spread.astype(np.float32)
    layer_info.append({"name": name, "shape": list(shapes[name]), "units": int(math.prod(shapes[name])),
                       "statistics": "covariance" if full else "variance",
                       "spectral": name in spectral_layers})
  signal_mean, signal_cov = finish_moments(count, state.first["signal"], state.second["signal"],
                                           state.shift["signal"])
  second_moment = signal_cov + signal_mean[:, :, None] * signal_mean[:, None, :]  # E[f fᵀ | c]
  units = [int(math.prod(shapes[name])) for name in spectral_layers]
  graphs_info = {}
  for kind in ("all_layers_spectral", "layer_pairs_spectral"):
    graphs = spectral_graphs(units, kind) if units else []
    entries = []
    for i, (start, stop) in enumerate(graphs):
      key = "all" if kind == "all_layers_spectral" else f"pair{i}"
      rank = spectral_rank(stop - start, spectral_fraction)
      vectors, values, coeff_mean, coeff_cov = [], [], [], []
      for c in range(num_classes):
        lam, vec = top_eigenpairs(second_moment[c, start:stop, start:stop], rank)
        values.append(lam)
        vectors.append(vec)
        coeff_mean.append(signal_mean[c, start:stop] @ vec)
        coeff_cov.append(vec.T @ signal_cov[c, start:stop, start:stop] @ vec)
      for field, value in (("vectors", vectors), ("values", values), ("coeff_mean", coeff_mean),
                           ("coeff_cov", coeff_cov)):
        arrays[f"spectral_{key}__{field}"] = np.stack(value).astype(np.float32)
      entries.append({"key": key, "start": start, "stop": stop, "rank": rank})
    graphs_info[kind] = entries
  kinds = {
      "noise": [],
      "top_layer": [f"mean__{TOP}", f"cov__{TOP}" if f"cov__{TOP}" in arrays else f"var__{TOP}"],
      "all_layers": [k for k in arrays if k.startswith(("mean__", "cov__", "var__"))],
      "all_layers_spectral": [k for k in arrays if k.startswith("spectral_all__")],
      "layer_pairs_spectral": [k for k in arrays if k.startswith("spectral_pair")],
  }
  info = {**info, "format": "kdjax data_free metadata v1", "num_classes": int(num_classes),
          "example_shape": list(example_shape), "layers": layer_info, "layer_names": [*names, TOP],
          "spectral_layers": list(spectral_layers), "spectral_graphs": graphs_info,
          "kinds": {kind: {"arrays": keys, "bytes": int(sum(arrays[k].nbytes for k in keys))}
                    for kind, keys in kinds.items()},
          "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
          "meaning": {
              "count": "training examples per class",
              "mean__<layer>": "per-class mean of the layer's flattened pre-ReLU activations (top: logits / T)",
              "cov__<layer>": "per-class population covariance of the same",
              "var__<layer>": "per-class per-unit variances (layers above covariance_max_units units)",
              "spectral_<g>__vectors": "kept eigenvectors of the class's co-activation graph E[f f^T | c], f = "
                                       "concat_l relu(a_l)/sqrt(d_l) over the graph's layers",
              "spectral_<g>__values": "the kept eigenvalues (largest first)",
              "spectral_<g>__coeff_mean": "per-class mean of the coefficients vectors^T f",
              "spectral_<g>__coeff_cov": "per-class covariance of the coefficients",
          }}
  path = os.path.join(workdir, METADATA_FILE)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  with open(os.path.join(workdir, METADATA_JSON), "w") as f:
    json.dump(info, f, indent=2)
  return path, info


# --- stage 2: reconstruct inputs from the metadata -----------------------------------------------------


class ReconstructState(flax.struct.PyTreeNode):
  """The reconstruction stage's state.

  Attributes:
    step: int32 scalar, fit steps done; step ``s`` optimises class ``s // steps_per_class``.
    inputs: ``[C, n, *example_shape]``, the inputs being reconstructed (classes before the current one
      are final, later ones still at their initial noise).
    targets: per objective term ``[C, n, k]`` sampled targets (fixed at initialisation).
    bases: per spectral graph ``[C, n_g, k_g]`` the class's kept eigenvectors (``{}`` for other kinds).
    opt_state: Adam's state for one class's ``[n, ...]`` inputs, reset when a class starts.
  """
  step: jax.Array
  inputs: jax.Array
  targets: dict[str, jax.Array]
  bases: dict[str, jax.Array]
  opt_state: Any


def default_reconstruct_config() -> dict:
  """``config.loss`` fields of the ``data_free_reconstruct`` stage (the code's MNIST settings)."""
  return {"metadata": "", "kind": "top_layer", "examples_per_class": 64, "adam_steps": 1000,
          "iterations_per_step": 50, "learning_rate": 0.07, "init_mean": 0.15, "init_std": 0.1,
          "target_sampling": "gaussian"}


def reconstruct_num_steps(*, num_classes: int, adam_steps: int, iterations_per_step: int) -> int:
  """The reconstruction stage's length in fit steps: ``num_classes · adam_steps / iterations_per_step`` (one
  empty step per class for ``noise``, ``adam_steps = 0``: a stage has at least one step)."""
  return num_classes * max(adam_steps // iterations_per_step, 1)


def check_teacher_matches(metadata: Metadata, setup, layer_shapes: Mapping[str, tuple]) -> None:
  """Refuses metadata recorded from another teacher (architecture, classes, layer shapes or weights)."""
  recorded = metadata.info.get("teacher", {})
  current = _teacher_description(setup)
  where = f"the metadata {setup.config.loss.metadata!r}"
  fix = ("record metadata from this teacher (the data_free_metadata stage) or set teacher_workdir to the teacher "
         "the metadata came from")
  for field in ("model", "model_kwargs", "num_classes"):
    if json.loads(json.dumps(recorded.get(field))) != json.loads(json.dumps(current[field])):
      raise ValueError(f"{where} was recorded from a teacher with {field}={recorded.get(field)!r}, but this stage's "
                       f"teacher ({setup.config.teacher_workdir}) has {field}={current[field]!r}; {fix}")
  recorded_shapes = {layer["name"]: tuple(layer["shape"]) for layer in metadata.layers}
  current_shapes = {name: tuple(shape) for name, shape in layer_shapes.items()}
  if recorded_shapes != current_shapes:
    raise ValueError(f"{where} records layers {recorded_shapes}, but this stage's teacher has {current_shapes}; "
                     f"{fix}")
  if recorded.get("fingerprint") != current["fingerprint"]:
    raise ValueError(f"{where} was recorded from a teacher with other weights (fingerprint "
                     f"{recorded.get('fingerprint')} from {recorded.get('workdir')}) than this stage's teacher "
                     f"({current['fingerprint']} from {setup.config.teacher_workdir}); {fix}")


def initial_inputs(seed: int, num_classes: int, num: int, example_shape: Sequence[int], *, init_mean: float,
                   init_std: float) -> jax.Array:
  """The starting inputs ``N(init_mean, init_std²)``, ``[C, n, *example_shape]``, a pure function of ``seed``."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return init_mean + init_std * jax.random.normal(key, (num_classes, num, *example_shape), jnp.float32)


def sample_all_targets(metadata: Metadata, kind: str, seed: int, num: int, *, target_sampling: str
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``(targets, bases)`` of ``kind`` for every class: targets ``{term: [C, n, k]}``, bases
  ``{graph: [C, n_g, k_g]}`` (spectral kinds only). Class ``c`` draws with ``fold_in(seed_key, c)``."""
  arrays, num_classes = metadata.arrays, metadata.num_classes
  if kind == "noise":
    return {}, {}
  if kind in ("top_layer", "all_layers"):
    names = [TOP] if kind == "top_layer" else metadata.info["layer_names"]
    terms = {name: (arrays[f"mean__{name}"], arrays.get(f"cov__{name}", arrays.get(f"var__{name}")))
             for name in names}
  else:
    graphs = metadata.info["spectral_graphs"][kind]
    if not graphs:
      raise ValueError(f"the metadata has no spectral graphs (no layer has <= covariance_max_units units), so "
                       f"kind={kind!r} cannot be reconstructed")
    terms = {g["key"]: (arrays[f"spectral_{g['key']}__coeff_mean"], arrays[f"spectral_{g['key']}__coeff_cov"])
             for g in graphs}
  base_key = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
  targets = {}
  for t, (term, (mean, spread)) in enumerate(terms.items()):
    factors = sampling_factors(spread, target_sampling=target_sampling)
    draws = [sample_targets(jax.random.fold_in(jax.random.fold_in(base_key, t), c), jnp.asarray(mean[c]),
                            jnp.asarray(factors[c], jnp.float32), num) for c in range(num_classes)]
    targets[term] = np.stack([np.asarray(d) for d in draws])
  bases = {}
  if kind.endswith("_spectral"):
    bases = {g["key"]: arrays[f"spectral_{g['key']}__vectors"] for g in metadata.info["spectral_graphs"][kind]}
  return targets, bases


def make_objective(kind: str, metadata: Metadata) -> tuple[Callable, tuple[str, ...]]:
  """``(objective(layers, targets, bases) -> [], feature names)`` of ``kind`` for one example.

  ``layers`` maps the recorded feature names (and ``"top"`` = ``z/T``) to one example's activations,
  ``targets`` and ``bases`` are that example's entries of :func:`sample_all_targets`.
  """
  names = metadata.info["layer_names"]
  features = tuple(n for n in names if n != TOP)
  if kind == "top_layer":
    return (lambda layers, targets, bases: top_layer_objective(layers[TOP], targets[TOP])), ()
  if kind == "all_layers":
    return (lambda layers, targets, bases: all_layers_objective([layers[n] for n in names],
                                                                [targets[n] for n in names])), features
  if kind in ("all_layers_spectral", "layer_pairs_spectral"):
    spectral = metadata.info["spectral_layers"]
    graphs = metadata.info["spectral_graphs"][kind]

    def objective(layers, targets, bases):
      signal = activation_signal([layers[n][None] for n in spectral])[0]
      return spectral_objective(signal, [(g["start"], g["stop"]) for g in graphs], [bases[g["key"]] for g in graphs],
                                [targets[g["key"]] for g in graphs])
    return objective, tuple(n for n in spectral if n != TOP)
  raise unknown_name("kind", kind, KINDS)


def per_example_objective(teacher, metadata: Metadata, kind: str) -> Callable:
  """``loss(x, targets, bases, teacher_variables) -> []``: the objective of ``kind`` for ONE input ``x``
  (``[*example_shape]``) through the frozen teacher (evaluation mode; logits divided by the metadata's T)."""
  from kdjax import models
  objective, features = make_objective(kind, metadata)
  temperature = float(metadata.info["temperature"])

  def loss(x, targets, bases, teacher_variables):
    out = models.apply_model(teacher, teacher_variables, x[None], train=False, features=features)
    layers = {name: value[0] for name, value in out.features.items()}
    layers[TOP] = out.logits[0] / temperature
    return objective(layers, targets, bases)
  return loss


def class_values_and_grads(loss: Callable) -> Callable:
  """The per-example objectives ``[n]`` and input gradients ``[n, ...]`` of one class's batch: ``jax.vmap``
  of ``value_and_grad(loss)`` over the examples (inputs and targets; the bases and the teacher are shared)."""
  return jax.vmap(jax.value_and_grad(loss), in_axes=(0, 0, None, None))


def optimise_class(values_and_grads: Callable, tx: optax.GradientTransformation, x: jax.Array, opt_state: Any,
                   targets: Mapping[str, jax.Array], bases: Mapping[str, jax.Array], teacher_variables: Any, *,
                   iterations: int) -> tuple[jax.Array, Any, jax.Array]:
  """``iterations`` optimiser updates of one class's inputs ``x`` ``[n, ...]`` (``lax.fori_loop``): returns the
  new inputs, optimiser state and the per-example objectives ``[n]`` measured before the last update. Every
  example's trajectory is independent of the others' (per-example objectives, per-coordinate Adam)."""
  def iteration(_, carry):
    x, opt_state, _ = carry
    value, grads = values_and_grads(x, targets, bases, teacher_variables)
    updates, opt_state = tx.update(grads, opt_state, x)
    return optax.apply_updates(x, updates), opt_state, value
  return jax.lax.fori_loop(0, iterations, iteration, (x, opt_state, jnp.zeros((x.shape[0],), jnp.float32)))


def make_reconstruct_program(*, metadata: str, kind: str, examples_per_class: int, adam_steps: int,
                             iterations_per_step: int, learning_rate: float, init_mean: float, init_std: float,
                             target_sampling: str):
  """The reconstruction stage as a :class:`kdjax.train.StageProgram` (needs the teacher; exports no model).

  Reads only ``metadata`` (a ``metadata.npz`` path) and the teacher — the dataset is used for nothing but
  its example shape and classes, which must match the metadata. Class ``c``'s ``examples_per_class``
  inputs start from :func:`initial_inputs` and are optimised with Adam (``learning_rate``) for
  ``adam_steps`` iterations against the objective of ``kind`` with targets drawn once from the class's
  statistics (:func:`sample_all_targets`); each fit step runs ``iterations_per_step`` iterations
  (``lax.fori_loop``) of one class, so the stage has ``classes · adam_steps / iterations_per_step`` steps
  (``config.num_steps = 0`` gives that length; ``kind="noise"`` has none). ``config.optimizer`` and
  ``config.learning_rate`` are not read. ``evaluate`` writes ``reconstructed.npz`` (``x_train`` ``[C·n,
  ...]``, ``y_train`` = the class each input was reconstructed for) and ``reconstructed.png`` (a grid, one
  row per class).
  """
  from kdjax import models, parallel
  from kdjax import train as ktrain

  if kind not in KINDS:
    raise unknown_name("kind", kind, KINDS)
  if target_sampling not in TARGET_SAMPLING:
    raise unknown_name("target_sampling", target_sampling, TARGET_SAMPLING)
  for name, value in (("examples_per_class", examples_per_class), ("iterations_per_step", iterations_per_step)):
    if not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if not (isinstance(adam_steps, int) and adam_steps >= 0):
    raise ValueError(f"adam_steps must be an int >= 0, got {adam_steps!r}")
  if kind == "noise" and adam_steps:
    raise ValueError(f"kind='noise' optimises nothing: set adam_steps=0 (got {adam_steps})")
  if kind != "noise" and adam_steps == 0:
    raise ValueError(f"kind={kind!r} needs adam_steps >= 1 (the code runs 1000 per class)")
  if adam_steps % iterations_per_step:
    raise ValueError(f"adam_steps ({adam_steps}) must be a multiple of iterations_per_step ({iterations_per_step}),"
                     " so every fit step runs the same program")
  check_positive("learning_rate", learning_rate)
  if init_std < 0:
    raise ValueError(f"init_std must be >= 0, got {init_std}")
  steps_per_class = max(adam_steps // iterations_per_step, 1)
  tx = optax.adam(learning_rate)

  @functools.cache
  def loaded():
    return read_metadata(metadata)

  def checked(setup):
    meta = loaded()
    teacher = _single_teacher(setup, "data_free_reconstruct")
    names = [n for n in meta.info["layer_names"] if n != TOP]
    check_teacher_matches(meta, setup, _layer_shapes(teacher, setup.teacher_variables[0], setup.example, names))
    if tuple(setup.dataset.example_shape) != tuple(meta.info["example_shape"]):
      raise ValueError(f"dataset {setup.config.dataset!r} has examples of shape {setup.dataset.example_shape}, the "
                       f"metadata {metadata!r} {tuple(meta.info['example_shape'])}; use the teacher's dataset")
    expected = reconstruct_num_steps(num_classes=meta.num_classes, adam_steps=adam_steps,
                                     iterations_per_step=iterations_per_step)
    if setup.num_steps != expected:
      raise ValueError(f"the data_free_reconstruct stage runs {meta.num_classes} classes x {steps_per_class} fit steps "
                       f"(adam_steps {adam_steps} / iterations_per_step {iterations_per_step}, at least 1) = "
                       f"{expected} steps; "
                       f"set num_steps=0 (that length) or {expected} (got a stage of {setup.num_steps} steps)")
    return meta, teacher

  def init_state(setup) -> ReconstructState:
    meta, _ = checked(setup)
    shape = tuple(meta.info["example_shape"])
    inputs = initial_inputs(setup.config.seed, meta.num_classes, examples_per_class, shape, init_mean=init_mean,
                            init_std=init_std)
    targets, bases = sample_all_targets(meta, kind, setup.config.seed, examples_per_class,
                                        target_sampling=target_sampling)
    return ReconstructState(step=jnp.zeros((), jnp.int32), inputs=inputs,
                            targets={k: jnp.asarray(v) for k, v in targets.items()},
                            bases={k: jnp.asarray(v) for k, v in bases.items()}, opt_state=tx.init(inputs[0]))

  def make_step(setup) -> Callable:
    meta, teacher = checked(setup)
    if kind == "noise":
      return lambda state, batch, teacher_variables=(): (state.replace(step=state.step + 1),
                                                         {"nonfinite": (jnp.float32(0.0), jnp.float32(1.0))})
    values_and_grads = class_values_and_grads(per_example_objective(teacher, meta, kind))
    sharding = parallel.batch_sharding(setup.mesh)

    def spread(tree):
      """Data parallelism: a class's examples (and their targets and Adam moments) split over the devices
      when they divide evenly; the examples never interact, so this is the 1-device computation."""
      if examples_per_class % setup.mesh.size:
        return tree
      return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding)
                          if a.ndim and a.shape[0] == examples_per_class else a, tree)

    def step(state: ReconstructState, batch, teacher_variables=()):
      del batch  # the step's work is a pure function of the step index
      variables = teacher_variables[0]
      cls = state.step // steps_per_class
      fresh = (state.step % steps_per_class) == 0
      x, targets = spread((state.inputs[cls], {k: v[cls] for k, v in state.targets.items()}))
      bases = {k: v[cls] for k, v in state.bases.items()}
      opt_state = spread(jax.tree.map(lambda new, old: jnp.where(fresh, new, old), tx.init(x), state.opt_state))

      new_x, new_opt, value = optimise_class(values_and_grads, tx, x, opt_state, targets, bases, variables,
                                             iterations=iterations_per_step)
      (new_x, new_opt), nonfinite = ktrain.skip_if_nonfinite(ktrain.all_finite(new_x, value), (new_x, new_opt),
                                                             (x, opt_state))
      new_state = state.replace(step=state.step + 1, inputs=state.inputs.at[cls].set(new_x), opt_state=new_opt)
      return new_state, {"objective": ktrain.mean_metric(value), "class": (cls.astype(jnp.float32), jnp.float32(1)),
                         "nonfinite": nonfinite}
    return step

  def batches(setup) -> Callable[[int], Iterator[dict]]:
    return lambda start_step: iter([{} for _ in range(start_step, setup.num_steps)])

  def evaluate(setup, state: ReconstructState) -> dict[str, Any]:
    meta, teacher = checked(setup)
    inputs = np.asarray(jax.device_get(state.inputs))
    num_classes = meta.num_classes
    x = inputs.reshape(num_classes * examples_per_class, *inputs.shape[2:])
    y = np.repeat(np.arange(num_classes, dtype=np.int32), examples_per_class)
    variables = setup.teacher_variables[0]
    logits = np.asarray(jax.jit(lambda v, x: models.apply_model(teacher, v, x, train=False).logits)(variables, x))
    result = {"teacher_agreement": float(np.mean(np.argmax(logits, -1) == y))}
    if kind != "noise":
      per_class = jax.jit(class_values_and_grads(per_example_objective(teacher, meta, kind)))
      start = initial_inputs(setup.config.seed, num_classes, examples_per_class, inputs.shape[2:],
                             init_mean=init_mean, init_std=init_std)
      final, initial = [], []
      host_targets, host_bases = jax.device_get((state.targets, state.bases))  # evaluated on the default device
      for c in range(num_classes):
        targets = {k: v[c] for k, v in host_targets.items()}
        bases = {k: v[c] for k, v in host_bases.items()}
        final.append(np.asarray(per_class(inputs[c], targets, bases, variables)[0]))
        initial.append(np.asarray(per_class(np.asarray(start[c]), targets, bases, variables)[0]))
      result["objective_initial"] = float(np.mean(initial))
      result["objective_final"] = float(np.mean(final))
    write_reconstruction(setup.workdir, x, y, teacher_logits=logits, kind=kind, metadata=metadata,
                         examples_per_class=examples_per_class)
    return result

  def stage_length(config, dataset, transfer_set) -> int:  # num_steps = 0: every class's iterations
    return reconstruct_num_steps(num_classes=loaded().num_classes, adam_steps=adam_steps,
                                 iterations_per_step=iterations_per_step)

  return ktrain.StageProgram(init_state, make_step, needs_teacher=True, evaluate=evaluate, batches=batches,
                             exports_model=False, stage_length=stage_length)


def write_reconstruction(workdir: str, x: np.ndarray, y: np.ndarray, *, teacher_logits: np.ndarray, kind: str,
                         metadata: str, examples_per_class: int, columns: int = 10) -> str:
  """Writes ``reconstructed.npz`` (``x_train``, ``y_train``, ``teacher_logits``; no test split: distil with
  ``config.test_dataset``) and the picture grid ``reconstructed.png`` (one row per class, the first
  ``columns`` examples, grey levels clipped to [0, 1])."""
  path = os.path.join(workdir, RECONSTRUCTED_FILE)
  tmp = path + ".tmp.npz"
  np.savez(tmp, x_train=x.astype(np.float32), y_train=y.astype(np.int32),
           teacher_logits=teacher_logits.astype(np.float32), kind=np.asarray(kind), metadata=np.asarray(metadata))
  os.replace(tmp, path)
  save_image_grid(os.path.join(workdir, RECONSTRUCTED_PNG), x, y, examples_per_class=examples_per_class,
                  columns=columns, title=f"data_free {kind}: inputs reconstructed per class (rows), clipped to [0, 1]")
  return path


def save_image_grid(path: str, x: np.ndarray, y: np.ndarray, *, examples_per_class: int, columns: int = 10,
                    title: str = "") -> None:
  """A PNG grid: one row per class of ``y``, its first ``columns`` images of ``x`` (NHWC, 1 or 3 channels;
  flat inputs of a square size are shown as squares), grey levels clipped to [0, 1], drawn as one mosaic."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  classes = np.unique(y)
  columns = min(columns, examples_per_class)
  tiles = [[_as_image(image) for image in x[y == c][:columns]] for c in classes]
  h, w = tiles[0][0].shape[:2]
  channels = tiles[0][0].shape[2:]
  gap = max(1, h // 14)
  mosaic = np.ones((len(classes) * (h + gap) + gap, columns * (w + gap) + gap, *channels), np.float32)
  for row, images in enumerate(tiles):
    for col, image in enumerate(images):
      top, left = gap + row * (h + gap), gap + col * (w + gap)
      mosaic[top:top + h, left:left + w] = image
  fig, ax = plt.subplots(figsize=(0.6 * columns + 1.0, 0.6 * len(classes) + 0.8))  # ~60 px a tile at 100 dpi
  ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([gap + row * (h + gap) + h / 2 for row in range(len(classes))], [str(int(c)) for c in classes])
  ax.set_ylabel("class")
  if title:
    ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _as_image(example: np.ndarray) -> np.ndarray:
  example = np.clip(np.asarray(example, np.float32), 0.0, 1.0)
  if example.ndim == 3 and example.shape[-1] == 1:
    return example[..., 0]
  if example.ndim == 3:
    return example
  side = int(round(math.sqrt(example.size)))
  return example.reshape(side, side) if side * side == example.size else example.reshape(1, -1)
