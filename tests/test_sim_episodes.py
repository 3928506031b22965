"""Secret episodes: the simulator resets each batch with its public label keyed by a secret of
its own, so that a peer knowing the run's whole configuration and the label cannot regenerate an
agent's private observations, while whoever holds the key can.

Batches run on the real service in process (``SimServer``), joined by real agents'
``GrpcTransport``; the goals the simulator drew are read from its environment once the batch
has started. The episode key's file and its way from ``fedcomm simulate`` to the simulator are
checked on real processes.
"""

from __future__ import annotations

import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from torch import Tensor

from fedcomm.clients.grpc_transport import GrpcTransport
from fedcomm.commands.sim import episode_key
from fedcomm.config import FederationConfig, TeamConfig, TrainConfig
from fedcomm.modes.processes import SimProcess
from fedcomm.protocol.auth import call_metadata, generate_tokens, write_tokens
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.episodes import KEY_BYTES, episode_seed
from fedcomm.sim.limits import message_limit
from fedcomm.sim.registry import make_env
from fedcomm.sim.serve import SimServer
from fedcomm.sim.service import SimConfig
from tests.harness.processes import fedcomm

B = 3000  # goals drawn per batch: chance agreement is 1/3 within 0.01
SPEC = make_env("speaker_listener", 1).spec
TOKENS = {agent: f"token-of-{agent}" for agent in SPEC.agent_ids}
RUN = "episodes-test"
SEED = 7
LABEL = SEED * 1_000_000 + 1  # what an agent declares for its run's first batch
ALL_ROUTES = torch.ones(2, 2, dtype=torch.bool)
CHANCE = 1 / 3
TIMEOUT = 30.0


def config(**changes: object) -> SimConfig:
    return SimConfig(**({"env": "speaker_listener", "num_envs": B, "seed": SEED,
                         "run_id": RUN, "tokens": TOKENS, "device": "cpu"} | changes))


def started_batch(sim: SimServer, label: int | None) -> dict[str, Tensor]:
    """Start the next batch with every agent declaring ``label``; what the simulator drew for
    it, once the agents have their first observations. The agents then leave."""
    transports = [GrpcTransport(sim.address, SPEC, agent, TOKENS[agent], TeamConfig(),
                                timeout=TIMEOUT) for agent in SPEC.agent_ids]
    try:
        with ThreadPoolExecutor(len(transports)) as pool:
            list(pool.map(lambda t: t.reset(ALL_ROUTES, seed=label), transports))
        env = sim.service.env
        return {"goal": env.goal.clone(), "landmarks": env.landmark_pos.clone()}
    finally:
        for transport in transports:
            transport.close()


def batch_of(cfg: SimConfig, label: int | None) -> dict[str, Tensor]:
    with SimServer(cfg) as sim:
        return started_batch(sim, label)


def agreement(a: Tensor, b: Tensor) -> float:
    return (a == b).float().mean().item()


def regenerated_goals(seed: int) -> Tensor:
    """The goals a speaker_listener of this run's size draws when reset with ``seed``."""
    env = make_env("speaker_listener", B)
    env.reset(seed)
    return env.goal


@pytest.mark.integration  # a simulator
@pytest.mark.parametrize("label", [LABEL, None], ids=["declared label", "round as label"])
def test_a_peer_knowing_the_config_and_the_label_cannot_reproduce_the_goals(
        label: int | None) -> None:
    truth = batch_of(config(), label)["goal"]
    # Everything public: the run's environment and size, and the label, or where the agents
    # declared none, the simulator's seed plus the round (0). Before the key, agreement was 1.
    guess = regenerated_goals(SEED if label is None else label)
    assert abs(agreement(truth, guess) - CHANCE) < 0.05


