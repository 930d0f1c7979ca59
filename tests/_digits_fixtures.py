"""Inputs of the converter fixtures in tests/fixtures/tflite/, shared by their generator
(scripts/make_tflite_fixtures.py, run under TensorFlow) and the tests (numpy + scikit-learn only).

Every fixture reads scikit-learn's 8x8 digits scaled to [0, 1], enlarged by pixel repetition (exact,
so both sides compute the same float32 values) to the model's NHWC input:

* ``ds_cnn``     (16, 8, 1): rows doubled, a 16-frame x 8-coefficient "spectrogram"
* ``mobilenet``  (32, 32, 1) and ``resnet8`` (32, 32, 1): each pixel a 4x4 block
* ``autoencoder`` (64,): the flat image

Split by class, as `tinytrain.datasets` does: the classifiers are trained on digits 0-4 ("source")
and adapt on the device to digits 5-9 ("target"). The autoencoder is pretrained on all digits; on the
device it learns its own normal data, digits 0-4, and digits 5-9 are the unseen distribution its
anomaly score must then separate. Each part is permuted with a
fixed seed and cut 70 % train / 30 % test.
"""
from __future__ import annotations

import numpy as np

SHAPES = {"ds_cnn": (16, 8, 1), "mobilenet": (32, 32, 1), "resnet8": (32, 32, 1), "autoencoder": (64,)}


def _images():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def to_input(images: np.ndarray, model: str) -> np.ndarray:
    """(N, 8, 8) float images -> the model's NHWC (or flat) float32 input."""
    if model == "ds_cnn":
        x = np.repeat(images, 2, axis=1)
    elif model in ("mobilenet", "resnet8"):
        x = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
    elif model == "autoencoder":
        return images.reshape(len(images), 64).astype(np.float32)
    else:
        raise KeyError(model)
    return x[..., None].astype(np.float32)


def digits(model: str, part: str = "all", split: str = "train"):
    """(X NHWC float32, y) for ``part`` in source (0-4) | target (5-9) | all, ``split`` train | test."""
    images, y = _images()
    if part == "source":
        keep = y < 5
    elif part == "target":
        keep = y >= 5
    elif part == "all":
        keep = np.ones_like(y, bool)
    else:
        raise ValueError(part)
    idx = np.flatnonzero(keep)
    idx = idx[np.random.default_rng(1234).permutation(len(idx))]
    cut = int(round(0.7 * len(idx)))
    idx = idx[:cut] if split == "train" else idx[cut:]
    return to_input(images[idx], model), y[idx]


def nchw(x: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW (a flat (N, F) input becomes (N, F, 1, 1))."""
    if x.ndim == 2:
        return x[:, :, None, None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
