"""``plot.png``: train and eval curves of a run's main metrics."""
from __future__ import annotations

import os
from pathlib import Path

PLOT_PANELS = (
    ("loss", ("loss", "eval/loss")),
    ("preference accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("reward margin", ("rewards/margins", "eval/rewards/margins")),
    ("UPO auxiliary term", ("aux/advantage_mean", "aux/weight_mean", "value/loss",
                            "eval/aux/implicit_reward_corr")),
)


def plot_history(history: list[dict], path: Path) -> None:
    """``plot.png``: train (lines) and eval (dots) curves of the main metrics, with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for record in history for k in record}
    panels = [(title, [k for k in names if k in keys]) for title, names in PLOT_PANELS]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        panels = [("loss", ["loss"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            points = [(r["step"], r[name]) for r in history if name in r]
            if not points:
                continue
            steps, values = zip(*points)
            style = "o-" if name.startswith("eval/") else "-"
            ax.plot(steps, values, style, markersize=3, linewidth=1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def save_figure(fig, path: Path, dpi: int) -> None:
    """Lay out, write atomically (a temporary file, then ``os.replace``) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
