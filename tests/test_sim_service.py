"""The simulator service under bad input: each violation is answered with a precise status on
the offender's call, the other agents learn why their batch ended, and the simulator neither
crashes nor hangs and goes on serving the next round.

The simulator runs in process (``SimServer``) with a one-sensor, one-processor, one-actuator
factory and short timeouts. Agents speak through raw stubs, or through ``GrpcTransport`` and
``Party`` for whole training rounds. Every client call carries a deadline, so a hang fails its
test instead of stalling the run.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import DecodeError, Message
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedcomm.clients.grpc_transport import ClientTls, GrpcTransport, TransportError
from fedcomm.config import TeamConfig
from fedcomm.learning.party import Party
from fedcomm.models.team import Team
from fedcomm.protocol.auth import call_metadata
from fedcomm.protocol.codec import NUMPY, encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.factory import factory_spec
from fedcomm.sim.serve import ServerTls, SimServer
from fedcomm.sim.service import JointEnvironmentService, SimConfig

Code = grpc.StatusCode
T, B, D = 3, 4, 4  # episode length, environments per batch, comm_dim
SPEC = factory_spec(n_sensors=1, n_processors=1, n_actuators=1, episode_length=T)
AGENTS = SPEC.agent_ids
SENSOR, PROCESSOR, ACTUATOR = AGENTS
TOKENS = {agent: f"token-of-{agent}" for agent in AGENTS}
RUN = "fedcomm-test"
VECTOR_DP = pb.DpParams(clip_norm=1.0, noise_multiplier=0.5)
FEEDBACK_DP = pb.DpParams(clip_norm=2.0, noise_multiplier=0.25)  # unlike VECTOR_DP: no mixups
ALL_ROUTES = torch.ones(3, 3, dtype=torch.bool)
FEEDBACK_VALUE = 0.1  # every valid feedback coordinate: the summed replies are checkable
TEAM_CFG = TeamConfig(hidden=8, comm_dim=D, clip=1.0, noise_multiplier=0.5, feedback_clip=2.0,
                      feedback_noise_multiplier=0.25)
TIMEOUT = 10.0  # every client call's deadline: a hang fails the test
JOIN_PROBE = 0.5  # deadline of a join that may be valid and would then wait at the barrier
SERVICE = "/fedcomm.v1.JointEnvironment/"
# What a well-formed but wrong message may be answered with; never UNKNOWN or INTERNAL.
REFUSALS = frozenset({
    Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED,
    Code.ALREADY_EXISTS, Code.UNAUTHENTICATED, Code.DEADLINE_EXCEEDED,
    Code.RESOURCE_EXHAUSTED, Code.ABORTED})
PROPERTY = settings(max_examples=40, deadline=None)

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


# -- messages ------------------------------------------------------------------------------
def metadata(agent: str) -> tuple[tuple[str, str], ...]:
    return call_metadata(agent, TOKENS.get(agent, "no-token"))


def replace(msg: Message, **fields: object) -> Message:
    """Overwrite fields of ``msg``: messages are copied in, lists replace repeated fields."""
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(msg, name).CopyFrom(value)
        elif isinstance(value, list):
            del getattr(msg, name)[:]
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def join_request(agent: str, round_number: int, **fields: object) -> pb.JoinRequest:
    """A valid join for ``agent``, with ``fields`` replaced."""
    kind = SPEC.types[SPEC.type_of_agent[AGENTS.index(agent)]]
    request = pb.JoinRequest(
        header=pb.Header(run_id=RUN, round=round_number, sender=agent, seq=1),
        agent_type=kind.name, obs_dim=kind.obs_dim, n_actions=kind.n_actions, comm_dim=D,
        vector_dp=VECTOR_DP, feedback_dp=FEEDBACK_DP, routes=encode(ALL_ROUTES))
    return replace(request, **fields)


def outcome(call: Callable[[], object]) -> tuple[Code, str]:
    """The status ``call`` ends with: OK where it returns."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def expect(code: Code, fragment: str, call: Callable[[], object]) -> str:
    """Assert that ``call`` fails with ``code`` and details containing ``fragment``."""
    got, details = outcome(call)
    assert got == code and fragment in details, (got, details)
    return details


# -- agents on raw stubs -------------------------------------------------------------------
class Stream:
    """One agent's Step stream, fed from a queue as GrpcTransport feeds it."""

    def __init__(self, channel: grpc.Channel, agent: str, round_number: int,
                 raw: bool = False) -> None:
        self.agent, self.round, self.seq = agent, round_number, 1
        self.senders: set[int] = set()  # whose vectors reached this agent
        self.requests: queue.SimpleQueue[pb.AgentFrame | bytes | None] = queue.SimpleQueue()
        step = channel.stream_stream(
            SERVICE + "Step", request_serializer=None if raw else pb.AgentFrame.SerializeToString,
            response_deserializer=pb.SimFrame.FromString)
        self.responses = step(iter(self.requests.get, None), metadata=metadata(agent),
                              timeout=TIMEOUT)

    def header(self, step: int) -> pb.Header:
        self.seq += 1
        return pb.Header(run_id=RUN, round=self.round, step=step, sender=self.agent, seq=self.seq)

    def frame(self, kind: str, step: int) -> pb.AgentFrame:
        """A valid vector (zeros) or action (0, which every agent has) for ``step``."""
        if kind == "vector":
            return pb.AgentFrame(vector=pb.KnowledgeVector(
                header=self.header(step), vector=encode(torch.zeros(B, D)), dp=VECTOR_DP))
        return pb.AgentFrame(action=pb.Action(
            header=self.header(step), action=encode(torch.zeros(B, dtype=torch.long))))

    def feedback(self) -> pb.FeedbackRequest:
        """Valid feedback for every sender whose vectors reached this agent."""
        senders = sorted(self.senders)
        return pb.FeedbackRequest(
            header=self.header(T), senders=senders, dp=FEEDBACK_DP,
            grads=encode(torch.full((len(senders), T, B, D), FEEDBACK_VALUE)))

    def send(self, frame: pb.AgentFrame | bytes) -> None:
        self.requests.put(frame)

    def receive(self, body: str) -> pb.SimFrame:
        frame = next(self.responses)
        assert frame.WhichOneof("body") == body, frame
        if body == "routed":
            self.senders.update(frame.routed.senders)
        return frame

    def close(self) -> None:
        """End the request stream (and the thread gRPC feeds it from)."""
        self.requests.put(None)

    def truncated(self, *fragments: str) -> str:
        """Read to the end: an EpisodeEnd marked truncated whose reason holds ``fragments``,
        then a clean close."""
        frames = list(self.responses)
        self.close()
        assert frames and frames[-1].WhichOneof("body") == "end", frames
        end = frames[-1].end
        assert end.truncated and all(f in end.reason for f in fragments), end
        return end.reason

    def fails(self, code: Code, fragment: str) -> str:
        """Read to the end: the stream fails with ``code``."""
        details = expect(code, fragment, lambda: list(self.responses))
        self.close()
        return details


