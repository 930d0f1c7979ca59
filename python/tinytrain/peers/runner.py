"""Run a peer framework on the same graph and scheme, in a separate process, and read its figures."""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# Where scripts/install-peers.sh puts onnxruntime-training (it needs its own onnx and torch).
ORT_VENV_PYTHON = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                               "tinytrain", "peers", "venv-ort", "bin", "python")


@functools.lru_cache(maxsize=None)
def python_with(module: str) -> Optional[str]:
    """An interpreter on this machine that can import ``module`` (this one first, then Debian's)."""
    candidates: List[str] = [sys.executable]
    for name in ("python3", "/usr/bin/python3"):
        found = shutil.which(name)
        if found and found not in candidates:
            candidates.append(found)
    for exe in candidates:
        try:
            ok = subprocess.run([exe, "-c", f"import {module}"], capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return exe
    return None


def _float_params(graph, node):
    """Float weights of a conv/fc node: the int8 ones dequantized (they are what the device runs
    and trains), or a float graph's own."""
    if "weight_q" not in node.params:
        return node.params["weight"].astype(np.float32), node.params["bias"].astype(np.float32)
    w = node.params["weight_q"].astype(np.float32)
    ws = node.params["weight_scale"].astype(np.float32)
    w = w * ws.reshape((-1,) + (1,) * (w.ndim - 1))
    s_in = graph.tensors[node.inputs[0]].scale
    b = node.params["bias_q"].astype(np.float32) * (ws * s_in)
    return w, b


def graph_npz(graph, path: str, updated_weights: List[str], updated_biases: List[str]) -> None:
    nodes, arrays = [], {}
    for node in graph.nodes:
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in node.attrs.items()}
        nodes.append({"name": node.name, "op": node.op, "inputs": list(node.inputs), "output": node.output, "attrs": attrs})
        if node.op in ("conv", "fc"):
            w, b = _float_params(graph, node)
            if node.op == "fc" and w.ndim == 2:
                src = graph.tensors[node.inputs[0]].shape
                if src[1] * src[2] > 1:
                    # tinytrain reads fc inputs in (H, W, C) order; torch flattens (C, H, W).
                    w = w.reshape(w.shape[0], src[1], src[2], src[0]).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
            arrays[node.name + ".weight"] = w
            arrays[node.name + ".bias"] = b
    spec = {
        "input": graph.input,
        "output": graph.output,
        "input_shape": list(graph.tensors[graph.input].shape),
        "num_classes": int(graph.tensors[graph.output].numel),
        "nodes": nodes,
        "updated": list(updated_weights),
        "bias_updated": list(updated_biases),
    }
    np.savez(path, spec=json.dumps(spec), **arrays)


def _failure(res: subprocess.CompletedProcess) -> Optional[str]:
    if res.returncode == 0:
        return None
    return (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]


def _subprocess(exe: str, args: List[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=900)


def _run_peer(exe: str, args: List[str], framework: str) -> Dict[str, object]:
    res = _subprocess(exe, args)
    failed = _failure(res)
    if failed:
        return {"framework": framework, "skipped": f"peer failed: {failed}"}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["python"] = exe
    return out


def torch_step(graph, mode: str, updated_weights=(), updated_biases=(), steps: int = 5) -> Dict[str, object]:
    """Peak RSS over the post-import RSS and median step time of PyTorch on this training.

    ``mode`` is "full" or "sparse"; sparse sets requires_grad on the updated layers only (PyTorch
    cannot update a fraction of a tensor's channels, so partially updated layers count in full).
    """
    exe = python_with("torch")
    if exe is None:
        return {"framework": "PyTorch", "skipped": "torch is not installed (bash scripts/install-peers.sh)"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.npz")
        graph_npz(graph, path, list(updated_weights), list(updated_biases))
        return _run_peer(exe, [os.path.join(HERE, "torch_step.py"), path, mode, str(steps)], "PyTorch")


def ort_training_step(graph, mode: str, updated_weights=(), updated_biases=(), steps: int = 5) -> Dict[str, object]:
    """The same for onnxruntime-training (artifacts with the frozen parameters as frozen_params).

    Its artifact generation needs torch in the same interpreter (``TINYTRAIN_ORT_PYTHON`` names
    one, e.g. a venv with onnxruntime-training-cpu 1.19.2, onnx 1.17 and torch)."""
    exe = os.environ.get("TINYTRAIN_ORT_PYTHON") or python_with("onnxruntime.training.artifacts")
    if exe is None and os.path.exists(ORT_VENV_PYTHON):
        exe = ORT_VENV_PYTHON
    if exe is None:
        return {"framework": "onnxruntime-training",
                "skipped": "onnxruntime-training is not installed (bash scripts/install-peers.sh)"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.npz")
        graph_npz(graph, path, list(updated_weights), list(updated_biases))
        script = os.path.join(HERE, "ort_step.py")
        failed = _failure(_subprocess(exe, [script, "generate", path, mode, tmp]))
        if failed:
            return {"framework": "onnxruntime-training", "skipped": f"artifact generation failed: {failed}"}
        c, h, w = graph.tensors[graph.input].shape
        classes = graph.tensors[graph.output].numel
        return _run_peer(exe, [script, "measure", tmp, str(c), str(h), str(w), str(classes), str(steps)],
                         "onnxruntime-training")
