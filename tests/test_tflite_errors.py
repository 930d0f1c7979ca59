"""Malformed and unsupported .tflite files (hand-broken copies of the converter fixtures) and the
converter-shaped ONNX graphs tinytrain refuses: each gives a typed error naming what and where."""
from __future__ import annotations

import os
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tinytrain as tt
from tinytrain.tflite_import import _read

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tflite")


def fixture_bytes(name: str = "resnet8.tflite") -> bytes:
    with open(os.path.join(FIX, name), "rb") as f:
        return f.read()


def test_wrong_file_identifier():
    data = bytearray(fixture_bytes())
    data[4:8] = b"XXXX"
    with pytest.raises(tt.ModelFormatError, match="file identifier"):
        tt.load_tflite(bytes(data))
    with pytest.raises(tt.ModelFormatError, match="too short"):
        tt.load_tflite(b"TFL3")


@pytest.mark.parametrize("frac", [0.02, 0.1, 0.33, 0.5, 0.9])
def test_truncated_file(frac, tmp_path):
    data = fixture_bytes()
    p = tmp_path / "cut.tflite"
    p.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(tt.ModelFormatError) as e:
        tt.load_tflite(str(p))
    assert str(p) in str(e.value)


def test_buffer_index_out_of_range():
    data = bytearray(fixture_bytes())
    _, root = _read(bytes(data), "x")
    t = root.tables(2, "subgraphs")[0].tables(0, "tensors")[5]
    struct.pack_into("<I", data, t.pos + t._off(2), 100000)
    with pytest.raises(tt.ModelFormatError, match="buffer index out of range") as e:
        tt.load_tflite(bytes(data))
    assert "buffer 100000" in str(e.value)


def test_unsupported_builtin_names_code_index_and_subgraph():
    data = bytearray(fixture_bytes())
    _, root = _read(bytes(data), "x")
    for oc in root.tables(1, "operator_codes"):
        if oc.scalar(3, "i", 0, "builtin_code") == 17:  # MAX_POOL_2D -> MUL
            struct.pack_into("<b", data, oc.pos + oc._off(0), 18)
            struct.pack_into("<i", data, oc.pos + oc._off(3), 18)
    with pytest.raises(tt.UnsupportedOperatorError) as e:
        tt.load_tflite(bytes(data))
    err = e.value
    assert (err.builtin_code, err.op_index, err.subgraph) == (18, 1, 0)
    assert "MUL (builtin code 18)" in str(err) and "subgraph 0 operator 1" in str(err)


def test_tensor_and_opcode_indices_out_of_range():
    data = bytearray(fixture_bytes())
    _, root = _read(bytes(data), "x")
    op = next(o for o in root.tables(2, "subgraphs")[0].tables(3, "operators") if o._off(0))  # index stored
    struct.pack_into("<I", data, op.pos + op._off(0), 77)
    with pytest.raises(tt.ModelFormatError, match="opcode index 77"):
        tt.load_tflite(bytes(data))
    data = bytearray(fixture_bytes())
    start, n = op._vec(1, "inputs", 4)
    struct.pack_into("<i", data, start, 5000)
    with pytest.raises(tt.ModelFormatError, match="tensor 5000"):
        tt.load_tflite(bytes(data))


def test_random_corruption_never_escapes_as_an_untyped_error():
    data = fixture_bytes("ds_cnn.tflite")
    rng = np.random.default_rng(7)
    outcomes = {"ok": 0, "typed": 0}
    for _ in range(300):
        b = bytearray(data)
        for pos in rng.integers(0, len(b), rng.integers(1, 6)):
            b[pos] = int(rng.integers(0, 256))
        try:
            tt.load_tflite(bytes(b))
            outcomes["ok"] += 1
        except tt.TinytrainError:
            outcomes["typed"] += 1
    assert outcomes["typed"] > 0


def test_tflite_inspect_cli(capsys):
    from tinytrain.cli import main

    assert main(["inspect", os.path.join(FIX, "mobilenet.tflite")]) == 0
    out = capsys.readouterr().out
    assert "global_avgpool_0" in out and "every op is supported" in out
    # the other commands read models through fileio.load_model, which dispatches on the extension too
    assert main(["memory", os.path.join(FIX, "resnet8.tflite"), "--scheme", "last:3"]) == 0
    assert "flash (frozen)" in capsys.readouterr().out


# ---------------------------------------------------------------------- ONNX, converter-shaped
def _model(nodes, inits, inp, out, ms=False):
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    g = helper.make_graph(nodes, "g", [inp], [out], inits)
    return helper.make_model(g, opset_imports=opsets)


