"""Data checked at the door: what every entry point (train, evaluate, search, export, the CLI's data
loading) does with the samples, labels, targets and learning rates it is handed, before any of it
reaches the int8 engine.

The int8 cast hides mistakes: a NaN pixel becomes 0, a 0-255 image fed to a model calibrated on
[0, 1] saturates at 127, (N, 1) labels broadcast against (N,) predictions, a label past the classes
scores 0. So the checks here refuse such data with a one-line typed error (`tt.DataError`,
`tt.NonFiniteDataError`) saying what was found and how to fix it, or, where the intent is
unambiguous, convert it and say so (`tt.DataWarning`).

What is decided from the model, never from the data's shape:

* the input's range is the int8 range its quantization parameters cover,
  ``[(-128 - zero_point) * scale, (127 - zero_point) * scale]``;
* the task: a classifier (a softmax head, or several outputs taken as class scores) trains with
  cross-entropy on class indices; a regressor (one output, or an output shaped as its input: an
  autoencoder) with mean squared error on float targets. One-hot labels are class indices written
  another way; float targets for a classifier are refused, not silently trained with MSE.
"""
from __future__ import annotations

import sys
import warnings
import weakref
from typing import Optional, Tuple

import numpy as np

from .errors import DataError, DataWarning, NonFiniteDataError

__all__ = ["check_float_weights", "check_lr", "input_range", "check_inputs", "check_finite", "model_task",
           "choose_loss", "check_labels", "check_targets", "check_supervision", "plan_labels", "check_model_data",
           "score", "cli_loss", "check_search_data", "register_trainer", "check_export_is_current"]

#: Share of input values allowed past the model's int8 range (beyond half an LSB) without a word.
#: Calibration with a percentile clips a little on purpose, and held-out data may stray a little
#: past the calibration set's extremes. Above it the clipping is warned about; 8-bit pixels then
#: mean a scale mistake (converted for a [0, 1] input, refused otherwise).
OUT_OF_RANGE_SHARE = 0.02

#: Share of input values past the model's range at which the data is refused as being on another
#: scale (standardized data for a 0-255 model, or the reverse): most of it would clip.
REFUSED_SHARE = 0.25

#: Data spanning fewer int8 levels than this while holding more distinct values is warned about:
#: [0, 1] floats fed to a model whose input covers 0-255 land on levels 0 and 1.
FEW_LEVELS = 8


# ---------------------------------------------------------------------- learning rates
def check_lr(lr, name: str = "lr", allow_zero: bool = False) -> float:
    """``lr`` as the float32 the core trains with; refused unless finite and > 0 there (``>= 0``
    with ``allow_zero``: a Trainer at rate 0 does the same work and keeps its weights, which a
    timing run wants). 1e39 is finite in Python but inf in float32; 1e-50 is 0 there."""
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {lr!r}")
    with np.errstate(over="ignore", under="ignore"):
        f32 = np.float32(lr)
    limit = ">= 0" if allow_zero else "> 0"
    if not np.isfinite(f32) or f32 < 0 or (f32 == 0 and not (allow_zero and float(lr) == 0.0)):
        seen = "" if float(f32) == float(lr) or not np.isfinite(float(lr)) else f" (float32: {float(f32)!r})"
        raise ValueError(f"{name} must be a finite number {limit} in float32, the precision training runs in; "
                         f"got {lr!r}{seen}")
    return float(f32)


# ---------------------------------------------------------------------- float weights
def check_float_weights(g, where: str = "") -> None:
    """Refuses a float model whose conv/fc weights or biases hold NaN or inf: quantizing them would
    give int8 zeros or saturated values without a word. Names the layer and the count."""
    from .errors import QuantizationError

    for n in g.nodes:
        if not n.trainable:
            continue
        for key in ("weight", "bias"):
            a = n.params.get(key)
            if a is None or not np.issubdtype(np.asarray(a).dtype, np.floating):
                continue
            bad = int((~np.isfinite(np.asarray(a))).sum())
            if bad:
                raise QuantizationError(f"{where}layer {n.name!r}: {bad} of {np.asarray(a).size} float {key} values "
                                        f"are NaN or infinite; the model cannot be quantized (retrain or repair it)")


# ---------------------------------------------------------------------- inputs
def input_range(scale: float, zero_point: int) -> Tuple[float, float]:
    """The float values an int8 input with these quantization parameters can hold."""
    return (-128 - int(zero_point)) * float(scale), (127 - int(zero_point)) * float(scale)


