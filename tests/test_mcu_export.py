"""`tinytrain export PLAN.ttp --mcu OUT_DIR`: the firmware bundle tt-mcu's examples include."""
import json
import os
import zlib

import numpy as np
import pytest

import tinytrain as tt
from tinytrain.cli import main


@pytest.fixture(scope="module")
def demo_plan(tmp_path_factory):
    x, y = tt.datasets.digits("target", "train")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    path = tmp_path_factory.mktemp("plan") / "demo.ttp"
    plan = tt.compile(q, tt.schemes.last_layers(q, 2))
    plan.save(str(path))
    return plan, str(path), x, y


def test_cli_export_writes_the_bundle(demo_plan, tmp_path, capsys):
    plan, path, x, y = demo_plan
    np.savez(tmp_path / "train.npz", X=x[:5], Y=y[:5])
    np.savez(tmp_path / "test.npz", X=x[5:8], Y=y[5:8])
    out = tmp_path / "bundle"
    assert main(["export", path, "--mcu", str(out), "--data", str(tmp_path / "train.npz"),
                 "--test", str(tmp_path / "test.npz"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["arena_bytes"] == plan.memory.peak_bytes and m["train_samples"] == 5 and m["test_samples"] == 3
    for name, info in m["files"].items():
        data = (out / name).read_bytes()
        assert (len(data), zlib.crc32(data)) == (info["bytes"], info["crc32"]), name
    assert (out / "plan.bin").read_bytes() == plan.plan_bytes
    assert (out / "params.bin").read_bytes() == plan.params
    n = int(np.prod(plan.meta["input"]["shape"]))
    xq = np.frombuffer((out / "train_x.bin").read_bytes(), np.int8).reshape(5, n)
    tr = tt.Trainer(plan)
    assert np.array_equal(xq, tr._inputs(x[:5]))
    assert list((out / "train_y.bin").read_bytes()) == list(y[:5])
    assert json.loads((out / "manifest.json").read_text()) == m
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_export_errors_are_clear(demo_plan, tmp_path, capsys):
    plan, path, x, y = demo_plan
    with pytest.raises(ValueError, match="5 samples but 4 labels"):
        plan.export_mcu(str(tmp_path / "a"), x[:5], y[:4])
    with pytest.raises(ValueError, match="both samples and labels"):
        plan.export_mcu(str(tmp_path / "b"), x[:5], None)
    with pytest.raises(ValueError, match=r"labels: float values such as 1.5 are not class indices"):
        plan.export_mcu(str(tmp_path / "c"), x[:2], np.array([1.5, 2.0]))
    np.savez(tmp_path / "bad.npz", X=x[:2])
    assert main(["export", path, "--mcu", str(tmp_path / "d"), "--data", str(tmp_path / "bad.npz")]) != 0
    assert "expected arrays X (samples) and Y (labels)" in capsys.readouterr().err
    m = plan.export_mcu(str(tmp_path / "e"))
    assert m["train_samples"] == 0 and (tmp_path / "e" / "train_x.bin").read_bytes() == b""