@pytest.mark.integration  # simulators
def test_the_same_key_and_label_give_the_same_episodes_another_key_others() -> None:
    key = secrets.token_bytes(KEY_BYTES)
    first, again = (batch_of(config(episode_key=key), LABEL) for _ in range(2))
    other = batch_of(config(episode_key=secrets.token_bytes(KEY_BYTES)), LABEL)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert abs(agreement(first["goal"], other["goal"]) - CHANCE) < 0.05
    assert not torch.equal(first["landmarks"], other["landmarks"])
    seed = episode_seed(key, RUN, LABEL, SEED)  # the key holder regenerates the batch
    assert torch.equal(regenerated_goals(seed), first["goal"])


def test_every_label_and_round_has_a_seed_of_its_own() -> None:
    key = secrets.token_bytes(KEY_BYTES)
    seeds = {episode_seed(key, RUN, label, rnd) for label in (None, 0, 1, 5)
             for rnd in (0, 1, 5)}
    # Three rounds without a label, three labels (the round does not count where one is
    # declared), and a label never gives the seed of the round of the same number.
    assert len(seeds) == 6
    assert episode_seed(key, RUN, 5, 0) != episode_seed(key, "another run", 5, 0)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SimServer(config(episode_key=b"short"))


# -- the key's file --------------------------------------------------------------------------
def test_an_episode_key_file_is_made_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "episode.key"
    key = episode_key(path)
    assert len(key) == KEY_BYTES and path.read_bytes() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert episode_key(path) == key


@pytest.mark.parametrize(("mode", "data", "fragment"), [
    (0o640, os.urandom(KEY_BYTES), "open to group or others (mode 640): chmod 600 it"),
    (0o604, os.urandom(KEY_BYTES), "open to group or others (mode 604)"),
    (0o600, os.urandom(KEY_BYTES - 1), "holds 31 bytes; it needs at least 32"),
], ids=["group", "others", "short"])
def test_an_episode_key_others_can_read_or_too_short_is_refused(
        tmp_path: Path, mode: int, data: bytes, fragment: str) -> None:
    path = tmp_path / "episode.key"
    path.write_bytes(data)
    path.chmod(mode)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        episode_key(path)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(OSError):  # a link is not followed
        episode_key(link)


@pytest.mark.integration  # a `fedcomm sim serve` process
def test_sim_serve_refuses_a_readable_key_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "episode.key"
    path.write_bytes(os.urandom(KEY_BYTES))
    path.chmod(0o644)
    tokens = tmp_path / "tokens.json"
    write_tokens(tokens, TOKENS)
    out, _ = fedcomm("sim", "serve", "--env", "speaker_listener", "--port", "0", "--tokens",
                     str(tokens), "--episode-key", str(path)).communicate(timeout=60)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the episode key"), out


@pytest.mark.integration  # simulator processes
def test_simulate_keeps_its_simulators_key_in_the_run_directory(tmp_path: Path) -> None:
    """A resumed run's simulator keys its batches as the first one did."""
    team = TeamConfig(hidden=8, comm_dim=6)
    fed = FederationConfig(train=TrainConfig(env="speaker_listener", num_envs=8, device="cpu",
                                             team=team))
    tokens = tmp_path / "tokens.json"
    speaker = SPEC.agent_ids[0]
    token = generate_tokens(SPEC.agent_ids)
    write_tokens(tokens, token)
    agent = call_metadata(speaker, token[speaker])
    keys = []
    for _ in range(2):
        with SimProcess(fed, tokens, tmp_path / "sim.log") as sim, \
                grpc.insecure_channel(sim.address) as channel:
            info = pb_grpc.JointEnvironmentStub(channel).Describe(
                pb.DescribeRequest(), metadata=agent, timeout=TIMEOUT)
            assert info.max_message_bytes == message_limit(SPEC, 8, team.comm_dim)
        key_file = tmp_path / "sim" / "episode.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        keys.append(key_file.read_bytes())
    assert len(keys[0]) == KEY_BYTES and keys[0] == keys[1]
