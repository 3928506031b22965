"""The DP ceiling of randomized response against the composed budget and the release schedule.

For each composed epsilon per episode (replace-one, every release of a sender counted) and each
release schedule (every k steps), the per-release epsilon that spends the budget exactly, and the
return of the scripted team that communicates through it (``fedcomm.baselines.evaluate_ceiling``:
each sender releases the oracle's symbol by K-ary randomized response, each receiver acts on its
Bayes posterior), as a share of the no-comm -> oracle gap. It says which budgets and schedules
can carry an environment's knowledge at all, before anything is trained.

    python benchmarks/ceilings.py --env factory --epsilons 4 8 16 --every 1 2 5 8 13 25
"""

from __future__ import annotations

import argparse
import math

from rich.console import Console
from rich.table import Table

from fedcomm.baselines import evaluate_ceiling, evaluate_scripted
from fedcomm.config import TeamConfig
from fedcomm.privacy.budget import PrivacyBudget
from fedcomm.privacy.calibrate import smallest_noise
from fedcomm.privacy.events import RandomizedResponse
from fedcomm.sim.registry import make_env


def per_release_epsilon(total: float, releases: int, symbols: int, delta: float) -> float:
    """The largest epsilon per release whose ``releases`` compose to ``total`` per episode."""
    budget = PrivacyBudget(math.inf, delta)

    def composed(noise: float) -> float:  # for randomized response the noise is 1 / epsilon
        return budget.epsilon_of([RandomizedResponse("message", 1 / noise, symbols, releases,
                                                     "replace_one")])

    return 1 / smallest_noise(composed, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="factory")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 5, 8, 13, 25])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--episodes", type=int, default=4000)
    args = parser.parse_args()

    probe = make_env(args.env, 1)
    probe.reset(0)
    values = [v for _, v in probe.channel_symbols().values()]
    # Calibrated for the sender with the fewest values: its randomized response loses the
    # most per release, so every sender's releases hold the budget.
    symbols, fewest = max(values), min(values)
    length = probe.spec.episode_length
    no_comm = evaluate_scripted(args.env, "no_comm", args.episodes).return_mean
    oracle = evaluate_scripted(args.env, "oracle", args.episodes).return_mean

    table = Table(title=f"{args.env}: DP ceiling of randomized response over "
                        f"{fewest}-{symbols} values "
                        f"(no comm {no_comm:.2f}, oracle {oracle:.2f}, {args.episodes} episodes)")
    for column in ("epsilon per episode", "release every", "releases", "epsilon per release",
                   "ceiling", "gap closed"):
        table.add_column(column, justify="right")
    for total in args.epsilons:
        for every in args.every:
            releases = math.ceil(length / every)
            eps = per_release_epsilon(total, releases, fewest, args.delta)
            team = TeamConfig(channel="discrete", symbols=symbols, rr_epsilon=eps,
                              release_every=every, accumulate=every > 1)
            ceiling = evaluate_ceiling(args.env, team, args.episodes).return_mean
            table.add_row(f"{total:g}", str(every), str(releases), f"{eps:.2f}",
                          f"{ceiling:.2f}", f"{(ceiling - no_comm) / (oracle - no_comm):.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
