"""TFLite front end: lowers a ``.tflite`` flatbuffer (int8 or float32) into the tinytrain graph IR.

The flatbuffer is read by the small bounds-checked reader below (no TensorFlow, no generated schema
code): every offset, vector length and buffer index is checked against the file, so a truncated or
corrupted file gives `ModelFormatError` naming the field, never an IndexError or a wrong model.

TFLite is NHWC; the IR is (C, H, W) per sample with activations stored channels-last by tt-core, so
the conversion happens once, here, on the weights: CONV_2D filters OHWI -> OIHW, DEPTHWISE_CONV_2D
filters (1, KH, KW, C*M) -> (C*M, 1, KH, KW) with groups = C (output channel c*M + m reads input c,
which is the IR's grouped-conv order), and FULLY_CONNECTED keeps its (O, I) columns because a
flattened NHWC map is in (H, W, C) order, the order the IR's fc reads. PAD folds into the next
conv's pads (TFLite pads int8 with the zero point, which is what a conv's own padding does), MEAN
over H, W and an AVERAGE_POOL_2D over the whole map become ``global_avgpool``, RESHAPE that
flattens or only drops 1-sized dims is a view, RELU/RELU6 (fused or as ops) become the clamp of
their producer, QUANTIZE on the input and DEQUANTIZE on the output set or drop the edges'
quantization, and a SOFTMAX at the end is kept for inference and skipped for training. An int8 file
keeps its scales, zero points, int8 weights and int32 biases exactly.
"""
from __future__ import annotations

import os
import struct
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import ModelFormatError, TinytrainError, UnsupportedOperatorError
from .graph import Graph, Node, Tensor, name_layers
from .model import choose_rounding
from .quantize import within_bias_bound

__all__ = ["load_tflite", "BUILTIN_NAMES"]

# builtin operator codes of the TFLite schema (schema.fbs, enum BuiltinOperator) that appear in
# messages; the rest are reported by number
BUILTIN_NAMES = {
    0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 5: "DEPTH_TO_SPACE",
    6: "DEQUANTIZE", 8: "FLOOR", 9: "FULLY_CONNECTED", 14: "LOGISTIC", 17: "MAX_POOL_2D", 18: "MUL", 19: "RELU",
    21: "RELU6", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 25: "SOFTMAX", 28: "TANH", 32: "CUSTOM", 34: "PAD",
    39: "TRANSPOSE", 40: "MEAN", 41: "SUB", 42: "DIV", 43: "SQUEEZE", 45: "STRIDED_SLICE", 49: "SPLIT",
    53: "CAST", 60: "PADV2", 83: "PACK", 98: "LEAKY_RELU", 114: "QUANTIZE", 117: "HARD_SWISH",
}
_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
_TYPE_NAMES = {0: "FLOAT32", 1: "FLOAT16", 2: "INT32", 3: "UINT8", 4: "INT64", 5: "STRING", 6: "BOOL",
               7: "INT16", 8: "COMPLEX64", 9: "INT8", 10: "FLOAT64"}
_ACT = {0: "none", 1: "relu", 3: "relu6"}
_ACT_NAMES = {2: "RELU_N1_TO_1", 4: "TANH", 5: "SIGN_BIT"}


