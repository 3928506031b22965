"""Training throughput of the centralized trainer: agent-steps/s of the full PPO loop.

One iteration = one episode batch collected (``num_envs`` x ``episode_length`` env-steps, each of
which is one step of every agent) plus the PPO update on it, at each environment's preset
settings. Environments are measured round-robin after a warm-up; the table reports medians and
where the time goes (rollout vs update).

    python benchmarks/train_throughput.py [--envs speaker_listener factory platoon] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from fedcomm.clients.ppo import ValueNorm, compute_targets, ppo_update
from fedcomm.clients.rollout import collect
from fedcomm.clients.team import Team
from fedcomm.clients.transport import LocalTransport
from fedcomm.presets import preset
from fedcomm.sim.registry import make_env


class Loop:
    def __init__(self, env_name: str) -> None:
        self.cfg = preset(env_name)
        torch.manual_seed(0)
        self.env = make_env(self.cfg.env, self.cfg.num_envs, **self.cfg.env_kwargs)
        self.team = Team(self.env.spec, self.cfg.team)
        self.transport = LocalTransport(self.env)
        self.opt = torch.optim.Adam(self.team.parameters(), lr=self.cfg.ppo.lr, eps=1e-5)
        self.value_norm = ValueNorm(self.env.spec.n_agents)
        self.it = 0

    def iteration(self) -> tuple[float, float]:
        self.it += 1
        t0 = time.perf_counter()
        rollout = collect(self.team, self.transport, seed=self.it)
        t1 = time.perf_counter()
        targets = compute_targets(rollout, self.cfg.ppo, self.value_norm)
        ppo_update(self.team, self.opt, rollout, self.cfg.ppo, targets)
        return t1 - t0, time.perf_counter() - t1

    @property
    def agent_steps(self) -> int:
        spec = self.env.spec
        return self.cfg.num_envs * spec.episode_length * spec.n_agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["speaker_listener", "factory", "platoon"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loops = {name: Loop(name) for name in args.envs}
    for loop in loops.values():
        loop.iteration()  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            samples[name].append(loop.iteration())

    table = Table(title=f"PPO loop, preset settings, {args.threads} threads, "
                        f"median of {args.repeats}")
    for col in ("env", "agents", "envs x steps", "rollout s", "update s", "agent-steps/s",
                "env-steps/s"):
        table.add_column(col, justify="right")
    report = {}
    for name, loop in loops.items():
        roll = statistics.median(s[0] for s in samples[name])
        upd = statistics.median(s[1] for s in samples[name])
        total = statistics.median(s[0] + s[1] for s in samples[name])
        spec = loop.env.spec
        report[name] = {"rollout_s": roll, "update_s": upd, "iteration_s": total,
                        "agent_steps_per_s": loop.agent_steps / total,
                        "env_steps_per_s": loop.agent_steps / spec.n_agents / total,
                        "samples": samples[name]}
        table.add_row(name, str(spec.n_agents), f"{loop.cfg.num_envs} x {spec.episode_length}",
                      f"{roll:.3f}", f"{upd:.3f}", f"{loop.agent_steps / total:,.0f}",
                      f"{loop.agent_steps / spec.n_agents / total:,.0f}")
    Console(width=120).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
