"""The memory table of the seed paper (Fig. 10a), measured with tinytrain's planner and executor.

For MCUNet-5FPS, MobileNetV2-w0.35 and ProxylessNAS-w0.3 at 128x128, batch 1: peak SRAM of
(a) full update without reordering, (b) full update with reordering, (c) bias-only, (d) last-4
layers, (e) the paper's kind of sparse scheme without and (f) with reordering, beside the paper's
figures. Every figure is the plan's arena size; unless --no-verify, one training step is run with
tt-core's executor and its measured high-water mark must equal it. When PyTorch is installed (any
interpreter on the machine, see tinytrain.peers), its peak memory for the same training (peak RSS
over the post-import RSS, float32, batch 1: full update, and the same sparse scheme through
requires_grad) is printed beside ours as a ratio.

    python benches/memory_table.py [--json] [--no-verify] [--no-peers]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np

import tinytrain as tt

PAPER_KB = {  # Fig. 10a: full update (TTE), sparse, sparse + reordering
    "MCUNet-5FPS": (3650, 560, 173),
    "MobileNetV2-w0.35": (2939, 335, 141),
    "ProxylessNAS-w0.3": (2745, 326, 135),
}
MODELS = {
    "MCUNet-5FPS": lambda: tt.models.mcunet_5fps(resolution=128),
    "MobileNetV2-w0.35": lambda: tt.models.mobilenetv2(width=0.35, resolution=128),
    "ProxylessNAS-w0.3": lambda: tt.models.proxylessnas(width=0.3, resolution=128),
}


def measure(q, scheme, reorder: bool, x, verify: bool, **kw):
    plan = tt.compile(q, scheme, reorder=reorder, **kw)
    if verify:
        tr = tt.Trainer(plan, lr=0.0)
        tr.step(x, [0])
        if tr.high_water_bytes != plan.memory.peak_bytes:
            raise AssertionError(f"executor high-water {tr.high_water_bytes} != planned {plan.memory.peak_bytes}")
    return plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="skip running a step with the executor")
    ap.add_argument("--no-peers", action="store_true", help="skip the PyTorch measurement")
    args = ap.parse_args(argv)
    x = np.random.default_rng(0).uniform(0, 1, size=(1, 3, 128, 128)).astype(np.float32)
    rows = []
    for name, make in MODELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = tt.quantize(tt.load_onnx(make()), x)
        s = tt.schemes
        cases = {
            "full_no_reorder": (s.full(q), False),
            "full_reorder": (s.full(q), True),
            "bias_only": (s.bias_only(q), True),
            "last_4": (s.last_layers(q, 4), True),
            "sparse_no_reorder": (s.paper_sparse(q), False),
            "sparse_reorder": (s.paper_sparse(q), True),
            "sparse_reorder_streamed": (s.paper_sparse(q), True, {"stream_input": True}),
        }
        row = {"model": name, "layers": len(q.layers), "scheme": s.paper_sparse(q).to_dict()}
        for key, (scheme, reorder, *kw) in cases.items():
            p = measure(q, scheme, reorder, x, not args.no_verify, **(kw[0] if kw else {}))
            row[key] = {"peak_bytes": p.memory.peak_bytes, "lower_bound_bytes": p.memory.lower_bound_bytes,
                        "peak_op": p.memory.peak_op, "breakdown": p.memory.breakdown,
                        "layout": p.memory.extra.get("layout")}
        row["paper_kb"] = dict(zip(("full", "sparse", "sparse_reorder"), PAPER_KB[name]))
        if not args.no_peers:
            from tinytrain.peers.runner import torch_step

            sp = s.paper_sparse(q)
            row["pytorch"] = {"full": torch_step(q, "full", q.layers, q.layers, steps=3),
                              "sparse": torch_step(q, "sparse", list(sp.weight_ratios), sp.bias_layers, steps=3)}
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    kb = lambda r, k: r[k]["peak_bytes"] / 1024  # noqa: E731
    print("Peak SRAM of one training step (KB = 1024 B), 128x128, batch 1"
          + ("" if args.no_verify else "; every figure = executor's measured high-water mark"))
    print()
    print("| model | full, no reorder | full, reorder | bias-only | last-4 | sparse, no reorder | sparse + reorder "
          "| sparse + reorder, input streamed | paper: full / sparse / sparse+reorder | ours / paper (sparse+reorder) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pk = r["paper_kb"]
        print(f"| {r['model']} | {kb(r, 'full_no_reorder'):.0f} | {kb(r, 'full_reorder'):.0f} | {kb(r, 'bias_only'):.0f} "
              f"| {kb(r, 'last_4'):.0f} | {kb(r, 'sparse_no_reorder'):.0f} | {kb(r, 'sparse_reorder'):.0f} "
              f"| {kb(r, 'sparse_reorder_streamed'):.0f} "
              f"| {pk['full']} / {pk['sparse']} / {pk['sparse_reorder']} "
              f"| {kb(r, 'sparse_reorder') / pk['sparse_reorder']:.2f}x |")
    print()
    for r in rows:
        pt = r.get("pytorch")
        if not pt:
            continue
        if "skipped" in pt["full"]:
            print(f"{r['model']}: PyTorch {pt['full']['skipped']}")
            continue
        full_b = pt["full"]["peak_rss_over_import_bytes"]
        sparse_b = pt["sparse"].get("peak_rss_over_import_bytes")
        ours = r["sparse_reorder"]["peak_bytes"]
        print(f"{r['model']}: {pt['full']['framework']} full update {full_b / 2**20:.1f} MB "
              f"({full_b / ours:.0f}x ours sparse + reorder; {full_b / r['full_reorder']['peak_bytes']:.1f}x ours full)"
              + (f", same sparse scheme via requires_grad {sparse_b / 2**20:.1f} MB ({sparse_b / ours:.0f}x)"
                 if sparse_b else ""))
    print()
    for r in rows:
        sr = r["sparse_reorder"]
        print(f"{r['model']}: sparse + reorder peak at {sr['peak_op']}: "
              + ", ".join(f"{k} {v / 1024:.1f}" for k, v in sr["breakdown"].items() if v))
        lay = sr["layout"] or {}
        if lay.get("patch"):
            print(f"  layout: nodes up to {lay['patch']['last']} patch by patch on a {lay['patch']['grid']}x"
                  f"{lay['patch']['grid']} grid, {lay['in_place_ops']} ops in place")
        print(f"  sparse scheme: biases of the last {len(r['scheme']['bias_layers'])} of {r['layers']} layers, weights "
              + ", ".join(f"{k}@{v:g}" for k, v in r["scheme"]["weight_ratios"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