# ---------------------------------------------------------------------- flatbuffer reader
class _Buf:
    """Little-endian reads with bounds checks; `field` names what is being read for the error."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.where = where

    def fail(self, msg: str) -> ModelFormatError:
        return ModelFormatError(f"{self.where}: {msg} (truncated or corrupt .tflite file?)")

    def read(self, fmt: str, pos: int, field: str):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise self.fail(f"{field} at byte {pos} lies outside the {len(self.data)}-byte file")
        return struct.unpack_from("<" + fmt, self.data, pos)[0]


class _Table:
    def __init__(self, buf: _Buf, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what
        vt = pos - buf.read("i", pos, f"{what} vtable offset")
        self.vt_len = buf.read("H", vt, f"{what} vtable size")
        if self.vt_len < 4 or self.vt_len % 2:
            raise buf.fail(f"{what} has an invalid vtable size {self.vt_len}")
        buf.read(f"{self.vt_len}s", vt, f"{what} vtable")
        self.vt = vt

    def _off(self, i: int) -> int:
        at = 4 + 2 * i
        return self.buf.read("H", self.vt + at, f"{self.what} field {i}") if at < self.vt_len else 0

    def scalar(self, i: int, fmt: str, default, name: str):
        o = self._off(i)
        return default if o == 0 else self.buf.read(fmt, self.pos + o, f"{self.what}.{name}")

    def _ref(self, i: int, name: str) -> Optional[int]:
        o = self._off(i)
        if o == 0:
            return None
        at = self.pos + o
        return at + self.buf.read("I", at, f"{self.what}.{name} offset")

    def table(self, i: int, name: str) -> Optional["_Table"]:
        p = self._ref(i, name)
        return None if p is None else _Table(self.buf, p, f"{self.what}.{name}")

    def _vec(self, i: int, name: str, elem: int) -> Tuple[int, int]:
        p = self._ref(i, name)
        if p is None:
            return 0, 0
        n = self.buf.read("I", p, f"{self.what}.{name} length")
        if p + 4 + n * elem > len(self.buf.data):
            raise self.buf.fail(f"{self.what}.{name}: a vector of {n} elements runs past the end of the file")
        return p + 4, n

    def array(self, i: int, name: str, dtype) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        start, n = self._vec(i, name, dt.itemsize)
        return np.frombuffer(self.buf.data, dt, n, start).astype(np.dtype(dtype)) if n else np.zeros(0, dtype)

    def string(self, i: int, name: str) -> str:
        start, n = self._vec(i, name, 1)
        return self.buf.data[start: start + n].decode("utf-8", "replace")

    def tables(self, i: int, name: str) -> List["_Table"]:
        start, n = self._vec(i, name, 4)
        return [_Table(self.buf, start + 4 * k + self.buf.read("I", start + 4 * k, f"{self.what}.{name}[{k}]"),
                       f"{self.what}.{name}[{k}]") for k in range(n)]


# ---------------------------------------------------------------------- model structures
class _TTensor:
    def __init__(self, t: _Table, idx: int, buffers: List[_Table], model_buf: _Buf, where: str) -> None:
        self.idx = idx
        self.name = t.string(3, "name") or f"tensor_{idx}"
        self.shape = tuple(int(d) for d in t.array(0, "shape", np.int32))
        self.type = t.scalar(1, "b", 0, "type")
        self.buffer = t.scalar(2, "I", 0, "buffer")
        if self.buffer >= len(buffers):
            raise ModelFormatError(f"{where}: tensor {idx} ({self.name!r}) refers to buffer {self.buffer}, but the "
                                   f"model has {len(buffers)} buffers (buffer index out of range)")
        q = t.table(4, "quantization")
        self.scale = q.array(2, "scale", np.float32) if q is not None else np.zeros(0, np.float32)
        self.zero_point = q.array(3, "zero_point", np.int64) if q is not None else np.zeros(0, np.int64)
        self.qdim = q.scalar(6, "i", 0, "quantized_dimension") if q is not None else 0
        self.data: Optional[bytes] = None
        if self.buffer:
            b = buffers[self.buffer]
            start, n = b._vec(0, "data", 1)
            if n:
                self.data = model_buf.data[start: start + n]
            else:
                off, size = b.scalar(1, "Q", 0, "offset"), b.scalar(2, "Q", 0, "size")
                if off > 1:
                    if off + size > len(model_buf.data):
                        raise ModelFormatError(f"{where}: buffer {self.buffer} of tensor {self.name!r} lies at bytes "
                                               f"{off}..{off + size}, past the end of the file")
                    self.data = model_buf.data[off: off + size]

    @property
    def quantized(self) -> bool:
        return self.scale.size > 0

    def array(self, where: str) -> np.ndarray:
        if self.type not in _TYPES:
            raise ModelFormatError(f"{where}: tensor {self.name!r} has type "
                                   f"{_TYPE_NAMES.get(self.type, self.type)}, which tinytrain cannot read")
        dt = np.dtype(_TYPES[self.type]).newbyteorder("<")
        n = int(np.prod(self.shape)) if self.shape else 1
        if self.data is None or len(self.data) != n * dt.itemsize:
            got = 0 if self.data is None else len(self.data)
            raise ModelFormatError(f"{where}: constant tensor {self.name!r} of shape {self.shape} needs "
                                   f"{n * dt.itemsize} bytes, its buffer {self.buffer} has {got}")
        return np.frombuffer(self.data, dt).astype(np.dtype(_TYPES[self.type])).reshape(self.shape)


class _Act:
    """An activation: its IR tensor and its TFLite rank (4 = NHWC, 2 = (N, F))."""

    def __init__(self, ir: str, rank: int) -> None:
        self.ir, self.rank = ir, rank


class _Pad:
    """A PAD whose output waits to be folded into the next conv's pads."""

    def __init__(self, src: _Act, pads: Tuple[int, int, int, int], op_index: int) -> None:
        self.src, self.pads, self.op_index = src, pads, op_index


def _read(data: bytes, where: str):
    buf = _Buf(data, where)
    if len(data) < 8:
        raise ModelFormatError(f"{where}: {len(data)} bytes is too short for a .tflite flatbuffer")
    if data[4:8] != b"TFL3":
        raise ModelFormatError(f"{where}: file identifier is {data[4:8]!r}, expected b'TFL3' (not a TFLite model)")
    root = _Table(buf, buf.read("I", 0, "root offset"), "Model")
    return buf, root


