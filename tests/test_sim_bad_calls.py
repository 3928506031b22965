"""Bytes that are not protocol messages, sent to the simulator's port by anyone who reaches it:
each call is refused with INVALID_ARGUMENT and one line, and the log stays bounded."""

from __future__ import annotations

import logging
import random

import grpc

from fedcomm.protocol.auth import generate_tokens
from fedcomm.sim.serve import RateLimitedLog, SimServer
from fedcomm.sim.service import SimConfig

UNARY = ("Describe", "Join", "Feedback")


def test_random_bytes_get_invalid_argument_and_a_bounded_log(caplog):
    rng = random.Random(0)
    cfg = SimConfig(env="speaker_listener", num_envs=4,
                    tokens=generate_tokens(["speaker_0", "listener_0"]))
    codes: dict[grpc.StatusCode, int] = {}
    calls = 600
    with caplog.at_level(logging.INFO), SimServer(cfg) as sim, \
            grpc.insecure_channel(sim.address) as channel:
        for i in range(calls):
            method = channel.unary_unary(f"/fedcomm.v1.JointEnvironment/{UNARY[i % 3]}")
            payload = rng.randbytes(rng.randint(1, 64))
            try:
                method(payload, timeout=5)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert "\n" not in (e.details() or "")
            codes[code] = codes.get(code, 0) + 1
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > calls // 4, codes
    assert grpc.StatusCode.UNKNOWN not in codes and grpc.StatusCode.INTERNAL not in codes, codes
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