def check_finite(a, what: str, sample_ndim: Optional[int] = None) -> None:
    """Refuses NaN / inf values in ``a`` (samples along axis 0) with their count. ``a`` with
    ``sample_ndim`` dimensions is one sample."""
    a = np.asarray(a)
    if sample_ndim is not None and a.ndim == sample_ndim:
        a = a[None]
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
        return
    bad = ~np.isfinite(a)
    n_bad = int(bad.sum())
    if not n_bad:
        return
    per_sample = bad.reshape(len(a), -1).any(axis=1) if a.ndim else bad.reshape(1)
    samples = int(per_sample.sum())
    first = int(np.argmax(per_sample))
    raise NonFiniteDataError(
        f"{what}: {n_bad} of {a.size} values are NaN or infinite, in {samples} of {len(per_sample)} samples "
        f"(first: sample {first}); the int8 cast would make them 0 or saturate them: clean or drop those samples",
        what, n_bad, samples, first)


def _numeric(x: np.ndarray, what: str) -> None:
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{what}: must be a numeric array (float32, or int8 already quantized), got dtype {x.dtype}",
                        what)


def check_inputs(x, scale: float, zero_point: int, what: str = "inputs",
                 sample_ndim: Optional[int] = None) -> np.ndarray:
    """``x`` checked against the model's int8 input (scale, zero point): int8 is taken as already
    quantized; anything else must be finite and in the range the input covers. 8-bit pixel values
    (0-255, any dtype) for an input covering [0, ~1] are divided by 255 with a `DataWarning`, for
    another input refused; other data is warned about when more than 2 % of it clips, refused
    with the fix when more than 25 % does. Returns ``x`` (float32 if converted).
    ``sample_ndim``: the dimensions of one sample, so that a lone sample's NaNs count as one's."""
    x = np.asarray(x)
    if x.dtype == np.int8:
        return x
    _numeric(x, what)
    if not x.size:
        return x
    check_finite(x, what, sample_ndim)
    lo, hi = input_range(scale, zero_point)
    half = 0.5 * float(scale)
    xf = x.astype(np.float32, copy=False)
    dmin, dmax = float(xf.min()), float(xf.max())
    out = float(np.mean((xf < lo - half) | (xf > hi + half)))
    span = f"[{lo:.4g}, {hi:.4g}] (int8 scale {float(scale):.4g}, zero point {int(zero_point)})"
    if out > OUT_OF_RANGE_SHARE:
        pixels = dmin >= 0 and dmax <= 255 and dmax > 2 * max(hi, 0.0)
        unit_model = abs(lo) <= 0.05 * hi and 0.5 <= hi <= 2.0
        if pixels and unit_model:
            warnings.warn(f"{what}: values {dmin:g}..{dmax:g} look like 8-bit pixels and the model's input covers "
                          f"{span}: divided by 255 (pass float data in the model's range to silence this)",
                          DataWarning, stacklevel=3)
            return xf / np.float32(255.0)
        fix = (f"scale them into the model's range first (8-bit pixels: x / 255 * {hi - lo:.4g} + {lo:.4g})"
               if pixels else "scale them as the data the model was calibrated on was scaled")
        if not pixels and out <= REFUSED_SHARE:
            warnings.warn(f"{what}: {100 * out:.1f} % of the values ({dmin:g}..{dmax:g}) lie outside the model's "
                          f"input range {span} and clip to the int8 limits; if that is not intended, {fix}",
                          DataWarning, stacklevel=3)
            return x
        raise DataError(f"{what}: values {dmin:g}..{dmax:g}, {100 * out:.1f} % of them outside the model's input "
                        f"range {span}, where the int8 cast would clip them; {fix}", what)
    levels = (dmax - dmin) / float(scale)
    if levels < FEW_LEVELS and len(np.unique(xf.reshape(-1)[:4096])) > FEW_LEVELS:
        warnings.warn(f"{what}: values {dmin:g}..{dmax:g} span only {levels:.1f} int8 levels of the model's input "
                      f"range {span}: most of their detail is lost (data on another scale than the model's?)",
                      DataWarning, stacklevel=3)
    return x


# ---------------------------------------------------------------------- task and loss
def model_task(q) -> Tuple[str, str]:
    """``("classifier" | "regressor", why)`` from the model's head."""
    out_shape = tuple(q.tensors[q.output].shape)
    n_out = int(np.prod(out_shape))
    if getattr(q, "softmax_tail", False):
        return "classifier", f"softmax head over {n_out} classes"
    if n_out == 1:
        return "regressor", "one output value"
    if out_shape == tuple(q.tensors[q.input].shape):
        return "regressor", f"output shaped as its input {out_shape}: an autoencoder"
    return "classifier", f"{n_out} outputs without softmax, taken as class scores"


