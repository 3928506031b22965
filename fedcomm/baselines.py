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

from fedcomm.config import TeamConfig
from fedcomm.jsonfile import number
from fedcomm.sim.base import VecEnv, one_hot
from fedcomm.sim.registry import make_env

Scripted = Literal["random", "no_comm", "oracle"]
SCRIPTED: tuple[Scripted, ...] = ("random", "no_comm", "oracle")
EVAL_SEED = 1_000_000_000  # evaluation episodes never reuse a training seed
CEILING = "ceiling"  # the scripted team that communicates through the run's own mechanism
# A run's scripted teams play at least this many episodes. They are cheap, and on episodes
# other than the trained team's (whose seeds the server never learns) their own sampling
# error moves every share of a gap: at 1,000 episodes speaker_listener's no_comm return is
# known to 0.25, 3% of the gap; at 8,192 to 0.09.
BASELINE_EPISODES = 8192


def baseline_label(name: str, private: bool) -> str:
    """How a result names scripted team ``name``: the ceiling is a DP ceiling only where the run
    is private; otherwise it is the ceiling of the run's channel, noise without a guarantee."""
    if name == CEILING:
        return "DP ceiling" if private else "channel ceiling"
    return name


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


@torch.no_grad()
def run_ceiling(env: VecEnv, team: TeamConfig, seed: int) -> torch.Tensor:
    """``[B]`` returns of one episode batch played by the scripted channel team: each sender
    releases its symbol through the team's mechanism on the team's schedule (randomized
    response at ``rr_epsilon``; or, Gaussian, a codeword of norm C plus noise of std sigma C),
    and each receiver acts on its Bayes posterior over what it heard: accumulated over the
    episode where the symbol holds for it and the team's receivers keep what they heard
    (``accumulate`` or ``recurrent``), else the latest release alone.

    Whatever the trained team learns through the same mechanism, schedule and budget, this is
    what a perfect code and a perfect reading of it achieve: the DP ceiling.
    """
    obs = env.reset(seed)
    generator = torch.Generator(device=env.device).manual_seed(seed)
    total = torch.zeros(env.num_envs, device=env.device)
    log_post: dict[int, torch.Tensor] = {}
    done, t = False, 0
    keeps = env.channel_persists and (team.accumulate or team.recurrent)
    while not done:
        symbols = env.channel_symbols()
        if not symbols:
            raise ValueError(f"{env.spec.name} has no scripted channel team")
        for agent, (symbol, values) in symbols.items():
            if not keeps or agent not in log_post:
                log_post[agent] = torch.zeros(env.num_envs, values, device=env.device)
            if t % team.release_every == 0:
                log_post[agent] = log_post[agent] + _heard(symbol, values, team, generator)
        posteriors = {a: torch.softmax(lp, dim=1) for a, lp in log_post.items()}
        step = env.step(env.channel_actions(posteriors, obs))
        total += step.reward.mean(dim=1)
        obs, done, t = step.obs, step.done, t + 1
    return total


def _heard(symbol: torch.Tensor, values: int, team: TeamConfig,
           generator: torch.Generator) -> torch.Tensor:
    """``[B, values]`` the log-likelihood of each value given one release of ``symbol``.

    Discrete: value ``v`` as codeword ``v mod K`` (the best code where the team has a
    codeword for each value), released by ``K``-ary randomized response over the team's
    ``K = symbols`` codewords, as the team's own releases are."""
    b, device = symbol.shape[0], symbol.device
    if team.channel == "discrete":
        k = team.symbols
        keep = math.log(math.exp(team.rr_epsilon) / (math.exp(team.rr_epsilon) + k - 1))
        other = math.log(1 / (math.exp(team.rr_epsilon) + k - 1))
        sent = symbol % k
        shift = torch.randint(1, k, (b,), generator=generator, device=device)
        kept = torch.rand(b, generator=generator, device=device) < math.exp(keep)
        released = torch.where(kept, sent, (sent + shift) % k)
        codes = torch.arange(values, device=device) % k
        return torch.where(codes[None] == released[:, None], keep, other)
    if values > team.comm_dim:
        raise ValueError(f"a Gaussian ceiling needs one codeword per value: {values} values "
                         f"in comm_dim {team.comm_dim}")
    std = team.noise_multiplier * team.clip
    codewords = torch.eye(values, team.comm_dim, device=device) * team.clip
    sent = codewords.index_select(0, symbol)
    received = sent + torch.randn(sent.shape, generator=generator, device=device) * std
    if std == 0:
        return torch.where(one_hot(symbol, values) > 0, 0.0, -math.inf)
    return -((received[:, None, :] - codewords[None]) ** 2).sum(-1) / (2 * std**2)


