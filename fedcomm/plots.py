"""Plots a person would rather look at than read: the learning curve against the baselines."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedcomm.baselines import baseline_label
from fedcomm.jsonfile import number

if TYPE_CHECKING:
    from fedcomm.config import TeamConfig
    from fedcomm.summary import RunSummary

BASELINE_STYLE = {"random": ":", "no_comm": "--", "oracle": "-.",
                  "ceiling": (0, (6, 2, 1, 2, 1, 2))}
FEW_POINTS = 20  # a curve of fewer points shows each as a marker
TITLE_WIDTH = 88  # characters of a title line that fit the figure's width


def channel_text(team: TeamConfig) -> str:
    """What the team's knowledge messages go through, in words, with the mechanism's figures."""
    if not team.communicate:
        return "no communication"
    if team.channel == "discrete":
        e, k = math.exp(team.rr_epsilon), team.symbols
        keep = e / (e + k - 1)
        return (f"{k} codewords under randomized response, epsilon {team.rr_epsilon:.3g} "
                f"(codeword kept w.p. {keep:.2f})")
    if team.noise_multiplier == 0:
        return f"Gaussian channel without noise (clip {team.clip:g})"
    return f"Gaussian channel, sigma={team.noise_multiplier:g}, clip {team.clip:g}"


def privacy_words(privacy: dict[str, Any] | None) -> str:
    """Whether the run is private and at what composed epsilon, from its privacy summary
    (``releases.report.report_summary``); empty where there is none."""
    if privacy is None:
        return ""
    if not privacy.get("epsilon"):
        return "releases nothing"
    composed = number(privacy["composed"])
    if composed == math.inf:
        return "not private (no DP: epsilon inf)"
    unit = "per episode" if privacy["unit"] == "episode" else "per agent's history"
    return f"DP at composed epsilon {composed:.3g} {unit}"


def curve_title(env: str, mode: str, team: TeamConfig, privacy: dict[str, Any] | None,
                server: str) -> str:
    """A learning curve's title: the environment, how it was trained, its channel, what the
    server aggregates (``server``, in words) and whether it was private."""
    last = "; ".join(part for part in (server, privacy_words(privacy)) if part)
    return f"{env}: {mode}\n{channel_text(team)}\n{last}"


def learning_curve(metrics: list[dict], summary: RunSummary, path: Path, title: str) -> None:
    """Training and evaluation return over environment steps, the final evaluation and each
    scripted team's return; a short run's few points are drawn as markers. The PNG's
    ``Title`` text chunk holds ``title``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [m for m in metrics if m.get("return_mean") is not None]
    few = len(rows) < FEW_POINTS
    ax.plot([m["env_steps"] for m in rows], [m["return_mean"] for m in rows],
            color="tab:blue", alpha=0.5, marker="o" if few else None, ms=4,
            label="training (sampled actions)")
    evals = [m for m in metrics if m.get("eval_return") is not None]
    if evals:
        ax.plot([m["env_steps"] for m in evals], [m["eval_return"] for m in evals], "o-",
                color="tab:blue", ms=3, label="evaluation (greedy)")
    if summary.final is not None:
        ax.plot([summary.env_steps], [summary.final.return_mean], "D", color="tab:blue", ms=6,
                label=f"final evaluation {summary.final.return_mean:.2f} "
                      f"({summary.final.episodes:,} episodes)")
    for name, res in summary.baselines.items():
        ax.axhline(res.return_mean, color="gray", ls=BASELINE_STYLE.get(name, "-"), lw=1,
                   label=f"{baseline_label(name, summary.private)} {res.return_mean:.2f}")
    steps = [m["env_steps"] for m in rows] + [summary.env_steps]
    if len(set(steps)) == 1:  # one point: a range around it, not a sliver
        ax.set_xlim(0, 2 * steps[0])
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return per agent")
    ax.set_title("\n".join(textwrap.fill(line, TITLE_WIDTH) for line in title.split("\n")),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})  # the title, readable as text
    plt.close(fig)
