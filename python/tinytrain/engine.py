"""`tt.compile`: an int8 model + a sparse-update scheme -> a training `Plan`.

The work happens in tt-core (compile-time autodiff, pruning, reordering, memory planning, the plan
format); this module lowers the Python graph into tt-core's form (tensor ids, channels-last
weights) and checks the budget.
"""
from __future__ import annotations

import json
import warnings
from typing import Tuple, Union

import numpy as np

from . import _core, datacheck
from .errors import MemoryBudgetError
from .graph import Graph
from ._lowering import CompileRequest, LayerUpdate, Layout, lower
from .plan import LOSSES, PRECISIONS, Plan
from .schemes import Scheme
from .units import parse_bytes

__all__ = ["compile"]

def _quantized(model):
    from .model import QuantizedModel
    from .quantize import quantize

    if isinstance(model, QuantizedModel):
        return model
    if isinstance(model, Graph):
        warnings.warn("compiling a float model: quantizing it with synthetic calibration data "
                      "(peak memory does not depend on the scales; train a model quantized with real data)",
                      stacklevel=3)
        shape = model.tensors[model.input].shape
        calib = np.random.default_rng(0).normal(0.0, 1.0, (8,) + tuple(shape)).astype(np.float32)
        return quantize(model, calib)
    raise TypeError(f"tt.compile expects a QuantizedModel (tt.quantize) or a float tt.Graph, got {type(model).__name__}")


