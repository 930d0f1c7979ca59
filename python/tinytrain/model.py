"""`QuantizedModel`: the int8 graph tinytrain trains, runs and exports.

It *is* a `Graph` (same tensors, nodes and names) whose tensors carry ``scale``/``zero_point`` and
whose conv/fc nodes carry ``weight_q``/``weight_scale``/``bias_q``. `forward` runs a forward-only
plan through tt-core's executor, the same code as training and the device; it (and `to_onnx`)
always reads the *current* ``weight_q`` / ``bias_q``, so weights updated by training are what runs
and what is exported.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import _core
from .graph import Graph

__all__ = ["QuantizedModel", "layer_stats"]


def layer_stats(g: Graph) -> List[Dict[str, object]]:
    """Per node: op, input/output shapes (C, H, W), parameter count and multiply-accumulates."""
    rows = []
    for n in g.nodes:
        out = g.tensors[n.output].shape
        params = macs = 0
        if n.trainable:
            w = n.params["weight"] if "weight" in n.params else n.params["weight_q"]
            params = int(w.size + w.shape[0])
            macs = int(w.size * (out[1] * out[2] if n.op == "conv" else 1))
        rows.append({"name": n.name, "op": n.op, "inputs": [g.tensors[i].shape for i in n.inputs], "output": out,
                     "params": params, "macs": macs, "act": n.attrs.get("act", "")})
    return rows


@dataclass
class QuantizedModel(Graph):
    """An int8 graph: weights int8 per output channel, activations int8 per tensor, int32 biases."""

    #: How the activation ranges were obtained: "minmax", "percentile(p)" or "imported".
    calibration: str = "minmax"
    #: How requantization rounds, in `forward` and in every plan compiled from this model:
    #: ``"single"`` (one rounding of the exact product, half away from zero: tinytrain's quantizer,
    #: onnxruntime-quantized files) or ``"double"`` (TFLite's kernels: gemmlowp's double rounding in
    #: conv, depthwise, add and global average pooling, one rounding in fc, as its FULLY_CONNECTED).
    #: `tt.load_tflite` and tf2onnx conversions of int8 TFLite files set ``"double"``, so the model
    #: gives the numbers the LiteRT interpreter gives, bit for bit.
    rounding: str = "single"

    # ------------------------------------------------------------------ inference
    def quantize_input(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """float32 NCHW -> int8 NHWC with the input tensor's scale and zero point. int8 input
        (already quantized with those parameters, NCHW) is only transposed. ``layout="NHWC"`` takes
        (N, H, W, C) data, as a TFLite user holds it; a (C, 1, 1) input also accepts (N, C)."""
        t = self.tensors[self.input]
        x = np.asarray(x)
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        if x.ndim == 2 and t.shape[1:] == (1, 1):
            x = x[:, :, None, None]
        elif layout == "NHWC" and x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1:] != t.shape:
            raise ValueError(f"input must be (N, {', '.join(map(str, t.shape))}), got {x.shape}")
        if x.dtype == np.int8:
            q = x
        else:
            v = x.astype(np.float32) / np.float32(t.scale)
            # round half away from zero, as tt-core's QParams::quantize does on the device
            r = np.sign(v) * np.floor(np.abs(v) + 0.5)
            q = np.clip(r + t.zero_point, -128, 127).astype(np.int8)
        return np.ascontiguousarray(q.transpose(0, 2, 3, 1))

    def forward_int8(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """Run the int8 graph; returns the output's int8 NHWC array. It runs through tt-core's
        executor (the code a device runs) on a forward-only plan of the current weights."""
        xq = self.quantize_input(x, layout)
        plan_bytes, params = self._forward_plan()
        y = _core.Session(plan_bytes, params).forward(np.ascontiguousarray(xq.reshape(len(xq), -1)))
        c, h, w = self.tensors[self.output].shape
        return y.reshape(len(xq), h, w, c)

    def _forward_plan(self) -> Tuple[bytes, bytes]:
        """The forward-only plan of the current graph and weights (compiled once per version of
        them: the fingerprint sees a weight changed in place too)."""
        key = self._fingerprint()
        cached = self.__dict__.get("_forward_cache")
        if cached is None or cached[0] != key:
            from .engine import compile
            from .schemes import Scheme

            # nothing trained, whole tensors: no layout to search for a host forward
            plan = compile(self, Scheme(), patch=None, in_place=False, loss="mse")
            cached = (key, plan.plan_bytes, plan.params)
            self.__dict__["_forward_cache"] = cached
        return cached[1], cached[2]

    def _fingerprint(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.input, self.output, self.rounding,
                       [(t.name, t.shape, t.scale, t.zero_point) for t in self.tensors.values()],
                       [(n.name, n.op, n.inputs, n.output, sorted(n.attrs.items())) for n in self.nodes])).encode())
        for n in self.nodes:
            for k in ("weight_q", "bias_q", "weight_scale"):
                if k in n.params:
                    a = np.ascontiguousarray(n.params[k])
                    h.update(f"{n.name}.{k}{a.dtype}{a.shape}".encode())
                    h.update(a.tobytes())
        return h.digest()

    def forward(self, x: np.ndarray, batch_size: int = 256, layout: str = "NCHW") -> np.ndarray:
        """float32 NCHW batch -> dequantized float32 output: (N, classes) logits when the output is
        1x1 spatially (the trailing Softmax, if any, is not applied), else (N, C, H, W).
        ``layout="NHWC"`` takes (N, H, W, C) input (TFLite's layout); the output stays as above."""
        x = np.asarray(x)
        outs = []
        for s in range(0, len(x), batch_size):
            outs.append(self.forward_int8(x[s: s + batch_size], layout=layout))
        q = np.concatenate(outs) if outs else np.zeros((0,) + (1, 1, self.tensors[self.output].shape[0]), np.int8)
        t = self.tensors[self.output]
        y = (q.astype(np.float32) - t.zero_point) * np.float32(t.scale)
        return y[:, 0, 0, :] if y.shape[1:3] == (1, 1) else y.transpose(0, 3, 1, 2)

    def predict(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """Class indices (argmax of the logits)."""
        return self.forward(x, layout=layout).argmax(axis=1)

    # ------------------------------------------------------------------ inspection / export
    def dequantized(self) -> Graph:
        """A float `Graph` whose weights are the current int8 weights dequantized (for the float
        reference and for re-quantization)."""
        nodes = copy.deepcopy(self.nodes)
        for n in nodes:
            if n.trainable:
                s = n.params["weight_scale"].astype(np.float32)
                wq = n.params.pop("weight_q")
                n.params["weight"] = wq.astype(np.float32) * s.reshape((-1,) + (1,) * (wq.ndim - 1))
                s_in = np.float32(self.tensors[n.inputs[0]].scale)
                n.params["bias"] = (n.params.pop("bias_q").astype(np.float64) * s_in * s).astype(np.float32)
                n.params.pop("weight_scale")
        tensors = {k: type(v)(v.name, v.shape) for k, v in self.tensors.items()}
        return Graph(self.input, self.output, tensors, nodes, self.softmax_tail)

    def summary(self, show: bool = True) -> str:
        """Per layer: op, shapes, params, MACs, activation clamp and scales. Printed unless show=False."""
        rows = layer_stats(self)
        lines = [f"{'layer':<18}{'op':<15}{'in (C,H,W)':<16}{'out (C,H,W)':<16}{'params':>8}{'MACs':>11}  "
                 f"{'act':<6}{'in s/zp':<18}{'out s/zp':<18}weight scale"]
        for r, n in zip(rows, self.nodes):
            ti, to = self.tensors[n.inputs[0]], self.tensors[n.output]
            ws = ""
            if n.trainable:
                s = n.params["weight_scale"]
                ws = f"{s.min():.2e}..{s.max():.2e}"
            ins = "x".join(str(d) for d in r["inputs"][0])
            outs = "x".join(str(d) for d in r["output"])
            lines.append(f"{r['name']:<18}{r['op']:<15}{ins:<16}{outs:<16}{r['params']:>8}{r['macs']:>11}  "
                         f"{r['act'] or '-':<6}{f'{ti.scale:.3e}/{ti.zero_point}':<18}"
                         f"{f'{to.scale:.3e}/{to.zero_point}':<18}{ws}")
        tp = sum(r["params"] for r in rows)
        tm = sum(r["macs"] for r in rows)
        ti = self.tensors[self.input]
        rounding = "double (TFLite's)" if self.rounding == "double" else self.rounding
        lines.append(f"total: {len(self.layers)} trainable layers, {tp} params ({self.weight_bytes()} bytes int8 "
                     f"weights + int32 biases), {tm / 1e6:.2f}M MACs; input {ti.shape} s={ti.scale:.3e} "
                     f"zp={ti.zero_point}; calibration: {self.calibration}; rounding: {rounding}")
        if self.softmax_tail:
            lines.append("the model ends in Softmax: kept for inference (to_onnx adds it as 'probabilities'), "
                         "skipped for training (the loss is cross-entropy on the logits)")
        text = "\n".join(lines)
        if show:
            print(text)
        return text

    def weight_bytes(self) -> int:
        return int(sum(n.params["weight_q"].size + 4 * n.params["bias_q"].size for n in self.nodes if n.trainable))

    def to_onnx(self, path: Optional[str] = None):
        """Export as a QDQ ONNX model (onnxruntime runs it) from the current int8 weights. Writes
        `path` atomically when given; returns the ModelProto."""
        from .export_onnx import export_qdq

        return export_qdq(self, path)


ROUNDINGS = tuple(_core.ROUNDINGS)


def choose_rounding(model, rounding: str, where: str):
    """The importers' ``rounding=`` argument: ``"auto"`` keeps the rounding of the runtime the file
    was made for (LiteRT for `.tflite` and tf2onnx files, onnxruntime otherwise); ``"single"`` or
    ``"double"`` picks the runtime the model is checked against or deployed beside, since LiteRT and
    onnxruntime themselves differ by a few LSB on the same int8 network."""
    if rounding == "auto":
        return model
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be 'auto', 'single' or 'double', got {rounding!r}")
    if not isinstance(model, QuantizedModel):
        raise ValueError(f"{where}: rounding={rounding!r} applies to an already-quantized file; this one is "
                         "float (tt.quantize rounds once, as onnxruntime does)")
    model.rounding = rounding
    return model
