"""tinytrain.fleet: the exchanged layout, SparseFedAvg's averaging, re-quantization and rejection of
malformed updates, the Dirichlet split, the Flower client, and a small simulated federation."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="the fleet needs pip install 'tinytrain-mcu[fleet]'")

import tinytrain as tt  # noqa: E402
from flwr.app import ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from tinytrain import fleet  # noqa: E402


@pytest.fixture(scope="module")
def q():
    g = tt.load_onnx(tt.models.demo())
    return tt.quantize(g, tt.datasets.digits("source", "train")[0][:256])


@pytest.fixture(scope="module")
def plan(q):
    # output-axis partial conv, input-axis partial conv, a bias-only layer, the whole classifier
    s = tt.Scheme(["conv_8", "conv_9", "fc_0"], {"conv_9": 0.125, "conv_7": 0.25, "fc_0": 1.0},
                  {"conv_7": "input"})
    return tt.compile(q, s)


@pytest.fixture(scope="module")
def target():
    return tt.datasets.digits("target", "train"), tt.datasets.digits("target", "test")


def test_layout_is_the_schemes_updated_channels(plan, q):
    lay = fleet.Layout(plan)
    assert lay.keys == ["conv_7.weight", "conv_8.bias", "conv_9.weight", "conv_9.bias", "fc_0.weight", "fc_0.bias"]
    shapes = {e.key: e.shape for e in lay.entries}
    assert shapes["conv_7.weight"] == (32, 24, 1, 1)  # input axis: W[:, :round(0.25 * 96)]
    assert shapes["conv_9.weight"] == (16, 32, 1, 1)  # output axis: W[:round(0.125 * 128)]
    assert shapes["fc_0.weight"] == (10, 128) and shapes["fc_0.bias"] == (10,)
    assert {e.key: e.dtype for e in lay.entries}["conv_9.bias"] == np.int32
    assert lay.nbytes == 32 * 24 + 4 * 32 + 16 * 32 + 4 * 128 + 1280 + 40
    assert lay.model_bytes() == q.weight_bytes()
    frozen = lay.extract(q)
    n9 = q.node("conv_9")
    np.testing.assert_array_equal(frozen["conv_9.weight"], n9.params["weight_q"][:16])
    np.testing.assert_array_equal(frozen["conv_7.weight"], q.node("conv_7").params["weight_q"][:, :24])
    # the bias scale is s_in * s_w: dequantizing gives the float bias the model holds
    s_in = q.tensors[n9.inputs[0]].scale
    np.testing.assert_allclose(lay.dequantize(frozen)["conv_9.bias"],
                               n9.params["bias_q"] * s_in * n9.params["weight_scale"].astype(np.float64))


def test_apply_writes_only_the_updated_channels(plan, q):
    lay = fleet.Layout(plan)
    new = {k: (v // 2).astype(v.dtype) for k, v in lay.extract(q).items()}
    q2 = lay.apply(q, new)
    assert lay.extract(q2).keys() == new.keys()
    for k, v in lay.extract(q2).items():
        np.testing.assert_array_equal(v, new[k])
    w, w2 = q.node("conv_9").params["weight_q"], q2.node("conv_9").params["weight_q"]
    np.testing.assert_array_equal(w[16:], w2[16:])  # channels the scheme does not train stay frozen
    np.testing.assert_array_equal(q.node("conv_5").params["weight_q"], q2.node("conv_5").params["weight_q"])
    assert np.array_equal(q.node("conv_9").params["weight_q"], w)  # q itself untouched


def test_average_is_the_sample_weighted_mean_requantized(plan, q):
    lay = fleet.Layout(plan)
    a = lay.extract(q)
    b = {k: np.where(np.abs(v) <= 100, v.astype(np.int64) + 8, v).astype(v.dtype) for k, v in a.items()}
    # identical updates: the mean is representable, rounding must not move it
    same = lay.average([(a, 3), (a, 5)], np.random.default_rng(0))
    for k in a:
        np.testing.assert_array_equal(same[k], a[k])
    # weights 1 and 3: exact mean a + 6 on every unsaturated value
    avg = lay.average([(a, 1), (b, 3)], np.random.default_rng(0))
    for k in a:
        exact = (a[k].astype(np.float64) * 1 + b[k].astype(np.float64) * 3) / 4
        assert avg[k].dtype == a[k].dtype and avg[k].shape == a[k].shape
        np.testing.assert_array_equal(avg[k], exact)  # a + 6 where b = a + 8: an integer mean stays exact


def test_server_lr_extrapolates_the_mean_step(plan, q):
    lay = fleet.Layout(plan)
    g = lay.extract(q)
    a = {k: np.where(np.abs(v) <= 100, v.astype(np.int64) + 4, v).astype(v.dtype) for k, v in g.items()}
    out = lay.average([(a, 1), (a, 5)], np.random.default_rng(0), current=g, server_lr=2.5)
    for k in g:
        np.testing.assert_array_equal(out[k], np.clip(g[k] + 2.5 * (a[k].astype(np.int64) - g[k]), -2**30, 2**30))
    with pytest.raises(ValueError, match="server_lr"):
        fleet.SparseFedAvg(lay, server_lr=0.0)


def test_server_momentum_carries_the_previous_steps(plan, q, server_task):
    """FedAvgM with beta 0.5: the devices move 4 LSB in both rounds; the server steps 4, then
    4 + 0.5 * 4 = 6, and with beta 0 it steps 4 each round."""
    lay = fleet.Layout(plan)
    g = {k: np.where(np.abs(v) <= 100, v, 0).astype(v.dtype) for k, v in lay.extract(q).items()}
    plus = lambda p, d: {k: (v.astype(np.int64) + d).astype(v.dtype) for k, v in p.items()}
    for beta, second in ((0.5, 10), (0.0, 8)):
        strat = fleet.SparseFedAvg(lay, seed=1, server_momentum=beta)
        strat.current = g
        first = fleet.from_record(strat.aggregate_train(1, [_reply(1, plus(g, 4), 3), _reply(2, plus(g, 4), 5)])[0])
        assert all(np.array_equal(first[k], plus(g, 4)[k]) for k in g)
        strat.current = first
        out = fleet.from_record(strat.aggregate_train(2, [_reply(1, plus(first, 4), 3)])[0])
        assert all(np.array_equal(out[k], plus(g, second)[k]) for k in g)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="server_momentum"):
            fleet.SparseFedAvg(lay, server_momentum=bad)
    with pytest.raises(ValueError, match="server_momentum"):
        fleet.RunConfig(server_momentum=1.5)


def test_requantization_is_stochastic_and_unbiased(plan):
    lay = fleet.Layout(plan)
    rng = np.random.default_rng(1)
    e = lay.entries[0]
    real = {x.key: np.full(x.shape, 0.3) * x.scale for x in lay.entries}
    draws = np.stack([lay.quantize(real, rng)[e.key] for _ in range(400)])
    assert set(np.unique(draws)) == {0, 1}  # never nearest-rounded to 0 everywhere
    assert abs(draws.mean() - 0.3) < 0.02
    big = {x.key: np.full(x.shape, 1e9) * x.scale for x in lay.entries}
    out = lay.quantize(big, rng)
    assert out[e.key].max() == 127 and out["fc_0.bias"].max() == 1e9  # int8 saturates, int32 holds it
    huge = lay.quantize({x.key: np.full(x.shape, -5e9) * x.scale for x in lay.entries}, rng)
    assert huge[e.key].min() == -127 and huge["fc_0.bias"].min() == -2**30  # the device's bias bound


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p.pop("fc_0.bias"), "missing arrays ['fc_0.bias']"),
    (lambda p: p.update({"conv_0.bias": np.zeros(16, np.int32)}), "unexpected arrays ['conv_0.bias']"),
    (lambda p: p.update({"conv_9.weight": p["conv_9.weight"][:8]}), "conv_9.weight: shape (8, 32, 1, 1), expected (16, 32, 1, 1)"),
    (lambda p: p.update({"fc_0.weight": p["fc_0.weight"].astype(np.float32)}), "fc_0.weight: dtype float32, expected int8"),
    (lambda p: p.update({"fc_0.weight": np.full((10, 128), np.nan, np.float32)}), "fc_0.weight: 1280 non-finite values"),
    (lambda p: p.update({"conv_8.bias": p["conv_8.bias"].astype(np.int64)}), "conv_8.bias: dtype int64, expected int32"),
    (lambda p: p["conv_7.weight"].__setitem__((0, 0, 0, 0), -128), "conv_7.weight: int8 weight -128"),
    (lambda p: p["conv_9.bias"].__setitem__(3, 2**30 + 1), "conv_9.bias: a bias beyond +-2^30"),
    (lambda p: p.update({"fc_0.bias": [1] * 10}), "fc_0.bias: a list, not a numpy array"),
])
def test_check_names_what_is_wrong(plan, q, mutate, reason):
    lay = fleet.Layout(plan)
    p = {k: v.copy() for k, v in lay.extract(q).items()}
    assert lay.check(p, 5) is None
    mutate(p)
    assert reason in lay.check(p, 5)


@pytest.mark.parametrize("count", [-3, 2.5, float("nan"), float("inf"), True, "12", None])
def test_check_rejects_a_bad_sample_count(plan, q, count):
    lay = fleet.Layout(plan)
    reason = lay.check(lay.extract(q), count if count is not None else {})
    assert reason is not None and "sample count" in reason


@pytest.fixture
def server_task(monkeypatch):
    """Messages are built inside a ServerApp's task; outside one, give them its identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for k, v in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, k, v)


