"""Pictures where a picture says more: search front, memory timeline, loss curve.

matplotlib is optional (``pip install tinytrain-mcu[plot]``); without it the functions raise an
ImportError that says so, and the CLI reports plots as skipped.
"""
from __future__ import annotations

import io
from typing import Dict, List, Sequence

from .fileio import write_atomic


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'tinytrain-mcu[plot]'") from exc
    return plt


def _save(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write_atomic(path, buf.getvalue())


def search_plot(result, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if result.evaluated:
        kb = [p / 1024 for p, _ in result.evaluated]
        ax.scatter(kb, [s for _, s in result.evaluated], s=8, alpha=0.35, label="schemes evaluated")
    if result.pareto:
        ax.step([p / 1024 for p, _ in result.pareto], [s for _, s in result.pareto], where="post",
                color="C1", label="Pareto front")
    ax.axvline(result.budget_bytes / 1024, color="C3", linestyle="--", label=f"budget {result.budget_bytes / 1024:.0f} KB")
    ax.scatter([result.peak_bytes / 1024], [result.score], color="C3", zorder=5, marker="*", s=120, label="chosen")
    ax.set_xlabel("peak SRAM of the training step (KB, planner)")
    ax.set_ylabel("summed contribution (accuracy points)")
    ax.set_title("Sparse-update search")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def memory_timeline_plot(timeline: Sequence[Dict[str, object]], path: str, budget_bytes: int,
                         arena_bytes: int, title: str = "Arena use per op") -> str:
    plt = _pyplot()
    live = [int(step["live_bytes"]) / 1024 for step in timeline]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.fill_between(range(len(live)), live, step="mid", alpha=0.5)
    ax.plot(range(len(live)), live, drawstyle="steps-mid")
    ax.axhline(budget_bytes / 1024, color="C3", linestyle="--", label=f"{budget_bytes / 1024:.0f} KB budget")
    ax.axhline(arena_bytes / 1024, color="C1", linestyle=":", label=f"arena {arena_bytes / 1024:.1f} KB (planned peak)")
    peak = max(live) if live else 0
    ax.set_title(f"{title}: at most {peak:.1f} KB live")
    ax.set_xlabel("op index in the training plan")
    ax.set_ylabel("live bytes (KB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def loss_curve_plot(history: Dict[str, List[float]], path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    loss = history.get("loss", [])
    ax.plot(range(1, len(loss) + 1), loss, marker="o", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if history.get("accuracy"):
        ax2 = ax.twinx()
        acc = [100 * a for a in history["accuracy"]]
        ax2.plot(range(1, len(acc) + 1), acc, marker="s", color="C2", label="accuracy")
        ax2.set_ylabel("accuracy (%)")
    ax.set_title("On-device training through the plan")
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def fleet_accuracy_plot(curves: Dict[str, List[float]], path: str, title: str = "Fleet: test accuracy per round",
                        xlabel: str = "round") -> str:
    """Accuracy (fractions) per federated round, or per ``xlabel`` (index 0: before training), one line per curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, acc in curves.items():
        ax.plot(range(len(acc)), [100 * a for a in acc], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out