class Client:
    """Raw stubs on one channel to a simulator, speaking as any agent; ``service`` is the
    simulator's, where a test looks inside it."""

    def __init__(self, port: int, service: JointEnvironmentService | None = None) -> None:
        self.port, self.service = port, service
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.JointEnvironmentStub(self.channel)
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.streams: list[Stream] = []

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.channel.close()  # cancels whatever is still in flight
        self.pool.shutdown()

    def describe(self) -> pb.SimInfo:
        return self.stub.Describe(pb.DescribeRequest(), metadata=metadata(SENSOR),
                                  timeout=TIMEOUT)

    def join(self, agent: str, round_number: int, timeout: float = TIMEOUT,
             **fields: object) -> pb.JoinReply:
        return self.stub.Join(join_request(agent, round_number, **fields),
                              metadata=metadata(agent), timeout=timeout)

    def join_all(self, round_number: int, agents: tuple[str, ...] = AGENTS,
                 **fields: object) -> list[pb.JoinReply]:
        futures = [self.pool.submit(self.join, a, round_number, **fields) for a in agents]
        return [f.result() for f in futures]

    def first_join(self, agent: str = SENSOR, **fields: object) -> tuple[int, Future]:
        """Open the next round with ``agent``'s join; returns once the simulator holds it."""
        number = self.describe().round
        future = self.pool.submit(self.join, agent, number, **fields)
        deadline = time.monotonic() + TIMEOUT
        while not self.holds_join(number, agent):
            assert not future.done(), outcome(future.result)
            assert time.monotonic() < deadline, "the first join was never admitted"
            time.sleep(0.005)
        return number, future

    def holds_join(self, number: int, agent: str) -> bool:
        """Whether the simulator's round ``number`` is gathering agents, ``agent`` among them
        (read from its service: Describe names the next round, gathering or not)."""
        assert self.service is not None, "start the simulator with the fixture to look inside"
        rnd = self.service.round
        return rnd is not None and rnd.number == number and AGENTS.index(agent) in rnd.slots

    def stream(self, agent: str, round_number: int, raw: bool = False) -> Stream:
        stream = Stream(self.channel, agent, round_number, raw)
        self.streams.append(stream)
        return stream

    def open_streams(self, round_number: int, agents: tuple[str, ...] = AGENTS,
                     raw: tuple[str, ...] = ()) -> dict[str, Stream]:
        """Every agent's Step stream, each past its first observation."""
        streams = {a: self.stream(a, round_number, a in raw) for a in agents}
        for stream in streams.values():
            stream.receive("observation")
        return streams

    def open_round(self, raw: tuple[str, ...] = (), **fields: object) -> dict[str, Stream]:
        number = self.describe().round
        self.join_all(number, **fields)
        return self.open_streams(number, raw=raw)

    @staticmethod
    def exchange(streams: dict[str, Stream], t: int) -> None:
        for stream in streams.values():
            stream.send(stream.frame("vector", t))
        for stream in streams.values():
            stream.receive("routed")

    @staticmethod
    def act(streams: dict[str, Stream], t: int) -> None:
        for stream in streams.values():
            stream.send(stream.frame("action", t))
        for stream in streams.values():
            frame = stream.receive("end" if t == T - 1 else "observation")
            assert not frame.end.truncated, frame

    def play(self, streams: dict[str, Stream]) -> None:
        """The whole episode batch, valid throughout."""
        for t in range(T):
            self.exchange(streams, t)
            self.act(streams, t)
        for stream in streams.values():
            assert list(stream.responses) == []
            stream.close()

    def feedback(self, agent: str, request: pb.FeedbackRequest,
                 timeout: float = TIMEOUT) -> pb.FeedbackReply:
        return self.stub.Feedback(request, metadata=metadata(agent), timeout=timeout)

    def submit_feedback(self, stream: Stream) -> Future:
        return self.pool.submit(self.feedback, stream.agent, stream.feedback())

    def complete_round(self) -> None:
        """A fresh round, valid from the joins to the feedback: the simulator still serves."""
        streams = self.open_round()
        self.play(streams)
        futures = [self.submit_feedback(s) for s in streams.values()]
        for future in futures:
            check_reply(future.result())


def check_reply(reply: pb.FeedbackReply, receivers: int = 2) -> None:
    """Every receiver sent FEEDBACK_VALUE everywhere: the reply is their sum."""
    assert reply.receivers == receivers
    grad = np.frombuffer(reply.grad.data, dtype="<f4").reshape(tuple(reply.grad.shape))
    np.testing.assert_allclose(grad, np.full((T, B, D), receivers * FEEDBACK_VALUE), rtol=1e-6)


def others(streams: dict[str, Stream], offender: str = PROCESSOR) -> list[Stream]:
    return [s for agent, s in streams.items() if agent != offender]


def run_parties(target: str, tls: ClientTls | None = None) -> None:
    """One federated training round: each agent a Party on its own GrpcTransport."""
    torch.manual_seed(0)
    team = Team(SPEC, TEAM_CFG)
    transports = [GrpcTransport(target, SPEC, a, TOKENS[a], TEAM_CFG, tls, timeout=TIMEOUT)
                  for a in AGENTS]
    pool = ThreadPoolExecutor(len(transports))
    try:
        parties = [Party(team.subteam([i]), t, seed=i) for i, t in enumerate(transports)]
        futures = [pool.submit(p.run_batch, update=False) for p in parties]
        records = [f.result(timeout=3 * TIMEOUT) for f in futures]  # its Step stream has none
    finally:
        for transport in transports:  # cancels whatever is in flight: no thread hangs on
            transport.close()
        pool.shutdown()
    for record in records:
        assert record.rollout.rewards.shape == (T, B, 1)
        assert record.received.shape == (T, B, 1, D) and record.received.abs().sum() > 0


# -- simulators ----------------------------------------------------------------------------
def config(**changes: object) -> SimConfig:
    fields = dict(env="factory", num_envs=B, run_id=RUN, tokens=TOKENS, join_timeout=3.0,
                  step_timeout=2.0, feedback_timeout=3.0,
                  env_kwargs={"n_sensors": 1, "n_processors": 1, "n_actuators": 1,
                              "episode_length": T})
    return SimConfig(**(fields | changes))


@pytest.fixture
def start() -> Iterator[Callable[..., Client]]:
    """Start simulators (SimConfig changes as keywords), each with a client; all stop after."""
    with ExitStack() as stack:
        def start_(tls: ServerTls | None = None, **changes: object) -> Client:
            server = stack.enter_context(SimServer(config(**changes), tls=tls))
            client = Client(server.port, server.service)
            stack.callback(client.close)
            return client

        yield start_


@pytest.fixture
def sim(start: Callable[..., Client]) -> Client:
    return start()


def test_valid_rounds_over_raw_stubs_and_real_parties(sim: Client) -> None:
    """The baseline the other tests depend on: the helpers and the real client both work."""
    info = sim.describe()
    assert (info.run_id, info.num_envs, info.episode_length, info.round) == (RUN, B, T, 0)
    sim.complete_round()
    run_parties(f"127.0.0.1:{sim.port}")
    assert sim.describe().round == 2


