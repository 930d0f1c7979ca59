"""`tinytrain demo`: the main job end to end on the shipped demo model and offline data.

The demo model (`tt.models.demo()`) was pretrained in float on scikit-learn digits 0-4; on the
"device" it learns digits 5-9, which it has never seen. Every stage is the public API a user calls:
import -> quantize -> search a sparse scheme under the budget -> compile -> train through the plan
-> report, with plots and a saved plan.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

from .units import format_bytes, parse_bytes


def run(json_output: bool = False, out_dir: str = "tinytrain-demo", budget: str = "256KB", epochs: int = 4,
        seed: int = 0, workers: Optional[int] = None, peers: bool = True, lr="auto") -> int:
    import tinytrain as tt

    from .peers.runner import torch_step

    budget_bytes = parse_bytes(budget)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[stage] = round(now - t0, 2)
        t0 = now

    def say(msg: str) -> None:
        if not json_output:
            print(msg, flush=True)

    say(f"tinytrain {tt.__version__} demo: learn digits 5-9 on the device, within {format_bytes(budget_bytes)} of SRAM")
    g = tt.load_onnx(tt.models.demo())
    x_src, _ = tt.datasets.digits("source", "train")
    x_tr, y_tr = tt.datasets.digits("target", "train")
    x_te, y_te = tt.datasets.digits("target", "test")
    xs_te, ys_te = tt.datasets.digits("source", "test")
    lap("import")
    q = tt.quantize(g, x_src[:256])
    acc_before = float((q.predict(x_te) == y_te).mean())
    src_before = float((q.predict(xs_te) == ys_te).mean())
    lap("quantize")
    say(f"  imported and quantized: {len(q.layers)} trainable layers; accuracy on new digits before training "
        f"{100 * acc_before:.1f} %, on the pretraining digits {100 * src_before:.1f} %")

    # Contribution analysis on part of the device's data keeps the demo short; the
    # fine-tunes are the same int8 training the device runs.
    result = tt.search(q, x_tr[:320], y_tr[:320], budget=budget_bytes, population=24, generations=12,
                       seed=seed, workers=workers, epochs=1, lr=lr)
    lap("search")
    if result.lr_choice is not None:
        say(f"  search: {result.lr_choice.summary()}")
    say(f"  searched scheme: {result.winner}, peak {format_bytes(result.peak_bytes)}, held-out accuracy "
        f"{100 * result.accuracy:.1f} % ({result.margin_points:+.1f} points over the best "
        f"{'baseline' if result.winner == 'searched' else 'searched scheme'})")

    plan = tt.compile(q, result.scheme, budget=budget_bytes)
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, "demo.ttp")
    plan.save(plan_path)
    lap("compile")

    trainer = tt.Trainer(plan, lr=lr)
    history = trainer.fit(x_tr, y_tr, epochs=epochs, batch_size=1, seed=seed, validation=(x_te, y_te),
                          verbose=not json_output)
    if trainer.lr_choice is not None:
        say(f"  training: {trainer.lr_choice.summary()}")
    acc_after = trainer.evaluate(x_te, y_te)
    src_after = trainer.evaluate(xs_te, ys_te)
    high_water = trainer.high_water_bytes
    trained = trainer.model
    trained.to_onnx(os.path.join(out_dir, "trained_int8.onnx"))
    lap("train")

    resolved = result.scheme.resolved(q.layers)
    updated_w = [n for n, r in resolved.items() if r["ratio"] > 0]
    updated_b = [n for n, r in resolved.items() if r["bias"]]
    torch_peer = torch_step(q, "sparse", updated_w, updated_b, steps=5) if peers else {"skipped": "--no-peers"}
    lap("peers")

    plots: Dict[str, str] = {}
    try:
        from . import plots as p

        plots["loss"] = p.loss_curve_plot(history, os.path.join(out_dir, "loss.png"))
        plots["memory"] = p.memory_timeline_plot(plan.memory.timeline, os.path.join(out_dir, "memory.png"),
                                                 budget_bytes, plan.memory.peak_bytes,
                                                 title="Training step of the searched scheme")
        plots["search"] = result.plot(os.path.join(out_dir, "search.png"))
    except ImportError as exc:
        plots["skipped"] = str(exc)
    lap("plots")

    report = {
        "model": "tt.models.demo() (pretrained on digits 0-4)",
        "task": "learn digits 5-9 on the device",
        "train_samples": int(len(x_tr)),
        "test_samples": int(len(x_te)),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "pretraining_digits_accuracy_before": src_before,
        "pretraining_digits_accuracy_after": src_after,
        "history": history,
        "scheme": result.scheme.to_dict(),
        "layers": len(q.layers),
        "search_score": result.score,
        "search_winner": result.winner,
        "search_margin_points": result.margin_points,
        "search_baselines": [{k: v for k, v in b.items() if k != "scheme"} for b in result.baselines],
        "lr": trainer.lr,
        "lr_range_test_seconds": trainer.lr_choice.seconds if trainer.lr_choice is not None else 0.0,
        "search_lr": result.lr,
        "collapsed": history["collapsed"],
        "peak_bytes": plan.memory.peak_bytes,
        "measured_high_water_bytes": high_water,
        "budget_bytes": budget_bytes,
        "fits": plan.memory.peak_bytes <= budget_bytes,
        "breakdown": plan.memory.breakdown,
        "flash_bytes": plan.memory.flash_bytes,
        "torch": torch_peer,
        "torch_memory_ratio": (torch_peer["peak_rss_over_import_bytes"] / plan.memory.peak_bytes
                               if "peak_rss_over_import_bytes" in torch_peer else None),
        "plan": plan_path,
        "plots": plots,
        "seconds": timings,
    }
    if json_output:
        print(json.dumps(report, default=float))
    else:
        _print_summary(report)
    return 3 if history["collapsed"] else 0  # a collapsed run is not a result (the warning said why)


def _describe(scheme: Dict[str, object], n_layers: int) -> str:
    ratios = scheme.get("weight_ratios", {})
    partial = sorted(f"{name}@{ratio:g}" for name, ratio in ratios.items() if ratio < 1)
    text = f"weights of {len(ratios)}/{n_layers} layers, biases of {len(scheme.get('bias_layers', []))}"
    return text + (f"; partial: {', '.join(partial)}" if partial else "")


def _print_summary(r: Dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="tinytrain demo", show_header=True)
    t.add_column("")
    t.add_column("value", justify="right")
    rows: List[tuple] = [
        ("accuracy on new digits, before", f"{100 * r['accuracy_before']:.1f} %"),
        ("accuracy on new digits, after", f"{100 * r['accuracy_after']:.1f} %"),
        ("accuracy on pretraining digits, after", f"{100 * r['pretraining_digits_accuracy_after']:.1f} %"),
        ("searched scheme", _describe(r["scheme"], r["layers"])),
        ("learning rate (training)", f"{r['lr']:.3g}" + (f", range test {r['lr_range_test_seconds']:.1f} s"
                                                         if r["lr_range_test_seconds"] else "")),
        ("peak SRAM of a training step (plan)", format_bytes(r["peak_bytes"])),
        ("arena high-water mark (measured)", format_bytes(r["measured_high_water_bytes"])),
        ("budget", f"{format_bytes(r['budget_bytes'])} ({'fits' if r['fits'] else 'DOES NOT FIT'})"),
        ("flash (frozen weights + plan)", format_bytes(r["flash_bytes"])),
    ]
    torch_peer = r["torch"]
    if r["torch_memory_ratio"]:
        rows.append((f"{torch_peer['framework']}, same training: peak RSS over import",
                     f"{format_bytes(torch_peer['peak_rss_over_import_bytes'])} ({r['torch_memory_ratio']:.0f}x more)"))
    else:
        rows.append(("PyTorch comparison", str(torch_peer.get("skipped"))))
    rows.append(("plan", str(r["plan"])))
    for name, path in r["plots"].items():
        rows.append((f"plot: {name}", str(path)))
    rows.append(("time (s)", ", ".join(f"{k} {v}" for k, v in r["seconds"].items())))
    for a, b in rows:
        t.add_row(a, b)
    Console().print(t)
