import json
import os

import numpy as np
import pytest

import tinytrain as tt
from tinytrain import sparse_search as search_mod


@pytest.fixture(scope="module")
def demo_q():
    g = tt.load_onnx(tt.models.demo())
    x, _ = tt.datasets.digits("source", "train")
    return tt.quantize(g, x[:64])


@pytest.fixture(scope="module")
def target_data():
    x, y = tt.datasets.digits("target", "train")
    return x[:90], y[:90]


SMALL = dict(population=12, generations=4, epochs=1, workers=1, ratios=(0.25, 1.0))


def test_search_fits_budget_and_reports_exact_peak(demo_q, target_data, tmp_path):
    x, y = target_data
    result = tt.search(demo_q, x, y, budget="256KB", seed=0, cache_dir=str(tmp_path), **SMALL)
    assert result.peak_bytes <= 256 * 1024
    plan = tt.compile(demo_q, result.scheme, budget="256KB")
    assert plan.memory.peak_bytes == result.peak_bytes
    # the chosen scheme is the most accurate of the verified best-by-contribution candidates and
    # of the simple baselines that fit
    assert 1 < len(result.verified) <= 6
    everything = result.verified + result.baselines
    assert result.accuracy == max(v["accuracy"] for v in everything)
    if result.winner == "searched":
        chosen = [v for v in result.verified if v["scheme"] == result.scheme]
        assert chosen and chosen[0]["accuracy"] == result.accuracy
        assert result.score == chosen[0]["score"]
    assert all(v["peak_bytes"] <= result.budget_bytes for v in result.verified)
    rows = result.contributions
    assert [r["layer"] for r in rows] == demo_q.layers
    for r in rows[:-1]:
        assert set(r["weight_gain"]) == {0.25, 1.0}
        assert all(isinstance(c, int) for c in r["weight_cost_bytes"].values())
    # the Pareto front is increasing in both memory and score
    peaks = [p for p, _ in result.pareto]
    scores = [s for _, s in result.pareto]
    assert peaks == sorted(peaks) and scores == sorted(scores)


def test_search_is_deterministic_and_cached(demo_q, target_data, tmp_path, monkeypatch):
    x, y = target_data
    first = tt.search(demo_q, x, y, budget="256KB", seed=3, cache_dir=str(tmp_path), **SMALL)
    calls = []
    real = search_mod._finetune_accuracy
    monkeypatch.setattr(search_mod, "_finetune_accuracy", lambda job: calls.append(job) or real(job))
    again = tt.search(demo_q, x, y, budget="256KB", seed=3, cache_dir=str(tmp_path), **SMALL)
    assert again.scheme == first.scheme and again.winner == first.winner and again.accuracy == first.accuracy
    assert again.score == first.score or (np.isnan(again.score) and np.isnan(first.score))  # NaN: bias only won
    # only the final comparison's fine-tunes (verified schemes and baselines) run again; the
    # contribution analysis comes from the cache
    assert len(calls) == len(again.verified) + len(again.baselines)
    smaller = tt.search(demo_q, x, y, budget=first.peak_bytes - 1, seed=3, cache_dir=str(tmp_path), **SMALL)
    assert smaller.peak_bytes < first.peak_bytes


def test_corrupted_cache_is_recomputed_with_a_warning(demo_q, target_data, tmp_path):
    x, y = target_data
    tt.search(demo_q, x[:40], y[:40], budget="256KB", seed=1, cache_dir=str(tmp_path), **SMALL)
    (cache,) = [p for p in os.listdir(tmp_path) if p.startswith("contrib-")]
    path = tmp_path / cache
    doc = json.loads(path.read_text())
    doc["body"]["baseline"] = 0.123  # tampered: checksum no longer matches
    path.write_text(json.dumps(doc))
    with pytest.warns(RuntimeWarning, match="ignoring contribution cache"):
        tt.search(demo_q, x[:40], y[:40], budget="256KB", seed=1, cache_dir=str(tmp_path), **SMALL)
    assert json.loads(path.read_text())["body"]["baseline"] != 0.123


def test_infeasible_budget_names_the_minimum(demo_q, target_data, tmp_path):
    x, y = target_data
    with pytest.raises(tt.MemoryBudgetError) as info:
        tt.search(demo_q, x, y, budget=1024, cache_dir=str(tmp_path), **SMALL)
    assert info.value.needed > 1024 and info.value.budget == 1024
    assert str(info.value.needed) in str(info.value)


def test_pareto_front_keeps_only_improvements():
    pts = [(100, 1.0), (50, 0.5), (200, 0.9), (150, 2.0), (150, 1.5)]
    assert search_mod._pareto(pts) == [(50, 0.5), (100, 1.0), (150, 2.0)]


def test_search_respects_max_update_bytes(demo_q, target_data, tmp_path):
    x, y = target_data
    limit = demo_q.weight_bytes() // 20  # >= 20x fewer bytes per update than the whole int8 model
    small = dict(SMALL, ratios=(0.25, 0.5, 1.0))
    result = tt.search(demo_q, x, y, budget="256KB", seed=0, cache_dir=str(tmp_path), max_update_bytes=limit, **small)
    assert 0 < result.update_bytes <= limit
    assert all(v["update_bytes"] <= limit for v in result.verified + result.baselines)
    # the whole classifier (1320 B) does not fit: the search trains a part of its input channels
    assert result.scheme.weight_ratios["fc_0"] < 1.0 and result.scheme.channel_axis["fc_0"] == "input"
    plan = tt.compile(demo_q, result.scheme, budget="256KB")
    trained = tt.read_update(tt.Trainer(plan).export_update(len(x)), plan)
    assert sum(a.nbytes for a in trained.params.values()) == result.update_bytes
    assert result.update_bytes == search_mod.update_bytes(demo_q, result.scheme)
    # the partial-classifier ratios were measured, and a limit below any update is refused
    assert set(result.contributions[-1]["weight_gain"]) == {0.25, 0.5, 1.0}
    with pytest.raises(ValueError, match="smallest update"):
        tt.search(demo_q, x, y, budget="256KB", cache_dir=str(tmp_path), max_update_bytes=100, **small)
    # without a limit the classifier trains whole, as before
    plain = tt.search(demo_q, x, y, budget="256KB", seed=0, cache_dir=str(tmp_path), **small)
    assert plain.scheme.weight_ratios["fc_0"] == 1.0 and plain.update_bytes == search_mod.update_bytes(demo_q, plain.scheme)
