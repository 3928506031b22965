"""Plots a person would rather look at than read: the learning curve against the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from fedcomm.summary import RunSummary

BASELINE_STYLE = {"random": ":", "no_comm": "--", "oracle": "-.",
                  "ceiling": (0, (6, 2, 1, 2, 1, 2))}


def learning_curve(metrics: list[dict], summary: RunSummary, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [m["env_steps"] for m in metrics]
    ax.plot(steps, [m["return_mean"] for m in metrics], color="tab:blue", alpha=0.5,
            label="training (sampled actions)")
    evals = [m for m in metrics if m.get("eval_return") is not None]
    if evals:
        ax.plot([m["env_steps"] for m in evals], [m["eval_return"] for m in evals], "o-",
                color="tab:blue", ms=3, label="evaluation (greedy)")
    for name, res in summary.baselines.items():
        ax.axhline(res.return_mean, color="gray", ls=BASELINE_STYLE.get(name, "-"), lw=1,
                   label=f"{name} {res.return_mean:.2f}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return per agent")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