# -- 1. who is calling ---------------------------------------------------------------------
CALLERS = {  # an unknown agent is not told who the agents are
    "wrong token": (call_metadata(SENSOR, "forged"), f"wrong token for {SENSOR}"),
    "unknown agent": (call_metadata("ghost", "any"), "no agent 'ghost' in this run"),
    "no credentials": ((), "no x-fedcomm-agent metadata"),
}


@pytest.mark.parametrize("method", ["Describe", "Join", "Step", "Feedback"])
@pytest.mark.parametrize(("md", "fragment"), CALLERS.values(), ids=CALLERS)
def test_a_caller_that_is_no_agent_is_refused(sim: Client, method: str,
                                              md: tuple[tuple[str, str], ...],
                                              fragment: str) -> None:
    calls = {
        "Describe": lambda: sim.stub.Describe(pb.DescribeRequest(), metadata=md,
                                              timeout=TIMEOUT),
        "Join": lambda: sim.stub.Join(join_request(SENSOR, 0), metadata=md, timeout=TIMEOUT),
        "Step": lambda: list(sim.stub.Step(iter(()), metadata=md, timeout=TIMEOUT)),
        "Feedback": lambda: sim.stub.Feedback(pb.FeedbackRequest(), metadata=md,
                                              timeout=TIMEOUT),
    }
    details = expect(Code.UNAUTHENTICATED, fragment, calls[method])
    assert PROCESSOR not in details
    sim.complete_round()


HEADERS = {
    "another sender": ({"sender": PROCESSOR}, Code.PERMISSION_DENIED,
                       f"{SENSOR} cannot speak as '{PROCESSOR}'"),
    "sim as sender": ({"sender": "sim"}, Code.PERMISSION_DENIED, "cannot speak as 'sim'"),
    "wrong run": ({"run_id": "other-run"}, Code.FAILED_PRECONDITION,
                  f"run 'other-run' is not this simulator's run '{RUN}'"),
}


@pytest.mark.parametrize(("changes", "code", "fragment"), HEADERS.values(), ids=HEADERS)
def test_a_join_whose_header_names_another_agent_or_run_is_refused(
        sim: Client, changes: dict, code: Code, fragment: str) -> None:
    request = join_request(SENSOR, 0)
    replace(request.header, **changes)
    expect(code, fragment, lambda: sim.stub.Join(request, metadata=metadata(SENSOR),
                                                 timeout=TIMEOUT))
    sim.complete_round()


# -- 2. joining ----------------------------------------------------------------------------
JOIN_DECLARATIONS = {
    "wrong type": ({"agent_type": "actuator"}, "sensor_0 is a sensor"),
    "wrong obs_dim": ({"obs_dim": 3}, "observations of 2 and 1 actions; the join declares"),
    "wrong n_actions": ({"n_actions": 4}, "the join declares ('sensor', 2, 4)"),
    "zero comm_dim": ({"comm_dim": 0}, "comm_dim must be positive"),
    "zero clip": ({"vector_dp": pb.DpParams(clip_norm=0.0)}, "vector_dp: clip norm must be"),
    "negative noise": ({"feedback_dp": pb.DpParams(clip_norm=1.0, noise_multiplier=-1.0)},
                       "feedback_dp: clip norm must be positive and noise multiplier"),
    "NaN clip": ({"vector_dp": pb.DpParams(clip_norm=math.nan)}, "got nan"),
    "-inf clip": ({"vector_dp": pb.DpParams(clip_norm=-math.inf)}, "got -inf"),
    "inf clip": ({"vector_dp": pb.DpParams(clip_norm=math.inf)}, "got inf"),
    "routes shape": ({"routes": encode(torch.ones(2, 3, dtype=torch.bool))},
                     "routes: shape [2, 3], expected [3, 3]"),
    "routes dtype": ({"routes": encode(torch.ones(3, 3))}, "routes: dtype FLOAT32"),
    "routes bytes": ({"routes": pb.Tensor(dtype=pb.BOOL, shape=[3, 3], data=b"\1" * 8)},
                     "8 bytes do not hold a bool tensor of shape [3, 3]"),
}


@pytest.mark.parametrize(("fields", "fragment"), JOIN_DECLARATIONS.values(),
                         ids=JOIN_DECLARATIONS)
def test_a_join_declaring_what_the_agent_is_not_is_refused(sim: Client, fields: dict,
                                                           fragment: str) -> None:
    expect(Code.INVALID_ARGUMENT, fragment, lambda: sim.join(SENSOR, 0, **fields))
    sim.complete_round()


def test_a_join_with_a_sequence_number_other_than_one_is_refused(sim: Client) -> None:
    request = join_request(SENSOR, 0)
    request.header.seq = 2
    expect(Code.INVALID_ARGUMENT, "a join carries sequence number 1, got 2",
           lambda: sim.stub.Join(request, metadata=metadata(SENSOR), timeout=TIMEOUT))
    sim.complete_round()


def test_a_second_join_of_the_same_agent_is_refused(sim: Client) -> None:
    number, first = sim.first_join(SENSOR)
    expect(Code.ALREADY_EXISTS, f"{SENSOR} already joined round {number}",
           lambda: sim.join(SENSOR, number))
    sim.join_all(number, (PROCESSOR, ACTUATOR))
    assert first.result().agent_index == 0
    sim.play(sim.open_streams(number))
    sim.complete_round()


ROUND_TERMS = {
    "routes": ({"routes": encode(~torch.eye(3, dtype=torch.bool))},
               "routes differ from those the round's first agent declared"),
    "comm_dim": ({"comm_dim": D + 1}, f"comm_dim {D + 1}, the round uses {D}"),
    "vector_dp": ({"vector_dp": pb.DpParams(clip_norm=1.0, noise_multiplier=0.3)},
                  "vector_dp declares clip 1, noise multiplier 0.3; the round agreed on 1, 0.5"),
    "feedback_dp": ({"feedback_dp": pb.DpParams(clip_norm=3.0, noise_multiplier=0.25)},
                    "feedback_dp declares clip 3"),
    "seed": ({"seed": 7}, "seed 7 declared; the round's first agent declared no seed"),
}


@pytest.mark.parametrize(("fields", "fragment"), ROUND_TERMS.values(), ids=ROUND_TERMS)
def test_a_join_disagreeing_with_the_first_joiners_terms_is_refused(
        sim: Client, fields: dict, fragment: str) -> None:
    number, first = sim.first_join(SENSOR)
    expect(Code.INVALID_ARGUMENT, fragment, lambda: sim.join(PROCESSOR, number, **fields))
    sim.join_all(number, (PROCESSOR, ACTUATOR))  # agreeing, they are admitted
    first.result()
    sim.play(sim.open_streams(number))
    sim.complete_round()


