"""Cases of the import conformance suite (issue 22): real files, converter forms and synthetic
models for each failure class, and the one check every case goes through (import, bit-exact
forward against LiteRT's reference kernels where a .tflite exists, compile, train a few steps,
export ONNX and the MCU bundle, run the exported ONNX in onnxruntime).

Used by tests/test_conformance.py and benches/conformance.py (which prints the table).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import flatbuffers
import numpy as np

import tinytrain as tt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tflite")


def models_dir() -> Optional[str]:
    d = os.environ.get("TINYTRAIN_MODELS") or os.path.join(ROOT, "..", "shared", "models")
    return d if os.path.isdir(d) else None


REAL_FILES = ["mlperf-tiny-kws-dscnn-int8.tflite", "mlperf-tiny-resnet8-cifar-int8.tflite",
              "mlperf-tiny-resnet8-cifar-float.tflite", "mlperf-tiny-ad-fc-autoencoder-int8.tflite",
              "tflm-hello-world-int8.tflite"]


# ---------------------------------------------------------------------- a small .tflite writer
# Field numbers of TFLite's schema.fbs (Model, OperatorCode, SubGraph, Tensor, QuantizationParameters,
# Operator, Buffer and the option tables used here).
BUILTIN = {"CONV_2D": 3, "DEQUANTIZE": 6, "FULLY_CONNECTED": 9, "RESHAPE": 22}
OPTIONS = {"CONV_2D": 1, "FULLY_CONNECTED": 8, "RESHAPE": 17}
INT8, INT32, FLOAT32 = 9, 2, 0


@dataclass
class T:
    name: str
    shape: tuple
    type: int = INT8
    data: Optional[np.ndarray] = None
    scale: Optional[List[float]] = None
    zero_point: Optional[List[int]] = None


@dataclass
class Op:
    code: str
    inputs: List[int]
    outputs: List[int]
    options: Dict[str, object] = field(default_factory=dict)


def write_tflite(tensors: List[T], ops: List[Op], inputs: List[int], outputs: List[int]) -> bytes:
    b = flatbuffers.Builder(1024)

    def vec(values, prepend, size):
        b.StartVector(size, len(values), size)
        for v in reversed(values):
            prepend(v)
        return b.EndVector()

    def offsets(offs):
        return vec(offs, b.PrependUOffsetTRelative, 4)

    def data_vector(raw: bytes):
        b.StartVector(1, len(raw), 16)
        b.head -= len(raw)
        b.Bytes[b.head: b.head + len(raw)] = raw
        b.vectorNumElems = len(raw)
        return b.EndVector()

    buffers = []
    for raw in [b""] + [t.data.tobytes() for t in tensors if t.data is not None]:
        d = data_vector(raw) if raw else None
        b.StartObject(1)
        if d is not None:
            b.PrependUOffsetTRelativeSlot(0, d, 0)
        buffers.append(b.EndObject())
    tens, k = [], 0
    for t in tensors:
        name = b.CreateString(t.name)
        shape = vec(list(t.shape), b.PrependInt32, 4)
        q = None
        if t.scale is not None:
            sc = vec([float(s) for s in t.scale], b.PrependFloat32, 4)
            zp = vec([int(z) for z in (t.zero_point or [0] * len(t.scale))], b.PrependInt64, 8)
            b.StartObject(7)
            b.PrependUOffsetTRelativeSlot(2, sc, 0)
            b.PrependUOffsetTRelativeSlot(3, zp, 0)
            b.PrependInt32Slot(6, 0, 0)
            q = b.EndObject()
        buf = 0
        if t.data is not None:
            k += 1
            buf = k
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, t.type, 0)
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        if q is not None:
            b.PrependUOffsetTRelativeSlot(4, q, 0)
        tens.append(b.EndObject())
    codes = sorted({o.code for o in ops}, key=list(BUILTIN).index)
    opcodes = []
    for c in codes:
        b.StartObject(4)
        b.PrependInt8Slot(0, min(BUILTIN[c], 127), 0)
        b.PrependInt32Slot(2, 1, 1)
        b.PrependInt32Slot(3, BUILTIN[c], 0)
        opcodes.append(b.EndObject())
    operators = []
    for o in ops:
        opt = None
        if o.code == "CONV_2D":
            b.StartObject(6)
            b.PrependInt8Slot(0, 1, 0)  # VALID
            b.PrependInt32Slot(1, 1, 0)
            b.PrependInt32Slot(2, 1, 0)
            b.PrependInt8Slot(3, int(o.options.get("act", 0)), 0)
            b.PrependInt32Slot(4, 1, 1)
            b.PrependInt32Slot(5, 1, 1)
            opt = b.EndObject()
        elif o.code == "FULLY_CONNECTED":
            b.StartObject(4)
            b.PrependInt8Slot(0, int(o.options.get("act", 0)), 0)
            opt = b.EndObject()
        elif o.code == "RESHAPE":
            ns = vec(list(o.options["new_shape"]), b.PrependInt32, 4)
            b.StartObject(1)
            b.PrependUOffsetTRelativeSlot(0, ns, 0)
            opt = b.EndObject()
        ins = vec(o.inputs, b.PrependInt32, 4)
        outs = vec(o.outputs, b.PrependInt32, 4)
        b.StartObject(5)
        b.PrependUint32Slot(0, codes.index(o.code), 0)
        b.PrependUOffsetTRelativeSlot(1, ins, 0)
        b.PrependUOffsetTRelativeSlot(2, outs, 0)
        if opt is not None:
            b.PrependUint8Slot(3, OPTIONS[o.code], 0)
            b.PrependUOffsetTRelativeSlot(4, opt, 0)
        operators.append(b.EndObject())
    tv, iv, ov, opv = offsets(tens), vec(inputs, b.PrependInt32, 4), vec(outputs, b.PrependInt32, 4), offsets(operators)
    sg_name = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tv, 0)
    b.PrependUOffsetTRelativeSlot(1, iv, 0)
    b.PrependUOffsetTRelativeSlot(2, ov, 0)
    b.PrependUOffsetTRelativeSlot(3, opv, 0)
    b.PrependUOffsetTRelativeSlot(4, sg_name, 0)
    sg = b.EndObject()
    codes_v, sgs_v, bufs_v = offsets(opcodes), offsets([sg]), offsets(buffers)
    desc = b.CreateString("tinytrain conformance case")
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes_v, 0)
    b.PrependUOffsetTRelativeSlot(2, sgs_v, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, bufs_v, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())


# ---------------------------------------------------------------------- synthetic int8 models
def fc_model(w: np.ndarray, bias: np.ndarray, s_in=0.05, zp_in=3, s_w=None, s_out=0.2, zp_out=-5,
             flat_reshape=None, dequantized_copy=False, second_head=False) -> bytes:
    """int8 (1, F) -> [RESHAPE to (1, H, W, 1) -> 1x1 CONV_2D of one filter -> RESHAPE flat] ->
    FULLY_CONNECTED (O units, per-channel weight scales) [-> DEQUANTIZE as a second output]
    [and a second FULLY_CONNECTED head as another output]."""
    o, f = w.shape
    s_w = list(np.full(o, 0.01) if s_w is None else s_w)
    rng = np.random.default_rng(7)
    t = [T("input", (1, f), scale=[s_in], zero_point=[zp_in])]
    ops: List[Op] = []
    x = 0
    if flat_reshape is not None:
        h, wd = flat_reshape
        t += [T("reshape_shape", (4,), INT32, np.array([1, h, wd, 1], np.int32)),
              T("image", (1, h, wd, 1), scale=[s_in], zero_point=[zp_in]),
              T("conv/filter", (1, 1, 1, 1), data=np.array([[[[90]]]], np.int8), scale=[0.011], zero_point=[0]),
              T("conv/bias", (1,), INT32, np.array([17], np.int32), scale=[s_in * 0.011], zero_point=[0]),
              T("conv/Relu", (1, h, wd, 1), scale=[0.04], zero_point=[-128]),
              T("flat_shape", (2,), INT32, np.array([1, f], np.int32)),
              T("flat", (1, f), scale=[0.04], zero_point=[-128])]
        ops += [Op("RESHAPE", [0, 1], [2], {"new_shape": [1, h, wd, 1]}),
                Op("CONV_2D", [2, 3, 4], [5], {"act": 1}),
                Op("RESHAPE", [5, 6], [7], {"new_shape": [1, f]})]
        x, s_in = 7, 0.04
    n = len(t)
    t += [T("dense/MatMul", (o, f), data=w.astype(np.int8), scale=s_w, zero_point=[0] * o),
          T("dense/BiasAdd", (o,), INT32, bias.astype(np.int32), scale=[s_in * s for s in s_w], zero_point=[0] * o),
          T("logits", (1, o), scale=[s_out], zero_point=[zp_out])]
    ops.append(Op("FULLY_CONNECTED", [x, n, n + 1], [n + 2]))
    outputs = [n + 2]
    if dequantized_copy:
        t.append(T("logits_float", (1, o), FLOAT32))
        ops.append(Op("DEQUANTIZE", [n + 2], [len(t) - 1]))
        outputs.append(len(t) - 1)
    if second_head:
        m = len(t)
        t += [T("aux/MatMul", (2, f), data=rng.integers(-100, 100, (2, f)).astype(np.int8), scale=[0.01, 0.01],
                zero_point=[0, 0]),
              T("aux/BiasAdd", (2,), INT32, np.array([5, -5], np.int32), scale=[s_in * 0.01] * 2, zero_point=[0, 0]),
              T("aux_out", (1, 2), scale=[0.1], zero_point=[0])]
        ops.append(Op("FULLY_CONNECTED", [x, m, m + 1], [m + 2]))
        outputs.append(m + 2)
    return write_tflite(t, ops, [0], outputs)


def dead_channel_weights(o=6, f=24, seed=0):
    """Weights and biases of an fc whose channel 1 and 4 are dead (all-zero int8 weights) with the
    biases TensorFlow's converter writes for them: 2^30 + 128 and near -2^31."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (o, f)).astype(np.int8)
    b = rng.integers(-3000, 3000, o).astype(np.int64)
    w[1] = 0
    w[4] = 0
    b[1] = 2**30 + 128
    b[4] = -(2**31) + 100
    return w, b.astype(np.int32)


