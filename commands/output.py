"""What the commands print: one console, the result table of a finished run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from fedcomm.jsonfile import number
from fedcomm.summary import RunSummary

console = Console(stderr=True)


def print_result(title: str, summary: RunSummary) -> None:
    """The trained team's return beside the scripted teams', the gap it closed, what it cost
    and what it spent in privacy."""
    table = Table(title=title)
    table.add_column("team")
    table.add_column("return", justify="right")
    table.add_column("± s.e.", justify="right")
    if summary.final is None:  # its private agents kept their returns, or it failed
        table.add_row("trained", "not known here", "")
    for name, res in [("trained", summary.final), *summary.baselines.items()]:
        if res is not None:
            table.add_row(name, f"{res.return_mean:.3f}", f"{res.return_se:.3f}")
    console.print(table)
    s = summary
    console.print(f"{gap_closed_text(s)}; {s.env_steps:,} env steps in {s.train_time_s:.0f} s "
                  f"({s.agent_steps_per_s:,.0f} agent-steps/s)")
    if s.privacy is not None:
        console.print(privacy_text(s.privacy), highlight=False)
    if s.silent_batches:
        batches = s.rounds * (s.batches_per_round or 1) if s.rounds else None
        console.print("[red]silent (privacy budget spent):[/] " + ", ".join(
            f"{agent} in {n}" + (f" of {batches}" if batches else "") + " training batches"
            for agent, n in s.silent_batches.items()), highlight=False)
    if s.stopped:
        console.print(f"[yellow]{s.stopped}[/]")


UNIT_TEXT = {("episode", "batch"): "per episode: its batch's releases (DP-SGD makes the later "
                                   "ones post-processing)",
             ("episode", "all"): "per episode, every release of the run composing (the "
                                 "networks train on it without DP-SGD)",
             ("history", "batch"): "per agent's whole history",
             ("history", "all"): "per agent's whole history"}


def privacy_text(p: dict) -> str:
    """The privacy line of a result: what holds for which unit, per mechanism and composed."""
    unit = UNIT_TEXT[p["unit"], p.get("composition", "batch")]
    per = ", ".join(f"{k} {eps_text(v)}" for k, v in p["epsilon"].items())
    budget = number(p.get("budget", "inf"))
    verdict = "within budget" if p["within_budget"] else "[red]OVER BUDGET[/]"
    cap = f" of budget {budget:g}" if budget != math.inf else ""
    return (f"privacy, largest over agents ({unit}; {p['relation'].replace('_', '-')}, delta "
            f"{p['delta']:g}): each alone {per}; composed {eps_text(p['composed'])}{cap}, "
            f"{verdict}; details in privacy_report.html")


def gap_closed_text(summary: RunSummary) -> str:
    """The share of the no_comm -> oracle gap closed, or why there is none to report."""
    if summary.gap_closed is not None:
        text = f"gap closed (no_comm -> oracle): {summary.gap_closed:.1%}"
        if summary.of_ceiling is not None and summary.ceiling_gap_closed is not None:
            text += (f"; of the DP ceiling's gap: {summary.of_ceiling:.1%} (the ceiling, a "
                     f"scripted team through the same mechanism, schedule and budget, closes "
                     f"{summary.ceiling_gap_closed:.1%})")
        return text
    missing = [m for m in summary.missing_baselines if m in ("no_comm", "oracle")]
    if missing:
        return (f"gap closed: n/a ({summary.env} has no scripted "
                f"{'/'.join(missing)} team)")
    return "gap closed: n/a (no_comm and oracle score the same)"


def eps_text(value: float | str) -> str:
    value = number(value)
    return "inf (no DP)" if value == math.inf else f"epsilon {value:.3g}"