def _conv_weight(o=4, i=2):
    return onnx.numpy_helper.from_array(np.ones((o, i, 3, 3), np.float32), "w")


def test_nhwc_input_with_transpose_imports_and_names_may_hold_separators():
    name = "serving_default_input:0;a/b"
    inp = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["unk__1", 6, 5, 2])
    out = helper.make_tensor_value_info("y:0", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Transpose", [name], ["t;1/x:0"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t;1/x:0", "w"], ["c;2/y:0"], pads=[1, 0, 2, 1]),
             helper.make_node("Relu", ["c;2/y:0"], ["r:0"]),
             helper.make_node("Transpose", ["r:0"], ["t2"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t2", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "m"], ["y:0"])]
    g = tt.load_onnx(_model(nodes, [_conv_weight(), onnx.numpy_helper.from_array(np.array([-1, 7 * 4 * 4], np.int64),
                                                                                "shape"),
                                    onnx.numpy_helper.from_array(np.ones((112, 3), np.float32), "m")], inp, out))
    assert g.tensors[g.input].shape == (2, 6, 5)
    assert [n.op for n in g.nodes] == ["conv", "fc"] and g.nodes[0].attrs["pads"] == (1, 0, 2, 1)
    # the classifier reads the NHWC flattening: its columns are kept, not permuted
    np.testing.assert_array_equal(g.nodes[1].params["weight"], np.ones((3, 112), np.float32))


def test_unsupported_transpose_and_nhwc_reads_are_named():
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 5])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2], name="tr"),
                helper.make_node("Conv", ["t", "w"], ["y"])], [_conv_weight()], inp, out)
    with pytest.raises(tt.UnsupportedOperatorError, match="perm") as e:
        tt.load_onnx(m)
    assert e.value.node == "tr" and e.value.op_type == "Transpose"
    m = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                helper.make_node("Relu", ["t"], ["y"], name="relu_nhwc")], [], inp, out)
    with pytest.raises(tt.UnsupportedOperatorError, match="N, H, W, C") as e:
        tt.load_onnx(m)
    assert e.value.node == "relu_nhwc"


def test_pad_folds_into_conv_and_other_pads_are_refused():
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 5])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pads = onnx.numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "p")
    m = _model([helper.make_node("Pad", ["x", "p"], ["xp"]),
                helper.make_node("Conv", ["xp", "w"], ["y"], strides=[2, 2])], [_conv_weight(), pads], inp, out)
    g = tt.load_onnx(m)
    assert [n.op for n in g.nodes] == ["conv"] and g.nodes[0].attrs["pads"] == (0, 0, 1, 1)
    assert g.tensors[g.output].shape == (4, 3, 2)
    m = _model([helper.make_node("Pad", ["x", "p"], ["y"], name="pad_end", mode="reflect")], [pads], inp, out)
    with pytest.raises(tt.UnsupportedOperatorError, match="reflect"):
        tt.load_onnx(m)
    m = _model([helper.make_node("Pad", ["x", "p"], ["xp"], name="pad_pool"),
                helper.make_node("MaxPool", ["xp"], ["y"], kernel_shape=[2, 2])], [pads], inp, out)
    with pytest.raises(tt.UnsupportedOperatorError, match="right before Conv") as e:
        tt.load_onnx(m)
    assert e.value.node == "pad_pool"


@pytest.mark.parametrize("op", ["QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat"])
def test_quantized_ops_without_kernels_are_refused_by_name(op):
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node(op, ["xq", "s", "z", "s", "z"], ["yq"], domain="com.microsoft", name="the_op"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    with pytest.raises(tt.UnsupportedOperatorError) as e:
        tt.load_onnx(_model(nodes, inits, inp, out, ms=True))
    assert e.value.node == "the_op" and e.value.op_type == op


@pytest.mark.parametrize("name", ["ds_cnn.onnx", "resnet8_qop.onnx"])
def test_corrupted_converter_onnx_gives_typed_errors(name):
    with open(os.path.join(FIX, name), "rb") as f:
        data = f.read()
    rng = np.random.default_rng(3)
    typed = 0
    for _ in range(60):
        b = bytearray(data)
        for pos in rng.integers(0, len(b), rng.integers(1, 4)):
            b[pos] = int(rng.integers(0, 256))
        try:
            tt.load_onnx(bytes(b))
        except tt.TinytrainError:
            typed += 1
    assert typed > 0
