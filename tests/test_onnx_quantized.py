"""Models quantized elsewhere: onnxruntime's quantizer in QDQ and QOperator formats. tt.load_onnx
returns a QuantizedModel that keeps the file's own int8 weights, int32 biases, scales and zero
points, and its int8 forward (tt-core) predicts what onnxruntime predicts on the same file."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import tinytrain as tt

ort = pytest.importorskip("onnxruntime")
oq = pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("sklearn")


class _Reader(oq.CalibrationDataReader):
    def __init__(self, x):
        self.it = iter([{"input": x[i: i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.it, None)


@pytest.fixture(scope="module")
def calib():
    x, _ = tt.datasets.digits("source", "train")
    return x[:128]


@pytest.mark.parametrize("fmt,per_channel,act_type", [
    ("QDQ", True, "QInt8"), ("QDQ", False, "QUInt8"), ("QOperator", True, "QUInt8"), ("QOperator", False, "QInt8")])
def test_onnxruntime_quantized_demo(tmp_path, calib, fmt, per_channel, act_type):
    path = str(tmp_path / f"demo_{fmt}.onnx")
    oq.quantize_static(tt.models.DEMO_PATH, path, _Reader(calib), quant_format=getattr(oq.QuantFormat, fmt),
                       per_channel=per_channel, activation_type=getattr(oq.QuantType, act_type),
                       weight_type=oq.QuantType.QInt8)
    proto = onnx.load(path)
    q = tt.load_onnx(path)
    assert isinstance(q, tt.QuantizedModel) and q.calibration == "imported" and q.softmax_tail
    assert q.layers == tt.load_onnx(tt.models.DEMO_PATH).layers

    # the file's int8 weights are kept bit for bit (the first conv's, whichever format holds them)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    wq = q.node("conv_0").params["weight_q"]
    assert any(v.dtype == np.int8 and v.shape == wq.shape and np.array_equal(v, wq) for v in inits.values())
    for name in ("conv_0", "fc_0"):
        bq = q.node(name).params["bias_q"]
        assert any(v.dtype == np.int32 and np.array_equal(v.reshape(-1), bq) for v in inits.values()), name
    # and its input quantization (uint8 zero points shift by 128 to int8, exactly)
    scales = [v for k, v in inits.items() if v.dtype == np.float32 and v.size == 1]
    assert any(abs(float(s) - q.tensors[q.input].scale) < 1e-9 for s in scales)

    x, _ = tt.datasets.digits("all", "test")
    probs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    logits = q.forward(x)
    assert (probs.argmax(1) == logits.argmax(1)).mean() >= 0.99
    with pytest.raises(tt.QuantizationError, match="already quantized"):
        tt.quantize(q, x[:4])


def test_partly_quantized_file_is_refused():
    """Input quantized, conv output left in float: no scale for it, so no int8 graph."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Conv", ["xd", "w"], ["y"], name="float_conv")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(tt.ModelFormatError, match="partly quantized.*'y'"):
        tt.load_onnx(m)


def test_weights_behind_dequantize_with_excluded_nodes(tmp_path, calib):
    """Nodes the quantizer skipped keep float weights; tinytrain quantizes those itself."""
    path = str(tmp_path / "qdq.onnx")
    oq.quantize_static(tt.models.DEMO_PATH, path, _Reader(calib), quant_format=oq.QuantFormat.QDQ,
                       nodes_to_exclude=["pw4"])
    q = tt.load_onnx(path)
    x, _ = tt.datasets.digits("all", "test")
    probs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (probs.argmax(1) == q.forward(x).argmax(1)).mean() >= 0.98
