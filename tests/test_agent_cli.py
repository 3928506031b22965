"""``fedcomm agent`` when the simulator is not there, refuses the agent or ends its round: one
``error:`` line saying what happened and what to do, a non-zero exit, and never a traceback; a
simulator that comes up late is waited for.

Each agent runs the real command line as its own process; the simulator runs in this process
(``SimServer`` on loopback) with a one-sensor, one-processor, one-actuator factory and short
episodes, so that its state can be watched and the agent's peers can run here on threads.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from fedcomm.clients.grpc_transport import GrpcTransport
from fedcomm.config import TeamConfig
from fedcomm.learning.party import Party
from fedcomm.models.team import Team, load_team
from fedcomm.protocol.auth import call_metadata, write_tokens
from fedcomm.protocol.codec import encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.factory import factory_spec
from fedcomm.sim.registry import make_env
from fedcomm.sim.serve import SimServer
from fedcomm.sim.service import JointEnvironmentService, SimConfig
from tests.harness.processes import fedcomm

pytestmark = pytest.mark.integration  # `fedcomm agent` processes against a simulator

FACTORY = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1, "episode_length": 3}
SPEC = factory_spec(**FACTORY)
SENSOR, PROCESSOR, ACTUATOR = SPEC.agent_ids
TOKENS = {agent: f"token-of-{agent}" for agent in SPEC.agent_ids}
TEAM_CFG = TeamConfig(hidden=8, comm_dim=4)
B = 4
RUN = "agent-cli-test"
TIMEOUT = 60.0  # an agent process that is still running after this has hung


def sim_config(**kwargs: object) -> SimConfig:
    return SimConfig(env="factory", env_kwargs=FACTORY, num_envs=B, run_id=RUN, tokens=TOKENS,
                     **{"join_timeout": 10.0, "step_timeout": 10.0, "feedback_timeout": 10.0,
                        **kwargs})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A checkpoint of the whole team (``team.pt``), one whose graph sends nothing
    (``mute.pt``), and the token file."""
    torch.manual_seed(0)
    Team(SPEC, TEAM_CFG).save(tmp_path / "team.pt")
    Team(SPEC, TeamConfig(hidden=8, comm_dim=4, communicate=False)).save(tmp_path / "mute.pt")
    write_tokens(tmp_path / "tokens.json", TOKENS)
    return tmp_path


@pytest.fixture
def agents(files: Path):
    """Start ``fedcomm agent`` processes; each is stopped at the end if still running."""
    procs: list[subprocess.Popen] = []

    def start(address: str, agent: str = SENSOR, *options: str,
              checkpoint: str = "team.pt") -> subprocess.Popen:
        proc = fedcomm("agent", "--sim", address, "--agent-id", agent,
                       "--tokens", str(files / "tokens.json"),
                       "--checkpoint", str(files / checkpoint), "--no-update",
                       "--ledger", str(files / f"{agent}-{len(procs)}.ledger.jsonl"), *options,
                       cwd=files)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def servers():
    started: list[SimServer] = []

    def start(cfg: SimConfig, port: int = 0) -> tuple[SimServer, JointEnvironmentService]:
        service = JointEnvironmentService(cfg)
        started.append(SimServer(cfg, port=port, service=service))
        return started[-1], service

    yield start
    for server in started:
        server.stop()