# ---------------------------------------------------------------------- importer
class _Importer:
    def __init__(self, data: bytes, where: str) -> None:
        self.where = where
        self.buf, self.model = _read(data, where)
        self.version = self.model.scalar(0, "I", 0, "version")
        if self.version != 3:
            raise ModelFormatError(f"{where}: schema version {self.version} (tinytrain reads version 3)")
        self.opcodes = []
        for oc in self.model.tables(1, "operator_codes"):
            dep = oc.scalar(0, "b", 0, "deprecated_builtin_code")
            code = oc.scalar(3, "i", 0, "builtin_code")
            self.opcodes.append((max(int(dep), int(code)), oc.scalar(2, "i", 1, "version"), oc.string(1, "custom_code")))
        self.buffers = self.model.tables(4, "buffers")
        subgraphs = self.model.tables(2, "subgraphs")
        if not subgraphs:
            raise ModelFormatError(f"{where}: the model has no subgraph")
        self.sg_index = 0
        sg = subgraphs[0]
        self.ttensors = [_TTensor(t, i, self.buffers, self.buf, where) for i, t in enumerate(sg.tables(0, "tensors"))]
        self.inputs = [int(v) for v in sg.array(1, "inputs", np.int32)]
        self.outputs = [int(v) for v in sg.array(2, "outputs", np.int32)]
        self.ops = sg.tables(3, "operators")
        for v in self.inputs + self.outputs:
            self._check_index(v, "subgraph 0 inputs/outputs")
        self.irnames = self._unique_names()
        self.env: Dict[int, object] = {}
        self.tensors: Dict[str, Tensor] = {}
        self.nodes: List[Node] = []
        self.qparams: Dict[str, Tuple[float, int]] = {}
        self.softmax_tail = False
        self.uses: Dict[int, int] = {}
        for op in self.ops:
            for v in op.array(1, "inputs", np.int32):
                self.uses[int(v)] = self.uses.get(int(v), 0) + 1
        for v in self.outputs:
            self.uses[v] = self.uses.get(v, 0) + 1

    def _check_index(self, v: int, what: str) -> None:
        if not 0 <= v < len(self.ttensors):
            raise ModelFormatError(f"{self.where}: {what} refers to tensor {v}, but subgraph 0 has "
                                   f"{len(self.ttensors)} tensors (index out of range)")

    def _unique_names(self) -> List[str]:
        seen: Dict[str, int] = {}
        out = []
        for t in self.ttensors:
            n = t.name
            if n in seen:
                n = f"{n}#{t.idx}"
            seen[n] = 1
            out.append(n)
        return out

    # ---------------------------------------------------------------- helpers
    def _unsupported(self, k: int, reason: str = "") -> UnsupportedOperatorError:
        code, version, custom = self._opcode(k)
        name = BUILTIN_NAMES.get(code, f"builtin {code}")
        if code == 32 and custom:
            name = f"CUSTOM {custom!r}"
        outs = [self.irnames[v] for v in self.ops[k].array(2, "outputs", np.int32) if 0 <= v < len(self.ttensors)]
        e = UnsupportedOperatorError(f"subgraph {self.sg_index} operator {k} (output {outs[0] if outs else '?'})",
                                     f"{name} (builtin code {code})", version, reason)
        e.builtin_code, e.op_index, e.subgraph = code, k, self.sg_index
        return e

    def _opcode(self, k: int):
        idx = self.ops[k].scalar(0, "I", 0, "opcode_index")
        if idx >= len(self.opcodes):
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k} uses opcode index {idx}, but the model "
                                   f"has {len(self.opcodes)} operator codes (index out of range)")
        return self.opcodes[idx]

    def _qp(self, t: _TTensor) -> Optional[Tuple[float, int]]:
        if not t.quantized:
            return None
        if t.scale.size != 1:
            raise ModelFormatError(f"{self.where}: activation {t.name!r} is quantized per channel "
                                   f"({t.scale.size} scales); only weights may be")
        zp = int(t.zero_point[0]) if t.zero_point.size else 0
        if t.type == 3:  # uint8 -> int8, exactly
            zp -= 128
        elif t.type != 9:
            raise ModelFormatError(f"{self.where}: activation {t.name!r} is quantized to "
                                   f"{_TYPE_NAMES.get(t.type, t.type)} (int8/uint8 only)")
        s = float(t.scale[0])
        if not np.isfinite(s) or s <= 0:
            raise ModelFormatError(f"{self.where}: tensor {t.name!r} has a non-positive or non-finite scale {s}")
        return s, zp

    @staticmethod
    def _ir_shape(shape, where, name) -> Tuple[Tuple[int, int, int], int]:
        if len(shape) == 4:
            return (shape[3], shape[1], shape[2]), 4
        if len(shape) == 2:
            return (shape[1], 1, 1), 2
        raise ModelFormatError(f"{where}: tensor {name!r} has shape {tuple(shape)}; tinytrain reads (N, H, W, C) "
                               f"and (N, features) activations")

    def _ins(self, k: int) -> List[int]:
        v = [int(x) for x in self.ops[k].array(1, "inputs", np.int32)]
        for x in v:
            if x != -1:
                self._check_index(x, f"subgraph 0 operator {k} inputs")
        return v

    def _act(self, k: int, v: int) -> _Act:
        a = self.env.get(v)
        if isinstance(a, _Pad):
            raise self._unsupported(a.op_index, "a PAD is only supported right before CONV_2D / DEPTHWISE_CONV_2D "
                                                "(it is folded into their padding)")
        if not isinstance(a, _Act):
            if v in self.env or self.ttensors[v].data is not None:
                raise self._unsupported(k, f"input tensor {self.irnames[v]!r} must be an activation, not a constant")
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k} reads tensor {self.irnames[v]!r}, which "
                                   f"no earlier operator computes")
        return a

    def _const(self, k: int, v: int, what: str) -> np.ndarray:
        if v in self.env and isinstance(self.env[v], np.ndarray):
            return self.env[v]
        t = self.ttensors[v]
        if t.data is None:
            raise self._unsupported(k, f"{what} ({t.name!r}) must be a constant")
        return t.array(self.where)

    def _deq(self, t: _TTensor, q: np.ndarray, axis: int) -> np.ndarray:
        if not t.quantized or q.dtype.kind == "f":
            return q.astype(np.float32)
        n = q.shape[axis] if q.ndim else 1
        if t.scale.size not in (1, n) or t.zero_point.size not in (0, 1, t.scale.size):
            raise ModelFormatError(f"{self.where}: tensor {t.name!r} of shape {q.shape} has {t.scale.size} scales and "
                                   f"{t.zero_point.size} zero points (1 or one per channel expected)")
        if not (np.isfinite(t.scale).all() and (t.scale > 0).all()):
            raise ModelFormatError(f"{self.where}: tensor {t.name!r} has non-positive or non-finite scales")
        s = t.scale.astype(np.float64)
        z = t.zero_point.astype(np.float64) if t.zero_point.size else np.zeros(1)
        if s.size > 1:
            shp = [1] * q.ndim
            shp[axis] = -1
            s, z = s.reshape(shp), (z.reshape(shp) if z.size > 1 else z.reshape(()))
        else:
            s, z = s.reshape(()), z.reshape(-1)[0]
        return ((q.astype(np.float64) - z) * s).astype(np.float32)

    def _emit(self, k: int, op: str, inputs: List[str], out: int, attrs=None, params=None) -> Node:
        t = self.ttensors[out]
        shape, rank = self._ir_shape(t.shape, self.where, t.name)
        name = self.irnames[out]
        code, version, _ = self._opcode(k)
        a = {"tflite_op": BUILTIN_NAMES.get(code, str(code)), "tflite_index": k, "onnx_node": name,
             "onnx_op": BUILTIN_NAMES.get(code, str(code)), "onnx_opset": version}
        a.update(attrs or {})
        self.tensors[name] = Tensor(name, shape)
        n = Node(name, op, list(inputs), name, a, dict(params or {}))
        self.nodes.append(n)
        self.env[out] = _Act(name, rank)
        qp = self._qp(t)
        if qp is not None:
            self.qparams[name] = qp
        return n

    def _options(self, k: int) -> Optional[_Table]:
        return self.ops[k].table(4, "builtin_options")

    def _fused(self, k: int, opts: Optional[_Table], field: int) -> str:
        f = opts.scalar(field, "b", 0, "fused_activation_function") if opts is not None else 0
        if f not in _ACT:
            raise self._unsupported(k, f"fused activation {_ACT_NAMES.get(f, f)} (only NONE, RELU, RELU6)")
        return _ACT[f]

    def _geometry(self, k, opts, hw, kernel, pads_extra=(0, 0, 0, 0), pad_field=0, sw_field=1, sh_field=2):
        padding = opts.scalar(pad_field, "b", 0, "padding") if opts is not None else 0
        sw = opts.scalar(sw_field, "i", 1, "stride_w") if opts is not None else 1
        sh = opts.scalar(sh_field, "i", 1, "stride_h") if opts is not None else 1
        if sh < 1 or sw < 1:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k} has strides ({sh}, {sw})")
        h, w = hw[0] + pads_extra[0] + pads_extra[2], hw[1] + pads_extra[1] + pads_extra[3]
        kh, kw = kernel
        if padding == 0:  # SAME: the extra pixel goes bottom/right
            pads = []
            for size, kk, s in ((h, kh, sh), (w, kw, sw)):
                out = -(-size // s)
                total = max((out - 1) * s + kk - size, 0)
                pads.append((total // 2, total - total // 2))
            t, l, b, r = pads[0][0], pads[1][0], pads[0][1], pads[1][1]
        elif padding == 1:
            t = l = b = r = 0
        else:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k} has an invalid padding value {padding}")
        t, l, b, r = t + pads_extra[0], l + pads_extra[1], b + pads_extra[2], r + pads_extra[3]
        oh = (hw[0] + t + b - kh) // sh + 1
        ow = (hw[1] + l + r - kw) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: kernel {kernel} does not fit {hw}")
        return (sh, sw), (t, l, b, r), (oh, ow)

    def _check_out_shape(self, k: int, out: int, expect) -> None:
        shape, _ = self._ir_shape(self.ttensors[out].shape, self.where, self.ttensors[out].name)
        if tuple(shape) != tuple(expect):
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: output {self.irnames[out]!r} has shape "
                                   f"{shape} (C, H, W), the operator computes {tuple(expect)}")

    # ---------------------------------------------------------------- lowering
    def _choose_output(self, output: Optional[str]) -> None:
        """Keep one graph output (and only the operators it needs). `output` names it; by default
        the outputs must all be one head seen through edge ops (e.g. int8 logits and a DEQUANTIZE'd
        or SOFTMAX'd copy) and the first is kept; anything else lists the outputs."""
        names = [self.ttensors[v].name for v in self.outputs]
        listing = ", ".join(f"{n!r}" for n in names)
        if output is not None:
            if output not in names:
                raise ModelFormatError(f"{self.where}: output={output!r} is not an output of the model; its "
                                       f"outputs are {listing}")
            self.outputs = [self.outputs[names.index(output)]]
        elif len(self.outputs) > 1:
            heads = {self._head_of(v) for v in self.outputs}
            if len(heads) != 1:
                raise ModelFormatError(f"{self.where}: the model has {len(names)} outputs ({listing}); pass "
                                       f"output=NAME to choose the one to train")
            self.outputs = self.outputs[:1]
        producer = {int(o): k for k, op in enumerate(self.ops) for o in op.array(2, "outputs", np.int32)}
        need, stack = set(), list(self.outputs)
        while stack:
            k = producer.get(stack.pop())
            if k is not None and k not in need:
                need.add(k)
                stack.extend(int(v) for v in self.ops[k].array(1, "inputs", np.int32) if v != -1)
        self.live_ops = sorted(need)
        self.uses = {}
        for k in self.live_ops:
            for v in self.ops[k].array(1, "inputs", np.int32):
                self.uses[int(v)] = self.uses.get(int(v), 0) + 1
        self.uses[self.outputs[0]] = self.uses.get(self.outputs[0], 0) + 1

    def _head_of(self, v: int) -> int:
        """The tensor an output copies through DEQUANTIZE / QUANTIZE / SOFTMAX / RESHAPE ops."""
        producer = {int(o): k for k, op in enumerate(self.ops) for o in op.array(2, "outputs", np.int32)}
        while v in producer and BUILTIN_NAMES.get(self._opcode(producer[v])[0]) in (
                "DEQUANTIZE", "QUANTIZE", "SOFTMAX", "RESHAPE"):
            v = int(self.ops[producer[v]].array(1, "inputs", np.int32)[0])
        return v

    def _fold_input_reshape(self, v: int, t: _TTensor) -> Tuple[Tuple[int, int, int], int]:
        """A flat (N, F) input whose only reader is a RESHAPE to (N, H, W, C) (TFLite Micro's
        micro_speech: (1, 1960) -> (1, 49, 40, 1)) is taken as an (N, H, W, C) input: the data is
        the same bytes in the same order, so the reshape becomes the input's shape."""
        shape, rank = self._ir_shape(t.shape, self.where, t.name)
        readers = [k for k in self.live_ops if v in [int(x) for x in self.ops[k].array(1, "inputs", np.int32)]]
        if rank != 2 or len(readers) != 1 or BUILTIN_NAMES.get(self._opcode(readers[0])[0]) != "RESHAPE":
            return shape, rank
        k = readers[0]
        out = int(self.ops[k].array(2, "outputs", np.int32)[0])
        self._check_index(out, f"subgraph 0 operator {k} outputs")
        new = self.ttensors[out].shape
        if len(new) != 4 or int(np.prod(new[1:])) != shape[0] or self._qp(self.ttensors[out]) != self._qp(t):
            return shape, rank
        self.folded_reshape = (k, out)
        return (new[3], new[1], new[2]), 4

    def run(self, output: Optional[str] = None) -> Graph:
        if len(self.inputs) != 1:
            raise ModelFormatError(f"{self.where}: expected one input in subgraph 0, found {len(self.inputs)}")
        if not self.outputs:
            raise ModelFormatError(f"{self.where}: subgraph 0 has no output")
        self._choose_output(output)
        v = self.inputs[0]
        t = self.ttensors[v]
        self.folded_reshape = None
        shape, rank = self._fold_input_reshape(v, t)
        if min(shape) <= 0:
            raise ModelFormatError(f"{self.where}: input {t.name!r} has shape {t.shape}")
        self.input_name = self.irnames[v]
        self.tensors[self.input_name] = Tensor(self.input_name, shape)
        self.env[v] = _Act(self.input_name, rank)
        qp = self._qp(t)
        if qp is not None:
            self.qparams[self.input_name] = qp
        if self.folded_reshape is not None:
            self.env[self.folded_reshape[1]] = self.env[v]
        for k in self.live_ops:
            if self.folded_reshape is None or k != self.folded_reshape[0]:
                self._lower(k)
        out = self.env.get(self.outputs[0])
        if not isinstance(out, _Act):
            raise ModelFormatError(f"{self.where}: the output {self.irnames[self.outputs[0]]!r} is not computed")
        self.output = out.ir
        return self._finish()

    def _lower(self, k: int) -> None:
        code, _, _ = self._opcode(k)
        handler = getattr(self, "_op_" + BUILTIN_NAMES.get(code, "_"), None)
        if handler is None:
            raise self._unsupported(k)
        ins = self._ins(k)
        outs = [int(x) for x in self.ops[k].array(2, "outputs", np.int32)]
        if len(outs) != 1:
            raise self._unsupported(k, f"{len(outs)} outputs")
        self._check_index(outs[0], f"subgraph 0 operator {k} outputs")
        handler(k, ins, outs[0])

    def _conv_common(self, k, ins, out, w_ir, groups, opts, act) -> None:
        """w_ir is the IR weight (O, I/groups, KH, KW) as stored (int8 or float)."""
        src = self.env.get(ins[0])
        extra = (0, 0, 0, 0)
        if isinstance(src, _Pad):
            extra = src.pads
            src = src.src
        else:
            src = self._act(k, ins[0])
        c, h, wd = self.tensors[src.ir].shape
        o, ig, kh, kw = w_ir.shape
        if ig * groups != c:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: filter of shape "
                                   f"{self.ttensors[ins[1]].shape} does not match {c} input channels")
        stride, pads, (oh, ow) = self._geometry(k, opts, (h, wd), (kh, kw), extra)
        self._check_out_shape(k, out, (o, oh, ow))
        wt = self.ttensors[ins[1]]
        w_float = self._deq(wt, w_ir, 0)
        bias = None
        bq = None
        if len(ins) > 2 and ins[2] != -1:
            bt = self.ttensors[ins[2]]
            b_raw = self._const(k, ins[2], "bias").reshape(-1)
            bias = self._deq(bt, b_raw, 0)
            if b_raw.dtype == np.int32 and bt.quantized:
                bq = (b_raw, bt.scale.astype(np.float64), np.zeros((), np.int32), 0)
        if bias is None:
            bias = np.zeros(o, np.float32)
        attrs = {"kernel": (kh, kw), "stride": stride, "pads": pads, "groups": groups, "act": act,
                 "_weight_tensor": wt.name}
        if wt.quantized and w_ir.dtype.kind != "f":
            attrs["_wq"] = (w_ir, wt.scale.astype(np.float64), wt.zero_point, 0 if wt.scale.size > 1 else None)
        if bq is not None:
            attrs["_bq"] = bq
        self._emit(k, "conv", [src.ir], out, attrs, {"weight": w_float, "bias": bias.astype(np.float32)})

    def _check_dilation(self, k, opts, fw, fh) -> None:
        if opts is not None and (opts.scalar(fw, "i", 1, "dilation_w_factor"),
                                 opts.scalar(fh, "i", 1, "dilation_h_factor")) != (1, 1):
            raise self._unsupported(k, "dilation other than 1")

    def _op_CONV_2D(self, k, ins, out) -> None:
        opts = self._options(k)
        self._check_dilation(k, opts, 4, 5)
        f = self._const(k, ins[1], "filter")
        if f.ndim != 4:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: filter shape {f.shape} is not OHWI")
        src = self.env.get(ins[0])
        c = self.tensors[(src.src if isinstance(src, _Pad) else self._act(k, ins[0])).ir].shape[0]
        groups = c // f.shape[3] if f.shape[3] and c % f.shape[3] == 0 else 1
        self._conv_common(k, ins, out, f.transpose(0, 3, 1, 2), groups, opts, self._fused(k, opts, 3))

    def _op_DEPTHWISE_CONV_2D(self, k, ins, out) -> None:
        opts = self._options(k)
        self._check_dilation(k, opts, 5, 6)
        f = self._const(k, ins[1], "filter")
        src = self.env.get(ins[0])
        c = self.tensors[(src.src if isinstance(src, _Pad) else self._act(k, ins[0])).ir].shape[0]
        if f.ndim != 4 or f.shape[0] != 1 or f.shape[3] % c:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: depthwise filter {f.shape} for "
                                   f"{c} input channels")
        mult = opts.scalar(3, "i", 0, "depth_multiplier") if opts is not None else 0
        if mult not in (0, f.shape[3] // c):
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: depth_multiplier {mult} but the filter "
                                   f"has {f.shape[3]} channels for {c} inputs")
        w_ir = f[0].transpose(2, 0, 1)[:, None]  # (C*M, 1, KH, KW); channel c*M + m reads input c
        self._conv_common(k, ins, out, w_ir, c, opts, self._fused(k, opts, 4))

    def _op_FULLY_CONNECTED(self, k, ins, out) -> None:
        opts = self._options(k)
        act = self._fused(k, opts, 0)
        if opts is not None and opts.scalar(1, "b", 0, "weights_format"):
            raise self._unsupported(k, "shuffled weights format")
        x = self._act(k, ins[0])
        w = self._const(k, ins[1], "weights")
        c, h, wd = self.tensors[x.ir].shape
        if w.ndim != 2 or w.shape[1] != c * h * wd:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: weights {w.shape} for "
                                   f"{c * h * wd} input features")
        o = w.shape[0]
        out_shape = self.ttensors[out].shape
        if int(np.prod(out_shape)) != o * max(1, out_shape[0] if out_shape else 1):
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k}: output {out_shape} for {o} units")
        wt = self.ttensors[ins[1]]
        w_float = self._deq(wt, w, 0)
        bias = np.zeros(o, np.float32)
        attrs = {"act": act, "_weight_tensor": wt.name}
        if len(ins) > 2 and ins[2] != -1:
            bt = self.ttensors[ins[2]]
            b_raw = self._const(k, ins[2], "bias").reshape(-1)
            bias = self._deq(bt, b_raw, 0)
            if b_raw.dtype == np.int32 and bt.quantized:
                attrs["_bq"] = (b_raw, bt.scale.astype(np.float64), np.zeros((), np.int32), 0)
        if wt.quantized and w.dtype.kind != "f":
            attrs["_wq"] = (w, wt.scale.astype(np.float64), wt.zero_point, 0 if wt.scale.size > 1 else None)
        # the output is (N, units) whatever rank TFLite gives it (keep_num_dims keeps (N, 1, 1, units))
        t = self.ttensors[out]
        name = self.irnames[out]
        qp = self._qp(t)
        _, version, _ = self._opcode(k)
        attrs.update({"tflite_op": "FULLY_CONNECTED", "tflite_index": k, "onnx_node": name,
                      "onnx_op": "FULLY_CONNECTED", "onnx_opset": version})
        self.tensors[name] = Tensor(name, (o, 1, 1))
        self.nodes.append(Node(name, "fc", [x.ir], name, attrs, {"weight": w_float, "bias": bias.astype(np.float32)}))
        self.env[out] = _Act(name, 2)
        if qp is not None:
            self.qparams[name] = qp

    def _op_ADD(self, k, ins, out) -> None:
        opts = self._options(k)
        act = self._fused(k, opts, 0)
        a, b = self._act(k, ins[0]), self._act(k, ins[1])
        if self.tensors[a.ir].shape != self.tensors[b.ir].shape:
            raise self._unsupported(k, f"ADD of shapes {self.tensors[a.ir].shape} and {self.tensors[b.ir].shape} "
                                       f"(broadcasting is not supported)")
        self._emit(k, "add", [a.ir, b.ir], out, {"act": act})

    def _pool(self, k, ins, out, op) -> None:
        opts = self._options(k)
        if self._fused(k, opts, 5) != "none":
            raise self._unsupported(k, "a fused activation on a pooling op")
        x = self._act(k, ins[0])
        c, h, w = self.tensors[x.ir].shape
        fw = opts.scalar(3, "i", 0, "filter_width") if opts is not None else 0
        fh = opts.scalar(4, "i", 0, "filter_height") if opts is not None else 0
        if fw < 1 or fh < 1:
            raise ModelFormatError(f"{self.where}: subgraph 0 operator {k} has filter size ({fh}, {fw})")
        stride, pads, (oh, ow) = self._geometry(k, opts, (h, w), (fh, fw))
        self._check_out_shape(k, out, (c, oh, ow))
        qin = self._qp(self.ttensors[ins[0]])
        if op == "avgpool" and (qin is None or qin != self._qp(self.ttensors[out])):
            # int8 avgpool keeps its input's quantization and rounds as TFLite does; a float
            # average over the whole map, or one that rescales, is global_avgpool
            if (oh, ow) == (1, 1) and (fh, fw) == (h, w) and not any(pads):
                self._emit(k, "global_avgpool", [x.ir], out)
                return
            raise self._unsupported(k, "output quantized differently from the input")
        self._emit(k, op, [x.ir], out, {"kernel": (fh, fw), "stride": stride, "pads": pads})

    def _op_AVERAGE_POOL_2D(self, k, ins, out) -> None:
        self._pool(k, ins, out, "avgpool")

    def _op_MAX_POOL_2D(self, k, ins, out) -> None:
        self._pool(k, ins, out, "maxpool")

    def _op_MEAN(self, k, ins, out) -> None:
        x = self._act(k, ins[0])
        axes = sorted(int(v) % 4 for v in self._const(k, ins[1], "axes").reshape(-1))
        if x.rank != 4 or axes != [1, 2]:
            raise self._unsupported(k, f"MEAN over axes {axes} (only over H, W: axes [1, 2] of NHWC)")
        c = self.tensors[x.ir].shape[0]
        self._check_out_shape(k, out, (c, 1, 1))
        self._emit(k, "global_avgpool", [x.ir], out)
        if len(self.ttensors[out].shape) == 2:
            self.env[out] = _Act(self.irnames[out], 2)

    def _op_PAD(self, k, ins, out) -> None:
        x = self._act(k, ins[0])
        p = self._const(k, ins[1], "paddings").astype(np.int64)
        if x.rank != 4 or p.shape != (4, 2) or p[0].any() or p[3].any() or (p < 0).any():
            raise self._unsupported(k, f"paddings {p.tolist()} (only non-negative H/W padding of NHWC)")
        tin, tout = self.ttensors[ins[0]], self.ttensors[out]
        if self._qp(tin) != self._qp(tout):
            raise self._unsupported(k, "output quantized differently from the input")
        if len(ins) > 2 and ins[2] != -1:  # PADV2's constant value must be the zero of the input
            cv = self._const(k, ins[2], "constant value").reshape(-1)
            zero = self._qp(tin)[1] if tin.quantized and cv.dtype.kind == "i" else 0
            if cv.size != 1 or cv[0] != zero:
                raise self._unsupported(k, f"padding with {cv.tolist()} (only with zero)")
        self.env[out] = _Pad(x, (int(p[1, 0]), int(p[2, 0]), int(p[1, 1]), int(p[2, 1])), k)

    _op_PADV2 = _op_PAD

    def _op_RESHAPE(self, k, ins, out) -> None:
        x = self._act(k, ins[0])
        c, h, w = self.tensors[x.ir].shape
        shape = self.ttensors[out].shape
        if not shape and len(ins) > 1 and ins[1] != -1:
            shape = tuple(int(v) for v in self._const(k, ins[1], "new shape").reshape(-1))
        n = c * h * w
        if self._qp(self.ttensors[ins[0]]) != self._qp(self.ttensors[out]):
            raise self._unsupported(k, "output quantized differently from the input")
        dims = [d for d in shape[1:]]
        if len(shape) == 2 and dims[0] in (n, -1):
            if h * w == 1:
                self.env[out] = _Act(x.ir, 2)
            else:
                # NHWC flattened is (H, W, C) order: exactly how the IR's fc reads a map
                self._emit(k, "flatten", [x.ir], out)
            return
        if len(shape) == 4 and [d for d in dims if d != 1] == [d for d in (h, w, c) if d != 1] and \
                (h * w == 1 or tuple(dims) == (h, w, c)):
            self.env[out] = _Act(x.ir, 4)
            return
        raise self._unsupported(k, f"RESHAPE of (N, {h}, {w}, {c}) to {tuple(shape)} (only flattening, or dropping "
                                   f"or adding dims of size 1, is supported)")

    def _op_SOFTMAX(self, k, ins, out) -> None:
        x = self._act(k, ins[0])
        opts = self._options(k)
        beta = opts.scalar(0, "f", 1.0, "beta") if opts is not None else 1.0
        if beta != 1.0:
            raise self._unsupported(k, f"beta={beta}")
        if out != self.outputs[0] and not self._only_edges_after(out):
            raise self._unsupported(k, "SOFTMAX is only supported as the last op (kept for inference, skipped for "
                                       "training)")
        self.softmax_tail = True
        self.env[out] = x

    def _only_edges_after(self, v: int) -> bool:
        """True when only DEQUANTIZE/QUANTIZE ops lead from tensor v to the graph output."""
        cur = v
        for k in self.live_ops:
            op = self.ops[k]
            ins = [int(x) for x in op.array(1, "inputs", np.int32)]
            if cur in ins:
                if BUILTIN_NAMES.get(self._opcode(k)[0]) not in ("DEQUANTIZE", "QUANTIZE"):
                    return False
                cur = int(op.array(2, "outputs", np.int32)[0])
        return cur == self.outputs[0]

    def _op_QUANTIZE(self, k, ins, out) -> None:
        x = self._act(k, ins[0])
        tin, tout = self.ttensors[ins[0]], self.ttensors[out]
        qp = self._qp(tout)
        if x.ir == self.input_name and not tin.quantized and x.ir not in self.qparams:
            self.qparams[x.ir] = qp  # float input quantized once: forward does that with the same numbers
            self.env[out] = x
            return
        if self._qp(tin) == qp or self.softmax_tail:
            self.env[out] = x
            return
        raise self._unsupported(k, "re-quantization inside the graph (QUANTIZE int8 -> int8 with new parameters)")

    def _op_DEQUANTIZE(self, k, ins, out) -> None:
        if ins[0] != -1 and self.ttensors[ins[0]].data is not None:
            t = self.ttensors[ins[0]]
            self.env[out] = self._deq(t, t.array(self.where), t.qdim)
            return
        x = self._act(k, ins[0])
        if out != self.outputs[0] and not self._only_edges_after(out):
            raise self._unsupported(k, "DEQUANTIZE of an activation inside the graph (a partly quantized model)")
        self.env[out] = x

    def _relu(self, k, ins, out, act) -> None:
        x = self._act(k, ins[0])
        prod = self.nodes[-1] if self.nodes and self.nodes[-1].output == x.ir else None
        if prod is None or prod.op not in ("conv", "fc", "add") or prod.attrs.get("act", "none") != "none" or \
                self.uses.get(ins[0], 0) != 1 or x.ir == self.input_name:
            raise self._unsupported(k, "a RELU/RELU6 must directly follow a CONV_2D, DEPTHWISE_CONV_2D, "
                                       "FULLY_CONNECTED or ADD (it becomes their output clamp)")
        prod.attrs["act"] = act
        new = self.irnames[out]
        self.tensors[new] = Tensor(new, self.tensors.pop(prod.output).shape)
        self.qparams.pop(prod.output, None)
        qp = self._qp(self.ttensors[out])
        if qp is not None:
            self.qparams[new] = qp
        prod.output = prod.name = new
        self.env[out] = _Act(new, x.rank)

    def _op_RELU(self, k, ins, out) -> None:
        self._relu(k, ins, out, "relu")

    def _op_RELU6(self, k, ins, out) -> None:
        self._relu(k, ins, out, "relu6")

    # ---------------------------------------------------------------- finish
    def _finish(self) -> Graph:
        live = {self.output}
        kept = []
        for n in reversed(self.nodes):
            if n.output in live:
                kept.append(n)
                live.update(n.inputs)
        self.nodes = kept[::-1]
        self.tensors = {k: v for k, v in self.tensors.items() if k in live}
        self.qparams = {k: v for k, v in self.qparams.items() if k in live}
        self.nodes = name_layers(self.nodes, {id(n): n.attrs.pop("_weight_tensor", "") for n in self.nodes})
        g = Graph(self.input_name, self.output, self.tensors, self.nodes, self.softmax_tail)
        if self.qparams:
            from .quantize import from_imported

            q = from_imported(g, self.qparams, self.where)
            # TFLite's kernels requantize with gemmlowp's double rounding (fc once): keep that, so
            # the model gives exactly the numbers the interpreter gave
            q.rounding = "double"
            return q
        for n in g.nodes:
            n.attrs.pop("_wq", None)
            n.attrs.pop("_bq", None)
        return g


