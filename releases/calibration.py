"""The noise of every mechanism calibrated to what a run asks: one budget split over the
mechanisms in use, or a target epsilon per mechanism.

``calibrate`` sets the noise multipliers: each mechanism with a target epsilon gets the least
noise that meets it alone; one budget ``epsilon`` is split over the mechanisms in use (weights in
``DEFAULT_WEIGHTS``, a mechanism's target fixing its own) and turns DP-SGD on in a federated
run. What each mechanism releases for a unit comes from the run's plan (``releases.plan``),
worked out once per agent.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedcomm.config import TrainConfig
from fedcomm.presets import PRIVATE_FEEDBACK_CLIP, UNCLIPPED
from fedcomm.privacy.accountants import make_accountant
from fedcomm.privacy.budget import PrivacyBudget
from fedcomm.privacy.calibrate import Mechanism, search_epsilon, smallest_noise, split_budget
from fedcomm.privacy.events import GaussianRelease, gaussian_release
from fedcomm.releases.plan import Schedule, training, unit_releases
from fedcomm.releases.schedule import (
    Training,
    composition_for,
    for_unit,
    message_release,
    update_sample_rate,
)

DEFAULT_WEIGHTS = {"message": 0.5, "feedback": 0.25, "update": 0.25}
"""How one budget is split: each mechanism's own epsilon in proportion to its weight, scaled
until all of them compose to the budget."""


def calibrate(train: TrainConfig, schedule: Schedule) -> TrainConfig:
    """``train`` with the noise of every mechanism that has a target (or a part of
    ``epsilon``) calibrated, and ``privacy.split`` stating each one's epsilon alone."""
    cfg = train.privacy
    targets = {"message": cfg.message_epsilon, "feedback": cfg.feedback_epsilon,
               "update": cfg.update_target}
    if cfg.epsilon is None and all(t is None for t in targets.values()):
        return train
    # a calibrated update is DP-SGD's: then the episode's own batch is what composes
    dp_sgd = schedule.federated and (cfg.update_noise_multiplier is not None
                                     or cfg.epsilon is not None or cfg.update_target is not None)
    how: Training = "dp_sgd" if dp_sgd else training(train, schedule)
    if (train.team.feedback_clip >= UNCLIPPED
            and (cfg.epsilon is not None or cfg.feedback_epsilon is not None)):
        train = replace(train, team=replace(train.team, feedback_clip=PRIVATE_FEEDBACK_CLIP))
    per_agent = [unit_releases(train, schedule, i, how) for i in range(train.spec.n_agents)]
    mechanisms = _mechanisms(train, per_agent, how, targets)
    if cfg.epsilon is not None:
        calibrated_names = {m.name for m in mechanisms}
        parties = [sorted({r.mechanism for r in releases} & calibrated_names)
                   for releases in per_agent]
        split = split_budget(cfg.epsilon, cfg.delta, mechanisms, cfg.accountant, cfg.relation,
                             together=[p for p in parties if p])
        noise, stated = split.noise, split.epsilon
    else:
        acc = make_accountant(cfg.accountant)
        chosen = [m for m in mechanisms if m.target is not None]
        noise = {m.name: smallest_noise(lambda s, m=m: search_epsilon(
            m.releases(s), cfg.delta, acc, cfg.relation), m.target) for m in chosen}
        # stated by the run's accountant, which is what its report states
        stated = {m.name: _alone(train, m, noise[m.name]) for m in chosen}
    team, privacy = train.team, train.privacy
    if "message" in noise and team.channel == "discrete":
        team = replace(team, rr_epsilon=1 / noise["message"])
    elif "message" in noise:
        team = replace(team, noise_multiplier=noise["message"])
    if "feedback" in noise:
        team = replace(team, feedback_noise_multiplier=noise["feedback"])
    if "update" in noise:
        privacy = replace(privacy, update_noise_multiplier=noise["update"])
    return replace(train, team=team, privacy=replace(privacy, split=stated))


def _alone(train: TrainConfig, m: Mechanism, sigma: float) -> float:
    budget = PrivacyBudget(math.inf, train.privacy.delta, train.privacy.accountant,
                           train.privacy.relation)
    return budget.epsilon_of(m.releases(sigma))


def _mechanisms(train: TrainConfig, per_agent: list[list[GaussianRelease]], how: Training,
                targets: dict[str, float | None]) -> list[Mechanism]:
    """The mechanisms the planned run uses (``per_agent``: what composes for each agent's
    unit), each as what composes of it for the unit of the agent that releases most of it, at
    a noise multiplier."""
    cfg = train.privacy
    counts: dict[str, int] = {}
    for releases in per_agent:
        mine: dict[str, int] = {}
        for r in releases:
            mine[r.mechanism] = mine.get(r.mechanism, 0) + r.count
        for name, n in mine.items():
            counts[name] = max(counts.get(name, 0), n)
    q = update_sample_rate(cfg, train.ppo)
    make = {  # for randomized response the "noise" is 1 / epsilon per release
        "message": lambda s, n: [message_release(
            replace(train.team, noise_multiplier=s, rr_epsilon=1 / max(s, 1e-12)),
            cfg.relation, n)],
        "feedback": lambda s, n: [gaussian_release("feedback", s, train.team.feedback_clip,
                                                   relation=cfg.relation, count=n)],
        "update": lambda s, n: for_unit([gaussian_release(
            "update", s, cfg.update_clip, relation=cfg.relation, sample_rate=q,
            count=n)], cfg.unit, composition_for(how), train.num_envs),
    }
    out = []
    for name, count in counts.items():
        if name == "update" and how != "dp_sgd":
            continue  # plain PPO: nothing to calibrate (its epsilon is infinite)
        out.append(Mechanism(name, lambda s, name=name, count=count: make[name](s, count),
                             DEFAULT_WEIGHTS[name], targets[name]))
    return out