def output(proc: subprocess.Popen) -> str:
    """The agent's whole output once it exits; if it hangs, a failure showing where."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # the fault handler prints every thread's stack
        out, _ = proc.communicate(timeout=10)
        pytest.fail(f"the agent still ran after {TIMEOUT:g} s; its output and stacks:\n{out}")
    return out


def error_line(proc: subprocess.Popen, out: str) -> str:
    """The one ``error:`` line of a refused agent, checked: a failure exit and no traceback."""
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("wait", [2, 0])
def test_no_simulator_at_the_address(agents, wait):
    address = f"127.0.0.1:{free_port()}"
    proc = agents(address, SENSOR, "--connect-timeout", str(wait))
    out = output(proc)
    line = error_line(proc, out)
    assert address in line and "fedcomm sim serve" in line
    if wait:  # it waited, said so once, and says how long it waited
        assert "within 2 s" in line and f"waiting for the simulator at {address}" in out
    else:
        assert "UNAVAILABLE" in line and "waiting" not in out


def test_an_agent_missing_at_the_join_barrier(agents, servers):
    server, _ = servers(sim_config(join_timeout=1.0))
    proc = agents(server.address, SENSOR)
    line = error_line(proc, output(proc))
    assert "join barrier timed out after 1 s" in line
    assert f"missing {PROCESSOR}, {ACTUATOR}" in line
    assert "start every agent" in line


def test_routes_refused_by_the_simulator(agents, servers, files):
    server, service = servers(sim_config(join_timeout=TIMEOUT))
    # The processor joins first with every route kept: the round's routes are set.
    channel = grpc.insecure_channel(server.address)
    join = pb.JoinRequest(
        header=pb.Header(run_id=RUN, round=0, step=0, sender=PROCESSOR, seq=1),
        agent_type="processor", obs_dim=SPEC.types[1].obs_dim,
        n_actions=SPEC.types[1].n_actions, comm_dim=TEAM_CFG.comm_dim,
        vector_dp=pb.DpParams(clip_norm=TEAM_CFG.clip,
                              noise_multiplier=TEAM_CFG.noise_multiplier),
        feedback_dp=pb.DpParams(clip_norm=TEAM_CFG.feedback_clip,
                                noise_multiplier=TEAM_CFG.feedback_noise_multiplier),
        routes=encode(torch.ones(3, 3, dtype=torch.bool)))
    first = pb_grpc.JointEnvironmentStub(channel).Join.future(
        join, metadata=call_metadata(PROCESSOR, TOKENS[PROCESSOR]), timeout=TIMEOUT)
    try:
        wait_until(lambda: service.round is not None and service.round.slots)
        # The sensor's checkpoint prunes every route: the simulator refuses its join.
        proc = agents(server.address, SENSOR, checkpoint="mute.pt")
        line = error_line(proc, output(proc))
        assert "routes differ from those the round's first agent declared" in line
        assert "same checkpoint" in line
    finally:
        first.cancel()
        channel.close()


def test_a_batch_the_simulator_ends_early(agents, servers, files):
    server, _ = servers(sim_config())
    proc = agents(server.address, SENSOR)
    team = load_team(files / "team.pt")

    def leave(agent: str) -> None:  # join, see the first observation, and leave
        transport = GrpcTransport(server.address, SPEC, agent, TOKENS[agent], TEAM_CFG,
                                  timeout=TIMEOUT)
        try:
            transport.reset(team.kept_routes())
        finally:
            transport.close()

    with ThreadPoolExecutor(2) as pool:
        peers = [pool.submit(leave, agent) for agent in (PROCESSOR, ACTUATOR)]
        line = error_line(proc, output(proc))
        for p in peers:
            p.result(timeout=TIMEOUT)
    assert "the simulator ended the episode batch early" in line
    assert "left at step 0" in line


def test_a_simulator_that_comes_up_late_is_waited_for(agents, servers, files):
    port = free_port()
    proc = agents(f"127.0.0.1:{port}", SENSOR, "--connect-timeout", "30")
    line = proc.stdout.readline()
    while line and "waiting for the simulator" not in line:
        line = proc.stdout.readline()
    assert "waiting for the simulator" in line, "the agent did not wait"
    server, _ = servers(sim_config(), port=port)
    # The processor and the actuator play their part on threads of this process.
    team = load_team(files / "team.pt")

    def peer(agent: str) -> float:
        index = SPEC.agent_ids.index(agent)
        transport = GrpcTransport(server.address, SPEC, agent, TOKENS[agent], TEAM_CFG,
                                  timeout=TIMEOUT)
        try:
            record = Party(team.subteam([index]), transport).run_batch(
                update=False, routes=team.kept_routes())
        finally:
            transport.close()
        return record.stats["return_mean"]

    with ThreadPoolExecutor(2) as pool:
        peers = [pool.submit(peer, agent) for agent in (PROCESSOR, ACTUATOR)]
        out = line + output(proc)
        for p in peers:
            p.result(timeout=TIMEOUT)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "error:" not in out
    assert f"{SENSOR} round 0: return" in out


def test_ctrl_c_while_waiting_for_the_simulator(agents):
    proc = agents(f"127.0.0.1:{free_port()}", SENSOR, "--connect-timeout", "60")
    line = proc.stdout.readline()
    while line and "waiting for the simulator" not in line:
        line = proc.stdout.readline()
    assert "waiting for the simulator" in line, "the agent did not wait"
    proc.send_signal(signal.SIGINT)
    out = line + output(proc)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted" in out


def test_an_agent_of_one_site_plays_its_site_alone(servers, tmp_path):
    """``fedcomm agent`` with a checkpoint of a run of two sites: the simulator steps site 1
    on its own (site 0's agents never come) and the agent plays in its site's frame, its
    site's listener on a thread of this process."""
    spec = make_env("speaker_listener", B, sites=2).spec
    tokens = {agent: f"token-of-{agent}" for agent in spec.agent_ids}
    torch.manual_seed(0)
    team = Team(spec, TEAM_CFG)
    team.save(tmp_path / "team.pt")
    write_tokens(tmp_path / "tokens.json", tokens)
    server, _ = servers(SimConfig(env="speaker_listener", env_kwargs={"sites": 2}, num_envs=B,
                                  run_id=RUN, tokens=tokens, join_timeout=30.0))
    proc = fedcomm("agent", "--sim", server.address, "--agent-id", "s1.speaker_0",
                   "--tokens", str(tmp_path / "tokens.json"), "--checkpoint",
                   str(tmp_path / "team.pt"), "--no-update", "--ledger",
                   str(tmp_path / "speaker.ledger.jsonl"), cwd=tmp_path)
    listener = spec.agent_ids.index("s1.listener_0")
    transport = GrpcTransport(server.address, spec, "s1.listener_0", tokens["s1.listener_0"],
                              TEAM_CFG, timeout=TIMEOUT)
    try:
        Party(team.subteam([listener]).in_own_site(), transport).run_batch(
            update=False, routes=team.kept_routes())
    finally:
        transport.close()
    out = output(proc)
    assert proc.returncode == 0, out
    assert "s1.speaker_0 round 0: return" in out