def test_joins_for_the_wrong_round_are_refused(sim: Client) -> None:
    sim.complete_round()
    expect(Code.FAILED_PRECONDITION, "round 0 already ran; the next round is 1",
           lambda: sim.join(SENSOR, 0))
    number, first = sim.first_join(SENSOR)
    expect(Code.FAILED_PRECONDITION, f"round {number} is gathering agents; cannot join round "
                                     f"{number + 1}", lambda: sim.join(PROCESSOR, number + 1))
    sim.join_all(number, (PROCESSOR, ACTUATOR))
    first.result()
    expect(Code.FAILED_PRECONDITION, f"round {number} is running; join after it ends",
           lambda: sim.join(SENSOR, number + 1))
    sim.play(sim.open_streams(number))
    sim.complete_round()


@pytest.mark.parametrize("ahead", [1, 5, 2**32 - 1], ids=["next but one", "5", "last"])
def test_a_join_for_a_later_round_than_the_next_is_refused_at_once(sim: Client,
                                                                    ahead: int) -> None:
    """Otherwise the round it opens turns every honest join away until it times out."""
    number = min(sim.describe().round + ahead, 2**32 - 1)
    begin = time.monotonic()
    expect(Code.FAILED_PRECONDITION, f"round {number} is not open; the next round is 0",
           lambda: sim.join(SENSOR, number))
    assert time.monotonic() - begin < 1.0
    sim.complete_round()


def test_an_incomplete_join_barrier_times_out_and_the_round_can_be_joined_again(
        start: Callable[..., Client]) -> None:
    sim = start(join_timeout=1.0)
    begin = time.monotonic()
    expect(Code.DEADLINE_EXCEEDED, f"round 0: join barrier timed out after 1 s, missing "
                                   f"{PROCESSOR}, {ACTUATOR}", lambda: sim.join(SENSOR, 0))
    assert 0.9 < time.monotonic() - begin < 3.0
    assert sim.describe().round == 0
    sim.join_all(0)
    sim.play(sim.open_streams(0))
    sim.complete_round()


def test_a_first_joiner_that_leaves_takes_its_terms_with_it(sim: Client) -> None:
    """Otherwise the terms of an agent no longer there bind every later joiner of the round."""
    number = sim.describe().round
    pruned = encode(~torch.eye(3, dtype=torch.bool))
    expect(Code.DEADLINE_EXCEEDED, "Deadline Exceeded",
           lambda: sim.join(SENSOR, number, timeout=JOIN_PROBE, routes=pruned, comm_dim=D + 1))
    sim.join_all(number)  # the default terms: all routes, comm_dim D
    sim.play(sim.open_streams(number))
    sim.complete_round()


# -- 3. the step stream --------------------------------------------------------------------
def tampered(kind: str, change: Callable[[Message], object]) -> Callable[[Stream, int], Message]:
    """The agent's valid frame of ``kind``, with ``change`` applied to its message."""
    def build(stream: Stream, t: int) -> pb.AgentFrame:
        frame = stream.frame(kind, t)
        change(getattr(frame, kind))
        return frame

    return build


def tensor(field: str, values: torch.Tensor) -> Callable[[Message], object]:
    return lambda msg: getattr(msg, field).CopyFrom(encode(values))


def header(**changes: object) -> Callable[[Message], object]:
    return lambda msg: replace(msg.header, **changes)


INVALID = Code.INVALID_ARGUMENT
STEP_VIOLATIONS = {
    "vector shape": ("vector", tampered("vector", tensor("vector", torch.zeros(B, D + 1))),
                     INVALID, "vector: shape [4, 5], expected [4, 4]"),
    "vector dtype": ("vector", tampered("vector", tensor("vector", torch.zeros(B, D).long())),
                     INVALID, "vector: dtype INT64, expected FLOAT32"),
    "vector NaN": ("vector", tampered("vector", tensor("vector", torch.full((B, D), math.nan))),
                   INVALID, "vector: contains NaN or Inf"),
    "vector Inf": ("vector", tampered("vector", tensor("vector", torch.full((B, D), math.inf))),
                   INVALID, "vector: contains NaN or Inf"),
    "vector bytes": ("vector", tampered("vector", lambda m: setattr(m.vector, "data", b"\0" * 63)),
                     INVALID, "63 bytes do not hold a float32 tensor of shape [4, 4]"),
    "vector norm": ("vector", tampered("vector", tensor("vector", torch.full((B, D), 100.0))),
                    INVALID, "vector: norm 200 exceeds what clip 1 with noise multiplier 0.5"),
    "vector dp": ("vector", tampered("vector", lambda m: m.dp.CopyFrom(pb.DpParams(
        clip_norm=4.0, noise_multiplier=0.5))),
        INVALID, "the vector declares clip 4, noise multiplier 0.5; the round agreed on 1, 0.5"),
    "replayed seq": ("vector", tampered("vector", header(seq=1)),
                     INVALID, "sequence number 1 is replayed: expected 2"),
    "skipped seq": ("vector", tampered("vector", header(seq=3)),
                    INVALID, "sequence number 3 is out of order: expected 2"),
    "another sender": ("vector", tampered("vector", header(sender=SENSOR)),
                       Code.PERMISSION_DENIED, f"{PROCESSOR} cannot speak as '{SENSOR}'"),
    "wrong run": ("vector", tampered("vector", header(run_id="other-run")),
                  Code.FAILED_PRECONDITION, "run 'other-run' is not this simulator's run"),
    "wrong step": ("vector", tampered("vector", header(step=2)),
                   INVALID, "message for step 2 during step 0"),
    "action for a vector": ("vector", lambda s, t: s.frame("action", t),
                            INVALID, "expected a vector at step 0, got action"),
    "empty frame": ("vector", lambda s, t: pb.AgentFrame(),
                    INVALID, "expected a vector at step 0, got an empty frame"),
    "vector for an action": ("action", lambda s, t: s.frame("vector", t),
                             INVALID, "at step 0, got vector"),
    "action too large": ("action", tampered("action", tensor("action", torch.ones(B).long())),
                         INVALID, "actions must lie in [0, 1)"),
    "action negative": ("action", tampered("action", tensor("action", -torch.ones(B).long())),
                        INVALID, "actions must lie in [0, 1)"),
    "action dtype": ("action", tampered("action", tensor("action", torch.zeros(B))),
                     INVALID, "action: dtype FLOAT32, expected INT64"),
    "action shape": ("action", tampered("action", tensor("action", torch.zeros(B + 1).long())),
                     INVALID, "action: shape [5], expected [4]"),
}


@pytest.mark.parametrize(("phase", "build", "code", "fragment"), STEP_VIOLATIONS.values(),
                         ids=STEP_VIOLATIONS)
def test_a_step_violation_is_refused_and_ends_the_batch_for_everyone(
        sim: Client, phase: str, build: Callable[[Stream, int], pb.AgentFrame], code: Code,
        fragment: str) -> None:
    streams = sim.open_round()
    if phase == "action":
        sim.exchange(streams, 0)
    offender = streams[PROCESSOR]
    for stream in streams.values():
        stream.send(build(stream, 0) if stream is offender else stream.frame(phase, 0))
    offender.fails(code, fragment)
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} sent an invalid message at step 0: ", fragment)
    sim.complete_round()


