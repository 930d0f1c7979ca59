"""`tinytrain bench`: memory and time of one training step, tinytrain beside the frameworks a user
would otherwise pick, on the same model, scheme and batch size, in one run.

tinytrain's memory is the plan's arena (its executor's measured high-water mark equals it);
PyTorch's is the peak RSS of its process over the RSS after importing it (its CPU allocator keeps
no statistics of its own), measured in a separate process. Times are medians of a few steps on
this machine, one thread each; compare them as ratios from the same run only.
"""
from __future__ import annotations

import json
import platform
import time
from typing import Dict, List, Optional

import numpy as np

ZOO = {
    "mcunet-5fps": ("MCUNet-5FPS", lambda tt: tt.models.mcunet_5fps(resolution=128, num_classes=10)),
    "mbv2-w0.35": ("MobileNetV2-w0.35", lambda tt: tt.models.mobilenetv2(width=0.35, resolution=128, num_classes=10)),
    "proxyless-w0.3": ("ProxylessNAS-w0.3", lambda tt: tt.models.proxylessnas(width=0.3, resolution=128, num_classes=10)),
    "demo": ("demo (digits, 32x32)", lambda tt: tt.models.demo()),
}
SCHEMES = ("full", "bias", "sparse")


def _scheme(tt, q, kind: str, model_key: str, data):
    """full / bias-only / sparse: searched for the demo model (on its digits task), the paper's
    kind of scheme for the 128x128 zoo networks (their weights are random, so a search there
    would measure noise)."""
    if kind == "full":
        return tt.schemes.full(q), "every weight and bias"
    if kind == "bias":
        return tt.schemes.bias_only(q), "every bias"
    if model_key == "demo":
        x, y = data
        res = tt.search(q, x[:320], y[:320], budget="256KB", population=24, generations=12, epochs=1)
        return res.scheme, "searched under 256 KB"
    return tt.schemes.paper_sparse(q), "paper's kind of sparse scheme"


def _time_steps(trainer, x: np.ndarray, y: np.ndarray, steps: int) -> float:
    trainer.step(x[0], y[0])  # warm-up
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.step(x[i % len(x)], y[i % len(y)])
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def run_bench(models: List[str], schemes: List[str], steps: int = 5, peers: bool = True,
              progress: bool = True) -> Dict[str, object]:
    import tinytrain as tt

    from .peers.runner import torch_step
    from .progress import progress_bar

    rows = []
    with progress_bar("benchmark", total=len(models) * len(schemes), enabled=progress) as advance:
        for key in models:
            if key not in ZOO:
                raise ValueError(f"unknown model {key!r}; choose from {', '.join(ZOO)}")
            title, build = ZOO[key]
            g = tt.load_onnx(build(tt))
            if key == "demo":
                x, y = tt.datasets.digits("target", "train")
                q = tt.quantize(g, tt.datasets.digits("source", "train")[0][:256])
            else:
                rng = np.random.default_rng(0)
                x = rng.uniform(0.0, 1.0, size=(max(steps, 4),) + tuple(g.tensors[g.input].shape)).astype(np.float32)
                y = rng.integers(0, 10, size=len(x))
                q = tt.quantize(g, x[:4])
            for kind in schemes:
                scheme, how = _scheme(tt, q, kind, key, (x, y))
                plan = tt.compile(q, scheme)
                trainer = tt.Trainer(plan, lr=0.0)  # lr 0: same work, weights stay put between timings
                step_ms = _time_steps(trainer, x, y, steps)
                if trainer.high_water_bytes != plan.memory.peak_bytes:
                    raise AssertionError(f"{title} {kind}: executor high-water {trainer.high_water_bytes} "
                                         f"!= planned peak {plan.memory.peak_bytes}")
                resolved = scheme.resolved(q.layers)
                upd_w = [n for n, r in resolved.items() if r["ratio"] > 0]
                upd_b = [n for n, r in resolved.items() if r["bias"]]
                row = {"model": title, "scheme": kind, "scheme_detail": how,
                       "tinytrain": {"peak_bytes": plan.memory.peak_bytes, "step_ms": step_ms,
                                     "flash_bytes": plan.memory.flash_bytes}}
                if peers:
                    mode = "full" if kind == "full" else "sparse"
                    row["torch"] = torch_step(q, mode, upd_w, upd_b, steps=steps)
                    row["onnxruntime-training"] = {"skipped": _ort_training_status()}
                else:
                    row["torch"] = {"skipped": "--no-peers"}
                t = row["torch"]
                if "peak_rss_over_import_bytes" in t:
                    row["torch_memory_ratio"] = t["peak_rss_over_import_bytes"] / plan.memory.peak_bytes
                    row["torch_time_ratio"] = step_ms / t["step_ms_median"]
                rows.append(row)
                advance()
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "steps_timed": steps, "rows": rows}