def choose_loss(q, requested: Optional[str] = "auto") -> Tuple[str, str]:
    """``(loss, why)``: ``"auto"`` (or None) picks cross-entropy for a classifier, MSE for a
    regressor; an explicit loss is kept unless it cannot work (cross-entropy over one output)."""
    task, why = model_task(q)
    if requested in (None, "auto"):
        return ("cross_entropy" if task == "classifier" else "mse"), f"the model is a {task}: {why}"
    n_out = int(np.prod(q.tensors[q.output].shape))
    if requested == "cross_entropy" and n_out < 2:
        raise DataError(f"loss cross_entropy needs at least 2 class outputs, the model has {n_out} ({why}): "
                        f"use loss 'mse' (--loss mse) for a regressor", "loss")
    return requested, "asked for"


def say(message: str) -> None:
    """A note for a CLI user, on stderr (stdout may carry --json)."""
    print(f"note: {message}", file=sys.stderr)


def cli_loss(q, requested: Optional[str]) -> str:
    """The CLI's ``--loss``: chosen from the model when ``auto``, and said."""
    loss, why = choose_loss(q, requested)
    if requested in (None, "auto"):
        say(f"loss {loss}: {why} (--loss to choose)")
    return loss


# ---------------------------------------------------------------------- labels and targets
def _samples_of(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """``y`` with one entry per sample along axis 0 (a scalar is one sample's)."""
    y = y.reshape(1) if y.ndim == 0 else y
    if len(y) != n:
        raise DataError(f"{what}: {n} samples but {len(y)} labels/targets", what)
    return y


def check_labels(y, n: int, n_classes: int, what: str = "labels") -> np.ndarray:
    """Class indices (N,) int64 in [0, n_classes) from (N,), (N, 1) or one-hot (N, n_classes)
    labels (integers, or floats holding integers); anything else is refused with the reason."""
    y = np.asarray(y)
    if y.dtype == np.bool_:  # two classes written as False / True
        y = y.astype(np.int64)
    _numeric(y, what)
    y = _samples_of(y, n, what)
    if y.ndim == 2 and y.shape[1] == n_classes > 1:
        ones = (y == 1).sum(axis=1)
        if np.isin(y, (0, 1)).all() and (ones == 1).all():
            return y.argmax(axis=1).astype(np.int64)
        raise DataError(f"{what}: shape {y.shape} holds one row per sample but not one-hot rows (one 1, the rest 0); "
                        f"give class indices (N,) in [0, {n_classes}), or train a regressor with loss 'mse'", what)
    if y.size != n:
        raise DataError(f"{what}: shape {y.shape} for {n} samples; a classifier over {n_classes} classes takes class "
                        f"indices (N,) or (N, 1), or one-hot rows (N, {n_classes})", what)
    y = y.reshape(n)
    if np.issubdtype(y.dtype, np.floating):
        check_finite(y, what)
        if not np.array_equal(y, np.round(y)):
            example = y[np.flatnonzero(y != np.round(y))[0]].item()
            raise DataError(f"{what}: float values such as {example!r} are not class indices; a classifier takes "
                            f"integers in [0, {n_classes}) (float targets need a regressor: loss 'mse')", what)
    if n and n_classes > 0 and (y.min() < 0 or y.max() >= n_classes):
        outside = int(((y < 0) | (y >= n_classes)).sum())
        raise DataError(f"{what}: {outside} of {n} labels lie outside the model's {n_classes} classes "
                        f"(values {y.min():g}..{y.max():g}, expected integers in [0, {n_classes}))", what)
    return y.astype(np.int64)


def check_targets(y, n: int, n_out: int, what: str = "targets") -> np.ndarray:
    """Float targets (N, n_out) of a regressor (MSE). Non-finite targets are left in: the trainer
    skips and counts their steps. Integer class indices for a model with several outputs are
    refused (a classifier's labels are for cross-entropy)."""
    y = np.asarray(y)
    _numeric(y, what)
    y = _samples_of(y, n, what)
    if y.size != n * n_out:
        raise DataError(f"{what}: shape {y.shape} for {n} samples of a regressor with {n_out} outputs: "
                        f"expected (N, {n_out}) float targets", what)
    if n_out > 1 and y.ndim == 1:
        raise DataError(f"{what}: class indices for a model with {n_out} outputs trained with mse", what)
    return y.astype(np.float32).reshape(n, n_out)


def check_supervision(y, n: int, loss: str, n_out: int, what: str = "labels") -> np.ndarray:
    """Labels for a cross-entropy plan (`check_labels`), targets for an MSE plan (`check_targets`).
    Float targets for a cross-entropy plan are refused with the fix rather than switching loss."""
    if loss == "mse":
        return check_targets(y, n, n_out, what.replace("labels", "targets"))
    a = np.asarray(y)
    if np.issubdtype(a.dtype, np.floating) and a.size == n * n_out and n_out > 1 and a.ndim == 2:
        if not (np.isin(a, (0, 1)).all() and ((a == 1).sum(axis=1) == 1).all()):
            raise DataError(f"{what}: float targets {a.shape} but the model trains cross-entropy over {n_out} "
                            f"classes (labels are class indices or one-hot rows); for regression compile with "
                            f"loss='mse' (--loss mse)", what)
    return check_labels(y, n, n_out, what)


# ---------------------------------------------------------------------- plans and models
def plan_labels(plan, y, n: int, what: str = "labels") -> np.ndarray:
    """Labels or targets of ``n`` samples for a compiled plan: its loss and outputs decide."""
    n_out = int(np.prod(plan.meta.get("output", {}).get("shape", [0])))
    return check_supervision(y, n, plan.loss, n_out, what)


def check_model_data(q, x, y=None, loss: Optional[str] = None, what: str = "data"):
    """(x, y, loss) checked for a quantized model: inputs against its input quantization; labels or
    targets against ``loss`` (default: the model's task, `choose_loss`)."""
    t = q.tensors[q.input]
    if t.scale is None:  # a float model: no int8 range to check against yet
        check_finite(x, f"{what}: inputs")
    else:
        x = check_inputs(x, t.scale, t.zero_point, f"{what}: inputs")
    loss, _ = choose_loss(q, loss)
    if y is None:
        return x, None, loss
    n_out = int(np.prod(q.tensors[q.output].shape))
    return x, check_supervision(y, len(x), loss, n_out, f"{what}: labels"), loss


def check_search_data(q, x, y, loss: Optional[str] = None):
    """(x, y) for `tt.search`, which ranks schemes by held-out accuracy: a classifier's data only."""
    x, y, loss = check_model_data(q, x, y, loss, "search data")
    if loss != "cross_entropy":
        raise DataError(f"tt.search ranks schemes by held-out accuracy and this model trains with {loss} "
                        f"({choose_loss(q, 'auto')[1]}): choose its scheme with tt.schemes.auto(q, budget) "
                        f"(the CLI's --scheme auto)", "search data")
    return x, y


def score(q, x, y, what: str = "data") -> Tuple[str, float]:
    """``("accuracy" | "mse", value)`` of a quantized model's int8 inference on checked data: the
    model's task picks the metric (`model_task`), not the labels' dtype."""
    x, y, loss = check_model_data(q, x, y, None, what)
    out = q.forward(x)
    if loss == "cross_entropy":
        return "accuracy", float((out.reshape(len(out), -1).argmax(axis=1) == y).mean()) if len(y) else float("nan")
    return "mse", float(((out.reshape(len(out), -1) - y) ** 2).mean()) if len(y) else float("nan")


# ---------------------------------------------------------------------- export after training
_TRAINERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_trainer(trainer) -> None:
    """Remembers that ``trainer`` trains its plan, so exporting the plan can tell whether the
    weights it would ship are still the ones trained."""
    _TRAINERS.setdefault(trainer.plan, weakref.WeakSet()).add(trainer)


def check_export_is_current(plan) -> None:
    """Refuses to export ``plan``'s initial weights while a live Trainer of it holds other trained
    values: the firmware would start from weights the user already replaced."""
    from . import _core

    trainers = list(_TRAINERS.get(plan, ()))
    if not trainers:
        return
    initial = bytes(_core.session_export_update(_core.Session(plan.plan_bytes, plan.params), 0))
    for t in trainers:
        if bytes(_core.session_export_update(t._s, 0)) != initial:
            raise DataError("this plan has a Trainer whose weights moved (trained or updated) since compile: "
                            "plan.export_mcu would ship the initial weights. Export what was trained with "
                            "tr.export_mcu(out_dir, ...), or the initial weights with "
                            "plan.export_mcu(out_dir, ..., initial_weights=True)", "weights")
