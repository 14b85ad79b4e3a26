"""Neuron selection (Luo, Zhu, Liu, Wang & Tang, "Face Model Compression by Distilling Knowledge from Neurons",
AAAI 2016; "MobileID").

The knowledge is the teacher's **top hidden layer**, not its soft labels: the student regresses a **selected
subset** of the teacher's post-ReLU neurons, chosen for being discriminative for identity-related attributes (IA),
not for identity-unrelated ones (NA), and not redundant with each other. PAPERS.md §4 gives the sources. The
authors released only the deployed student (``liuziwei7/mobile-id``: a Caffe prototxt whose last layer ``ip3`` has
422 outputs followed by a ReLU); no training or selection code. What comes from where, part by part:

* Knowledge = top hidden layer [abstract]; regression onto the selected **post-ReLU** neurons through a ReLU
  output [released prototxt: ``ip3`` (422) + ReLU]: :func:`selected_neuron_loss`,
  ``½ Σ_k (relu(s_k) − h_T[S_k])²`` per example (the ``1/(2N) Σ_n ‖·‖²`` of PAPERS.md §4(a) is its batch mean)
  [reconstruction: the exact loss is not in the released code].
* Per-neuron discriminativeness: how well a single neuron's activation classifies one binary attribute, measured
  as the ROC AUC on data the teacher was not trained on (:func:`neuron_auc`, rank-based, ties averaged)
  [reconstruction: the paper's exact measure is not recovered; AUC is threshold-free and needs no fitted
  classifier].
* Unary term: ``u_i = mean_IA d_i − na_weight · mean_NA d_i`` with the folded discriminativeness
  ``d = 2·|AUC − 0.5|`` (:func:`unary_scores`) [reconstruction]. PAPERS.md §4(e) writes ``mean AUC_IA − mean
  AUC_NA`` on the raw AUC; kdjax folds it because a neuron that is *silenced* by an attribute (AUC < 0.5: the
  project page's "inhibitive" pattern) carries as much information as one that fires for it, and the raw form
  would score it below a dead neuron.
* Pairwise term ``w_ij = |corr(h_i, h_j)|`` (:func:`correlation_penalty`) [reconstruction, PAPERS.md §4(e)].
* Selection = the K neurons of highest marginal after **mean-field** inference on the binary energy
  (:func:`mean_field_select`) [abstract: mean field; the energy's exact form and weights are a reconstruction];
  the ablation takes the top-K unary scores (:func:`top_k_select`), the control a random subset
  (:func:`random_select`).
* Attributes [reconstruction, PAPERS.md §4(e)]: no face attributes offline, so on MNIST the IA are the 10
  one-vs-rest digit indicators and the NA are image properties computed from the pixels
  (:func:`pixel_attributes`: ink mass, centroid x, centroid y, slant, each binarised at its median over the
  selection set). These NA are not independent of the digit (a "1" has little ink): they are nuisance-*like*,
  not nuisance-free.
* Evaluation [reconstruction; the paper verifies faces on LFW with Joint Bayesian]: the student's feature is
  judged by nearest-class-mean and a ridge linear probe (fitted on the training split, measured on the test
  split) and by verification pair accuracy (cosine similarity of test pairs, threshold chosen on training pairs):
  :func:`feature_metrics`.

Two stages:

* ``neuron_selection_select`` (:func:`make_select_program`; needs the teacher, exports no model): one pass over the
  examples the teacher did not train on (the transfer set's unlabelled part; every example when all are
  labelled), recording the teacher's top hidden layer and the attributes; ``evaluate`` writes ``selection.npz``
  (indices, unary scores, AUCs, marginals, the correlation matrix, the mode) into the work directory.
* ``neuron_selection`` (:func:`make_student_program`): the shared distillation step with the teacher run live for
  its ``teacher_feature``; the student regresses the neurons of ``selection`` (a ``selection.npz``;
  ``"@select_meanfield/selection.npz"`` in a reproduce protocol), of ``selection_mode='all'`` or ``'random'``
  (no file), and/or matches soft labels (``kd_weight``, Hinton's ``T²·KL``, the soft-label KD baseline evaluated
  the same way). Its ``evaluate`` adds the feature metrics above.

Everything up to the stage programs is a pure function of arrays (jit-ready). The feature evaluations (the
teacher's in the selection stage, the student's) read whole splits in one process and gather nothing across hosts.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import check_positive, unknown_name
from kdjax.methods.objective import Objective
from kdjax.methods.soft_targets import soft_target_loss

SELECTION_FILE = "selection.npz"
SELECT_MODES = ("mean_field", "top_k")
STUDENT_MODES = ("file", "all", "random", "none")
NA_ATTRIBUTES = ("ink_mass", "centroid_x", "centroid_y", "slant")


# --- per-neuron statistics -------------------------------------------------------------------------------------


def _check_binary_attribute(attribute, name: str = "attribute") -> None:
  if isinstance(attribute, jax.core.Tracer):
    return  # under jit: a single-class attribute gives NaN instead of an error
  values = np.asarray(attribute).astype(bool)
  positives = int(values.sum())
  if positives == 0 or positives == values.size:
    raise ValueError(f"{name} has a single class ({positives} positive of {values.size} examples), so the AUC is "
                     "undefined; drop this attribute or measure it on examples where both values occur")


def neuron_auc(activations: jax.Array, attribute: jax.Array) -> jax.Array:
  """ROC AUC of each neuron as a one-neuron classifier of a binary attribute: ``[n, d], [n] -> [d]``.

  The Mann–Whitney form: ``(R_pos − n_pos (n_pos + 1) / 2) / (n_pos · n_neg)`` with ``R_pos`` the sum of the
  positives' ranks, tied activations sharing their average rank (so a tie counts ½, as scikit-learn's
  ``roc_auc_score``). A dead neuron (constant) scores 0.5.

  Args:
    activations: ``[n, d]`` activations of ``d`` neurons on ``n`` examples.
    attribute: ``[n]`` booleans (or 0/1); both values must occur (checked when not traced; NaN under jit).

  Returns:
    ``[d]`` float32 AUCs in [0, 1].
  """
  if activations.ndim != 2 or attribute.shape != activations.shape[:1]:
    raise ValueError(f"neuron_auc expects activations [n, d] and attribute [n]; got {tuple(activations.shape)} and "
                     f"{tuple(attribute.shape)}")
  _check_binary_attribute(attribute)
  acts = jnp.asarray(activations, jnp.float32)
  positive = jnp.asarray(attribute).astype(jnp.float32)
  n_pos = jnp.sum(positive)
  n_neg = acts.shape[0] - n_pos

  def column_ranks(column):
    ordered = jnp.sort(column)
    below = jnp.searchsorted(ordered, column, side="left")
    through = jnp.searchsorted(ordered, column, side="right")
    return (below + through + 1).astype(jnp.float32) / 2.0  # 1-based average rank of the tie group

  ranks = jax.vmap(column_ranks, in_axes=1, out_axes=1)(acts)
  rank_sum = positive @ ranks
  return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def neuron_aucs(activations: jax.Array, attributes: jax.Array) -> jax.Array:
  """:func:`neuron_auc` for several attributes: ``[n, d], [n, a] -> [a, d]``."""
  if attributes.ndim != 2 or attributes.shape[0] != activations.shape[0]:
    raise ValueError(f"neuron_aucs expects attributes [n, a] with n = {activations.shape[0]} (the activations' "
                     f"examples); got {tuple(attributes.shape)}")
  for j in range(attributes.shape[1]):
    if not isinstance(attributes, jax.core.Tracer):
      _check_binary_attribute(attributes[:, j], f"attribute {j}")
  return jax.vmap(neuron_auc, in_axes=(None, 1))(activations, attributes)


def unary_scores(auc_ia: jax.Array, auc_na: jax.Array, *, na_weight: float = 1.0) -> jax.Array:
  """Unary score of each neuron: ``[a, d], [b, d] -> [d]``.

  ``u_i = mean_a 2|AUC_ia − ½| − na_weight · mean_b 2|AUC_ib − ½|``: discriminative for identity-related
  attributes, not for identity-unrelated ones. ``2|AUC − ½|`` is folded so that a neuron silenced by an attribute
  counts like one that fires for it (module docstring); ``b = 0`` NA attributes (``auc_na`` of shape ``[0, d]``)
  leaves the IA term alone.
  """
  if auc_ia.ndim != 2 or auc_na.ndim != 2 or auc_ia.shape[1] != auc_na.shape[1] or auc_ia.shape[0] == 0:
    raise ValueError(f"unary_scores expects auc_ia [a >= 1, d] and auc_na [b, d] with the same d; got "
                     f"{tuple(auc_ia.shape)} and {tuple(auc_na.shape)}")
  ia = jnp.mean(2 * jnp.abs(auc_ia - 0.5), axis=0)
  na = jnp.mean(2 * jnp.abs(auc_na - 0.5), axis=0) if auc_na.shape[0] else jnp.zeros_like(ia)
  return ia - na_weight * na


def correlation_penalty(activations: jax.Array) -> jax.Array:
  """``w_ij = |corr(h_i, h_j)|`` with a zero diagonal: ``[n, d] -> [d, d]``.

  A constant (dead) neuron has no correlation: its row and column are 0 (not NaN).
  """
  if activations.ndim != 2:
    raise ValueError(f"correlation_penalty expects activations [n, d]; got shape {tuple(activations.shape)}")
  acts = jnp.asarray(activations, jnp.float32)
  centred = acts - jnp.mean(acts, axis=0)
  std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=0))
  alive = std > 1e-6
  normed = jnp.where(alive, centred / jnp.where(alive, std, 1.0), 0.0)
  corr = jnp.abs(normed.T @ normed) / acts.shape[0]
  return corr * (1.0 - jnp.eye(acts.shape[1], dtype=corr.dtype))


def _check_num_selected(num_selected, num_neurons: int) -> None:
  if not (isinstance(num_selected, int | np.integer) and not isinstance(num_selected, bool)
          and 1 <= num_selected <= num_neurons):
    raise ValueError(f"num_selected must be an integer in [1, {num_neurons}] (the layer has {num_neurons} neurons); "
                     f"got {num_selected!r}. Select fewer neurons or use a wider teacher layer")


def top_k_select(unary: jax.Array, *, num_selected: int) -> jax.Array:
  """The ``num_selected`` neurons of highest ``unary`` score, best first: ``[d] -> [K]`` int32.

  Ties are broken by the lower index (a stable sort of ``−unary``), so the selection is deterministic.
  """
  _check_num_selected(num_selected, unary.shape[-1])
  return jnp.argsort(-unary, stable=True)[:num_selected].astype(jnp.int32)


def random_select(rng: jax.Array, num_neurons: int, *, num_selected: int) -> jax.Array:
  """``num_selected`` distinct neurons drawn uniformly with ``rng``: ``[K]`` int32 (the control)."""
  _check_num_selected(num_selected, num_neurons)
  return jax.random.permutation(rng, num_neurons)[:num_selected].astype(jnp.int32)


def mean_field_marginals(unary: jax.Array, pairwise: jax.Array, *, num_selected: int, weight: float = 1.0,
                         temperature: float = 0.05, iters: int = 30) -> jax.Array:
  """Mean-field marginals ``q_i ≈ P(y_i = 1)`` of the selection energy: ``[d], [d, d] -> [d]``.

  Energy of a binary selection ``y ∈ {0, 1}^d`` [reconstruction; PAPERS.md §4(a)]::

    E(y) = −Σ_i (u_i − b) y_i + (λ / K) Σ_{i<j} w_ij y_i y_j,     P(y) ∝ exp(−E(y) / τ)

  ``b`` is the midpoint of the K-th and (K+1)-th largest unary scores (so that, before the pairwise term, exactly
  the top-K have a positive field); ``λ / K`` makes λ the weight of a neuron's mean correlation with a selected
  set of K. The fixed point ``q_i = sigmoid((u_i − b − (λ/K) Σ_{j≠i} w_ij q_j) / τ)`` is found by **sequential**
  (Gauss–Seidel) updates, starting from ``q = 0`` (nothing selected) and visiting the neurons in descending unary
  order (ties: lower index first), so that the first sweep is a soft greedy pass in which a strong neuron claims
  its place before its weaker correlated twins; later sweeps refine. Each update minimises the mean-field free
  energy in ``q_i`` with the others fixed, so unlike parallel updates it cannot oscillate. (Starting from the
  top-K indicator in index order instead lets whichever twin comes first in index order drop out.)

  Args:
    unary: ``[d]`` scores (:func:`unary_scores`).
    pairwise: ``[d, d]`` symmetric non-negative penalties with a zero diagonal (:func:`correlation_penalty`).
    num_selected: K.
    weight: λ ≥ 0 (0 = the top-K unary selection).
    temperature: τ > 0, in units of the unary score.
    iters: sweeps over all neurons.
  """
  d = unary.shape[-1]
  _check_num_selected(num_selected, d)
  if pairwise.shape != (d, d):
    raise ValueError(f"pairwise must be [d, d] = [{d}, {d}] to match unary; got {tuple(pairwise.shape)}")
  check_positive("temperature", temperature)
  if not isinstance(weight, jax.core.Tracer) and not weight >= 0:
    raise ValueError(f"weight (lambda, the pairwise penalty) must be >= 0; got {weight!r}")
  unary = jnp.asarray(unary, jnp.float32)
  ordered = jnp.sort(unary)[::-1]
  bias = (ordered[num_selected - 1] + ordered[min(num_selected, d - 1)]) / 2 if num_selected < d else ordered[-1] - 1
  coupling = jnp.asarray(pairwise, jnp.float32) * (weight / num_selected)
  visit = jnp.argsort(-unary, stable=True)

  def update(t, q):
    i = visit[t % d]
    field = unary[i] - bias - coupling[i] @ q  # the diagonal is zero, so q_i does not act on itself
    return q.at[i].set(jax.nn.sigmoid(field / temperature))

  return jax.lax.fori_loop(0, iters * d, update, jnp.zeros(d, jnp.float32))


def mean_field_select(unary: jax.Array, pairwise: jax.Array, *, num_selected: int, weight: float = 1.0,
                      temperature: float = 0.05, iters: int = 30) -> tuple[jax.Array, jax.Array]:
  """The K neurons of highest mean-field marginal, best first, and the marginals: ``([K] int32, [d])``.

  :func:`mean_field_marginals`; ties between marginals (e.g. several saturated at 1) are broken by the higher
  unary score, then the lower index, so the selection is deterministic.
  """
  q = mean_field_marginals(unary, pairwise, num_selected=num_selected, weight=weight, temperature=temperature,
                           iters=iters)
  order = jnp.lexsort((jnp.arange(q.shape[0]), -jnp.asarray(unary, jnp.float32), -q))
  return order[:num_selected].astype(jnp.int32), q


# --- attributes ------------------------------------------------------------------------------------------------


def pixel_attributes(images: np.ndarray) -> np.ndarray:
  """Continuous nuisance-like properties of grey images: ``[n, h, w, 1] -> [n, 4]`` (:data:`NA_ATTRIBUTES`).

  ink mass (sum of intensities), centroid x and y (intensity-weighted, in pixels), slant (the covariance of x and
  y over the y variance: how far x moves per row). They are binarised at their median over the selection set.
  """
  x = np.asarray(images, np.float64).reshape(images.shape[0], images.shape[1], -1)
  mass = x.sum(axis=(1, 2))
  safe = np.maximum(mass, 1e-9)
  rows, cols = np.arange(x.shape[1], dtype=np.float64), np.arange(x.shape[2], dtype=np.float64)
  cy = np.einsum("nhw,h->n", x, rows) / safe
  cx = np.einsum("nhw,w->n", x, cols) / safe
  dy, dx = rows[None, :, None] - cy[:, None, None], cols[None, None, :] - cx[:, None, None]
  var_y = np.sum(x * dy ** 2, axis=(1, 2)) / safe
  cov = np.sum(x * dy * dx, axis=(1, 2)) / safe
  slant = -cov / np.maximum(var_y, 1e-9)  # rows grow downwards: a top-right lean has x falling with the row
  return np.stack([mass, cx, cy, slant], axis=1).astype(np.float32)


def binarize_at_median(values: np.ndarray) -> np.ndarray:
  """``values > median`` per column: ``[n, b] -> [n, b]`` bool."""
  return np.asarray(values) > np.median(values, axis=0, keepdims=True)


# --- the student's loss and feature metrics ---------------------------------------------------------------------


def selected_neuron_loss(student_feature: jax.Array, teacher_feature: jax.Array, indices: jax.Array) -> jax.Array:
  """Per-example regression onto the selected teacher neurons: ``[B, K], [B, d], [K] -> [B]``.

  ``½ Σ_k (relu(s_k) − h_T[S_k])²``: the student's output goes through a ReLU (the released student's ``ip3`` +
  ReLU) because the targets are post-ReLU; a linear output would spend capacity regressing exact zeros.
  """
  student = student_feature.reshape(student_feature.shape[0], -1)
  teacher = teacher_feature.reshape(teacher_feature.shape[0], -1)
  if student.shape[1] != indices.shape[0]:
    raise ValueError(f"the student's feature has {student.shape[1]} units but {indices.shape[0]} teacher neurons are "
                     "selected; give the student's feature layer as many units as num_selected (equal size)")
  target = jax.lax.stop_gradient(jnp.take(teacher, indices, axis=1))
  return 0.5 * jnp.sum(jnp.square(jax.nn.relu(student) - target), axis=-1)


def verification_pairs(labels: np.ndarray, *, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``num_pairs`` index pairs of distinct examples, half of one class and half of two: ``([P, 2], [P] bool)``."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
  classes = [c for c, idx in by_class.items() if len(idx) >= 2]
  same = []
  for c in rng.choice(classes, size=num_pairs // 2):
    same.append(rng.choice(by_class[c], size=2, replace=False))
  different = []
  while len(different) < num_pairs - num_pairs // 2:
    i, j = rng.choice(len(labels), size=2, replace=False)
    if labels[i] != labels[j]:
      different.append((i, j))
  pairs = np.concatenate([np.asarray(same).reshape(-1, 2), np.asarray(different).reshape(-1, 2)])
  return pairs, labels[pairs[:, 0]] == labels[pairs[:, 1]]


def _cosine(features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  return np.sum(f[pairs[:, 0]] * f[pairs[:, 1]], axis=1)


def feature_metrics(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                    test_labels: np.ndarray, *, num_pairs: int = 2000, pair_seed: int = 0,
                    ridge: float = 1.0) -> dict[str, float]:
  """How good a feature is, fitted on the training split and measured on the test split.

  * ``ncm_accuracy``: nearest class mean (Euclidean) with the training split's class means;
  * ``probe_accuracy``: a ridge regression of one-hot labels on the standardised features (closed form, ``ridge``
    times the identity), argmax;
  * ``verification_accuracy``: ``num_pairs`` test pairs (half same-class), same iff the cosine similarity reaches
    the threshold that is most accurate on ``num_pairs`` training pairs (the midpoint of the margin it leaves).
  """
  train_x = np.asarray(train_features, np.float64).reshape(len(train_labels), -1)
  test_x = np.asarray(test_features, np.float64).reshape(len(test_labels), -1)
  train_y, test_y = np.asarray(train_labels), np.asarray(test_labels)
  classes = np.unique(train_y)
  means = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
  distances = ((test_x[:, None, :] - means[None]) ** 2).sum(-1)
  ncm = float(np.mean(classes[np.argmin(distances, axis=1)] == test_y))
  mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  design = np.concatenate([(train_x - mu) / sd, np.ones((len(train_x), 1))], axis=1)
  onehot = (train_y[:, None] == classes[None]).astype(np.float64)
  weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ onehot)
  test_design = np.concatenate([(test_x - mu) / sd, np.ones((len(test_x), 1))], axis=1)
  probe = float(np.mean(classes[np.argmax(test_design @ weights, axis=1)] == test_y))
  train_pairs, train_same = verification_pairs(train_y, num_pairs=num_pairs, seed=pair_seed)
  test_pairs, test_same = verification_pairs(test_y, num_pairs=num_pairs, seed=pair_seed + 1)
  train_sim = _cosine(train_x, train_pairs)
  candidates = np.unique(train_sim)
  accuracy = [np.mean((train_sim >= t) == train_same) for t in candidates]
  best = int(np.argmax(accuracy))  # "same iff sim >= candidates[best]": any threshold in (previous, best] does it
  threshold = (candidates[best - 1] + candidates[best]) / 2 if best else candidates[0]
  verification = float(np.mean((_cosine(test_x, test_pairs) >= threshold) == test_same))
  return {"ncm_accuracy": ncm, "probe_accuracy": probe, "verification_accuracy": verification}


# --- the selection stage ---------------------------------------------------------------------------------------


class SelectState(flax.struct.PyTreeNode):
  """The selection pass's state: the rows recorded so far (``step`` batches of them).

  Attributes:
    step: int32 scalar, batches recorded.
    activations: ``[rows, d]`` the teacher's top hidden layer, ``rows`` = steps × batch size (padding included).
    labels: ``[rows]`` the class labels (the IA attributes are their one-vs-rest indicators).
    nuisance: ``[rows, 4]`` the continuous pixel properties of :func:`pixel_attributes` (the NA attributes once
      binarised at their median).
    weight: ``[rows]`` 1 for a real example, 0 for padding.
  """
  step: jax.Array
  activations: jax.Array
  labels: jax.Array
  nuisance: jax.Array
  weight: jax.Array


def default_select_config() -> dict[str, Any]:
  return {"mode": "mean_field", "num_selected": 64, "teacher_feature": "hidden_1", "pairwise_weight": 1.0,
          "temperature": 0.05, "iters": 30, "na_weight": 1.0}


def selection_positions(label_mask: np.ndarray) -> np.ndarray:
  """The transfer-set positions the selection pass reads: the unlabelled ones (the teacher never trained on them
  when it was trained on the labelled part), or all of them when every example is labelled."""
  held_out = np.flatnonzero(np.asarray(label_mask) == 0)
  return held_out if held_out.size else np.arange(len(label_mask))


def make_select_program(*, mode: str, num_selected: int, teacher_feature: str, pairwise_weight: float,
                        temperature: float, iters: int, na_weight: float):
  """The selection stage (needs the teacher; exports no model): see the module docstring.

  ``num_steps = 0`` (default in the paper configs) makes the stage one pass, ``ceil(examples / batch_size)`` steps
  over the examples of :func:`selection_positions`, the last batch padded with weight-0 rows; a given ``num_steps``
  must be that or ``floor`` (the remainder is left out).
  """
  from kdjax import data as kdata
  from kdjax import models, parallel
  from kdjax import train as ktrain

  if mode not in SELECT_MODES:
    raise unknown_name("mode", mode, SELECT_MODES)
  if not (isinstance(num_selected, int) and num_selected >= 1):
    raise ValueError(f"num_selected must be an integer >= 1; got {num_selected!r}")
  check_positive("temperature", temperature)

  def positions(setup) -> np.ndarray:
    found = selection_positions(setup.transfer_set.label_mask)
    batch = setup.config.batch_size
    whole, needed = max(len(found) // batch, 1), -(-len(found) // batch)
    if not whole <= setup.num_steps <= needed:
      raise ValueError(f"the selection pass reads {len(found)} examples in batches of {batch}, so num_steps must be "
                       f"{needed} (or {whole}: num_epochs=1, the last partial batch left out); got "
                       f"{setup.num_steps}. Set --config.num_steps={needed}")
    return found[:setup.num_steps * batch]

  def width(setup) -> int:
    if len(setup.teacher_models) != 1:
      raise ValueError(f"neuron_selection_select takes one teacher; got {len(setup.teacher_models)}")
    out = jax.eval_shape(lambda v, x: models.apply_model(setup.teacher_models[0], v, x, train=False,
                                                         features=(teacher_feature,)).features[teacher_feature],
                         setup.teacher_variables[0], setup.example)
    d = int(np.prod(out.shape[1:]))
    _check_num_selected(num_selected, d)
    return d

  def init_state(setup) -> SelectState:
    rows = setup.num_steps * setup.config.batch_size
    positions(setup)
    d = width(setup)
    return SelectState(step=jnp.zeros((), jnp.int32), activations=jnp.zeros((rows, d), jnp.float32),
                       labels=jnp.zeros((rows,), jnp.int32), nuisance=jnp.zeros((rows, len(NA_ATTRIBUTES))),
                       weight=jnp.zeros((rows,), jnp.float32))

  def make_step(setup) -> Callable:
    teacher = setup.teacher_models[0]
    batch_size = setup.config.batch_size

    def step(state: SelectState, batch, teacher_variables=()):
      out = models.apply_model(teacher, teacher_variables[0], batch["image"], train=False,
                               features=(teacher_feature,))
      acts = out.features[teacher_feature].reshape(batch_size, -1).astype(jnp.float32)
      start = state.step * batch_size
      put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=start, axis=0)
      new = state.replace(step=state.step + 1, activations=put(state.activations, acts),
                          labels=put(state.labels, batch["label"]), nuisance=put(state.nuisance, batch["nuisance"]),
                          weight=put(state.weight, batch["weight"]))
      new, nonfinite = ktrain.skip_if_nonfinite(ktrain.all_finite(acts), new, state.replace(step=state.step + 1))
      return new, {"examples": (jnp.sum(batch["weight"]), jnp.float32(1.0)), "nonfinite": nonfinite}
    return step

  def batches(setup) -> Callable[[int], Iterator[dict]]:
    found, transfer, batch_size = positions(setup), setup.transfer_set, setup.config.batch_size
    host = parallel.process_slice(batch_size)

    def host_batch(step: int) -> dict[str, np.ndarray]:
      idx = np.arange(step * batch_size, (step + 1) * batch_size)[host]  # this process's part of the batch
      valid = idx < len(found)
      images, labels = transfer.split.get(transfer.indices[found[np.minimum(idx, len(found) - 1)]])
      images = np.asarray(images, np.float32)
      return {"image": images, "label": np.asarray(labels, np.int32), "nuisance": pixel_attributes(images),
              "weight": valid.astype(np.float32)}

    def source(start_step: int) -> Iterator[dict]:
      return kdata.prefetch((host_batch(s) for s in range(start_step, setup.num_steps)),
                            functools.partial(parallel.shard_batch, mesh=setup.mesh))
    return source

  def teacher_features(setup, split) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's whole ``teacher_feature`` on a split, and its labels (the reference the students aim at)."""
    batch_size = -(-setup.config.eval_batch_size // setup.mesh.size) * setup.mesh.size
    embed = jax.jit(lambda v, x: models.apply_model(setup.teacher_models[0], v, x, train=False, features=(
        teacher_feature,)).features[teacher_feature].reshape(x.shape[0], -1))
    chunks = [np.asarray(embed(setup.teacher_variables[0], parallel.shard_batch({"image": b["image"]},
                                                                               setup.mesh)["image"]))
              for b in kdata.eval_batches(split, batch_size=batch_size)]
    return np.concatenate(chunks)[:len(split)], np.asarray(split.labels)

  def evaluate(setup, state: SelectState) -> dict[str, Any]:
    host = jax.device_get(state)
    if int(host.step) == 0:
      return {}
    keep = np.asarray(host.weight) > 0
    acts, labels = np.asarray(host.activations)[keep], np.asarray(host.labels)[keep]
    ia = labels[:, None] == np.arange(setup.dataset.num_classes)[None]
    na = binarize_at_median(np.asarray(host.nuisance)[keep])
    for j in range(ia.shape[1]):  # named here: under jit a single-class attribute would only give NaN
      _check_binary_attribute(ia[:, j], f"IA attribute 'class {j} vs rest' on the selection set")
    for j, name in enumerate(NA_ATTRIBUTES):
      _check_binary_attribute(na[:, j], f"NA attribute {name!r} (above its median) on the selection set")
    auc_ia = np.asarray(jax.jit(neuron_aucs)(acts, ia))
    auc_na = np.asarray(jax.jit(neuron_aucs)(acts, na))
    unary = np.asarray(unary_scores(auc_ia, auc_na, na_weight=na_weight))
    pairwise = np.asarray(correlation_penalty(acts))
    if mode == "mean_field":
      indices, marginals = mean_field_select(unary, pairwise, num_selected=num_selected, weight=pairwise_weight,
                                             temperature=temperature, iters=iters)
    else:
      indices, marginals = top_k_select(unary, num_selected=num_selected), jnp.asarray(unary)
    indices = np.asarray(indices)
    np.savez(os.path.join(setup.workdir, SELECTION_FILE), indices=indices, mode=np.asarray(mode),
             unary=unary, marginals=np.asarray(marginals), auc_ia=auc_ia, auc_na=auc_na, pairwise=pairwise,
             na_attributes=np.asarray(NA_ATTRIBUTES), teacher_feature=np.asarray(teacher_feature),
             examples=np.asarray(int(keep.sum())))
    chosen = pairwise[np.ix_(indices, indices)]
    teacher_metrics = feature_metrics(*teacher_features(setup, setup.dataset.train),
                                      *teacher_features(setup, setup.dataset.test))
    return {**{f"teacher_{k}": v for k, v in teacher_metrics.items()},
            "selected_unary_mean": float(unary[indices].mean()),
            "selected_abs_corr_mean": float(chosen.sum() / max(num_selected * (num_selected - 1), 1)),
            "layer_abs_corr_mean": float(pairwise.sum() / (len(unary) * (len(unary) - 1))),
            "dead_neurons": float(np.sum(acts.std(axis=0) <= 1e-6)), "examples": float(keep.sum())}

  def stage_length(config, dataset, transfer_set) -> int:
    del dataset
    return -(-len(selection_positions(transfer_set.label_mask)) // config.batch_size)

  return ktrain.StageProgram(init_state, make_step, needs_teacher=True, evaluate=evaluate, batches=batches,
                             exports_model=False, stage_length=stage_length)


# --- the student stage -----------------------------------------------------------------------------------------


def default_student_config() -> dict[str, Any]:
  return {"selection": "", "selection_mode": "file", "num_selected": 64, "selection_seed": 0,
          "student_feature": "hidden_1", "teacher_feature": "hidden_1", "regression_weight": 1.0,
          "kd_weight": 0.0, "temperature": 4.0, "num_pairs": 2000}


def load_selection(path: str) -> np.ndarray:
  """The ``indices`` of a ``selection.npz`` written by the selection stage (int32 ``[K]``)."""
  if path.startswith("@"):
    raise ValueError(f"selection={path!r} refers to an earlier protocol variant's folder, which only "
                     "`kdjax reproduce` resolves; with `kdjax train` give the file itself, e.g. "
                     "--config.loss.selection=runs/ns/select_meanfield/selection.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"selection={path!r} does not exist; run the neuron_selection_select stage first (it "
                            f"writes {SELECTION_FILE} into its work directory)")
  with np.load(path) as f:
    return np.asarray(f["indices"], np.int32)


def make_student_program(*, selection: str, selection_mode: str, num_selected: int, selection_seed: int,
                         student_feature: str, teacher_feature: str, regression_weight: float, kd_weight: float,
                         temperature: float, num_pairs: int):
  """The student stage: the shared step regressing the selected neurons (and/or soft labels), plus feature metrics.

  ``selection_mode``: ``'file'`` (the ``indices`` of ``selection``), ``'all'`` (every neuron of the teacher's
  ``teacher_feature``), ``'random'`` (``num_selected`` drawn with ``selection_seed``), ``'none'`` (no regression:
  soft-label KD alone, ``kd_weight > 0``). Per example: ``regression_weight · ½‖relu(s) − h_T[S]‖² + kd_weight ·
  T²·KL(softmax(t/T) ‖ softmax(z/T))``.
  """
  from kdjax import data as kdata
  from kdjax import models, parallel
  from kdjax import train as ktrain

  if selection_mode not in STUDENT_MODES:
    raise unknown_name("selection_mode", selection_mode, STUDENT_MODES)
  if selection_mode == "file" and not selection:
    raise ValueError("selection_mode='file' needs selection=PATH (a selection.npz of the neuron_selection_select "
                     "stage); or use selection_mode='all' | 'random'")
  if selection_mode == "none" and not kd_weight > 0:
    raise ValueError("selection_mode='none' regresses no neurons, so kd_weight must be > 0 (soft-label KD); got "
                     f"{kd_weight!r}")
  check_positive("temperature", temperature)
  if regression_weight < 0 or kd_weight < 0:
    raise ValueError(f"regression_weight and kd_weight must be >= 0; got {regression_weight!r}, {kd_weight!r}")
  regress = selection_mode != "none" and regression_weight > 0
  cache: dict[int, jax.Array] = {}

  def indices_for(teacher_width: int) -> jax.Array:
    if teacher_width not in cache:
      if selection_mode == "file":
        chosen = load_selection(selection)
        if chosen.size and chosen.max() >= teacher_width:
          raise ValueError(f"selection {selection!r} names neuron {int(chosen.max())}, but the teacher's "
                           f"{teacher_feature!r} has {teacher_width}; select with the same teacher")
      elif selection_mode == "all":
        chosen = np.arange(teacher_width, dtype=np.int32)
      else:
        chosen = np.asarray(random_select(jax.random.PRNGKey(selection_seed), teacher_width,
                                          num_selected=num_selected))
      cache[teacher_width] = jnp.asarray(chosen)
    return cache[teacher_width]

  def fn(student, teacher, batch, progress):
    del progress
    loss = jnp.zeros(student.logits.shape[:1], jnp.float32)
    extras = {}
    if regress:
      hidden = teacher.features[teacher_feature].reshape(student.logits.shape[0], -1)
      regression = selected_neuron_loss(student.features[student_feature], hidden, indices_for(hidden.shape[1]))
      loss, extras["regression"] = loss + regression_weight * regression, regression
    if kd_weight > 0:
      kd = soft_target_loss(student.logits, teacher.logits, temperature=temperature)
      loss, extras["kd"] = loss + kd_weight * kd, kd
    return loss, extras

  objective = Objective(fn, needs_teacher=True, student_features=(student_feature,) if regress else (),
                        teacher_features=(teacher_feature,) if regress else ())
  base = ktrain.objective_program(objective)

  def init_state(setup):
    if regress:  # a missing or mismatched selection file fails here, before any step
      out = jax.eval_shape(lambda v, x: models.apply_model(setup.teacher_models[0], v, x, train=False,
                                                           features=(teacher_feature,)).features[teacher_feature],
                           setup.teacher_variables[0], setup.example)
      indices_for(int(np.prod(out.shape[1:])))
    return base.init_state(setup)

  def features_of(setup, state, split) -> np.ndarray:
    batch_size = -(-setup.config.eval_batch_size // setup.mesh.size) * setup.mesh.size

    @jax.jit
    def embed(params, batch_stats, images):
      variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
      out = models.apply_model(setup.student, variables, images, train=False, features=(student_feature,))
      return jax.nn.relu(out.features[student_feature].reshape(images.shape[0], -1))

    chunks = [np.asarray(embed(state.params, state.batch_stats,
                               parallel.shard_batch({"image": b["image"]}, setup.mesh)["image"]))
              for b in kdata.eval_batches(split, batch_size=batch_size)]
    return np.concatenate(chunks)[:len(split)]

  def evaluate(setup, state) -> dict[str, Any]:
    train, test = setup.dataset.train, setup.dataset.test
    return feature_metrics(features_of(setup, state, train), np.asarray(train.labels),
                           features_of(setup, state, test), np.asarray(test.labels), num_pairs=num_pairs)

  return ktrain.StageProgram(init_state, base.make_step, needs_teacher=True,
                             cacheable_teacher=base.cacheable_teacher, evaluate=evaluate)
