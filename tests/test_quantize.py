"""Post-training quantization and the int8 forward in tt-core: float vs int8 agreement on digits for
the demo model, the numerics of the quantized fields, QDQ export checked by onnxruntime (within one
quantization step), and exports/forwards that follow updated int8 weights."""
import numpy as np
import pytest

import tinytrain as tt
from tinytrain import _core, reference
from _int8_oracle import requires_kernels

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo():
    g = tt.load_onnx(tt.models.DEMO_PATH)
    calib, _ = tt.datasets.digits("source", "train")
    return g, tt.quantize(g, calib[:256])


def ort_logits(q, x, tmp_path):
    path = tmp_path / "q.onnx"
    q.to_onnx(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def test_demo_int8_agrees_with_float(demo):
    g, q = demo
    for part in ("source", "all"):
        x, y = tt.datasets.digits(part, "test")
        lf, lq = reference.forward(g, x), q.forward(x)
        assert lq.shape == lf.shape == (len(x), 10) and lq.dtype == np.float32
        agree = (lf.argmax(1) == lq.argmax(1)).mean()
        assert agree >= 0.98, (part, agree)
    x, y = tt.datasets.digits("source", "test")
    assert (q.forward(x).argmax(1) == y).mean() >= 0.95


@requires_kernels
def test_quantized_fields(demo):
    g, q = demo
    assert isinstance(q, tt.QuantizedModel) and isinstance(q, tt.Graph)
    assert q.layers == g.layers and q.softmax_tail
    for t in q.tensors.values():
        assert t.scale > 0 and -128 <= t.zero_point <= 127
    for n in q.nodes:
        if not n.trainable:
            continue
        wq, ws, bq = n.params["weight_q"], n.params["weight_scale"], n.params["bias_q"]
        assert wq.dtype == np.int8 and wq.shape == n.params["weight"].shape and np.abs(wq).max() <= 127
        assert ws.dtype == np.float32 and ws.shape == (wq.shape[0],)
        # symmetric per output channel: every non-zero channel uses the full range
        assert (np.abs(wq.reshape(wq.shape[0], -1)).max(1) == 127).all()
        assert bq.dtype == np.int32 and bq.shape == (wq.shape[0],)
        s_b = q.tensors[n.inputs[0]].scale * ws.astype(np.float64)
        np.testing.assert_allclose(bq * s_b, n.params["bias"], atol=s_b.max())
        out = q.tensors[n.output]
        if n.attrs["act"] == "relu6":
            lo, hi = _core.activation_range("relu6", float(out.scale), int(out.zero_point))
            # 0 is exact; the clamp's top is 6 (or the calibrated range's end when that is lower)
            assert lo == out.zero_point
            assert hi == 127 or abs((hi - out.zero_point) * out.scale - 6.0) <= out.scale / 2
    gap = next(n for n in q.nodes if n.op == "global_avgpool")
    assert q.tensors[gap.output].scale != q.tensors[gap.inputs[0]].scale  # requantized, not shared


def test_summary_and_layers(demo, capsys):
    _, q = demo
    text = q.summary()
    assert capsys.readouterr().out.strip() == text.strip()
    for name in q.layers:
        assert name in text
    assert "Softmax" in text and "skipped for training" in text
    assert "MACs" in text and "calibration: minmax" in text


def test_to_onnx_matches_forward_within_one_step(demo, tmp_path):
    _, q = demo
    x, _ = tt.datasets.digits("all", "all")
    logits, probs = ort_logits(q, x, tmp_path)
    lq = q.forward(x)
    step = q.tensors[q.output].scale
    assert np.abs(logits - lq).max() <= step * 1.001
    assert (logits.argmax(1) == lq.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert not list(tmp_path.glob(".tinytrain-*"))  # atomic write leaves no temporary file


def test_forward_and_export_follow_updated_int8_weights(tmp_path):
    g = tt.load_onnx(tt.models.DEMO_PATH)
    calib, _ = tt.datasets.digits("source", "train")
    q = tt.quantize(g, calib[:128])
    x, _ = tt.datasets.digits("target", "test")
    before = q.forward(x)
    fc = q.node("fc_0")
    # what training does: the int8 classifier weights and int32 biases change in place
    fc.params["weight_q"] = np.clip(fc.params["weight_q"].astype(np.int32)[::-1] * 2, -127, 127).astype(np.int8)
    fc.params["bias_q"] = fc.params["bias_q"][::-1].copy()
    after = q.forward(x)
    assert (before.argmax(1) != after.argmax(1)).mean() > 0.2
    logits, _ = ort_logits(q, x, tmp_path)
    assert np.abs(logits - after).max() <= q.tensors[q.output].scale * 1.001


def test_percentile_calibration(demo):
    g, q_minmax = demo
    calib, _ = tt.datasets.digits("source", "train")
    q = tt.quantize(g, calib[:256], method="percentile", percentile=99.0)
    assert q.calibration == "percentile(99.0)"
    narrower = [t for t in q.tensors if q.tensors[t].scale < q_minmax.tensors[t].scale * 0.99]
    assert narrower, "a 99th percentile must clip some activation range"
    x, _ = tt.datasets.digits("source", "test")
    assert (q.forward(x).argmax(1) == reference.forward(g, x).argmax(1)).mean() >= 0.95


def test_quantize_errors(demo):
    g, q = demo
    with pytest.raises(tt.QuantizationError, match="already quantized.*requantize=True"):
        tt.quantize(q, np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(tt.QuantizationError, match=r"\(N, 1, 32, 32\)"):
        tt.quantize(g, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(tt.QuantizationError, match="NaN"):
        tt.quantize(g, np.full((2, 1, 32, 32), np.nan, np.float32))
    with pytest.raises(tt.QuantizationError, match="method"):
        tt.quantize(g, np.zeros((2, 1, 32, 32), np.float32), method="kl")
    calib, _ = tt.datasets.digits("source", "train")
    q2 = tt.quantize(q, calib[:64], requantize=True)
    x, _ = tt.datasets.digits("source", "test")
    assert (q2.forward(x).argmax(1) == q.forward(x).argmax(1)).mean() >= 0.98


def test_forward_rejects_wrong_shape(demo):
    _, q = demo
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        q.forward(np.zeros((1, 1, 28, 28), np.float32))


def test_many_ops_model_int8(tmp_path):
    """Pools with padding, a flattened feature map into fc (HWC columns), unfused BN and a residual
    Add through tt-core's int8 kernels, compared with the float reference and the QDQ export."""
    from test_onnx_import import many_ops_model

    g = tt.load_onnx(many_ops_model(13))
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    q = tt.quantize(g, x)
    assert {"maxpool", "avgpool", "add", "fc", "conv"} <= {n.op for n in q.nodes}
    lf, lq = reference.forward(g, x), q.forward(x)
    rel = np.abs(lf - lq).max() / np.abs(lf).max()
    assert rel < 0.1, rel
    assert (lf.argmax(1) == lq.argmax(1)).mean() >= 0.85
    logits, _ = ort_logits(q, x, tmp_path)
    step = q.tensors[q.output].scale
    assert (np.abs(logits - lq) <= step * 1.001).mean() >= 0.99
    # random weights give int8 ties (two classes one step apart flip); count clear decisions only
    top2 = np.sort(lq, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1.5 * step
    assert clear.mean() > 0.8
    assert (logits.argmax(1) == lq.argmax(1))[clear].all()


@pytest.mark.parametrize("seed", range(0, 24, 2))
def test_random_geometry_int8_matches_export(seed, tmp_path):
    """tt-core's int8 conv/pool on the importer's geometry (pads, strides, groups, ceil_mode) equals
    onnxruntime on the QDQ export within one quantization step."""
    from test_onnx_import import random_geometry_model

    made = random_geometry_model(seed)
    if made is None:
        pytest.skip("onnxruntime rejects this geometry")
    m, shape = made
    g = tt.load_onnx(m)
    x = np.random.default_rng(seed).normal(0, 1, (8, *shape)).astype(np.float32)
    q = tt.quantize(g, x)
    lq = q.forward(x)
    (lo,) = ort_logits(q, x, tmp_path)
    # forward gives (N, C) for a 1x1 output map, the export keeps ONNX's (N, C, 1, 1)
    lo = lo.reshape(lq.shape)
    step = q.tensors[q.output].scale
    assert np.abs(lo - lq).max() <= step * 1.001
