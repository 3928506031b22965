"""The pieces of a federated round: private state, shared-module exchange, aggregation,
checkpoints and the configuration that ties rounds to the centralized trainer's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedcomm.clients.agent import global_arrays, load_global
from fedcomm.clients.state import StateStore, load_private_state, private_state_dict
from fedcomm.config import FederationConfig, TeamConfig, TrainConfig
from fedcomm.learning.party import Party
from fedcomm.learning.transport import Transport
from fedcomm.models.team import Team
from fedcomm.modes.assemble import assemble_team, one_team_holds
from fedcomm.presets import federation_preset
from fedcomm.releases.schedule import (
    RECEIVER_PARTS,
    SENDER_PARTS,
    initial_routes,
    peers,
    shared_parts,
)
from fedcomm.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcomm.server.strategy import (
    aggregate_by_group,
    load_strategy_state,
    make_strategy,
    strategy_state,
)
from tests.harness.replies import agent_keys

FED = FederationConfig(train=TrainConfig(env="factory", num_envs=8, env_steps=8 * 25 * 10,
                                         team=TeamConfig(hidden=8, comm_dim=4)),
                       batches_per_round=3)
SPEC = FED.spec


class Unconnected(Transport):
    """Carries the agents of a party that never steps (state handling needs no rollout)."""

    def __init__(self, team: Team) -> None:
        self.spec, self.agents, self.num_envs = team.spec, team.agents, 8

    def reset(self, routes, seed=None, silent=False):
        raise AssertionError("not connected")

    def exchange(self, vectors):
        raise AssertionError("not connected")

    def step(self, actions):
        raise AssertionError("not connected")


def make_party(index: int, seed: int = 0) -> Party:
    team = Team.initial(SPEC, FED.train.team, FED.train.seed, [index])
    return Party(team, Unconnected(team), FED.train.ppo, seed=seed)


def perturb(party: Party) -> None:
    """Stand-in for training: change every parameter and every piece of training state."""
    with torch.no_grad():
        for p in party.team.parameters():
            p.add_(torch.randn_like(p))
    loss = sum(p.sum() for p in party.team.parameters())
    loss.backward()
    party.optimizer.step()
    party.value_norm.update(torch.randn(10, 1))
    torch.rand(3, generator=party.generator)


# -- configuration ---------------------------------------------------------------------------
def test_rounds_cover_the_trainers_batches_exactly_once():
    assert FED.total_batches == 10 and FED.rounds == 4
    batches = [b for r in range(1, FED.rounds + 1) for b in FED.batches_in(r)]
    assert batches == list(range(1, 11))  # the last round is shorter
    assert FederationConfig.from_json(FED.to_json()) == FED
    assert FederationConfig.from_dict({"mode": "federated", **FED.to_dict()}) == FED


@pytest.mark.parametrize("change", [{"batches_per_round": 0}, {"strategy": "fedsgd"},
                                    {"on_agent_failure": "retry"}, {"round_timeout": 0}])
def test_a_bad_federation_config_is_refused(change):
    with pytest.raises(ValueError):
        FederationConfig(**change)


# -- what an agent keeps --------------------------------------------------------------------
def test_private_state_round_trips_exactly(tmp_path):
    party = make_party(2)
    perturb(party)
    store = StateStore(tmp_path, RecordDict())
    store.save(1, private_state_dict(party))
    fresh = make_party(2, seed=99)
    load_private_state(fresh, store.load(1).state)
    for (k, a), b in zip(party.team.state_dict().items(), fresh.team.state_dict().values()):
        if not k.startswith("comm."):  # the shared module comes from the server instead
            assert torch.equal(a, b), k
    assert str(party.optimizer.state_dict()) == str(fresh.optimizer.state_dict())
    assert torch.equal(party.value_norm.mean, fresh.value_norm.mean)
    assert torch.equal(party.generator.get_state(), fresh.generator.get_state())


def test_private_state_moves_between_devices():
    """A GPU's generator state (16 bytes) does not fit a CPU generator: the agent continues
    with a stream seeded from it, the same on every restore, and everything else exact."""
    party = make_party(2)
    state = private_state_dict(party)
    state["generator"] = torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state
    streams = []
    for _ in range(2):
        fresh = make_party(2, seed=99)
        load_private_state(fresh, state)
        streams.append(torch.rand(4, generator=fresh.generator))
    assert torch.equal(*streams)
    assert not torch.equal(streams[0], torch.rand(4, generator=make_party(2, seed=99).generator))


def test_the_store_restores_the_latest_committed_round(tmp_path):
    context = RecordDict()
    store = StateStore(tmp_path, context)
    for r in range(1, 6):
        store.save(r, {"round": torch.tensor(r)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-r000003.pt", "state-r000004.pt", "state-r000005.pt"]  # the last three
    assert store.load(at_most=5).round == 5  # from the context
    assert store.load(at_most=4).round == 4  # round 5 was never committed by the server
    assert int(store.load(at_most=4).state["round"]) == 4
    assert store.load(at_most=0) is None  # a fresh agent
    restarted = StateStore(tmp_path, RecordDict())  # the SuperNode lost its context
    assert restarted.load(at_most=5).round == 5
    assert StateStore(tmp_path / "none", RecordDict()).load(at_most=9) is None


def test_a_private_state_of_another_model_is_refused():
    state = private_state_dict(make_party(0))  # a sensor's
    with pytest.raises(ValueError, match="does not fit"):
        load_private_state(make_party(4), state)  # an actuator's model


# -- what crosses to the server -------------------------------------------------------------
def test_an_agent_sends_its_shared_module_and_loads_the_global_one():
    party = make_party(0)
    sent = global_arrays(party.team)
    assert set(sent) == {f"comm.{k}" for k in party.team.comm.state_dict()}
    other = make_party(5)
    perturb(other)
    load_global(other.team, sent)
    for k, v in other.team.comm.state_dict().items():
        assert torch.equal(v, sent[f"comm.{k}"])


def test_with_private_aggregation_an_agent_also_sends_its_types_networks():
    party = make_party(3)  # the second processor
    sent = global_arrays(party.team, with_private=True)
    private = {k for k in sent if not k.startswith("comm.")}
    assert private and all(k.startswith("type.processor.") for k in private)
    other = make_party(2)  # the first processor takes the average of its type
    load_global(other.team, sent)
    for (k, a), b in zip(party.team.named_parameters(), other.team.parameters()):
        assert torch.equal(a, b), k


def reply(arrays: dict[str, np.ndarray], steps: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": steps})})


def test_each_key_group_is_averaged_over_the_replies_that_carry_it():
    one, two = np.ones(2, dtype=np.float32), np.full(2, 2.0, dtype=np.float32)
    replies = [reply({"comm.w": one, "type.sensor.w": one}, 100),
               reply({"comm.w": two, "type.sensor.w": two}, 300),
               reply({"comm.w": two, "type.actuator.w": two * 5}, 100)]
    merged = aggregate_by_group(replies, "num-examples").to_numpy_ndarrays()
    comm, sensor, actuator = merged
    np.testing.assert_allclose(comm, (1 * 100 + 2 * 300 + 2 * 100) / 500)  # by env steps
    np.testing.assert_allclose(sensor, (1 * 100 + 2 * 300) / 400)  # sensors only
    np.testing.assert_allclose(actuator, 10.0)  # the only actuator


def test_the_route_price_is_shared_so_parties_add_up_to_the_centralized_loss():
    whole = Team.initial(SPEC, FED.train.team, FED.train.seed)
    parts = sum(whole.subteam([i]).route_cost() for i in range(SPEC.n_agents))
    torch.testing.assert_close(parts, whole.comm.route_strength().sum())


# -- what the server keeps -------------------------------------------------------------------
def test_a_checkpoint_keeps_the_module_and_the_server_optimizer_state(tmp_path):
    fed = FederationConfig(train=FED.train, strategy="fedadam")
    strategy = make_strategy(fed, SPEC.n_agents, agent_keys(SPEC.agent_ids))
    strategy.server_step.m_t = {"comm.w": np.arange(3.0)}  # Flower's FedAdam's moments
    strategy.server_step.v_t = {"comm.w": np.ones(3)}
    arrays = {"comm.w": np.arange(3, dtype=np.float32)}
    save_checkpoint(tmp_path, Checkpoint(4, arrays, fed.to_dict(), strategy_state(strategy),
                                         env_steps=1000, train_time_s=12.5))
    ckpt = load_checkpoint(tmp_path)
    assert (ckpt.round, ckpt.env_steps, ckpt.train_time_s) == (4, 1000, 12.5)
    assert FederationConfig.from_dict(ckpt.config) == fed
    np.testing.assert_array_equal(ckpt.arrays["comm.w"], arrays["comm.w"])
    resumed = make_strategy(fed, SPEC.n_agents, agent_keys(SPEC.agent_ids))
    load_strategy_state(resumed, ckpt.strategy)
    np.testing.assert_array_equal(resumed.server_step.m_t["comm.w"], np.arange(3.0))
    with pytest.raises(ValueError, match="does not fit"):
        fedavg = make_strategy(FED, SPEC.n_agents, agent_keys(SPEC.agent_ids))
        load_strategy_state(fedavg, ckpt.strategy)
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_the_team_is_assembled_from_the_global_module_and_each_agents_state(tmp_path):
    whole = Team.initial(SPEC, FED.train.team, FED.train.seed)
    with torch.no_grad():
        for p in whole.parameters():
            p.add_(torch.randn_like(p))  # a "trained" team the agents hold in parts
    for i, agent in enumerate(SPEC.agent_ids):
        part = make_party(i)
        part.team.load_state_dict(whole.subteam([i]).state_dict())
        StateStore(tmp_path / "agents" / agent, RecordDict()).save(3, private_state_dict(part))
    save_checkpoint(tmp_path, Checkpoint(3, {k: v.numpy() for k, v in
                                             global_arrays(whole).items()}, FED.to_dict()))
    assembled = assemble_team(tmp_path, FED)
    for (k, a), b in zip(whole.state_dict().items(), assembled.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("share", ["all", "used", "role", "none"])
def test_what_each_share_sends_and_whether_one_team_holds_the_parties(share):
    """Every factory agent sends and receives, and every role has two agents or more, so
    "used" and "role" send everything too; "none" sends nothing, and with seven agents' own
    encoders and decoders (or, by role, three types' copies) no one team holds the run."""
    fed = FederationConfig(train=FED.train, share=share)
    routes = initial_routes(fed.train)
    sent = {shared_parts(SPEC, share, routes, i) for i in range(SPEC.n_agents)}
    assert sent == ({()} if share == "none" else {SENDER_PARTS + RECEIVER_PARTS})
    assert one_team_holds(fed) == (share in ("all", "used"))
    with pytest.raises(ValueError, match="share must be all, used, senders, role or none"):
        FederationConfig(train=FED.train, share="some")


def test_the_platoons_federated_preset_lets_only_the_emergency_vehicle_send():
    """Without a global graph nothing prunes the platoon's routes, and under its one-sender
    bandwidth a truck's or car's vector would take the slot the emergency vehicle needs: the
    federated preset allows only the emergency vehicle's routes, so it alone releases vectors."""
    fed = federation_preset("platoon")
    spec, routes = fed.spec, initial_routes(fed.train)
    emergency = [t.name for t in spec.types].index("emergency")
    reach = [peers(spec, routes, i)[0] for i in range(spec.n_agents)]
    assert fed.share == "none"
    assert [r > 0 for r in reach] == [k == emergency for k in spec.type_of_agent]
    assert reach[spec.type_of_agent.index(emergency)] == spec.n_agents - 1
    assert initial_routes(federation_preset("factory").train).all()
