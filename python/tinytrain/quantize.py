"""Post-training int8 quantization: float `Graph` + calibration batch -> `QuantizedModel`.

Numerics (DESIGN.md): weights int8 symmetric per output channel (zero point 0, range ±127),
activations int8 asymmetric per tensor (range always contains 0, so ReLU's 0 is exact), int32 bias
with scale s_in·s_w[o], ReLU/ReLU6 fused into the requantization clamp, BatchNormalization already
folded by the importer. Max-pool, average-pool and flatten outputs share their input's parameters
(they select, average or move values; tt-core's windowed pools keep the quantization), so they
need no requantization.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import numpy as np

from . import datacheck, reference
from .errors import ModelFormatError, QuantizationError, UnsupportedOperatorError
from .graph import Graph

__all__ = ["quantize", "activation_qparams", "quantize_weights", "quantize_bias", "from_imported",
           "fit_dead_channel_biases"]

_INT32 = (-(2**31), 2**31 - 1)
#: Ops whose output reuses the input's (scale, zero point) exactly.
SHARED_QPARAMS = ("maxpool", "avgpool", "flatten")


def activation_qparams(lo: float, hi: float) -> Tuple[float, int]:
    """Asymmetric int8 parameters covering [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(np.clip(np.round(-128.0 - lo / scale), -128, 127))
    return scale, zp


#: A channel's weight scale is at least this fraction of its layer's largest: weights a million
#: times smaller than the layer's largest quantize to zero (a dead channel) instead of getting a
#: scale near 1e-32 whose int32 bias (bias / (s_in * s_w)) lands at the int32 limits.
WEIGHT_SCALE_FLOOR = 1e-6


def quantize_weights(w: np.ndarray, min_scale=0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: returns (weight_q int8, weight_scale float32 (O,)).
    `min_scale` (a scalar or one per channel) is a floor on the scales."""
    o = w.shape[0]
    amax = np.abs(w.reshape(o, -1)).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0 / 127.0)
    scale = np.maximum(scale, np.broadcast_to(np.asarray(min_scale, np.float64), (o,)))
    shape = (o,) + (1,) * (w.ndim - 1)
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_bias(b: np.ndarray, s_in: float, s_w: np.ndarray) -> np.ndarray:
    s = np.float64(s_in) * s_w.astype(np.float64)
    return np.clip(np.round(b.astype(np.float64) / s), *_INT32).astype(np.int32)


class _Ranges:
    """Running per-tensor ranges over calibration batches (min/max, or a percentile of a sample)."""

    def __init__(self, method: str, percentile: float, seed: int = 0) -> None:
        self.method, self.percentile = method, percentile
        self.lo: Dict[str, float] = {}
        self.hi: Dict[str, float] = {}
        self.samples: Dict[str, Tuple[np.ndarray, int]] = {}
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, v: np.ndarray) -> None:
        self.lo[name] = min(self.lo.get(name, np.inf), float(v.min()))
        self.hi[name] = max(self.hi.get(name, -np.inf), float(v.max()))
        if self.method == "percentile":
            self._sample(name, v.reshape(-1))

    def _sample(self, name: str, flat: np.ndarray, cap: int = 300_000) -> None:
        """A bounded random sample of everything seen for `name`, each value equally likely,
        so memory stays flat however large the calibration set is."""
        n = flat.size
        if n > cap:
            flat = flat[self.rng.integers(0, n, cap)]
        res, seen = self.samples.get(name, (None, 0))
        if res is None:
            self.samples[name] = (flat, n)
            return
        merged = np.concatenate([res, flat])
        if merged.size > cap:
            w = np.concatenate([np.full(res.size, seen / res.size), np.full(flat.size, n / flat.size)])
            merged = merged[self.rng.choice(merged.size, cap, p=w / w.sum())]
        self.samples[name] = (merged, seen + n)

    def range(self, name: str) -> Tuple[float, float]:
        if self.method == "minmax":
            return self.lo[name], self.hi[name]
        flat = self.samples[name][0]
        return (float(np.percentile(flat, 100.0 - self.percentile)), float(np.percentile(flat, self.percentile)))


def quantize(g: Graph, calib: np.ndarray, method: str = "minmax", percentile: float = 99.99,
             requantize: bool = False, batch_size: int = 64):
    """Post-training quantization of a float graph with calibration data (float32 NCHW).

    ``method="minmax"`` uses the observed range of each activation; ``"percentile"`` clips it to the
    given two-sided percentile (robust to outliers). An already-quantized model is refused unless
    ``requantize=True``, which recalibrates it from its current (dequantized) int8 weights.
    """
    from .model import QuantizedModel

    if method not in ("minmax", "percentile"):
        raise QuantizationError(f"method must be 'minmax' or 'percentile', got {method!r}")
    if not 50.0 < percentile <= 100.0:
        raise QuantizationError(f"percentile must be in (50, 100], got {percentile}")
    if isinstance(g, QuantizedModel):
        if not requantize:
            raise QuantizationError(
                "this model is already quantized (it carries its own int8 weights, scales and zero points); "
                "use it directly, or pass requantize=True to recalibrate it from its current int8 weights")
        g = g.dequantized()
    if not isinstance(g, Graph):
        raise QuantizationError(f"tt.quantize expects a tt.Graph from tt.load_onnx, got {type(g).__name__}")
    datacheck.check_float_weights(g)
    calib = np.asarray(calib, dtype=np.float32)
    shape = g.tensors[g.input].shape
    if calib.ndim == 2 and shape[1:] == (1, 1):  # (N, F) data for a model whose input is F features
        calib = calib[:, :, None, None]
    if calib.ndim != 4 or calib.shape[1:] != shape or len(calib) == 0:
        flat = f" or (N, {shape[0]})" if shape[1:] == (1, 1) else ""
        raise QuantizationError(f"calibration data must be float32 of shape (N, {', '.join(map(str, shape))}){flat} "
                                f"with N >= 1, got {calib.shape}")
    if not np.isfinite(calib).all():
        raise QuantizationError("calibration data contains NaN or infinite values")
    ranges = _Ranges(method, percentile)
    for s in range(0, len(calib), batch_size):
        cache = reference.Cache()
        reference.forward(g, calib[s: s + batch_size], cache)
        for name, v in cache.values.items():
            ranges.add(name, v)
    q = QuantizedModel(g.input, g.output, copy.deepcopy(g.tensors), copy.deepcopy(g.nodes), g.softmax_tail,
                       calibration=method if method == "minmax" else f"percentile({percentile})")
    inp = q.tensors[q.input]
    inp.scale, inp.zero_point = activation_qparams(*ranges.range(q.input))
    for n in q.nodes:
        out = q.tensors[n.output]
        if n.op in SHARED_QPARAMS:
            src = q.tensors[n.inputs[0]]
            out.scale, out.zero_point = src.scale, src.zero_point
        else:
            out.scale, out.zero_point = activation_qparams(*ranges.range(n.output))
        if n.trainable:
            s_in = q.tensors[n.inputs[0]].scale
            n.params["weight_q"], n.params["weight_scale"] = quantize_weights(
                n.params["weight"], _weight_scale_floor(n.params["weight"], n.params["bias"], s_in))
            n.params["bias_q"] = quantize_bias(n.params["bias"], s_in, n.params["weight_scale"])
    fit_dead_channel_biases(q, "tt.quantize")
    return q


def _weight_scale_floor(w: np.ndarray, b: np.ndarray, s_in: float) -> np.ndarray:
    """Per channel, the smallest weight scale tt.quantize gives: `WEIGHT_SCALE_FLOOR` of the layer's
    largest, and large enough that the channel's int32 bias b / (s_in * s_w) stays within tt-core's
    bound (then every bias it writes is representable, whatever the float weights)."""
    from . import _core

    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    rel = WEIGHT_SCALE_FLOOR * amax.max() / 127.0
    fit = np.abs(b.astype(np.float64)) / (np.float64(s_in) * (_core.BIAS_LIMIT - 1))
    return np.maximum(rel, fit)


def fit_dead_channel_biases(q, where: str) -> List[Tuple[str, int, int, int]]:
    """Bring every int32 bias beyond tt-core's bound (±2^30) back within it, where that changes nothing.

    TensorFlow's converter writes output channels whose int8 weights are all zero and whose bias is
    about ±(2^30 + 128) or near ±2^31. With zero weights the accumulator IS the bias, so the channel
    outputs one constant; the bias is replaced by an in-bound value that tt-core's own requantization
    (asked through `_core.requantize`, with the model's rounding and the layer's clamp) maps to the
    same int8 output. A bias beyond the bound on a channel with non-zero weights, or one no in-bound
    value reproduces, raises `QuantizationError` naming the layer and channel (``.layer``,
    ``.channel``). Returns the changes as (layer, channel, old bias, new bias)."""
    from . import _core

    limit = int(_core.BIAS_LIMIT)
    changed = []
    for n in q.nodes:
        if not n.trainable:
            continue
        bias = n.params["bias_q"].astype(np.int64)
        over = np.nonzero(np.abs(bias) > limit)[0]
        if not over.size:
            continue
        t_in, t_out = q.tensors[n.inputs[0]], q.tensors[n.output]
        req = np.float64(t_in.scale) * n.params["weight_scale"].astype(np.float64) / np.float64(t_out.scale)
        lo, hi = _core.activation_range(n.attrs.get("act", "none"), float(t_out.scale), int(t_out.zero_point))
        wq = n.params["weight_q"].reshape(len(bias), -1)
        label = n.name if n.attrs.get("onnx_node", n.name) == n.name else f"{n.name} ({n.attrs['onnx_node']!r})"

        def out_of(acc: np.ndarray, o: int) -> np.ndarray:
            return _core.requantize(acc.astype(np.int32)[None], np.full(acc.size, req[o]), int(t_out.zero_point),
                                    lo, hi, q.rounding, fully_connected=n.op == "fc")[0]

        new = n.params["bias_q"].copy()
        for o in (int(v) for v in over):
            if wq[o].any():
                raise _unrepresentable(where, n.name, label, o, int(bias[o]), limit,
                                       "its int8 weights are not all zero, so its int32 accumulator could overflow")
            target = out_of(np.array([bias[o]]), o)[0]
            guess = np.clip(np.round((int(target) - t_out.zero_point) / req[o]), -limit, limit)
            candidates = np.array([np.sign(bias[o]) * limit, guess], np.int64)
            ok = np.nonzero(out_of(candidates, o) == target)[0]
            if not ok.size:
                raise _unrepresentable(where, n.name, label, o, int(bias[o]), limit,
                                       f"no bias within the bound gives its output {int(target)}")
            new[o] = int(candidates[ok[0]])
            changed.append((n.name, o, int(bias[o]), int(new[o])))
        n.params["bias_q"] = new
    return changed


def within_bias_bound(model, where: str):
    """An importer's last step: `fit_dead_channel_biases` on a quantized model (a float one has no
    int32 biases yet); returns the model."""
    from .model import QuantizedModel

    if isinstance(model, QuantizedModel):
        fit_dead_channel_biases(model, where)
    return model


def _unrepresentable(where: str, layer: str, label: str, channel: int, bias: int, limit: int,
                     why: str) -> QuantizationError:
    e = QuantizationError(f"{where}: layer {label}, output channel {channel}: int32 bias {bias} is beyond "
                          f"tt-core's bound ±{limit} (2^30) and {why}; re-quantize the float model with "
                          f"tt.quantize (it floors weight scales so every bias fits)")
    e.layer, e.channel = layer, channel
    return e


def from_imported(g: Graph, qparams: Dict[str, Tuple[float, int]], where: str):
    """Build a `QuantizedModel` from an imported QDQ / QOperator graph, keeping its own numbers.

    Called by the ONNX importer. Weights that arrive as int8 symmetric per-channel (or per-tensor)
    and int32 biases with scale s_in·s_w are kept bit for bit; anything else (uint8 or asymmetric
    weights, a folded BatchNormalization) is quantized here from its float value.
    """
    from .model import QuantizedModel

    datacheck.check_float_weights(g, f"{where}: ")
    q = QuantizedModel(g.input, g.output, g.tensors, g.nodes, g.softmax_tail, calibration="imported")
    for name, (s, z) in qparams.items():
        q.tensors[name].scale, q.tensors[name].zero_point = float(s), int(z)
    for n in q.nodes:
        out = q.tensors[n.output]
        src = q.tensors[n.inputs[0]] if n.inputs else None
        if out.scale is None and n.op in SHARED_QPARAMS and src is not None and src.scale is not None:
            out.scale, out.zero_point = src.scale, src.zero_point
    for n in q.nodes:
        out, src = q.tensors[n.output], q.tensors[n.inputs[0]]
        if n.op in SHARED_QPARAMS and (out.scale, out.zero_point) != (src.scale, src.zero_point):
            raise UnsupportedOperatorError(
                n.attrs.get("onnx_node", n.name), n.attrs.get("onnx_op", n.op), n.attrs.get("onnx_opset", 0),
                f"its output is quantized differently from its input ({out.scale}, {out.zero_point} vs "
                f"{src.scale}, {src.zero_point}); int8 {n.op} keeps the input's quantization")
    missing = [t.name for t in q.tensors.values() if t.scale is None]
    if missing:
        raise ModelFormatError(f"{where}: the model is partly quantized: tensors {missing[:5]} have no "
                               f"QuantizeLinear/DequantizeLinear giving their scale (quantize the float model "
                               f"with tt.quantize instead)")
    for n in q.nodes:
        wq = n.attrs.pop("_wq", None)
        bq = n.attrs.pop("_bq", None)
        if not n.trainable:
            continue
        w = n.params["weight"]
        o = w.shape[0]
        s_in = q.tensors[n.inputs[0]].scale
        kept = False
        if wq is not None:
            qw, sw, zw, axis = wq
            if qw.dtype == np.int8 and not np.asarray(zw).any() and axis in (0, None) and qw.shape == w.shape:
                n.params["weight_q"] = qw.astype(np.int8)
                n.params["weight_scale"] = np.broadcast_to(np.asarray(sw, np.float32).reshape(-1), (o,)).copy()
                kept = True
        if not kept:
            n.params["weight_q"], n.params["weight_scale"] = quantize_weights(w)
        n.params["weight"] = (n.params["weight_q"].astype(np.float32) *
                              n.params["weight_scale"].reshape((o,) + (1,) * (w.ndim - 1)))
        expect = np.float64(s_in) * n.params["weight_scale"].astype(np.float64)
        if (bq is not None and bq[0].dtype == np.int32 and bq[0].shape == (o,) and
                np.allclose(np.broadcast_to(np.asarray(bq[1], np.float64).reshape(-1), (o,)), expect, rtol=1e-4)):
            n.params["bias_q"] = bq[0].astype(np.int32)
        else:
            n.params["bias_q"] = quantize_bias(n.params["bias"], s_in, n.params["weight_scale"])
    return q
