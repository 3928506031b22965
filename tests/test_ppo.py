"""PPO's pieces against straightforward references: GAE, the running value norm, the learning
rate schedule."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import Tensor

from fedcomm.learning.ppo import ValueNorm, annealed_lr, gae


def reference_gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> Tensor:
    """``A_t = sum_k (gamma lam)^k delta_{t+k}``, ``delta_t = r_t + gamma V_{t+1} - V_t``, with
    ``V_T = 0`` (fixed-horizon episodes: nothing follows the last step), one env at a time."""
    t_len, batch, agents = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(batch):
        for n in range(agents):
            r, v = rewards[:, b, n].tolist(), values[:, b, n].tolist()
            delta = [r[t] + gamma * (v[t + 1] if t + 1 < t_len else 0.0) - v[t]
                     for t in range(t_len)]
            for t in range(t_len):
                adv[t, b, n] = sum((gamma * lam) ** k * delta[t + k] for k in range(t_len - t))
    return adv


@pytest.mark.parametrize(("shape", "gamma", "lam"), [
    ((25, 4, 3), 0.99, 0.95), ((7, 5, 1), 0.9, 0.5), ((1, 3, 2), 0.99, 0.95),
    ((12, 2, 4), 0.8, 0.0), ((12, 2, 4), 0.95, 1.0)])
def test_gae_matches_the_discounted_sum_of_td_errors(shape: tuple[int, int, int],
                                                     gamma: float, lam: float) -> None:
    """Every step, env and agent, including the last step, which bootstraps from nothing."""
    g = torch.Generator().manual_seed(sum(shape))
    rewards = torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    adv = gae(rewards, values, gamma, lam)
    assert adv.shape == rewards.shape
    torch.testing.assert_close(adv, reference_gae(rewards, values, gamma, lam),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adv[-1], rewards[-1] - values[-1], rtol=1e-12, atol=1e-12)


def test_undiscounted_gae_is_reward_to_go_minus_value() -> None:
    """``gamma = lam = 1``: the advantage is the rest of the episode's reward less the value."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(10, 6, 3, generator=g, dtype=torch.float64)
    values = torch.randn(10, 6, 3, generator=g, dtype=torch.float64)
    to_go = rewards.flip(0).cumsum(0).flip(0)
    torch.testing.assert_close(gae(rewards, values, 1.0, 1.0), to_go - values,
                               rtol=1e-10, atol=1e-10)


def test_value_norm_tracks_the_statistics_of_everything_it_saw() -> None:
    """Several updates of different sizes give the mean and (biased) variance of all the data
    concatenated, per agent; the prior's weight (count 1e-4) is below the tolerance."""
    g = torch.Generator().manual_seed(0)
    offsets, scales = torch.tensor([5.0, -2.0, 0.1]), torch.tensor([3.0, 0.5, 10.0])
    batches = [torch.randn(t, b, 3, generator=g) * scales + offsets
               for t, b in ((25, 16), (25, 40), (10, 7), (25, 64))]
    norm = ValueNorm(3)
    for batch in batches:
        norm.update(batch)
    everything = torch.cat([b.reshape(-1, 3) for b in batches])
    torch.testing.assert_close(norm.mean, everything.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.var, everything.var(0, unbiased=False), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(norm.count, torch.tensor(everything.shape[0] + 1e-4))

    standard = norm.normalize(everything)
    torch.testing.assert_close(standard.mean(0), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(standard.std(0, unbiased=False), torch.ones(3), rtol=0,
                               atol=1e-4)
    x = torch.randn(20, 4, 3, generator=g) * 7
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.normalize(norm.denormalize(x)), x, rtol=1e-5, atol=1e-5)


def test_value_norm_keeps_each_agent_to_itself() -> None:
    """An agent's statistics are those of a norm fed its column alone: no other agent's
    returns enter them."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(25, 8, 3, generator=g) * torch.tensor([1.0, 100.0, 0.01])
               + torch.tensor([0.0, 50.0, -3.0]) for _ in range(3)]
    joint, alone = ValueNorm(3), [ValueNorm(1) for _ in range(3)]
    for batch in batches:
        joint.update(batch)
        for i, norm in enumerate(alone):
            norm.update(batch[..., i:i + 1])
    for i, norm in enumerate(alone):
        torch.testing.assert_close(joint.mean[i:i + 1], norm.mean)
        torch.testing.assert_close(joint.var[i:i + 1], norm.var)
    x = torch.randn(5, 3, generator=g)
    for i, norm in enumerate(alone):
        torch.testing.assert_close(joint.normalize(x)[:, i:i + 1], norm.normalize(x[:, i:i + 1]))


def test_learning_rate_decays_linearly_to_a_share_of_lr() -> None:
    """Iterations count from 1: the first gets ``lr``, the last ``lr / iterations``, each one
    less than the one before, by the same step."""
    lr, n = 3e-3, 50
    rates = [annealed_lr(lr, it, n) for it in range(1, n + 1)]
    assert rates[0] == pytest.approx(lr) and rates[-1] == pytest.approx(lr / n)
    steps = [a - b for a, b in pairwise(rates)]
    assert all(s == pytest.approx(lr / n) for s in steps)
    assert annealed_lr(lr, 1, 1) == pytest.approx(lr)


def test_time_budget_takes_over_when_further_along() -> None:
    """With a time budget the schedule follows whichever of iterations and time is further
    along, and never goes below ``lr / iterations``."""
    lr, n = 1.0, 100
    by_time = annealed_lr(lr, 10, n, time_frac=0.75)
    assert by_time == pytest.approx(lr * (1 - 0.75 + 1 / n))
    assert by_time < annealed_lr(lr, 10, n)
    assert annealed_lr(lr, 90, n, time_frac=0.75) == pytest.approx(annealed_lr(lr, 90, n))
    assert annealed_lr(lr, 10, n, time_frac=0.05) == pytest.approx(annealed_lr(lr, 10, n))
    assert annealed_lr(lr, 10, n, time_frac=1.0) == pytest.approx(lr / n)
    assert annealed_lr(lr, 10, n, time_frac=1.7) == pytest.approx(lr / n)  # past the budget
    fracs = [i / 20 for i in range(21)]
    rates = [annealed_lr(lr, 30, n, f) for f in fracs]
    assert all(a >= b for a, b in pairwise(rates))
