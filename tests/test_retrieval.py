"""Leave-one-out retrieval metrics: a hand-computed example with ties, scikit-learn's AP, errors."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from kdjax.retrieval import retrieval_metrics


def test_hand_computed_example_with_ties():
  # Points on a line: a@0, a@1, b@1, b@3. From the first point, a@1 and b@1 tie at distance 1, so the
  # same-class a@1 has the pessimistic rank 2 (no hit at k = 1) and precision 1/2.
  #   query a@0: ranks a@1 -> 2;            AP 1/2
  #   query a@1: b@1 (0), a@0 (1), b@3 (2): AP 1/2
  #   query b@1: a@1 (0), a@0 (1), b@3 (2): AP 1/3, first hit at rank 3
  #   query b@3: a@1, b@1 tie at 2, a@0 3:  AP 1/2, hit at rank 2
  x = np.array([[0.0], [1.0], [1.0], [3.0]])
  y = np.array([0, 0, 1, 1])
  got = retrieval_metrics(x, y, ks=(1, 2, 3))
  assert got["recall@1"] == 0.0
  assert got["recall@2"] == 0.75
  assert got["recall@3"] == 1.0
  np.testing.assert_allclose(got["mAP"], (1 / 2 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
  assert got["queries"] == 4


def test_perfect_embedding_scores_one_even_when_same_class_items_tie():
  x = np.array([[0.0, 0.0], [0.5, 0.0], [4.0, 4.0], [4.0, 4.5], [4.5, 4.0]])  # from (4, 4): two class-7 at 0.5
  got = retrieval_metrics(x, [3, 3, 7, 7, 7])
  assert got == {"recall@1": 1.0, "recall@5": 1.0, "mAP": 1.0, "queries": 5}


def test_map_equals_scikit_learn_average_precision_on_a_tie_heavy_grid():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, (60, 2)).astype(np.float32)  # many exactly equal distances
  y = rng.integers(0, 5, 60)
  want = []
  for i in range(60):
    others = np.arange(60) != i
    want.append(average_precision_score(y[others] == y[i], -np.linalg.norm(x[others] - x[i], axis=1)))
  got = retrieval_metrics(x, y, chunk_size=7)  # several query blocks
  np.testing.assert_allclose(got["mAP"], np.mean(want), rtol=1e-12)


@pytest.mark.parametrize("embeddings, labels, match", [
    (np.zeros((4, 2)), [0, 0, 1, 2], r"class\(es\) \[1, 2\] have a single example"),
    (np.zeros((4, 2)), [0, 0, 1], r"labels must be \[n\] with n = 4"),
    (np.zeros(4), [0, 0, 1, 1], r"embeddings must be \[n, dim\]"),
    (np.full((2, 2), np.nan), [0, 0], "NaN"),
])
def test_bad_inputs_are_named(embeddings, labels, match):
  with pytest.raises(ValueError, match=match):
    retrieval_metrics(embeddings, labels)
