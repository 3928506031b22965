"""The scripted reference teams of an environment and what a trained team is measured against.

Each environment with scripted teams has a random team, a team without communication and a
full-information oracle; the share of the no_comm -> oracle gap a trained team closes is the
measured value of its communication. An episode's return is the sum of its rewards averaged
over agents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from fedcomm.jsonfile import number
from fedcomm.sim.base import VecEnv
from fedcomm.sim.registry import make_env

Scripted = Literal["random", "no_comm", "oracle"]
SCRIPTED: tuple[Scripted, ...] = ("random", "no_comm", "oracle")
EVAL_SEED = 1_000_000_000  # evaluation episodes never reuse a training seed


@dataclass
class EvalResult:
    return_mean: float
    return_se: float
    episodes: int

    @classmethod
    def of(cls, returns: torch.Tensor) -> EvalResult:
        n = returns.numel()
        se = returns.std().item() / math.sqrt(n) if n > 1 else float("nan")
        return cls(returns.mean().item(), se, n)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        """From ``to_dict`` output as JSON holds it (an undefined standard error is null)."""
        return cls(float(d["return_mean"]), number(d["return_se"]), int(d["episodes"]))


def batches(episodes: int, batch: int) -> list[int]:
    return [min(batch, episodes - s) for s in range(0, episodes, batch)]


@torch.no_grad()
def run_scripted(env: VecEnv, policy: Scripted, seed: int) -> torch.Tensor:
    """``[B]`` returns of one episode batch played by a scripted team."""
    obs = env.reset(seed)
    generator = torch.Generator(device=env.device).manual_seed(seed)
    total = torch.zeros(env.num_envs, device=env.device)
    done = False
    while not done:
        step = env.step(env.scripted_actions(policy, obs, generator))
        total += step.reward.mean(dim=1)
        obs, done = step.obs, step.done
    return total


def evaluate_scripted(env_name: str, policy: Scripted, episodes: int, seed: int = 0,
                      batch: int = 1000, env_kwargs: dict | None = None,
                      device: str | torch.device = "cpu") -> EvalResult:
    returns = [run_scripted(make_env(env_name, n, device, **(env_kwargs or {})), policy,
                            seed + i * batch)
               for i, n in enumerate(batches(episodes, batch))]
    return EvalResult.of(torch.cat(returns))


def evaluate_baselines(env_name: str, episodes: int, seed: int = 0, batch: int = 1000,
                       env_kwargs: dict | None = None,
                       device: str | torch.device = "cpu") -> dict[str, EvalResult]:
    """Every scripted team ``env_name`` has, in ``SCRIPTED`` order; the ones it lacks are left
    out, so that any environment can be trained and reported (``random`` always exists)."""
    have = make_env(env_name, 1, **(env_kwargs or {})).scripted_teams
    return {name: evaluate_scripted(env_name, name, episodes, seed, batch, env_kwargs, device)
            for name in SCRIPTED if name in have}


def baseline_summary(final: EvalResult, baselines: dict[str, EvalResult]) -> dict:
    """A run summary's baselines, the missing ones named, and ``gap_closed``: the share of the
    no_comm -> oracle gap the team closes, None where it is undefined (no such teams, or no gap)."""
    gap_closed = None
    if "no_comm" in baselines and "oracle" in baselines:
        low, high = baselines["no_comm"].return_mean, baselines["oracle"].return_mean
        if high != low:
            gap_closed = (final.return_mean - low) / (high - low)
    return {"baselines": {k: v.to_dict() for k, v in baselines.items()},
            "missing_baselines": [name for name in SCRIPTED if name not in baselines],
            "gap_closed": gap_closed}
