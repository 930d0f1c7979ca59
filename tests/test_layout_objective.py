"""`tt.compile(..., optimize="compute")`: spare SRAM traded for fewer executed MACs. The layout
(patch stage, in-place ops) is a planner choice: it must fit the budget, never execute more MACs
than the smallest-peak layout, and train the very same numbers."""
import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest

import tinytrain as tt
from tinytrain.model import layer_stats


@pytest.fixture(scope="module")
def mbv2():
    x = np.random.default_rng(0).uniform(0, 1, size=(2, 3, 64, 64)).astype(np.float32)
    model = tt.models.mobilenetv2(width=0.35, resolution=64, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = tt.quantize(tt.load_onnx(model), x)
    return model, q, tt.schemes.paper_sparse(q), x


def _train(plan, x):
    tr = tt.Trainer(plan)
    logits = tr._s.forward(tr._inputs(x[:1]))
    losses = [tr.step(x[:1], [3]) for _ in range(3)]
    return logits, np.array(losses), tr.high_water_bytes


def test_compute_layout_fits_the_budget_with_fewer_macs_and_same_numbers(mbv2):
    _, q, s, x = mbv2
    small = tt.compile(q, s)
    mem = small.memory
    assert mem.model_macs == sum(int(r["macs"]) for r in layer_stats(q))
    # The smallest peak runs the high-resolution first convs patch by patch: halos recomputed.
    assert mem.extra["layout"]["patch"] is not None
    assert mem.executed_macs > mem.model_macs
    base = _train(small, x)
    chosen = []
    for budget in (mem.peak_bytes, int(1.4 * mem.peak_bytes), 2 * mem.peak_bytes, None):
        p = tt.compile(q, s, budget=budget, optimize="compute")
        if budget is not None:
            assert p.memory.peak_bytes <= budget
        assert p.memory.model_macs == mem.model_macs
        assert p.memory.executed_macs <= mem.executed_macs
        logits, losses, high_water = _train(p, x)
        assert np.array_equal(logits, base[0])
        assert np.array_equal(losses, base[1])
        assert high_water == p.memory.peak_bytes
        chosen.append((p.memory.peak_bytes, p.memory.executed_macs))
    # More SRAM never buys more work, and the loosest budgets buy strictly less.
    assert [c[1] for c in chosen] == sorted((c[1] for c in chosen), reverse=True)
    assert chosen[-1][1] < mem.executed_macs and chosen[-1][0] > mem.peak_bytes
    # Without a patch stage nothing is recomputed.
    whole = tt.compile(q, s, patch=None, in_place=True)
    assert whole.memory.executed_macs == whole.memory.model_macs == chosen[-1][1]


def test_compute_objective_errors_and_report(mbv2):
    _, q, s, _ = mbv2
    small = tt.compile(q, s)
    with pytest.raises(ValueError, match="optimize"):
        tt.compile(q, s, optimize="speed")
    with pytest.raises(ValueError, match="fix the layout"):
        tt.compile(q, s, optimize="compute", patch=None)
    # Nothing fits: the error names the smallest peak the search found.
    with pytest.raises(tt.MemoryBudgetError) as e:
        tt.compile(q, s, budget=4096, optimize="compute")
    assert 4096 < e.value.needed <= small.memory.peak_bytes
    table = small.memory.table()
    assert "forward MACs" in table and "recomputed patch halos" in table
    d = small.memory.to_dict()["layout"]
    assert d["executed_macs"] - d["model_macs"] == small.memory.executed_macs - small.memory.model_macs > 0


def test_cli_optimize_compute(mbv2, tmp_path):
    model, q, s, _ = mbv2
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    budget = int(1.5 * tt.compile(q, s).memory.peak_bytes)

    def memory(*extra):
        res = subprocess.run([sys.executable, "-m", "tinytrain.cli", "memory", path, "--json", *extra],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    small = memory("--budget", str(budget))
    fast = memory("--budget", str(budget), "--optimize", "compute")
    assert small["peak_bytes"] < fast["peak_bytes"] <= budget
    assert fast["layout"]["executed_macs"] < small["layout"]["executed_macs"]
