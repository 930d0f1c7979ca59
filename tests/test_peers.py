"""The peers run the same network as tinytrain: the PyTorch module built from a graph spec
computes what the float reference computes on the same (dequantized) weights."""
import json
import os
import subprocess

import numpy as np
import pytest

import tinytrain as tt
from tinytrain import reference
from tinytrain.peers import runner


def test_torch_module_matches_the_float_reference(tmp_path):
    exe = runner.python_with("torch")
    if exe is None:
        pytest.skip("no interpreter with torch on this machine")
    g = tt.load_onnx(tt.models.demo())
    x = tt.datasets.digits("target", "test")[0][:8]
    q = tt.quantize(g, x)
    path = str(tmp_path / "graph.npz")
    runner.graph_npz(q, path, updated_weights=["fc_0"], updated_biases=["fc_0"])
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, json, numpy as np, torch; sys.path.insert(0, sys.argv[1]);"
        "from torch_graph import GraphModule; m = GraphModule(sys.argv[2], 'sparse');"
        "y = m(torch.tensor(np.load(sys.argv[3]))).detach().numpy();"
        "print(json.dumps({'y': y.tolist(), 'updated': m.updated}))"
    )
    res = subprocess.run([exe, "-c", code, runner.HERE, path, str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    expected = reference.forward(q.dequantized(), x)
    np.testing.assert_allclose(np.array(out["y"]), expected, rtol=1e-4, atol=1e-4)
    assert out["updated"] == ["fc_0_weight", "fc_0_bias"]
