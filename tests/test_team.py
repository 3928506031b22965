"""The agents' models: differentiable channel, clipping, routing, vectorisation over agents."""

import math

import pytest
import torch

from fedcomm.config import TeamConfig
from fedcomm.learning.importance import communication_importance
from fedcomm.learning.rollout import Rollout, collect, replay
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.comm import clip_norm
from fedcomm.models.layers import GroupLinear
from fedcomm.models.team import Team, log_probs
from fedcomm.sim.base import AgentType, EnvSpec
from fedcomm.sim.factory import Factory, factory_spec
from fedcomm.sim.router import delivery_mask
from fedcomm.sim.speaker_listener import SPEC as SL_SPEC
from fedcomm.sim.speaker_listener import SpeakerListener

SPEAKER, LISTENER = 0, 1


def speaker_private_grads(team: Team) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p)
            for p in team.features[SPEAKER].parameters()]


@pytest.mark.parametrize("encoder", ["mlp", "superposition"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_receiver_loss_reaches_sender_only_through_the_channel(encoder, recurrent):
    torch.manual_seed(0)
    team = Team(SL_SPEC, TeamConfig(encoder=encoder, recurrent=recurrent))
    env = SpeakerListener(32)
    obs = env.reset(seed=0)
    noise = team.channel.draw(torch.zeros(32, 2, team.cfg.comm_dim))
    hidden = team.initial_hidden(32)

    # The listener's loss trains the speaker's private feature net and the shared encoder.
    out = team(obs, hidden, noise)
    loss = out.logits[LISTENER].pow(2).sum() + out.values[:, LISTENER].sum()
    loss.backward()
    assert all(g.abs().sum() > 0 for g in speaker_private_grads(team))
    assert any(p.grad.abs().sum() > 0 for p in team.comm.encoder.parameters())
    through_wire = [g.clone() for g in speaker_private_grads(team)]

    # The same gradient, assembled by hand from dL/d(vector): it all flows through the vector.
    team.zero_grad()
    out = team(obs, hidden, noise)
    grad_m = torch.autograd.grad(out.logits[LISTENER].pow(2).sum()
                                 + out.values[:, LISTENER].sum(), out.messages,
                                 retain_graph=True)[0]
    out.messages.backward(grad_m)
    for a, b in zip(through_wire, speaker_private_grads(team)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # Cut the channel (deliver nothing): the speaker's private modules get no gradient at all.
    team.zero_grad()
    team.cfg.communicate = False
    out = team(obs, hidden, noise)
    (out.logits[LISTENER].pow(2).sum() + out.values[:, LISTENER].sum()).backward()
    assert all(g.abs().sum() == 0 for g in speaker_private_grads(team))


def encoder_grads(team: Team) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p)
            for p in team.comm.encoder.parameters()]


def listener_policy_loss(team: Team, rollout: Rollout) -> torch.Tensor:
    """The listener's policy output alone: no speaker term, no value term."""
    logp, _ = log_probs(replay(team, rollout).logits, rollout.actions)
    return -logp[..., LISTENER].mean()


def speaker_listener_batch(cfg: TeamConfig) -> tuple[Team, Rollout]:
    torch.manual_seed(0)
    team = Team(SL_SPEC, cfg)
    rollout = collect(team, LocalTransport(SpeakerListener(16)), seed=1,
                      generator=torch.Generator().manual_seed(0))
    return team, rollout


@pytest.mark.parametrize("encoder", ["mlp", "superposition"])
@pytest.mark.parametrize(("recurrent", "accumulate"), [(False, False), (True, False),
                                                       (False, True)])
def test_receivers_policy_loss_trains_the_senders_encoder(encoder: str, recurrent: bool,
                                                          accumulate: bool) -> None:
    """The article's bug, vectors computed under ``torch.no_grad()``, leaves the speaker's
    encoder untrained. Here a batch collected without gradients and replayed for the update
    gives every encoder parameter a gradient from the listener's policy loss alone, which
    only the speaker's vector carries (the listener hears no vector of its own)."""
    team, rollout = speaker_listener_batch(
        TeamConfig(encoder=encoder, recurrent=recurrent, accumulate=accumulate))
    listener_policy_loss(team, rollout).backward()
    assert all(g.abs().sum() > 0 for g in encoder_grads(team))

    # The same through one ``Team.forward`` step, where it arrives by the speaker's vector.
    team.zero_grad()
    obs = [o[0] for o in rollout.obs]
    out = team(obs, team.initial_hidden(16), rollout.noise[0])
    loss = out.logits[LISTENER].pow(2).sum()
    by_vector = torch.autograd.grad(loss, out.messages, retain_graph=True)[0]
    assert by_vector[:, SPEAKER].abs().sum() > 0 and by_vector[:, LISTENER].abs().sum() == 0
    loss.backward()
    assert all(g.abs().sum() > 0 for g in encoder_grads(team))


@pytest.mark.parametrize(("recurrent", "accumulate"), [(False, False), (True, False),
                                                       (False, True)])
def test_without_communication_no_loss_reaches_the_encoder(recurrent: bool,
                                                           accumulate: bool) -> None:
    """``communicate=False``: every agent's policy and value loss together leave the encoder
    without gradient, so the gradient above came through the channel."""
    team, rollout = speaker_listener_batch(
        TeamConfig(communicate=False, recurrent=recurrent, accumulate=accumulate))
    out = replay(team, rollout)
    logp, _ = log_probs(out.logits, rollout.actions)
    (logp.sum() + out.values.pow(2).sum()).backward()
    assert all(g.abs().sum() == 0 for g in encoder_grads(team))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in team.policy.parameters())


