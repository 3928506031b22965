"""Bounded resources at the simulator: the frames an agent may send ahead, the size of a message,
the calls open at once, and how long a call may take to send its request.

Each bound is checked against a caller that pushes past it, and each time the simulator then
serves a normal round. The flood runs against ``fedcomm sim serve`` as a process of its own,
whose memory is read from ``/proc``; the rest against the service in process, where a test
looks inside it, or as a process where the caller's load would otherwise share its interpreter.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from fedcomm.clients.grpc_transport import GrpcTransport
from fedcomm.config import TeamConfig
from fedcomm.learning.party import Party
from fedcomm.learning.transport import BatchTruncated
from fedcomm.models.team import Team
from fedcomm.protocol.auth import call_metadata, write_tokens
from fedcomm.protocol.codec import encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.limits import INBOX_FRAMES, message_limit
from fedcomm.sim.registry import make_env
from fedcomm.sim.serve import SimServer
from tests.harness.processes import SimServeProcesses
from tests.harness.sim import (
    AGENTS,
    PROCESSOR,
    RUN,
    SENSOR,
    SERVICE,
    SPEC,
    Client,
    Code,
    D,
    config,
    expect,
    metadata,
    others,
)

TIMEOUT = 30.0


# -- frames sent ahead ---------------------------------------------------------------------
@pytest.mark.integration  # a simulator
def test_frames_sent_ahead_of_the_answers_end_the_stream_at_once(
        start: Callable[..., Client]) -> None:
    sim = start(step_timeout=10.0)  # the others' turn does not run out first on a busy machine
    streams = sim.open_round()
    flooder = streams[PROCESSOR]
    # The driver may take the first frame as the step's answer before the next arrive (where
    # the flooder's slot is the first it reads): INBOX_FRAMES more after it overflow either way.
    for _ in range(INBOX_FRAMES + 2):
        flooder.send(flooder.frame("vector", 0))
    flooder.fails(Code.RESOURCE_EXHAUSTED,
                  f"more than {INBOX_FRAMES} frames sent ahead of the simulator's answers")
    for stream in others(streams):
        stream.send(stream.frame("vector", 0))
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} sent an invalid message at step 0: more than "
                         f"{INBOX_FRAMES} frames sent ahead")
    sim.complete_round()


# -- message sizes -------------------------------------------------------------------------
@pytest.mark.integration  # a simulator
def test_the_message_limit_follows_the_runs_shapes(start: Callable[..., Client]) -> None:
    """At the largest comm_dim the simulator takes, the largest messages of a round (the
    feedback of a receiver every other agent reached) pass; a larger comm_dim is refused at the
    join, a larger message on arrival."""
    sim = start(max_comm_dim=D)
    limit = sim.describe().max_message_bytes
    feedback = (len(AGENTS) - 1) * SPEC.episode_length * 4 * D * 4
    assert limit == message_limit(SPEC, 4, D) and feedback < limit < 2 * feedback + 2**17
    sim.complete_round()
    expect(Code.INVALID_ARGUMENT, f"comm_dim {D + 1} exceeds the simulator's largest, {D}",
           lambda: sim.join(SENSOR, sim.describe().round, comm_dim=D + 1))
    oversize = pb.Tensor(dtype=pb.BOOL, shape=[3, 3], data=b"\1" * limit)
    expect(Code.RESOURCE_EXHAUSTED, "larger than max",
           lambda: sim.join(SENSOR, sim.describe().round, routes=oversize))
    sim.complete_round()


def test_a_limit_beyond_what_grpc_can_carry_is_refused_at_the_start() -> None:
    with pytest.raises(ValueError, match="exceed gRPC's limit"):
        SimServer(config(max_comm_dim=2**26))


# -- calls ---------------------------------------------------------------------------------
def never() -> Iterator[bytes]:
    """A request stream that sends nothing until its call ends."""
    threading.Event().wait(TIMEOUT)
    yield b""


@pytest.mark.integration  # a simulator
def test_a_call_that_sends_no_request_is_cut_off(start: Callable[..., Client]) -> None:
    """Otherwise anyone could hold calls open by sending nothing after the headers."""
    sim = start(step_timeout=1.0)
    join = sim.channel.stream_unary(SERVICE + "Join")
    begin = time.monotonic()
    expect(Code.UNAUTHENTICATED, "no agent 'ghost'",
           lambda: join(never(), metadata=call_metadata("ghost", "x"), timeout=TIMEOUT))
    assert time.monotonic() - begin < 1.0  # refused before anything is read
    expect(Code.DEADLINE_EXCEEDED, "no JoinRequest arrived within 1 s",
           lambda: join(never(), metadata=metadata(SENSOR), timeout=TIMEOUT))
    expect(Code.INVALID_ARGUMENT, "the call sent no JoinRequest",
           lambda: join(iter(()), metadata=metadata(SENSOR), timeout=TIMEOUT))
    sim.complete_round()


def tokens_of(agents: tuple[str, ...]) -> dict[str, str]:
    return {agent: f"token-of-{agent}" for agent in agents}  # as TOKENS


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, str]]]:
    """``fedcomm sim serve`` with the given options, on the CPU, its agents' tokens as TOKENS;
    yields its process and address."""
    procs = SimServeProcesses(tmp_path)

    def start_(agents: tuple[str, ...], *options: str) -> tuple[subprocess.Popen, str]:
        tokens = tmp_path / f"tokens-{len(procs.procs)}.json"
        write_tokens(tokens, tokens_of(agents))
        return procs.start("--tokens", str(tokens), "--device", "cpu", *options)

    yield start_
    procs.stop()


FACTORY = ("--env", "factory", *(a for opt in ("n_sensors=1", "n_processors=1", "n_actuators=1",
                                               f"episode_length={SPEC.episode_length}")
                                 for a in ("--env-opt", opt)),
           "--run-id", RUN, "--join-timeout", "3", "--step-timeout", "2",
           "--feedback-timeout", "3")
ATTACK_STREAMS = 200  # opened at once on each connection, again and again
ATTACK_CONNECTIONS = 4


async def attack(address: str, stop: threading.Event, codes: Counter) -> None:
    """Open Step streams and unary calls that send nothing, as fast as the simulator answers,
    on connections of their own, without credentials an agent of the run would have."""
    async def one_connection(n: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            step = channel.stream_stream(SERVICE + "Step")
            join = channel.stream_unary(SERVICE + "Join")
            garbled = (("x-fedcomm-agent", SENSOR), ("authorization", f"Bearer forged-{n}"))
            while not stop.is_set():
                calls = [step(metadata=garbled, timeout=TIMEOUT) if i % 2 else
                         join(metadata=(), timeout=TIMEOUT) for i in range(ATTACK_STREAMS)]
                for call in calls:
                    codes[await call.code()] += 1

    await asyncio.gather(*(one_connection(n) for n in range(ATTACK_CONNECTIONS)))


@pytest.mark.integration  # a simulator process
def test_callers_opening_many_streams_cannot_stop_a_normal_round(sim_process) -> None:
    _, address = sim_process(AGENTS, *FACTORY, "--num-envs", "4")
    stop, codes = threading.Event(), Counter()
    attacker = threading.Thread(target=lambda: asyncio.run(attack(address, stop, codes)))
    attacker.start()
    sim = Client(int(address.rsplit(":", 1)[1]))
    try:
        deadline = time.monotonic() + TIMEOUT
        while sum(codes.values()) < ATTACK_STREAMS:  # the attack is under way
            assert attacker.is_alive() and time.monotonic() < deadline, codes
            time.sleep(0.01)
        for _ in range(3):
            sim.complete_round()
    finally:
        stop.set()
        attacker.join(timeout=2 * TIMEOUT)
        sim.close()
    # Refused as nobody, past the calls the server takes at once, or (UNAVAILABLE) as a stream
    # beyond what its connection may open.
    assert set(codes) <= {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE}, codes
    assert codes[Code.UNAUTHENTICATED] > 3 * ATTACK_STREAMS, codes


# -- a flood of frames ---------------------------------------------------------------------
FLOOD_ENVS, FLOOD_DIM = 1024, 64  # a vector frame of 256 KiB
FLOOD_BYTES = 100 * 2**20
MEMORY_BOUND_KIB = 16 * 2**10  # what the flood may add to the simulator's peak memory
SPEAKER_LISTENER = make_env("speaker_listener", 1).spec
FLOOD_TOKENS = tokens_of(SPEAKER_LISTENER.agent_ids)
ROUTES = torch.ones(2, 2, dtype=torch.bool)


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in KiB."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Start the process's VmHWM afresh from its present VmRSS (Linux's clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


TEAM_CFG = TeamConfig(hidden=8, comm_dim=FLOOD_DIM)


def transport(address: str, agent: str) -> GrpcTransport:
    return GrpcTransport(address, SPEAKER_LISTENER, agent, FLOOD_TOKENS[agent], TEAM_CFG,
                         timeout=TIMEOUT)


def normal_round(address: str) -> None:
    """One batch of the speaker and the listener, each a Party on its own transport."""
    torch.manual_seed(0)
    team = Team(SPEAKER_LISTENER, TEAM_CFG)
    transports = [transport(address, a) for a in SPEAKER_LISTENER.agent_ids]
    try:
        parties = [Party(team.subteam([i]), t, seed=i) for i, t in enumerate(transports)]
        with ThreadPoolExecutor(len(parties)) as pool:
            records = list(pool.map(lambda p: p.run_batch(update=False), parties))
    finally:
        for t in transports:
            t.close()
    assert all(r.rollout.rewards.shape[:2] == (SPEAKER_LISTENER.episode_length, FLOOD_ENVS)
               for r in records)


class Flood:
    """The listener's side of a batch: it joins as the speaker's transport does, then sends
    ``FLOOD_BYTES`` of vector frames without waiting for any answer."""

    def __init__(self, channel: grpc.Channel, speaker: GrpcTransport) -> None:
        self.channel, self.sent = channel, 0
        self.stub = pb_grpc.JointEnvironmentStub(channel)
        self.md = call_metadata("listener_0", FLOOD_TOKENS["listener_0"])
        round_number = self.stub.Describe(pb.DescribeRequest(), metadata=self.md,
                                          timeout=TIMEOUT).round
        kind = SPEAKER_LISTENER.types[1]
        self.join = pb.JoinRequest(
            header=pb.Header(run_id=RUN, round=round_number, sender="listener_0", seq=1),
            agent_type=kind.name, obs_dim=kind.obs_dim, n_actions=kind.n_actions,
            comm_dim=FLOOD_DIM, vector_dp=speaker.vector_dp, feedback_dp=speaker.feedback_dp,
            routes=encode(ROUTES), release_every=TEAM_CFG.release_every)
        vector = pb.KnowledgeVector(
            header=pb.Header(run_id=RUN, round=round_number, sender="listener_0", seq=2),
            vector=encode(torch.zeros(FLOOD_ENVS, FLOOD_DIM)), dp=speaker.vector_dp)
        self.frame = pb.AgentFrame(vector=vector).SerializeToString()

    def frames(self) -> Iterator[bytes]:
        while self.sent < FLOOD_BYTES:
            self.sent += len(self.frame)
            yield self.frame

    def run(self) -> grpc.RpcError:
        """Join, flood; the status the stream ends with."""
        self.stub.Join(self.join, metadata=self.md, timeout=TIMEOUT)
        step = self.channel.stream_stream(SERVICE + "Step",
                                          response_deserializer=pb.SimFrame.FromString)
        with pytest.raises(grpc.RpcError) as ended:
            list(step(self.frames(), metadata=self.md, timeout=TIMEOUT))
        return ended.value


@pytest.mark.integration  # a simulator process
def test_a_flood_of_frames_on_one_stream_leaves_the_simulators_memory_bounded(
        sim_process) -> None:
    proc, address = sim_process(
        SPEAKER_LISTENER.agent_ids, "--env", "speaker_listener", "--run-id", RUN,
        "--num-envs", str(FLOOD_ENVS), "--comm-dim", str(FLOOD_DIM))
    normal_round(address)  # what a batch allocates is allocated
    reset_peak(proc.pid)  # and the round's own peak does not hide the flood's
    before = memory_kib(proc.pid)
    speaker = transport(address, "speaker_0")
    try:
        with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(1) as pool:
            flood = Flood(channel, speaker)
            joined = pool.submit(speaker.reset, ROUTES)
            ended = flood.run()
            joined.result()
            with pytest.raises(BatchTruncated) as truncated:  # at step 0, whichever phase
                speaker.exchange(torch.zeros(FLOOD_ENVS, 1, FLOOD_DIM))
                speaker.step([torch.zeros(FLOOD_ENVS, 1, dtype=torch.long)])
    finally:
        speaker.close()
    after = memory_kib(proc.pid)
    print(f"flood: {flood.sent / 2**20:.1f} MiB handed to gRPC; simulator VmRSS "
          f"{before['VmRSS'] / 2**10:.1f} -> {after['VmRSS'] / 2**10:.1f} MiB, VmHWM "
          f"{before['VmHWM'] / 2**10:.1f} -> {after['VmHWM'] / 2**10:.1f} MiB")
    assert ended.code() == Code.RESOURCE_EXHAUSTED, ended
    assert f"more than {INBOX_FRAMES} frames sent ahead" in ended.details()
    assert f"listener_0 sent an invalid message at step 0: more than {INBOX_FRAMES}" in str(
        truncated.value)
    assert after["VmHWM"] - before["VmHWM"] < MEMORY_BOUND_KIB, (before, after)
    normal_round(address)

