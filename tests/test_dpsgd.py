"""DP-SGD over episodes for a party's PPO update: per-episode gradients, clipping and noise."""

from __future__ import annotations

import math

import pytest
import torch

from fedcomm.config import PPOConfig, PrivacyConfig, TeamConfig
from fedcomm.learning.dpsgd import (
    clip_groups,
    dp_ppo_update,
    episode_gradients,
    released_statistics,
)
from fedcomm.learning.ppo import Targets, ValueNorm, compute_targets, ppo_loss, ppo_update
from fedcomm.learning.rollout import Rollout, collect, party_rollout, replay
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team
from fedcomm.releases.schedule import dp_steps, update_dp
from fedcomm.sim.factory import Factory


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: a second OpenMP thread only waits at barriers on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_party(envs: int = 8, recurrent: bool = False, agent: int = 6
               ) -> tuple[Team, Rollout, Targets, torch.Tensor]:
    """A factory party (an actuator: it receives and sends), its rollout, targets and a
    random DIAL feedback."""
    torch.manual_seed(0)
    env = Factory(envs)
    whole = Team(env.spec, TeamConfig(recurrent=recurrent))
    rollout = party_rollout(whole, collect(whole, LocalTransport(env), seed=0), agent)
    targets = compute_targets(rollout, PPOConfig(), ValueNorm(1))
    return whole.subteam([agent]), rollout, targets, torch.randn_like(rollout.noise) * 0.1


def flat(team: Team) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in team.parameters()])


def sgd_update(team: Team, rollout: Rollout, targets: Targets, cfg: PPOConfig, *,
               lr: float = 1.0, seed: int = 0, **dp) -> tuple[torch.Tensor, dict, int]:
    """The parameter change of one ``dp_ppo_update`` under SGD (``-lr`` times the gradients)."""
    before = flat(team)
    stats, steps = dp_ppo_update(team, torch.optim.SGD(team.parameters(), lr=lr), rollout, cfg,
                                 targets, generator=torch.Generator().manual_seed(seed),
                                 noise_generator=torch.Generator().manual_seed(seed + 1), **dp)
    return flat(team) - before, stats, steps


@pytest.mark.parametrize("recurrent", [False, True])
def test_episode_gradients_are_each_episodes_own_gradient(recurrent):
    team, rollout, targets, feedback = make_party(4, recurrent)
    cfg = PPOConfig()
    grads, stats = episode_gradients(team, rollout, targets, cfg, feedback)
    assert stats["approx_kl"].shape == (4,)
    names = [n for n, _ in team.named_parameters()]
    assert set(grads) == set(names)
    for e in range(4):
        env = torch.tensor([e])
        part = Targets(targets.advantages[:, env], targets.returns[:, env])
        loss, out, _ = ppo_loss(team, rollout.select(env), part, cfg, standardize=False)
        loss = loss + (out.messages * feedback[:, env]).sum()
        ref = torch.autograd.grad(loss, list(team.parameters()))
        for name, r in zip(names, ref):
            torch.testing.assert_close(grads[name][e], r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("envs", [1, 8])
def test_without_noise_or_clipping_a_step_is_a_ppo_update_step(envs):
    """Advantages standardised beforehand, which ``ppo_update``'s standardising keeps."""
    team, rollout, targets, feedback = make_party(8)
    keep = torch.arange(envs)
    rollout, feedback = rollout.select(keep), feedback[:, keep]
    adv = targets.advantages[:, keep]
    adv = (adv - adv.mean(dim=(0, 1))) / adv.std(dim=(0, 1))
    targets = Targets(adv, targets.returns[:, keep])
    cfg = PPOConfig(epochs=1, minibatches=1, max_grad_norm=math.inf)
    plain = Team(team.spec, team.cfg, team.agents)
    plain.load_state_dict(team.state_dict())
    before = flat(plain)
    ppo_update(plain, torch.optim.SGD(plain.parameters(), lr=1.0), rollout, cfg, targets,
               torch.Generator().manual_seed(0), feedback=feedback)
    expected = flat(plain) - before
    change, stats, steps = sgd_update(team, rollout, targets, cfg, noise_multiplier=0.0,
                                      clip=1e9, sample_rate=1.0, feedback=feedback)
    assert steps == 1 and stats["dp_episodes"] == envs and stats["dp_clip_frac"] == 0
    assert expected.norm() > 0
    torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6)