# ---------------------------------------------------------------------- LiteRT's reference
def litert_reference(data: bytes, x_int8: np.ndarray, output: Optional[str] = None) -> np.ndarray:
    """Run a .tflite on int8 inputs (N, ...) one sample at a time with LiteRT's reference kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    outs = it.get_output_details()
    o = next((t for t in outs if t["name"] == output), outs[0]) if output else outs[0]
    res = []
    for i in range(len(x_int8)):
        it.set_tensor(d["index"], x_int8[i: i + 1].reshape(d["shape"]).astype(d["dtype"]))
        it.invoke()
        res.append(it.get_tensor(o["index"]).copy())
    return np.concatenate(res)


def random_int8(model, n: int, seed: int = 0) -> np.ndarray:
    """int8 inputs (N, C, H, W) for a QuantizedModel."""
    shape = model.tensors[model.input].shape
    return np.random.default_rng(seed).integers(-128, 128, (n,) + tuple(shape)).astype(np.int8)


def bit_exact(model, data: bytes, n: int = 8) -> bool:
    """tinytrain's int8 forward against LiteRT's reference kernels on the output before any
    trailing SOFTMAX (what tinytrain trains and exports)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    x = random_int8(model, n)
    mine = model.forward_int8(x).reshape(n, -1)
    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    index = {t["name"]: t["index"] for t in it.get_tensor_details()}
    ref = []
    for i in range(n):
        it.set_tensor(d["index"], x[i: i + 1].transpose(0, 2, 3, 1).reshape(d["shape"]).astype(d["dtype"]))
        it.invoke()
        ref.append(it.get_tensor(index[model.output]).reshape(-1).copy())
    return bool(np.array_equal(mine, np.stack(ref)))


