"""Training throughput of the centralized trainer: agent-steps/s of the full PPO loop.

One iteration = one episode batch collected (``num_envs`` x ``episode_length`` env-steps, each of
which is one step of every agent) plus the PPO update on it, at each environment's preset
settings (``--num-envs`` overrides the batch, keeping the minibatch count). Every (environment,
batch, device) is measured round-robin after a warm-up, so devices are compared side by side;
the table reports medians and where the time goes (rollout vs update).

    python benchmarks/train_throughput.py [--envs speaker_listener factory platoon] [--repeats 5]
    python benchmarks/train_throughput.py --envs speaker_listener --devices cpu cuda \\
        --num-envs 4096 16384 65536
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from fedcomm.device import describe, resolve_device
from fedcomm.learning.ppo import ValueNorm, compute_targets, make_optimizer, ppo_update
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team
from fedcomm.presets import preset
from fedcomm.sim.registry import make_env


class Loop:
    def __init__(self, env_name: str, num_envs: int | None = None, device: str = "cpu") -> None:
        self.cfg = preset(env_name)
        if num_envs:
            self.cfg = replace(self.cfg, num_envs=num_envs)
        self.device = resolve_device(device)
        torch.manual_seed(0)
        self.env = make_env(self.cfg.env, self.cfg.num_envs, self.device, **self.cfg.env_kwargs)
        self.team = Team(self.env.spec, self.cfg.team).to(self.device)
        self.transport = LocalTransport(self.env)
        self.opt = make_optimizer(self.team.parameters(), self.cfg.ppo.lr)
        self.value_norm = ValueNorm(self.env.spec.n_agents).to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(0)
        self.it = 0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def iteration(self) -> tuple[float, float]:
        self.it += 1
        t0 = self._now()
        rollout = collect(self.team, self.transport, seed=self.it, generator=self.generator)
        t1 = self._now()
        targets = compute_targets(rollout, self.cfg.ppo, self.value_norm)
        ppo_update(self.team, self.opt, rollout, self.cfg.ppo, targets, self.generator)
        return t1 - t0, self._now() - t1

    @property
    def agent_steps(self) -> int:
        spec = self.env.spec
        return self.cfg.num_envs * spec.episode_length * spec.n_agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["speaker_listener", "factory", "platoon"])
    parser.add_argument("--num-envs", nargs="+", type=int, default=[0],
                        help="episode batch sizes (default: each preset's)")
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loops = {(name, n, device): Loop(name, n, device)
             for name in args.envs for n in args.num_envs for device in args.devices}
    for loop in loops.values():
        loop.iteration()  # warm-up
    samples: dict[tuple, list[tuple[float, float]]] = {key: [] for key in loops}
    for _ in range(args.repeats):
        for key, loop in loops.items():
            samples[key].append(loop.iteration())

    table = Table(title=f"PPO loop, preset settings, {args.threads} CPU threads, "
                        f"median of {args.repeats}")
    for col in ("env", "agents", "device", "envs x steps", "minibatches", "rollout s",
                "update s", "agent-steps/s", "env-steps/s"):
        table.add_column(col, justify="right")
    report = []
    for key, loop in loops.items():
        name = loop.cfg.env
        roll = statistics.median(s[0] for s in samples[key])
        upd = statistics.median(s[1] for s in samples[key])
        total = statistics.median(s[0] + s[1] for s in samples[key])
        spec = loop.env.spec
        env_steps = loop.agent_steps / spec.n_agents
        report.append({"env": name, "device": describe(loop.device),
                       "num_envs": loop.cfg.num_envs, "minibatches": loop.cfg.ppo.minibatches,
                       "rollout_s": roll, "update_s": upd, "iteration_s": total,
                       "agent_steps_per_s": loop.agent_steps / total,
                       "env_steps_per_s": env_steps / total, "samples": samples[key]})
        table.add_row(name, str(spec.n_agents), describe(loop.device),
                      f"{loop.cfg.num_envs} x {spec.episode_length}",
                      str(loop.cfg.ppo.minibatches), f"{roll:.3f}", f"{upd:.3f}",
                      f"{loop.agent_steps / total:,.0f}", f"{env_steps / total:,.0f}")
    Console(width=140).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
