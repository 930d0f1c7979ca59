"""Export a `QuantizedModel` as a QDQ ONNX model that onnxruntime (or any QDQ-aware runtime) runs,
and a float `Graph` as a float ONNX model (for onnxruntime's or another tool's quantizer).

Every IR tensor becomes QuantizeLinear -> DequantizeLinear with its own scale and zero point; conv
and fc weights are int8 initializers behind a per-channel (axis 0) DequantizeLinear, biases int32
behind a DequantizeLinear with scale s_in·s_w. Fused clamps become Relu / Clip(0, 6) before the
QuantizeLinear (the int8 clamp and the float clip-then-quantize agree). fc columns, stored in the
IR's (H, W, C) order, are permuted back to ONNX's (C, H, W) flattening order. The float export is
the same graph with float initializers and no QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fileio import write_atomic

__all__ = ["export_qdq", "export_float"]

OPSET = 13


def export_qdq(q, path: Optional[str] = None) -> onnx.ModelProto:
    return _export(q, path, quantized=True)


def export_float(g, path: Optional[str] = None) -> onnx.ModelProto:
    """A float `Graph` as a float ONNX model (opset 13, NCHW input "input", output "logits")."""
    return _export(g, path, quantized=False)


def _export(q, path: Optional[str], quantized: bool) -> onnx.ModelProto:
    nodes, inits = [], []
    rank: Dict[str, int] = {}

    def const(name: str, arr: np.ndarray) -> str:
        # not np.ascontiguousarray: it turns 0-d scales into shape (1,), which QLinear* fusions reject
        inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def qdq(name: str, src: str) -> str:
        """Quantize-dequantize `src` with tensor `name`'s parameters; returns the float tensor
        (named as such in a float export too, where it is `src` itself)."""
        if not quantized:
            nodes.append(helper.make_node("Identity", [src], [f"{name}.dq"], name=f"{name}.identity"))
            return f"{name}.dq"
        t = q.tensors[name]
        s = const(f"{name}.scale", np.array(t.scale, np.float32))
        z = const(f"{name}.zero_point", np.array(t.zero_point, np.int8))
        nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [f"{name}.q"], name=f"{name}.quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", s, z], [f"{name}.dq"], name=f"{name}.dequantize"))
        return f"{name}.dq"

    def as_rank4(name: str) -> str:
        if rank[name] == 4:
            return f"{name}.dq"
        axes = const(f"{name}.axes23", np.array([2, 3], np.int64))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}.dq", axes], [f"{name}.dq4"]))
        return f"{name}.dq4"

    def activation(n, src: str) -> str:
        act = n.attrs.get("act", "none")
        if act == "none":
            return src
        out = f"{n.name}.{act}"
        if act == "relu":
            nodes.append(helper.make_node("Relu", [src], [out], name=out))
        else:
            lo = const(f"{n.name}.clip_min", np.array(0.0, np.float32))
            hi = const(f"{n.name}.clip_max", np.array(6.0, np.float32))
            nodes.append(helper.make_node("Clip", [src, lo, hi], [out], name=out))
        return out

    inp = q.tensors[q.input]
    qdq(q.input, "input")
    rank[q.input] = 4
    for n in q.nodes:
        raw = f"{n.name}.out"
        a = n.attrs
        if n.trainable:
            t_in = q.tensors[n.inputs[0]]
            wq = n.params["weight_q"].astype(np.int8) if quantized else n.params["weight"].astype(np.float32)
            o = wq.shape[0]
            if n.op == "fc":
                c, h, w = t_in.shape
                if h * w > 1:
                    # IR columns are in (h, w, c) order; ONNX Flatten of NCHW is (c, h, w)
                    wq = wq.reshape(o, h, w, c).transpose(0, 3, 1, 2).reshape(o, -1)
            if quantized:
                s_w = n.params["weight_scale"].astype(np.float32)
                w_dq = f"{n.name}.weight.dq"
                nodes.append(helper.make_node(
                    "DequantizeLinear", [const(f"{n.name}.weight_q", wq), const(f"{n.name}.weight_scale", s_w),
                                         const(f"{n.name}.weight_zp", np.zeros(o, np.int8))], [w_dq], axis=0,
                    name=w_dq))
                b_dq = f"{n.name}.bias.dq"
                b_scale = (np.float64(t_in.scale) * s_w.astype(np.float64)).astype(np.float32)
                nodes.append(helper.make_node(
                    "DequantizeLinear", [const(f"{n.name}.bias_q", n.params["bias_q"].astype(np.int32)),
                                         const(f"{n.name}.bias_scale", b_scale),
                                         const(f"{n.name}.bias_zp", np.zeros(o, np.int32))], [b_dq], axis=0,
                    name=b_dq))
            else:
                w_dq = const(f"{n.name}.weight", wq)
                b_dq = const(f"{n.name}.bias", n.params["bias"].astype(np.float32))
            if n.op == "conv":
                t, l, b, r = a["pads"]
                nodes.append(helper.make_node(
                    "Conv", [as_rank4(n.inputs[0]), w_dq, b_dq], [raw], name=n.name, kernel_shape=list(a["kernel"]),
                    strides=list(a["stride"]), pads=[t, l, b, r], group=int(a["groups"])))
                rank[n.output] = 4
            else:
                flat = f"{n.name}.flat"
                nodes.append(helper.make_node("Flatten", [f"{n.inputs[0]}.dq"], [flat], axis=1))
                nodes.append(helper.make_node("Gemm", [flat, w_dq, b_dq], [raw], name=n.name, transB=1))
                rank[n.output] = 2
        elif n.op == "add":
            x0, x1 = f"{n.inputs[0]}.dq", f"{n.inputs[1]}.dq"
            if rank[n.inputs[0]] != rank[n.inputs[1]]:
                x0, x1 = as_rank4(n.inputs[0]), as_rank4(n.inputs[1])
            nodes.append(helper.make_node("Add", [x0, x1], [raw], name=n.name))
            rank[n.output] = 4 if x0.endswith("4") else rank[n.inputs[0]]
        elif n.op == "global_avgpool":
            nodes.append(helper.make_node("GlobalAveragePool", [as_rank4(n.inputs[0])], [raw], name=n.name))
            rank[n.output] = 4
        elif n.op in ("avgpool", "maxpool"):
            t, l, b, r = a["pads"]
            kw = dict(kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=[t, l, b, r])
            if n.op == "avgpool":
                kw["count_include_pad"] = 0
            nodes.append(helper.make_node("AveragePool" if n.op == "avgpool" else "MaxPool",
                                          [as_rank4(n.inputs[0])], [raw], name=n.name, **kw))
            rank[n.output] = 4
        elif n.op == "flatten":
            tr = f"{n.name}.nhwc"
            nodes.append(helper.make_node("Transpose", [as_rank4(n.inputs[0])], [tr], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Flatten", [tr], [raw], name=n.name, axis=1))
            rank[n.output] = 2
        else:
            raise ValueError(f"node {n.name!r}: op {n.op!r} cannot be exported")
        qdq(n.output, activation(n, raw))
    out_t = q.tensors[q.output]
    final = f"{q.output}.dq"
    nodes.append(helper.make_node("Identity", [final], ["logits"], name="logits"))
    out_shape = ["N", out_t.shape[0]] if rank[q.output] == 2 else ["N", *out_t.shape]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)]
    if q.softmax_tail:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, out_shape))
    graph = helper.make_graph(
        nodes, "tinytrain_int8" if quantized else "tinytrain_float",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *inp.shape])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tinytrain")
    if quantized:
        # tt.load_onnx reads it back, so a model imported from TFLite keeps TFLite's rounding
        helper.set_model_props(model, {"tinytrain.rounding": q.rounding})
    model.ir_version = 8
    onnx.checker.check_model(model)
    if path is not None:
        write_atomic(path, model.SerializeToString())
    return model