# ---------------------------------------------------------------------- the check
@dataclass
class Row:
    model: str
    form: str
    imported: str = "-"
    exact: str = "-"
    trained: str = "-"
    exported: str = "-"
    note: str = ""
    figure: float = 0.0

    def cells(self):
        return [self.model, self.form, self.imported, self.exact, self.trained, self.exported]


def _is_regressor(q) -> bool:
    """A single output, or an output shaped like the input (an autoencoder), is a regression."""
    out = q.tensors[q.output].shape
    return not q.softmax_tail and (out[0] == 1 or out == q.tensors[q.input].shape)


def onnxruntime_agreement(model, onnx_path: str, n: int = 16) -> Tuple[str, float]:
    """tinytrain's int8 forward against onnxruntime running the quantized ONNX file the model was
    imported from (its first output): the largest difference in output LSB, or for a file that
    ends in Softmax (whose first output is the probabilities) the share of equal argmaxes.
    Returns (cell text, figure)."""
    import onnxruntime as ort

    x = calibration_batch(model, n, seed=3)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0]
    c, h, w = x.shape[1:]
    if len(feed.shape) == 2:
        xin = x.reshape(n, -1)
    elif list(feed.shape[1:]) == [h, w, c] and [h, w, c] != [c, h, w]:  # a converter's NHWC input
        xin = x.transpose(0, 2, 3, 1)
    else:
        xin = x
    got = sess.run(None, {feed.name: np.ascontiguousarray(xin)})[0].reshape(n, -1)
    want = model.forward(x).reshape(n, -1)
    if model.softmax_tail and np.allclose(got.sum(1), 1.0, atol=0.05):
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        return f"argmax {agree:.0%} (ORT)", agree
    lsb = int(np.round(np.abs(got - want).max() / np.float32(model.tensors[model.output].scale)))
    return ("yes (ORT)" if lsb == 0 else f"±{lsb} LSB (ORT)"), lsb


