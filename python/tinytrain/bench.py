"""`tinytrain bench`: memory and time of one training step, tinytrain beside the frameworks a user
would otherwise pick, on the same model, scheme and batch size, in one run.

tinytrain's memory is the plan's arena (its executor's measured high-water mark equals it);
a peer's is the peak RSS of its process over the RSS after importing it (PyTorch's CPU allocator
keeps no statistics of its own), measured in a separate process: PyTorch when some interpreter on
the machine imports torch, onnxruntime-training when ``TINYTRAIN_ORT_PYTHON`` (or this interpreter)
has it. Times are medians of a few steps on
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

    from .peers.runner import ort_training_step, torch_step
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
                row = {"model": title, "key": key, "scheme": kind, "scheme_detail": how,
                       "tinytrain": {"peak_bytes": plan.memory.peak_bytes, "step_ms": step_ms,
                                     "flash_bytes": plan.memory.flash_bytes}}
                if peers:
                    mode = "full" if kind == "full" else "sparse"
                    row["torch"] = torch_step(q, mode, upd_w, upd_b, steps=steps)
                    row["ort"] = ort_training_step(q, mode, upd_w, upd_b, steps=steps)
                else:
                    row["torch"] = {"skipped": "--no-peers"}
                    row["ort"] = {"skipped": "--no-peers"}
                t = row["torch"]
                if "peak_rss_over_import_bytes" in t:
                    row["torch_memory_ratio"] = t["peak_rss_over_import_bytes"] / plan.memory.peak_bytes
                    row["torch_time_ratio"] = step_ms / t["step_ms_median"]
                o = row["ort"]
                if "peak_rss_over_import_bytes" in o:
                    row["ort_memory_ratio"] = o["peak_rss_over_import_bytes"] / plan.memory.peak_bytes
                    row["ort_time_ratio"] = step_ms / o["step_ms_median"]
                rows.append(row)
                advance()
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "steps_timed": steps, "rows": rows}


def print_table(report: Dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"One training step, batch 1 ({report['machine']}, {report['date']})")
    for col in ("model", "scheme", "tinytrain peak", "PyTorch peak", "ORT peak", "tinytrain ms", "PyTorch ms", "ORT ms"):
        t.add_column(col, justify="left" if col in ("model", "scheme") else "right", overflow="fold")

    def peer_mem(r, key):
        p = r.get(key, {})
        if "peak_rss_over_import_bytes" not in p:
            return "skipped"
        return f"{p['peak_rss_over_import_bytes'] / 2**20:.1f} MB ({r[key + '_memory_ratio']:.0f}x)"

    def peer_ms(r, key):
        p = r.get(key, {})
        return f"{p['step_ms_median']:.2f}" if "step_ms_median" in p else ""

    for r in report["rows"]:
        tt_ = r["tinytrain"]
        t.add_row(r["model"], r["scheme"], f"{tt_['peak_bytes'] / 1024:.1f} KB", peer_mem(r, "torch"),
                  peer_mem(r, "ort"), f"{tt_['step_ms']:.2f}", peer_ms(r, "torch"), peer_ms(r, "ort"))
    console = Console(width=max(Console().width, 120))
    console.print(t)
    for model, kind, detail in sorted({(r["model"], r["scheme"], r["scheme_detail"]) for r in report["rows"]}):
        if kind == "sparse":
            console.print(f"sparse scheme of {model}: {detail}")
    for key, name in (("torch", "PyTorch"), ("ort", "onnxruntime-training")):
        for reason in sorted({r.get(key, {}).get("skipped") for r in report["rows"]} - {None}):
            console.print(f"{name}: skipped: {reason}")
    frameworks = sorted({r[k]["framework"] for r in report["rows"] for k in ("torch", "ort") if "step_ms_median" in r.get(k, {})})
    if frameworks:
        console.print("peers: " + ", ".join(frameworks) + "; (Nx) = peer memory / tinytrain memory")
    console.print("peer memory = peak RSS of its process over the RSS after importing it; tinytrain memory = "
                  "the plan's arena (= the executor's measured high-water mark). Times: host CPU, one thread, "
                  "median step; compare only as ratios within one run.")


def bench_plot(report: Dict[str, object], path: str) -> str:
    from .plots import _pyplot, _save

    plt = _pyplot()
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = np.arange(len(rows))
    series = [("tinytrain (arena)", lambda r: r["tinytrain"]["peak_bytes"])]
    for key, name in (("torch", "PyTorch"), ("ort", "onnxruntime-training")):
        if any("peak_rss_over_import_bytes" in r.get(key, {}) for r in rows):
            series.append((f"{name} (peak RSS over import)",
                           lambda r, k=key: r.get(k, {}).get("peak_rss_over_import_bytes", 0)))
    width = 0.8 / len(series)
    for i, (label, value) in enumerate(series):
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, [value(r) / 1024 for r in rows], width, label=label)
    ax.axhline(256, color="C3", linestyle="--", label="256 KB")
    ax.set_yscale("log")
    ax.set_ylabel("KB (log scale)")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['key']}\n{r['scheme']}" for r in rows], fontsize=7, rotation=45, ha="right")
    ax.set_title("Memory of one training step, batch 1")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
