"""Offline datasets for the demo, the tests and the benchmarks.

`digits` is scikit-learn's ``load_digits`` (1797 8x8 handwritten digits, shipped with
scikit-learn, no download), upscaled bilinearly to ``size`` x ``size`` (32 by default), one channel,
scaled to [0, 1], float32 NCHW.

Transfer task (what the on-device training demo adapts to): the data is split by class.
``part="source"`` holds digits 0-4: the shipped demo model (`tt.models.demo()`) is pretrained on its
train split. ``part="target"`` holds digits 5-9: classes the model has never seen, learned on the
device. Why a class split rather than a domain shift (inverted contrast, rotation):

* it is the paper's setting: a backbone pretrained on one label set is transferred to new labels,
  the features stay useful while the classifier (and a few late layers/biases) must learn, which
  is exactly what sparse updates of late layers can do;
* it has an unambiguous before/after: the pretrained model scores ~0 % on the target test split, so
  any rise is learning, not recovery of a mildly perturbed input;
* a global contrast inversion or rotation mostly breaks the *first* layers, which the sparse
  schemes of the paper deliberately never update, so it would measure the scheme's blind spot.

The demo model has 10 outputs, so the target labels keep their digit values (5-9). Splits are
deterministic: each part is permuted with a fixed seed and cut 70 % train / 30 % test.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import TinytrainError

__all__ = ["digits", "upscale"]

_PARTS = {"source": range(0, 5), "target": range(5, 10), "all": range(0, 10)}


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear resampling matrix (half-pixel centres, edges clamped)."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) -> (N, size, size) bilinear."""
    a = _interp_matrix(size, images.shape[1])
    b = _interp_matrix(size, images.shape[2])
    return np.einsum("ih,nhw,jw->nij", a, images, b)


def digits(part: str = "source", split: str = "train", size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as (X float32 (N, 1, size, size) in [0, 1], y int64 digit labels).

    part: "source" (0-4, the demo model's pretraining classes), "target" (5-9) or "all".
    split: "train" (70 %), "test" (30 %) or "all"; deterministic.
    """
    if part not in _PARTS:
        raise ValueError(f"part must be one of {sorted(_PARTS)}, got {part!r}")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TinytrainError("tt.datasets.digits needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    images, labels = d.images.astype(np.float64) / 16.0, d.target.astype(np.int64)
    xs, ys = [], []
    for p in (["source", "target"] if part == "all" else [part]):
        idx = np.flatnonzero(np.isin(labels, list(_PARTS[p])))
        idx = idx[np.random.default_rng(1234).permutation(len(idx))]
        cut = int(round(0.7 * len(idx)))
        idx = {"train": idx[:cut], "test": idx[cut:], "all": idx}[split]
        xs.append(images[idx])
        ys.append(labels[idx])
    x = np.concatenate(xs)
    x = upscale(x, size) if size != 8 else x
    return np.clip(x, 0.0, 1.0).astype(np.float32)[:, None], np.concatenate(ys)
