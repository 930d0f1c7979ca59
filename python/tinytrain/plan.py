"""`Plan`: a compiled training step (tt-core's plan bytes + the frozen parameter blob) and its
memory report.

A ``.ttp`` file is the plan bytes followed by the parameter blob; the plan header records the
blob's length and CRC32, so a file is checked end to end on load. Saving is atomic (a temporary
file in the same folder, then a rename).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import _core
from .errors import PlanError
from .fileio import write_atomic

__all__ = ["Plan", "MemoryReport", "PRECISIONS", "LOSSES"]

#: The update precisions and losses a plan can be compiled with, by name (tt-core's).
PRECISIONS = tuple(_core.UPDATE_PRECISIONS)
LOSSES = tuple(_core.LOSSES)


@dataclass
class MemoryReport:
    """Where the SRAM of one training step goes.

    ``peak_bytes`` is the arena size: the high-water mark of the step (the executor measures the
    same number while running). ``breakdown`` splits it at the peak op into updated weights (int8
    copies + int32 biases), precision_and_optimizer (residual / fp32 master copies, momentum, PRNG),
    saved activations (int8, and 1-bit clamp masks), activations (forward), gradients (fp32), scratch,
    accumulated_gradients (the fp32 per-batch accumulators of an ``accumulate=True`` plan, 0 otherwise)
    and fragmentation (packing overhead above the lower bound); ``flash_bytes`` is what stays in
    flash (frozen weights, scales, the plan). ``lower_bound_bytes`` is the most bytes live at once:
    no placement can do better. The layout's work is ``extra["layout"]``'s ``executed_macs``
    (forward conv/fc MACs per sample as the plan runs them, a patch stage's recomputed halos
    included) against ``model_macs`` (each output once); also ``executed_macs`` / ``model_macs``.
    """

    peak_bytes: int
    lower_bound_bytes: int
    state_bytes: int
    breakdown: Dict[str, int]
    timeline: List[Dict[str, object]]
    peak_op: str
    flash_bytes: int
    budget_bytes: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    @property
    def executed_macs(self) -> Optional[int]:
        return (self.extra.get("layout") or {}).get("executed_macs")

    @property
    def model_macs(self) -> Optional[int]:
        return (self.extra.get("layout") or {}).get("model_macs")

    @property
    def packing_efficiency(self) -> float:
        """lower bound / peak: 1.0 means the placement is optimal."""
        return self.lower_bound_bytes / self.peak_bytes if self.peak_bytes else 1.0

    def to_dict(self) -> Dict[str, object]:
        return {"peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "lower_bound_bytes": self.lower_bound_bytes, "packing_efficiency": round(self.packing_efficiency, 4),
                "state_bytes": self.state_bytes, "peak_op": self.peak_op, "breakdown": dict(self.breakdown),
                "flash_bytes": self.flash_bytes, "layout": self.extra.get("layout")}

    def table(self) -> str:
        kb = lambda n: f"{n / 1024:9.1f} KB"  # noqa: E731
        lines = [f"peak SRAM        {kb(self.peak_bytes)}   (lower bound {kb(self.lower_bound_bytes).strip()}, "
                 f"packing {100 * self.packing_efficiency:.1f}%)",
                 f"peak at          {self.peak_op}"]
        lay = self.extra.get("layout") or {}
        if lay.get("patch"):
            lines.append(f"patch stage      up to {lay['patch']['last']} on a {lay['patch']['grid']}x{lay['patch']['grid']} grid")
        if lay.get("stream_input"):
            lines.append("input            streamed into the patch stage (not in SRAM)")
        if lay.get("in_place_ops"):
            lines.append(f"in place         {lay['in_place_ops']} depthwise ops (forward / gradient)")
        if lay.get("model_macs"):
            extra = lay["executed_macs"] - lay["model_macs"]
            lines.append(f"forward MACs     {lay['executed_macs'] / 1e6:.2f} M executed"
                         + (f" ({extra / 1e6:.2f} M of them recomputed patch halos)" if extra else ""))
        for k, v in self.breakdown.items():
            lines.append(f"  {k:<24}{kb(v)}")
        lines.append(f"flash (frozen)   {kb(self.flash_bytes)}")
        if self.budget_bytes is not None:
            lines.append(f"budget           {kb(self.budget_bytes)}   {'fits' if self.fits else 'DOES NOT FIT'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _core_call(fn, *args):
    try:
        return fn(*args)
    except PlanError:
        raise
    except ValueError as e:
        raise PlanError(str(e)) from None


class Plan:
    """A compiled training step. Create with `tt.compile`, or `Plan.load(path)`."""

    def __init__(self, plan_bytes: bytes, params: bytes, model=None, budget_bytes: Optional[int] = None) -> None:
        self.plan_bytes = bytes(plan_bytes)
        self.params = bytes(params)
        self.model = model
        rep = _core_call(_core.plan_report, self.plan_bytes)
        if rep["params_len"] != len(self.params):
            raise PlanError(f"parameter blob is {len(self.params)} bytes, the plan expects {rep['params_len']}",
                            "params_len")
        try:
            self.meta = json.loads(bytes(rep["meta"]).decode("utf-8")) if rep["meta"] else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PlanError("plan metadata is not valid JSON", "meta") from None
        self._report = rep
        mode = getattr(model, "rounding", None)
        if mode is not None and mode != rep["rounding"]:
            # the trained model's forward would then give other numbers than the plan does
            raise PlanError(f"the plan requantizes with {rep['rounding']} rounding, the model with {mode}: "
                            f"it was not compiled from this model", "rounding")
        nodes = self.meta.get("nodes", [])
        node_name = lambda i: nodes[i] if i < len(nodes) else f"node {i}"  # noqa: E731
        timeline = [{"op": k, "node": node_name(n), "live_bytes": int(v)} for (k, n), v in zip(rep["ops"], rep["live"])]
        peak = timeline[rep["peak_op"]] if timeline else {"op": "-", "node": "-"}
        patch = rep["patch"]
        layout = {"patch": None if patch is None else {"last": node_name(patch[0]), "grid": patch[1]},
                  "in_place_ops": int(rep["in_place_ops"]), "stream_input": bool(rep["stream_input"]),
                  "model_macs": int(rep["model_macs"]), "executed_macs": int(rep["executed_macs"])}
        self.memory = MemoryReport(
            peak_bytes=int(rep["arena_bytes"]), lower_bound_bytes=int(rep["lower_bound"]),
            state_bytes=int(rep["state_bytes"]), breakdown={k: int(v) for k, v in rep["breakdown"].items()},
            timeline=timeline, peak_op=f"{peak['op']} of {peak['node']}",
            flash_bytes=len(self.params) + len(self.plan_bytes), budget_bytes=budget_bytes,
            extra={"layout": layout})

    # ------------------------------------------------------------------ properties
    @property
    def layers(self) -> List[str]:
        return list(self.meta.get("layers", []))

    @property
    def reorder(self) -> bool:
        return bool(self._report["reorder"])

    @property
    def accumulate(self) -> bool:
        """Gradient accumulation: one update per batch (``tt.compile(..., accumulate=True)``)."""
        return bool(self._report["accumulate"])

    @property
    def rounding(self) -> str:
        """The model's requantization rounding the plan runs with: "single" or "double" (TFLite's)."""
        return str(self._report["rounding"])

    @property
    def update_precision(self) -> str:
        return str(self._report["precision"])

    @property
    def loss(self) -> str:
        return str(self._report["loss"])

    @property
    def momentum_buffers(self) -> bool:
        return bool(self._report["momentum_buffers"])

    @property
    def lr(self) -> float:
        return float(self._report["lr"])

    @property
    def momentum(self) -> float:
        return float(self._report["momentum"])

    def __repr__(self) -> str:
        return (f"Plan(peak {self.memory.peak_bytes / 1024:.1f} KB, {len(self.layers)} layers, "
                f"reorder={self.reorder}, accumulate={self.accumulate}, update_precision={self.update_precision!r}, loss={self.loss!r})")

    # ------------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        return self.plan_bytes + self.params

    def save(self, path: str) -> None:
        """Write ``plan bytes + parameter blob`` atomically."""
        write_atomic(path, self.to_bytes())

    def export_mcu(self, out_dir: str, x=None, y=None, x_test=None, y_test=None,
                   initial_weights: bool = False, lr: Optional[float] = None) -> Dict[str, object]:
        """Write what tt-mcu firmware includes (plan, parameters, optional samples, manifest);
        see `tinytrain.mcu`. The plan's own (initial) weights: once a `Trainer` of this plan has
        moved them, this refuses unless ``initial_weights=True``; ``tr.export_mcu`` ships the
        trained ones. ``lr``: the rate the firmware trains with (default the plan's)."""
        from .datacheck import check_export_is_current
        from .mcu import export_mcu

        if not initial_weights:
            check_export_is_current(self)

        return export_mcu(self, out_dir, x, y, x_test, y_test, lr=lr)

    @classmethod
    def from_bytes(cls, data: bytes, model=None) -> "Plan":
        data = bytes(data)
        if len(data) < _core.PLAN_HEADER_LEN:
            raise PlanError(f"corrupted or truncated plan: {len(data)} bytes, shorter than the "
                            f"{_core.PLAN_HEADER_LEN}-byte header", "header (truncated)")
        plan_len, params_len = _core_call(_core.plan_lengths, data)
        if plan_len > len(data):
            raise PlanError("corrupted or truncated plan: field body (truncated)", "body (truncated)")
        if len(data) != plan_len + params_len:
            _core_call(_core.plan_report, data[:plan_len])  # a corrupted header names its field first
            raise PlanError(f"corrupted or truncated plan: field params (file has {len(data) - plan_len} bytes of "
                            f"parameters, the plan expects {params_len})", "params")
        plan = cls(data[:plan_len], data[plan_len:], model=model)
        _core_call(_core.Session, plan.plan_bytes, plan.params)  # checks the blob's CRC
        return plan

    @classmethod
    def load(cls, path: str, model=None) -> "Plan":
        """Read a ``.ttp`` file. Pass the `QuantizedModel` it was compiled from as ``model`` to get
        the trained model back from a `Trainer` (``tr.model``)."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls.from_bytes(data, model=model)
        except PlanError as e:
            raise PlanError(f"{path}: {e}", e.field) from None
