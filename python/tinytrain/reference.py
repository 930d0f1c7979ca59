"""Float32 numpy reference of the IR ops: forward, backward and plain SGD.

This is the float oracle of tinytrain: calibration runs it, the demo model is pretrained with it,
and it is the fp32 full-update baseline the int8 trainer is compared with. It favours clarity over
speed but is vectorized (convolution is im2col + einsum), so small CNNs train in seconds.

Layout: activations are NCHW float32 batches. Parameters are the float ``weight`` / ``bias`` of
conv/fc nodes (conv weight (O, I/groups, kh, kw), fc weight (O, I)). The IR reads a tensor with
spatial size > 1x1 flattened in (H, W, C) order (``flatten``, and ``fc`` on a feature map).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from .graph import Graph, Node

__all__ = ["forward", "backward", "sgd_step", "softmax_cross_entropy", "train", "Cache"]


@dataclass
class Cache:
    """Every tensor of one forward pass (by name), for backward."""

    values: Dict[str, np.ndarray] = field(default_factory=dict)


def _act(y: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(y, 0.0)
    if act == "relu6":
        return np.clip(y, 0.0, 6.0)
    return y


def _act_grad(gy: np.ndarray, y: np.ndarray, act: str) -> np.ndarray:
    """Gradient through the activation, from its output (as the int8 engine derives its mask)."""
    if act == "relu":
        return gy * (y > 0)
    if act == "relu6":
        return gy * ((y > 0) & (y < 6))
    return gy


def _windows(x: np.ndarray, kernel: Tuple[int, int], stride: Tuple[int, int], pads, fill: float = 0.0):
    """(N, C, H, W) -> view (N, C, OH, OW, kh, kw) of the padded input."""
    t, l, b, r = pads
    if any(pads):
        x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=fill)
    kh, kw = kernel
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return win[:, :, :: stride[0], :: stride[1]]


def _unwindow(gwin: np.ndarray, x_shape, kernel, stride, pads) -> np.ndarray:
    """Adjoint of `_windows`: scatter-add window gradients (N, C, OH, OW, kh, kw) into the input."""
    n, c, h, w = x_shape
    t, l, b, r = pads
    kh, kw = kernel
    sh, sw = stride
    oh, ow = gwin.shape[2], gwin.shape[3]
    gx = np.zeros((n, c, h + t + b, w + l + r), np.float32)
    for i in range(kh):
        for j in range(kw):
            gx[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] += gwin[:, :, :, :, i, j]
    return gx[:, :, t : t + h, l : l + w]


def _conv(x: np.ndarray, node: Node) -> np.ndarray:
    w, b = node.params["weight"], node.params["bias"]
    g = node.attrs["groups"]
    win = _windows(x, node.attrs["kernel"], node.attrs["stride"], node.attrs["pads"])
    n, c, oh, ow, kh, kw = win.shape
    o = w.shape[0]
    win = win.reshape(n, g, c // g, oh, ow, kh, kw)
    wg = w.reshape(g, o // g, c // g, kh, kw)
    y = np.einsum("ngcpqij,gocij->ngopq", win, wg, optimize=True).reshape(n, o, oh, ow)
    return y + b[None, :, None, None]


def _conv_backward(gy: np.ndarray, x: np.ndarray, node: Node, need_input: bool):
    w = node.params["weight"]
    g = node.attrs["groups"]
    kernel, stride, pads = node.attrs["kernel"], node.attrs["stride"], node.attrs["pads"]
    win = _windows(x, kernel, stride, pads)
    n, c, oh, ow, kh, kw = win.shape
    o = w.shape[0]
    win = win.reshape(n, g, c // g, oh, ow, kh, kw)
    gyg = gy.reshape(n, g, o // g, oh, ow)
    gw = np.einsum("ngopq,ngcpqij->gocij", gyg, win, optimize=True).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3))
    gx = None
    if need_input:
        wg = w.reshape(g, o // g, c // g, kh, kw)
        gwin = np.einsum("ngopq,gocij->ngcpqij", gyg, wg, optimize=True).reshape(n, c, oh, ow, kh, kw)
        gx = _unwindow(gwin, x.shape, kernel, stride, pads)
    return gx, gw.astype(np.float32), gb.astype(np.float32)


def _hwc_flat(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1)


def _hwc_unflat(g: np.ndarray, shape) -> np.ndarray:
    n, c, h, w = shape
    return g.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def _avgpool_count(shape, kernel, stride, pads) -> np.ndarray:
    """Valid (non-padding) elements per window: padding is excluded from the average."""
    ones = np.ones((1, 1) + tuple(shape[2:]), np.float32)
    return _windows(ones, kernel, stride, pads).sum(axis=(4, 5))


def _forward_node(node: Node, ins) -> np.ndarray:
    op, a = node.op, node.attrs
    if op == "conv":
        return _act(_conv(ins[0], node), a.get("act", "none")).astype(np.float32)
    if op == "fc":
        y = _hwc_flat(ins[0]) @ node.params["weight"].T + node.params["bias"]
        return _act(y, a.get("act", "none")).astype(np.float32)[:, :, None, None]
    if op == "add":
        return _act(ins[0] + ins[1], a.get("act", "none"))
    if op == "global_avgpool":
        return ins[0].mean(axis=(2, 3), keepdims=True)
    if op == "avgpool":
        s = _windows(ins[0], a["kernel"], a["stride"], a["pads"]).sum(axis=(4, 5))
        return (s / _avgpool_count(ins[0].shape, a["kernel"], a["stride"], a["pads"])).astype(np.float32)
    if op == "maxpool":
        return _windows(ins[0], a["kernel"], a["stride"], a["pads"], fill=-np.inf).max(axis=(4, 5))
    if op == "flatten":
        return _hwc_flat(ins[0])[:, :, None, None]
    raise ValueError(f"reference: unknown op {op!r} in node {node.name!r}")


def forward(g: Graph, x: np.ndarray, cache: Optional[Cache] = None) -> np.ndarray:
    """Run the float graph on an NCHW batch; returns the output as (N, C) when it is 1x1 spatially,
    else (N, C, H, W). Pass a `Cache` to keep every tensor for `backward`."""
    x = np.asarray(x, np.float32)
    c, h, w = g.tensors[g.input].shape
    if x.ndim != 4 or x.shape[1:] != (c, h, w):
        raise ValueError(f"input must be (N, {c}, {h}, {w}) float32, got {x.shape}")
    vals = {g.input: x}
    for node in g.nodes:
        vals[node.output] = _forward_node(node, [vals[i] for i in node.inputs])
    if cache is not None:
        cache.values = vals
    y = vals[g.output]
    return y[:, :, 0, 0] if y.shape[2:] == (1, 1) else y


def backward(g: Graph, cache: Cache, grad_out: np.ndarray, params=None, need_input: bool = False):
    """Back-propagate `grad_out` (same shape as `forward`'s result) through the graph.

    Returns (grads, grad_input): grads maps node name -> {"weight": ..., "bias": ...} for the
    conv/fc nodes in `params` (all trainable nodes when None); back-propagation stops at the earliest
    node that needs it, unless `need_input`."""
    vals = cache.values
    wanted = set(g.layers if params is None else params)
    order = [n.name for n in g.nodes]
    first = min((order.index(p) for p in wanted), default=len(order)) if not need_input else 0
    grads_t: Dict[str, np.ndarray] = {g.output: np.asarray(grad_out, np.float32).reshape(vals[g.output].shape)}
    grads: Dict[str, Dict[str, np.ndarray]] = {}
    for idx in range(len(g.nodes) - 1, first - 1, -1):
        node = g.nodes[idx]
        gy = grads_t.pop(node.output, None)
        if gy is None:
            continue
        y, ins = vals[node.output], [vals[i] for i in node.inputs]
        a = node.attrs
        gy = _act_grad(gy, y, a.get("act", "none"))
        need_in = need_input or idx > first
        gins = []
        if node.op == "conv":
            gx, gw, gb = _conv_backward(gy, ins[0], node, need_in)
            gins = [gx]
        elif node.op == "fc":
            gy2 = gy[:, :, 0, 0]
            gw = gy2.T @ _hwc_flat(ins[0])
            gb = gy2.sum(axis=0)
            gins = [_hwc_unflat(gy2 @ node.params["weight"], ins[0].shape) if need_in else None]
        elif node.op == "add":
            gins = [gy, gy]
        elif node.op == "global_avgpool":
            n, c, h, w = ins[0].shape
            gins = [np.broadcast_to(gy / (h * w), ins[0].shape).astype(np.float32)]
        elif node.op == "avgpool":
            cnt = _avgpool_count(ins[0].shape, a["kernel"], a["stride"], a["pads"])
            gwin = np.broadcast_to((gy / cnt)[..., None, None], gy.shape + tuple(a["kernel"]))
            gins = [_unwindow(gwin, ins[0].shape, a["kernel"], a["stride"], a["pads"])]
        elif node.op == "maxpool":
            win = _windows(ins[0], a["kernel"], a["stride"], a["pads"], fill=-np.inf)
            kh, kw = a["kernel"]
            flat = win.reshape(win.shape[:4] + (kh * kw,))
            mask = np.zeros_like(flat, dtype=np.float32)
            np.put_along_axis(mask, flat.argmax(axis=-1)[..., None], 1.0, axis=-1)
            gwin = (mask * gy[..., None]).reshape(win.shape)
            gins = [_unwindow(gwin, ins[0].shape, a["kernel"], a["stride"], a["pads"])]
        elif node.op == "flatten":
            gins = [_hwc_unflat(gy[:, :, 0, 0], ins[0].shape)]
        if node.trainable and node.name in wanted:
            grads[node.name] = {"weight": gw.astype(np.float32), "bias": gb.astype(np.float32)}
        for name, gi in zip(node.inputs, gins):
            if gi is None:
                continue
            grads_t[name] = grads_t[name] + gi if name in grads_t else gi
    return grads, grads_t.get(g.input)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient w.r.t. the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = float(-np.log(p[np.arange(n), labels] + 1e-12).mean())
    p[np.arange(n), labels] -= 1.0
    return loss, (p / n).astype(np.float32)


def sgd_step(g: Graph, grads, lr: float, momentum: float = 0.0, state: Optional[dict] = None,
             weight_decay: float = 0.0) -> None:
    """In-place plain SGD (momentum optional; pass the same `state` dict across steps)."""
    for name, gr in grads.items():
        node = g.node(name)
        for k in ("weight", "bias"):
            d = gr[k] + (weight_decay * node.params[k] if k == "weight" else 0.0)
            if momentum:
                buf = state.setdefault((name, k), np.zeros_like(d))
                buf *= momentum
                buf += d
                d = buf
            node.params[k] = (node.params[k] - lr * d).astype(np.float32)


def train(g: Graph, x: np.ndarray, y: np.ndarray, epochs: int = 10, lr: float = 0.05, batch: int = 32,
          momentum: float = 0.9, weight_decay: float = 0.0, params=None, seed: int = 0, log=None) -> float:
    """Full-update (or `params`-only) float training with softmax cross-entropy. Returns the last
    epoch's mean loss."""
    rng = np.random.default_rng(seed)
    state: dict = {}
    loss_sum = 0.0
    for ep in range(epochs):
        order = rng.permutation(len(x))
        loss_sum, steps = 0.0, 0
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            cache = Cache()
            logits = forward(g, x[idx], cache)
            loss, gl = softmax_cross_entropy(logits, y[idx])
            grads, _ = backward(g, cache, gl, params=params)
            sgd_step(g, grads, lr, momentum, state, weight_decay)
            loss_sum += loss
            steps += 1
        loss_sum /= max(steps, 1)
        if log is not None:
            log(ep, loss_sum)
    return loss_sum
