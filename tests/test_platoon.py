"""The platoon environment: interface, reproducibility, the value of communication, privacy of
the EV's position from the platoon's observations."""

import pytest
import torch

from fedcomm.sim.base import Actions, VecEnv
from fedcomm.sim.platoon import EV_SPEED, N_COMMANDS, Platoon, platoon_spec


def rollout(env: VecEnv, seed: int, policy: str) -> tuple[list, torch.Tensor]:
    """Observations at every step and the rewards of one episode batch."""
    obs = env.reset(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    seen, rewards, done = [obs], [], False
    while not done:
        step = env.step(env.scripted_actions(policy, obs, gen))
        obs, done = step.obs, step.done
        seen.append(obs)
        rewards.append(step.reward)
    return seen, torch.stack(rewards)


def test_spec_and_shapes():
    spec = platoon_spec(n_trucks=3, n_cars=1, episode_length=7, bandwidth=2)
    assert [t.name for t in spec.types] == ["truck", "car", "emergency"]
    assert [t.count for t in spec.types] == [3, 1, 1]
    assert spec.n_agents == 5 and spec.bandwidth == 2
    assert platoon_spec().bandwidth == 1

    env = Platoon(6, n_trucks=3, n_cars=1, episode_length=7, bandwidth=2)
    assert env.spec == spec
    obs = env.reset(seed=0)
    assert [tuple(o.shape) for o in obs] == [
        (6, t.count, t.obs_dim) for t in spec.types]
    for t in range(7):
        step = env.step(env.random_actions())
        assert step.reward.shape == (6, 5)
        assert torch.equal(step.reward, step.reward[:, :1].expand(-1, 5))  # one team reward
        assert step.done == (t == 6)


def test_same_seed_reproduces_different_seeds_differ():
    obs_a, rew_a = rollout(Platoon(32), seed=5, policy="random")
    obs_b, rew_b = rollout(Platoon(32), seed=5, policy="random")
    for step_a, step_b in zip(obs_a, obs_b, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(rew_a, rew_b)

    obs_c, _ = rollout(Platoon(32), seed=6, policy="random")
    for a, c in zip(obs_a[0], obs_c[0], strict=True):
        assert not torch.equal(a, c)


def test_rewards_stay_in_range():
    _, rewards = rollout(Platoon(256), seed=1, policy="random")
    assert rewards.min() >= -1.0 - 1e-6 and rewards.max() <= 0.5 + 1e-6


def test_oracle_beats_no_comm_beats_random():
    returns = {p: rollout(Platoon(400), seed=0, policy=p)[1][:, :, 0].sum(0).mean().item()
               for p in ("oracle", "no_comm", "random")}
    assert returns["oracle"] > returns["no_comm"] + 1.5
    assert returns["no_comm"] > returns["random"] + 5.0


def test_oracle_never_blocks_no_comm_does():
    env = Platoon(400)
    obs, blocked, done = env.reset(0), torch.zeros(400, dtype=torch.bool), False
    while not done:
        step = env.step(env.oracle_actions())
        blocked |= env.blocked
        done = step.done
    assert not blocked.any()

    obs, done = env.reset(0), False
    while not done:
        step = env.step(env.no_comm_actions(obs))
        obs, done = step.obs, step.done
        blocked |= env.blocked
    assert blocked.float().mean() > 0.5


def test_platoon_observations_do_not_depend_on_the_ev():
    n = 4
    pos = torch.tensor([[0.0, -2.0, -4.5, -6.0]]).expand(n, -1)
    speed = torch.tensor([[1.0, 0.9, 1.0, 0.8]]).expand(n, -1)
    shoulder = torch.zeros(n, 4, dtype=torch.bool)
    envs = [Platoon(n), Platoon(n)]
    envs[0].set_state(pos, speed, shoulder, ev_pos=torch.full((n,), -30.0),
                      criticality=torch.full((n,), 0.1))
    envs[1].set_state(pos, speed, shoulder, ev_pos=torch.tensor([-8.0, -7.0, -3.0, 5.0]),
                      criticality=torch.full((n,), 0.9))
    gen = torch.Generator().manual_seed(0)
    rewards = [[], []]
    for _ in range(envs[0].spec.episode_length):
        actions = envs[0].random_actions(gen)
        obs = [env.observe() for env in envs]
        for k in range(2):  # trucks, cars
            assert torch.equal(obs[0][k], obs[1][k])
        for env, r in zip(envs, rewards, strict=True):
            r.append(env.step(actions).reward)
    assert not torch.equal(obs[0][2], obs[1][2])  # the EV itself does see the difference
    assert not torch.equal(torch.stack(rewards[0]), torch.stack(rewards[1]))


def test_blocking_and_pulling_over():
    env = Platoon(2, n_trucks=1, n_cars=1)
    pos = torch.tensor([[0.0, -2.0]] * 2)
    env.set_state(pos, torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool),
                  ev_pos=torch.tensor([-3.0, -3.0]), criticality=torch.tensor([1.0, 1.0]))
    keep = torch.tensor([0, N_COMMANDS])  # env 0 stays in the lane, env 1 pulls over
    actions: Actions = [keep[:, None], keep[:, None], torch.zeros(2, 1, dtype=torch.long)]
    step = env.step(actions)
    assert env.blocked.tolist() == [True, False]
    assert env.ev_speed[1] == EV_SPEED and env.ev_speed[0] < EV_SPEED
    assert step.reward[0, 0] < step.reward[1, 0]


def test_trucks_respond_more_weakly_than_cars():
    env = Platoon(1, n_trucks=1, n_cars=1)
    env.set_state(torch.tensor([[0.0, -10.0]]), torch.full((1, 2), 0.5),
                  torch.zeros(1, 2, dtype=torch.bool), ev_pos=torch.tensor([-50.0]),
                  criticality=torch.tensor([0.5]))
    accelerate = torch.ones(1, 1, dtype=torch.long)
    env.step([accelerate, accelerate, torch.zeros(1, 1, dtype=torch.long)])
    truck, car = env.speed[0].tolist()
    assert 0.5 < truck < car


@pytest.mark.parametrize("actions", [
    [torch.zeros(4, 2, dtype=torch.long)] * 2,  # a type missing
    [torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long),
     torch.zeros(4, 1, dtype=torch.long)],  # wrong count
    [torch.full((4, 2), 2 * N_COMMANDS), torch.zeros(4, 2, dtype=torch.long),
     torch.zeros(4, 1, dtype=torch.long)],  # out of range
    [torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long),
     torch.ones(4, 1, dtype=torch.long)],  # the EV has only a no-op
    [torch.full((4, 2), -1), torch.zeros(4, 2, dtype=torch.long),
     torch.zeros(4, 1, dtype=torch.long)],  # negative
])
def test_bad_actions_raise(actions):
    env = Platoon(4)
    env.reset(0)
    with pytest.raises(ValueError):
        env.step(actions)


def test_bad_configuration_raises():
    with pytest.raises(ValueError):
        platoon_spec(n_trucks=0)
    with pytest.raises(ValueError):
        platoon_spec(bandwidth=0)
