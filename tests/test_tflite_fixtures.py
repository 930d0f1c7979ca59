"""Converter fixtures (tests/fixtures/tflite/, made by scripts/make_tflite_fixtures.py with TensorFlow
2.15 + tf2onnx + onnxruntime's quantizer): the .tflite import, the tf2onnx QDQ import and the
onnxruntime QOperator import against each other, against onnxruntime and the LiteRT interpreter's
reference kernels, and trained through the engine.

Figures are printed (``pytest -s``) so the report can quote them.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tinytrain as tt
import _int8_oracle
from _digits_fixtures import digits, nchw

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tflite")
CLASSIFIERS = ["ds_cnn", "mobilenet", "resnet8"]
MODELS = CLASSIFIERS + ["autoencoder"]


def path(name: str) -> str:
    return os.path.join(FIX, name)


_cache = {}


def load(name: str):
    if name not in _cache:
        _cache[name] = tt.load_tflite(path(name)) if name.endswith(".tflite") else tt.load_onnx(path(name))
    return _cache[name]


def quantize_like(q, x: np.ndarray) -> np.ndarray:
    """float -> int8 with the model input's scale and zero point (round half away, as forward does)."""
    t = q.tensors[q.input]
    v = x / np.float32(t.scale)
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + t.zero_point, -128, 127).astype(np.int8)


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.int32)


def ort_int8(onnx_path: str, q, feed: np.ndarray) -> dict:
    """onnxruntime on the file; every IR tensor that a QuantizeLinear quantizes, as int8 (N, H, W, C)."""
    m = onnx.load(onnx_path)
    want = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in q.tensors:
            want[n.input[0]] = n.output[0]
    have = {o.name for o in m.graph.output}
    for o in want.values():
        if o not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = s.run(list(want.values()), {m.graph.input[0].name: feed})
    res = {}
    for ir, v in zip(want, outs):
        res[ir] = v.transpose(0, 2, 3, 1) if v.ndim == 4 else v.reshape(len(v), 1, 1, -1)
    return res


def litert_int8(tflite_path: str, q, feed: np.ndarray, litert) -> dict:
    """The LiteRT interpreter (reference kernels) on the file; every IR tensor, int8 (N, H, W, C)."""
    it = litert.Interpreter(model_path=tflite_path, experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF,
                            experimental_preserve_all_tensors=True)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], feed.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], feed)
    it.invoke()
    index = {d["name"]: d["index"] for d in it.get_tensor_details()}
    res = {}
    for ir in q.tensors:
        if ir in index:
            v = it.get_tensor(index[ir])
            res[ir] = v if v.ndim == 4 else v.reshape(len(v), 1, 1, -1)
    return res


def compare(name: str, q, ref: dict, xq: np.ndarray, backend: str, exact: bool = False,
            same_rounding: bool = False) -> None:
    """Each layer fed the reference's own input is within 1 LSB of the reference's output, and
    bit-identical to it when `exact` (the model rounds as the reference does: LiteRT, for a model in
    TFLite's double-rounding mode); the chained logits within 1 LSB when `exact`, else within a few
    (onnxruntime requantizes in float, so a TFLite-mode model differs from it by an LSB in some
    layers, and that compounds along the chain) unless `same_rounding` (the model rounds once, as
    onnxruntime: a classifier's logits within 1 LSB); argmax >= 99 %."""
    x_nhwc = q.quantize_input(nchw(xq))
    worst = 0
    for n in q.nodes:
        if n.output not in ref or any(i != q.input and i not in ref for i in n.inputs):
            continue
        ins = [x_nhwc if i == q.input else np.ascontiguousarray(ref[i]) for i in n.inputs]
        got = _int8_oracle.run_node(q, n, ins)
        d = int(np.abs(flat(got) - flat(ref[n.output])).max())
        worst = max(worst, d)
        assert d <= (0 if exact else 1), f"{name} {n.name} ({n.op}) differs from {backend} by {d} LSB on its own"
    assert q.output in ref
    r = flat(ref[q.output])
    ours = flat(q.forward_int8(nchw(xq)))
    d = np.abs(r - ours)
    agree = float((r.argmax(1) == ours.argmax(1)).mean())
    print(f"\n{name} vs {backend}: per layer max {worst} LSB; logits max |diff| {d.max()} LSB, "
          f"{100 * (d <= 1).mean():.2f} % within 1 LSB, {100 * (d == 0).mean():.2f} % identical; argmax agreement "
          f"{100 * agree:.2f} % on {len(xq)} test images")
    if exact or (same_rounding and name != "autoencoder"):
        assert d.max() <= 1, f"{name}: logits differ from {backend} by {d.max()} LSB"
    elif same_rounding:
        # no logits: a reconstruction whose 8-wide bottleneck amplifies single-LSB differences
        assert d.max() <= 3 and (d <= 1).mean() >= 0.999
    else:
        assert d.max() <= 4 and (d <= 1).mean() >= 0.95
    if name != "autoencoder":
        assert agree >= 0.99


