"""Bad ONNX input gets a typed error naming what and where, for each failure mode of issue 4:
unsupported operator, malformed / truncated file, unresolvable dynamic shape, missing initializer
(and missing external data, unsupported opset)."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tinytrain as tt


def small_model(opset=13, input_dims=("N", 2, 6, 6), extra_node=None):
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "conv.w")
    nodes = [helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv1", pads=[1, 1, 1, 1])]
    out = "c"
    if extra_node is not None:
        nodes.append(extra_node)
        out = extra_node.output[0]
    nodes.append(helper.make_node("GlobalAveragePool", [out], ["y"], name="gap"))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_small_model_imports():
    g = tt.load_onnx(small_model())
    assert [n.op for n in g.nodes] == ["conv", "global_avgpool"]


def test_unsupported_operator_names_node_op_and_opset(tmp_path):
    m = small_model(opset=17, extra_node=helper.make_node("Sigmoid", ["c"], ["s"], name="my_sigmoid"))
    path = tmp_path / "sig.onnx"
    onnx.save(m, str(path))
    with pytest.raises(tt.UnsupportedOperatorError) as e:
        tt.load_onnx(str(path))
    assert e.value.node == "my_sigmoid" and e.value.op_type == "Sigmoid" and e.value.opset == 17
    assert "my_sigmoid" in str(e.value) and "Sigmoid" in str(e.value) and "17" in str(e.value)
    assert isinstance(e.value, tt.TinytrainError)


def test_unsupported_attribute_value_names_the_node():
    m = small_model()
    m.graph.node[0].attribute.append(helper.make_attribute("dilations", [2, 2]))
    with pytest.raises(tt.UnsupportedOperatorError, match="conv1.*Conv.*dilations"):
        tt.load_onnx(m)


def test_clip_that_is_not_relu_is_refused():
    lo = numpy_helper.from_array(np.array(-1.0, np.float32), "lo")
    m = small_model(extra_node=helper.make_node("Clip", ["c", "lo"], ["k"], name="clip_m1"))
    m.graph.initializer.append(lo)
    with pytest.raises(tt.UnsupportedOperatorError, match="clip_m1.*Clip"):
        tt.load_onnx(m)


def test_truncated_file(tmp_path):
    data = tt.models.mcunet_5fps(resolution=64, num_classes=4).SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(tt.ModelFormatError) as e:
        tt.load_onnx(str(path))
    assert str(path) in str(e.value)


def test_garbage_and_empty_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(64) + b"\xff" * 64)
    with pytest.raises(tt.ModelFormatError, match="junk.onnx"):
        tt.load_onnx(str(junk))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(tt.ModelFormatError, match="empty.onnx"):
        tt.load_onnx(str(empty))
    with pytest.raises(tt.ModelFormatError, match="no such file"):
        tt.load_onnx(str(tmp_path / "missing.onnx"))


def test_dynamic_spatial_shape_is_named_and_can_be_resolved():
    m = small_model(input_dims=("N", 2, "height", 6))
    with pytest.raises(tt.ModelFormatError, match=r"input 'x' dimension 2 is 'height'"):
        tt.load_onnx(m)
    g = tt.load_onnx(m, input_shape=(2, 6, 6))
    assert g.tensors[g.input].shape == (2, 6, 6)


def test_missing_initializer_names_node_and_tensor():
    m = small_model()
    del m.graph.initializer[:]
    with pytest.raises(tt.ModelFormatError, match=r"conv1.*'conv\.w'.*missing initializer"):
        tt.load_onnx(m)


def test_two_graph_inputs_are_refused():
    m = small_model()
    m.graph.input.append(helper.make_tensor_value_info("conv.w", TensorProto.FLOAT, [4, 2, 3, 3]))
    del m.graph.initializer[:]
    with pytest.raises(tt.ModelFormatError, match="exactly one graph input"):
        tt.load_onnx(m)


def test_corrupt_initializer_data():
    m = small_model()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:10]
    with pytest.raises(tt.ModelFormatError, match="conv.w"):
        tt.load_onnx(m)


def test_missing_external_data(tmp_path):
    m = tt.models.mcunet_5fps(resolution=64, num_classes=4)
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:100])
    with pytest.raises(tt.ModelFormatError, match="w.bin.*truncated"):
        tt.load_onnx(str(path))
    (tmp_path / "w.bin").unlink()
    with pytest.raises(tt.ModelFormatError, match="external file 'w.bin'"):
        tt.load_onnx(str(path))


def test_opset_outside_range():
    with pytest.raises(tt.ModelFormatError, match="opset 9"):
        tt.load_onnx(small_model(opset=9))


def test_softmax_in_the_middle_is_refused():
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Softmax", ["f"], ["s"], name="mid_softmax"),
             helper.make_node("Gemm", ["s", "w"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(tt.UnsupportedOperatorError, match="mid_softmax.*last op"):
        tt.load_onnx(m)
