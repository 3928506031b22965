"""The simulator service under generated input (hypothesis): random bytes in place of a request
or a frame, and well-formed messages with wrong fields, on every method. Each is refused with a
status a refusal may have (never UNKNOWN or INTERNAL), only the offender's batch ends, and the
simulator then serves a whole training round.

The simulator runs in process (``SimServer``) with a one-sensor, one-processor, one-actuator
factory and short timeouts. Agents speak through raw stubs, or through ``GrpcTransport`` and
``Party`` for whole training rounds. Every client call carries a deadline, so a hang fails its
test instead of stalling the run. The harness is tests/harness/sim.py; the fixtures ``start``
and ``sim`` are in tests/conftest.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError, Message
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedcomm.protocol.auth import call_metadata
from fedcomm.protocol.codec import NUMPY, encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from tests.harness.sim import (
    AGENTS,
    FEEDBACK_DP,
    INVALID,
    JOIN_PROBE,
    PROCESSOR,
    RUN,
    SENSOR,
    SERVICE,
    SPEC,
    VECTOR_DP,
    B,
    Client,
    Code,
    D,
    Stream,
    T,
    check_reply,
    expect,
    join_request,
    metadata,
    others,
    outcome,
    refuse_then_accept,
    replace,
    run_parties,
)

pytestmark = pytest.mark.integration  # every test starts a simulator


# What a well-formed but wrong message may be answered with; never UNKNOWN or INTERNAL.
REFUSALS = frozenset({
    Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED,
    Code.ALREADY_EXISTS, Code.UNAUTHENTICATED, Code.DEADLINE_EXCEEDED,
    Code.RESOURCE_EXHAUSTED, Code.ABORTED})
PROPERTY = settings(max_examples=40, deadline=None)

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


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
    # the first frame was valid; a later one of several may still be refused, as the
    # streams close: then the batch ends naming the offender instead of as everyone leaves
    for stream in streams.values():
        stream.close()
    try:
        offender.truncated("left at step")
    except grpc.RpcError as e:
        assert e.code() in REFUSALS, (e.code(), e.details())
        offender.close()
    for stream in others(streams):
        reason = stream.truncated()
        assert "left at step" in reason or f"{PROCESSOR} sent an invalid message" in reason, reason
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