def test_clip_bounds_every_vector_and_leaves_short_ones_alone():
    x = torch.randn(1000, 16) * torch.rand(1000, 1) * 5
    y = clip_norm(x, 1.5)
    assert (y.norm(dim=-1) <= 1.5 + 1e-5).all()
    short = x.norm(dim=-1) <= 1.5
    torch.testing.assert_close(y[short], x[short])


def test_channel_noise_has_the_declared_scale():
    team = Team(SL_SPEC, TeamConfig(clip=2.0, noise_multiplier=0.75))
    noise = team.channel.draw(torch.zeros(200_000, 2, 16), torch.Generator().manual_seed(0))
    assert abs(noise.std().item() - 1.5) < 0.01


def test_router_skips_pruned_routes_self_routes_and_respects_bandwidth():
    types = torch.tensor([0, 0, 1, 2])
    routes = torch.tensor([[True, True, True], [False, False, True], [False, False, False]])
    mask = delivery_mask(types, routes)[0]  # [receiver, sender]
    expected = torch.tensor([
        [False, True, False, False],
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
    ])
    assert torch.equal(mask, expected)

    messages = torch.zeros(5, 4, 3)
    messages[:, 2, 0] = 5.0  # sender 2 claims the channel most strongly
    messages[:, 1, 0] = 1.0
    limited = delivery_mask(types, torch.ones(3, 3, dtype=torch.bool), messages, bandwidth=2)
    assert limited.shape == (5, 4, 4)
    assert torch.equal(limited[:, 0].any(0), torch.tensor([False, True, True, False]))
    with pytest.raises(ValueError, match="bandwidth"):
        delivery_mask(types, routes, None, bandwidth=1)

    # A sender with no kept route takes no slot, however loudly it claims the channel.
    mute = torch.ones(3, 3, dtype=torch.bool)
    mute[1] = False  # the loudest sender, agent 2, is of type 1
    one = delivery_mask(types, mute, messages, bandwidth=1)
    assert torch.equal(one[:, 0].any(0), torch.tensor([False, True, False, False]))


