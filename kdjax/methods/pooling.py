"""Spatial pooling shared by the feature-map losses (attention transfer, FSP) to match map sizes."""

from __future__ import annotations

import jax


def pool_to(feat: jax.Array, size: tuple[int, int], *, kind: str = "avg", what: str = "pool_to") -> jax.Array:
  """Pools ``[B, H, W, C]`` to ``[B, h, w, C]`` with non-overlapping windows, where ``h | H`` and ``w | W``.

  Average pooling by an integer ratio is exactly PyTorch's ``adaptive_avg_pool2d`` (what RepDistiller
  uses to match a larger map to a smaller one); ``kind="max"`` is the FSP paper's max-pooling. Non-integer
  ratios would give overlapping, uneven windows, which kdjax refuses rather than imitate; ``what`` names
  the caller in that error.
  """
  b, hh, ww, c = feat.shape
  h, w = size
  if hh % h or ww % w:
    raise ValueError(
        f"{what}: can only pool a spatial map by an integer ratio; got {(hh, ww)} -> {(h, w)} "
        "(pick layers whose spatial sizes divide each other)")
  if (hh, ww) == (h, w):
    return feat
  windows = feat.reshape(b, h, hh // h, w, ww // w, c)
  return windows.mean(axis=(2, 4)) if kind == "avg" else windows.max(axis=(2, 4))
