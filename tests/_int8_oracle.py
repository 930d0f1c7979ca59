"""A node-by-node int8 forward through tt-core's kernel bindings (the test build's ``kernels``
feature): the per-layer oracle the importer tests compare a reference runtime's own tensors with.
`QuantizedModel.forward` runs whole plans through the executor instead."""
from typing import Dict, List

import numpy as np
import pytest

from tinytrain import _core

#: Marks a test that calls the kernel bindings: scripts/test.sh builds them, a plain install skips.
requires_kernels = pytest.mark.skipif(
    not hasattr(_core, "conv2d_forward"),
    reason="needs the test build's kernel bindings: pip install -e . --config-settings=build-args=--features=kernels")


def run_node(q, n, ins: List[np.ndarray]) -> np.ndarray:
    """Node ``n`` of QuantizedModel ``q`` on int8 NHWC inputs ``ins``."""
    t_out = q.tensors[n.output]
    t_in = q.tensors[n.inputs[0]]
    a = n.attrs
    if n.op in ("conv", "fc", "add"):
        lo, hi = _core.activation_range(a.get("act", "none"), float(t_out.scale), int(t_out.zero_point))
    if n.op in ("conv", "fc"):
        # tt-core's scales are f32, as the plan stores them
        s_in, s_out = np.float64(np.float32(t_in.scale)), np.float64(np.float32(t_out.scale))
        req = s_in * n.params["weight_scale"].astype(np.float32).astype(np.float64) / s_out
        bias = np.ascontiguousarray(n.params["bias_q"], dtype=np.int32)
        if n.op == "conv":
            w = np.ascontiguousarray(n.params["weight_q"].transpose(0, 2, 3, 1), dtype=np.int8)
            return _core.conv2d_forward(ins[0], w, bias, tuple(a["stride"]), tuple(a["pads"]), int(a["groups"]),
                                        int(t_in.zero_point), int(t_out.zero_point), req, lo, hi, q.rounding)
        xin = np.ascontiguousarray(ins[0].reshape(ins[0].shape[0], -1))
        w = np.ascontiguousarray(n.params["weight_q"], dtype=np.int8)
        y = _core.fc_forward(xin, w, bias, int(t_in.zero_point), int(t_out.zero_point), req, lo, hi, q.rounding)
        return y.reshape(y.shape[0], 1, 1, -1)
    if n.op == "add":
        tb = q.tensors[n.inputs[1]]
        return _core.add_forward(ins[0], float(t_in.scale), int(t_in.zero_point), ins[1], float(tb.scale),
                                 int(tb.zero_point), float(t_out.scale), int(t_out.zero_point), lo, hi, q.rounding)
    if n.op == "global_avgpool":
        y = _core.global_avgpool_forward(ins[0], float(t_in.scale), int(t_in.zero_point), float(t_out.scale),
                                         int(t_out.zero_point), q.rounding)
        return y.reshape(y.shape[0], 1, 1, -1)
    if n.op == "avgpool":
        return _core.avgpool_forward(ins[0], tuple(a["kernel"]), tuple(a["stride"]), tuple(a["pads"]))
    if n.op == "maxpool":
        return _core.maxpool_forward(ins[0], tuple(a["kernel"]), tuple(a["stride"]), tuple(a["pads"]))
    if n.op == "flatten":
        return ins[0].reshape(ins[0].shape[0], 1, 1, -1)
    raise ValueError(f"node {n.name!r}: op {n.op!r} has no int8 kernel")


def tensors(q, x: np.ndarray) -> Dict[str, np.ndarray]:
    """The whole graph node by node: every tensor's int8 NHWC array, by tensor name."""
    vals = {q.input: q.quantize_input(x)}
    for n in q.nodes:
        vals[n.output] = run_node(q, n, [vals[i] for i in n.inputs])
    return vals


def forward(q, x: np.ndarray) -> np.ndarray:
    """The whole graph node by node: the output's int8 NHWC array."""
    return tensors(q, x)[q.output]