def test_group_linear_matches_separate_linears():
    torch.manual_seed(0)
    layer = GroupLinear(3, 5, 4)
    x = torch.randn(7, 3, 5)
    y = layer(x)
    for g in range(3):
        torch.testing.assert_close(y[:, g], x[:, g] @ layer.weight[g] + layer.bias[g])


def test_agents_of_a_type_hold_separate_weights():
    torch.manual_seed(0)
    team = Team(factory_spec(), TeamConfig())
    obs = Factory(4).reset(seed=0)
    out = team(obs, None, torch.zeros(4, 7, team.cfg.comm_dim))
    out.logits[2][:, 0].sum().backward()  # actuator 0's policy only
    w = team.policy[2][0].weight.grad  # [3 actuators, in, out]
    assert w[0].abs().sum() > 0 and w[1].abs().sum() == 0 and w[2].abs().sum() == 0


def test_replay_reproduces_the_rollout_exactly():
    torch.manual_seed(0)
    for recurrent, accumulate in ((False, False), (True, False), (False, True), (True, True)):
        team = Team(factory_spec(), TeamConfig(recurrent=recurrent, accumulate=accumulate))
        rollout = collect(team, LocalTransport(Factory(16)), seed=3,
                          generator=torch.Generator().manual_seed(0))
        out = replay(team, rollout)
        logp, _ = log_probs(out.logits, rollout.actions)
        torch.testing.assert_close(logp, rollout.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.values, rollout.values, rtol=1e-5, atol=1e-5)


def test_importance_is_zero_for_receivers_without_choices():
    torch.manual_seed(0)
    team = Team(factory_spec(), TeamConfig())
    rollout = collect(team, LocalTransport(Factory(8)), seed=0)
    imp = communication_importance(team, rollout)  # [sender type, receiver type]
    assert imp.shape == (3, 3)
    assert torch.all(imp[:, :2] == 0)  # sensors and processors have a single action
    assert torch.all(imp[:, 2] > 0)  # actuators listen to everyone at initialisation


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        TeamConfig(clip=0)
    with pytest.raises(ValueError):
        TeamConfig(noise_multiplier=-1)
    with pytest.raises(ValueError, match="encoder"):
        Team(EnvSpec("x", (AgentType("a", 1, 2, 2),), 5), TeamConfig(encoder="quantum"))


def test_a_party_with_the_delivered_vectors_acts_as_in_the_whole_team():
    torch.manual_seed(0)
    spec = factory_spec()
    whole = Team(spec, TeamConfig(recurrent=True))
    obs = Factory(6).reset(seed=2)
    noise = whole.channel.draw(torch.zeros(6, spec.n_agents, whole.cfg.comm_dim))
    full = whole(obs, whole.initial_hidden(6), noise)
    delivered = whole.route(full.messages)
    for agents in ([0], [3, 5], [4, 5, 6]):
        party = whole.subteam(agents)
        idx = list(agents)
        out = party(spec.select(obs, party.agents), party.initial_hidden(6), noise[:, idx],
                    full.messages, delivered[:, idx])
        torch.testing.assert_close(out.values, full.values[:, idx])
        torch.testing.assert_close(out.messages, full.messages[:, idx])
    sensor = whole.subteam([0])
    with pytest.raises(ValueError, match="needs the vectors"):
        sensor(spec.select(obs, (0,)), sensor.initial_hidden(6))
    with pytest.raises(ValueError, match="observations for 'sensor'"):
        sensor(obs[:1], sensor.initial_hidden(6))


