"""The factory: who sees what, the scripted references, reproducibility."""

import pytest
import torch

from fedcomm.baselines import evaluate_scripted
from fedcomm.sim.factory import SERVICE, Factory
from fedcomm.sim.registry import make_env


def test_shapes_follow_the_configured_counts():
    env = Factory(5, n_sensors=3, n_processors=1, n_actuators=4, n_products=2)
    obs = env.reset(seed=0)
    assert [t.name for t in env.spec.types] == ["sensor", "processor", "actuator"]
    assert [o.shape for o in obs] == [(5, 3, 8), (5, 1, 12), (5, 4, 5)]
    assert [t.n_actions for t in env.spec.types] == [1, 1, 3]


def test_each_type_sees_only_its_part_of_the_state():
    env = Factory(64)
    env.reset(seed=1)
    before = env.observe()
    env.fault = ~env.fault  # change only the faults
    after = env.observe()
    assert not torch.equal(before[0], after[0])  # sensors see faults
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
    env.order = (env.order + 1) % env.n_products  # change only the orders
    again = env.observe()
    assert not torch.equal(after[1], again[1])  # processors see orders
    assert torch.equal(after[0], again[0]) and torch.equal(after[2], again[2])


def test_rewards_follow_the_table():
    env = Factory(4, n_sensors=1, n_processors=1, n_actuators=1, n_products=3)
    env.reset(seed=0)
    env.fault = torch.tensor([[True], [True], [False], [False]])
    env.order = torch.tensor([[0], [0], [2], [2]])
    act = torch.tensor([[SERVICE], [1], [3], [1]])  # service, make 0, make 2, make 0
    idle = torch.zeros(4, 1, dtype=torch.long)
    step = env.step([idle, idle, act])
    assert step.reward[:, 0].tolist() == [1.0, -1.0, 1.0, 0.0]
    assert torch.equal(step.reward[:, 0:1].expand(-1, 3), step.reward)  # a team reward


def test_reset_with_a_seed_is_reproducible():
    a, b = Factory(32), Factory(32)
    for x, y in zip(a.reset(seed=7), b.reset(seed=7)):
        assert torch.equal(x, y)
    acts = a.random_actions(torch.Generator().manual_seed(0))
    assert torch.equal(a.step(acts).reward, b.step(acts).reward)
    assert not torch.equal(a.reset(seed=8)[0], b.reset(seed=9)[0])


def fixed_action_return(action: int, episodes: int = 2000) -> float:
    env = Factory(episodes)
    env.reset(seed=3)
    idle = torch.zeros(episodes, 2, dtype=torch.long)
    total, done = torch.zeros(episodes), False
    while not done:
        step = env.step([idle, idle, torch.full((episodes, 3), action)])
        total += step.reward[:, 0]
        done = step.done
    return total.mean().item()


def test_the_oracle_is_perfect_and_no_comm_is_the_best_fixed_action():
    oracle = evaluate_scripted("factory", "oracle", 500)
    no_comm = evaluate_scripted("factory", "no_comm", 500)
    assert oracle.return_mean == 25.0
    # Servicing always earns the fault rate, 0.25 per step; making a product earns
    # 0.75 / 3 - 0.25 = 0 per step.
    assert abs(no_comm.return_mean - 6.25) < 4 * no_comm.return_se
    assert abs(fixed_action_return(SERVICE) - 6.25) < 0.2
    assert abs(fixed_action_return(1)) < 0.3


def test_bad_configuration_and_names_are_refused():
    with pytest.raises(ValueError, match="at least one agent"):
        Factory(2, n_sensors=0)
    with pytest.raises(ValueError, match="fault_prob"):
        Factory(2, fault_prob=1.5)
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("warehouse", 2)
    with pytest.raises(ValueError, match="factory has no option 'n_robots'"):
        make_env("factory", 2, n_robots=3)
    with pytest.raises(ValueError, match="expected shape"):
        env = Factory(2)
        env.reset(seed=0)
        env.step([torch.zeros(2, 1, dtype=torch.long)] * 3)
