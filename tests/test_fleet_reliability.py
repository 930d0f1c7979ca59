"""A fleet against broken and hostile devices: every reply validated before aggregation (metric
types and values, the sample count under a cap, the arrays), failures reported with their reasons
and a non-zero exit when a round had no valid update, robust aggregation against a poisoning
device, and the default scheme's update bound.

Federations here run in this process (`LocalGrid`: each message goes straight to the node's
ClientApp, no Ray), through the same `fleet.run_server` and ClientApp as a real run."""
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="the fleet needs pip install 'tinytrain-mcu[fleet]'")

import tinytrain as tt  # noqa: E402
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from tinytrain import fleet, fleet_cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("fleet_poison", os.path.join(HERE, "..", "benches", "fleet_poison.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module", autouse=True)
def server_task():
    """Messages are built inside a ServerApp's task; outside one, give them its identity."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:
        for k, v in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            mp.setattr(TaskIdentity, k, v)
        yield


class LocalGrid(Grid):
    """A Flower Grid in this process: each message runs its node's ClientApp at once; an exception
    becomes an error reply, as Flower's runtime makes it."""

    def __init__(self, app, nodes: int) -> None:
        self.app = app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={}) for i in range(nodes)}

    def set_run(self, run_id):  # pragma: no cover - not used by a strategy
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:
                replies.append(Message(Error(0, f"ClientApp raised {type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


@pytest.fixture(scope="module")
def task():
    plan, (x, y), test = fleet.demo_setup("last:2")
    return plan, (x, y), test


def run_fleet(plan, x, y, parts, cfg, test, make=None, lr=None):
    """`fleet.run_server` over `LocalGrid`: device ``i`` is ``make(i, plan, x_i, y_i)`` or a FleetClient."""
    shards = [(x[p], y[p]) for p in parts]
    device_plan = tt.Plan(plan.plan_bytes, plan.params)

    def make_client(context):
        i = int(context.node_config["partition-id"])
        if make is not None:
            return make(i, device_plan, *shards[i])
        return fleet.FleetClient(device_plan, *shards[i], lr=lr, seed=cfg.seed * 1009 + i)

    grid = LocalGrid(fleet.client_app(make_client), len(parts))
    return fleet.run_server(grid, fleet.Layout(plan), cfg, test)


def _reply(node, params, metrics):
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"arrays": fleet.to_record(params), "metrics": MetricRecord(metrics)}),
                   reply_to=ins)


# ---------------------------------------------------------------------- 1. every reply validated
@pytest.mark.parametrize("metrics, reason", [
    ({"train-loss": [1, 2, 3]}, "metric 'train-loss' is a list ([1, 2, 3]), not a number"),
    ({"train-loss": [0.5, 0.25]}, "metric 'train-loss' is a list"),
    ({"train-loss": float("inf")}, "metric 'train-loss' is inf, not a finite number"),
    ({"train-loss": float("nan")}, "metric 'train-loss' is nan"),
])
def test_a_bad_metric_is_rejected_and_the_round_goes_on(task, caplog, metrics, reason):
    plan, _, _ = task
    lay = fleet.Layout(plan)
    a = lay.extract(plan.model)
    strat = fleet.SparseFedAvg(lay, seed=3)
    good = [_reply(1, a, {fleet.COUNT_KEY: 10, "train-loss": 0.5}), _reply(2, a, {fleet.COUNT_KEY: 20, "train-loss": 0.7})]
    with caplog.at_level(logging.WARNING, logger="tinytrain.fleet"):
        arrays, agg = strat.aggregate_train(1, good + [_reply(3, a, {fleet.COUNT_KEY: 30, **metrics})])
    assert arrays is not None and strat.accepted == {1: 2}
    assert [(r, n) for r, n, _ in strat.rejected] == [(1, 3)] and reason in strat.rejected[0][2]
    assert f"rejected the update of node 3: {reason}" in caplog.text
    assert agg["train-loss"] == pytest.approx((10 * 0.5 + 20 * 0.7) / 30)  # the good devices' metrics only