@pytest.mark.parametrize("name", MODELS)
def test_tflite_and_tf2onnx_give_the_same_int8_graph(name):
    qt, qo = load(name + ".tflite"), load(name + ".onnx")
    assert isinstance(qt, tt.QuantizedModel) and isinstance(qo, tt.QuantizedModel)
    # both round as TFLite: the tf2onnx file is recognised by its producer
    assert qt.rounding == qo.rounding == "double"
    assert [n.op for n in qt.nodes] == [n.op for n in qo.nodes]
    assert qt.softmax_tail == qo.softmax_tail == (name != "autoencoder")
    # the converter's tensor names hold ';', '/' and ':' (the IR keeps them as tensor names)
    assert any(";" in o and "/" in o for n in onnx.load(path(name + ".onnx")).graph.node for o in n.output)
    assert ":" in qo.input and set(qo.tensors) - {qo.input} <= {o for n in onnx.load(path(name + ".onnx")).graph.node
                                                              for o in n.output}
    tmap = {qt.input: qo.input}
    for a, b in zip(qt.nodes, qo.nodes):
        tmap[a.output] = b.output
        assert a.name == b.name and [tmap[i] for i in a.inputs] == b.inputs
        for k in ("kernel", "stride", "pads", "groups", "act"):
            assert a.attrs.get(k) == b.attrs.get(k), (a.name, k)
        if a.trainable:
            np.testing.assert_array_equal(a.params["weight_q"], b.params["weight_q"])
            np.testing.assert_array_equal(a.params["weight_scale"], b.params["weight_scale"])
            np.testing.assert_array_equal(a.params["bias_q"], b.params["bias_q"])
    for ta, tb in tmap.items():
        a, b = qt.tensors[ta], qo.tensors[tb]
        assert (a.shape, a.scale, a.zero_point) == (b.shape, b.scale, b.zero_point), ta
    x, _ = digits(name, "all", "test")
    np.testing.assert_array_equal(qt.forward_int8(nchw(x)), qo.forward_int8(nchw(x)))
    np.testing.assert_array_equal(qt.forward(x, layout="NHWC") if x.ndim == 4 else qt.forward(x),
                                  qt.forward(nchw(x)))


@_int8_oracle.requires_kernels
@pytest.mark.parametrize("name", MODELS)
def test_forward_agrees_with_onnxruntime_on_the_tf2onnx_file(name):
    q = load(name + ".onnx")
    x, _ = digits(name, "all", "test")
    xq = quantize_like(q, x)
    compare(name, q, ort_int8(path(name + ".onnx"), q, xq), xq, "onnxruntime (QDQ)")


@_int8_oracle.requires_kernels
@pytest.mark.parametrize("name", MODELS)
def test_single_rounding_import_agrees_with_onnxruntime_within_one_lsb(name):
    # LiteRT and onnxruntime differ by up to 3 LSB on these very files, so one model cannot be within
    # 1 LSB of both: rounding="single" is the import for a user who checks against onnxruntime
    q = tt.load_onnx(path(name + ".onnx"), rounding="single")
    assert q.rounding == "single"
    x, _ = digits(name, "all", "test")
    xq = quantize_like(q, x)
    compare(name, q, ort_int8(path(name + ".onnx"), q, xq), xq, "onnxruntime (QDQ)", same_rounding=True)


def test_rounding_choice_is_checked():
    assert tt.load_tflite(path("ds_cnn.tflite"), rounding="single").rounding == "single"
    assert tt.load_onnx(path("ds_cnn_qop.onnx"), rounding="double").rounding == "double"
    with pytest.raises(ValueError, match="rounding must be"):
        tt.load_tflite(path("ds_cnn.tflite"), rounding="nearest")
    with pytest.raises(ValueError, match="already-quantized"):
        tt.load_onnx(path("ds_cnn_float.onnx"), rounding="single")