def _reply(node, params, count):
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": fleet.to_record(params) if isinstance(params, dict) else params,
                          "metrics": MetricRecord({fleet.COUNT_KEY: count})})
    return Message(content=content, reply_to=ins)


def test_strategy_rejects_malformed_updates_with_a_logged_reason(plan, q, caplog, server_task):
    lay = fleet.Layout(plan)
    a = lay.extract(q)
    b = {k: np.clip(v.astype(np.int64) - 4, -127, 127).astype(v.dtype) for k, v in a.items()}
    wrong_shape = dict(a, **{"conv_9.weight": a["conv_9.weight"][:, :16]})
    as_float = {k: v.astype(np.float32) for k, v in b.items()}
    as_float["conv_7.weight"][3, 0, 0, 0] = np.nan
    crashed = Message(Error(0, "ClientApp raised"), reply_to=Message(content=RecordDict(), dst_node_id=17,
                                                                      message_type=MessageType.TRAIN))
    replies = [_reply(11, a, 10), _reply(12, wrong_shape, 10), _reply(13, b, 30), _reply(14, as_float, 1000),
               _reply(15, b, float("nan")), _reply(16, ArrayRecord(), 10), crashed]
    strat = fleet.SparseFedAvg(lay, seed=7)
    with caplog.at_level(logging.WARNING, logger="tinytrain.fleet"):
        arrays, metrics = strat.aggregate_train(2, replies)
    assert strat.accepted == {2: 2}
    rejected = {node: reason for _, node, reason in strat.rejected}
    assert set(rejected) == {12, 14, 15, 16}
    assert "conv_9.weight: shape (16, 16, 1, 1), expected (16, 32, 1, 1)" in rejected[12]
    assert "non-finite" in rejected[14]
    assert "sample count" in rejected[15]
    assert "missing arrays" in rejected[16]
    assert strat.failed == [(2, 17, "ClientApp raised")]
    for node, reason in rejected.items():
        assert f"rejected the update of node {node}: {reason}" in caplog.text
    # only the two good updates are averaged: weights 10 and 30, same rng as the strategy's
    want = lay.average([(a, 10), (b, 30)], np.random.default_rng(7))
    got = fleet.from_record(arrays)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert metrics is not None


