"""Import conformance (issue 22): the real files, the converter forms this machine has, and a
synthetic model for each failure class, each imported, run bit-exact against LiteRT's reference
kernels where a .tflite exists, compiled, trained a few steps and exported (ONNX run in
onnxruntime, MCU bundle written). `benches/conformance.py` prints the same checks as a table."""
import os

import numpy as np
import pytest

import tinytrain as tt
from tinytrain import _core

pytest.importorskip("ai_edge_litert")  # LiteRT's reference kernels are the oracle (it brings flatbuffers)
pytest.importorskip("flatbuffers")

import _conformance_cases as C  # noqa: E402


def _ok(row):
    assert (row.imported, row.trained, row.exported) == ("ok", "ok", "ok"), (row.cells(), row.note)
    assert row.exact == "-" or row.exact.startswith("yes"), (row.cells(), row.note)


@pytest.mark.parametrize("name", C.REAL_FILES)
def test_real_files_conform(name):
    d = C.models_dir()
    if d is None:
        pytest.skip("../shared/models (or TINYTRAIN_MODELS) is not on this machine")
    path = os.path.join(d, name)
    row = C.conform(name, ".tflite", lambda: tt.load_tflite(path), open(path, "rb").read())
    _ok(row)
    if "int8" in name:
        assert row.exact == "yes"


@pytest.mark.parametrize("name", C.REAL_FILES)
@pytest.mark.parametrize("form", ["float ONNX", "QOperator", "QDQ"])
def test_real_files_through_onnxruntime_quantizer_conform(name, form, tmp_path):
    """The float twin of each real file exported as float ONNX, imported as is (then tt.quantize)
    and through onnxruntime's quantizer in both of its formats."""
    d = C.models_dir()
    if d is None:
        pytest.skip("../shared/models (or TINYTRAIN_MODELS) is not on this machine")
    src = tt.load_tflite(os.path.join(d, name))
    if form == "float ONNX":
        proto = C.float_form(src).to_onnx()
        _ok(C.conform(name, form, lambda: tt.load_onnx(proto)))
        return
    path = C.onnxruntime_quantized(src, str(tmp_path / "q.onnx"), form)
    row = C.conform(name, form, lambda: tt.load_onnx(path), onnx_path=path)
    _ok_onnxruntime(row)


@pytest.mark.parametrize("name", C.REAL_FILES)
def test_real_files_through_tf2onnx_conform(name, tmp_path):
    """tf2onnx's form of each real file: an int8 file gives the same model as the .tflite (same
    layer names in the same order, bit-identical forward), so last_layers and schemes move."""
    d = C.models_dir()
    if d is None:
        pytest.skip("../shared/models (or TINYTRAIN_MODELS) is not on this machine")
    path = C.tf2onnx_form(os.path.join(d, name), str(tmp_path / "m.onnx"))
    if path is None:
        pytest.skip("tf2onnx / tensorflow are not installed")
    src = tt.load_tflite(os.path.join(d, name))
    twin = src if isinstance(src, tt.QuantizedModel) else None
    row = C.conform(name, "tf2onnx", lambda: tt.load_onnx(path), twin=twin)
    _ok(row)
    if twin is not None:
        assert row.exact == "yes (= .tflite)"
        b = tt.load_onnx(path)
        assert b.layers == src.layers
        assert tt.schemes.last_layers(b, 2).weight_ratios == tt.schemes.last_layers(src, 2).weight_ratios


def _ok_onnxruntime(row):
    assert (row.imported, row.trained, row.exported) == ("ok", "ok", "ok"), (row.cells(), row.note)
    # onnxruntime requantizes in float, tinytrain in fixed point (single rounding): off-by-one
    # outputs propagate through deep nets, so the bound is a few LSB, or argmax agreement
    if row.exact.startswith("argmax"):
        assert row.figure >= 0.8, row.cells()
    else:
        assert row.figure <= 8, row.cells()


@pytest.mark.parametrize("case", C.synthetic_cases(), ids=lambda c: f"{c[0]} {c[1]}")
def test_synthetic_failure_classes_conform(case):
    name, form, load, data = case
    _ok(C.conform(name, form, load, data))