def test_a_discrete_release_keeps_the_codeword_with_randomized_responses_probability():
    """The released codeword is the encoder's (its most likely one when greedy) with
    probability e^eps / (e^eps + K - 1), and each other one with 1 / (e^eps + K - 1)."""
    team = Team(SL_SPEC, TeamConfig(channel="discrete", symbols=4, rr_epsilon=1.5))
    keep, other = team.channel.response_probabilities()
    assert keep == pytest.approx(math.exp(1.5) / (math.exp(1.5) + 3))
    logits = torch.tensor([4.0, 0.0, -1.0, 0.5]).expand(100_000, 1, 4)
    clean = other + (keep - other) * torch.softmax(logits, dim=-1)
    drawn = team.channel.draw(clean, torch.Generator().manual_seed(0), greedy=True)
    assert torch.equal(drawn.sum(dim=-1), torch.ones(100_000, 1))  # one-hot rows
    freq = drawn.mean(dim=(0, 1))
    assert abs(freq[0].item() - keep) < 0.01
    assert (freq[1:] - other).abs().max() < 0.01
    sampled = team.channel.draw(clean, torch.Generator().manual_seed(1)).mean(dim=(0, 1))
    torch.testing.assert_close(sampled, clean[0, 0], atol=0.01, rtol=0)


@pytest.mark.parametrize("broken", [math.nan, math.inf, -1.0])
def test_randomized_response_applies_whatever_the_encoder_outputs(broken: float):
    """An encoder whose output is no distribution (NaN, infinite, negative) still has its
    codeword released through randomized response: kept with probability e^eps / (e^eps + K -
    1), never released as it is."""
    team = Team(SL_SPEC, TeamConfig(channel="discrete", symbols=4, rr_epsilon=1.0))
    keep, other = team.channel.response_probabilities()
    clean = torch.full((100_000, 1, 4), broken)
    greedy = team.channel.draw(clean, torch.Generator().manual_seed(0), greedy=True)
    greedy = greedy.mean(dim=(0, 1))
    chosen = int(greedy.argmax())
    assert abs(greedy[chosen].item() - keep) < 0.01
    assert (greedy[torch.arange(4) != chosen] - other).abs().max() < 0.01
    # sampled, a NaN encoder released codeword 0 every time, without randomized response
    sampled = team.channel.draw(clean, torch.Generator().manual_seed(1)).mean(dim=(0, 1))
    torch.testing.assert_close(sampled, torch.full((4,), 0.25), atol=0.01, rtol=0)


