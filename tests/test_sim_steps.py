"""The simulator service under bad input on the step stream: a frame that breaks the protocol,
an agent that leaves, falls silent or never opens its stream, an oversize frame, and routes
pruned so that an agent reaches no one. Each violation is answered with a precise status on
the offender's call, the other agents learn why their batch ended, and the simulator neither
crashes nor hangs and goes on serving the next round.

The simulator runs in process (``SimServer``) with a one-sensor, one-processor, one-actuator
factory and short timeouts. Agents speak through raw stubs, or through ``GrpcTransport`` and
``Party`` for whole training rounds. Every client call carries a deadline, so a hang fails its
test instead of stalling the run. The harness is tests/harness/sim.py; the fixtures ``start``
and ``sim`` are in tests/conftest.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch
from google.protobuf.message import Message

from fedcomm.protocol.codec import encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from tests.harness.sim import (
    ACTUATOR,
    ALL_ROUTES,
    INVALID,
    PROCESSOR,
    SENSOR,
    B,
    Client,
    Code,
    D,
    Stream,
    T,
    expect,
    others,
    replace,
)

pytestmark = pytest.mark.integration  # every test starts a simulator


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