@pytest.mark.parametrize("count", [10 ** 15, 2 ** 32, 2 ** 32 - 1, 501, 500])
def test_a_sample_count_beyond_the_cap_is_rejected(task, count):
    """The default cap is what a device's update blob can carry (u32); a set cap is exact."""
    plan, _, _ = task
    lay = fleet.Layout(plan)
    a = lay.extract(plan.model)
    default = fleet.SparseFedAvg(lay)
    capped = fleet.SparseFedAvg(lay, max_samples=500)
    for strat, ok in ((default, count < 2 ** 32), (capped, count <= 500)):
        strat.aggregate_train(1, [_reply(7, a, {fleet.COUNT_KEY: count})])
        assert bool(strat.accepted[1]) == ok, (strat.max_samples, count)
        if not ok:
            assert f"sample count {count} is above the {strat.max_samples} samples" in strat.rejected[0][2]
    with pytest.raises(ValueError, match="max samples per client"):
        fleet.RunConfig(max_samples_per_client=0)
    with pytest.raises(ValueError, match="max samples per client"):
        fleet.SparseFedAvg(lay, max_samples=2 ** 32)


def test_a_bad_evaluation_reply_is_left_out(task):
    plan, _, _ = task
    strat = fleet.SparseFedAvg(fleet.Layout(plan))
    ins = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.EVALUATE) for n in (1, 2, 3)]
    replies = [Message(content=RecordDict({"metrics": MetricRecord(m)}), reply_to=i) for m, i in zip(
        [{fleet.COUNT_KEY: 10, "accuracy": 0.5}, {fleet.COUNT_KEY: 10, "accuracy": [1.0, 0.0]},
         {fleet.COUNT_KEY: 0, "accuracy": 0.9}], ins)]
    agg = strat.aggregate_evaluate(1, replies)
    assert agg["accuracy"] == pytest.approx(0.5)
    assert [n for _, n, _ in strat.rejected_evaluations] == [2, 3]


def test_a_fleet_with_a_device_sending_a_list_metric_completes_its_rounds(task, caplog):
    """Before: the list made Flower's metric aggregation raise TypeError and the server exit."""
    plan, (x, y), test = task
    parts = fleet.partition(y, 4, "iid", seed=0)
    cfg = fleet.RunConfig(rounds=2, min_train_nodes=4, min_available_nodes=4)
    with caplog.at_level(logging.WARNING, logger="tinytrain.fleet"):
        hist = run_fleet(plan, x, y, parts, cfg, test, make=lambda i, p, xs, ys: (
            bench.BadMetricClient if i == 2 else fleet.FleetClient)(p, xs, ys, seed=i))
    assert hist["accepted"] == {1: 3, 2: 3} and hist["rounds_without_update"] == []
    assert [r["round"] for r in hist["rejected"]] == [1, 2]
    assert all("metric 'train-loss' is a list" in r["reason"] for r in hist["rejected"])
    assert "metric 'train-loss' is a list" in caplog.text
    assert hist["accuracy"][-1] > hist["accuracy"][0] + 0.3


# ---------------------------------------------------------------------- 2. failures reported
def test_a_run_whose_devices_all_fail_reports_each_round_without_an_update(task):
    plan, (x, y), test = task
    parts = fleet.partition(y, 3, "iid", seed=0)
    cfg = fleet.RunConfig(rounds=2, min_train_nodes=3, min_available_nodes=3)
    hist = run_fleet(plan, x, y, parts, cfg, test, lr=-1.0)  # every device refuses the learning rate
    assert hist["rounds_without_update"] == [1, 2] and hist["accepted"] == {1: 0, 2: 0}
    assert len(hist["failed"]) == 6 and all("lr must be a finite number" in f["reason"] for f in hist["failed"])
    lines = fleet_cli.run_problems(hist)
    assert len(lines) == 2 and lines[0].startswith("round 1: 3 device(s) failed (3x ClientApp raised ValueError: lr must")
    assert lines[0].endswith("no valid update: the global model did not change")


def test_simulate_exits_non_zero_and_says_why_when_a_round_had_no_valid_update(monkeypatch, capsys, task):
    """The command's exit code and report, with the federation replaced by a recorded history."""
    from tinytrain import cli

    plan, (x, y), test = task
    hist = {"accuracy": [0.0, 0.0], "accepted": {1: 0}, "rejected": [],
            "failed": [{"round": 1, "node": n, "reason": "ClientApp raised ValueError: no"} for n in (5, 6)],
            "rounds_without_update": [1], "max_samples_per_client": 10, "params": fleet.Layout(plan).extract(plan.model)}
    monkeypatch.setattr(fleet, "demo_setup", lambda *a, **k: (plan, (x, y), test))
    monkeypatch.setattr(fleet, "simulate", lambda *a, **k: hist)
    rc = cli.main(["fleet", "simulate", "--clients", "2", "--rounds", "1", "--json", "--out", ""])
    err = capsys.readouterr().err
    assert rc == 1
    assert "round 1: 2 device(s) failed (2x ClientApp raised ValueError: no)" in err
    assert "error: 1 of 1 round(s) had no valid update" in err
    hist.update(rounds_without_update=[], accepted={1: 1}, failed=hist["failed"][:1])
    assert cli.main(["fleet", "simulate", "--clients", "2", "--rounds", "1", "--json", "--out", ""]) == 0
    assert "round 1: 1 device(s) failed" in capsys.readouterr().err  # said, but the run learned