def conform(name: str, form: str, load: Callable[[], object], tflite_bytes: Optional[bytes] = None,
            calib_seed: int = 0, steps: int = 3, onnx_path: Optional[str] = None, twin=None) -> Row:
    """import -> (quantize a float model) -> bit-exact vs LiteRT (or the LSB difference from
    onnxruntime on a quantized ONNX file, or equality with `twin`, the same network imported from
    its bit-exact .tflite) -> compile -> train -> export."""
    row = Row(name, form)
    try:
        m = load()
        if not isinstance(m, tt.QuantizedModel):
            shape = m.tensors[m.input].shape
            calib = np.random.default_rng(calib_seed).uniform(-1, 1, (32,) + tuple(shape)).astype(np.float32)
            m = tt.quantize(m, calib)
            row.note = "float, tt.quantize"
        row.imported = "ok"
    except tt.TinytrainError as e:
        row.imported = f"refused: {type(e).__name__}"
        row.note = str(e)[:160]
        return row
    if tflite_bytes is not None and row.note == "":
        row.exact = "yes" if bit_exact(m, tflite_bytes) else "NO"
    elif twin is not None and row.note == "":
        x = random_int8(m, 8)
        row.exact = "yes (= .tflite)" if np.array_equal(m.forward_int8(x), twin.forward_int8(x)) else "NO"
    elif onnx_path is not None and row.note == "":
        row.exact, row.figure = onnxruntime_agreement(m, onnx_path)
    n = 16
    rng = np.random.default_rng(1)
    x = random_int8(m, n, seed=2).astype(np.float32)
    t_in = m.tensors[m.input]
    x = (x - t_in.zero_point) * np.float32(t_in.scale)
    out_c = m.tensors[m.output].shape[0]
    regress = _is_regressor(m)
    loss = "mse" if regress else "cross_entropy"
    y = (m.forward(x).reshape(n, -1) * 0.5).astype(np.float32) if regress else rng.integers(0, out_c, n)
    try:
        plan = tt.compile(m, tt.schemes.last_layers(m, min(2, len(m.layers))), loss=loss)
        tr = tt.Trainer(plan, lr=0.001)
        losses = [tr.step(x[i * 4: i * 4 + 4], y[i * 4: i * 4 + 4]) for i in range(steps)]
        if not all(np.isfinite(losses)):
            raise RuntimeError(f"non-finite loss {losses}")
        row.trained = "ok"
    except Exception as e:  # the table reports any failure; the tests assert "ok"
        row.trained = f"FAILED: {type(e).__name__}"
        row.note = str(e)[:160]
        return row
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            # what was trained goes out: the firmware bundle and the trained int8 model
            tr.export_mcu(os.path.join(d, "mcu"))
            trained = tr.model
            path = os.path.join(d, "model.onnx")
            trained.to_onnx(path)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feed = sess.get_inputs()[0]
            xin = x.reshape((n,) + tuple(d_ if isinstance(d_, int) else n for d_ in feed.shape)[1:]) \
                if len(feed.shape) != x.ndim else x
            got = sess.run(None, {feed.name: xin.astype(np.float32)})[0].reshape(n, -1)
            want = trained.forward(x).reshape(n, -1)
            step = np.float32(trained.tensors[trained.output].scale)
            if regress:
                close = np.abs(got - want).max() <= 3 * step + 1e-6
            else:
                close = np.abs(got - want).max() <= 3 * step + 1e-6 or (got.argmax(1) == want.argmax(1)).mean() >= 0.9
            row.exported = "ok" if close else "ONNX differs"
    except Exception as e:
        row.exported = f"FAILED: {type(e).__name__}"
        row.note = str(e)[:160]
    return row


