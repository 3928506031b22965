"""What the commands print: one console, the result table of a finished run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from fedcomm.baselines import baseline_label
from fedcomm.config import FederationConfig, TrainConfig
from fedcomm.jsonfile import number
from fedcomm.summary import RunSummary

console = Console(stderr=True)


def print_result(title: str, summary: RunSummary, batches: int | None = None) -> None:
    """The trained team's return beside the scripted teams', each with the episodes it was
    evaluated on, the gap it closed, what it cost and what it spent in privacy; ``batches``,
    the training batches a federated run did per agent, for its silent agents."""
    table = Table(title=title)
    table.add_column("team")
    table.add_column("return", justify="right")
    table.add_column("± s.e.", justify="right")
    table.add_column("episodes", justify="right")
    if summary.final is None:  # its private agents kept their returns, or it failed
        table.add_row("trained", "not known here", "", "")
    rows = [("trained", summary.final), *((baseline_label(name, summary.private), res)
                                          for name, res in summary.baselines.items())]
    for name, res in rows:
        if res is not None:
            table.add_row(name, f"{res.return_mean:.3f}", f"{res.return_se:.3f}",
                          f"{res.episodes:,}")
    console.print(table)
    s = summary
    console.print(f"{gap_closed_text(s)}; {s.env_steps:,} env steps in {s.train_time_s:.0f} s "
                  f"({s.agent_steps_per_s:,.0f} agent-steps/s)")
    if s.privacy is not None:
        console.print(privacy_text(s.privacy), highlight=False)
        if "client_level" in s.privacy:
            console.print(client_level_text(s.privacy["client_level"]), highlight=False)
    if s.silent_batches:
        console.print("[red]silent (privacy budget spent):[/] " + ", ".join(
            f"{agent} in {n}" + (f" of {batches}" if batches else "") + " training batches"
            for agent, n in s.silent_batches.items()), highlight=False)
    if s.stopped:
        console.print(f"[yellow]{s.stopped}[/]")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, in the plural unless ``n`` is 1."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def rounds_text(fed: FederationConfig, done: int = 0) -> str:
    """What a federated run will train after round ``done``: its rounds, the episode batches
    each agent trains on in each (the last round may be shorter) and the environment steps,
    with why they differ from ``--env-steps`` where they do."""
    sizes = [len(fed.batches_in(r)) for r in range(done + 1, fed.rounds + 1)]
    if not sizes:
        return f"nothing left to train: {done} of {plural(fed.rounds, 'round')} done"
    batches = plural(sizes[0], "episode batch", "episode batches")
    text = f"{plural(len(sizes), 'round')} of {batches} per agent"
    if sizes[-1] != sizes[0]:
        text += f", the last of {sizes[-1]}"
    if done:
        which = (f"round {fed.rounds}" if done + 1 == fed.rounds
                 else f"rounds {done + 1}-{fed.rounds}")
        text = f"{which} of {fed.rounds}: {text}"
    return f"{text} ({steps_text(fed.train, sum(sizes), asked=not done)})"


def steps_text(train: TrainConfig, batches: int, asked: bool = True) -> str:
    """The environment steps of ``batches`` episode batches of ``train`` and, with ``asked``,
    why they are not ``--env-steps`` where they are not (whole batches, at least one)."""
    steps = batches * train.batch_steps
    text = f"{steps:,} env steps"
    if asked and steps != train.env_steps:
        text += (f"; {train.env_steps:,} asked, in whole batches of {train.num_envs:,} "
                 f"episodes x {train.spec.episode_length} steps")
    return text


UNIT_TEXT = {("episode", "batch"): "per episode: its batch's releases (DP-SGD, or agents that "
                                   "release and do not train, make the later ones "
                                   "post-processing)",
             ("episode", "all"): "per episode, every release of the run composing (the "
                                 "networks train on it without DP-SGD)",
             ("history", "batch"): "per agent's whole history",
             ("history", "all"): "per agent's whole history"}


def privacy_text(p: dict) -> str:
    """The privacy line of a result: what holds for which unit, per mechanism and composed; a
    run that released nothing, or released without noise, says so instead of a verdict."""
    if not p["epsilon"]:
        return ("privacy: nothing released (no agent sent a vector, feedback or update "
                "through a mechanism; every ledger is empty): no privacy spent; details in "
                "privacy_report.html")
    per = ", ".join(f"{k} {eps_text(v)}" for k, v in p["epsilon"].items())
    budget, composed = number(p.get("budget", "inf")), number(p["composed"])
    if budget == math.inf:
        verdict = ", no budget"
    elif p["within_budget"]:
        verdict = f" of budget {budget:g}, within budget"
    else:
        verdict = f" of budget {budget:g}, [red]OVER BUDGET[/]"
    if composed == math.inf:
        noiseless = [k for k, v in p["epsilon"].items() if number(v) == math.inf]
        return (f"privacy: [red]NOT PRIVATE[/] (no DP guarantee): {' and '.join(noiseless)} "
                f"released without noise; each alone {per}; composed inf{verdict}; "
                f"details in privacy_report.html")
    unit = UNIT_TEXT[p["unit"], p.get("composition", "batch")]
    return (f"privacy, largest over agents ({unit}; {p['relation'].replace('_', '-')}, delta "
            f"{p['delta']:g}): each alone {per}; composed {eps_text(composed)}{verdict}; "
            f"details in privacy_report.html")


def client_level_text(c: dict) -> str:
    """The client-level line of a run under secure aggregation with the agents' noise."""
    return (f"client-level DP of the aggregated module, largest over agents (per agent's whole "
            f"participation, every round; replace-one, delta {c['delta']:g}): "
            f"{eps_text(c['epsilon'])}, the agents' noise summed under SecAgg+ (against a "
            "server that follows the protocol, or any one member of the cohort); details in "
            "client_dp_report.html")


