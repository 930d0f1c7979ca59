"""Fleet update blobs (docs/fleet-update-format.md): the parameters a plan's sparse scheme trains
(int8 weights of the trained channels, int32 biases) and a sample count, as a device sends them to
a Flower client and receives the global ones back. The byte format and every check live in tt-core,
the code the microcontroller runs too; this module names the arrays and gives them the model's
layout.

    blob = trainer.export_update()              # bytes: what a device (or tt-mcu) sends
    u = tt.read_update(blob, plan)              # u.sample_count, u.params["fc_5.weight"], ...
    u.params["fc_5.bias"] += 3                  # e.g. the server's aggregate
    other_trainer.apply_update(u)               # or apply_update(u.to_bytes())

``params`` maps ``"<layer>.weight"`` to the trained slice of the model's ``weight_q`` (output
channels trained: ``weight_q[:k]``; input channels: ``weight_q[:, :k]``; conv OIHW, fully connected
(out, in)) as int8, and ``"<layer>.bias"`` to the layer's int32 ``bias_q``, in the plan's order.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Tuple

import numpy as np

from . import _core
from .errors import UpdateError
from .plan import Plan

__all__ = ["Update", "read_update"]


class _Param(NamedTuple):
    name: str
    kind: str  # "weight" | "bias"
    ohwi: Tuple[int, int, int, int]  # the blob's order of the values
    fc: bool

    @property
    def layer(self) -> str:
        return self.name[: -len(self.kind) - 1]

    @property
    def dtype(self):
        return np.int8 if self.kind == "weight" else np.int32

    @property
    def shape(self) -> Tuple[int, ...]:
        rows, kh, kw, cols = self.ohwi
        if self.kind == "bias":
            return (rows,)
        return (rows, cols) if self.fc else (rows, cols, kh, kw)

    def to_model(self, flat: np.ndarray) -> np.ndarray:
        if self.kind == "weight" and not self.fc:
            return np.ascontiguousarray(flat.reshape(self.ohwi).transpose(0, 3, 1, 2))
        return flat.reshape(self.shape)

    def blob_order(self, a: np.ndarray) -> np.ndarray:
        """The values of ``a`` (the model's shape) flattened in the blob's order, dtype kept."""
        if self.kind == "weight" and not self.fc:
            a = a.transpose(0, 2, 3, 1)
        return a.reshape(-1)

    def to_blob(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.blob_order(a), dtype=self.dtype)


def _layout(plan: Plan) -> Tuple[List[_Param], int]:
    secs, nbytes = _core.update_layout(plan.plan_bytes)
    names = plan.layers
    out = [_Param(f"{names[li] if li < len(names) else f'layer{li}'}.{kind}", kind, tuple(shape), fc)
           for li, kind, shape, fc in secs]
    return out, int(nbytes)


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= int(n) < 2 ** 32:
        raise UpdateError(f"sample_count must be an integer in [0, 2**32), got {n!r}", "sample_count")
    return int(n)


class Update:
    """The trained parameters of a plan and the number of samples they were trained on.

    ``Update(plan, params, sample_count)`` checks that ``params`` has exactly the plan's trained
    parameter names (``plan``'s order is kept), each with its shape and integer values in the
    range of its dtype (int8 weights, int32 biases); anything else raises `tt.UpdateError`.
    """

    def __init__(self, plan: Plan, params: Mapping[str, np.ndarray], sample_count: int = 0) -> None:
        if not isinstance(plan, Plan):
            raise TypeError(f"Update expects a tt.Plan, got {type(plan).__name__}")
        self.plan = plan
        self.sample_count = _check_count(sample_count)
        self._layout, self.nbytes = _layout(plan)
        want = [p.name for p in self._layout]
        if set(params) != set(want):
            missing = [n for n in want if n not in params]
            extra = [n for n in params if n not in want]
            raise UpdateError(f"update parameters do not match the plan's trained parameters: missing {missing}, "
                              f"unexpected {extra}", "params")
        self.params: Dict[str, np.ndarray] = {}
        for p in self._layout:
            a = np.asarray(params[p.name])
            if a.shape != p.shape:
                raise UpdateError(f"{p.name}: shape {a.shape}, the plan trains {p.shape}", p.name)
            if not np.issubdtype(a.dtype, np.integer):
                raise UpdateError(f"{p.name}: values must be integers ({np.dtype(p.dtype).name}), got {a.dtype}",
                                  p.name)
            info = np.iinfo(p.dtype)
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise UpdateError(f"{p.name}: values {a.min()}..{a.max()} outside {np.dtype(p.dtype).name}", p.name)
            self.params[p.name] = a.astype(p.dtype)

    def to_bytes(self) -> bytes:
        """The update blob (what `Trainer.apply_update`, `tt.read_update` and tt-mcu read)."""
        values = [p.to_blob(self.params[p.name]) for p in self._layout]
        return bytes(_core.update_write(self.plan.plan_bytes, values, self.sample_count))

    def __repr__(self) -> str:
        return (f"Update({len(self.params)} parameters, {sum(a.size for a in self.params.values())} values, "
                f"{self.nbytes} bytes, sample_count={self.sample_count})")


def read_update(blob: bytes, plan: Plan) -> Update:
    """Reads an update blob of ``plan`` (from `Trainer.export_update`, `Update.to_bytes` or a device).
    A truncated or corrupted blob, or one written for another plan, raises `tt.UpdateError`
    naming the field (``"plan_tag"`` for another plan)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"read_update expects a tt.Plan, got {type(plan).__name__}")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"read_update expects bytes, got {type(blob).__name__}")
    _, count, secs = _core.update_read(plan.plan_bytes, bytes(blob))
    layout, _ = _layout(plan)
    params = {p.name: p.to_model(np.asarray(flat)) for p, (_, flat) in zip(layout, secs)}
    return Update(plan, params, count)