def compile(model, scheme: Scheme, budget: Union[str, int, None] = None, reorder: bool = True,
            update_precision: str = "stochastic", loss: str = "auto", lr: Union[float, str] = "auto",
            momentum: float = 0.0, seed: int = 0, patch="auto", in_place=None,
            stream_input: bool = False, accumulate: bool = False, optimize: str = "memory") -> Plan:
    """Compile training of `model` under `scheme` into a `Plan`.

    - ``budget``: SRAM budget ("256KB", bytes, or None for no limit); a plan whose peak exceeds it
      raises `MemoryBudgetError` with the bytes needed.
    - ``reorder``: apply each layer's update as soon as its gradient exists (in place), so gradient
      buffers of different layers never coexist; ``False`` gives the conventional order.
    - ``update_precision``: how trained int8 weights keep sub-LSB steps: ``"stochastic"`` rounding
      (no extra bytes), ``"residual"`` (an int8 residual, +1 byte per trained weight) or ``"fp32"``
      (an fp32 master copy, +4 bytes).
    - ``loss``: ``"cross_entropy"`` (class labels) or ``"mse"`` (float targets); ``"auto"``
      (default) picks it from the model's head (`tinytrain.datacheck.choose_loss`: cross-entropy
      for a classifier, MSE for one output or an output shaped as the input); ``plan.loss`` says.
    - ``lr``, ``momentum``: the plan's SGD defaults (the MCU uses them; `Trainer` may override).
      ``lr="auto"`` (default): compiling has no data to choose a rate from, so the plan stores the
      conservative `tinytrain.lr.FALLBACK_LR` and is marked so that `Trainer` chooses the rate
      on its data (`tt.choose_lr`); compile again with ``lr=choice.lr`` to ship a chosen rate.
      ``momentum > 0`` allocates momentum buffers (+4 bytes per trained parameter).
    - ``seed``: the stochastic-rounding generator's seed.
    - ``patch``, ``in_place``: execution layout. By default the planner tries every layout and
      keeps the smallest peak: the first frozen conv chain run patch by patch (halos recomputed)
      on a grid of 2..8 patches per side, and depthwise convs overwriting their input (forward)
      and their output gradient (backward). ``patch=None`` runs whole tensors;
      ``patch=("conv_5", 4)`` runs the nodes up to ``conv_5`` on a 4x4 grid; ``in_place`` fixes
      the in-place choice (``True``: depthwise and expanding pointwise convs; ``"all"``: also
      shrinking pointwise convs and adds). The layout changes memory and work, never the numbers.
    - ``optimize``: what the layout search minimizes. ``"memory"`` (default): the smallest peak.
      ``"compute"``: spare SRAM bought back as speed: among the layouts whose peak fits
      ``budget`` (any peak when ``budget`` is None), the one executing the fewest forward MACs (a
      patch stage's recomputed halos count), with inverted-residual blocks' backward fused and,
      among equals, the forward out of place (both measured faster on a Cortex-M4), then the
      smaller peak. A fine patch grid over the high-resolution first layers gives the smallest
      peak and recomputes the most; a coarser grid, a shorter stage or whole tensors cost more
      SRAM and less time. Both figures are in ``plan.memory`` (``peak_bytes``; ``executed_macs``
      against ``model_macs``). When no layout fits the budget, the smallest peak found is
      compiled and `MemoryBudgetError` raised as usual. Only with ``patch="auto"`` and
      ``in_place=None`` (a fixed layout has nothing to choose).
    - ``stream_input``: the input sample is not copied into the SRAM arena; the patch stage reads
      its regions from where the caller keeps the sample (on the MCU: a camera frame buffer or
      flash). Needs a patch stage; saves the input's bytes (48 KB at 3x128x128).
    - ``accumulate``: gradient accumulation over a batch. ``False`` (default): every sample's
      update is applied in place as soon as its gradient exists (the paper's on-device setting,
      the smallest memory). ``True``: the plan holds persistent fp32 accumulators for the trained
      weight channels and biases (``memory.breakdown["accumulated_gradients"]``, in the peak);
      the backward pass adds into them and a separate update phase applies the batch's mean
      gradient (same QAS SGD, update precision and momentum) once per batch
      (`Trainer.step` / `Trainer.fit`). The fused gradient-and-update ops of ``reorder`` are not
      used then: weights must not move inside a batch.
    """
    q = _quantized(model)
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a tt.Scheme (see tt.schemes), got {type(scheme).__name__}")
    # "auto" is resolved here, from the model; tt-core parses and checks every other name.
    loss, _ = datacheck.choose_loss(q, loss)
    from .lr import FALLBACK_LR, parse_lr

    lr = parse_lr(lr) if isinstance(lr, str) else lr  # numbers are checked below, > 0 for a plan
    lr_source = "auto" if lr == "auto" else "given"
    lr = FALLBACK_LR if lr == "auto" else datacheck.check_lr(lr)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    budget_bytes = None if budget is None else parse_bytes(budget)
    if optimize not in ("memory", "compute"):
        raise ValueError(f"optimize must be 'memory' or 'compute', got {optimize!r}")
    layers = list(q.layers)
    resolved = scheme.resolved(layers)
    updates = {}
    for n in q.nodes:
        r = resolved.get(n.name) if n.trainable else None
        if r is None:
            continue
        if r["axis"] == "input" and r["ratio"] > 0 and n.op == "conv" and int(n.attrs.get("groups", 1)) > 1:
            raise ValueError(f"layer {n.name!r}: an input-channel selection needs an ungrouped conv "
                             f"(this one has groups={n.attrs.get('groups')}); use channel_axis 'output'")
        updates[n.name] = LayerUpdate(bool(r["bias"]), float(r["ratio"]), r["axis"])
    tensors, nodes, ids = lower(q, updates)
    t_in = q.tensors[q.input]
    meta = {
        "layers": layers,
        "nodes": [n.name for n in q.nodes],
        "input": {"shape": list(t_in.shape), "scale": float(t_in.scale), "zero_point": int(t_in.zero_point)},
        "output": {"shape": list(q.tensors[q.output].shape)},
        "scheme": scheme.to_dict(),
        "layer_shapes": {n.name: list(np.asarray(n.params["weight_q"]).shape) for n in q.nodes if n.trainable},
        "lr_source": lr_source,
    }
    layout = None
    if not (isinstance(patch, str) and patch == "auto" and in_place is None):
        stage = None
        if isinstance(patch, str) and patch == "auto":
            raise ValueError("patch='auto' searches the layout; to fix in_place, also give patch=None or (node, grid)")
        if patch is not None:
            try:
                last, grid = patch
            except (TypeError, ValueError):
                raise ValueError(f"patch must be 'auto', None or (node name, grid), got {patch!r}") from None
            names = [n.name for n in q.nodes]
            if last not in names:
                raise ValueError(f"patch: unknown node {last!r}")
            if not isinstance(grid, int) or isinstance(grid, bool) or not 1 <= grid <= 64:
                raise ValueError(f"patch grid must be an int in [1, 64], got {grid!r}")
            stage = (names.index(last), grid)
        if in_place not in (None, True, False, "all"):
            raise ValueError(f"in_place must be True, False or 'all', got {in_place!r}")
        if optimize != "memory":
            raise ValueError(f"optimize={optimize!r} chooses among layouts: give patch='auto' and in_place=None "
                             "(patch / in_place fix the layout)")
        layout = Layout(stage, in_place is None or bool(in_place), in_place == "all")
    request = CompileRequest(
        tensors=tensors, nodes=nodes, input=ids[q.input], output=ids[q.output], rounding=q.rounding,
        reorder=bool(reorder), update_precision=str(update_precision), loss=str(loss), momentum_buffers=momentum > 0,
        accumulate=bool(accumulate), seed=int(seed) & (2**64 - 1), lr=float(lr), momentum=float(momentum),
        meta=json.dumps(meta).encode(), layout=layout, stream_input=bool(stream_input), optimize=optimize,
        budget=budget_bytes)
    try:
        plan_bytes, params = _core.engine_compile(request)
    except ValueError as e:
        if layout is not None and layout.patch is not None and "patch stage" in str(e):
            raise ValueError(f"patch={patch!r}: the nodes up to {patch[0]!r} are not a chain of frozen convs "
                             "from the input (each output read only by the next conv)") from None
        raise
    plan = Plan(plan_bytes, params, model=q, budget_bytes=budget_bytes)
    if budget_bytes is not None and plan.memory.peak_bytes > budget_bytes:
        raise MemoryBudgetError(plan.memory.peak_bytes, budget_bytes,
                                f"the peak is reached at {plan.memory.peak_op}")
    return plan


