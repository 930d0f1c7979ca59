"""benches/fleet.py --combine: seeds run apart summed up, (b) also with the one setting whose
validation accuracy is best over all seeds."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("flwr")

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fleet_bench", os.path.join(HERE, "..", "benches", "fleet.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _seed_run(path, own, val, curves, central, with_runs=True):
    seed = {"local_only": [0.0, 0.3], "centralized": [0.0, central], "federated": curves[own],
            "chosen": {"federated": {"lr": 0.2, "server_lr": float(own[-3:])}},
            "validation_final": {"federated": val}}
    if with_runs:
        seed["federated_runs"] = curves
    row = {"scheme": "s", "method": "fedavg", "ratios": {"int8_model/update": 23.2}, "seeds": [seed]}
    path.write_text(json.dumps({"rounds": 1, "rounds_per_epoch": 8, "rows": [row]}))
    return str(path)


def test_combine_reports_each_seeds_choice_and_the_setting_best_over_all_seeds(tmp_path):
    one, two = "lr=0.2,server_lr=1.0", "lr=0.2,server_lr=2.0"
    a = _seed_run(tmp_path / "a.json", two, {one: 0.80, two: 0.86}, {one: [0, 0.70], two: [0, 0.78]}, 0.79)
    # seed b's own validation prefers 1.0 (by a little); over both seeds 2.0 is better
    b = _seed_run(tmp_path / "b.json", one, {one: 0.82, two: 0.81}, {one: [0, 0.75], two: [0, 0.80]}, 0.82)
    out = bench.combine([a, b])
    assert out["shared_setting"] == two
    assert out["final"]["federated_own_setting"] == pytest.approx([78.0, 75.0])
    assert out["final"]["federated_shared_setting"] == pytest.approx([78.0, 80.0])
    assert out["gap_federated_shared_setting"]["per_seed"] == pytest.approx([1.0, 2.0])
    assert out["gap_federated_own_setting"]["mean"] == pytest.approx(4.0)
    assert out["mean_per_epoch"]["federated_own_setting"] == pytest.approx([0.0, 76.5])
    assert out["mean_per_epoch"]["federated_shared_setting"] == pytest.approx([0.0, 79.0])
    assert out["mean_per_epoch"]["centralized"] == pytest.approx([0.0, 80.5])
    # a run that kept only its own choice's curve cannot stand for another setting
    c = _seed_run(tmp_path / "c.json", one, {one: 0.82, two: 0.81}, {one: [0, 0.75], two: [0, 0.80]}, 0.82,
                  with_runs=False)
    with pytest.raises(SystemExit, match="did not choose"):
        bench.combine([a, c])
