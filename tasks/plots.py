"""PNG charts and CSV histories of the per-step metrics (for MLflow and `dvc plots show`)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from rlhf_core.atomic import atomic_write_text


def write_history_csv(history: list[dict], path: Path) -> None:
    """One row per logged step; columns are the union of the metric names."""
    cols = ["step"] + sorted({k for row in history for k in row if k != "step"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def plot_note(text: str, path: Path) -> Path:
    """A chart that says why there are no curves (a stage that trained nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], ys: tuple[str, ...], title: str, path: Path) -> Path | None:
    """Line charts of `ys` against step, one panel each."""
    ys = tuple(y for y in ys if any(y in row for row in history))
    if not ys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(4 * len(ys), 3), squeeze=False)
    for ax, y in zip(axes[0], ys):
        pts = [(r["step"], r[y]) for r in history if y in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(y), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_comparison(results: dict, models: list[str], path: Path) -> Path:
    """Bars of judge score (sampled and greedy) and win rate vs SFT per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("judge_score", f"{results.get('judge', 'judge')} score (sampled)"),
              ("judge_score_greedy", f"{results.get('judge', 'judge')} score (greedy)"),
              ("win_rate_vs_sft", "win rate vs SFT"))
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, panels):
        vals = [results[m].get(key, 0.0) for m in models]
        bars = ax.bar(models, vals, color=["#888888", "#4c72b0", "#dd8452", "#55a868"][: len(models)])
        ax.bar_label(bars, fmt="%.2f")
        if key == "win_rate_vs_sft" or results.get("judge") == "oracle":  # a reward model's scale is open
            ax.set_ylim(0, 1.05)
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
