"""Cost of DP-SGD in a party's PPO update: one update, plain (``ppo_update``) vs DP-SGD over
episodes (``dp_ppo_update``), on one agent's party at each environment's preset settings.

The party's rollout is what the agent records in a federated run (its own trajectories plus
the vectors delivered to it), cut from a whole team's batch; the DIAL feedback is random.
Both updates start from the same weights and a fresh optimizer each repeat; the table reports
medians of wall and CPU time and the ratio DP / plain. One thread by default: on a shared,
busy machine a second OpenMP thread makes each small op wait for it at a barrier (a 6 us bmm
took 7 ms), which swamps what is measured.

    python benchmarks/dpsgd_overhead.py [--envs speaker_listener factory] [--repeats 3]
    python benchmarks/dpsgd_overhead.py --envs speaker_listener --team recurrent=true
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from fedcomm.learning.dpsgd import dp_ppo_update
from fedcomm.learning.ppo import ValueNorm, compute_targets, make_optimizer, ppo_update
from fedcomm.learning.rollout import collect, party_rollout
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team
from fedcomm.presets import preset
from fedcomm.sim.registry import make_env


class Setting:
    def __init__(self, env_name: str, agent: int, team: dict[str, bool]) -> None:
        self.cfg = preset(env_name)
        self.cfg = replace(self.cfg, team=replace(self.cfg.team, **team))
        torch.manual_seed(0)
        env = make_env(self.cfg.env, self.cfg.num_envs, **self.cfg.env_kwargs)
        whole = Team(env.spec, self.cfg.team)
        rollout = collect(whole, LocalTransport(env), seed=0)
        self.agent = agent
        self.team = whole.subteam([agent])
        self.rollout = party_rollout(whole, rollout, agent)
        self.targets = compute_targets(self.rollout, self.cfg.ppo, ValueNorm(1))
        self.feedback = torch.randn_like(self.rollout.noise) * 1e-2
        self.optimizer = make_optimizer(self.team.parameters(), self.cfg.ppo.lr)

    def fresh(self) -> tuple[Team, torch.optim.Optimizer]:
        team = copy.deepcopy(self.team)
        opt = make_optimizer(team.parameters(), self.cfg.ppo.lr)
        return team, opt

    def plain(self, seed: int) -> tuple[float, float]:
        team, opt = self.fresh()
        t0, c0 = time.perf_counter(), time.process_time()
        ppo_update(team, opt, self.rollout, self.cfg.ppo, self.targets,
                   torch.Generator().manual_seed(seed), feedback=self.feedback)
        return time.perf_counter() - t0, time.process_time() - c0

    def dp(self, seed: int) -> tuple[float, float]:
        team, opt = self.fresh()
        t0, c0 = time.perf_counter(), time.process_time()
        dp_ppo_update(team, opt, self.rollout, self.cfg.ppo, self.targets,
                      noise_multiplier=1.0, clip=1.0, sample_rate=1 / self.cfg.ppo.minibatches,
                      generator=torch.Generator().manual_seed(seed),
                      noise_generator=torch.Generator().manual_seed(seed + 1),
                      feedback=self.feedback)
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["speaker_listener", "factory"])
    parser.add_argument("--agent", type=int, default=0, help="the party's agent index")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--team", nargs="*", default=[], metavar="FIELD=true|false",
                        help="team options over the preset's, e.g. recurrent=true")
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    team = {k: v.lower() == "true" for k, v in (t.split("=", 1) for t in args.team)}
    settings = {name: Setting(name, args.agent, team) for name in args.envs}
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, s in settings.items():
        s.plain(0), s.dp(0)  # warm-up
        samples[name] = {"plain": [], "dp": []}
        for r in range(args.repeats):  # interleaved, so that load changes hit both alike
            samples[name]["plain"].append(s.plain(r + 1))
            samples[name]["dp"].append(s.dp(r + 1))

    table = Table(title=f"One PPO update of agent {args.agent}'s party, preset settings, "
                        f"{args.threads} thread(s), median of {args.repeats}"
                        + "".join(f", {t}" for t in args.team))
    for col in ("env", "envs x steps", "epochs x minibatches", "plain s", "DP-SGD s",
                "DP/plain wall", "DP/plain CPU"):
        table.add_column(col, justify="right")
    report = {}
    for name, s in settings.items():
        med = {mode: [statistics.median(x[i] for x in samples[name][mode]) for i in (0, 1)]
               for mode in ("plain", "dp")}
        spec = s.team.spec
        table.add_row(name, f"{s.rollout.num_envs} x {spec.episode_length}",
                      f"{s.cfg.ppo.epochs} x {s.cfg.ppo.minibatches}", f"{med['plain'][0]:.3f}",
                      f"{med['dp'][0]:.3f}", f"{med['dp'][0] / med['plain'][0]:.2f}",
                      f"{med['dp'][1] / med['plain'][1]:.2f}")
        report[name] = {"plain_wall_s": med["plain"][0], "dp_wall_s": med["dp"][0],
                        "plain_cpu_s": med["plain"][1], "dp_cpu_s": med["dp"][1],
                        "ratio_wall": med["dp"][0] / med["plain"][0],
                        "ratio_cpu": med["dp"][1] / med["plain"][1], **samples[name]}
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
