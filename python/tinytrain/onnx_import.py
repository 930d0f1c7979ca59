"""ONNX front end: lowers an ONNX model (float, QDQ or QOperator) into the tinytrain graph IR.

Lowering happens in two phases. Phase 1 walks the ONNX nodes in order and emits IR nodes plus a
few *pseudo ops* that only exist during import (``bn``, ``relu``, ``clip``, ``bias_add``,
``softmax``); Q/DQ pairs, Identity and Dropout become aliases, and any node whose inputs are all
constants is evaluated once. Phase 2 fuses the pseudo ops into their producers (BatchNormalization
into the preceding conv/fc, ReLU/ReLU6 into the conv/fc/add clamp, constant adds into the bias), and
whatever cannot be fused is reported as an unsupported operator naming the ONNX node.

Quantized files keep their own numbers: a QuantizeLinear / DequantizeLinear on an activation sets
that tensor's scale and zero point (uint8 is shifted to int8 by 128, exactly), int8 weights and
int32 biases behind DequantizeLinear (or inside QLinearConv / QLinearMatMul) are kept as they are,
and the result is a `QuantizedModel`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelFormatError, TinytrainError, UnsupportedOperatorError
from .graph import Graph, Node, Tensor, name_layers
from .model import choose_rounding
from .quantize import within_bias_bound

__all__ = ["load_onnx", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 11
MAX_OPSET = onnx.defs.onnx_opset_version()
_MS_DOMAIN = "com.microsoft"


@dataclass
class _Act:
    """An activation as ONNX sees it: the IR tensor holding it and its ONNX rank (4 = NCHW, 2 = NF).

    ``nhwc``: the ONNX tensor is the (N, H, W, C) view of the IR tensor (a TensorFlow converter's
    input before its Transpose, or a map transposed back to NHWC before the classifier's Reshape)."""

    ir: str
    rank: int
    nhwc: bool = False


def _load_proto(model: Union[str, os.PathLike, onnx.ModelProto, bytes]) -> Tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "<ModelProto>"
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(model)), "<bytes>"
        except Exception as exc:  # protobuf raises DecodeError / RuntimeWarning variants
            raise ModelFormatError(f"<bytes>: not a valid ONNX protobuf ({exc})") from None
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelFormatError(f"{path}: not a valid ONNX protobuf (truncated or corrupt file?): {exc}") from None
    if not proto.graph.node and not proto.graph.input:
        raise ModelFormatError(f"{path}: the file holds no ONNX graph (empty or not an ONNX model)")
    base = os.path.dirname(os.path.abspath(path))
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            loc = os.path.join(base, info.get("location", ""))
            if not info.get("location") or not os.path.isfile(loc):
                raise ModelFormatError(
                    f"{path}: initializer {init.name!r} lives in external file {info.get('location')!r}, "
                    f"which is missing next to the model")
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if os.path.getsize(loc) < need:
                raise ModelFormatError(
                    f"{path}: external data file {info['location']!r} of initializer {init.name!r} is truncated "
                    f"({os.path.getsize(loc)} bytes, needs {need})")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, base)
    except Exception as exc:
        raise ModelFormatError(f"{path}: cannot read external data: {exc}") from None
    return proto, path


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Importer:
    def __init__(self, proto: onnx.ModelProto, where: str, input_shape=None) -> None:
        self.proto = proto
        self.where = where
        self.opsets = {o.domain or "": o.version for o in proto.opset_import}
        opset = self.opsets.get("", self.opsets.get("ai.onnx"))
        if opset is None:
            raise ModelFormatError(f"{where}: the model declares no default-domain (ai.onnx) opset")
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise ModelFormatError(
                f"{where}: opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}; "
                f"convert it with onnx.version_converter first")
        self.opset = opset
        self.input_shape = input_shape
        self.env: Dict[str, object] = {}  # onnx name -> np.ndarray (constant) or _Act
        self.qconst: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}  # DQ'd constants
        self.qparams: Dict[str, Tuple[float, int]] = {}  # IR tensor -> (scale, zero point)
        self.tensors: Dict[str, Tensor] = {}
        self.nodes: List[Node] = []

    # ---------------------------------------------------------------- helpers
    def _unsupported(self, node: onnx.NodeProto, reason: str = "") -> UnsupportedOperatorError:
        dom = node.domain or ""
        return UnsupportedOperatorError(node.name or f"<unnamed {node.op_type}>", node.op_type,
                                        self.opsets.get(dom, self.opset), reason)

    def _get(self, node: onnx.NodeProto, i: int):
        name = node.input[i] if i < len(node.input) else ""
        if name == "":
            return None
        if name not in self.env:
            raise ModelFormatError(
                f"{self.where}: node {node.name!r} ({node.op_type}) input {name!r} is neither an initializer, "
                f"a graph input nor the output of an earlier node (missing initializer?)")
        return self.env[name]

    def _const(self, node: onnx.NodeProto, i: int, what: str) -> Optional[np.ndarray]:
        v = self._get(node, i)
        if v is None or isinstance(v, np.ndarray):
            return v
        raise self._unsupported(node, f"{what} (input {i}, {node.input[i]!r}) must be a constant initializer")

    def _act(self, node: onnx.NodeProto, i: int) -> _Act:
        v = self._get(node, i)
        if not isinstance(v, _Act):
            raise self._unsupported(node, f"input {i} ({node.input[i]!r}) must be an activation, not a constant")
        return v

    def _shape(self, act: _Act) -> Tuple[int, int, int]:
        return self.tensors[act.ir].shape

    def _emit(self, onnx_node: onnx.NodeProto, op: str, inputs: List[str], shape, rank: int,
              attrs=None, params=None, out_index: int = 0) -> Node:
        out = onnx_node.output[out_index]
        if any(d <= 0 for d in shape):
            raise ModelFormatError(f"{self.where}: node {onnx_node.name!r} ({onnx_node.op_type}) gives an empty "
                                   f"output of shape {tuple(shape)}")
        self.tensors[out] = Tensor(out, tuple(int(d) for d in shape))
        a = {"onnx_node": onnx_node.name or out, "onnx_op": onnx_node.op_type,
             "onnx_opset": self.opsets.get(onnx_node.domain or "", self.opset)}
        a.update(attrs or {})
        n = Node(out, op, list(inputs), out, a, dict(params or {}))
        self.nodes.append(n)
        self.env[out] = _Act(out, rank)
        return n

    def _annotate(self, node: onnx.NodeProto, act: _Act, scale, zp) -> None:
        scale = np.asarray(scale, np.float64)
        if scale.size != 1:
            raise self._unsupported(node, "per-axis quantization of an activation (only weights may be per channel)")
        zpa = np.asarray(zp) if zp is not None else np.zeros((), np.uint8)
        if zpa.size != 1:
            raise self._unsupported(node, "per-axis zero point of an activation")
        z = int(zpa.reshape(())) - (128 if zpa.dtype == np.uint8 else 0)
        if zpa.dtype not in (np.int8, np.uint8):
            raise self._unsupported(node, f"activations quantized to {zpa.dtype} (int8/uint8 only)")
        s = float(scale.reshape(()))
        if not np.isfinite(s) or s <= 0:
            raise ModelFormatError(f"{self.where}: node {node.name!r} has a non-positive or non-finite scale {s}")
        prev = self.qparams.get(act.ir)
        if prev is not None and (abs(prev[0] - s) > 1e-6 * s or prev[1] != z):
            raise self._unsupported(node, f"tensor {act.ir!r} is quantized twice with different parameters "
                                          f"({prev} vs {(s, z)})")
        self.qparams[act.ir] = (s, z)

    def _fold(self, node: onnx.NodeProto, values: List[Optional[np.ndarray]]) -> None:
        """Evaluate a node whose inputs are all constants, once, at import."""
        from onnx.reference import ReferenceEvaluator

        ins = [n for n in node.input]
        feeds = {n: v for n, v in zip(ins, values) if n}
        g = onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for n, v in feeds.items()],
            [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
        m = onnx.helper.make_model(g, opset_imports=list(self.proto.opset_import))
        try:
            outs = ReferenceEvaluator(m).run(None, feeds)
        except Exception as exc:
            raise self._unsupported(node, f"cannot evaluate it on constant inputs: {exc}") from None
        for o, v in zip([o for o in node.output if o], outs):
            self.env[o] = np.asarray(v)

    # ---------------------------------------------------------------- phase 1
    def run(self, output: Optional[str] = None) -> Graph:
        g = self.proto.graph
        for init in g.initializer:
            try:
                self.env[init.name] = numpy_helper.to_array(init)
            except Exception as exc:
                raise ModelFormatError(f"{self.where}: initializer {init.name!r} cannot be decoded "
                                       f"(truncated or inconsistent data): {exc}") from None
        for sp in g.sparse_initializer:
            raise ModelFormatError(f"{self.where}: sparse initializer {sp.values.name!r} is not supported")
        inputs = [i for i in g.input if i.name not in self.env]
        if len(inputs) != 1:
            raise ModelFormatError(f"{self.where}: expected exactly one graph input (besides initializers), found "
                                   f"{[i.name for i in inputs]}")
        outputs = list(g.output)
        if output is not None:
            if output not in [o.name for o in outputs]:
                raise ModelFormatError(f"{self.where}: output={output!r} is not an output of the model; its outputs "
                                       f"are {', '.join(repr(o.name) for o in g.output)}")
            outputs = [o for o in outputs if o.name == output]
        elif len(outputs) > 1 and len({self._head_of(o.name) for o in outputs}) == 1:
            # int8 logits and a copy through DequantizeLinear / QuantizeLinear / Identity (a
            # converter's dequantized output): one head, kept as the first output
            soft = [o for o in outputs if self._producer(o.name) is not None
                    and self._producer(o.name).op_type in ("Softmax", "LogSoftmax")]
            outputs = soft[:1] or outputs[:1]
        if len(outputs) == 2:
            # logits plus their Softmax as a second output (what tinytrain's own QDQ export writes
            # for a model with a trailing Softmax): the Softmax output is the model's output.
            by_output = {o: n for n in g.node for o in n.output}
            names = {o.name for o in outputs}
            soft = [o for o in outputs if by_output.get(o.name) is not None
                    and by_output[o.name].op_type in ("Softmax", "LogSoftmax")
                    and by_output[o.name].input[0] in names - {o.name}]
            if len(soft) == 1:
                outputs = soft
        if len(outputs) != 1:
            raise ModelFormatError(f"{self.where}: the model has {len(outputs)} outputs "
                                   f"({', '.join(repr(o.name) for o in g.output)}); pass output=NAME to choose the "
                                   f"one to train")
        inp = inputs[0]
        self.input_name = inp.name
        dims = inp.type.tensor_type.shape.dim if inp.type.HasField("tensor_type") else []
        if len(dims) == 2 and self.input_shape is None:
            f = dims[1].dim_value if dims[1].HasField("dim_value") else 0
            if f <= 0:
                raise ModelFormatError(f"{self.where}: dynamic shape: input {inp.name!r} has {dims[1].dim_param!r} "
                                       f"features; pass input_shape=(F, 1, 1)")
            self.tensors[inp.name] = Tensor(inp.name, (int(f), 1, 1))
            self.env[inp.name] = _Act(inp.name, 2)
        elif len(dims) == 4 and self.input_shape is None and self._nhwc_input(inp.name, dims):
            d = [int(x.dim_value) for x in dims]
            self.tensors[inp.name] = Tensor(inp.name, (d[3], d[1], d[2]))
            self.env[inp.name] = _Act(inp.name, 4, nhwc=True)
        else:
            self.tensors[inp.name] = Tensor(inp.name, self._input_shape(inp))
            self.env[inp.name] = _Act(inp.name, 4)
        for node in self._needed(outputs[0].name):
            self._lower(node)
        out = self.env.get(outputs[0].name)
        if not isinstance(out, _Act):
            raise ModelFormatError(f"{self.where}: graph output {outputs[0].name!r} is not computed by the graph")
        self.output = out.ir
        return self._finish()

    def _to_nchw_next(self, name: str) -> bool:
        """True when `name` (behind Q/DQ) is read by a Transpose with perm (0, 3, 1, 2)."""
        for _ in range(4):
            users = [n for n in self.proto.graph.node if name in n.input]
            if len(users) != 1:
                return False
            if users[0].op_type in ("QuantizeLinear", "DequantizeLinear"):
                name = users[0].output[0]
                continue
            return users[0].op_type == "Transpose" and list(_attrs(users[0]).get("perm", [])) == [0, 3, 1, 2]
        return False

    def _producer(self, name: str) -> Optional[onnx.NodeProto]:
        for n in self.proto.graph.node:
            if name in n.output:
                return n
        return None

    def _head_of(self, name: str) -> str:
        """The tensor an output copies through Q/DQ, Identity, (QLinear)Softmax or Reshape nodes."""
        n = self._producer(name)
        while n is not None and n.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity", "Softmax",
                                              "LogSoftmax", "QLinearSoftmax", "Reshape", "Cast"):
            name = n.input[0]
            n = self._producer(name)
        return name

    def _needed(self, output: str) -> List[onnx.NodeProto]:
        """The nodes `output` depends on, in file order (another output's branch is not lowered)."""
        need, stack = set(), [output]
        producer = {o: i for i, n in enumerate(self.proto.graph.node) for o in n.output if o}
        while stack:
            i = producer.get(stack.pop())
            if i is not None and i not in need:
                need.add(i)
                stack.extend(x for x in self.proto.graph.node[i].input if x)
        return [n for i, n in enumerate(self.proto.graph.node) if i in need]

    def _nhwc_input(self, name: str, dims) -> bool:
        """TensorFlow converters keep the (N, H, W, C) input and reorder it right away: a Transpose
        with perm (0, 3, 1, 2), or (one channel) a Reshape to (N, 1, H, W), possibly behind Q/DQ."""
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]):
            return False
        _, h, w, c = [d.dim_value for d in dims]
        inits = {i.name: i for i in self.proto.graph.initializer}
        cur = name
        for _ in range(4):
            users = [n for n in self.proto.graph.node if cur in n.input]
            if len(users) != 1:
                return False
            n = users[0]
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] == cur:
                cur = n.output[0]
                continue
            if n.op_type == "Transpose":
                return list(_attrs(n).get("perm", [])) == [0, 3, 1, 2]
            if n.op_type == "Reshape" and c == 1 and len(n.input) > 1 and n.input[1] in inits:
                t = numpy_helper.to_array(inits[n.input[1]]).reshape(-1).tolist()
                return len(t) == 4 and t[1:] == [1, h, w]
            return False
        return False

    def _input_shape(self, inp: onnx.ValueInfoProto) -> Tuple[int, int, int]:
        t = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not t.HasField("shape"):
            if self.input_shape is None:
                raise ModelFormatError(f"{self.where}: input {inp.name!r} has no shape; pass input_shape=(C, H, W)")
        dims = list(t.shape.dim) if t.HasField("shape") else []
        if self.input_shape is not None:
            shape = tuple(int(d) for d in self.input_shape)
            if len(shape) != 3 or min(shape) <= 0:
                raise ValueError(f"input_shape must be (C, H, W) positive ints, got {self.input_shape}")
            if dims and len(dims) != 4:
                raise ModelFormatError(f"{self.where}: input {inp.name!r} has rank {len(dims)}, expected 4 (N, C, H, W)")
            for i, d in enumerate(dims[1:]):
                if d.HasField("dim_value") and d.dim_value != shape[i]:
                    raise ModelFormatError(f"{self.where}: input_shape {shape} contradicts input {inp.name!r} "
                                           f"dimension {i + 1} = {d.dim_value}")
            return shape
        if len(dims) != 4:
            raise ModelFormatError(f"{self.where}: input {inp.name!r} has rank {len(dims)}, expected 4 (N, C, H, W)")
        shape = []
        for i, d in enumerate(dims[1:], start=1):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                sym = d.dim_param or "?"
                raise ModelFormatError(
                    f"{self.where}: dynamic shape: input {inp.name!r} dimension {i} is {sym!r} and cannot be "
                    f"resolved; pass input_shape=(C, H, W) to tt.load_onnx or export with a fixed size")
            shape.append(int(d.dim_value))
        return tuple(shape)

    def _lower(self, node: onnx.NodeProto) -> None:
        op, dom = node.op_type, node.domain or ""
        if dom not in ("", "ai.onnx", _MS_DOMAIN):
            raise self._unsupported(node, f"custom domain {dom!r}")
        if op == "Constant":
            self._fold(node, [])
            return
        vals = [self._get(node, i) for i in range(len(node.input))]
        present = [v for v in vals if v is not None]
        if op not in _LAYOUT_OPS and any(isinstance(v, _Act) and v.nhwc and self._shape(v)[1:] != (1, 1)
                                         for v in vals):
            raise self._unsupported(node, "it reads an (N, H, W, C) tensor; only Transpose/Reshape/Flatten "
                                          "(and Q/DQ) may, as TensorFlow converters emit them at the edges")
        if op == "Shape" and isinstance(vals[0], _Act):
            c, h, w = self._shape(vals[0])
            full = np.array([1, c, h, w] if vals[0].rank == 4 else [1, c], np.int64)
            a = _attrs(node)
            self.env[node.output[0]] = full[a.get("start", 0): a.get("end", len(full))]
            return
        if op in ("QuantizeLinear", "DequantizeLinear") and isinstance(vals[0], np.ndarray):
            if op == "DequantizeLinear":
                self._dequant_const(node, vals)
                return
        if present and all(isinstance(v, np.ndarray) for v in present) and op not in _NEVER_FOLD:
            self._fold(node, vals)
            return
        handler = getattr(self, "_op_" + op, None)
        if handler is None:
            raise self._unsupported(node)
        handler(node, _attrs(node))

    def _dequant_const(self, node, vals) -> None:
        q, scale = vals[0], np.asarray(vals[1], np.float64)
        zp = vals[2] if len(vals) > 2 and vals[2] is not None else np.zeros((), q.dtype)
        axis = _attrs(node).get("axis", 1)
        if q.ndim == 0 or scale.size == 1:
            f = (q.astype(np.float64) - np.asarray(zp, np.float64)) * scale.reshape(())
            axis = None
        else:
            axis = axis % q.ndim
            bshape = [1] * q.ndim
            bshape[axis] = -1
            f = (q.astype(np.float64) - np.asarray(zp, np.float64).reshape(bshape)) * scale.reshape(bshape)
        self.env[node.output[0]] = f.astype(np.float32)
        self.qconst[node.output[0]] = (q, scale, np.asarray(zp), axis)

    # ---- aliases and Q/DQ on activations
    def _alias(self, node, a) -> None:
        self.env[node.output[0]] = self._act(node, 0)

    _op_Identity = _alias

    def _op_Dropout(self, node, a) -> None:
        self._alias(node, a)
        if len(node.output) > 1 and node.output[1]:
            raise self._unsupported(node, "the mask output is used (inference Dropout has none)")

    def _op_QuantizeLinear(self, node, a) -> None:
        x = self._act(node, 0)
        if a.get("axis", 1) != 1 and np.asarray(self._const(node, 1, "scale")).size > 1:
            raise self._unsupported(node, "per-axis activation quantization")
        self._annotate(node, x, self._const(node, 1, "scale"), self._const(node, 2, "zero point"))
        self.env[node.output[0]] = x

    def _op_DequantizeLinear(self, node, a) -> None:
        x = self._act(node, 0)
        zp = self._const(node, 2, "zero point")
        if zp is None:
            zp = np.zeros((), np.int8)
        self._annotate(node, x, self._const(node, 1, "scale"), zp)
        self.env[node.output[0]] = x

    # ---- conv family
    def _conv_geometry(self, node, a, hw, kernel):
        kh, kw = kernel
        strides = tuple(a.get("strides", [1, 1]))
        dil = tuple(a.get("dilations", [1, 1]))
        if dil != (1, 1):
            raise self._unsupported(node, f"dilations {list(dil)} (only 1 is supported)")
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        h, w = hw
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = []
            for size, k, s in ((h, kh, strides[0]), (w, kw, strides[1])):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                small, big = total // 2, total - total // 2
                pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
            t, l, b, r = pads[0][0], pads[1][0], pads[0][1], pads[1][1]
        elif auto == "VALID":
            t = l = b = r = 0
        elif auto == "NOTSET":
            p = list(a.get("pads", [0, 0, 0, 0]))
            if len(p) != 4:
                raise self._unsupported(node, f"pads {p}: only 2-D spatial ops are supported")
            t, l, b, r = p[0], p[1], p[2], p[3]
        else:
            raise ModelFormatError(f"{self.where}: node {node.name!r} has an invalid auto_pad {auto!r}")
        if a.get("ceil_mode", 0):
            oh = -(-(h + t + b - kh) // strides[0]) + 1
            ow = -(-(w + l + r - kw) // strides[1]) + 1
            # ceil mode adds a partial last window; express it as extra bottom/right padding
            b += (oh - 1) * strides[0] + kh - (h + t + b)
            r += (ow - 1) * strides[1] + kw - (w + l + r)
        oh = (h + t + b - kh) // strides[0] + 1
        ow = (w + l + r - kw) // strides[1] + 1
        if oh <= 0 or ow <= 0:
            raise ModelFormatError(f"{self.where}: node {node.name!r}: kernel {kernel} does not fit input {hw}")
        return (int(strides[0]), int(strides[1])), (int(t), int(l), int(b), int(r)), (oh, ow)

    def _conv(self, node, a, x: _Act, w: np.ndarray, b: Optional[np.ndarray], extra=None) -> Node:
        if x.rank != 4 or w.ndim != 4:
            raise self._unsupported(node, "only 2-D convolutions (NCHW input, OIHW weight) are supported")
        c, h, wd = self._shape(x)
        o, ig, kh, kw = w.shape
        groups = int(a.get("group", 1))
        if "kernel_shape" in a and tuple(a["kernel_shape"]) != (kh, kw):
            raise ModelFormatError(f"{self.where}: node {node.name!r}: kernel_shape {a['kernel_shape']} != weight {w.shape}")
        if c % groups or o % groups or ig * groups != c:
            raise ModelFormatError(f"{self.where}: node {node.name!r}: weight {w.shape} with group={groups} does not "
                                   f"match {c} input channels")
        stride, pads, (oh, ow) = self._conv_geometry(node, a, (h, wd), (kh, kw))
        bias = np.zeros(o, np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
        if bias.shape != (o,):
            raise ModelFormatError(f"{self.where}: node {node.name!r}: bias of shape {b.shape} for {o} channels")
        attrs = {"kernel": (kh, kw), "stride": stride, "pads": pads, "groups": groups, "act": "none"}
        attrs.update(extra or {})
        return self._emit(node, "conv", [x.ir], (o, oh, ow), 4, attrs,
                          {"weight": np.asarray(w, np.float32), "bias": bias})

    def _op_Conv(self, node, a) -> None:
        x = self._act(node, 0)
        w = self._const(node, 1, "weight")
        b = self._const(node, 2, "bias")
        extra = {}
        if node.input[1] in self.qconst:
            extra["_wq"] = self.qconst[node.input[1]]
        if len(node.input) > 2 and node.input[2] in self.qconst:
            extra["_bq"] = self.qconst[node.input[2]]
        self._conv(node, a, x, w, b, extra)

    def _op_QLinearConv(self, node, a) -> None:
        x = self._act(node, 0)
        self._annotate(node, x, self._const(node, 1, "x_scale"), self._const(node, 2, "x_zero_point"))
        wq = self._const(node, 3, "weight")
        ws = np.asarray(self._const(node, 4, "w_scale"), np.float64)
        wz = np.asarray(self._const(node, 5, "w_zero_point"))
        bshape = (-1, 1, 1, 1) if ws.size > 1 else ()
        w = ((wq.astype(np.float64) - wz.astype(np.float64).reshape(bshape if wz.size > 1 else ())) *
             ws.reshape(bshape)).astype(np.float32)
        bq = self._const(node, 8, "bias")
        extra = {"_wq": (wq, ws, wz, 0 if ws.size > 1 else None)}
        sx = float(np.asarray(self._const(node, 1, "x_scale")).reshape(()))
        b = None
        if bq is not None:
            b = (bq.astype(np.float64) * sx * np.broadcast_to(ws.reshape(-1), bq.shape)).astype(np.float32)
            extra["_bq"] = (bq, sx * np.broadcast_to(ws.reshape(-1), bq.shape), np.zeros((), np.int32), 0)
        n = self._conv(node, a, x, w, b, extra)
        self._annotate(node, self.env[n.output], self._const(node, 6, "y_scale"), self._const(node, 7, "y_zero_point"))

    def _op_BatchNormalization(self, node, a) -> None:
        x = self._act(node, 0)
        if a.get("training_mode", 0):
            raise self._unsupported(node, "training_mode=1 (export the model in inference mode)")
        if len([o for o in node.output if o]) > 1:
            raise self._unsupported(node, "running-statistics outputs (training mode)")
        scale, bias, mean, var = (np.asarray(self._const(node, i, n), np.float64)
                                  for i, n in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
        c = self._shape(x)[0]
        for arr, nm in ((scale, "scale"), (bias, "bias"), (mean, "mean"), (var, "var")):
            if arr.shape != (c,):
                raise ModelFormatError(f"{self.where}: node {node.name!r}: BatchNormalization {nm} has shape "
                                       f"{arr.shape}, expected ({c},)")
        k = scale / np.sqrt(var + a.get("epsilon", 1e-5))
        self._emit(node, "bn", [x.ir], self._shape(x), x.rank, {}, {"mul": k, "add": bias - mean * k})

    # ---- activations
    def _op_Relu(self, node, a) -> None:
        x = self._act(node, 0)
        self._emit(node, "relu", [x.ir], self._shape(x), x.rank, {"act": "relu"})

    def _op_Clip(self, node, a) -> None:
        x = self._act(node, 0)
        if self.opsets.get("", 11) < 11 or "min" in a or "max" in a:
            lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        else:
            lo_c, hi_c = self._const(node, 1, "min"), self._const(node, 2, "max")
            lo = -np.inf if lo_c is None else float(np.asarray(lo_c).reshape(()))
            hi = np.inf if hi_c is None else float(np.asarray(hi_c).reshape(()))
        if lo == 0 and hi == 6:
            act = "relu6"
        elif lo == 0 and np.isinf(hi):
            act = "relu"
        else:
            raise self._unsupported(node, f"Clip to [{lo}, {hi}] (only ReLU [0, inf) and ReLU6 [0, 6] are supported)")
        self._emit(node, "relu", [x.ir], self._shape(x), x.rank, {"act": act})

    # ---- element-wise
    def _op_Add(self, node, a) -> None:
        x0, x1 = self._get(node, 0), self._get(node, 1)
        if isinstance(x0, _Act) and isinstance(x1, _Act):
            if self._shape(x0) != self._shape(x1):
                raise self._unsupported(node, f"Add of shapes {self._shape(x0)} and {self._shape(x1)} "
                                              f"(broadcasting between activations is not supported)")
            self._emit(node, "add", [x0.ir, x1.ir], self._shape(x0), max(x0.rank, x1.rank), {"act": "none"})
            return
        x, c_ = (x0, x1) if isinstance(x0, _Act) else (x1, x0)
        ch = self._shape(x)[0]
        cv = np.asarray(c_, np.float64)
        per_channel = cv.reshape(-1) if cv.size == ch else np.full(ch, float(cv.reshape(-1)[0])) if cv.size == 1 else None
        ok_shape = (x.rank == 2 and cv.shape[-1:] == (ch,)) or (x.rank == 4 and cv.size in (1, ch) and
                                                                 (cv.ndim < 3 or cv.shape[-2:] == (1, 1)))
        if per_channel is None or not ok_shape:
            raise self._unsupported(node, f"Add of a constant of shape {cv.shape} (only a per-channel bias can be "
                                          f"folded into the preceding conv/fc)")
        name = node.input[1] if x is x0 else node.input[0]
        self._emit(node, "bias_add", [x.ir], self._shape(x), x.rank, {"_bq": self.qconst.get(name)},
                   {"add": per_channel})

    def _op_QLinearAdd(self, node, a) -> None:
        xa, xb = self._get(node, 0), self._get(node, 3)
        if isinstance(xa, _Act):
            self._annotate(node, xa, self._const(node, 1, "A_scale"), self._const(node, 2, "A_zero_point"))
        if isinstance(xb, _Act):
            self._annotate(node, xb, self._const(node, 4, "B_scale"), self._const(node, 5, "B_zero_point"))
        if isinstance(xa, _Act) and isinstance(xb, _Act):
            if self._shape(xa) != self._shape(xb):
                raise self._unsupported(node, "broadcasting QLinearAdd")
            n = self._emit(node, "add", [xa.ir, xb.ir], self._shape(xa), max(xa.rank, xb.rank), {"act": "none"})
        elif isinstance(xa, _Act) or isinstance(xb, _Act):
            # onnxruntime's quantizer turns a MatMul's bias Add into QLinearAdd of a quantized constant:
            # dequantized, it folds into the fc's bias (re-quantized with s_in * s_w)
            x, (ci, si, zi) = (xa, (3, 4, 5)) if isinstance(xa, _Act) else (xb, (0, 1, 2))
            cq = self._const(node, ci, "constant operand")
            cs = np.asarray(self._const(node, si, "constant scale"), np.float64)
            cz = self._get(node, zi)
            cz = np.zeros((), np.float64) if cz is None else np.asarray(cz, np.float64)
            cv = (cq.astype(np.float64) - cz) * cs
            ch = self._shape(x)[0]
            if cv.size not in (1, ch) or cs.size != 1:
                raise self._unsupported(node, f"QLinearAdd of a constant of shape {cq.shape} (only a per-channel "
                                              f"bias folds into the preceding fc/conv)")
            n = self._emit(node, "bias_add", [x.ir], self._shape(x), x.rank, {"_bq": None},
                           {"add": np.broadcast_to(cv.reshape(-1), (ch,)).copy()})
        self._annotate(node, self.env[n.output], self._const(node, 6, "C_scale"), self._const(node, 7, "C_zero_point"))

    # ---- pooling and shape ops
    def _op_GlobalAveragePool(self, node, a) -> None:
        x = self._act(node, 0)
        self._emit(node, "global_avgpool", [x.ir], (self._shape(x)[0], 1, 1), 4)

    def _op_ReduceMean(self, node, a) -> None:
        x = self._act(node, 0)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self._const(node, 1, "axes")
        axes = sorted(int(v) % 4 for v in np.asarray(axes).reshape(-1)) if axes is not None else None
        if x.rank != 4 or axes != [2, 3]:
            raise self._unsupported(node, f"ReduceMean over axes {axes} (only the spatial axes [2, 3] are supported)")
        self._emit(node, "global_avgpool", [x.ir], (self._shape(x)[0], 1, 1), 4 if a.get("keepdims", 1) else 2)

    def _pool(self, node, a, op: str) -> None:
        x = self._act(node, 0)
        c, h, w = self._shape(x)
        kernel = tuple(a.get("kernel_shape", ()))
        if len(kernel) != 2 or x.rank != 4:
            raise self._unsupported(node, f"kernel_shape {list(kernel)}: only 2-D pooling is supported")
        if len([o for o in node.output if o]) > 1:
            raise self._unsupported(node, "the Indices output")
        stride, pads, (oh, ow) = self._conv_geometry(node, a, (h, w), kernel)
        if op == "avgpool" and a.get("count_include_pad", 0) and any(pads):
            raise self._unsupported(node, "count_include_pad=1 with padding (padding is excluded from averages)")
        if op == "avgpool" and kernel == (h, w) and not any(pads):
            self._emit(node, "global_avgpool", [x.ir], (c, 1, 1), 4, {"_window": (kernel, stride)})
            return
        self._emit(node, op, [x.ir], (c, oh, ow), 4, {"kernel": kernel, "stride": stride, "pads": pads})

    def _op_AveragePool(self, node, a) -> None:
        self._pool(node, a, "avgpool")

    def _op_MaxPool(self, node, a) -> None:
        if a.get("storage_order", 0):
            raise self._unsupported(node, "storage_order=1")
        self._pool(node, a, "maxpool")

    def _flatten_to_rank2(self, node, x: _Act) -> None:
        c, h, w = self._shape(x)
        if h * w == 1:
            self.env[node.output[0]] = _Act(x.ir, 2)
        else:
            # an NHWC view flattens in (H, W, C) order already: its columns need no permutation
            self._emit(node, "flatten", [x.ir], (c * h * w, 1, 1), 2, {"hwc_order": x.nhwc})

    def _op_Transpose(self, node, a) -> None:
        x = self._act(node, 0)
        perm = list(a.get("perm", []))
        c, h, w = self._shape(x)
        if x.rank == 4 and perm == [0, 3, 1, 2] and (x.nhwc or h * w == 1):
            self.env[node.output[0]] = _Act(x.ir, 4)
        elif x.rank == 4 and perm == [0, 2, 3, 1] and (not x.nhwc or h * w == 1):
            self.env[node.output[0]] = _Act(x.ir, 4, nhwc=True)
        elif perm == list(range(len(perm))) or (x.rank == 2 and perm == [0, 1]):
            self.env[node.output[0]] = x
        else:
            raise self._unsupported(node, f"perm {perm} (only NHWC <-> NCHW at the graph's edges, which is a "
                                          f"change of view, not of data)")

    def _op_Squeeze(self, node, a) -> None:
        x = self._act(node, 0)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self._const(node, 1, "axes")
        axes = sorted(int(v) % 4 for v in np.asarray(axes).reshape(-1)) if axes is not None else None
        c, h, w = self._shape(x)
        spatial = [1, 2] if x.nhwc else [2, 3]
        if x.rank == 4 and h * w == 1 and axes in (spatial, None) and c > 1:
            self.env[node.output[0]] = _Act(x.ir, 2)
            return
        raise self._unsupported(node, f"Squeeze of axes {axes} on shape {self._shape(x)} (only the 1x1 spatial axes)")

    def _op_Unsqueeze(self, node, a) -> None:
        x = self._act(node, 0)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self._const(node, 1, "axes")
        axes = sorted(int(v) % 4 for v in np.asarray(axes).reshape(-1)) if axes is not None else None
        if x.rank == 2 and axes == [2, 3]:
            self.env[node.output[0]] = _Act(x.ir, 4)
            return
        raise self._unsupported(node, f"Unsqueeze of axes {axes} (only (N, C) -> (N, C, 1, 1))")

    def _op_Pad(self, node, a) -> None:
        x = self._act(node, 0)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = a.get("pads")
        if pads is None:
            pads = self._const(node, 1, "pads")
        p = [int(v) for v in np.asarray(pads).reshape(-1)]
        if x.rank != 4 or x.nhwc or len(p) != 8 or p[0] or p[1] or p[4] or p[5] or min(p) < 0 or mode != "constant":
            raise self._unsupported(node, f"Pad {mode} {p} (only non-negative constant padding of H and W of NCHW)")
        value = a.get("value", None)
        if value is None and len(node.input) > 2:
            value = self._const(node, 2, "constant_value")
        v = np.asarray(0.0 if value is None else value)
        zero = 0
        if v.dtype.kind in "iu":
            if x.ir not in self.qparams:
                raise self._unsupported(node, "integer padding of a tensor whose quantization is not known yet")
            zero = self.qparams[x.ir][1] + (128 if v.dtype == np.uint8 else 0)
        if v.size != 1 or float(v.reshape(())) != zero:
            raise self._unsupported(node, f"padding with {v.reshape(-1).tolist()} (only with the value of zero, "
                                          f"which folds into the next Conv's pads)")
        c, h, w = self._shape(x)
        t, l, b, r = p[2], p[3], p[6], p[7]
        n = self._emit(node, "pad", [x.ir], (c, h + t + b, w + l + r), 4, {"pads": (t, l, b, r)})
        if x.ir in self.qparams:
            self.qparams[n.output] = self.qparams[x.ir]

    def _op_QLinearAveragePool(self, node, a) -> None:
        x = self._act(node, 0)
        if a.get("channels_last", 0):
            raise self._unsupported(node, "channels_last=1")
        self._annotate(node, x, self._const(node, 1, "x_scale"), self._const(node, 2, "x_zero_point"))
        self._pool(node, a, "avgpool")
        self._annotate(node, self.env[node.output[0]], self._const(node, 3, "y_scale"),
                       self._const(node, 4, "y_zero_point"))

    def _op_QLinearSigmoid(self, node, a) -> None:
        raise self._unsupported(node, "sigmoid has no int8 kernel or backward in tinytrain (ReLU/ReLU6 only)")

    _op_QLinearLeakyRelu = _op_QLinearSigmoid

    def _op_QLinearConcat(self, node, a) -> None:
        raise self._unsupported(node, "channel concatenation has no op in tinytrain's graph (no kernel, no backward)")

    _op_Concat = _op_QLinearConcat

    def _op_Flatten(self, node, a) -> None:
        x = self._act(node, 0)
        if a.get("axis", 1) != 1:
            raise self._unsupported(node, f"axis={a.get('axis')} (only axis=1 keeps the batch dimension)")
        self._flatten_to_rank2(node, x)

    def _op_Reshape(self, node, a) -> None:
        x = self._act(node, 0)
        target = self._get(node, 1)
        if not isinstance(target, np.ndarray):
            raise self._unsupported(node, "the target shape is computed at run time (it must be a constant)")
        c, h, w = self._shape(x)
        numel = c * h * w
        t = [int(v) for v in target.reshape(-1)]
        src = ([1, h, w, c] if x.nhwc else [1, c, h, w]) if x.rank == 4 else [1, c]
        t = [src[i] if (v == 0 and not a.get("allowzero", 0) and i < len(src)) else v for i, v in enumerate(t)]
        if t and t[0] in (1, -1) and len(t) in (2, 4):
            rest = t[1:]
            if -1 in rest:
                known = int(np.prod([v for v in rest if v != -1]))
                rest = [numel // known if v == -1 else v for v in rest]
            if len(rest) == 1 and rest[0] == numel:
                self._flatten_to_rank2(node, x)
                return
            if (x.ir == self.input_name and x.rank == 2 and len(rest) == 3 and min(rest) > 0
                    and int(np.prod(rest)) == numel and not any(x.ir in n.inputs for n in self.nodes)):
                # a flat (N, F) input reshaped at the entry (micro_speech's (1, 1960) -> 49x40x1) is
                # the same bytes as the map: the reshape becomes the input's shape. A converter's
                # (N, H, W, C) target is followed by a Transpose to NCHW, which then applies as usual.
                nhwc = self._to_nchw_next(node.output[0])
                chw = (rest[2], rest[0], rest[1]) if nhwc else tuple(rest)
                self.tensors[x.ir] = Tensor(x.ir, chw)
                self.env[node.output[0]] = _Act(x.ir, 4, nhwc=nhwc)
                return
            if x.nhwc and len(rest) == 3 and c == 1 and rest == [1, h, w]:
                # one channel: (N, H, W, 1) and (N, 1, H, W) hold the same bytes
                self.env[node.output[0]] = _Act(x.ir, 4)
                return
            if x.nhwc and len(rest) == 3 and rest == [h, w, c]:
                self.env[node.output[0]] = x
                return
            if len(rest) == 3 and rest == [numel, 1, 1] and h * w == 1:
                self.env[node.output[0]] = _Act(x.ir, 4)
                return
            if len(rest) == 3 and rest == [c, h, w] and not x.nhwc:
                self.env[node.output[0]] = _Act(x.ir, 4)
                return
        raise self._unsupported(node, f"Reshape of (N, {c}, {h}, {w}) to {list(target.reshape(-1))} (only flattening "
                                      f"to (N, features) or to (N, C, 1, 1) is supported)")

    # ---- fully connected
    def _fc(self, node, x: _Act, w: np.ndarray, b: Optional[np.ndarray], extra=None) -> Node:
        """w is (O, I) in ONNX column order (the flattening of NCHW); permuted to the IR's HWC order."""
        src = x.ir
        producer = next((n for n in self.nodes if n.output == x.ir), None)
        hwc = False
        if producer is not None and producer.op == "flatten":
            src = producer.inputs[0]
            hwc = bool(producer.attrs.get("hwc_order"))
        c, h, wd = self.tensors[src].shape
        o, i = w.shape
        if i != c * h * wd:
            raise ModelFormatError(f"{self.where}: node {node.name!r}: weight has {i} inputs, the activation has "
                                   f"{c * h * wd} features")
        extra = dict(extra or {})
        perm = None
        if h * wd > 1 and not hwc:
            perm = np.arange(i).reshape(c, h, wd).transpose(1, 2, 0).reshape(-1)
            w = w[:, perm]
        if perm is not None and extra.get("_wq") is not None:
            q, sc, zp, axis = extra["_wq"]
            extra["_wq"] = (q[:, perm], sc, zp[:, perm] if np.ndim(zp) == 2 else zp, axis)
        bias = np.zeros(o, np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
        if bias.shape != (o,):
            raise ModelFormatError(f"{self.where}: node {node.name!r}: bias of shape {np.shape(b)} for {o} outputs")
        attrs = {"act": "none"}
        attrs.update(extra)
        return self._emit(node, "fc", [src], (o, 1, 1), 2, attrs, {"weight": np.asarray(w, np.float32), "bias": bias})

    def _op_Gemm(self, node, a) -> None:
        x = self._act(node, 0)
        if x.rank != 2:
            raise self._unsupported(node, "Gemm on a 4-D input (flatten it first)")
        if a.get("transA", 0):
            raise self._unsupported(node, "transA=1")
        w = np.asarray(self._const(node, 1, "B"), np.float32)
        if w.ndim != 2:
            raise ModelFormatError(f"{self.where}: node {node.name!r}: B must be 2-D, got {w.shape}")
        extra = {}
        wq = self.qconst.get(node.input[1])
        if a.get("transB", 0) == 0:
            w = w.T
            if wq is not None:
                wq = (wq[0].T, wq[1], wq[2].T if np.ndim(wq[2]) == 2 else wq[2], None if wq[3] is None else 1 - wq[3])
        if wq is not None and a.get("alpha", 1.0) == 1.0:
            extra["_wq"] = wq
        w = w * np.float32(a.get("alpha", 1.0))
        c_ = self._const(node, 2, "C")
        if c_ is not None:
            c_ = np.asarray(c_, np.float32) * np.float32(a.get("beta", 1.0))
            if c_.size == 1:
                c_ = np.full(w.shape[0], float(c_.reshape(-1)[0]), np.float32)
            if len(node.input) > 2 and node.input[2] in self.qconst and a.get("beta", 1.0) == 1.0:
                extra["_bq"] = self.qconst[node.input[2]]
        self._fc(node, x, w, c_, extra)

    def _op_MatMul(self, node, a) -> None:
        x = self._act(node, 0)
        w = self._const(node, 1, "B")
        if x.rank != 2 or w.ndim != 2:
            raise self._unsupported(node, "MatMul other than (N, features) x constant (features, outputs)")
        extra = {}
        wq = self.qconst.get(node.input[1])
        if wq is not None:
            extra["_wq"] = (wq[0].T, wq[1], wq[2].T if np.ndim(wq[2]) == 2 else wq[2], None if wq[3] is None else 1 - wq[3])
        self._fc(node, x, np.asarray(w, np.float32).T, None, extra)

    def _op_QLinearMatMul(self, node, a) -> None:
        x = self._act(node, 0)
        self._annotate(node, x, self._const(node, 1, "a_scale"), self._const(node, 2, "a_zero_point"))
        bq = self._const(node, 3, "b")
        bs = np.asarray(self._const(node, 4, "b_scale"), np.float64).reshape(-1)
        bz = np.asarray(self._const(node, 5, "b_zero_point"))
        if x.rank != 2 or bq.ndim != 2:
            raise self._unsupported(node, "QLinearMatMul other than (N, features) x constant (features, outputs)")
        w = ((bq.astype(np.float64) - bz.astype(np.float64).reshape(1, -1 if bz.size > 1 else 1)) *
             bs.reshape(1, -1)).T.astype(np.float32)
        n = self._fc(node, x, w, None, {"_wq": (bq.T, bs, bz.reshape(-1), 0 if bs.size > 1 else None)})
        self._annotate(node, self.env[n.output], self._const(node, 6, "y_scale"), self._const(node, 7, "y_zero_point"))

    def _op_QGemm(self, node, a) -> None:
        x = self._act(node, 0)
        self._annotate(node, x, self._const(node, 1, "a_scale"), self._const(node, 2, "a_zero_point"))
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0:
            raise self._unsupported(node, "transA=1 or alpha != 1")
        if self._get(node, 7) is None:
            raise self._unsupported(node, "a float output (no y_scale): the output must stay quantized")
        bq = self._const(node, 3, "B")
        bs = np.asarray(self._const(node, 4, "b_scale"), np.float64).reshape(-1)
        bz = np.asarray(self._const(node, 5, "b_zero_point"))
        if x.rank != 2 or bq.ndim != 2:
            raise self._unsupported(node, "QGemm other than (N, features) x constant matrix")
        wq = bq if a.get("transB", 0) else bq.T
        w = ((wq.astype(np.float64) - bz.astype(np.float64).reshape(-1, 1 if bz.size > 1 else 1)) *
             bs.reshape(-1, 1)).astype(np.float32)
        sa = float(np.asarray(self._const(node, 1, "a_scale")).reshape(()))
        cq = self._const(node, 6, "C")
        extra = {"_wq": (wq, bs, bz.reshape(-1), 0 if bs.size > 1 else None)}
        b = None
        if cq is not None:
            s_b = sa * np.broadcast_to(bs, (w.shape[0],))
            b = (cq.astype(np.float64).reshape(-1) * s_b).astype(np.float32)
            extra["_bq"] = (cq.reshape(-1), s_b, np.zeros((), np.int32), 0)
        n = self._fc(node, x, w, b, extra)
        self._annotate(node, self.env[n.output], self._const(node, 7, "y_scale"), self._const(node, 8, "y_zero_point"))

    def _op_QLinearGlobalAveragePool(self, node, a) -> None:
        x = self._act(node, 0)
        if a.get("channels_last", 0):
            raise self._unsupported(node, "channels_last=1")
        self._annotate(node, x, self._const(node, 1, "x_scale"), self._const(node, 2, "x_zero_point"))
        n = self._emit(node, "global_avgpool", [x.ir], (self._shape(x)[0], 1, 1), 4)
        self._annotate(node, self.env[n.output], self._const(node, 3, "y_scale"), self._const(node, 4, "y_zero_point"))

    def _op_QLinearSoftmax(self, node, a) -> None:
        x = self._act(node, 0)
        self._annotate(node, x, self._const(node, 1, "X_scale"), self._const(node, 2, "x_zero_point"))
        self._op_Softmax(node, {"axis": a.get("axis", -1)})

    def _op_Softmax(self, node, a) -> None:
        x = self._act(node, 0)
        axis = a.get("axis", -1 if self.opset >= 13 else 1)
        if x.rank != 2 or axis not in (1, -1):
            raise self._unsupported(node, "Softmax other than over the class axis of (N, classes)")
        self._emit(node, "softmax", [x.ir], self._shape(x), 2)

    _op_LogSoftmax = _op_Softmax

    # ---------------------------------------------------------------- phase 2
    def _consumers(self, tensor: str) -> List[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def _replace_uses(self, old: str, new: str) -> None:
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        if self.output == old:
            self.output = new

    def _err(self, n: Node, reason: str) -> UnsupportedOperatorError:
        return UnsupportedOperatorError(n.attrs["onnx_node"], n.attrs["onnx_op"], n.attrs["onnx_opset"], reason)

    def _remove_into_producer(self, n: Node, prod: Node) -> None:
        """n's output becomes prod's output (n is deleted)."""
        self.nodes.remove(n)
        del self.tensors[prod.output]
        old = prod.output
        if old in self.qparams and n.output not in self.qparams:
            self.qparams[n.output] = self.qparams[old]
        self.qparams.pop(old, None)
        prod.output = n.output
        prod.name = n.output

    def _fusable_producer(self, n: Node, ops) -> Optional[Node]:
        prod = next((p for p in self.nodes if p.output == n.inputs[0]), None)
        if prod is None or prod.op not in ops or len(self._consumers(prod.output)) != 1 or prod.output == self.output:
            return None
        return prod

    def _finish(self) -> Graph:
        for n in list(self.nodes):
            if n.op == "pad":
                users = self._consumers(n.output)
                if not users or any(u.op != "conv" for u in users) or n.output == self.output:
                    raise self._err(n, "a Pad is only supported right before Conv (it folds into the Conv's pads)")
                qin, qout = self.qparams.get(n.inputs[0]), self.qparams.get(n.output)
                if qin != qout:
                    raise self._err(n, f"its output is quantized differently from its input ({qout} vs {qin})")
                for u in users:
                    u.attrs["pads"] = tuple(int(p + q) for p, q in zip(u.attrs["pads"], n.attrs["pads"]))
                    u.inputs = [n.inputs[0] if i == n.output else i for i in u.inputs]
                self.nodes.remove(n)
                del self.tensors[n.output]
                self.qparams.pop(n.output, None)
        for n in list(self.nodes):
            if n.op == "bn":
                prod = self._fusable_producer(n, ("conv", "fc"))
                if prod is not None and prod.attrs.get("act", "none") == "none":
                    k, add = n.params["mul"], n.params["add"]
                    wshape = (-1,) + (1,) * (prod.params["weight"].ndim - 1)
                    prod.params["weight"] = (prod.params["weight"] * k.reshape(wshape)).astype(np.float32)
                    prod.params["bias"] = (prod.params["bias"] * k + add).astype(np.float32)
                    prod.attrs.pop("_wq", None)
                    prod.attrs.pop("_bq", None)
                    self._remove_into_producer(n, prod)
                else:
                    c = self.tensors[n.inputs[0]].shape[0]
                    # a BatchNormalization with no conv/fc to fold into is a 1x1 depthwise conv
                    n.op = "conv"
                    n.attrs.update({"kernel": (1, 1), "stride": (1, 1), "pads": (0, 0, 0, 0), "groups": c, "act": "none"})
                    n.params = {"weight": n.params["mul"].reshape(c, 1, 1, 1).astype(np.float32),
                                "bias": n.params["add"].astype(np.float32)}
            elif n.op == "bias_add":
                prod = self._fusable_producer(n, ("conv", "fc"))
                if prod is None or prod.attrs.get("act", "none") != "none":
                    raise self._err(n, "a constant Add must directly follow a Conv/Gemm/MatMul it can be folded into")
                had_bias = bool(prod.params["bias"].any())
                prod.params["bias"] = (prod.params["bias"] + n.params["add"]).astype(np.float32)
                if n.attrs.get("_bq") is not None and not had_bias:
                    prod.attrs["_bq"] = n.attrs["_bq"]
                else:
                    prod.attrs.pop("_bq", None)
                self._remove_into_producer(n, prod)
            elif n.op == "relu":
                prod = self._fusable_producer(n, ("conv", "fc", "add"))
                if prod is None or prod.attrs.get("act", "none") != "none":
                    raise self._err(n, "a ReLU/ReLU6 must directly follow a Conv, Gemm/MatMul or Add (it is fused into "
                                       "their output clamp)")
                prod.attrs["act"] = n.attrs["act"]
                self._remove_into_producer(n, prod)
        softmax_tail = False
        for n in list(self.nodes):
            if n.op == "softmax":
                if n.output != self.output:
                    raise self._err(n, "Softmax is only supported as the last op (kept for inference, skipped for training)")
                self.nodes.remove(n)
                del self.tensors[n.output]
                self.output = n.inputs[0]
                softmax_tail = True
        self._dead_code()
        for n in self.nodes:
            window = n.attrs.pop("_window", None)
            qin, qout = self.qparams.get(n.inputs[0]) if n.inputs else None, self.qparams.get(n.output)
            if window is not None and qin is not None and qin == qout:
                # an int8 AveragePool that keeps its quantization (tf2onnx's AVERAGE_POOL_2D) rounds
                # its sum as TFLite does: that is avgpool, not the rescaling global_avgpool
                n.op = "avgpool"
                n.attrs.update({"kernel": window[0], "stride": window[1], "pads": (0, 0, 0, 0)})
        for n in self.nodes:
            if n.op == "flatten" and (n.output == self.output or
                                      any(c.op != "fc" for c in self._consumers(n.output))):
                # the IR flattens in (H, W, C) order; only an fc (whose columns are permuted at
                # import) may read it, anything else would see ONNX's (C, H, W) order changed
                raise self._err(n, "a flattened feature map (H*W > 1) may only feed Gemm/MatMul")
        self._rename()
        g = Graph(self.input_name, self.output, self.tensors, self.nodes, softmax_tail)
        if self.qparams:
            from .quantize import from_imported

            q = from_imported(g, self.qparams, self.where)
            # tf2onnx quantizes nothing itself: a quantized file it wrote is an int8 TFLite model,
            # whose numbers are those of TFLite's double rounding (tt.load_tflite on the source
            # gives the same model). onnxruntime's quantizer writes "onnx.quantize" and its files
            # keep single rounding, which agrees best with onnxruntime's float requantization.
            props = {p.key: p.value for p in self.proto.metadata_props}
            if self.proto.producer_name == "tf2onnx":
                q.rounding = "double"
            elif props.get("tinytrain.rounding") in ("single", "double"):  # tinytrain's own export
                q.rounding = props["tinytrain.rounding"]
            return q
        for n in g.nodes:
            n.attrs.pop("_wq", None)
            n.attrs.pop("_bq", None)
        return g

    def _dead_code(self) -> None:
        live = {self.output}
        kept = []
        for n in reversed(self.nodes):
            if n.output in live:
                kept.append(n)
                live.update(n.inputs)
        self.nodes = kept[::-1]
        self.tensors = {k: v for k, v in self.tensors.items() if k in live}
        self.qparams = {k: v for k, v in self.qparams.items() if k in live}

    def _rename(self) -> None:
        """Names and order from the file's own weight names where they are TensorFlow's (a tf2onnx
        file gets the names and order of its .tflite), else ``{op}_{k}`` (conv_0, conv_1, fc_0, ...)
        in file order: see `graph.name_layers`."""
        by_name = {n.name: n for n in self.proto.graph.node if n.name}
        weights = {}
        for n in self.nodes:
            src = by_name.get(n.attrs.get("onnx_node", ""))
            if n.trainable and src is not None:
                k = 3 if src.op_type in ("QLinearConv", "QLinearMatMul") else 1
                weights[id(n)] = self._source_of(src.input[k]) if len(src.input) > k else ""
        self.nodes = name_layers(self.nodes, weights)

    def _source_of(self, name: str) -> str:
        """The initializer a weight input comes from, through Q/DQ, Transpose, Reshape, Identity."""
        for _ in range(8):
            n = self._producer(name)
            if n is None or n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Transpose", "Reshape",
                                              "Identity", "Cast", "Unsqueeze", "Squeeze"):
                break
            name = n.input[0]
        return name


# ops that may read an NHWC view (the converter's layout changes at the graph's edges)
_LAYOUT_OPS = {"QuantizeLinear", "DequantizeLinear", "Identity", "Transpose", "Reshape", "Flatten"}

# ops whose constant inputs mean something other than "evaluate me"
_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear"}


def load_onnx(model: Union[str, os.PathLike, onnx.ModelProto, bytes], input_shape=None, rounding: str = "auto",
              output: Optional[str] = None):
    """Import an ONNX model into tinytrain's graph IR.

    Returns a float `tt.Graph`, or a `tt.QuantizedModel` when the file is already quantized (QDQ or
    QOperator), keeping its scales and zero points. `input_shape=(C, H, W)` resolves a dynamic input.
    `rounding` ("auto", "single", "double") is the quantized model's requantization rounding: "auto"
    rounds as the runtime the file was made for (tf2onnx files of TFLite models: TFLite's "double",
    so they equal `tt.load_tflite` of the source bit for bit; others "single", as onnxruntime).
    A model with several outputs keeps the one named by ``output=``; by default the one they all copy
    (int8 logits and a dequantized or Softmax copy), else the error lists them. An int32 bias beyond
    tt-core's bound is brought within it where the output stays the same, else
    `tt.QuantizationError` names layer and channel.
    Raises `tt.ModelFormatError` / `tt.UnsupportedOperatorError` naming the file, node and op.
    """
    if input_shape is not None and (len(tuple(input_shape)) != 3 or min(int(d) for d in input_shape) <= 0):
        raise ValueError(f"input_shape must be (C, H, W) positive ints, got {input_shape}")
    proto, where = _load_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:
        raise ModelFormatError(f"{where}: ONNX shape inference failed: {exc}") from None
    try:
        imported = _Importer(inferred, where, input_shape).run(output)
    except TinytrainError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        # a file can be valid protobuf and still describe an impossible model (initializers whose
        # shapes contradict their use, a missing attribute): never let that surface as a crash
        raise ModelFormatError(f"{where}: inconsistent model ({type(exc).__name__}: {exc})") from None
    return within_bias_bound(choose_rounding(imported, rounding, where), where)
