"""The one graph every front end lowers into, and every later stage reads.

A graph describes ONE sample (batch is handled by callers). Tensor shapes are (C, H, W) in the
Python API; tt-core stores activations channels-last (H, W, C), and the lowering to tt-core
does that transposition once, so nothing here depends on it.

Op vocabulary (``Node.op``) and attributes:

``conv``            attrs: kernel=(kh, kw), stride=(sh, sw), pads=(top, left, bottom, right),
                    groups=int, act="none"|"relu"|"relu6".
                    float params: weight (O, I/groups, kh, kw) float32, bias (O,) float32.
``fc``              attrs: act. Input is any tensor, read flattened in (H, W, C) order when its
                    spatial size is > 1x1 (importers permute the columns once at import).
                    float params: weight (O, I) float32, bias (O,) float32.
``add``             two inputs, attrs: act.
``global_avgpool``  (C, H, W) -> (C, 1, 1).
``avgpool``         attrs: kernel, stride, pads. Padding is excluded from the average; int8: the
                    output shares the input's scale and zero point (as maxpool and flatten do).
``maxpool``         attrs: kernel, stride, pads.
``flatten``         (C, H, W) -> (C*H*W, 1, 1); a view, no data movement in (H, W, C) order.

A quantized graph (``QuantizedModel``) additionally has, on every tensor, ``scale`` and
``zero_point`` (int8 asymmetric per tensor), and on conv/fc nodes the params
``weight_q`` int8 (same shape as weight), ``weight_scale`` float32 (O,) symmetric per output
channel, and ``bias_q`` int32 (O,) with bias scale = input scale * weight_scale.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

OPS = ("conv", "fc", "add", "global_avgpool", "avgpool", "maxpool", "flatten")
ACTIVATIONS = ("none", "relu", "relu6")
TRAINABLE_OPS = ("conv", "fc")


@dataclass
class Tensor:
    name: str
    shape: Tuple[int, int, int]
    scale: Optional[float] = None
    zero_point: Optional[int] = None

    @property
    def numel(self) -> int:
        c, h, w = self.shape
        return c * h * w


@dataclass
class Node:
    name: str
    op: str
    inputs: List[str]
    output: str
    attrs: Dict[str, object] = field(default_factory=dict)
    params: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return self.op in TRAINABLE_OPS


@dataclass
class Graph:
    """A float (or already quantized) graph in topological order."""

    input: str
    output: str
    tensors: Dict[str, Tensor]
    nodes: List[Node]
    #: The source model ended in Softmax/LogSoftmax: kept for inference, skipped for training.
    softmax_tail: bool = False

    @property
    def layers(self) -> List[str]:
        """Names of the trainable layers (conv/fc), input to output."""
        return [n.name for n in self.nodes if n.trainable]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}; layers are {self.layers}")

    def to_onnx(self, path: Optional[str] = None):
        """Export the float graph as a float ONNX model (NCHW input "input", output "logits"), e.g.
        for onnxruntime's quantizer. Writes `path` atomically when given; returns the ModelProto.
        (A `QuantizedModel` overrides this with its int8 QDQ export.)"""
        from .export_onnx import export_float

        return export_float(self, path)

    def producer(self, tensor: str) -> Optional[Node]:
        for n in self.nodes:
            if n.output == tensor:
                return n
        return None


# ---------------------------------------------------------------------- names from the file
# Suffixes converters add to a TensorFlow weight's name (tf2onnx: "_dequant", "__12"; onnxruntime's
# quantizer: "_quantized"; a tensor reference: ":0").
_CONVERTER_SUFFIX = re.compile(r"(_dequant|_quantized|_prequant|_transposed|:0|__\d+)+$")
# The TensorFlow op a weight belongs to: the last element of its name, dropped to keep the layer.
_WEIGHT_OPS = re.compile(r"^(Conv2D|depthwise|MatMul|Tensordot|BiasAdd|FusedBatchNormV3|kernel|weights?)(_\d+)?$")


def _tf_scope(tensor: str) -> Optional[str]:
    """The Keras layer scope of a TensorFlow weight tensor ("resnet8/conv2d_5/Conv2D" ->
    "resnet8/conv2d_5"); a fused name ("bn/FusedBatchNormV3;dw/depthwise") gives the conv's own
    part. None when the name is not TensorFlow-scoped."""
    parts = [_CONVERTER_SUFFIX.sub("", p) for p in tensor.split(";") if "/" in p]
    if not parts:
        return None
    # the converter joins the names of every layer sharing one constant; the first is the layer's own
    own = [p for p in parts if p.rsplit("/", 1)[1] in ("Conv2D", "depthwise", "MatMul")]
    p = own[0] if own else parts[-1]
    return p.rsplit("/", 1)[0] if _WEIGHT_OPS.match(p.rsplit("/", 1)[1]) else p


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def name_layers(nodes: List[Node], weight_tensors: Dict[int, str]) -> List[Node]:
    """Name and order an importer's nodes the same way whichever tool wrote the file.

    When every trainable layer's weight tensor has a TensorFlow-scoped name (TFLite files, tf2onnx
    and quantizers run on them), a layer is named after its Keras layer ("conv2d_5", the model's
    own prefix shared by all layers removed) and the nodes are put in one topological order that
    prefers, among nodes ready at the same time, the layer defined first: the same network from
    `.tflite` and from tf2onnx gets the same names in the same order, so `last_layers` and saved
    schemes move between them. Otherwise (or if two layers would share a name) the file's order is
    kept. Non-trainable nodes, and every node of other files, are named ``{op}_{k}`` in order.
    `weight_tensors` maps ``id(node)`` of each trainable node to its weight tensor's name."""
    scopes = {id(n): _tf_scope(weight_tensors.get(id(n), "")) for n in nodes if n.trainable}
    use_file = bool(scopes) and all(scopes.values()) and len(set(scopes.values())) == len(scopes)
    if use_file:
        split = [s.split("/") for s in scopes.values()]
        common = 0
        while all(len(s) > common + 1 for s in split) and len({tuple(s[: common + 1]) for s in split}) == 1:
            common += 1
        names = {k: "/".join(s.split("/")[common:]) for k, s in scopes.items()}
        nodes = _topological(nodes, lambda n: _natural(names.get(id(n), "")))
    for file_names in ((True, False) if use_file else (False,)):
        counts: Dict[str, int] = {}
        for n in nodes:
            k = counts.get(n.op, 0)
            counts[n.op] = k + 1
            n.name = names[id(n)] if file_names and n.trainable else f"{n.op}_{k}"
        if len({n.name for n in nodes}) == len(nodes):  # a Keras layer called e.g. "add_1" would clash
            break
    return nodes


def _topological(nodes: List[Node], key) -> List[Node]:
    """Kahn's order of `nodes`, the smallest `key` first among the ready ones (file order breaks
    remaining ties)."""
    made = {n.output: n for n in nodes}
    waiting = {id(n): len({i for i in n.inputs if i in made}) for n in nodes}
    users: Dict[str, List[Node]] = {}
    for n in nodes:
        for i in set(n.inputs):
            users.setdefault(i, []).append(n)
    pos = {id(n): k for k, n in enumerate(nodes)}
    ready = [(key(n), pos[id(n)], n) for n in nodes if waiting[id(n)] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, _, n = heapq.heappop(ready)
        out.append(n)
        for u in users.get(n.output, []):
            waiting[id(u)] -= 1
            if waiting[id(u)] == 0:
                heapq.heappush(ready, (key(u), pos[id(u)], u))
    return out if len(out) == len(nodes) else nodes
