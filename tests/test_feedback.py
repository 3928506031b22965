"""DIAL feedback: parties exchanging gradients reproduce the one-graph gradient exactly."""


import pytest
import torch

from fedcomm.config import PPOConfig, TeamConfig
from fedcomm.learning.feedback import in_process_feedback, privatize, receiver_feedback
from fedcomm.learning.ppo import ValueNorm, compute_targets, ppo_loss
from fedcomm.learning.rollout import collect, party_rollout
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team
from fedcomm.sim.factory import Factory
from fedcomm.sim.platoon import Platoon

DISCRETE = {"channel": "discrete", "symbols": 4, "rr_epsilon": 3.0}


@pytest.mark.integration  # up to 12 s per team
@pytest.mark.parametrize(("env_cls", "team"), [
    (Factory, {}), (Platoon, {}), (Factory, {"accumulate": True}),
    (Factory, DISCRETE), (Factory, {**DISCRETE, "accumulate": True, "release_every": 5})])
def test_summed_receiver_feedback_equals_the_in_process_gradient(env_cls, team):
    # With ``accumulate`` a vector keeps shaping what its receivers hear for the rest of the
    # episode: the feedback must carry those later steps' gradients too. Through a discrete
    # channel it reaches the sender's encoder by the straight-through gradient of the
    # released codeword's expectation, on the steps its schedule releases.
    torch.manual_seed(0)
    env = env_cls(16)
    whole = Team(env.spec, TeamConfig(noise_multiplier=0.0, **team))
    cfg = PPOConfig()
    rollout = collect(whole, LocalTransport(env), seed=1,
                      generator=torch.Generator().manual_seed(1))
    reference = in_process_feedback(whole, rollout, compute_targets(rollout, cfg,
                                    ValueNorm(env.spec.n_agents)), cfg)
    assert reference.abs().sum() > 0

    summed = torch.zeros_like(reference)
    for agent in range(env.spec.n_agents):
        party = whole.subteam([agent])
        mine = party_rollout(whole, rollout, agent)
        targets = compute_targets(mine, cfg, ValueNorm(1))
        summed += receiver_feedback(party, mine, targets, cfg)
    torch.testing.assert_close(summed, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.integration  # about 7 s
def test_feedback_vanishes_where_nothing_was_delivered():
    torch.manual_seed(0)
    env = Factory(8)
    whole = Team(env.spec, TeamConfig(noise_multiplier=0.0))
    with torch.no_grad():  # keep only sensor -> actuator routes
        whole.comm.graph.fill_(-5.0)
        whole.comm.graph[0, 2] = 5.0
    rollout = collect(whole, LocalTransport(env), seed=0)
    actuator = 6
    mine = party_rollout(whole, rollout, actuator)
    grads = receiver_feedback(whole.subteam([actuator]), mine,
                              compute_targets(mine, PPOConfig(), ValueNorm(1)), PPOConfig())
    from_sensors = grads[:, :, :2].abs().sum(dim=(0, 1, 3))
    assert (from_sensors > 0).all()
    assert grads[:, :, 2:].abs().sum() == 0  # processors and actuators delivered nothing


def test_privatize_clips_each_episode_and_adds_the_declared_noise():
    grads = torch.randn(25, 64, 3, 16) * 10
    clipped = privatize(grads, clip=0.5, noise_multiplier=0.0)
    norms = clipped.permute(1, 2, 0, 3).flatten(2).norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 0.5), atol=1e-5)
    small = grads * 1e-4
    torch.testing.assert_close(privatize(small, clip=0.5, noise_multiplier=0.0), small)
    noisy = privatize(torch.zeros(25, 400, 3, 16), 2.0, 0.75, torch.Generator().manual_seed(0))
    assert abs(noisy.std().item() - 1.5) < 0.01


@pytest.mark.integration  # about 8 s
def test_own_loss_plus_applied_feedback_gives_the_one_graph_gradient():
    """A party's own loss plus the surrogate sum(m * g) / B trains its private modules exactly
    as the whole team's loss does."""
    torch.manual_seed(0)
    env = Factory(8)
    whole = Team(env.spec, TeamConfig(noise_multiplier=0.0))
    cfg = PPOConfig(feedback_value=True)  # the whole loss, to compare with the whole gradient
    rollout = collect(whole, LocalTransport(env), seed=0)
    targets = compute_targets(rollout, cfg, ValueNorm(env.spec.n_agents))
    loss, _, _ = ppo_loss(whole, rollout, targets, cfg)
    direct = torch.autograd.grad(loss, list(whole.features[0].parameters()))

    sensor = 0
    feedback = in_process_feedback(whole, rollout, targets, cfg)[:, :, [sensor]]
    party = whole.subteam([sensor])
    mine = party_rollout(whole, rollout, sensor)
    own, out, _ = ppo_loss(party, mine, compute_targets(mine, cfg, ValueNorm(1)), cfg)
    surrogate = (out.messages * feedback).sum() / rollout.num_envs
    via_wire = torch.autograd.grad(own + surrogate, list(party.features[0].parameters()))
    for w, d in zip(via_wire, direct):  # sensor 0 is row 0 of the whole team's sensor group
        torch.testing.assert_close(w[0], d[0], rtol=1e-4, atol=1e-7)
