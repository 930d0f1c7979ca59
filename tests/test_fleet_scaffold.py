"""SCAFFOLD in the fleet: the trainer's per-step correction (tt-core's update::shift), the control
variate's wire format, the device's c_i and the server's c, and a simulated federation."""
import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="the fleet needs pip install 'tinytrain-mcu[fleet]'")

import tinytrain as tt  # noqa: E402
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from tinytrain import fleet  # noqa: E402


@pytest.fixture(scope="module")
def q():
    return tt.quantize(tt.load_onnx(tt.models.demo()), tt.datasets.digits("source", "train")[0][:256])


@pytest.fixture(scope="module")
def plan(q):
    # a partial conv (output axis), the classifier's first input channels and every bias of them
    s = tt.Scheme(["conv_8", "fc_0"], {"conv_8": 0.25, "fc_0": 0.25}, {"fc_0": "input"})
    return tt.compile(q, s)


@pytest.fixture(scope="module")
def data():
    return tt.datasets.digits("target", "train"), tt.datasets.digits("target", "test")


@pytest.fixture
def server_task(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for k, v in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, k, v)


def _zeros(plan):
    return {k: np.zeros(v.shape) for k, v in fleet.Layout(plan).extract(plan.model).items()}


def test_the_correction_moves_every_step_by_lr_times_it(plan, data):
    (x, y), _ = data
    still = tt.Trainer(plan, lr=0.0)
    still.correction = {k: v + 1e6 for k, v in _zeros(plan).items()}
    before = still.export_update(0)
    still.fit(x[:30], y[:30], seed=4, verbose=False)
    assert still.export_update(0) == before  # lr 0: neither the gradient nor the correction moves
    # a correction far above the gradient (lr 1e-4): the biases move by -lr * correction on each of
    # the 30 steps, the weights by -0.3 LSB a step in expectation (stochastic rounding)
    corr = _zeros(plan)
    corr["fc_0.bias"][:] = 1e8
    corr["conv_8.bias"][:] = -1e8
    corr["fc_0.weight"][:] = 3000.0
    moved = tt.Trainer(plan, lr=1e-4)
    moved.correction = corr
    assert np.array_equal(moved.correction["fc_0.bias"], corr["fc_0.bias"])
    start = tt.read_update(moved.export_update(0), plan).params
    moved.fit(x[:30], y[:30], seed=4, verbose=False)
    end = tt.read_update(moved.export_update(0), plan).params
    for k, sign in (("fc_0.bias", -1), ("conv_8.bias", 1)):
        step = (end[k].astype(np.int64) - start[k]) / (30 * 1e-4 * 1e8)
        assert np.all(np.abs(step - sign) < 0.05), (k, step)
    w0, w1 = start["fc_0.weight"].astype(np.int64), end["fc_0.weight"].astype(np.int64)
    inside = np.abs(w0) < 100
    assert inside.sum() > 100 and abs((w1 - w0)[inside].mean() + 9.0) < 1.5, (w1 - w0)[inside].mean()
    moved.correction = None
    assert moved.correction is None


def test_a_bad_correction_is_refused(plan):
    tr = tt.Trainer(plan)
    good = _zeros(plan)
    with pytest.raises(ValueError, match="exactly the trained parameters"):
        tr.correction = {k: v for k, v in good.items() if k != "fc_0.bias"}
    with pytest.raises(ValueError, match="shape"):
        tr.correction = dict(good, **{"fc_0.bias": np.zeros(3)})
    with pytest.raises(ValueError, match="finite"):
        tr.correction = dict(good, **{"fc_0.bias": np.full(good["fc_0.bias"].shape, np.inf)})
    assert tr.correction is None


def test_control_variate_travels_as_int8_with_a_scale(plan):
    c = _zeros(plan)
    c["fc_0.weight"][:] = np.linspace(-3.0, 5.0, c["fc_0.weight"].size).reshape(c["fc_0.weight"].shape)
    c["fc_0.bias"][:] = 1234.5
    rec = fleet.control_to_record(c)
    sent = fleet.from_record(rec)
    assert all(sent[k].dtype == np.int8 and sent[k + ":scale"].dtype == np.float32 for k in c)
    assert sum(a.nbytes for a in sent.values()) == sum(v.size for v in c.values()) + 4 * len(c)
    back = fleet.control_from_record(rec, plan)
    for k in c:
        step = np.max(np.abs(c[k])) / 127
        assert np.all(np.abs(back[k] - c[k]) <= step / 2 + 1e-9), k
    assert np.all(back["conv_8.weight"] == 0)
    arrays = fleet.from_record(rec)
    arrays["fc_0.weight"] = arrays["fc_0.weight"].astype(np.float32)
    with pytest.raises(ValueError, match="fc_0.weight"):
        fleet.control_from_record(fleet.to_record(arrays), plan)
    arrays = fleet.from_record(rec)
    arrays["fc_0.bias:scale"] = np.array([np.nan], np.float32)
    with pytest.raises(ValueError, match="scale"):
        fleet.control_from_record(fleet.to_record(arrays), plan)
    with pytest.raises(ValueError, match="the plan trains"):
        fleet.control_from_record(fleet.to_record({"x": np.zeros(2, np.int8)}), plan)