def test_each_episodes_whole_model_gradient_is_clipped():
    team, rollout, targets, feedback = make_party(8)
    clip = 1e-3  # far below every episode's gradient norm
    one = Team(team.spec, team.cfg, team.agents)
    one.load_state_dict(team.state_dict())
    keep = torch.tensor([5])
    change, stats, _ = sgd_update(
        one, rollout.select(keep), Targets(targets.advantages[:, keep], targets.returns[:, keep]),
        PPOConfig(epochs=1), noise_multiplier=0.0, clip=clip, sample_rate=1.0,
        feedback=feedback[:, keep])
    assert stats["dp_clip_frac"] == 1
    torch.testing.assert_close(change.norm().item(), clip, rtol=1e-3, atol=0)

    cfg = PPOConfig(epochs=1, minibatches=2)
    q = 1 / cfg.minibatches
    change, stats, steps = sgd_update(team, rollout, targets, cfg, noise_multiplier=0.0,
                                      clip=clip, sample_rate=q, feedback=feedback)
    sampled = stats["dp_episodes"] * steps
    assert steps == 2 and sampled > 0
    assert 0 < change.norm() <= clip * sampled / (q * rollout.num_envs) * (1 + 1e-5)


def zero_loss(envs: int) -> tuple[Team, Rollout, Targets, PPOConfig]:
    """No advantages and no value, entropy or route terms: every episode's gradient is 0."""
    team, rollout, targets, _ = make_party(envs)
    cfg = PPOConfig(epochs=1, vf_coef=0.0, ent_coef=0.0, graph_cost=0.0)
    return team, rollout, Targets(torch.zeros_like(targets.advantages), targets.returns), cfg


def test_the_noise_has_the_declared_std():
    team, rollout, targets, cfg = zero_loss(8)
    sigma, clip, q = 1.5, 0.4, 0.25
    cfg.epochs = 2
    change, stats, steps = sgd_update(team, rollout, targets, cfg, noise_multiplier=sigma,
                                      clip=clip, sample_rate=q)
    assert steps == 8 and stats["dp_episodes"] > 0
    std = sigma * clip * math.sqrt(steps) / (q * rollout.num_envs)  # the sum of the steps
    assert change.numel() > 10_000
    assert abs(change.std().item() / std - 1) < 0.03
    assert abs(change.mean().item()) < 4 * std / math.sqrt(change.numel())
    quarters = (change / std).abs().quantile(torch.tensor([0.5, 0.9]))  # Gaussian quantiles
    torch.testing.assert_close(quarters, torch.tensor([0.6745, 1.6449]), rtol=0.03, atol=0)


def test_a_step_without_episodes_still_adds_noise():
    team, rollout, targets, cfg = zero_loss(1)
    sigma, clip, q = 1.0, 2.0, 0.5
    for seed in range(64):  # a seed whose two steps sample nothing (1 in 4)
        change, stats, steps = sgd_update(team, rollout, targets, cfg, seed=seed,
                                          noise_multiplier=sigma, clip=clip, sample_rate=q)
        if stats["dp_episodes"] == 0:
            break
    assert steps == 2 and stats["dp_episodes"] == 0 and "approx_kl" not in stats
    std = sigma * clip * math.sqrt(steps) / q
    assert abs(change.std().item() / std - 1) < 0.03


def test_steps_are_counted_in_advance_and_a_partial_optimizer_is_refused():
    assert dp_steps(PPOConfig(epochs=4, minibatches=4), 1 / 4) == 16
    assert dp_steps(PPOConfig(epochs=3), 1.0) == 3
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="sample rate"):
            dp_steps(PPOConfig(), bad)
    team, rollout, targets, _ = make_party(2)
    partial = torch.optim.SGD(team.comm.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="exactly the team"):
        dp_ppo_update(team, partial, rollout, PPOConfig(), targets, noise_multiplier=1.0,
                      clip=1.0, sample_rate=0.5, generator=None, noise_generator=None)


