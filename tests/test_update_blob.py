"""The fleet update blob from Python: `Trainer.export_update` -> `tt.read_update` gives exactly the
trainer's trained parameters (the model's `weight_q` slices and `bias_q`), `Trainer.apply_update`
makes another trainer predict the same, and a damaged blob or one of another plan is a
`tt.UpdateError` that changes nothing."""
import zlib

import numpy as np
import pytest

import tinytrain as tt


@pytest.fixture(scope="module")
def data():
    x, y = tt.datasets.digits("target", "train")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    return q, x, y


def mixed(q):
    """A depthwise 3x3 conv's first output channels, a quarter of a pointwise conv's input
    channels, half of another's output channels, the whole classifier, five biases."""
    return tt.Scheme(["conv_6", "conv_7", "conv_8", "conv_9", "fc_0"],
                     {"conv_6": 0.5, "conv_7": 0.25, "conv_9": 0.5, "fc_0": 1.0},
                     channel_axis={"conv_7": "input"})


def trained(q, x, y, precision="stochastic", n=48):
    plan = tt.compile(q, mixed(q), update_precision=precision, lr=0.05)
    tr = tt.Trainer(plan)
    tr.fit(x[:n], y[:n], epochs=1, verbose=False)
    return plan, tr


def test_export_read_gives_the_trainers_parameters(data):
    q, x, y = data
    plan, tr = trained(q, x, y)
    blob = tr.export_update()
    u = tt.read_update(blob, plan)
    assert u.sample_count == 48 and len(blob) == u.nbytes
    assert list(u.params) == ["conv_6.weight", "conv_6.bias", "conv_7.weight", "conv_7.bias", "conv_8.bias",
                              "conv_9.weight", "conv_9.bias", "fc_0.weight", "fc_0.bias"]
    m = tr.model
    w = lambda name: m.node(name).params["weight_q"]  # noqa: E731
    np.testing.assert_array_equal(u.params["conv_6.weight"], w("conv_6")[:48])
    np.testing.assert_array_equal(u.params["conv_7.weight"], w("conv_7")[:, :24])
    np.testing.assert_array_equal(u.params["conv_9.weight"], w("conv_9")[:64])
    np.testing.assert_array_equal(u.params["fc_0.weight"], w("fc_0"))
    for name in ["conv_6", "conv_7", "conv_8", "conv_9", "fc_0"]:
        assert u.params[f"{name}.bias"].dtype == np.int32
        np.testing.assert_array_equal(u.params[f"{name}.bias"], m.node(name).params["bias_q"])
    assert u.params["conv_6.weight"].dtype == np.int8 and u.params["conv_6.weight"].shape == (48, 1, 3, 3)
    # Training changed what the blob carries.
    fresh = tt.read_update(tt.Trainer(plan).export_update(), plan)
    assert any(not np.array_equal(fresh.params[k], u.params[k]) for k in u.params)
    assert fresh.sample_count == 0
    # Blob size: header 24 + 8 per section + values + CRC 4.
    values = sum(a.size * a.itemsize for a in u.params.values())
    assert len(blob) == 24 + 8 * len(u.params) + values + 4


@pytest.mark.parametrize("precision", ["stochastic", "residual", "fp32"])
def test_apply_then_predict_equals(data, precision):
    q, x, y = data
    plan, tr = trained(q, x, y, precision)
    blob = tr.export_update()
    other = tt.Trainer(plan)
    xt = x[200:300]
    assert not np.array_equal(other.predict(xt), tr.predict(xt)) or \
        not np.array_equal(other._s.forward(other._inputs(xt)), tr._s.forward(tr._inputs(xt)))
    other.apply_update(blob)
    np.testing.assert_array_equal(other._s.forward(other._inputs(xt)), tr._s.forward(tr._inputs(xt)))
    np.testing.assert_array_equal(other.predict(xt), tr.predict(xt))
    assert other.export_update(48) == blob
    # Applying a trainer's own blob changes nothing, extra update precision included.
    state = tr.state()
    tr.apply_update(tt.read_update(blob, plan))
    assert tr.state() == state