def test_strategy_keeps_the_model_when_too_few_updates_are_valid(plan, q, server_task):
    lay = fleet.Layout(plan)
    a = lay.extract(q)
    strat = fleet.SparseFedAvg(lay, min_valid_updates=2)
    arrays, metrics = strat.aggregate_train(1, [_reply(1, a, 4), _reply(2, {"x": np.zeros(3)}, 4)])
    assert arrays is None and metrics is None
    assert strat.accepted == {1: 1} and len(strat.rejected) == 1


def test_strategy_leaves_devices_without_samples_out_of_the_mean(plan, q, server_task):
    """A reply of 0 samples (a device with nothing to train on in the round) is well formed, not
    rejected, and has no weight: the mean is the other devices' own."""
    lay = fleet.Layout(plan)
    a = lay.extract(q)
    top = {k: 127 if v.dtype == np.int8 else 2 ** 30 for k, v in a.items()}
    b = {k: np.clip(v.astype(np.int64) + 3, -127, top[k]).astype(v.dtype) for k, v in a.items()}
    far = {k: np.clip(v.astype(np.int64) - 60, -127, top[k]).astype(v.dtype) for k, v in a.items()}
    strat = fleet.SparseFedAvg(lay, seed=5)
    strat.current = a
    arrays, _ = strat.aggregate_train(1, [_reply(1, b, 7), _reply(2, far, 0)])
    assert strat.accepted == {1: 2} and strat.rejected == []
    got = fleet.from_record(arrays)
    assert all(np.array_equal(got[k], b[k]) for k in b)  # b alone: its values are on the grid already
    idle_only = fleet.SparseFedAvg(lay, seed=5)
    idle_only.current = a
    assert idle_only.aggregate_train(1, [_reply(2, far, 0)]) == (None, None)  # nothing trained: unchanged


