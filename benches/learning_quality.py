"""The learning-quality study: how well does int8 on-device training learn, per scheme?

Task: the shipped demo model (pretrained in float on digits 0-4) learns digits 5-9 from the
target train split and is scored on the target test split (`tt.datasets.digits`). Every row trains
from the same deployed weights, for the same epochs, batch 1, SGD without momentum (the paper's
on-device setting), and is repeated over seeds (sample order, stochastic rounding). The learning
rate of each row is chosen from a grid on a validation split held out of the target train split
(the paper tuned it per run too); the row reports test accuracy at that rate.

    python benches/learning_quality.py [--seeds 3] [--epochs 5] [--json]

Rows: fp32 full update (numpy reference), int8 full update without / with QAS, int8 bias-only,
last layer, last 4 layers, the searched sparse scheme at 16 / 32 / 64 / 128 / 256 KB, and the
three update precisions on the 64 KB searched scheme. Memory is the planner's exact peak of the training step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import tinytrain as tt
from tinytrain import reference


BUDGETS_KB = (16, 32, 64, 128, 256)
PRECISION_STUDY_KB = 64
LR_GRID = (0.01, 0.02, 0.05, 0.1)
# Without QAS the int8 step is the float step times s_W^2 (about 1e-5 here): no rate in the QAS
# grid moves the weights at all, so the baseline gets a grid scaled to its own units.
NO_QAS_LR_GRID = (0.5, 50.0, 5e3, 5e5)


def float_full_update(q, x_tr, y_tr, x_te, y_te, epochs, lr, seed):
    g = q.dequantized()
    reference.train(g, x_tr, y_tr, epochs=epochs, lr=lr, batch=1, momentum=0.0, seed=seed)
    return float((reference.forward(g, x_te).argmax(1) == y_te).mean())


def int8_run(q, scheme, x_tr, y_tr, x_te, y_te, epochs, lr, seed, qas=True, precision="stochastic"):
    plan = tt.compile(q, scheme, update_precision=precision, seed=seed)
    tr = tt.Trainer(plan, lr=lr, qas=qas)
    tr.fit(x_tr, y_tr, epochs=epochs, batch_size=1, seed=seed, verbose=False)
    return tr.evaluate(x_te, y_te), plan.memory.peak_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("TINYTRAIN_PROGRESS", "0")
    g = tt.load_onnx(tt.models.demo())
    x_src, _ = tt.datasets.digits("source", "train")
    x_all, y_all = tt.datasets.digits("target", "train")
    n_val = len(x_all) // 5
    x_val, y_val, x_tr, y_tr = x_all[:n_val], y_all[:n_val], x_all[n_val:], y_all[n_val:]
    x_te, y_te = tt.datasets.digits("target", "test")
    q = tt.quantize(g, x_src[:256])
    before = float((q.predict(x_te) == y_te).mean())

    searched = {}
    for kb in BUDGETS_KB:
        res = tt.search(q, x_tr, y_tr, budget=f"{kb}KB", population=24, generations=12, seed=0, epochs=1)
        searched[kb] = res.scheme

    rows = []

    def record(name, fn, grid=LR_GRID):
        t0 = time.perf_counter()
        val = {lr: fn(0, lr, x_val, y_val)[0] for lr in grid}
        best_lr = max(grid, key=lambda lr: (val[lr], -lr))
        runs = [fn(seed, best_lr, x_te, y_te) for seed in range(args.seeds)]
        accs = [a for a, _ in runs]
        rows.append({"config": name, "lr": best_lr, "accuracy_mean": float(np.mean(accs)),
                     "accuracy_std": float(np.std(accs)), "peak_bytes": runs[0][1],
                     "seconds": round(time.perf_counter() - t0, 1)})
        if not args.json:
            r = rows[-1]
            mem = f"{r['peak_bytes'] / 1024:7.1f} KB" if r["peak_bytes"] else "      n/a"
            print(f"{name:<48} {100 * r['accuracy_mean']:6.2f} ± {100 * r['accuracy_std']:4.2f} %   {mem}   lr {best_lr:g}",
                  flush=True)

    e = args.epochs
    full = tt.schemes.full(q)
    if not args.json:
        print(f"accuracy before adaptation: {100 * before:.2f} %  (target test split, {len(x_te)} images)")
        print(f"{'config':<48} {'test accuracy':>16}   {'peak SRAM':>10}")

    def int8(scheme, **kw):
        return lambda s, lr, xe, ye: int8_run(q, scheme, x_tr, y_tr, xe, ye, e, lr, s, **kw)

    record("fp32 full update (numpy reference)",
           lambda s, lr, xe, ye: (float_full_update(q, x_tr, y_tr, xe, ye, e, lr, s), None))
    record("int8 full update, no QAS", int8(full, qas=False), grid=NO_QAS_LR_GRID)
    record("int8 full update, QAS", int8(full))
    record("int8 bias-only", int8(tt.schemes.bias_only(q)))
    record("int8 last layer", int8(tt.schemes.last_layers(q, 1)))
    record("int8 last 4 layers", int8(tt.schemes.last_layers(q, 4)))
    for kb, scheme in searched.items():
        record(f"int8 searched sparse, {kb} KB budget", int8(scheme))
    for precision in ("stochastic", "residual", "fp32"):
        record(f"int8 searched {PRECISION_STUDY_KB} KB, update precision {precision}",
               int8(searched[PRECISION_STUDY_KB], precision=precision))
    if args.json:
        print(json.dumps({"accuracy_before": before, "epochs": e, "seeds": args.seeds, "rows": rows,
                          "schemes": {kb: s.to_dict() for kb, s in searched.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