def test_groups_clip_apart_within_the_one_clip():
    """The shared module to clip sqrt(w), the value networks to clip sqrt(v), the other
    private networks to the rest: each group's part scaled only where it exceeds its bound,
    the whole gradient of every episode within the clip. Shares that leave nothing for the
    other networks are refused."""
    g = torch.Generator().manual_seed(0)
    grads = {"comm.encoder.0.weight": torch.randn(64, 5, 3, generator=g),
             "value.0.0.weight": torch.randn(64, 7, generator=g) * 0.05,
             "features.0.0.weight": torch.randn(64, 4, 2, generator=g) * 3}
    grads["recall.0.0.weight"] = torch.randn(64, 3, 4, generator=g)
    grads["value.0.0.weight"][:32] *= 100  # half of the episodes' value parts exceed theirs
    shares = {"shared": 0.5, "value": 0.3, "recall": 0.1}
    out = clip_groups(grads, 2.0, shares)
    bounds = {"comm.encoder.0.weight": 2 * math.sqrt(0.5), "value.0.0.weight": 2 * math.sqrt(0.3),
              "recall.0.0.weight": 2 * math.sqrt(0.1), "features.0.0.weight": 2 * math.sqrt(0.1)}
    for name, bound in bounds.items():
        before, after = grads[name].flatten(1).norm(dim=1), out[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(after, before.clamp(max=bound))
        ratio = out[name].flatten(1) / grads[name].flatten(1)  # scaled, direction kept
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    total = torch.stack([v.flatten(1).norm(dim=1) for v in out.values()]).norm(dim=0)
    assert (total <= 2.0 * (1 + 1e-6)).all()
    assert (out["value.0.0.weight"][32:] == grads["value.0.0.weight"][32:]).all()
    alone = clip_groups(grads, 2.0, {"shared": 0.5})  # the others clipped together
    assert set(alone) == set(grads)
    rest = torch.stack([alone[k].flatten(1).norm(dim=1) for k in grads
                        if not k.startswith("comm.")]).norm(dim=0)
    assert (rest <= 2 * math.sqrt(0.5) * (1 + 1e-6)).all()
    for bad in ({"shared": 0.6, "value": 0.4}, {"value": 1.0}, {"private": 0.2}):
        with pytest.raises(ValueError, match="shares"):
            clip_groups(grads, 2.0, bad)


def test_a_recall_decoders_clip_share_reaches_dp_sgd():
    cfg = PrivacyConfig(update_noise_multiplier=1.0, update_value_share=0.3,
                        update_recall_share=0.15)
    assert update_dp(cfg, PPOConfig()).clip_shares == {"value": 0.3, "recall": 0.15}
    with pytest.raises(ValueError, match="update_recall_share"):
        PrivacyConfig(update_shared_share=0.5, update_value_share=0.3, update_recall_share=0.2)


def speaker_party(envs: int = 16) -> tuple[Team, Rollout, Targets, PPOConfig]:
    """speaker_listener's speaker on a discrete channel, learning its code from the reward
    with positive signalling."""
    from fedcomm.sim.speaker_listener import SpeakerListener

    torch.manual_seed(0)
    env = SpeakerListener(envs, say=False)
    cfg = TeamConfig(channel="discrete", symbols=3, rr_epsilon=4.0, release_every=5,
                     accumulate=True, routes="speaker>listener", feedback=False)
    whole = Team(env.spec, cfg)
    rollout = party_rollout(whole, collect(whole, LocalTransport(env), seed=0), 0)
    ppo = PPOConfig(signal_coef=0.05)
    return whole.subteam([0]), rollout, compute_targets(rollout, ppo, ValueNorm(1, 25.0)), ppo


def test_released_statistics_are_the_batch_means_without_noise_and_one_more_step():
    """Without noise, sampling or clipping: the advantages centred on the batch's exact mean
    per step, and the speaker's marginal the mean of its release distributions over the
    release steps and episodes. The release is one more step of the update's shape."""
    from fedcomm.privacy.config import PrivacyConfig
    from fedcomm.releases.schedule import DpSgd, update_releases

    team, rollout, targets, ppo = speaker_party()
    out = released_statistics(team, rollout, targets, ppo, noise_multiplier=0.0, clip=1e9,
                              sample_rate=1.0, generator=torch.Generator().manual_seed(0),
                              noise_generator=torch.Generator().manual_seed(1))
    expected = targets.advantages - targets.advantages.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-4, atol=1e-4)
    probs = replay(team, rollout).code_probs[::5, :, 0]  # the release steps
    torch.testing.assert_close(out.marginal[0], probs.mean(dim=(0, 1)), rtol=1e-4, atol=1e-5)
    assert out.returns is targets.returns

    noisy = released_statistics(team, rollout, targets, ppo, noise_multiplier=1.0, clip=1.0,
                                sample_rate=0.5, generator=torch.Generator().manual_seed(0),
                                noise_generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy.advantages, expected)
    torch.testing.assert_close(noisy.marginal.sum(dim=-1), torch.ones(1))

    cfg = PrivacyConfig(update_noise_multiplier=1.0, update_statistics=True)
    assert dp_steps(PPOConfig(), 0.25, statistics=True) == 17
    assert update_releases(cfg, PPOConfig())[0].count == 17
    stats, steps = dp_ppo_update(team, torch.optim.SGD(team.parameters(), lr=0.1), rollout, ppo,
                                 targets, noise_multiplier=1.0, clip=1.0, sample_rate=0.25,
                                 generator=torch.Generator().manual_seed(0),
                                 noise_generator=torch.Generator().manual_seed(1),
                                 statistics=True)
    assert steps == 17 and math.isfinite(stats["policy_loss"])
    with pytest.raises(ValueError, match="marginal"):  # signalling without it: refused
        dp_ppo_update(team, torch.optim.SGD(team.parameters(), lr=0.1), rollout, ppo, targets,
                      noise_multiplier=1.0, clip=1.0, sample_rate=0.25,
                      generator=torch.Generator(), noise_generator=torch.Generator())
    assert DpSgd(1.0, 1.0, 0.25).statistics is False
