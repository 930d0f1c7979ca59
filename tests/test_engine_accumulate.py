"""Gradient accumulation (`tt.compile(..., accumulate=True)`): one update per batch from the mean
gradient, its accumulators counted in the plan's peak, and the executor's high-water mark equal to
that peak."""
import warnings

import numpy as np
import pytest

import tinytrain as tt

ZOO = {
    "mcunet_5fps": lambda: tt.models.mcunet_5fps(),
    "mobilenetv2_w035": lambda: tt.models.mobilenetv2(width=0.35),
}


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).uniform(0, 1, size=(2, 3, 128, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def demo():
    x, y = tt.datasets.digits("target", "train")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    return q, x, y


def _weights(tr):
    return [np.asarray(n.params[k]).copy() for n in tr.model.nodes if n.trainable for k in ("weight_q", "bias_q")]


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_accumulate_peak_is_measured_and_counted(name, image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = tt.quantize(tt.load_onnx(ZOO[name]()), image)
    for sname, s in {"last_4": tt.schemes.last_layers(q, 4), "paper_sparse": tt.schemes.paper_sparse(q)}.items():
        plain = tt.compile(q, s)
        plan = tt.compile(q, s, accumulate=True)
        assert plan.accumulate and not plain.accumulate
        tr = tt.Trainer(plan, lr=0.01)
        loss = tr.step(image, [7, 3])
        assert np.isfinite(loss)
        assert tr.high_water_bytes == plan.memory.peak_bytes, (name, sname)
        m = plan.memory
        assert sum(m.breakdown.values()) == m.peak_bytes
        acc = m.breakdown["accumulated_gradients"]
        assert acc > 0 and plain.memory.breakdown["accumulated_gradients"] == 0
        assert m.peak_bytes > plain.memory.peak_bytes, (name, sname)
        # The accumulators are persistent: part of the state, 4 bytes per trained parameter.
        assert m.state_bytes - plain.memory.state_bytes == acc


def test_batch_of_one_equals_the_in_place_step(demo):
    q, x, y = demo
    layers = q.layers
    s = tt.Scheme(layers[-3:], {layers[-1]: 1.0, layers[-2]: 0.5})
    a = tt.Trainer(tt.compile(q, s, update_precision="fp32", reorder=False), lr=0.05)
    b = tt.Trainer(tt.compile(q, s, update_precision="fp32", accumulate=True), lr=0.05)
    for i in range(5):
        assert a.step(x[i], y[i]) == b.step(x[i], y[i])
    assert _same(_weights(a), _weights(b))


def test_one_update_per_batch_with_the_mean_gradient(demo):
    q, x, y = demo
    layers = q.layers
    s = tt.Scheme(layers[-3:], {layers[-1]: 1.0, layers[-2]: 0.25})
    plan = tt.compile(q, s, update_precision="fp32", accumulate=True)
    fresh = lambda: tt.Trainer(plan, lr=0.05)  # noqa: E731
    start = _weights(fresh())
    # One sample twice: the mean of two equal gradients is that gradient, one update.
    once, twice = fresh(), fresh()
    once.step(x[0], y[0])
    twice.step(np.stack([x[0], x[0]]), [y[0], y[0]])
    assert _same(_weights(once), _weights(twice))
    assert not _same(_weights(once), start)
    # fit(batch_size=8) over 8 samples is one step on the batch; not 8 per-sample steps.
    batch, fitted = fresh(), fresh()
    loss = batch.step(x[:8], y[:8])
    hist = fitted.fit(x[:8], y[:8], epochs=1, batch_size=8, shuffle=False, verbose=False)
    assert _same(_weights(batch), _weights(fitted))
    assert hist["loss"][0] == pytest.approx(loss, rel=1e-6)
    assert batch.steps_done == 1 and batch.skipped_steps == 0
    per_sample = tt.Trainer(tt.compile(q, s, update_precision="fp32"), lr=0.05)
    per_sample.step(x[:8], y[:8])
    assert not _same(_weights(batch), _weights(per_sample))
    # Two batches of 4 are two updates: different from one batch of 8.
    two = fresh()
    two.fit(x[:8], y[:8], epochs=1, batch_size=4, shuffle=False, verbose=False)
    assert two.steps_done == 2
    assert not _same(_weights(two), _weights(batch))


def test_accumulate_plan_round_trips(demo, tmp_path):
    q, _, _ = demo
    plan = tt.compile(q, tt.schemes.last_layers(q, 2), accumulate=True, momentum=0.9)
    assert plan.plan_bytes[4:6] == (2).to_bytes(2, "little")
    assert tt.compile(q, tt.schemes.last_layers(q, 2)).plan_bytes[4:6] == (1).to_bytes(2, "little")
    plan.save(str(tmp_path / "a.ttp"))
    back = tt.Plan.load(str(tmp_path / "a.ttp"), model=q)
    assert back.accumulate and back.memory.peak_bytes == plan.memory.peak_bytes
    assert "accumulate=True" in repr(back)