def test_update_objects_round_trip_and_carry_new_values(data):
    q, x, y = data
    plan, tr = trained(q, x, y)
    u = tt.read_update(tr.export_update(), plan)
    assert tt.read_update(u.to_bytes(), plan).params.keys() == u.params.keys()
    assert u.to_bytes() == tr.export_update()
    params = {k: v.copy() for k, v in u.params.items()}
    params["fc_0.bias"] = params["fc_0.bias"] + 1000
    params["conv_7.weight"][0, 0, 0, 0] = -128
    v = tt.Update(plan, params, sample_count=7)
    other = tt.Trainer(plan)
    other.apply_update(v)
    m = other.model
    np.testing.assert_array_equal(m.node("fc_0").params["bias_q"], params["fc_0.bias"])
    assert m.node("conv_7").params["weight_q"][0, 0, 0, 0] == -128
    back = tt.read_update(other.export_update(), plan)
    assert back.sample_count == 0
    for k in params:
        np.testing.assert_array_equal(back.params[k], params[k])


def test_sample_count_follows_training(data):
    q, x, y = data
    plan, tr = trained(q, x, y, n=20)
    assert tt.read_update(tr.export_update(), plan).sample_count == 20
    tr.step(x[:5], y[:5])
    assert tt.read_update(tr.export_update(), plan).sample_count == 25
    assert tt.read_update(tr.export_update(sample_count=3), plan).sample_count == 3
    tr.apply_update(tr.export_update())
    assert tt.read_update(tr.export_update(), plan).sample_count == 0
    with pytest.raises(tt.UpdateError, match="sample_count"):
        tr.export_update(sample_count=-1)


def test_wrong_plan_and_damaged_blobs_are_update_errors(data):
    q, x, y = data
    plan, tr = trained(q, x, y)
    blob = tr.export_update()
    other_plan = tt.compile(q, tt.schemes.last_layers(q, 2))
    other = tt.Trainer(other_plan)
    state = other.state()
    with pytest.raises(tt.UpdateError) as e:
        other.apply_update(blob)
    assert e.value.field == "plan_tag" and "another plan" in str(e.value)
    with pytest.raises(tt.UpdateError):
        tt.read_update(blob, other_plan)
    # Same scheme, other learning rate: another plan too.
    with pytest.raises(tt.UpdateError, match="another plan"):
        tt.read_update(blob, tt.compile(q, mixed(q), lr=0.07))
    assert other.state() == state

    fresh = tt.Trainer(plan)
    state = fresh.state()
    rng = np.random.default_rng(0)
    for n in sorted(set(rng.integers(0, len(blob), 40).tolist()) | {0, 27, len(blob) - 1}):
        with pytest.raises(tt.UpdateError):
            fresh.apply_update(blob[:n])
    for i in rng.integers(0, len(blob), 60).tolist():
        bad = bytearray(blob)
        bad[i] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(tt.UpdateError) as e:
            fresh.apply_update(bytes(bad))
        assert isinstance(e.value, tt.TinytrainError) and e.value.field
    assert fresh.state() == state
    with pytest.raises(tt.UpdateError) as e:
        tt.read_update(blob + b"\0", plan)
    assert e.value.field.startswith("total_len")
    # A valid CRC over a wrong section header: the field is named.
    bad = bytearray(blob)
    bad[24 + 4] ^= 1  # the first section's element count
    bad[-4:] = (zlib.crc32(bytes(bad[:-4])) & 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(tt.UpdateError) as e:
        tt.read_update(bytes(bad), plan)
    assert e.value.field == "section.count"


def test_update_values_are_checked(data):
    q, x, y = data
    plan, tr = trained(q, x, y)
    u = tt.read_update(tr.export_update(), plan)
    p = dict(u.params)
    with pytest.raises(tt.UpdateError, match="missing"):
        tt.Update(plan, {k: v for k, v in p.items() if k != "fc_0.bias"})
    with pytest.raises(tt.UpdateError, match="shape") as e:
        tt.Update(plan, {**p, "conv_9.weight": p["conv_9.weight"][:-1]})
    assert e.value.field == "conv_9.weight"
    with pytest.raises(tt.UpdateError, match="integers"):
        tt.Update(plan, {**p, "fc_0.weight": p["fc_0.weight"].astype(np.float32)})
    with pytest.raises(tt.UpdateError, match="outside int8"):
        tt.Update(plan, {**p, "fc_0.weight": p["fc_0.weight"].astype(np.int32) + 200})
    with pytest.raises(tt.UpdateError, match="sample_count"):
        tt.Update(plan, p, sample_count=2 ** 32)
    with pytest.raises(TypeError):
        tr.apply_update("not bytes")
