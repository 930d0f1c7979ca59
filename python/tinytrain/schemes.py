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

from .errors import SchemeError

__all__ = ["Scheme", "full", "bias_only", "last_layers", "paper_sparse", "auto", "applicable"]

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
        #: Why this scheme was chosen (set by `auto`; not part of the scheme's JSON).
        self.why = ""
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
        raise SchemeError("the paper's scheme does not apply to this model: it has no 1x1 conv feeding a depthwise "
                          "conv (no inverted-residual blocks); schemes that apply: "
                          + ", ".join(_ranges(applicable(q))))
    weights: Dict[LayerRef, float] = {}
    for idx, ratio in _PAPER_WEIGHTS:
        want = idx * (n - 1) / (_PAPER_LAYERS - 1)
        free = [p for p in pw1 if ls[p] not in weights] or pw1
        best = min(free, key=lambda p: (abs(p - want), p))
        weights[ls[best]] = ratio
    nb = max(1, round(_PAPER_BIAS * n / _PAPER_LAYERS))
    return Scheme(ls[-nb:], weights, name="paper_sparse")


# ---------------------------------------------------------------------- any model
#: The budget `auto` chooses under when none is given: the SRAM tinytrain targets.
DEFAULT_BUDGET = "256KB"


def _peak(q, scheme: Scheme, **compile_kwargs) -> Optional[int]:
    """The planner's exact peak of training ``scheme``, or None when the engine cannot train it
    (e.g. back-propagation through an op it has no gradient for)."""
    from .engine import compile as compile_plan

    try:
        return compile_plan(q, scheme, budget=None, **compile_kwargs).memory.peak_bytes
    except ValueError:
        return None


def _most_trailing(q, fits, n: int) -> int:
    """The largest k in [1, n] with ``fits(k)``, 0 if none: training more trailing layers never
    needs less memory nor back-propagates through fewer ops, so ``fits`` holds up to a point."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def applicable(q, **compile_kwargs) -> List[str]:
    """The CLI scheme names (``--scheme``) the engine can train on ``q`` (budget aside): ``auto``,
    ``paper`` where the model has inverted-residual blocks, ``full``, ``bias`` and ``last:K``."""
    out = ["auto"]
    if _expand_convs(q):
        out.append("paper")
    for name, make in (("full", full), ("bias", bias_only)):
        if _peak(q, make(q), **compile_kwargs) is not None:
            out.append(name)
    n = len(_layers(q))
    k = _most_trailing(q, lambda k: _peak(q, last_layers(q, k), **compile_kwargs) is not None, n)
    return out + [f"last:{i}" for i in range(1, k + 1)]


def _ranges(names: List[str]) -> List[str]:
    """``last:1, last:2, ... last:9`` written ``last:1 .. last:9``."""
    lasts = [n for n in names if n.startswith("last:")]
    rest = [n for n in names if not n.startswith("last:")]
    if len(lasts) > 2:
        lasts = [f"{lasts[0]} .. {lasts[-1]}"]
    return rest + lasts


def auto(q, budget=None, **compile_kwargs) -> Scheme:
    """A scheme for any model the importer accepts, chosen under ``budget`` (default 256 KB):
    the paper's sparse scheme where the model has inverted-residual blocks and it fits; otherwise
    the weights and biases of the most trailing layers whose training fits (``last_layers(q, k)``,
    k as large as the budget allows). ``scheme.why`` says which and why. When not even the
    classifier alone fits, that smallest scheme is returned (and compiling it under the budget
    raises `MemoryBudgetError` with the bytes needed)."""
    from .units import parse_bytes

    budget = DEFAULT_BUDGET if budget is None else budget
    limit = parse_bytes(budget)
    shown = f"{limit / 1024:g} KB"
    if _expand_convs(q):
        paper = paper_sparse(q)
        peak = _peak(q, paper, **compile_kwargs)
        if peak is not None and peak <= limit:
            paper.why = (f"paper: the model has 1x1 convs feeding depthwise convs (as in inverted-residual "
                         f"blocks) and the seed paper's sparse scheme fits "
                         f"{shown} (peak {peak / 1024:.1f} KB)")
            return paper
        reason = ("the paper's scheme does not fit" if peak is not None else "the engine cannot train the paper's "
                  "scheme on this model")
    else:
        reason = "the paper's scheme does not apply (no 1x1 conv feeding a depthwise conv: no inverted-residual blocks)"
    n = len(_layers(q))
    peaks: Dict[int, Optional[int]] = {}

    def fits(k: int) -> bool:
        peaks[k] = _peak(q, last_layers(q, k), **compile_kwargs)
        return peaks[k] is not None and peaks[k] <= limit

    k = _most_trailing(q, fits, n)
    if k == 0:
        s = last_layers(q, 1)
        s.why = f"last:1: {reason}, and not even the classifier alone fits {shown}"
        return s
    s = last_layers(q, k)
    more = "" if k == n else (f"; last:{k + 1} needs {peaks[k + 1] / 1024:.1f} KB" if peaks.get(k + 1) is not None
                              else f"; last:{k + 1} cannot be trained" if k + 1 in peaks else "")
    s.why = (f"last:{k}: {reason}; the most trailing layers whose training fits {shown} "
             f"(peak {peaks[k] / 1024:.1f} KB{more})")
    return s
