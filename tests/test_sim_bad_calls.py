"""Bytes that are not protocol messages, sent to the simulator's port by an agent: each call is
refused with INVALID_ARGUMENT and one line, and the log stays bounded. (A caller that is no agent
is refused before its bytes are read: tests/test_sim_metadata.py.)

Random bytes now and then parse as the request after all (protobuf skips fields it does not
know): those are protocol messages, and are answered as such."""

from __future__ import annotations

import logging
import random

import grpc
import pytest
from google.protobuf.message import DecodeError

from fedcomm.protocol.auth import call_metadata, generate_tokens
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.serve import RateLimitedLog, SimServer
from fedcomm.sim.service import SimConfig

REQUESTS = {"Describe": pb.DescribeRequest, "Join": pb.JoinRequest,
            "Feedback": pb.FeedbackRequest}
HEADERLESS = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}
PARSED = {"Describe": {grpc.StatusCode.OK}, "Join": HEADERLESS, "Feedback": HEADERLESS}


def parses(request_type: type, payload: bytes) -> bool:
    try:
        request_type.FromString(payload)
    except DecodeError:
        return False
    return True


@pytest.mark.integration  # a simulator
def test_random_bytes_get_invalid_argument_and_a_bounded_log(caplog):
    rng = random.Random(0)
    tokens = generate_tokens(["speaker_0", "listener_0"])
    cfg = SimConfig(env="speaker_listener", num_envs=4, tokens=tokens)
    speaker = call_metadata("speaker_0", tokens["speaker_0"])
    calls, refused = 600, 0
    with caplog.at_level(logging.INFO), SimServer(cfg) as sim, \
            grpc.insecure_channel(sim.address) as channel:
        for i in range(calls):
            name = list(REQUESTS)[i % 3]
            method = channel.unary_unary(f"/fedcomm.v1.JointEnvironment/{name}")
            payload = rng.randbytes(rng.randint(1, 64))
            try:
                method(payload, metadata=speaker, timeout=5)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            assert "\n" not in details, details
            if parses(REQUESTS[name], payload):  # a message with no header worth the name
                assert code in PARSED[name], (name, payload, code, details)
                continue
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, payload, code, details)
            assert details.startswith(f"the request is not a valid {REQUESTS[name].__name__}: ")
            refused += 1
    assert refused >= calls * 9 // 10  # the bytes that parse are few: the refusals are tested
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    undecodable = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert 1 <= len(undecodable) <= 5  # one burst per minute, not one line per call


def test_rate_limited_log_says_how_many_it_dropped(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test"), period=10, burst=2,
                             clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test"):
        for i in range(5):
            limited.warning(f"bad call {i}")
        now[0] = 11.0
        limited.warning("bad call 5")
    assert [r.getMessage() for r in caplog.records] == [
        "bad call 0", "bad call 1", "bad call 5 (3 similar warnings dropped)"]