def test_a_frame_that_does_not_parse_is_refused(sim: Client) -> None:
    streams = sim.open_round(raw=(PROCESSOR,))
    for stream in others(streams):
        stream.send(stream.frame("vector", 0))
    streams[PROCESSOR].send(b"\xff\xff\xff")
    streams[PROCESSOR].fails(Code.INVALID_ARGUMENT, "cannot parse")
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} sent an invalid message at step 0: cannot parse")
    sim.complete_round()


def test_a_second_step_stream_or_one_without_a_round_is_refused(sim: Client) -> None:
    expect(Code.FAILED_PRECONDITION, f"{SENSOR} has no running round to step: join first",
           lambda: list(sim.stream(SENSOR, 0).responses))
    streams = sim.open_round()
    expect(Code.ALREADY_EXISTS, f"{SENSOR} already has a step stream",
           lambda: list(sim.stream(SENSOR, 0).responses))
    sim.play(streams)
    sim.complete_round()


# -- 4. agents that leave or fall silent ---------------------------------------------------
def test_an_agent_that_disconnects_ends_the_batch_for_the_others(sim: Client) -> None:
    streams = sim.open_round()
    for stream in others(streams):
        stream.send(stream.frame("vector", 0))
    streams[PROCESSOR].responses.cancel()
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} left at step 0")
    sim.complete_round()


def test_an_agent_that_closes_its_stream_mid_episode_ends_the_batch(sim: Client) -> None:
    streams = sim.open_round()
    sim.exchange(streams, 0)
    sim.act(streams, 0)
    streams[ACTUATOR].close()
    for stream in streams.values():
        stream.send(stream.frame("vector", 1))
    for stream in streams.values():
        stream.truncated(f"{ACTUATOR} left at step 1: it closed its step stream")
    sim.complete_round()


def test_an_agent_that_never_answers_is_timed_out(start: Callable[..., Client]) -> None:
    sim = start(step_timeout=1.0)
    streams = sim.open_round()
    begin = time.monotonic()
    for stream in others(streams):
        stream.send(stream.frame("vector", 0))
    for stream in streams.values():  # the silent agent learns it too
        stream.truncated(f"{PROCESSOR} did not answer within 1 s at step 0")
    assert 0.9 < time.monotonic() - begin < 3.0
    sim.complete_round()


def test_an_agent_that_never_opens_its_stream_is_timed_out(start: Callable[..., Client]) -> None:
    sim = start(join_timeout=1.0)
    sim.join_all(0)
    begin = time.monotonic()
    streams = {a: sim.stream(a, 0) for a in (SENSOR, PROCESSOR)}
    for stream in streams.values():
        stream.truncated(f"{ACTUATOR} never opened a step stream")
    assert 0.9 < time.monotonic() - begin < 3.0
    expect(Code.FAILED_PRECONDITION, "has no running round",
           lambda: list(sim.stream(ACTUATOR, 0).responses))
    sim.complete_round()


# -- 5. oversize frames --------------------------------------------------------------------
def test_an_oversize_message_is_refused(sim: Client) -> None:
    huge = pb.Tensor(dtype=pb.BOOL, shape=[3, 3], data=b"\1" * sim.describe().max_message_bytes)
    expect(Code.RESOURCE_EXHAUSTED, "larger than max", lambda: sim.join(SENSOR, 0, routes=huge))
    streams = sim.open_round()
    for stream in others(streams):
        stream.send(stream.frame("vector", 0))
    frame = streams[PROCESSOR].frame("vector", 0)
    frame.vector.vector.data = b"\0" * 100_000
    streams[PROCESSOR].send(frame)
    streams[PROCESSOR].fails(Code.RESOURCE_EXHAUSTED, "larger than max")
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} left at step 0")
    sim.complete_round()


# -- 6. feedback ---------------------------------------------------------------------------
def pruned_routes() -> torch.Tensor:
    """Every route but sensor -> processor: the processor never hears the sensor."""
    routes = ALL_ROUTES.clone()
    routes[0, 1] = False
    return routes


def feedback_change(**fields: object) -> Callable[[pb.FeedbackRequest], object]:
    return lambda request: replace(request, **fields)


def grads(values: torch.Tensor) -> Callable[[pb.FeedbackRequest], object]:
    return lambda request: request.grads.CopyFrom(encode(values))


FEEDBACK_VIOLATIONS = {
    "undelivered sender": (feedback_change(senders=[0, 2]), INVALID,
                           f"feedback for {SENSOR}, whose vectors never reached {PROCESSOR}"),
    "itself": (feedback_change(senders=[1]), INVALID,
               f"feedback for {PROCESSOR}, whose vectors never reached {PROCESSOR}"),
    "unknown sender": (feedback_change(senders=[7]), INVALID, "feedback for #7"),
    "sender twice": (feedback_change(senders=[2, 2]), INVALID, "a sender appears twice"),
    "shape": (grads(torch.zeros(1, T, B, D + 1)), INVALID,
              "feedback: shape [1, 3, 4, 5], expected [1, 3, 4, 4]"),
    "dtype": (grads(torch.zeros(1, T, B, D).long()), INVALID, "feedback: dtype INT64"),
    "NaN": (grads(torch.full((1, T, B, D), math.nan)), INVALID, "feedback: contains NaN"),
    "bytes": (lambda r: setattr(r.grads, "data", r.grads.data + b"\0"), INVALID,
              "193 bytes do not hold a float32 tensor"),
    "norm": (grads(torch.full((1, T, B, D), 10.0)), INVALID,
             "feedback: norm 34.64 exceeds what clip 2 with noise multiplier 0.25"),
    "dp": (feedback_change(dp=VECTOR_DP), INVALID,
           "the feedback declares clip 1, noise multiplier 0.5; the round agreed on 2, 0.25"),
    "replayed seq": (lambda r: replace(r.header, seq=r.header.seq - 1), INVALID,
                     "is replayed"),
    "skipped seq": (lambda r: replace(r.header, seq=r.header.seq + 1), INVALID,
                    "is out of order"),
    "another sender": (lambda r: replace(r.header, sender=SENSOR), Code.PERMISSION_DENIED,
                       f"{PROCESSOR} cannot speak as '{SENSOR}'"),
    "wrong run": (lambda r: replace(r.header, run_id="x"), Code.FAILED_PRECONDITION,
                  "run 'x' is not this simulator's run"),
    "wrong round": (lambda r: replace(r.header, round=r.header.round + 1), INVALID,
                    "message for round"),
    "wrong step": (lambda r: replace(r.header, step=0), INVALID, f"message for step 0 during "
                                                                  f"step {T}"),
}