# ---------------------------------------------------------------------- other forms of one network
def float_form(model):
    """The float twin of a model: a float Graph as is, a QuantizedModel dequantized."""
    return model.dequantized() if isinstance(model, tt.QuantizedModel) else model


def calibration_batch(model, n: int = 32, seed: int = 0) -> np.ndarray:
    """float32 NCHW samples spread over the model's input range (its int8 grid, or [-1, 1])."""
    shape = model.tensors[model.input].shape
    t = model.tensors[model.input]
    if isinstance(model, tt.QuantizedModel):
        q = np.random.default_rng(seed).integers(-128, 128, (n,) + tuple(shape)).astype(np.float32)
        return ((q - t.zero_point) * np.float32(t.scale)).astype(np.float32)
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + tuple(shape)).astype(np.float32)


def onnxruntime_quantized(model, out_path: str, quant_format: str = "QOperator") -> str:
    """The network through onnxruntime's quantizer: float ONNX exported by tinytrain, then
    `onnxruntime.quantization.quantize_static` (int8 per-channel weights, int8 activations)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    float_path = out_path + ".float.onnx"
    float_form(model).to_onnx(float_path)
    batch = calibration_batch(model)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": batch[i: i + 1]} for i in range(len(batch))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(float_path, out_path, Reader(), quant_format=getattr(QuantFormat, quant_format),
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out_path


# ---------------------------------------------------------------------- synthetic models
def float_fc_graph(w: np.ndarray, b: np.ndarray) -> tt.Graph:
    """A float one-layer fc Graph (weights (O, F), biases (O,)), as an importer would give."""
    return tt.Graph("x", "y", {"x": tt.Tensor("x", (w.shape[1], 1, 1)), "y": tt.Tensor("y", (w.shape[0], 1, 1))},
                    [tt.Node("fc_0", "fc", ["x"], "y", {"act": "none"}, {"weight": w, "bias": b})])


def tiny_float_channel_graph() -> tt.Graph:
    """A float fc whose channel 2 has weights 1e-30 (the float twin of a dead channel)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (5, 12)).astype(np.float32)
    b = rng.normal(0, 0.5, 5).astype(np.float32)
    w[2] = 1e-30
    b[2] = 0.7
    return float_fc_graph(w, b)