# ---------------------------------------------------------------------- command line
def scheme_from_arg(q, spec: str, budget=None, **compile_kwargs) -> Scheme:
    """``auto`` | ``full`` | ``bias`` | ``last:K`` | ``paper`` | a scheme JSON file."""
    from . import schemes

    if spec == "auto":
        return schemes.auto(q, budget, **compile_kwargs)
    if spec == "full":
        return schemes.full(q)
    if spec in ("bias", "bias_only"):
        return schemes.bias_only(q)
    if spec in ("paper", "paper_sparse"):
        return schemes.paper_sparse(q)
    if spec.startswith("last:"):
        try:
            k = int(spec[5:])
        except ValueError:
            raise ValueError(f"--scheme last:K needs an integer K, got {spec!r}") from None
        return schemes.last_layers(q, k)
    if spec.endswith(".json"):
        return Scheme.load(spec)
    raise ValueError(f"--scheme must be auto, full, bias, last:K, paper or a .json file, got {spec!r}")


def add_cli_options(p) -> None:
    p.add_argument("model", help="ONNX file (float models are quantized with --calib or synthetic data)")
    p.add_argument("--scheme", default="auto", help="auto | full | bias | last:K | paper | FILE.json (default: auto: "
                   "paper where the model has inverted-residual blocks and it fits, else the most last layers that fit)")
    p.add_argument("--no-reorder", action="store_true", help="apply all updates after the backward pass")
    p.add_argument("--budget", default=None, help="SRAM budget, e.g. 256KB")
    p.add_argument("--precision", choices=list(PRECISIONS), default="stochastic", help="update precision")
    p.add_argument("--loss", choices=[*LOSSES, "auto"], default="auto",
                   help="auto: cross_entropy for a classifier head, mse for a regressor (default: auto)")
    p.add_argument("--calib", help="calibration data for a float model (.npz with X, or .npy)")
    p.add_argument("--stream-input", action="store_true",
                   help="the patch stage reads the input sample from outside the SRAM arena")
    p.add_argument("--optimize", choices=["memory", "compute"], default="memory",
                   help="layout: the smallest peak, or the fewest executed MACs whose peak fits --budget")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _cli_plan(args, budget_check: bool) -> Tuple[object, Plan]:
    from .fileio import load_model

    q = load_model(args.model, args.calib)
    args.loss = datacheck.cli_loss(q, args.loss)
    kw = dict(reorder=not args.no_reorder, update_precision=args.precision, loss=args.loss,
              stream_input=args.stream_input, lr=getattr(args, "lr", "auto"))
    s = scheme_from_arg(q, args.scheme, args.budget, **kw)
    if s.why:
        datacheck.say(f"scheme {args.scheme} chose {s.why}")
        args.scheme = s.name
    plan = None
    if args.optimize == "compute":
        try:
            plan = compile(q, s, budget=args.budget, optimize="compute", **kw)
        except MemoryBudgetError:
            pass  # nothing fits: the smallest peak, compiled below, is reported and refused
    if plan is None:
        plan = compile(q, s, budget=None, **kw)
    if args.budget is not None:
        plan.memory.budget_bytes = parse_bytes(args.budget)
    if budget_check and plan.memory.fits is False:
        raise MemoryBudgetError(plan.memory.peak_bytes, plan.memory.budget_bytes,
                                f"the peak is reached at {plan.memory.peak_op}")
    return q, plan


def cli_memory(args) -> int:
    _, plan = _cli_plan(args, budget_check=False)
    if args.json:
        d = plan.memory.to_dict()
        d.update({"model": args.model, "scheme": args.scheme, "reorder": not args.no_reorder})
        print(json.dumps(d))
    else:
        print(f"{args.model}  scheme {args.scheme}  reorder {not args.no_reorder}")
        print(plan.memory.table())
    return 0 if plan.memory.fits is not False else 2


def cli_compile(args) -> int:
    _, plan = _cli_plan(args, budget_check=True)
    plan.save(args.output)
    if args.json:
        d = plan.memory.to_dict()
        d.update({"model": args.model, "scheme": args.scheme, "output": args.output,
                  "plan_bytes": len(plan.plan_bytes), "params_bytes": len(plan.params)})
        print(json.dumps(d))
    else:
        print(f"wrote {args.output}: plan {len(plan.plan_bytes)} B + frozen parameters {len(plan.params)} B; "
              f"peak SRAM {plan.memory.peak_bytes / 1024:.1f} KB")
    return 0