def _ort_training_status() -> str:
    from .peers.runner import python_with

    if python_with("onnxruntime.training") is None:
        return "onnxruntime-training is not installed (see ../shared/notes/peers-measured.md for its pitfalls)"
    return "onnxruntime-training is installed but its runner is not part of this release"


def print_table(report: Dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"One training step, batch 1 ({report['machine']}, {report['date']})")
    for col in ("model", "scheme", "tinytrain peak", "PyTorch peak", "PyTorch/tinytrain",
                "tinytrain ms", "PyTorch ms", "tinytrain/PyTorch"):
        t.add_column(col, justify="left" if col in ("model", "scheme") else "right", overflow="fold")
    for r in report["rows"]:
        tt_ = r["tinytrain"]
        torch = r.get("torch", {})
        has = "peak_rss_over_import_bytes" in torch
        t.add_row(r["model"], r["scheme"],
                  f"{tt_['peak_bytes'] / 1024:.1f} KB",
                  f"{torch['peak_rss_over_import_bytes'] / 2**20:.1f} MB" if has else "skipped",
                  f"{r['torch_memory_ratio']:.0f}x" if has else "",
                  f"{tt_['step_ms']:.2f}",
                  f"{torch['step_ms_median']:.2f}" if has else "",
                  f"{r['torch_time_ratio']:.2f}x" if has else "")
    console = Console(width=max(Console().width, 120))
    console.print(t)
    for model, kind, detail in sorted({(r["model"], r["scheme"], r["scheme_detail"]) for r in report["rows"]}):
        if kind == "sparse":
            console.print(f"sparse scheme of {model}: {detail}")
    skipped = {r["torch"].get("skipped") for r in report["rows"] if "skipped" in r.get("torch", {})}
    for reason in sorted(s for s in skipped if s):
        console.print(f"PyTorch: skipped: {reason}")
    ort = {r.get("onnxruntime-training", {}).get("skipped") for r in report["rows"]}
    for reason in sorted(s for s in ort if s):
        console.print(f"onnxruntime-training: skipped: {reason}")
    console.print("PyTorch memory = peak RSS of its process over the RSS after importing it; tinytrain memory = "
                  "the plan's arena (= the executor's measured high-water mark). Times: host CPU, one thread, "
                  "median step; compare only as ratios within one run.")


def bench_plot(report: Dict[str, object], path: str) -> str:
    from .plots import _pyplot, _save

    plt = _pyplot()
    rows = [r for r in report["rows"] if "peak_rss_over_import_bytes" in r.get("torch", {})]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['model'].split(' ')[0]}\n{r['scheme']}" for r in report["rows"]]
    xs = np.arange(len(report["rows"]))
    ax.bar(xs - 0.2, [r["tinytrain"]["peak_bytes"] / 1024 for r in report["rows"]], 0.4, label="tinytrain (arena)")
    if rows:
        ax.bar([i + 0.2 for i, r in enumerate(report["rows"]) if r in rows],
               [r["torch"]["peak_rss_over_import_bytes"] / 1024 for r in rows], 0.4, label="PyTorch (peak RSS over import)")
    ax.axhline(256, color="C3", linestyle="--", label="256 KB")
    ax.set_yscale("log")
    ax.set_ylabel("KB (log scale)")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title("Memory of one training step, batch 1")
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def main(models: List[str], schemes: List[str], steps: int, peers: bool, json_output: bool,
         plot: Optional[str]) -> int:
    report = run_bench(models, schemes, steps=steps, peers=peers, progress=not json_output)
    if plot:
        report["plot"] = bench_plot(report, plot)
    if json_output:
        print(json.dumps(report, default=float))
    else:
        print_table(report)
        if plot:
            print(f"plot: {report['plot']}")
    return 0