def evaluate_ceiling(env_name: str, team: TeamConfig, episodes: int, seed: int = 0,
                     batch: int = 1000, env_kwargs: dict | None = None,
                     device: str | torch.device = "cpu") -> EvalResult | None:
    """The DP ceiling of ``team``'s channel on ``env_name``; ``None`` where the environment
    has no scripted channel team (or a Gaussian channel has fewer dimensions than values)."""
    probe = make_env(env_name, 1, **(env_kwargs or {}))
    probe.reset(seed)
    symbols = probe.channel_symbols()
    if not symbols or (team.channel == "gaussian"
                       and max(v for _, v in symbols.values()) > team.comm_dim):
        return None  # no scripted channel team, or no Gaussian codebook of one word per value
    returns = [run_ceiling(make_env(env_name, n, device, **(env_kwargs or {})), team,
                           seed + i * batch) for i, n in enumerate(batches(episodes, batch))]
    return EvalResult.of(torch.cat(returns))


def evaluate_scripted(env_name: str, policy: Scripted, episodes: int, seed: int = 0,
                      batch: int = 1000, env_kwargs: dict | None = None,
                      device: str | torch.device = "cpu") -> EvalResult:
    returns = [run_scripted(make_env(env_name, n, device, **(env_kwargs or {})), policy,
                            seed + i * batch)
               for i, n in enumerate(batches(episodes, batch))]
    return EvalResult.of(torch.cat(returns))


def baseline_episodes(env_name: str, episodes: int, env_kwargs: dict | None = None) -> int:
    """How many episodes a run's scripted teams play: at least ``BASELINE_EPISODES`` where
    they define a gap (the environment has a team without communication), else
    ``episodes``."""
    teams = make_env(env_name, 1, **(env_kwargs or {})).scripted_teams
    return max(episodes, BASELINE_EPISODES) if "no_comm" in teams else episodes


def evaluate_baselines(env_name: str, episodes: int, seed: int = 0, batch: int = 1000,
                       env_kwargs: dict | None = None, device: str | torch.device = "cpu",
                       team: TeamConfig | None = None) -> dict[str, EvalResult]:
    """Every scripted team ``env_name`` has, in ``SCRIPTED`` order; the ones it lacks are left
    out, so that any environment can be trained and reported (``random`` always exists).
    Given the trained ``team``'s configuration, also its channel's DP ceiling (``ceiling``)
    where the environment has one and the team communicates."""
    have = make_env(env_name, 1, **(env_kwargs or {})).scripted_teams
    out = {name: evaluate_scripted(env_name, name, episodes, seed, batch, env_kwargs, device)
           for name in SCRIPTED if name in have}
    if team is not None and team.communicate:
        ceiling = evaluate_ceiling(env_name, team, episodes, seed, batch, env_kwargs, device)
        if ceiling is not None:
            out[CEILING] = ceiling
    return out


def _share(result: EvalResult | None, baselines: dict[str, EvalResult], top: str
           ) -> float | None:
    """The share of the no_comm -> ``top`` gap ``result`` closes; None where undefined."""
    if result is None or "no_comm" not in baselines or top not in baselines:
        return None
    low, high = baselines["no_comm"].return_mean, baselines[top].return_mean
    return (result.return_mean - low) / (high - low) if high != low else None


def _within_noise(a: EvalResult, b: EvalResult) -> bool:
    """Whether two teams' returns differ by at most two standard errors."""
    return abs(a.return_mean - b.return_mean) <= 2 * math.hypot(a.return_se, b.return_se)


def baseline_summary(final: EvalResult | None, baselines: dict[str, EvalResult]) -> dict:
    """A run summary's baselines, the missing ones named, ``gap_closed`` (the share of the
    no_comm -> oracle gap the team closes), and where the run has a DP ceiling,
    ``ceiling_gap_closed`` (the ceiling's own share of that gap) and ``of_ceiling`` (the share
    of the no_comm -> ceiling gap the team closes); None where undefined (no such teams, or
    no gap)."""
    out = {"baselines": {k: v.to_dict() for k, v in baselines.items()},
           "missing_baselines": [name for name in SCRIPTED if name not in baselines],
           "gap_closed": _share(final, baselines, "oracle")}
    if CEILING in baselines:
        out["ceiling_gap_closed"] = _share(baselines[CEILING], baselines, "oracle")
        # a ceiling that carries almost nothing has no gap of its own to share: noise
        out["of_ceiling"] = (None if "no_comm" in baselines
                             and _within_noise(baselines[CEILING], baselines["no_comm"])
                             else _share(final, baselines, CEILING))
    return out