def load_tflite(model: Union[str, os.PathLike, bytes], rounding: str = "auto", output: Optional[str] = None):
    """Import a ``.tflite`` flatbuffer into tinytrain's graph IR.

    Returns a `tt.QuantizedModel` for an int8 file (its scales, zero points, int8 weights and int32
    biases kept exactly) and a float `tt.Graph` for a float32 one. The model takes NCHW input like
    every tinytrain model (`q.forward(x, layout="NHWC")` takes TFLite's layout). Raises
    `tt.ModelFormatError` for a malformed file and `tt.UnsupportedOperatorError` naming the builtin op
    code, the operator index and the subgraph (also as ``.builtin_code``, ``.op_index``, ``.subgraph``).
    `rounding="auto"` rounds as TFLite's kernels do ("double"); "single" rounds as onnxruntime does.
    A model with several outputs keeps the one named by ``output=`` (a tensor name); by default the
    one they all copy (int8 logits and their DEQUANTIZE'd or SOFTMAX'd copy), else the error lists
    them. A flat (N, F) input reshaped at the entry to (N, H, W, C) becomes an (N, H, W, C) input.
    An int32 bias beyond tt-core's bound is brought within it where the output stays the same
    (`tt.quantize.fit_dead_channel_biases`), else `tt.QuantizationError` names layer and channel.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        data, where = bytes(model), "<bytes>"
    else:
        where = os.fspath(model)
        if not os.path.isfile(where):
            raise ModelFormatError(f"{where}: no such file")
        with open(where, "rb") as f:
            data = f.read()
    try:
        with np.errstate(all="ignore"):
            imported = _Importer(data, where).run(output)
    except TinytrainError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError, UnicodeError) as exc:
        # a file can be well formed as a flatbuffer and still describe an impossible model (shapes that
        # contradict their data, a quantization that cannot hold); never let that surface as a crash
        raise ModelFormatError(f"{where}: inconsistent model ({type(exc).__name__}: {exc})") from None
    return within_bias_bound(choose_rounding(imported, rounding, where), where)
