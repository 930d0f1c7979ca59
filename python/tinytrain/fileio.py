"""Reading what users hand to the CLI: model files and data files."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import numpy as np

from .datacheck import check_finite
from .errors import ModelFormatError
from .outputs import write_atomic  # noqa: F401 - the writers' historical import path

X_KEYS = ("X", "x", "inputs", "images", "data")
Y_KEYS = ("Y", "y", "labels", "targets", "target")


def load_data(path: str, need_labels: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Inputs (float32, NCHW) and labels from ``.npz`` (keys X/Y or x/y ...) or ``.npy`` (inputs only)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        if path.endswith(".npy"):
            x, y = np.load(path, allow_pickle=False), None
            if not isinstance(x, np.ndarray):
                x.close()
                raise ModelFormatError(f"{path}: holds an .npz archive, not one array (name it .npz to read "
                                       f"inputs and labels from it)")
        else:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ModelFormatError(f"{path}: holds a single array, not an .npz archive of inputs and labels "
                                       f"(name it .npy to read it as inputs only)")
            with loaded as f:
                xk = next((k for k in X_KEYS if k in f.files), None)
                yk = next((k for k in Y_KEYS if k in f.files), None)
                if xk is None:
                    raise ModelFormatError(f"{path}: no input array; expected one of {', '.join(X_KEYS)}, found {f.files}")
                x = f[xk]
                y = f[yk] if yk is not None else None
    except ModelFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's parsers raise many types (zip, header tokenizer, EOF) on bad bytes
        raise ModelFormatError(f"{path}: not a readable .npz/.npy file ({type(exc).__name__}: {exc})") from None
    for name, a in (("inputs", x), ("labels", y)):
        # An archive member that is not an .npy comes back as raw bytes.
        if a is not None and not (isinstance(a, np.ndarray) and a.ndim >= 1
                                  and (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_)):
            raise ModelFormatError(f"{path}: {name} are not a numeric array of samples (got {type(a).__name__}"
                                   f"{' of dtype ' + str(a.dtype) + ', shape ' + str(a.shape) if isinstance(a, np.ndarray) else ''})")
    if need_labels and y is None:
        raise ModelFormatError(f"{path}: no labels; expected one of {', '.join(Y_KEYS)} beside the inputs")
    if y is not None and len(y) != len(x):
        raise ModelFormatError(f"{path}: {len(x)} inputs but {len(y)} labels")
    check_finite(x, f"{path}: inputs")
    if x.dtype != np.int8:
        x = x.astype(np.float32)
    return x, y


def load_model(path: str, calib: Optional[str] = None, seed: int = 0):
    """A ``tt.QuantizedModel`` from an ONNX or ``.tflite`` file. A float model is quantized with the
    calibration data, or, without any, from synthetic inputs with a warning (memory does not depend on
    scales)."""
    from . import load_onnx, load_tflite, quantize
    from .model import QuantizedModel

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    g = load_tflite(path) if str(path).lower().endswith(".tflite") else load_onnx(path)
    if isinstance(g, QuantizedModel):
        return g
    if calib is not None:
        x, _ = load_data(calib, need_labels=False)
    else:
        warnings.warn(
            f"{path} is a float model and no calibration data was given: quantizing from synthetic "
            "inputs (fine for memory planning; pass --calib DATA for accuracy)",
            UserWarning,
        )
        shape = g.tensors[g.input].shape
        x = np.random.default_rng(seed).uniform(0.0, 1.0, size=(16,) + tuple(shape)).astype(np.float32)
    return quantize(g, x)