@_int8_oracle.requires_kernels
@pytest.mark.parametrize("name", MODELS)
def test_forward_agrees_with_litert_reference_kernels(name):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    q = load(name + ".tflite")
    x, _ = digits(name, "all", "test")
    xq = quantize_like(q, x)
    assert q.rounding == "double"
    compare(name, q, litert_int8(path(name + ".tflite"), q, xq, litert), xq, "LiteRT reference kernels", exact=True)


@pytest.mark.parametrize("name", MODELS)
def test_qoperator_file_matches_its_float_source(name):
    q = load(name + "_qop.onnx")
    assert isinstance(q, tt.QuantizedModel)
    assert q.rounding == "single"  # onnxruntime's quantizer: agrees best with onnxruntime
    x, _ = digits(name, "all", "test")
    fm = onnx.load(path(name + "_float.onnx"))
    s = ort.InferenceSession(fm.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = s.run(None, {fm.graph.input[0].name: x})[0]
    ours = q.forward(nchw(x))
    t = q.tensors[q.output]
    if name == "autoencoder":
        err = np.abs(ours - ref)
        print(f"\n{name}: QOperator vs float: mean |err| {err.mean():.4f}, max {err.max():.4f} "
              f"(output step {t.scale:.4f})")
        assert err.mean() <= 2 * t.scale
        return
    pf = ref.argmax(1)
    probs = np.exp(ours - ours.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    err = np.abs(probs - ref).max(1)
    agree = float((ours.argmax(1) == pf).mean())
    print(f"\n{name}: QOperator vs float source: prediction agreement {100 * agree:.2f} %, softmax outputs "
          f"max |err| {err.max():.4f}, mean {err.mean():.4f}")
    assert agree >= 0.98


def test_float_tflite_matches_float_onnx():
    for name in ("ds_cnn", "autoencoder"):
        g = load(name + "_float.tflite")
        assert isinstance(g, tt.Graph) and not isinstance(g, tt.QuantizedModel)
        go = load(name + "_float.onnx")
        assert [n.op for n in g.nodes] == [n.op for n in go.nodes]
        x, _ = digits(name, "all", "test")
        for n, m in zip(g.nodes, go.nodes):
            if n.trainable:
                np.testing.assert_allclose(n.params["weight"], m.params["weight"], atol=1e-6)
        a = tt.reference.forward(g, nchw(x))
        np.testing.assert_allclose(a, tt.reference.forward(go, nchw(x)), atol=1e-4)
        fm = onnx.load(path(name + "_float.onnx"))
        s = ort.InferenceSession(fm.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = s.run(None, {fm.graph.input[0].name: x})[0]
        if g.softmax_tail:
            a = np.exp(a - a.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
        np.testing.assert_allclose(a.reshape(ref.shape), ref, atol=1e-4)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_compiles_under_256kb_and_learns_a_shifted_task(name):
    q = load(name + ".tflite")
    if any(n.op == "conv" and n.attrs["groups"] > 1 for n in q.nodes):
        scheme = tt.schemes.paper_sparse(q)
    else:  # no depthwise blocks (ResNet): biases of the last 4 layers, a quarter of conv_7, the classifier
        scheme = tt.Scheme(bias_layers=q.layers[-4:], weight_ratios={q.layers[-3]: 0.25, q.layers[-1]: 1.0},
                           name="sparse")
    plan = tt.compile(q, scheme, budget="256KB", lr=0.02)
    xs, ys = digits(name, "target", "train")
    xt, yt = digits(name, "target", "test")
    tr = tt.Trainer(plan)
    before = tr.evaluate(nchw(xt), yt)
    tr.fit(nchw(xs), ys, epochs=2, verbose=False)
    after = tr.evaluate(nchw(xt), yt)
    print(f"\n{name}: plan peak {plan.memory.peak_bytes / 1024:.1f} KB ({len(q.layers)} layers, scheme "
          f"{scheme.to_dict()}); digits 5-9 test accuracy {100 * before:.1f} % -> {100 * after:.1f} %")
    assert plan.memory.peak_bytes <= 256 * 1024
    assert after >= before + 0.3


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    s = np.concatenate([neg, pos])
    order = s.argsort()
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks over ties
        m = s == v
        ranks[m] = ranks[m].mean()
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def test_autoencoder_trains_with_mse_and_separates_an_unseen_distribution():
    q = load("autoencoder.tflite")
    assert not q.softmax_tail
    plan = tt.compile(q, tt.schemes.full(q), budget="256KB", loss="mse", lr=0.05, momentum=0.9)
    # pretrained on all digits; this device's normal data is digits 0-4, and 5-9 are the anomalies
    xs, _ = digits("autoencoder", "source", "train")
    xt, _ = digits("autoencoder", "source", "test")
    xa, _ = digits("autoencoder", "target", "test")
    tr = tt.Trainer(plan)

    def auc():
        m = tr.model
        score = lambda x: ((m.forward(x) - x) ** 2).mean(1)  # noqa: E731
        return _auc(score(xt), score(xa))

    before, auc_before = tr.evaluate(xs, xs), auc()
    tr.fit(xs, xs, epochs=6, verbose=False)
    after, auc_after = tr.evaluate(xs, xs), auc()
    print(f"\nautoencoder: plan peak {plan.memory.peak_bytes / 1024:.1f} KB; MSE on its normal data (digits 0-4) "
          f"{before:.5f} -> {after:.5f}; anomaly AUC (digits 0-4 test vs unseen digits 5-9) {auc_before:.3f} -> "
          f"{auc_after:.3f}")
    assert after < 0.95 * before
    assert auc_after > auc_before and auc_after >= 0.8


def test_int8_model_with_float_edges_quantizes_and_dequantizes_like_the_int8_one():
    """ds_cnn_float_io.tflite is the same converter run with float32 input/output: QUANTIZE first,
    DEQUANTIZE last. The QUANTIZE's scale becomes the input's, so both files give the same numbers."""
    a, b = load("ds_cnn_float_io.tflite"), load("ds_cnn.tflite")
    assert [n.op for n in a.nodes] == [n.op for n in b.nodes] and a.softmax_tail
    ta, tb = a.tensors[a.input], b.tensors[b.input]
    assert (ta.scale, ta.zero_point) == (tb.scale, tb.zero_point)
    x, _ = digits("ds_cnn", "all", "test")
    np.testing.assert_array_equal(a.forward(x, layout="NHWC"), b.forward(x, layout="NHWC"))


@pytest.mark.parametrize("name", ["ds_cnn", "resnet8"])
def test_imported_tflite_exports_to_qdq_that_onnxruntime_runs(name):
    q = load(name + ".tflite")
    m = q.to_onnx()
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x, _ = digits(name, "all", "test")
    logits = s.run(["logits"], {s.get_inputs()[0].name: nchw(x)})[0]
    ours = q.forward(nchw(x))
    step = q.tensors[q.output].scale * 1.01
    # onnxruntime requantizes in float: within one output step of the same int8 graph rounded once;
    # the model itself keeps TFLite's double rounding, whose LSB differences compound a little
    single = copy.copy(q)
    single.rounding = "single"
    assert np.abs(logits - single.forward(nchw(x))).max() <= step
    assert np.abs(logits - ours).max() <= 3 * step
    assert (logits.argmax(1) == ours.argmax(1)).mean() >= 0.99
    # and the export carries the rounding: imported back, it is the same model, bit for bit
    back = tt.load_onnx(m)
    assert back.rounding == "double"
    np.testing.assert_array_equal(back.forward(nchw(x)), ours)


@_int8_oracle.requires_kernels
@pytest.mark.parametrize("name", MODELS)
def test_plan_executor_runs_the_imported_graph_bit_exactly(name):
    """The compiled plan's forward (the code the MCU runs) gives the same int8 output as the
    node-by-node kernels on each imported file."""
    q = load(name + ".tflite")
    scheme = tt.Scheme(bias_layers=q.layers[-1:], weight_ratios={q.layers[-1]: 1.0})
    plan = tt.compile(q, scheme, loss="mse" if name == "autoencoder" else "cross_entropy")
    assert plan.rounding == "double"  # so the device runs it as TFLite did, bit for bit
    tr = tt.Trainer(plan)
    x, _ = digits(name, "all", "test")
    xq = quantize_like(q, nchw(x))
    ours = flat(_int8_oracle.forward(q, xq))
    plan_out = tr._s.forward(tr._inputs(xq)).astype(np.int32)
    np.testing.assert_array_equal(plan_out, ours)


def test_a_tflite_mode_plan_keeps_its_rounding_and_refuses_a_model_that_rounds_otherwise():
    q = load("ds_cnn.tflite")
    data = tt.compile(q, tt.schemes.bias_only(q)).to_bytes()
    assert tt.Plan.from_bytes(data, model=q).rounding == "double"
    other = copy.copy(q)
    other.rounding = "single"
    with pytest.raises(tt.PlanError, match="double rounding, the model with single"):
        tt.Plan.from_bytes(data, model=other)
    # a model of tinytrain's own quantizer (or onnxruntime's) compiles to a single-rounding plan
    assert tt.compile(other, tt.schemes.bias_only(other)).rounding == "single"
