"""The centralized reference trainer: every agent in one process and one autograd graph.

Same models, environment and channel noise as the federated system; what it lacks is the
separation into parties. It is the upper bound federation and privacy are measured against, and
the fast loop for research.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from fedcomm.baselines import EVAL_SEED, EvalResult, baseline_episodes, evaluate_baselines
from fedcomm.config import TrainConfig
from fedcomm.device import describe, resolve_device
from fedcomm.learning.evaluate import evaluate_team
from fedcomm.learning.importance import communication_importance
from fedcomm.learning.ppo import ValueNorm, annealed_lr, compute_targets, make_optimizer, ppo_update
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import TEAM_FILE, Team
from fedcomm.plots import curve_title, learning_curve
from fedcomm.progress import progress_bar, status
from fedcomm.releases.account import LEDGER, AgentPrivacy
from fedcomm.releases.plan import PrivacyPlan, plan_of
from fedcomm.releases.report import report_summary, write_run_report
from fedcomm.releases.schedule import composition_for
from fedcomm.rundir import RunDir
from fedcomm.sim.registry import make_env
from fedcomm.summary import RunResult, RunSummary


def train(cfg: TrainConfig, out: str | Path, progress: bool = True,
          plan: PrivacyPlan | None = None) -> RunResult:
    """Train ``cfg`` centrally into ``out``; a run that cannot fit its privacy budget is refused
    (``ValueError``) before anything is written, by its ``plan`` (made here if not given)."""
    if plan is None:  # the caller has not planned the run: refused here if it cannot fit
        plan_of(cfg)
    run = RunDir(out)
    run.write_config(asdict(cfg))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    env = make_env(cfg.env, cfg.num_envs, device, **cfg.env_kwargs)
    transport = LocalTransport(env)
    team = Team(env.spec, cfg.team).to(device)  # initialised on the CPU: the same on any device
    optimizer = make_optimizer(team.parameters(), cfg.ppo.lr)
    value_norm = ValueNorm(env.spec.n_agents).to(device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    per_iter = cfg.num_envs * env.spec.episode_length
    iterations = max(1, cfg.env_steps // per_iter)

    def evaluate() -> EvalResult:
        return evaluate_team(team, cfg.env, cfg.eval_episodes, EVAL_SEED,
                             env_kwargs=cfg.env_kwargs)

    # The vectors agents exchange in training are accounted per agent as they would be between
    # parties; one process holds every agent, so the run stops when any budget is spent.
    ledgers = {a: run.path / "agents" / a / LEDGER for a in env.spec.agent_ids}
    privacy = [AgentPrivacy(a, i, env.spec, cfg.team, cfg.privacy, ledgers[a], asdict(cfg),
                            device=device, composition=composition_for("plain"),
                            episodes=cfg.num_envs)
               for i, a in enumerate(env.spec.agent_ids)]
    noise = privacy[0].noise
    stopped = ""

    start, train_time, it = time.perf_counter(), 0.0, 0
    with progress_bar(progress) as bar:
        task = bar.add_task(f"train {cfg.env}", total=iterations, status="")
        for it in range(1, iterations + 1):
            t0 = time.perf_counter()
            time_frac = train_time / cfg.time_budget if cfg.time_budget else 0.0
            lr = annealed_lr(cfg.ppo.lr, it, iterations, time_frac) if cfg.anneal_lr else cfg.ppo.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            routes = team.kept_routes()
            messages = [[r for r in p.batch_releases(routes) if r.mechanism == "message"]
                        for p in privacy]
            if not all(p.allows(m, batch=it) for p, m in zip(privacy, messages)):
                stopped = f"privacy budget spent: training stopped before iteration {it}"
                it -= 1
                break
            for p, m in zip(privacy, messages):
                p.charge(m, round=it, batch=it)
            rollout = collect(team, transport, seed=cfg.seed * 1_000_000 + it,
                              generator=generator, noise=noise)
            targets = compute_targets(rollout, cfg.ppo, value_norm)
            stats = ppo_update(team, optimizer, rollout, cfg.ppo, targets, generator)
            train_time += time.perf_counter() - t0
            row = {"iteration": it, "env_steps": it * per_iter,
                   "agent_steps": it * per_iter * env.spec.n_agents,
                   "return_mean": rollout.episode_return().mean().item(),
                   "train_time_s": train_time, "lr": lr, **stats}
            if cfg.eval_every and it % cfg.eval_every == 0:
                row["eval_return"] = evaluate().return_mean
            run.append_metrics(row)
            bar.update(task, advance=1, status=status(row))
            if cfg.time_budget and train_time >= cfg.time_budget:
                break

    for p in privacy:
        p.close()
    report = write_run_report(run.path, asdict(cfg), cfg.team, cfg.privacy, ledgers,
                              mechanisms=("message",))
    # The checkpoint first: whatever fails after it, nothing trained is lost.
    team.save(run.path / TEAM_FILE, {"value_norm": value_norm.state_dict()})
    final = evaluate()
    baselines = evaluate_baselines(
        cfg.env, baseline_episodes(cfg.env, cfg.eval_episodes, cfg.env_kwargs), EVAL_SEED,
        env_kwargs=cfg.env_kwargs, device=device, team=cfg.team)
    importance = communication_importance(
        team, collect(team, LocalTransport(make_env(cfg.env, 256, device, **cfg.env_kwargs)),
                      seed=EVAL_SEED, greedy=True))
    summary = RunSummary.of(
        env=cfg.env, mode="centralized", device=describe(device), final=final,
        baselines=baselines, iterations=it, env_steps=it * per_iter, train_time_s=train_time,
        wall_time_s=time.perf_counter() - start, n_agents=env.spec.n_agents,
        agent_types=[t.name for t in env.spec.types],
        route_strength=team.comm.route_strength().detach().cpu(),
        prune_threshold=cfg.team.prune_threshold, importance=importance.tolist(),
        privacy=report_summary(report), stopped=stopped or None)
    run.write_summary(summary)
    learning_curve(run.metrics(), summary, run.path / "learning_curve.png",
                   curve_title(cfg.env, "centralized", cfg.team, summary.privacy,
                               "one process, no server"))
    return RunResult(run.path, summary, run.metrics())
