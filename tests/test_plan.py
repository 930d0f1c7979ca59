"""Plan files: round trip, atomic save, and clear PlanError on every kind of damage."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytrain as tt


@pytest.fixture(scope="module")
def demo():
    x, y = tt.datasets.digits("target", "train")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    plan = tt.compile(q, tt.Scheme(q.layers[-3:], {q.layers[-1]: 1.0, q.layers[-2]: 0.5}), update_precision="residual",
                      momentum=0.5, lr=0.03, seed=11)
    return q, x, y, plan


def test_round_trip(tmp_path, demo):
    q, x, y, plan = demo
    path = tmp_path / "m.ttp"
    plan.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.ttp"]  # no temporary file left behind
    back = tt.Plan.load(path, model=q)
    assert back.to_bytes() == plan.to_bytes()
    assert back.memory.to_dict() == plan.memory.to_dict()
    assert (back.update_precision, back.momentum, back.loss, back.reorder) == ("residual", 0.5, "cross_entropy", True)
    assert back.lr == pytest.approx(0.03)
    assert back.layers == q.layers
    a, b = tt.Trainer(plan), tt.Trainer(back)
    la = [a.step(x[i], y[i]) for i in range(10)]
    lb = [b.step(x[i], y[i]) for i in range(10)]
    assert la == lb  # same executor, same bits
    assert a.state() == b.state()
    # Without its model a loaded plan still trains; only tr.model needs the model.
    c = tt.Trainer(tt.Plan.load(path))
    c.step(x[0], y[0])
    with pytest.raises(ValueError, match="model"):
        c.model


def test_save_replaces_atomically(tmp_path, demo):
    _, _, _, plan = demo
    path = tmp_path / "m.ttp"
    path.write_bytes(b"old")
    plan.save(str(path))
    assert path.read_bytes() == plan.to_bytes()


def test_truncation_names_a_field(tmp_path, demo):
    _, _, _, plan = demo
    data = plan.to_bytes()
    cuts = sorted(set([0, 3, 10, 39, 40, 41, 100, len(plan.plan_bytes) - 1, len(plan.plan_bytes),
                       len(plan.plan_bytes) + 1, len(data) - 1]))
    for n in cuts:
        with pytest.raises(tt.PlanError) as e:
            tt.Plan.from_bytes(data[:n])
        assert e.value.field, n
        assert "plan" in str(e.value)
    p = tmp_path / "cut.ttp"
    p.write_bytes(data[:200])
    with pytest.raises(tt.PlanError, match="cut.ttp"):
        tt.Plan.load(p)


def test_corruption_is_detected(demo):
    _, _, _, plan = demo
    data = bytearray(plan.to_bytes())
    for at, field in [(0, "magic"), (4, "version"), (100, "body_crc"), (len(data) - 5, "params_crc")]:
        bad = bytearray(data)
        bad[at] ^= 0x5A
        with pytest.raises(tt.PlanError) as e:
            tt.Plan.from_bytes(bytes(bad))
        assert field in e.value.field, (at, e.value.field)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_plan_errors(blob):
    with pytest.raises(tt.PlanError):
        tt.Plan.from_bytes(blob)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_plans_never_crash(flips):
    plan = _PLAN
    data = bytearray(plan.to_bytes())
    for at, v in flips:
        data[at % len(data)] = v
    try:
        p = tt.Plan.from_bytes(bytes(data))
    except tt.PlanError:
        return
    x = np.zeros((1,) + tuple(p.meta["input"]["shape"]), np.float32)
    try:
        tt.Trainer(p).step(x, [0])
    except (tt.PlanError, ValueError):
        pass


_Q = tt.quantize(tt.load_onnx(tt.models.demo()), tt.datasets.digits("source", "train")[0][:32])
_PLAN = tt.compile(_Q, tt.schemes.last_layers(_Q, 2))


def test_cli_memory_and_compile(tmp_path):
    import onnx

    model = tmp_path / "demo.onnx"
    onnx.save(tt.models.demo(), str(model))
    env = dict(os.environ, TINYTRAIN_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "tinytrain.cli", "memory", str(model), "--scheme", "last:2",
                        "--budget", "256KB", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"peak_bytes", "budget_bytes", "fits", "breakdown"} <= set(d)
    assert d["fits"] is True and d["budget_bytes"] == 256 * 1024
    out = tmp_path / "p.ttp"
    r = subprocess.run([sys.executable, "-m", "tinytrain.cli", "compile", str(model), "--scheme", "bias",
                        "--budget", "256KB", "-o", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert tt.Plan.load(out).memory.peak_bytes > 0
    r = subprocess.run([sys.executable, "-m", "tinytrain.cli", "compile", str(model), "--scheme", "full",
                        "--budget", "8KB", "-o", str(tmp_path / "no.ttp")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "bytes" in r.stderr and "budget" in r.stderr
    assert not (tmp_path / "no.ttp").exists()
