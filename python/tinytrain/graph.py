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