def flat_input_onnx():
    """A float ONNX model whose (1, 56) input is reshaped to (1, 1, 7, 8) at the entry."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["img"]),
             helper.make_node("Conv", ["img", "cw", "cb"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array([-1, 1, 7, 8], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 1, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "cb"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 3 * 5 * 6)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fb")]
    g = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 56])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def fc_rounding_case() -> bytes:
    """An int8 fc where single and double rounding give different outputs on random inputs."""
    rng = np.random.default_rng(11)
    w = rng.integers(-127, 128, (16, 64)).astype(np.int8)
    b = rng.integers(-5000, 5000, 16).astype(np.int32)
    return fc_model(w, b, s_w=list(rng.uniform(0.002, 0.02, 16)), s_out=0.37)


def synthetic_cases():
    """(model, form, loader, .tflite bytes or None) for each failure class of issue 22."""
    w, b = dead_channel_weights()
    dead = fc_model(w, b)
    w5, b5 = dead_channel_weights(seed=5)
    two = fc_model(w5, b5, dequantized_copy=True)
    wf = np.random.default_rng(3).integers(-127, 128, (4, 20)).astype(np.int8)
    flat = fc_model(wf, np.arange(4, dtype=np.int32) * 100, flat_reshape=(4, 5))
    fc = fc_rounding_case()
    flat_onnx = flat_input_onnx()
    return [("dead channels (2^30+128, -2^31+100)", "synthetic .tflite", lambda: tt.load_tflite(dead), dead),
            ("1e-30 float channel", "synthetic float", tiny_float_channel_graph, None),
            ("flat input + Reshape", "synthetic .tflite", lambda: tt.load_tflite(flat), flat),
            ("flat input + Reshape", "synthetic float .onnx", lambda: tt.load_onnx(flat_onnx), None),
            ("two outputs", "synthetic .tflite", lambda: tt.load_tflite(two), two),
            ("FC double vs single rounding", "synthetic .tflite", lambda: tt.load_tflite(fc), fc)]


def fc_rounding_mismatches(data: bytes, n: int = 64) -> Dict[str, Tuple[int, int, int]]:
    """Per fully connected layer of an int8 .tflite: outputs that differ from LiteRT's reference
    kernels when the layer's accumulators (computed from the interpreter's own input to the layer)
    are requantized with single and with double rounding by tt-core, and the number of outputs."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from tinytrain import _core
    from tinytrain.model import act_range

    q = tt.load_tflite(data)
    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    index = {t["name"]: t["index"] for t in it.get_tensor_details()}
    x = np.random.default_rng(1).integers(-128, 128, (n,) + tuple(d["shape"][1:])).astype(d["dtype"])
    counts: Dict[str, List[int]] = {}
    for i in range(n):
        it.set_tensor(d["index"], x[i: i + 1])
        it.invoke()
        for node in q.nodes:
            if node.op != "fc" or node.inputs[0] not in index or node.output not in index:
                continue
            t_in, t_out = q.tensors[node.inputs[0]], q.tensors[node.output]
            xin = it.get_tensor(index[node.inputs[0]]).reshape(1, -1).astype(np.int64)
            ref = it.get_tensor(index[node.output]).reshape(-1)
            acc = node.params["bias_q"] + (xin - t_in.zero_point) @ node.params["weight_q"].astype(np.int64).T
            req = np.float64(t_in.scale) * node.params["weight_scale"].astype(np.float64) / np.float64(t_out.scale)
            lo, hi = act_range(node.attrs.get("act", "none"), t_out.scale, t_out.zero_point)
            c = counts.setdefault(node.name, [0, 0, 0])
            for k, mode in enumerate(("single", "double")):
                y = _core.requantize(acc.astype(np.int32), req, int(t_out.zero_point), lo, hi, mode)[0]
                c[k] += int((y != ref).sum())
            c[2] += ref.size
    return {k: tuple(v) for k, v in counts.items()}


def tf2onnx_form(tflite_path: str, out_path: str) -> Optional[str]:
    """The .tflite converted by tf2onnx (`python -m tf2onnx.convert --tflite`, opset 13), or None
    when tf2onnx (and the TensorFlow it needs) is not installed."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("tf2onnx") is None or importlib.util.find_spec("tensorflow") is None:
        return None
    res = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", tflite_path, "--output", out_path,
                          "--opset", "13"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"tf2onnx failed on {tflite_path}: {res.stderr[-500:]}")
    return out_path
