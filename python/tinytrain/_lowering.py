"""The quantized graph and the compile settings in tt-core's form: one `CompileRequest` that
`tinytrain._core.engine_compile` reads attribute by attribute. Tensor ids replace names, conv
weights go channels-last (OHWI), and every setting travels by its name (``"stochastic"``,
``"relu6"``), parsed once by tt-core, which refuses a name it does not know."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    from .model import QuantizedModel


@dataclass(frozen=True)
class Tensor:
    """An activation tensor (channels, height, width) and its int8 quantization."""

    c: int
    h: int
    w: int
    scale: float
    zero_point: int


@dataclass(frozen=True)
class Window:
    """A conv's or pool's kernel, stride and padding (top, left, bottom, right)."""

    kh: int
    kw: int
    sh: int
    sw: int
    pt: int
    pl: int
    pb: int
    pr: int


@dataclass(frozen=True)
class LayerUpdate:
    """What a scheme trains of one node: its bias, the first ``weight_ratio`` of its weight
    channels along ``axis`` ("output" or "input")."""

    bias: bool = False
    weight_ratio: float = 0.0
    axis: str = "output"


@dataclass(frozen=True)
class Node:
    """One op: tensor ids, window, activation by name; conv and fc carry OHWI int8 weights, int32
    bias and per-channel weight scales."""

    name: str
    op: str
    inputs: List[int]
    output: int
    window: Optional[Window]
    groups: int
    act: str
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    weight_scale: Optional[np.ndarray]
    update: LayerUpdate


@dataclass(frozen=True)
class Layout:
    """A fixed execution layout: a patch stage ``(last node index, grid)`` or None, and which ops
    run in place."""

    patch: Optional[Tuple[int, int]]
    in_place: bool
    shrink_in_place: bool


@dataclass(frozen=True)
class CompileRequest:
    """Everything `tt.compile` asks of tt-core."""

    tensors: List[Tensor]
    nodes: List[Node]
    input: int
    output: int
    rounding: str
    reorder: bool
    update_precision: str
    loss: str
    momentum_buffers: bool
    accumulate: bool
    seed: int
    lr: float
    momentum: float
    meta: bytes
    layout: Optional[Layout]
    stream_input: bool
    optimize: str
    budget: Optional[int]


def _window(n) -> Optional[Window]:
    a = n.attrs
    if n.op == "conv":
        kh, kw = n.params["weight_q"].shape[2:]
    elif n.op in ("avgpool", "maxpool"):
        kh, kw = a["kernel"]
    else:
        return None
    sh, sw = a.get("stride", (1, 1))
    pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
    return Window(int(kh), int(kw), int(sh), int(sw), int(pt), int(pl), int(pb), int(pr))


def lower(q: "QuantizedModel", updates: Optional[Mapping[str, LayerUpdate]] = None
          ) -> Tuple[List[Tensor], List[Node], Dict[str, int]]:
    """The tensors and nodes of ``q`` in tt-core's form, and the tensor ids by name. ``updates``
    gives what each node trains (nothing when absent)."""
    updates = updates or {}
    ids = {k: i for i, k in enumerate(q.tensors)}
    tensors = []
    for k, t in q.tensors.items():
        if t.scale is None or t.zero_point is None:
            raise ValueError(f"tensor {k!r} has no quantization parameters: compile a QuantizedModel (tt.quantize)")
        c, h, w = t.shape
        tensors.append(Tensor(int(c), int(h), int(w), float(t.scale), int(t.zero_point)))
    nodes = []
    for n in q.nodes:
        w = b = s = None
        if n.trainable:
            wq = np.asarray(n.params["weight_q"], dtype=np.int8)
            if n.op == "conv":
                wq = wq.transpose(0, 2, 3, 1)  # OIHW (ONNX) -> OHWI (tt-core)
            w = np.ascontiguousarray(wq.reshape(-1))
            b = np.ascontiguousarray(n.params["bias_q"], dtype=np.int32).reshape(-1)
            s = np.ascontiguousarray(n.params["weight_scale"], dtype=np.float32).reshape(-1)
        nodes.append(Node(n.name, n.op, [ids[i] for i in n.inputs], ids[n.output], _window(n),
                          int(n.attrs.get("groups", 1)), str(n.attrs.get("act") or "none"), w, b, s,
                          updates.get(n.name, LayerUpdate())))
    return tensors, nodes, ids
