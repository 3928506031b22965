"""The simulator service in this process and agents that speak to it, for the tests of its
protocol (tests/test_sim_*.py, tests/test_robust_sim_rounds.py).

``Simulators`` starts ``SimServer``s (a one-sensor, one-processor, one-actuator factory with
short timeouts, ``config``), each with a ``Client`` on a channel of its own; ``close`` closes
every client (ending its streams and cancelling what is still in flight) and then stops every
simulator. Agents speak through raw stubs (``Client``, ``Stream``), or through
``GrpcTransport`` and ``Party`` for whole training rounds (``run_parties``, which closes its
transports). Every client call carries a deadline, so a hang fails its test instead of
stalling the run.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import grpc
import numpy as np
import torch
from google.protobuf.message import Message

from fedcomm.clients.grpc_transport import ClientTls, GrpcTransport
from fedcomm.config import TeamConfig
from fedcomm.learning.party import Party
from fedcomm.models.team import Team
from fedcomm.protocol.auth import call_metadata
from fedcomm.protocol.codec import encode
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
INVALID = Code.INVALID_ARGUMENT


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



class Simulators:
    """Simulators in this process (``config`` with changes), each with a ``Client``; ``close``
    closes the clients and stops the simulators."""

    def __init__(self) -> None:
        self.stack = ExitStack()

    def start(self, tls: ServerTls | None = None, **changes: object) -> Client:
        server = self.stack.enter_context(SimServer(config(**changes), tls=tls))
        client = Client(server.port, server.service)
        self.stack.callback(client.close)
        return client

    def close(self) -> None:
        self.stack.close()


# -- feedback ------------------------------------------------------------------------------
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

