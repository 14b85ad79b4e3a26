"""Retrieval metrics on an open-set split: recall@k and mean average precision.

Metric-learning papers (DarkRank, person re-identification) judge an embedding by how well it ranks
examples of classes it never saw in training. :func:`retrieval_metrics` uses every example of the
retrieval set as a query against all the others (leave-one-out), ranked by Euclidean distance.

Ties. Distances that are exactly equal are never broken in the query's favour: a query counts as a
hit at ``k`` only when some same-class item is within the ``k`` nearest *however* ties are broken
(the first same-class item's rank is one plus the number of other-class items at a distance less
than or equal to its own), and the precision of a same-class item at distance ``d`` counts every item
at distance ``≤ d`` (the "one threshold per distinct distance" convention of scikit-learn's
``average_precision_score``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_metrics(embeddings, labels, *, ks: Sequence[int] = (1, 5), chunk_size: int = 1024
                      ) -> dict[str, float]:
  """Leave-one-out retrieval: each example queries all others, ranked by Euclidean distance.

  Args:
    embeddings: ``[n, dim]`` (any float array; computed in float64).
    labels: ``[n]`` integer class ids; every class needs at least 2 examples.
    ks: the ``k`` of each ``recall@k`` (the fraction of queries with a same-class item among the ``k``
      nearest, ties never broken in the query's favour; see the module docstring).
    chunk_size: queries per block of the distance matrix (bounds memory at ``chunk_size · n``).

  Returns:
    ``{"recall@k": ... for k in ks, "mAP": mean over queries of the average precision, "queries": n}``.

  Raises:
    ValueError: ``embeddings`` not 2-D, non-finite, or of another length than ``labels``; a ``k`` < 1; a
      class with a single example (its query could match nothing).
  """
  x = np.asarray(embeddings, np.float64)
  y = np.asarray(labels)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be [n, dim]; got shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"labels must be [n] with n = {x.shape[0]} (the embeddings' length); got shape {y.shape}")
  if not np.isfinite(x).all():
    raise ValueError("embeddings contain NaN or inf")
  if any(int(k) < 1 for k in ks):
    raise ValueError(f"every k of recall@k must be >= 1; got ks={tuple(ks)}")
  classes, counts = np.unique(y, return_counts=True)
  single = classes[counts < 2]
  if single.size:
    raise ValueError(f"class(es) {single.tolist()} have a single example in the retrieval set; each query needs "
                     "another example of its class (add examples or drop the class)")
  n = len(y)
  sq_norms = np.sum(x * x, axis=1)
  hits = {int(k): 0 for k in ks}
  ap_sum = 0.0
  for start in range(0, n, chunk_size):
    q = np.arange(start, min(start + chunk_size, n))
    dist = np.maximum(sq_norms[q, None] + sq_norms[None, :] - 2.0 * x[q] @ x.T, 0.0)  # squared: same order
    dist[np.arange(len(q)), q] = np.inf  # the query itself is never retrieved
    positive = y[q, None] == y[None, :]
    positive[np.arange(len(q)), q] = False
    order = np.argsort(dist, axis=1, kind="stable")
    d_sorted = np.take_along_axis(dist, order, axis=1)
    pos_sorted = np.take_along_axis(positive, order, axis=1)
    # The first same-class item, with every other-class item tied with it ranked before it.
    nearest_positive = np.where(positive, dist, np.inf).min(axis=1)
    first_hit_rank = 1 + np.sum(~positive & (dist <= nearest_positive[:, None]), axis=1)
    for k in hits:
      hits[k] += int(np.sum(first_hit_rank <= k))
    # Precision at a positive = positives at distance <= its own / items at distance <= its own, where
    # last_of_tie = how many items are at a distance <= the sorted item's own.
    last_of_tie = np.empty_like(order)
    for row in range(len(q)):
      last_of_tie[row] = np.searchsorted(d_sorted[row], d_sorted[row], side="right")
    cum_pos = np.cumsum(pos_sorted, axis=1)
    pos_within = np.take_along_axis(cum_pos, last_of_tie - 1, axis=1)
    precision = pos_within / last_of_tie
    ap_sum += float(np.sum(np.where(pos_sorted, precision, 0.0).sum(axis=1) / positive.sum(axis=1)))
  result = {f"recall@{k}": hits[k] / n for k in hits}
  result["mAP"] = ap_sum / n
  result["queries"] = n
  return result