@pytest.mark.parametrize("net", ["ds_cnn", "resnet8", "autoencoder", "mobilenet"])
@pytest.mark.parametrize("form", [".tflite", ".onnx", "_float.onnx", "_qop.onnx"])
def test_converter_forms_conform(net, form):
    path = os.path.join(C.FIXTURES, net + form)
    if not os.path.exists(path):
        pytest.skip(f"no {net}{form} fixture")
    if form == ".tflite":
        _ok(C.conform(net, form, lambda: tt.load_tflite(path), open(path, "rb").read()))
    elif form == ".onnx":  # tf2onnx's QDQ form of the .tflite: the same model, bit for bit
        row = C.conform(net, form, lambda: tt.load_onnx(path), twin=tt.load_tflite(path[:-5] + ".tflite"))
        _ok(row)
        assert row.exact == "yes (= .tflite)"
    elif form == "_qop.onnx":
        _ok_onnxruntime(C.conform(net, form, lambda: tt.load_onnx(path), onnx_path=path))
    else:
        _ok(C.conform(net, form, lambda: tt.load_onnx(path)))


# ---------------------------------------------------------------------- dead channels
def test_dead_channels_train_and_keep_their_output():
    w, b = C.dead_channel_weights()
    data = C.fc_model(w, b)
    q = tt.load_tflite(data)
    fc = q.node(q.layers[0])
    assert np.abs(fc.params["bias_q"].astype(np.int64)).max() <= _core.BIAS_LIMIT
    assert fc.params["bias_q"][1] != b[1] and fc.params["bias_q"][4] != b[4]  # the file's were out of bound
    x = C.random_int8(q, 32)
    ref = C.litert_reference(data, x.reshape(32, -1))
    assert np.array_equal(q.forward_int8(x).reshape(32, -1), ref)


def test_dead_channel_with_a_mid_range_output_keeps_it_or_is_named():
    # a requantization scale of 50 / 2^30: bias 2^30 + 128 gives an output of 50 (+ zero point),
    # which 2^30 gives too; -2^31 + 100 gives -100, which no bias within +-2^30 can give
    w, b = C.dead_channel_weights()
    s_w = [50 / 2**30 * 0.2 / 0.05] * 6
    with pytest.raises(tt.QuantizationError, match="output channel 4: .*no bias within the bound") as e:
        tt.load_tflite(C.fc_model(w, b, s_w=s_w))
    assert e.value.channel == 4
    b[4] = 1000
    data = C.fc_model(w, b, s_w=s_w)
    q = tt.load_tflite(data)
    x = C.random_int8(q, 4)
    ref = C.litert_reference(data, x.reshape(4, -1))
    assert np.array_equal(q.forward_int8(x).reshape(4, -1), ref)
    assert (ref[:, 1] == 45).all()  # mid-range: not the clamp
    assert np.abs(q.node(q.layers[0]).params["bias_q"].astype(np.int64)).max() <= _core.BIAS_LIMIT


def test_live_channel_beyond_the_bound_names_layer_and_channel():
    w, b = C.dead_channel_weights()
    b[3] = 2**30 + 5  # channel 3 has non-zero weights: its accumulator could overflow
    with pytest.raises(tt.QuantizationError, match="output channel 3") as e:
        tt.load_tflite(C.fc_model(w, b))
    assert e.value.channel == 3 and e.value.layer == "dense"  # the Keras layer of weight "dense/MatMul"


def test_tiny_float_channel_gets_a_floored_scale():
    g = C.tiny_float_channel_graph()
    calib = np.random.default_rng(0).normal(0, 1, (64, 12)).astype(np.float32)  # (N, F) calibration
    q = tt.quantize(g, calib)
    fc = q.node("fc_0")
    assert fc.params["weight_scale"][2] > 1e-9
    assert not fc.params["weight_q"][2].any()
    assert np.abs(fc.params["bias_q"].astype(np.int64)).max() <= _core.BIAS_LIMIT
    # the channel still outputs (about) its bias: 0.7
    assert abs(q.forward(calib[:4])[:, 2] - 0.7).max() < 3 * q.tensors["y"].scale