def refuse_then_accept(sim: Client, stream: Stream,
                       change: Callable[[pb.FeedbackRequest], object]) -> tuple[Code, str]:
    """Send ``stream``'s feedback with ``change`` applied; where it is refused, send the
    valid feedback after it, so that the exchange completes."""
    request = stream.feedback()
    valid = pb.Header()
    valid.CopyFrom(request.header)
    change(request)
    code, details = outcome(lambda: sim.feedback(stream.agent, request))
    if code is not Code.OK:
        if request.header != valid:  # a refused header does not use up its sequence number
            stream.seq -= 1
        check_reply(sim.feedback(stream.agent, stream.feedback()))
    return code, details


@pytest.mark.parametrize(("change", "code", "fragment"), FEEDBACK_VIOLATIONS.values(),
                         ids=FEEDBACK_VIOLATIONS)
def test_invalid_feedback_is_refused_and_valid_feedback_then_completes_the_exchange(
        sim: Client, change: Callable[[pb.FeedbackRequest], object], code: Code,
        fragment: str) -> None:
    streams = sim.open_round(routes=encode(pruned_routes()))
    sim.play(streams)
    assert streams[PROCESSOR].senders == {2}
    futures = {s.agent: sim.submit_feedback(s) for s in others(streams)}
    got, details = refuse_then_accept(sim, streams[PROCESSOR], change)
    assert got == code and fragment in details, (got, details)
    check_reply(futures[SENSOR].result(), 1)  # only the actuator hears the sensor
    check_reply(futures[ACTUATOR].result(), 2)
    sim.complete_round()


def test_feedback_sent_twice_is_refused(sim: Client) -> None:
    streams = sim.open_round()
    sim.play(streams)
    offender = streams[PROCESSOR]
    first = sim.submit_feedback(offender)
    second = offender.feedback()
    deadline = time.monotonic() + TIMEOUT
    while True:  # "out of order" until the first has arrived; it consumes nothing
        code, details = outcome(lambda: sim.feedback(PROCESSOR, second))
        if code is not Code.INVALID_ARGUMENT or time.monotonic() > deadline:
            break
        assert "out of order" in details
        time.sleep(0.005)
    assert (code, details) == (Code.ALREADY_EXISTS, f"{PROCESSOR} already sent its feedback")
    futures = [sim.submit_feedback(s) for s in others(streams)]
    for future in [first, *futures]:
        check_reply(future.result())
    sim.complete_round()


def test_feedback_without_a_batch_waiting_for_it_is_refused(sim: Client) -> None:
    fragment = f"no episode batch is waiting for feedback from {PROCESSOR}"
    request = pb.FeedbackRequest(header=pb.Header(run_id=RUN, sender=PROCESSOR, seq=2))
    expect(Code.FAILED_PRECONDITION, fragment, lambda: sim.feedback(PROCESSOR, request))
    streams = sim.open_round()
    expect(Code.FAILED_PRECONDITION, fragment,
           lambda: sim.feedback(PROCESSOR, streams[PROCESSOR].feedback()))
    streams[PROCESSOR].seq -= 1  # refused before its sequence number was read
    sim.play(streams)
    futures = [sim.submit_feedback(s) for s in streams.values()]
    for future in futures:
        check_reply(future.result())
    expect(Code.FAILED_PRECONDITION, fragment,
           lambda: sim.feedback(PROCESSOR, streams[PROCESSOR].feedback()))
    sim.complete_round()


def test_missing_feedback_times_the_exchange_out(start: Callable[..., Client]) -> None:
    sim = start(feedback_timeout=1.0)
    streams = sim.open_round()
    sim.play(streams)
    begin = time.monotonic()
    futures = [sim.submit_feedback(s) for s in others(streams, ACTUATOR)]
    for future in futures:
        expect(Code.DEADLINE_EXCEEDED, f"round 0: feedback timed out, missing {ACTUATOR}",
               future.result)
    assert 0.9 < time.monotonic() - begin < 3.0
    expect(Code.FAILED_PRECONDITION, "no episode batch is waiting",
           lambda: sim.feedback(ACTUATOR, streams[ACTUATOR].feedback()))
    sim.complete_round()


def test_a_new_round_aborts_a_feedback_exchange_left_incomplete(sim: Client) -> None:
    """An agent that sent no feedback has left the exchange: its join ends it. One whose
    feedback is in still waits for the answer: its join is refused, the exchange goes on."""
    streams = sim.open_round()
    sim.play(streams)
    waiting = sim.submit_feedback(streams[SENSOR])
    expect(Code.DEADLINE_EXCEEDED, "Deadline Exceeded",
           lambda: sim.feedback(PROCESSOR, streams[PROCESSOR].feedback(), timeout=JOIN_PROBE))
    for agent in (SENSOR, PROCESSOR):
        expect(Code.FAILED_PRECONDITION, f"{agent} sent its feedback for round 0, which is not "
                                         "complete; cannot join round 1",
               lambda agent=agent: sim.join(agent, 1))
    assert not waiting.done()
    number, first = sim.first_join(ACTUATOR)  # ends round 0's exchange
    expect(Code.ABORTED, "round 1 began before round 0's feedback completed", waiting.result)
    sim.join_all(number, (SENSOR, PROCESSOR))
    first.result()
    sim.play(sim.open_streams(number))
    sim.complete_round()


# -- 7. TLS --------------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA nobody trusts, with a client pair it signed
    rogue_cert: Path
    rogue_key: Path