def test_rounds_per_epoch_leaves_a_device_with_fewer_samples_idle(plan, q, target):
    """3 samples and 8 rounds per epoch: each sample once in rounds 1-3, then idle rounds that reply
    0 samples with the values they got, then the next epoch starts over -- never a sample twice an
    epoch."""
    (x, y), _ = target
    start = fleet.Layout(plan).extract(q)
    cfg = {"epochs": 1, "rounds-per-epoch": 8}
    runs = [fleet.FleetClient(plan, x[:3], y[:3], seed=2).fit(start, {**cfg, "server-round": r}) for r in range(1, 10)]
    assert [n for _, n, _ in runs] == [1, 1, 1, 0, 0, 0, 0, 0, 1]
    for params, n, _ in runs:
        if n == 0:
            assert all(np.array_equal(params[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="rounds-per-epoch"):
        fleet.RunConfig(rounds_per_epoch=0)


def test_dirichlet_partition_is_a_skewed_split_of_every_sample():
    y = np.repeat(np.arange(5), 120)
    parts = fleet.partition(y, 20, "dirichlet:0.3", seed=3)
    allidx = np.concatenate(parts)
    assert len(parts) == 20 and len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 2
    classes = np.mean([len(np.unique(y[p])) for p in parts])
    iid = fleet.partition(y, 20, "iid", seed=3)
    assert sorted(len(p) for p in iid) == [30] * 20
    assert classes < np.mean([len(np.unique(y[p])) for p in iid]) - 1  # label skew: fewer classes each
    with pytest.raises(ValueError, match="dirichlet:ALPHA"):
        fleet.partition(y, 4, "dirichlet:-1")
    with pytest.raises(ValueError, match="cannot give"):
        fleet.partition(y[:10], 20, "iid")


def test_client_fit_trains_from_the_global_values(plan, q, target):
    (x, y), _ = target
    c = fleet.FleetClient(tt.Plan(plan.plan_bytes, plan.params), x[:40], y[:40], seed=1)  # no model needed
    lay = fleet.Layout(plan)
    start = lay.extract(q)
    assert all(np.array_equal(c.get_parameters()[k], v) for k, v in start.items())
    shifted = {k: (v // 2).astype(v.dtype) for k, v in start.items()}
    c.set_parameters(shifted)
    assert all(np.array_equal(c.get_parameters()[k], v) for k, v in shifted.items())
    params, n, metrics = c.fit(start, {"epochs": 1, "server-round": 1})
    assert n == 40 and lay.check(params, n) is None and np.isfinite(metrics["train-loss"])
    assert any(not np.array_equal(params[k], start[k]) for k in start)
    loss, n_eval, m = c.evaluate(params, {})
    assert n_eval == 40 and 0.0 <= m["accuracy"] <= 1.0 and np.isnan(loss)  # no model: no output scale
    loss, _, m2 = fleet.FleetClient(plan, x[:40], y[:40]).evaluate(params, {})
    assert np.isfinite(loss) and m2 == m
    with pytest.raises(ValueError, match="global parameters do not fit the plan"):
        c.set_parameters({k: v for k, v in start.items() if k != "fc_0.bias"})


def test_rounds_per_epoch_trains_each_part_of_the_data_in_turn(plan, q, target):
    (x, y), _ = target
    x, y = x[:11], y[:11]
    start = fleet.Layout(plan).extract(q)
    c = fleet.FleetClient(plan, x, y, seed=1)
    cfg = {"epochs": 1, "rounds-per-epoch": 2}
    runs = [c.fit(start, {**cfg, "server-round": r}) for r in (1, 2, 3)]
    assert [n for _, n, _ in runs] == [6, 5, 6]  # two rounds see the 11 samples once, then again
    # round 2 trained exactly the samples round 1 left out, as a device holding only them would
    first = set(np.random.default_rng([1, 0]).permutation(11)[:6].tolist())
    rest = sorted(set(range(11)) - first)
    alone, n, _ = fleet.FleetClient(plan, x[rest], y[rest], seed=1).fit(start, {"epochs": 1, "server-round": 2})
    second, _, _ = fleet.FleetClient(plan, x, y, seed=1).fit(start, {**cfg, "server-round": 2})
    assert n == 5 and all(np.array_equal(alone[k], second[k]) for k in alone)
    # the next epoch deals the samples again: its two rounds see all 11, split differently
    deals = [set(np.random.default_rng([1, e]).permutation(11)[:6].tolist()) for e in range(4)]
    assert len({frozenset(d) for d in deals}) > 1
    again = sorted(deals[1])
    third, n, _ = fleet.FleetClient(plan, x[again], y[again], seed=1).fit(start, {"epochs": 1, "server-round": 3})
    assert n == 6 and all(np.array_equal(third[k], runs[2][0][k]) for k in third)
    with pytest.raises(ValueError, match="rounds-per-epoch"):
        c.fit(start, {**cfg, "rounds-per-epoch": 0})


def test_lr_scale_decays_linearly_over_the_epochs_of_data():
    assert [fleet.lr_scale("linear", e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert fleet.lr_scale("none", 3, 4) == 1.0
    # 20 rounds of half an epoch: the schedule of 10 epochs, one step every two rounds
    cfg = fleet.RunConfig(rounds=20, rounds_per_epoch=2, lr_decay="linear")
    assert [cfg.lr_scale(r) for r in (1, 2, 3, 19, 20)] == pytest.approx([1.0, 1.0, 0.9, 0.1, 0.1])
    assert fleet.RunConfig(rounds=5).lr_scale(5) == 1.0
    with pytest.raises(ValueError, match="lr decay"):
        fleet.lr_scale("cosine", 0, 4)
    with pytest.raises(ValueError, match="epoch 4"):
        fleet.lr_scale("linear", 4, 4)


def test_client_fit_scales_its_learning_rate_for_the_round(plan, q, target):
    (x, y), _ = target
    start = fleet.Layout(plan).extract(q)
    cfg = {"epochs": 1, "server-round": 1}
    half, _, _ = fleet.FleetClient(plan, x[:20], y[:20], lr=0.1, seed=3).fit(start, {**cfg, "lr-scale": 0.5})
    want, _, _ = fleet.FleetClient(plan, x[:20], y[:20], lr=0.05, seed=3).fit(start, cfg)
    full, _, _ = fleet.FleetClient(plan, x[:20], y[:20], lr=0.1, seed=3).fit(start, cfg)
    assert all(np.array_equal(half[k], want[k]) for k in want)
    assert any(not np.array_equal(half[k], full[k]) for k in full)
    c = fleet.FleetClient(plan, x[:20], y[:20], lr=0.1, seed=3)
    still, _, _ = c.fit(start, {**cfg, "lr-scale": 0.0})
    assert all(np.array_equal(still[k], start[k]) for k in start)  # a zero rate moves nothing
    again, _, _ = c.fit(start, cfg)  # the scale is the round's only: the next round is back at the base rate
    assert c.trainer.lr == pytest.approx(0.1) and any(not np.array_equal(again[k], start[k]) for k in start)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="lr-scale"):
            c.fit(start, {**cfg, "lr-scale": bad})


class _Grid:
    """The part of a Flower Grid a strategy's configure_train reads: the connected nodes."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_strategy_sends_each_rounds_learning_rate_scale(plan, q, server_task):
    lay = fleet.Layout(plan)
    cfg = fleet.RunConfig(rounds=4, lr_decay="linear")
    strat = fleet.SparseFedAvg(lay, lr_scale=cfg.lr_scale)
    arrays = fleet.to_record(lay.extract(q))
    for rnd, want in ((1, 1.0), (2, 0.75), (4, 0.25)):
        msgs = list(strat.configure_train(rnd, arrays, flwr.app.ConfigRecord({"epochs": 1}), _Grid([5, 6])))
        assert sorted(m.metadata.dst_node_id for m in msgs) == [5, 6]
        for m in msgs:
            assert m.content["config"]["lr-scale"] == want and m.content["config"]["epochs"] == 1
    plain = list(fleet.SparseFedAvg(lay).configure_train(2, arrays, flwr.app.ConfigRecord({"epochs": 1}), _Grid([5, 6])))
    assert "lr-scale" not in plain[0].content["config"]  # no schedule: the devices keep their own rate


def test_layout_is_the_update_blobs(plan):
    """The server's layout and the devices' update blob (tt-core) name and shape the same arrays."""
    blob = tt.Trainer(plan).export_update(0)
    u = tt.read_update(blob, plan)
    lay = fleet.Layout(plan)
    assert list(u.params) == lay.keys
    assert [(a.shape, a.dtype) for a in u.params.values()] == [(e.shape, e.dtype) for e in lay.entries]
    assert lay.nbytes == sum(a.nbytes for a in u.params.values()) < len(blob)


def test_gateway_client_passes_a_devices_blob_on_unchanged(plan, target):
    """A gateway forwards the global blob to a device and the device's blob back: the Flower client
    reads the device's values and sample count exactly."""
    (x, y), _ = target
    device = tt.Trainer(tt.Plan(plan.plan_bytes, plan.params))  # a device holds the plan only
    sent = []

    def device_fit(global_blob, config):
        device.apply_update(global_blob)
        device.fit(x[:25], y[:25], epochs=int(config["epochs"]), verbose=False)
        sent.append(device.export_update())
        return sent[-1]

    gw = fleet.GatewayClient(plan, device_fit)
    start = gw.get_parameters()
    params, n, _ = gw.fit(start, {"epochs": 2})
    assert n == 50
    mine = tt.read_update(device.export_update(), plan)
    for k, v in mine.params.items():
        np.testing.assert_array_equal(params[k], v)
    assert tt.Update(plan, params, n).to_bytes() == sent[0]  # bit for bit what the device sent
    with pytest.raises(tt.UpdateError):
        fleet.GatewayClient(plan, lambda b, c: sent[0][:-1]).fit(start, {})
    with pytest.raises(ValueError, match="do not evaluate"):
        gw.evaluate(start, {})


def test_fleet_cli_simulate_learns_with_flowers_simulation_engine(tmp_path):
    """4 simulated devices (Dirichlet 0.3), 3 rounds, through Flower's simulation engine (Ray)."""
    r = subprocess.run([sys.executable, "-m", "tinytrain.cli", "fleet", "simulate", "--clients", "4", "--rounds", "3",
                        "--scheme", "last:2", "--partition", "dirichlet:0.3", "--lr-decay", "linear",
                        "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    acc = rep["accuracy"]
    assert len(acc) == 4 and acc[0] < 0.05  # the demo model has never seen digits 5-9
    assert max(acc[1:]) > 0.5
    assert rep["accepted"] == {"1": 4, "2": 4, "3": 4} and rep["rejected"] == []
    assert rep["lr_decay"] == "linear"
    assert rep["update_bytes"] == 4096 + 4 * 128 + 1280 + 4 * 10  # conv_9 and fc_0: int8 weights, int32 biases
    assert rep["int8_model_over_update"] == pytest.approx(rep["full_int8_model_bytes"] / rep["update_bytes"])
    assert (tmp_path / "fleet.json").exists()


def test_docs_example_runs():
    """The example of docs/fleet.md, as written, in a fresh process."""
    import os
    import re

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "fleet.md")).read()
    code = re.search(r"## Example\n\n```python\n(.*?)```", doc, re.S).group(1)
    assert 12 <= len(code.strip().splitlines()) <= 18
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    first, last = r.stdout.strip().splitlines()[-2:]
    assert "fc_0.weight" in first and "int8" in first
    acc = [float(v) for v in re.findall(r"[0-9.]+", last.split("]")[0])]
    assert len(acc) == 4 and acc[-1] > acc[0] + 0.3
    assert last.endswith(f"{4096 + 512 + 1280 + 40} bytes per update")


def test_fleet_is_optional_for_the_rest_of_tinytrain():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import tinytrain, tinytrain.cli\n"
            "assert 'tinytrain.fleet' not in sys.modules\n"
            "tinytrain.cli.build_parser()\n"
            "try:\n    import tinytrain.fleet\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pip install 'tinytrain-mcu[fleet]'" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['flwr'] = None\nimport tinytrain.cli as c\n"
                        "sys.exit(c.main(['fleet', 'simulate', '--clients', '2']))"], capture_output=True, text=True)
    assert r.returncode == 1 and "pip install 'tinytrain-mcu[fleet]'" in r.stderr


@pytest.mark.parametrize("command", [["simulate", "--clients", "4", "--rounds", "1"],
                                     ["server", "--plan", "absent.ttp", "--model", "absent.onnx"]])
def test_fleet_commands_refuse_a_bad_server_momentum_before_starting(command, capsys, monkeypatch):
    from tinytrain import cli

    def no_setup(*args, **kwargs):
        raise AssertionError("the demo's search ran before the setting was checked")

    monkeypatch.setattr(fleet, "demo_setup", no_setup)
    rc = cli.main(["fleet", *command, "--server-momentum", "1.0"])
    # the server's error names the momentum, not the absent plan file it checks later
    assert rc != 0 and "server_momentum must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_fleet_runs_a_scheme_whose_ratio_lands_on_a_half(q, target, server_task):
    """fc_0 at 1/4 of its 10 rows: 2.5, which tt-core trains as 3 rows. The server's layout, the
    devices' blobs and three rounds of FedAvg (server messages -> device fits -> aggregation)
    must all agree on it: no update rejected, the global values move every round."""
    (x, y), _ = target
    plan = tt.compile(q, tt.Scheme(bias_layers=["fc_0"], weight_ratios={"fc_0": 0.25}))
    lay = fleet.Layout(plan)
    blob = tt.read_update(tt.Trainer(plan).export_update(), plan)
    assert {e.key: e.shape for e in lay.entries} == {k: a.shape for k, a in blob.params.items()} \
        == {"fc_0.weight": (3, 128), "fc_0.bias": (10,)}
    nodes = [1, 2, 3]
    devices = {n: fleet.FleetClient(tt.Plan(plan.plan_bytes, plan.params), x[i::3][:20], y[i::3][:20], seed=i)
               for i, n in enumerate(nodes)}
    strat = fleet.SparseFedAvg(lay, seed=0)
    current = lay.extract(q)
    for rnd in (1, 2, 3):
        msgs = strat.configure_train(rnd, fleet.to_record(current), flwr.app.ConfigRecord({"epochs": 1}), _Grid(nodes))
        replies = []
        for m in msgs:
            params, n, _ = devices[m.metadata.dst_node_id].fit(fleet.from_record(m.content["arrays"]),
                                                               dict(m.content["config"]))
            replies.append(_reply(m.metadata.dst_node_id, params, n))
        arrays, _ = strat.aggregate_train(rnd, replies)
        assert strat.accepted[rnd] == 3 and strat.rejected == []
        new = fleet.from_record(arrays)
        assert any(not np.array_equal(new[k], current[k]) for k in current)
        current = new