def test_fleet_cli_simulate_with_devices_that_all_fail_exits_non_zero(tmp_path):
    """Through Flower's simulation engine: every device refuses the learning rate."""
    r = subprocess.run([sys.executable, "-m", "tinytrain.cli", "fleet", "simulate", "--clients", "2", "--rounds", "1",
                        "--scheme", "last:1", "--lr", "-1", "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, TINYTRAIN_PROGRESS="0"))
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "round 1: 2 device(s) failed" in r.stderr and "lr must be a finite number" in r.stderr
    assert "1 of 1 round(s) had no valid update" in r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["rounds_without_update"] == [1] and len(rep["failed"]) == 2


# ---------------------------------------------------------------------- 3. robust aggregation
def test_parse_aggregation_names_what_is_wrong():
    assert fleet.parse_aggregation("mean") == ("mean", 0.0)
    assert fleet.parse_aggregation("trimmed:0.2") == ("trimmed", 0.2)
    assert fleet.parse_aggregation("trimmed") == ("trimmed", 0.1)
    assert fleet.parse_aggregation("krum:1") == ("krum", 1.0)
    assert fleet.parse_aggregation("clip:2") == ("clip", 2.0)
    for bad in ("avg", "trimmed:0.5", "trimmed:x", "krum", "krum:-1", "median:3", "clip", "clip:0.5", "clip:nan"):
        with pytest.raises(ValueError, match="aggregation must be"):
            fleet.parse_aggregation(bad)
    with pytest.raises(ValueError, match="aggregation must be"):
        fleet.RunConfig(aggregation="avg")


def test_robust_aggregations_ignore_one_update_at_the_limits(task):
    """Nine devices near the global values and one at the int8 / bias limits with a large count:
    the mean follows the outlier, the median, trimmed mean and Krum stay with the nine, the norm
    bound moves a small step toward it."""
    plan, _, _ = task
    lay = fleet.Layout(plan)
    g = lay.extract(plan.model)
    rng = np.random.default_rng(0)
    honest = [({k: np.clip(v.astype(np.int64) + rng.integers(-2, 3, v.shape), -100, 100).astype(v.dtype)
                for k, v in g.items()}, 50) for _ in range(9)]
    evil = bench.PoisonClient(plan, 10 ** 6).fit(g)
    updates = honest + [(evil[0], evil[1])]
    real = [lay.dequantize(p) for p, _ in honest]
    lo = {k: np.min([r[k] for r in real], axis=0) for k in g}
    hi = {k: np.max([r[k] for r in real], axis=0) for k in g}
    for aggregation in ("median", "trimmed:0.1", "krum:1"):
        out = fleet.aggregate(lay, updates, aggregation, current=g)
        for k in g:  # every value inside the honest devices' own range
            assert np.all(out[k] >= lo[k] - 1e-12) and np.all(out[k] <= hi[k] + 1e-12), (aggregation, k)
    mean = fleet.aggregate(lay, updates, "mean")
    assert any(np.any(mean[k] > hi[k] + 1e-9) for k in g)
    fair = lay.mean(honest)
    far = lambda out: np.sqrt(sum(np.sum((out[k] - fair[k]) ** 2) for k in g))  # noqa: E731
    assert far(fleet.aggregate(lay, updates, "clip:2", current=g)) < far(mean) / 50
    assert all(np.array_equal(fleet.aggregate(lay, honest, "mean")[k], lay.mean(honest)[k]) for k in g)


def test_the_norm_bound_scales_a_long_step_and_caps_a_large_count(task):
    plan, _, _ = task
    lay = fleet.Layout(plan)
    g = {k: np.zeros_like(v) for k, v in lay.extract(plan.model).items()}
    key = lay.keys[-1]
    ups = []
    for step, n in ((1, 10), (1, 10), (1, 10), (40, 10 ** 6)):  # the last: 40x the step, 10^5x the samples
        p = {k: v.copy() for k, v in g.items()}
        p[key][...] = step
        ups.append((p, n))
    unit = lay.dequantize(ups[0][0])[key]
    out = fleet.aggregate(lay, ups, "clip:2", current=g)[key]
    # the long step counts as 2 (2x the median norm) with weight 20 (2x the median count): (3*10*1 + 20*2) / 50
    np.testing.assert_allclose(out, unit * (30 + 40) / 50)
    assert all(np.all(v == 0) for k, v in fleet.aggregate(lay, ups, "clip:2", current=g).items() if k != key)


@pytest.fixture(scope="module")
def poison_runs(task):
    """10 devices with the CLI's label skew (Dirichlet 0.3), 3 rounds: honest; one poisoner (limits,
    10^15 samples) and one device with a list metric, with the norm bound; the poisoner with exactly
    the cap, mean and norm bound. (The two hostile devices' data is lost to the fleet: on other
    seeds of this split that alone costs more than 5 points, benches/fleet_poison.py.)"""
    plan, (x, y), test = task
    parts = fleet.partition(y, 10, "dirichlet:0.3", seed=0)
    cap = bench.samples_cap(parts, 1)
    cfg = fleet.RunConfig(rounds=3, min_train_nodes=10, min_available_nodes=10, max_samples_per_client=cap)
    robust = "clip:2"

    def run(aggregation, count):
        make = None if count is None else bench.hostile_factory(None, cfg.seed, count)
        c = dataclasses.replace(cfg, aggregation=aggregation)
        return run_fleet(plan, x, y, parts, c, test, make=make)

    return {"honest": run("mean", None), "huge_robust": run(robust, 10 ** 15), "cap_mean": run("mean", cap),
            "cap_robust": run(robust, cap), "cap": cap}


def test_a_poisoning_and_a_broken_device_are_logged_and_robust_aggregation_keeps_the_accuracy(poison_runs):
    honest, huge = poison_runs["honest"], poison_runs["huge_robust"]
    assert honest["rejected"] == [] and honest["rounds_without_update"] == []
    assert honest["accuracy"][-1] > 0.5
    # the run completes its rounds with both hostile replies rejected and logged every round
    assert len(huge["accuracy"]) == 4 and huge["rounds_without_update"] == []
    by_node = {}
    for r in huge["rejected"]:
        by_node.setdefault(r["node"], []).append(r)
    assert sorted(len(v) for v in by_node.values()) == [3, 3]
    reasons = sorted(v[0]["reason"] for v in by_node.values())
    assert "metric 'train-loss' is a list" in reasons[0]
    assert f"sample count {10 ** 15} is above the {poison_runs['cap']} samples" in reasons[1]
    assert 100 * (honest["accuracy"][-1] - huge["accuracy"][-1]) <= 5


def test_robust_aggregation_stops_a_poisoner_that_passes_validation(poison_runs):
    """At exactly the cap the poisoner's reply is well formed: the mean is ruined, the norm bound
    stays within 5 points of the honest run."""
    honest, mean, robust = (poison_runs[k]["accuracy"][-1] for k in ("honest", "cap_mean", "cap_robust"))
    assert all(len(r["rejected"]) == 3 for r in (poison_runs["cap_mean"], poison_runs["cap_robust"]))  # the list metric
    assert mean < honest - 0.2, (mean, honest)
    assert 100 * (honest - robust) <= 5, (robust, honest)


# ---------------------------------------------------------------------- 4. the default scheme's update
def test_the_default_searched_scheme_is_searched_under_an_update_budget_20x(monkeypatch):
    seen = {}

    def search(q, x, y, **kw):
        seen.update(kw, model_bytes=q.weight_bytes())
        raise RuntimeError("searched")

    monkeypatch.setattr(tt, "search", search)
    with pytest.raises(RuntimeError, match="searched"):
        fleet.demo_setup()
    assert seen["max_update_bytes"] == seen["model_bytes"] // 20
    assert fleet.update_limit("none", 16352) is None
    with pytest.raises(RuntimeError, match="searched"):
        fleet.demo_setup(update_budget=None)  # asked otherwise: bounded by SRAM only
    assert seen["max_update_bytes"] is None
    args = fleet_cli_parser().parse_args(["fleet", "simulate"])
    assert args.update_budget == "20x"
    assert fleet_cli_parser().parse_args(["fleet", "prepare", "--out", "x"]).update_budget == "20x"


def fleet_cli_parser():
    from tinytrain import cli

    return cli.build_parser()