def gap_closed_text(summary: RunSummary) -> str:
    """The share of the no_comm -> oracle gap closed, or why there is none to report."""
    if summary.gap_closed is not None:
        text = f"gap closed (no_comm -> oracle): {summary.gap_closed:.1%}"
        if summary.of_ceiling is not None and summary.ceiling_gap_closed is not None:
            if summary.private:
                what = ("DP ceiling's", "the same mechanism, schedule and budget")
            else:  # the run's noise is no privacy mechanism: no DP in the ceiling either
                what = ("channel ceiling's", "the same channel and schedule, no DP")
            text += (f"; of the {what[0]} gap: {summary.of_ceiling:.1%} (the ceiling, a "
                     f"scripted team through {what[1]}, closes "
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


def design_lines(fed: FederationConfig, private_default: bool) -> list[str]:
    """Before training: the design ``--epsilon`` chose where the run is an environment's
    private default with a design table, and its DP ceiling, the share of the gap that the
    mechanism lets a perfect code and the listener's best response to what it hears close
    (stated after training too, on the same scripted episodes)."""
    from fedcomm.baselines import (
        BASELINE_EPISODES,
        CEILING,
        EVAL_SEED,
        baseline_summary,
        evaluate_baselines,
    )
    from fedcomm.presets import CODE_WARMUP, PRIVATE_DESIGNS, design_for

    train, lines = fed.train, []
    epsilon = train.privacy.epsilon
    if private_default and epsilon is not None and train.env in PRIVATE_DESIGNS:
        design = design_for(train.env, epsilon)
        run = {"--symbols": (design.symbols, train.team.symbols),
               "--update-share": (design.update_share, train.privacy.update_share),
               "--num-envs": (design.num_envs, train.num_envs),
               "--env-steps": (design.env_steps, train.env_steps),
               "--code-warmup": (CODE_WARMUP, train.team.code_warmup)}
        given = [f"{flag} {ran:g}" if isinstance(ran, float) else f"{flag} {ran}"
                 for flag, (row, ran) in run.items() if row != ran and ran is not None]
        lines.append(f"design for epsilon {epsilon:g}: {design.describe()}"
                     + (f"; given instead: {', '.join(given)}" if given else ""))
    if epsilon is None or not train.team.communicate:
        return lines
    baselines = evaluate_baselines(train.env, BASELINE_EPISODES, EVAL_SEED,
                                   env_kwargs=train.env_kwargs, team=train.team)
    share = baseline_summary(None, baselines).get("ceiling_gap_closed")
    if CEILING in baselines and share is not None:
        lines.append(f"DP ceiling of this design: {share:.1%} of the no_comm -> oracle gap (a "
                     "scripted team through the same mechanism, schedule and budget: the best "
                     "code, and the listener's best response to what it hears)")
    return lines