def test_calibration_accepts_n_by_f_and_names_the_shapes_it_takes():
    g = C.float_fc_graph(np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    tt.quantize(g, np.ones((4, 3), np.float32))
    with pytest.raises(tt.QuantizationError, match=r"\(N, 3\)"):
        tt.quantize(g, np.ones((4, 5), np.float32))


# ---------------------------------------------------------------------- flat input, outputs
def test_flat_input_with_leading_reshape_is_folded():
    w = np.random.default_rng(3).integers(-127, 128, (4, 20)).astype(np.int8)
    data = C.fc_model(w, np.arange(4, dtype=np.int32) * 100, flat_reshape=(4, 5))
    q = tt.load_tflite(data)
    assert q.tensors[q.input].shape == (1, 4, 5)
    assert C.bit_exact(q, data, 16)


def test_flat_input_with_leading_reshape_onnx():
    f = tt.load_onnx(C.flat_input_onnx())
    assert f.tensors[f.input].shape == (1, 7, 8)


def test_two_outputs_default_to_the_head_and_output_picks_one():
    w, b = C.dead_channel_weights(seed=5)
    data = C.fc_model(w, b, dequantized_copy=True)
    q = tt.load_tflite(data)  # int8 logits and their DEQUANTIZE'd copy: one head
    assert q.output == "logits"
    assert tt.load_tflite(data, output="logits_float").output == "logits"
    two = C.fc_model(w, b, second_head=True)
    with pytest.raises(tt.ModelFormatError, match="'logits', 'aux_out'.*output=NAME"):
        tt.load_tflite(two)
    aux = tt.load_tflite(two, output="aux_out")
    assert aux.tensors[aux.output].shape == (2, 1, 1)
    x = C.random_int8(aux, 8)
    assert np.array_equal(aux.forward_int8(x).reshape(8, -1), C.litert_reference(two, x.reshape(8, -1), "aux_out"))
    with pytest.raises(tt.ModelFormatError, match="is not an output"):
        tt.load_tflite(two, output="nope")


def test_two_outputs_onnx():
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["logits"], transB=1),
             helper.make_node("Identity", ["logits"], ["logits_copy"]),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["aux"], transB=1)]
    inits = [numpy_helper.from_array(rng.normal(0, 1, (3, 6)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 1, (2, 6)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b2")]
    vi = lambda n, k: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, k])  # noqa: E731
    copy = helper.make_model(helper.make_graph(nodes[:2], "g", [vi("x", 6)], [vi("logits", 3), vi("logits_copy", 3)],
                                               inits[:2]), opset_imports=[helper.make_opsetid("", 13)])
    assert tt.load_onnx(copy).tensors[tt.load_onnx(copy).output].shape == (3, 1, 1)
    heads = helper.make_model(helper.make_graph([nodes[0], nodes[2]], "g", [vi("x", 6)], [vi("logits", 3), vi("aux", 2)],
                                                inits), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(tt.ModelFormatError, match="'logits', 'aux'.*output=NAME"):
        tt.load_onnx(heads)
    g = tt.load_onnx(heads, output="aux")
    assert g.tensors[g.output].shape == (2, 1, 1)


# ---------------------------------------------------------------------- fully connected rounding
def test_fully_connected_is_bit_exact_with_litert_where_the_roundings_differ():
    """LiteRT's reference FULLY_CONNECTED (ai-edge-litert's BUILTIN_REF kernels) is the oracle. The
    case is chosen so that single and double rounding give different outputs, so it pins which
    one tinytrain's fc must use to be bit-exact."""
    data = C.fc_rounding_case()
    q = tt.load_tflite(data)
    x = C.random_int8(q, 64)
    ref = C.litert_reference(data, x.reshape(64, -1))
    fc, t_in, t_out = q.node(q.layers[0]), q.tensors[q.input], q.tensors[q.output]
    w, b = fc.params["weight_q"], fc.params["bias_q"]
    acc = (b.astype(np.int64) + (x.reshape(64, -1).astype(np.int64) - t_in.zero_point) @ w.astype(np.int64).T)
    req = np.float64(t_in.scale) * fc.params["weight_scale"].astype(np.float64) / np.float64(t_out.scale)
    single = _core.requantize(acc.astype(np.int32), req, t_out.zero_point, -128, 127, "single")
    double = _core.requantize(acc.astype(np.int32), req, t_out.zero_point, -128, 127, "double")
    assert (single != double).any(), "the case does not tell the roundings apart"
    assert np.array_equal(q.forward_int8(x).reshape(64, -1), ref)


# ---------------------------------------------------------------------- one network, two importers
def _other_topological_order(proto):
    """The same ONNX graph with its nodes in another valid order: every ready non-Conv node
    first, then of the ready Convs the one latest in the file (a residual block's shortcut conv
    moves ahead of its main path)."""
    import onnx

    nodes = list(proto.graph.node)
    have = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    out = []
    while nodes:
        ready = [n for n in nodes if all(i in have for i in n.input)]
        other = [r for r in ready if r.op_type != "Conv"]
        n = other[0] if other else ready[-1]
        nodes.remove(n)
        out.append(n)
        have.update(n.output)
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.node[:]
    m.graph.node.extend(out)
    return m


@pytest.mark.parametrize("net,order", [("ds_cnn", "file"), ("resnet8", "file"), ("resnet8", "other")])
def test_one_network_through_both_importers_is_the_same_model(net, order):
    import onnx

    a = tt.load_tflite(os.path.join(C.FIXTURES, net + ".tflite"))
    proto = onnx.load(os.path.join(C.FIXTURES, net + ".onnx"))
    if order == "other":
        proto = _other_topological_order(proto)
        assert [n.name for n in proto.graph.node] != [n.name for n in onnx.load(os.path.join(C.FIXTURES, net + ".onnx")).graph.node]
    b = tt.load_onnx(proto)
    assert a.layers[0] == "conv2d"  # the Keras layer names the file carries
    assert a.layers == b.layers
    assert tt.schemes.last_layers(a, 2).weight_ratios == tt.schemes.last_layers(b, 2).weight_ratios
    for name in a.layers:  # the same name is the same layer, so a saved scheme moves between them
        assert np.array_equal(a.node(name).params["weight_q"], b.node(name).params["weight_q"]), name
    x = C.random_int8(a, 8)
    assert np.array_equal(a.forward_int8(x), b.forward_int8(x))


def test_cli_quantize_takes_n_by_f_calibration_for_a_flat_input_model(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    from tinytrain.cli import main

    rng = np.random.default_rng(6)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "flat",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(rng.normal(0, 1, (3, 6)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(3, np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "f.onnx")
    np.save(tmp_path / "calib.npy", rng.normal(0, 1, (32, 6)).astype(np.float32))
    assert main(["quantize", str(tmp_path / "f.onnx"), "--calib", str(tmp_path / "calib.npy"),
                 "-o", str(tmp_path / "q.onnx")]) == 0
    assert isinstance(tt.load_onnx(tmp_path / "q.onnx"), tt.QuantizedModel)


def test_file_names_need_every_layer_tensorflow_scoped_and_never_clash():
    from tinytrain.graph import Node, name_layers

    def chain():
        a = Node("?", "conv", ["in"], "a")
        b = Node("?", "add", ["a", "a"], "b")
        c = Node("?", "conv", ["b"], "c")
        return a, b, c

    a, b, c = chain()
    assert [n.name for n in name_layers([a, b, c], {id(a): "m/conv2d_1/Conv2D", id(c): "m/conv2d/Conv2D_dequant"})] \
        == ["conv2d_1", "add_0", "conv2d"]
    a, b, c = chain()  # one weight without a TensorFlow scope: the file's order and {op}_{k}
    assert [n.name for n in name_layers([a, b, c], {id(a): "m/conv2d/Conv2D", id(c): "const_fold_opt__3"})] \
        == ["conv_0", "add_0", "conv_1"]
    a, b, c = chain()  # a Keras layer named like another node's {op}_{k}
    assert [n.name for n in name_layers([a, b, c], {id(a): "m/add_0/Conv2D", id(c): "m/conv2d/Conv2D"})] \
        == ["conv_0", "add_0", "conv_1"]


def test_flat_input_reshaped_to_nhwc_then_transposed_onnx():
    """tf2onnx's form of micro_speech's entry: (1, F) -> Reshape (1, H, W, C) -> Transpose to NCHW."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["nhwc"]),
             helper.make_node("Transpose", ["nhwc"], ["img"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["img", "cw", "cb"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array([-1, 5, 6, 2], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 2, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "cb"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 3 * 3 * 4)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fb")]
    g = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 60])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    f = tt.load_onnx(m)
    assert f.tensors[f.input].shape == (2, 5, 6)
    x = rng.normal(0, 1, (3, 60)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})[0]
    got = tt.reference.forward(f, x[:1].reshape(1, 5, 6, 2).transpose(0, 3, 1, 2), tt.reference.Cache())
    np.testing.assert_allclose(np.asarray(got).reshape(1, -1), want, atol=1e-5)
