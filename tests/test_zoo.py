"""The zoo through the whole int8 path (quantize -> tt-core forward -> QDQ export -> onnxruntime),
and the digits transfer-task data the demo model was trained on."""
import numpy as np
import pytest

import tinytrain as tt
from tinytrain import reference

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name,kwargs", [("mcunet_5fps", {}), ("mobilenetv2", {"width": 0.35}),
                                         ("proxylessnas", {"width": 0.3})])
def test_zoo_int8_forward_and_export(name, kwargs, tmp_path):
    model = getattr(tt.models, name)(resolution=64, num_classes=10, **kwargs)
    g = tt.load_onnx(model)
    rng = np.random.default_rng(0)
    x = rng.random((8, 3, 64, 64), dtype=np.float32)
    q = tt.quantize(g, x)
    assert q.layers == g.layers and len(q.layers) > 30
    lq = q.forward(x)
    lf = reference.forward(g, x)
    # random weights through 40-60 int8 layers: the logits still follow the float ones
    assert np.corrcoef(lq.ravel(), lf.ravel())[0, 1] > 0.95
    assert np.abs(lq - lf).max() < 0.4 * np.abs(lf).max()
    path = tmp_path / f"{name}.onnx"
    q.to_onnx(str(path))
    lo = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    step = q.tensors[q.output].scale
    assert (np.abs(lo - lq) <= step * 1.001).mean() >= 0.95
    assert np.abs(lo - lq).max() <= 4 * step


def test_zoo_models_are_deterministic_and_distinct():
    a = tt.models.mcunet_5fps(num_classes=5).SerializeToString()
    assert a == tt.models.mcunet_5fps(num_classes=5).SerializeToString()
    assert a != tt.models.mcunet_5fps(num_classes=5, seed=1).SerializeToString()
    assert len(tt.models.demo().SerializeToString()) <= 200 * 1024


def test_digits_transfer_splits():
    pytest.importorskip("sklearn")
    xs, ys = tt.datasets.digits("source", "train")
    xs2, ys2 = tt.datasets.digits("source", "train")
    np.testing.assert_array_equal(xs, xs2)
    xt, yt = tt.datasets.digits("source", "test")
    assert set(ys) == set(yt) == {0, 1, 2, 3, 4}
    assert xs.shape[1:] == (1, 32, 32) and xs.dtype == np.float32 and 0 <= xs.min() and xs.max() <= 1
    # train and test are disjoint and together the whole part
    xa, _ = tt.datasets.digits("source", "all")
    assert len(xs) + len(xt) == len(xa)
    flat = {r.tobytes() for r in xs.reshape(len(xs), -1)}
    assert not any(r.tobytes() in flat for r in xt.reshape(len(xt), -1))
    _, yg = tt.datasets.digits("target", "test")
    assert set(yg) == {5, 6, 7, 8, 9}
    x16, _ = tt.datasets.digits("all", "test", size=16)
    assert x16.shape[1:] == (1, 16, 16) and len(x16) == len(xt) + len(yg)
    with pytest.raises(ValueError):
        tt.datasets.digits("middle")
