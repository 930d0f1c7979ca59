"""`QuantizedModel`: the int8 graph tinytrain trains, runs and exports.

It *is* a `Graph` (same tensors, nodes and names) whose tensors carry ``scale``/``zero_point`` and
whose conv/fc nodes carry ``weight_q``/``weight_scale``/``bias_q``. `forward` runs tt-core's int8
kernels through `tinytrain._core`; it (and `to_onnx`) always reads the *current* ``weight_q`` /
``bias_q``, so weights updated by training are what runs and what is exported.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .graph import Graph, Node

__all__ = ["QuantizedModel", "layer_stats", "act_range"]


def act_range(act: str, scale: float, zero_point: int):
    """The int8 clamp [act_min, act_max] that fuses `act` into requantization."""
    if act == "relu":
        return max(zero_point, -128), 127
    if act == "relu6":
        return max(zero_point, -128), int(min(127, zero_point + round(6.0 / scale)))
    return -128, 127


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

    def forward_int8(self, x: np.ndarray, keep: bool = False, layout: str = "NCHW"):
        """Run the int8 graph; returns the output's int8 NHWC array (and every tensor if `keep`)."""
        from . import _core

        vals = {self.input: self.quantize_input(x, layout)}
        for n in self.nodes:
            vals[n.output] = self._run_node(_core, n, [vals[i] for i in n.inputs])
        out = vals[self.output]
        return (out, vals) if keep else out

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

    def _run_node(self, core, n: Node, ins: List[np.ndarray]) -> np.ndarray:
        t_out = self.tensors[n.output]
        t_in = self.tensors[n.inputs[0]]
        a = n.attrs
        if n.op in ("conv", "fc"):
            lo, hi = act_range(a.get("act", "none"), t_out.scale, t_out.zero_point)
            req = (np.float64(t_in.scale) * n.params["weight_scale"].astype(np.float64) / np.float64(t_out.scale))
            bias = np.ascontiguousarray(n.params["bias_q"], dtype=np.int32)
            if n.op == "conv":
                w = np.ascontiguousarray(n.params["weight_q"].transpose(0, 2, 3, 1), dtype=np.int8)
                return core.conv2d_forward(ins[0], w, bias, tuple(a["stride"]), tuple(a["pads"]), int(a["groups"]),
                                           int(t_in.zero_point), int(t_out.zero_point), req, lo, hi, self.rounding)
            xin = np.ascontiguousarray(ins[0].reshape(ins[0].shape[0], -1))
            w = np.ascontiguousarray(n.params["weight_q"], dtype=np.int8)
            y = core.fc_forward(xin, w, bias, int(t_in.zero_point), int(t_out.zero_point), req, lo, hi, self.rounding)
            return y.reshape(y.shape[0], 1, 1, -1)
        if n.op == "add":
            tb = self.tensors[n.inputs[1]]
            lo, hi = act_range(a.get("act", "none"), t_out.scale, t_out.zero_point)
            return core.add_forward(ins[0], float(t_in.scale), int(t_in.zero_point), ins[1], float(tb.scale),
                                    int(tb.zero_point), float(t_out.scale), int(t_out.zero_point), lo, hi,
                                    self.rounding)
        if n.op == "global_avgpool":
            y = core.global_avgpool_forward(ins[0], float(t_in.scale), int(t_in.zero_point), float(t_out.scale),
                                            int(t_out.zero_point), self.rounding)
            return y.reshape(y.shape[0], 1, 1, -1)
        if n.op == "avgpool":
            return core.avgpool_forward(ins[0], tuple(a["kernel"]), tuple(a["stride"]), tuple(a["pads"]))
        if n.op == "maxpool":
            return core.maxpool_forward(ins[0], tuple(a["kernel"]), tuple(a["stride"]), tuple(a["pads"]))
        if n.op == "flatten":
            return ins[0].reshape(ins[0].shape[0], 1, 1, -1)
        raise ValueError(f"node {n.name!r}: op {n.op!r} has no int8 kernel")

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


ROUNDINGS = ("single", "double")


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
