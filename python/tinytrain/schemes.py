"""Sparse-update schemes: which layers' biases and which layers' weights (and what fraction of
their channels) training updates.

Layers are named as in ``q.layers`` (the conv/fc nodes, input to output); an ``int`` is accepted
as an index into that list (negative counts from the end). A partial weight update trains the
first ``round(ratio * channels)`` channels along the chosen axis: ``"output"`` (``W[:k]``, the
default) or ``"input"`` (``W[:, :k]``, ungrouped convs and fc only; only those input channels are
kept for the backward pass).
"""
from __future__ import annotations

import json
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = ["Scheme", "full", "bias_only", "last_layers", "paper_sparse"]

LayerRef = Union[str, int]


class Scheme:
    """What training updates. ``Scheme(bias_layers=[...], weight_ratios={"conv_17": 0.25},
    channel_axis={"conv_17": "input"})``."""

    def __init__(self, bias_layers: Iterable[LayerRef] = (), weight_ratios: Optional[Mapping[LayerRef, float]] = None,
                 channel_axis: Optional[Mapping[LayerRef, str]] = None, name: str = "custom") -> None:
        if isinstance(bias_layers, (str, int)):
            raise TypeError("bias_layers must be a list of layer names (or indices), not a single value")
        self.bias_layers: List[LayerRef] = list(bias_layers)
        self.weight_ratios: Dict[LayerRef, float] = dict(weight_ratios or {})
        self.channel_axis: Dict[LayerRef, str] = dict(channel_axis or {})
        self.name = name
        for k, r in self.weight_ratios.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 <= r <= 1.0:
                raise ValueError(f"weight ratio of layer {k!r} must be a number in [0, 1], got {r!r}")
        for k, a in self.channel_axis.items():
            if a not in ("output", "input"):
                raise ValueError(f"channel axis of layer {k!r} must be 'output' or 'input', got {a!r}")

    # -------------------------------------------------------------- resolution against a model
    @staticmethod
    def _resolve(layers: Sequence[str], ref: LayerRef) -> str:
        if isinstance(ref, bool):
            raise TypeError(f"not a layer: {ref!r}")
        if isinstance(ref, int):
            if not -len(layers) <= ref < len(layers):
                raise ValueError(f"layer index {ref} out of range: the model has {len(layers)} trainable layers")
            return layers[ref]
        if ref not in layers:
            raise ValueError(f"unknown layer {ref!r}; trainable layers are {list(layers)}")
        return ref

    def resolved(self, layers: Sequence[str]) -> Dict[str, Dict[str, object]]:
        """``{layer: {"bias": bool, "ratio": float, "axis": str}}`` for every layer of the model."""
        out = {name: {"bias": False, "ratio": 0.0, "axis": "output"} for name in layers}
        for ref in self.bias_layers:
            out[self._resolve(layers, ref)]["bias"] = True
        for ref, r in self.weight_ratios.items():
            out[self._resolve(layers, ref)]["ratio"] = float(r)
        for ref, a in self.channel_axis.items():
            out[self._resolve(layers, ref)]["axis"] = a
        return out

    def updated_layers(self, layers: Sequence[str]) -> List[str]:
        r = self.resolved(layers)
        return [n for n in layers if r[n]["bias"] or r[n]["ratio"] > 0]

    # -------------------------------------------------------------- serialization
    def to_dict(self) -> Dict[str, object]:
        return {"name": self.name, "bias_layers": list(self.bias_layers), "weight_ratios": dict(self.weight_ratios),
                "channel_axis": dict(self.channel_axis)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Scheme":
        if not isinstance(d, Mapping):
            raise ValueError("a scheme is a JSON object with bias_layers, weight_ratios and channel_axis")
        unknown = set(d) - {"name", "bias_layers", "weight_ratios", "channel_axis"}
        if unknown:
            raise ValueError(f"unknown scheme fields: {sorted(unknown)}")
        return cls(d.get("bias_layers", ()), d.get("weight_ratios", {}), d.get("channel_axis", {}),
                   name=str(d.get("name", "custom")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Scheme":
        with open(path, "r", encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON scheme ({e})") from None
        return cls.from_dict(d)

    def __repr__(self) -> str:
        return (f"Scheme({self.name}: biases of {len(self.bias_layers)} layers, weights of "
                f"{len(self.weight_ratios)} layers {self.weight_ratios})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scheme) and self.to_dict() == other.to_dict()


def _layers(q) -> List[str]:
    layers = getattr(q, "layers", None)
    if not layers:
        raise ValueError("the model has no trainable (conv/fc) layers")
    return list(layers)


def full(q) -> Scheme:
    """Every weight and every bias."""
    ls = _layers(q)
    return Scheme(ls, {n: 1.0 for n in ls}, name="full")


def bias_only(q) -> Scheme:
    """Every bias, no weights."""
    return Scheme(_layers(q), {}, name="bias_only")


def last_layers(q, k: int = 4) -> Scheme:
    """Weights and biases of the last ``k`` trainable layers."""
    ls = _layers(q)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(ls):
        raise ValueError(f"k must be an int in [1, {len(ls)}], got {k!r}")
    tail = ls[-k:]
    return Scheme(tail, {n: 1.0 for n in tail}, name=f"last_{k}")


# The seed paper's 100 KB scheme for MCUNet-5FPS (43 layers): biases of the last 22 layers, and
# the first pointwise conv of the blocks at these layer indices, at these channel ratios.
_PAPER_LAYERS = 43
_PAPER_BIAS = 22
_PAPER_WEIGHTS = [(21, 1.0), (24, 1.0), (27, 1.0), (30, 1.0), (36, 0.125), (39, 0.25)]


def _expand_convs(q) -> List[int]:
    """Indices (into q.layers) of the 1x1 convs that feed a depthwise conv: each block's pw1."""
    ls = _layers(q)
    idx = []
    for i, name in enumerate(ls):
        n = q.node(name)
        if n.op != "conv" or int(n.attrs.get("groups", 1)) != 1 or tuple(n.attrs.get("kernel", (1, 1))) != (1, 1):
            continue
        consumers = [m for m in q.nodes if n.output in m.inputs]
        if any(m.op == "conv" and int(m.attrs.get("groups", 1)) > 1 for m in consumers):
            idx.append(i)
    return idx


def paper_sparse(q) -> Scheme:
    """The seed paper's kind of sparse scheme, as found for MCUNet-5FPS at 100 KB: biases of the
    last 22/43 of the layers; weights of six blocks' first pointwise convs at ratios
    1, 1, 1, 1, 1/8, 1/4. On MCUNet-5FPS this is exactly the paper's scheme (layers 21, 24, 27, 30,
    36, 39); on another network the same relative depths pick the nearest such convs."""
    ls = _layers(q)
    n = len(ls)
    pw1 = _expand_convs(q)
    if not pw1:
        raise ValueError("the model has no 1x1 conv feeding a depthwise conv (no inverted-residual blocks)")
    weights: Dict[LayerRef, float] = {}
    for idx, ratio in _PAPER_WEIGHTS:
        want = idx * (n - 1) / (_PAPER_LAYERS - 1)
        free = [p for p in pw1 if ls[p] not in weights] or pw1
        best = min(free, key=lambda p: (abs(p - want), p))
        weights[ls[best]] = ratio
    nb = max(1, round(_PAPER_BIAS * n / _PAPER_LAYERS))
    return Scheme(ls[-nb:], weights, name="paper_sparse")