def test_device_keeps_its_mean_gradient_and_the_server_the_mean_of_the_devices(plan, data, server_task):
    (x, y), _ = data
    lay = fleet.Layout(plan)
    start = lay.extract(plan.model)
    strat = fleet.SparseFedAvg(lay, seed=1, method="scaffold")
    msgs = list(strat.configure_train(1, fleet.to_record(start), ConfigRecord({"epochs": 1}), _Grid([7, 8, 9])))
    assert all(fleet.CONTROL_KEY in m.content.array_records for m in msgs)
    control = fleet.control_from_record(msgs[0].content.array_records[fleet.CONTROL_KEY], plan)
    assert all(np.all(v == 0) for v in control.values())
    clients = [fleet.FleetClient(plan, x[i::3][:20], y[i::3][:20], lr=0.05, seed=i) for i in range(3)]
    replies = []
    for node, c in zip((7, 8, 9), clients):
        params, n, metrics = c.fit(start, {"epochs": 1, "server-round": 1}, control=control)
        assert metrics["steps"] == 20 and metrics["lr"] == pytest.approx(0.05)
        # c_i = (global - local) / (K lr) when c = c_i = 0: the round's mean gradient
        for k in params:
            want = (start[k].astype(np.float64) - params[k]) / (20 * 0.05)
            np.testing.assert_allclose(c.control[k], want)
        replies.append(_reply(node, params, n, metrics))
    strat.aggregate_train(1, replies)
    for k in strat.control:  # c = the mean c_i of the three devices
        np.testing.assert_allclose(strat.control[k], np.mean([c.control[k] for c in clients], axis=0), atol=1e-9)
    # a reply without its learning rate is rejected: the server could not keep c
    params, n, metrics = clients[0].fit(start, {"epochs": 1, "server-round": 2}, control=control)
    del metrics["lr"]
    strat.aggregate_train(2, [_reply(7, params, n, metrics)])
    assert strat.rejected and "learning rate" in strat.rejected[-1][2]


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _reply(node, params, count, metrics):
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": fleet.to_record(params),
                          "metrics": MetricRecord({fleet.COUNT_KEY: count, **metrics})})
    return Message(content=content, reply_to=ins)


def test_gateway_refuses_scaffold(plan):
    gw = fleet.GatewayClient(plan, lambda blob, cfg: blob)
    start = gw.get_parameters()
    with pytest.raises(ValueError, match="fedavg"):
        gw.fit(start, {}, control=_zeros(plan))


def test_scaffold_federation_learns_in_flowers_simulation(plan, data):
    (x, y), test = data
    parts = fleet.partition(y, 6, "dirichlet:0.3", seed=0)
    cfg = fleet.RunConfig(rounds=4, min_train_nodes=6, min_available_nodes=6, method="scaffold", lr_decay="linear")
    hist = fleet.simulate(plan, x, y, parts, cfg, test=test, lr=0.1)
    assert len(hist["accuracy"]) == 5 and not hist["rejected"] and not hist["failed"]
    assert hist["accuracy"][-1] > hist["accuracy"][0] + 0.3, hist["accuracy"]
    assert all(m.get("steps", 0) > 0 for m in hist["train_metrics"].values())


def test_reseed_restarts_the_rounding_draws_and_rebuilt_clients_draw_anew_each_round(plan, data):
    (x, y), _ = data
    fresh, same, other = tt.Trainer(plan, lr=0.05), tt.Trainer(plan, lr=0.05), tt.Trainer(plan, lr=0.05)
    same.reseed(0)  # tt.compile's default seed, where every new Trainer of the plan starts
    other.reseed(1)
    for t in (fresh, same, other):
        t.fit(x[:20], y[:20], seed=2, verbose=False)
    assert fresh.export_update(0) == same.export_update(0)
    assert fresh.export_update(0) != other.export_update(0)
    with pytest.raises(ValueError, match="seed"):
        fresh.reseed(-1)
    # a client reseeds from its seed and the round: a client rebuilt for the same round repeats it
    start = fleet.Layout(plan).extract(plan.model)
    r1, _, _ = fleet.FleetClient(plan, x[:20], y[:20], lr=0.05, seed=3).fit(start, {"epochs": 1, "server-round": 1})
    again, _, _ = fleet.FleetClient(plan, x[:20], y[:20], lr=0.05, seed=3).fit(start, {"epochs": 1, "server-round": 1})
    assert all(np.array_equal(r1[k], again[k]) for k in r1)