def subject(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def issue(name: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool = False,
          usage: x509.ObjectIdentifier | None = None,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(path: Path, cert: x509.Certificate,
              key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with a server pair (localhost, 127.0.0.1) and a client pair; and a rogue
    CA with a client pair of its own."""
    root = tmp_path_factory.mktemp("pki")
    paths: dict[str, Path] = {}
    for ca_name in ("ca", "rogue"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_subject = subject(f"{ca_name} CA")
        ca_cert = issue(ca_subject, ca_key, ca_subject, ca_key, ca=True)
        paths[ca_name] = write_pem(root / f"{ca_name}.pem", ca_cert)
        leaves = {"client": (ExtendedKeyUsageOID.CLIENT_AUTH, None)}
        if ca_name == "ca":
            leaves["server"] = (ExtendedKeyUsageOID.SERVER_AUTH, [
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        for leaf, (usage, sans) in leaves.items():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = issue(subject(leaf), key, ca_subject, ca_key, usage=usage, sans=sans)
            paths[f"{ca_name}-{leaf}"] = write_pem(root / f"{ca_name}-{leaf}.pem", cert, key)
    key_of = {name: path.with_suffix(".key") for name, path in paths.items()}
    return Pki(paths["ca"], paths["ca-server"], key_of["ca-server"], paths["ca-client"],
               key_of["ca-client"], paths["rogue"], paths["rogue-client"], key_of["rogue-client"])


def transport(target: str, tls: ClientTls | None) -> GrpcTransport:
    """A GrpcTransport; building one is a Describe over its channel."""
    return GrpcTransport(target, SPEC, SENSOR, TOKENS[SENSOR], TEAM_CFG, tls, timeout=TIMEOUT)


def refused_transport(target: str, tls: ClientTls | None) -> str:
    with pytest.raises(TransportError) as e:
        transport(target, tls)
    assert e.value.code is Code.UNAVAILABLE, e.value
    return e.value.details


def test_tls_serves_clients_that_trust_its_ca_only(start: Callable[..., Client],
                                                   pki: Pki) -> None:
    sim = start(tls=ServerTls(pki.server_cert, pki.server_key))
    for host in ("localhost", "127.0.0.1"):
        client = transport(f"{host}:{sim.port}", ClientTls(pki.ca))
        assert client.num_envs == B
        client.close()
    refused_transport(f"localhost:{sim.port}", ClientTls(pki.rogue_ca))
    refused_transport(f"localhost:{sim.port}", None)  # plaintext
    run_parties(f"localhost:{sim.port}", ClientTls(pki.ca))


def test_mutual_tls_admits_only_clients_with_a_certificate_its_ca_signed(
        start: Callable[..., Client], pki: Pki) -> None:
    sim = start(tls=ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca))
    target = f"localhost:{sim.port}"
    refused_transport(target, ClientTls(pki.ca))
    refused_transport(target, ClientTls(pki.ca, pki.rogue_cert, pki.rogue_key))
    client = transport(target, ClientTls(pki.ca, pki.client_cert, pki.client_key))
    assert client.num_envs == B
    client.close()


# -- 8. properties -------------------------------------------------------------------------
def end_of_batch(streams: dict[str, Stream]) -> str:
    """After the processor's doubtful frame at step 0: either it is refused, and the others'
    batch ends naming it, or it was valid after all, and the batch ends as everyone leaves.
    Returns the refusal's code name, or "accepted"."""
    offender = streams[PROCESSOR]
    try:
        next(offender.responses)
    except grpc.RpcError as e:
        assert e.code() in REFUSALS, (e.code(), e.details())
        offender.close()
        for stream in others(streams):
            stream.truncated(f"{PROCESSOR} sent an invalid message at step 0")
        return e.code().name
    for stream in streams.values():
        stream.close()
    for stream in streams.values():
        stream.truncated("left at step")
    return "accepted"


@dataclass(frozen=True)
class Garble:
    """Bytes in place of a valid message: random ones, or the valid ones with the stretch
    between two cut points replaced by ``data`` (most of a message, so parts parse)."""

    data: bytes
    cut: tuple[int, int] | None = None

    def apply(self, valid: bytes) -> bytes:
        if self.cut is None:
            return self.data
        i, j = sorted(c % (len(valid) + 1) for c in self.cut)
        return valid[:i] + self.data + valid[j:]


GARBLES = (st.builds(Garble, st.binary(max_size=200))
           | st.builds(Garble, st.binary(max_size=8), st.tuples(st.integers(0, 255),
                                                                st.integers(0, 255))))
REQUEST_TYPES = {"Describe": pb.DescribeRequest, "Join": pb.JoinRequest,
                 "Feedback": pb.FeedbackRequest}


def valid_request(method: str, agent: str, round_number: int) -> Message:
    if method == "Join":
        return join_request(agent, round_number)
    if method == "Feedback":
        return pb.FeedbackRequest(
            header=pb.Header(run_id=RUN, round=round_number, step=T, sender=agent, seq=2 * T + 2),
            senders=[0, 2], grads=encode(torch.zeros(2, T, B, D)), dp=FEEDBACK_DP)
    return pb.DescribeRequest()


def test_random_bytes_to_unary_methods_never_break_the_simulator(sim: Client) -> None:
    @PROPERTY
    @given(method=st.sampled_from(list(REQUEST_TYPES)), agent=st.sampled_from(AGENTS),
           caller=st.sampled_from([*AGENTS, "ghost"]), garble=GARBLES)
    def example(method: str, agent: str, caller: str, garble: Garble) -> None:
        valid = valid_request(method, agent, sim.describe().round).SerializeToString()
        payload = garble.apply(valid)
        call = sim.channel.unary_unary(SERVICE + method)  # no (de)serializers: bytes both ways
        code, details = outcome(lambda: call(payload, metadata=metadata(caller),
                                             timeout=JOIN_PROBE))
        event(f"{method}: {code.name}")
        if caller == "ghost":  # refused before the request is read
            assert code == Code.UNAUTHENTICATED, (code, details)
            return
        try:
            REQUEST_TYPES[method].FromString(payload)
        except DecodeError:
            assert code == Code.INVALID_ARGUMENT, (code, details)
        else:  # a join that happens to be valid waits out the deadline at the barrier
            assert code in ({Code.OK} if method == "Describe" else REFUSALS), (code, details)
        assert sim.describe().run_id == RUN

    example()
    run_parties(f"127.0.0.1:{sim.port}")


def test_random_bytes_on_the_step_stream_end_only_that_batch(sim: Client) -> None:
    @PROPERTY
    @given(garbles=st.lists(GARBLES, min_size=1, max_size=3))
    def example(garbles: list[Garble]) -> None:
        streams = sim.open_round(raw=(PROCESSOR,))
        for stream in others(streams):
            stream.send(stream.frame("vector", 0))
        for garble in garbles:
            streams[PROCESSOR].send(
                garble.apply(streams[PROCESSOR].frame("vector", 0).SerializeToString()))
        event(end_of_batch(streams))

    example()
    run_parties(f"127.0.0.1:{sim.port}")


HEADER_CHANGES = st.fixed_dictionaries({}, optional={
    "run_id": st.sampled_from([RUN, "", "other-run"]),
    "round": UINT32, "step": UINT32,
    "sender": st.sampled_from([*AGENTS, "", "sim", "ghost"]),
    "seq": st.integers(0, 4) | UINT64,
})


def dp_params(agreed: pb.DpParams) -> st.SearchStrategy[pb.DpParams]:
    """The agreed parameters, or any others: zero, negative, NaN and infinite included."""
    return st.just(agreed) | st.builds(pb.DpParams, clip_norm=st.floats(),
                                       noise_multiplier=st.floats())


# Only the dtypes the protocol names: decode() refuses others with INVALID_ARGUMENT (see
# test_a_tensor_of_an_unknown_dtype_is_refused).
DTYPES = [pb.FLOAT32, pb.INT64, pb.BOOL, pb.DTYPE_UNSPECIFIED]
VALUES = {pb.FLOAT32: st.floats(-1, 1, width=32) | st.floats(width=32),
          pb.INT64: st.integers(-1, 4) | INT64, pb.BOOL: st.booleans()}


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: int) -> pb.Tensor:
    """Sometimes the expected dtype and shape; values small, extreme, or random bytes."""
    wire = draw(st.sampled_from([dtype, *DTYPES]))
    dims = draw(st.just(list(shape)) | st.lists(st.integers(-1, 6) | INT64, max_size=4))
    count = math.prod(dims) if all(0 <= d <= 64 for d in dims) else None
    if wire in VALUES and count is not None and count <= 512 and draw(st.booleans()):
        values = draw(st.lists(VALUES[wire], min_size=count, max_size=count))
        data = np.array(values, dtype=NUMPY[wire]).tobytes()
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=wire, shape=dims, data=data)


JOIN_FIELDS = st.fixed_dictionaries({}, optional={
    "agent_type": st.sampled_from([t.name for t in SPEC.types]) | st.text(max_size=8),
    "obs_dim": st.integers(0, 12) | UINT32, "n_actions": st.integers(0, 5) | UINT32,
    "comm_dim": st.just(D) | UINT32,
    "vector_dp": dp_params(VECTOR_DP), "feedback_dp": dp_params(FEEDBACK_DP),
    "routes": tensors((3, 3), pb.BOOL),
})


def test_well_formed_but_wrong_joins_are_refused_and_the_simulator_serves_on(
        sim: Client) -> None:
    @PROPERTY
    @given(agent=st.sampled_from(AGENTS), caller=st.sampled_from([*AGENTS, "ghost"]),
           token_ok=st.booleans(), head=HEADER_CHANGES, fields=JOIN_FIELDS)
    def example(agent: str, caller: str, token_ok: bool, head: dict, fields: dict) -> None:
        request = join_request(agent, sim.describe().round, **fields)
        replace(request.header, **head)
        md = metadata(caller) if token_ok else call_metadata(caller, "forged")
        code, details = outcome(lambda: sim.stub.Join(request, metadata=md, timeout=JOIN_PROBE))
        event(code.name)
        assert code in REFUSALS, (code, details)  # a valid join waits out the probe's deadline

    example()
    run_parties(f"127.0.0.1:{sim.port}")


KINDS = ["vector", "action"]


def test_well_formed_but_wrong_frames_end_only_that_batch(sim: Client) -> None:
    @PROPERTY
    @given(phase=st.sampled_from(KINDS), kind=st.sampled_from([*KINDS, None]),
           head=HEADER_CHANGES, data=st.data())
    def example(phase: str, kind: str | None, head: dict, data: st.DataObject) -> None:
        shape, dtype = ((B, D), pb.FLOAT32) if kind == "vector" else ((B,), pb.INT64)
        values = data.draw(st.none() | tensors(shape, dtype))  # every draw before any call:
        dp = data.draw(st.none() | dp_params(VECTOR_DP))  # a draw may end the example
        streams = sim.open_round()
        if phase == "action":
            sim.exchange(streams, 0)
        offender = streams[PROCESSOR]
        frame = pb.AgentFrame() if kind is None else offender.frame(kind, 0)
        if kind is not None:
            msg = getattr(frame, kind)
            replace(msg.header, **head)
            if values is not None:
                getattr(msg, kind).CopyFrom(values)
            if dp is not None and kind == "vector":
                msg.dp.CopyFrom(dp)
        for stream in others(streams):
            stream.send(stream.frame(phase, 0))
        offender.send(frame)
        event(end_of_batch(streams))

    example()
    run_parties(f"127.0.0.1:{sim.port}")


def test_well_formed_but_wrong_feedback_is_refused_and_the_exchange_completes(
        sim: Client) -> None:
    @settings(PROPERTY, max_examples=30)
    @given(head=HEADER_CHANGES, data=st.data())
    def example(head: dict, data: st.DataObject) -> None:
        senders = data.draw(st.none() | st.lists(st.sampled_from(range(3)) | UINT32,
                                                 max_size=4))
        count = 2 if senders is None else len(senders)  # the processor hears 2 others
        values = data.draw(st.none() | tensors((count, T, B, D), pb.FLOAT32))
        dp = data.draw(st.none() | dp_params(FEEDBACK_DP))  # no draws after the first call
        streams = sim.open_round()
        sim.play(streams)
        futures = [sim.submit_feedback(s) for s in others(streams)]

        def change(request: pb.FeedbackRequest) -> None:
            replace(request.header, **head)
            if senders is not None:
                replace(request, senders=senders)
            if values is not None:
                request.grads.CopyFrom(values)
            if dp is not None:
                request.dp.CopyFrom(dp)

        code, details = refuse_then_accept(sim, streams[PROCESSOR], change)
        event(code.name)
        assert code in REFUSALS | {Code.OK}, (code, details)
        for future in futures:  # the processor's feedback, whichever it was, is summed in
            assert future.result().receivers == 2

    example()
    run_parties(f"127.0.0.1:{sim.port}")


@pytest.mark.parametrize("method", ["Join", "Step", "Feedback"])
def test_a_tensor_of_an_unknown_dtype_is_refused(sim: Client, method: str) -> None:
    unknown = pb.Tensor(dtype=7, shape=[3, 3], data=b"\1" * 9)
    if method == "Join":
        expect(INVALID, "routes: dtype", lambda: sim.join(SENSOR, 0, routes=unknown))
    else:
        streams = sim.open_round()
        if method == "Step":
            offender = streams[PROCESSOR]
            for stream in streams.values():
                frame = stream.frame("vector", 0)
                if stream is offender:
                    frame.vector.vector.CopyFrom(unknown)
                stream.send(frame)
            offender.fails(INVALID, "vector: dtype")
            for stream in others(streams):
                stream.truncated(f"{PROCESSOR} sent an invalid message")
        else:
            sim.play(streams)
            futures = [sim.submit_feedback(s) for s in others(streams)]
            code, details = refuse_then_accept(
                sim, streams[PROCESSOR], lambda r: r.grads.CopyFrom(unknown))
            assert (code, "feedback: dtype" in details) == (INVALID, True), (code, details)
            for future in futures:
                check_reply(future.result())
    sim.complete_round()


# -- pruned routes ---------------------------------------------------------------------------
def silent_processor() -> pb.Tensor:
    """Every route but those from processors: a processor has no one to talk to."""
    routes = ALL_ROUTES.clone()
    routes[1] = False
    return encode(routes)


def test_an_agent_whose_every_route_is_pruned_releases_nothing(sim: Client) -> None:
    # It sends a vector anyway: refused, since it would be a release nobody receives.
    streams = sim.open_round(routes=silent_processor())
    for stream in streams.values():
        stream.send(stream.frame("vector", 0))
    streams[PROCESSOR].fails(INVALID, "every route from this agent's type is pruned")
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} sent an invalid message")

    # An agent with routes leaves its vector out: refused too.
    streams = sim.open_round(routes=silent_processor())
    for stream in streams.values():
        frame = stream.frame("vector", 0)
        if stream.agent in (PROCESSOR, SENSOR):
            frame.vector.ClearField("vector")
        stream.send(frame)
    streams[SENSOR].fails(INVALID, "the knowledge vector is missing")

    # Done right: the processor sends header and DP parameters only, and reaches no one.
    streams = sim.open_round(routes=silent_processor())
    for t in range(T):
        for stream in streams.values():
            frame = stream.frame("vector", t)
            if stream.agent == PROCESSOR:
                frame.vector.ClearField("vector")
            stream.send(frame)
        for stream in streams.values():
            assert 1 not in stream.receive("routed").routed.senders
        Client.act(streams, t)
    for stream in streams.values():
        stream.close()
    sim.complete_round()