def test_a_discrete_release_passes_its_expectations_gradient_to_the_sender():
    """Straight through: the receiver hears exactly the drawn one-hot, and the sender's
    encoder gets the gradient of its expectation; randomized response scales it by a - b."""
    torch.manual_seed(0)
    team = Team(SL_SPEC, TeamConfig(channel="discrete", symbols=3, rr_epsilon=2.0))
    feats = torch.randn(8, 2, team.cfg.hidden)
    clean = team.speak(feats)
    drawn = team.channel.draw(clean.detach(), torch.Generator().manual_seed(0))
    released = team.channel.release(clean, drawn)
    assert torch.equal(released.detach(), drawn)
    weights = torch.randn_like(drawn)
    (released * weights).sum().backward()
    grads = [p.grad for p in team.comm.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    keep, other = team.channel.response_probabilities()
    logits = team.channel.code_logits(team.comm.encode(feats))
    expected = torch.autograd.grad(((keep - other) * torch.softmax(logits, -1) * weights).sum(),
                                   list(team.comm.encoder.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("feedback", [False, True])
def test_a_discrete_code_without_feedback_is_part_of_the_senders_action(feedback: bool):
    """Without feedback nothing else teaches a discrete channel's senders their code: the
    rollout's log-probability adds each released codeword's at the release steps (the
    speaker's, not the listener's, which has no route), the replay reproduces it (ratio 1),
    and PPO's loss reaches the encoder from the speaker's own advantages alone. With feedback
    the codeword is not part of the action."""
    from fedcomm.config import PPOConfig
    from fedcomm.learning.ppo import Targets, ppo_loss

    cfg = TeamConfig(channel="discrete", symbols=3, rr_epsilon=2.0, release_every=5,
                     accumulate=True, routes="speaker>listener", feedback=feedback)
    torch.manual_seed(0)
    team = Team(SL_SPEC, cfg)
    rollout = collect(team, LocalTransport(SpeakerListener(16)), seed=3,
                      generator=torch.Generator().manual_seed(0))
    out = replay(team, rollout)
    if feedback:
        assert out.code_logp is None and out.code_entropy is None
        return
    logp, _ = log_probs(out.logits, rollout.actions)
    torch.testing.assert_close((logp + out.code_logp).detach(), rollout.logprobs)
    released = torch.arange(SL_SPEC.episode_length) % 5 == 0
    assert (out.code_logp[released, :, SPEAKER] < 0).all()
    assert (out.code_logp[~released] == 0).all() and (out.code_logp[..., LISTENER] == 0).all()
    assert (out.code_entropy[released, :, SPEAKER] > 0).all()
    advantages = torch.zeros_like(rollout.rewards)
    advantages[..., SPEAKER] = torch.randn(advantages.shape[:2])
    loss, _, _ = ppo_loss(team, rollout, Targets(advantages, torch.zeros_like(advantages)),
                          PPOConfig(vf_coef=0.0, ent_coef=0.0))
    loss.backward()
    grads = [p.grad for p in team.comm.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # ... and from nothing else: the listener's loss does not reach the speaker's encoder
    # (no feedback, in one process as over the wire).
    team.zero_grad()
    advantages = torch.zeros_like(rollout.rewards)
    advantages[..., LISTENER] = torch.randn(advantages.shape[:2])
    loss, _, _ = ppo_loss(team, rollout, Targets(advantages, torch.zeros_like(advantages)),
                          PPOConfig(vf_coef=0.0, ent_coef=0.0))
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in team.comm.encoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in team.policy.parameters())


def test_positive_signalling_is_the_codes_mutual_information_with_what_the_sender_sees():
    """``H(mean p) - mean H(p)`` over a minibatch's release steps, senders only: log K for a
    code that is a one-to-one function of a uniform observation, 0 for one that ignores it;
    a PPO step with it makes a new (uninformative) code informative. Under DP-SGD it is
    refused, in the loss and before a run starts, unless the marginal is released."""
    from fedcomm.config import PPOConfig, TrainConfig
    from fedcomm.learning.ppo import Targets, ppo_loss, signalling
    from fedcomm.privacy.config import PrivacyConfig
    from fedcomm.releases.plan import PrivacyPlan, Schedule

    cfg = TeamConfig(channel="discrete", symbols=3, rr_epsilon=50.0, release_every=5,
                     accumulate=True, routes="speaker>listener")
    torch.manual_seed(0)
    team = Team(SL_SPEC, cfg)
    one_to_one = torch.eye(3).repeat(4, 1)  # [12, K]: observations 0, 1, 2, 0, 1, ...
    probs = torch.full((10, 12, 2, 3), 1 / 3)
    probs[:, :, SPEAKER] = one_to_one
    assert signalling(team, probs).item() == pytest.approx(math.log(3), abs=1e-6)
    probs[:, :, SPEAKER] = torch.tensor([0.7, 0.2, 0.1])
    assert signalling(team, probs).item() == pytest.approx(0.0, abs=1e-6)
    probs[::5, :, LISTENER] = one_to_one  # the listener has no route: not a sender
    assert signalling(team, probs).item() == pytest.approx(0.0, abs=1e-6)

    rollout = collect(team, LocalTransport(SpeakerListener(64)), seed=3,
                      generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros_like(rollout.rewards)
    ppo = PPOConfig(vf_coef=0.0, ent_coef=0.0, signal_coef=1.0)
    optimizer = torch.optim.Adam(team.parameters(), lr=0.01)

    def information() -> float:
        return signalling(team, replay(team, rollout).code_probs).item()

    before = information()
    for _ in range(30):
        loss, _, _ = ppo_loss(team, rollout, Targets(zeros, zeros), ppo)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.1 and information() > 0.8
    with pytest.raises(ValueError, match="DP-SGD"):
        ppo_loss(team, rollout, Targets(zeros, zeros), ppo, standardize=False)
    private = TrainConfig(team=cfg, ppo=ppo, privacy=PrivacyConfig(update_noise_multiplier=1.0))
    with pytest.raises(ValueError, match="signal-coef"):
        PrivacyPlan.of(private, Schedule(federated=True, train_batches=2))
    released = PrivacyConfig(update_noise_multiplier=1.0, update_statistics=True)
    PrivacyPlan.of(TrainConfig(team=cfg, ppo=ppo, privacy=released),
                   Schedule(federated=True, train_batches=2))  # on a released marginal: planned


def test_the_recall_error_is_each_episodes_own_and_makes_a_new_code_informative():
    """Each sender's recall decoder reads its release distribution at its release steps and is
    scored against what it saw: the batch's error is the mean of its episodes' (nothing links
    them, so DP-SGD takes it as it is), a listener's observations and steps without a release
    do not enter it, and training on it alone, in DP-SGD's per-episode form, turns a new code
    into one that tells the goals apart."""
    from fedcomm.config import PPOConfig
    from fedcomm.learning.ppo import Targets, ppo_loss, signalling

    cfg = TeamConfig(channel="discrete", symbols=3, rr_epsilon=50.0, release_every=5,
                     accumulate=True, routes="speaker>listener", feedback=False, recall=True)
    torch.manual_seed(1)
    team = Team(SL_SPEC, cfg)
    rollout = collect(team, LocalTransport(SpeakerListener(64)), seed=3,
                      generator=torch.Generator().manual_seed(0))
    probs = replay(team, rollout).code_probs
    whole = team.recall_error(rollout.obs, probs)
    alone = torch.stack([team.recall_error([o[:, i:i + 1] for o in rollout.obs],
                                           probs[:, i:i + 1]) for i in range(64)])
    torch.testing.assert_close(whole, alone.mean())
    moved = [o.clone() for o in rollout.obs]
    moved[LISTENER] += 1.0  # the listener sends nothing: its observations do not count
    moved[SPEAKER][1:5] += 1.0  # nor the speaker's steps between releases
    torch.testing.assert_close(team.recall_error(moved, probs), whole)
    with pytest.raises(ValueError, match="discrete channel"):
        TeamConfig(recall=True)

    zeros = torch.zeros_like(rollout.rewards)
    ppo = PPOConfig(vf_coef=0.0, ent_coef=0.0, recall_coef=1.0)
    optimizer = torch.optim.Adam(team.parameters(), lr=0.01)

    def information() -> float:
        return signalling(team, replay(team, rollout).code_probs).item()

    before = information()
    for _ in range(60):
        loss, _, _ = ppo_loss(team, rollout, Targets(zeros, zeros), ppo, standardize=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.05 and information() > 0.6  # nats; log 3 = 1.10 at most


def test_a_types_networks_load_into_one_agents_slot_of_a_whole_team():
    """What a one-agent party of a type sends (``type_state``), or its type's average, loads
    into that agent's slot of a team holding several agents, and into no other slot."""
    spec = factory_spec()
    team = Team(spec, TeamConfig())
    actuators = [i for i, k in enumerate(spec.type_of_agent)
                 if spec.types[k].name == "actuator"]
    party = team.subteam([actuators[1]])
    sent = {k: torch.full_like(v, 0.5) for k, v in party.type_state().items()}
    before = {a: team.agent_state(a) for a in actuators}
    team.load_type_state_of(actuators[1], sent)
    got = team.agent_state(actuators[1])
    assert all(torch.equal(got[k], torch.full_like(got[k], 0.5)) for k in got)
    for a in (actuators[0], actuators[2]):
        assert all(torch.equal(team.agent_state(a)[k], before[a][k]) for k in before[a])
