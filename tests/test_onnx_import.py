"""ONNX import: float forward of the imported graph (tinytrain.reference) equals onnxruntime on the
same file, for the zoo and for hand-built models covering the supported ops; plus the layout
rules (fc columns in HWC order) and the model figures of the zoo."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tinytrain as tt
from tinytrain import reference

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_matches_ort(model, x, rtol=1e-4):
    g = tt.load_onnx(model)
    assert isinstance(g, tt.Graph) and not isinstance(g, tt.QuantizedModel)
    want = run_ort(model, x)
    got = reference.forward(g, x)
    if g.softmax_tail:
        e = np.exp(got - got.max(axis=1, keepdims=True))
        got = e / e.sum(axis=1, keepdims=True)
    got = got.reshape(want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=0)
    return g


@pytest.mark.parametrize("name,kwargs,paper_macs,paper_params", [
    ("mcunet_5fps", {}, 23e6, 0.48e6),
    ("mobilenetv2", {"width": 0.35}, 17e6, 0.25e6),
    ("proxylessnas", {"width": 0.3}, 19e6, 0.33e6),
])
def test_zoo_matches_onnxruntime_and_paper_macs(name, kwargs, paper_macs, paper_params):
    model = getattr(tt.models, name)(num_classes=10, **kwargs)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    x = RNG.random((2, 3, 128, 128), dtype=np.float32)
    g = assert_matches_ort(model, x)
    assert not any(n.op not in tt.graph.OPS for n in g.nodes)
    rows = tt.model.layer_stats(g)
    macs = sum(r["macs"] for r in rows)
    # MACs are the architecture's figure (within 10 % of the paper's rounded number); params are
    # reported by the test (the paper's "backbone" counting is not stated exactly)
    assert abs(macs - paper_macs) / paper_macs < 0.10, macs
    assert g.layers[0] == "conv_0" and g.layers[-1] == "fc_0"


def test_zoo_resolution_and_classes():
    m = tt.models.mobilenetv2(width=0.35, resolution=96, num_classes=7)
    g = tt.load_onnx(m)
    assert g.tensors[g.input].shape == (3, 96, 96)
    assert g.tensors[g.output].shape == (7, 1, 1)
    g = tt.load_onnx(tt.models.proxylessnas(width=0.3, resolution=176, num_classes=3))
    assert g.tensors[g.input].shape == (3, 176, 176)
    with pytest.raises(ValueError, match="resolution"):
        tt.models.mcunet_5fps(resolution=16)
    with pytest.raises(ValueError, match="num_classes"):
        tt.models.mobilenetv2(num_classes=0)


# ---------------------------------------------------------------- hand-built models
def const(name, arr, inits):
    inits.append(numpy_helper.from_array(np.asarray(arr), name))
    return name


def conv_w(cout, cin, k, rng=RNG):
    return rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)


def bn_params(prefix, c, inits, rng=RNG):
    return [const(prefix + ".s", rng.uniform(0.5, 1.5, c).astype(np.float32), inits),
            const(prefix + ".b", rng.normal(0, 0.2, c).astype(np.float32), inits),
            const(prefix + ".m", rng.normal(0, 0.2, c).astype(np.float32), inits),
            const(prefix + ".v", rng.uniform(0.5, 1.5, c).astype(np.float32), inits)]


def make(nodes, inits, shape, out_name, opset, out_shape=None):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def many_ops_model(opset, seed=0):
    """Conv(SAME_UPPER, stride 2)+BN+Relu, depthwise Conv+Clip(inputs), residual Add + Relu, an
    unfused BN (after the Add), MaxPool, AveragePool with pads, Identity, Dropout, Flatten of a
    spatial map into Gemm (transB=0, alpha, beta), MatMul+Add, Constant, Reshape, Softmax."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    nodes.append(helper.make_node("Conv", ["x", const("w0", conv_w(8, 3, 3, rng), inits)], ["c0"], auto_pad="SAME_UPPER",
                                  strides=[2, 2]))
    nodes.append(helper.make_node("BatchNormalization", ["c0", *bn_params("bn0", 8, inits, rng)], ["b0"]))
    nodes.append(helper.make_node("Relu", ["b0"], ["r0"]))
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    nodes.append(helper.make_node("Conv", ["r0", const("w1", w1, inits), const("b1", rng.normal(0, .1, 8).astype(np.float32), inits)],
                                  ["c1"], pads=[1, 1, 1, 1], group=8))
    nodes.append(helper.make_node("Clip", ["c1", const("lo", np.array(0, np.float32), inits),
                                           const("hi", np.array(6, np.float32), inits)], ["r1"]))
    nodes.append(helper.make_node("Conv", ["r1", const("w2", conv_w(8, 8, 1, rng), inits)], ["c2"]))
    nodes.append(helper.make_node("Add", ["c2", "r0"], ["a2"]))
    nodes.append(helper.make_node("Relu", ["a2"], ["r2"]))
    nodes.append(helper.make_node("Identity", ["r2"], ["i2"]))
    nodes.append(helper.make_node("BatchNormalization", ["i2", *bn_params("bn3", 8, inits, rng)], ["b3"]))
    nodes.append(helper.make_node("MaxPool", ["b3"], ["p3"], kernel_shape=[3, 3], strides=[1, 1], auto_pad="SAME_UPPER"))
    nodes.append(helper.make_node("AveragePool", ["p3"], ["p4"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Dropout", ["p4"], ["d4"]))
    nodes.append(helper.make_node("Flatten", ["d4"], ["f4"], axis=1))
    nodes.append(helper.make_node("Gemm", ["f4", const("g5", rng.normal(0, .2, (8 * 4 * 4, 12)).astype(np.float32), inits),
                                           const("g5b", rng.normal(0, .1, 12).astype(np.float32), inits)], ["y5"],
                                  alpha=0.5, beta=2.0))
    nodes.append(helper.make_node("Relu", ["y5"], ["r5"]))
    nodes.append(helper.make_node("MatMul", ["r5", const("m6", rng.normal(0, .3, (12, 5)).astype(np.float32), inits)], ["y6"]))
    nodes.append(helper.make_node("Constant", [], ["c6"], value=numpy_helper.from_array(
        rng.normal(0, .1, 5).astype(np.float32), "c6v")))
    nodes.append(helper.make_node("Add", ["y6", "c6"], ["z6"]))
    nodes.append(helper.make_node("Reshape", ["z6", const("shp", np.array([0, -1], np.int64), inits)], ["z7"]))
    nodes.append(helper.make_node("Softmax", ["z7"], ["out"], axis=1))
    return make(nodes, inits, (3, 16, 16), "out", opset, ["N", 5])


@pytest.mark.parametrize("opset", [11, 13, 17, onnx.defs.onnx_opset_version()])
def test_many_ops_match_onnxruntime(opset):
    m = many_ops_model(opset)
    x = RNG.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    g = assert_matches_ort(m, x)
    ops = [n.op for n in g.nodes]
    # BN after conv folded; BN after the Add became a depthwise 1x1 conv; ReLU/ReLU6 fused; the
    # flatten is absorbed by the fc (columns permuted to HWC order); Softmax is the tail flag
    assert ops == ["conv", "conv", "conv", "add", "conv", "maxpool", "avgpool", "fc", "fc"], ops
    assert [n.attrs["act"] for n in g.nodes if n.op in ("conv", "fc", "add")] == \
        ["relu", "relu6", "none", "relu", "none", "relu", "none"]
    assert g.softmax_tail
    assert g.nodes[4].attrs["groups"] == 8 and g.nodes[4].attrs["kernel"] == (1, 1)


@pytest.mark.parametrize("opset", [13, 18])
def test_reducemean_and_reshape_head(opset):
    inits, nodes = [], []
    nodes.append(helper.make_node("Conv", ["x", const("w0", conv_w(6, 2, 3), inits)], ["c0"], pads=[0, 1, 2, 1]))
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMean", ["c0", const("ax", np.array([2, 3], np.int64), inits)], ["m"],
                                      keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", ["c0"], ["m"], axes=[-2, -1], keepdims=1))
    nodes.append(helper.make_node("Reshape", ["m", const("shp", np.array([-1, 6], np.int64), inits)], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", const("w", RNG.normal(0, .3, (3, 6)).astype(np.float32), inits)], ["y"],
                                  transB=1))
    m = make(nodes, inits, (2, 9, 7), "y", opset, ["N", 3])
    g = assert_matches_ort(m, RNG.normal(0, 1, (3, 2, 9, 7)).astype(np.float32))
    assert [n.op for n in g.nodes] == ["conv", "global_avgpool", "fc"]
    assert g.nodes[0].attrs["pads"] == (0, 1, 2, 1)


def test_fc_columns_are_hwc_order():
    """A Flatten of a (C, H, W) map into Gemm: the IR fc reads (H, W, C) order, so its columns are
    the ONNX columns permuted once at import."""
    inits, nodes = [], []
    w = RNG.normal(0, 1, (4, 2 * 3 * 5)).astype(np.float32)
    nodes.append(helper.make_node("Flatten", ["x"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", const("w", w, inits)], ["y"], transB=1))
    m = make(nodes, inits, (2, 3, 5), "y", 13, ["N", 4])
    g = assert_matches_ort(m, RNG.normal(0, 1, (2, 2, 3, 5)).astype(np.float32))
    fc = g.nodes[-1]
    assert fc.op == "fc" and fc.inputs == [g.input]
    c, h, wd = 2, 3, 5
    for (ci, hi, wi) in [(0, 0, 1), (1, 2, 4), (1, 0, 0)]:
        np.testing.assert_array_equal(fc.params["weight"][:, (hi * wd + wi) * c + ci], w[:, ci * h * wd + hi * wd + wi])


def test_flattened_map_feeding_add_is_refused():
    inits, nodes = [], []
    nodes.append(helper.make_node("Flatten", ["x"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", const("w", RNG.normal(0, 1, (12, 12)).astype(np.float32), inits)], ["y"],
                                  transB=1))
    nodes.append(helper.make_node("Add", ["y", "f"], ["z"]))
    m = make(nodes, inits, (3, 2, 2), "z", 13, ["N", 12])
    with pytest.raises(tt.UnsupportedOperatorError, match="Flatten.*only feed Gemm"):
        tt.load_onnx(m)


def test_external_data_is_loaded(tmp_path):
    m = tt.models.mcunet_5fps(resolution=64, num_classes=4)
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=256)
    assert (tmp_path / "ext.data").exists()
    x = RNG.random((1, 3, 64, 64), dtype=np.float32)
    g = tt.load_onnx(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(reference.forward(g, x), sess.run(None, {"input": x})[0], atol=1e-4)


def test_demo_model_imports_with_softmax_tail():
    g = tt.load_onnx(tt.models.DEMO_PATH)
    assert g.softmax_tail and g.tensors[g.input].shape == (1, 32, 32)
    x, y = tt.datasets.digits("source", "test")
    assert (reference.forward(g, x).argmax(1) == y).mean() > 0.95
    xt, yt = tt.datasets.digits("target", "test")
    assert (reference.forward(g, xt).argmax(1) == yt).mean() < 0.1  # never saw 5-9


def test_pytorch_style_dynamic_flatten_is_folded():
    """x.view(x.size(0), -1) exports as Shape -> Gather -> Unsqueeze -> Concat -> Reshape; the shape
    arithmetic runs once at import (the batch stays free)."""
    inits, nodes = [], []
    nodes.append(helper.make_node("Conv", ["x", const("w", conv_w(4, 2, 3), inits)], ["c"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Shape", ["c"], ["s"]))
    nodes.append(helper.make_node("Gather", ["s", const("i0", np.array(0, np.int64), inits)], ["n"], axis=0))
    nodes.append(helper.make_node("Unsqueeze", ["n", const("ax0", np.array([0], np.int64), inits)], ["n1"]))
    nodes.append(helper.make_node("Concat", ["n1", const("m1", np.array([-1], np.int64), inits)], ["shape"], axis=0))
    nodes.append(helper.make_node("Reshape", ["c", "shape"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", const("fw", RNG.normal(0, .2, (3, 4 * 5 * 5)).astype(np.float32), inits)],
                                  ["y"], transB=1))
    m = make(nodes, inits, (2, 5, 5), "y", 13, ["N", 3])
    g = assert_matches_ort(m, RNG.normal(0, 1, (3, 2, 5, 5)).astype(np.float32))
    assert [n.op for n in g.nodes] == ["conv", "fc"]


def random_geometry_model(seed):
    """Conv with random kernel, strides, explicit / SAME_UPPER / SAME_LOWER / VALID padding and
    groups, then Max/AveragePool with padding and maybe ceil_mode. Returns (model, (C, H, W)) or
    None when onnxruntime rejects the geometry."""
    rng = np.random.default_rng(100 + seed)
    c = int(rng.choice([2, 4, 6]))
    h, w = int(rng.integers(5, 13)), int(rng.integers(5, 13))
    k = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    groups = int(rng.choice([g for g in (1, 2, c) if c % g == 0]))
    cout = groups * int(rng.integers(1, 4))
    auto = str(rng.choice(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    kw = {"kernel_shape": list(k), "strides": list(s), "group": groups}
    if auto == "NOTSET":
        kw["pads"] = [int(rng.integers(0, k[0])), int(rng.integers(0, k[1])), int(rng.integers(0, k[0])),
                      int(rng.integers(0, k[1]))]
    else:
        kw["auto_pad"] = auto
    inits, nodes = [], []
    wgt = rng.normal(0, 0.5, (cout, c // groups, *k)).astype(np.float32)
    nodes.append(helper.make_node("Conv", ["x", const("w", wgt, inits), const("b", rng.normal(0, .1, cout).astype(np.float32),
                                                                          inits)], ["c"], **kw))
    pool = str(rng.choice(["MaxPool", "AveragePool"]))
    pk = int(rng.integers(2, 4))
    nodes.append(helper.make_node(pool, ["c"], ["y"], kernel_shape=[pk, pk], strides=[2, 2], pads=[1, 1, 0, 0] if pk > 1 else [0, 0, 0, 0],
                                  ceil_mode=int(rng.integers(0, 2))))
    m = make(nodes, inits, (c, h, w), "y", 13, ["N", cout, "oh", "ow"])
    try:
        run_ort(m, np.zeros((1, c, h, w), np.float32))
    except Exception:
        return None
    return m, (c, h, w)


@pytest.mark.parametrize("seed", range(24))
def test_random_conv_pool_geometry(seed):
    """The imported float graph equals onnxruntime on random conv/pool geometries."""
    made = random_geometry_model(seed)
    if made is None:
        pytest.skip("onnxruntime rejects this geometry (output would be empty)")
    m, shape = made
    assert_matches_ort(m, RNG.normal(0, 1, (2, *shape)).astype(np.float32))
