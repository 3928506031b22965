"""Call metadata that does not present one agent of the run with its token, on every method:
refused with UNAUTHENTICATED and one line before anything the call sends is read, never
UNKNOWN, never a logged traceback, and never a list of the run's agents. The simulator then
serves a normal round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedcomm.protocol.auth import AGENT_KEY, TOKEN_KEY, call_metadata, claimed_identity
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from tests.harness.sim import (
    AGENTS,
    JOIN_PROBE,
    PROCESSOR,
    SENSOR,
    TOKENS,
    Client,
    Code,
    expect,
    join_request,
)

pytestmark = pytest.mark.integration  # every test starts a simulator

Metadata = tuple[tuple[str, str | bytes], ...]
METHODS = ("Describe", "Join", "Feedback", "Step")


def call(sim: Client, method: str, md: Metadata) -> tuple[Code, str]:
    """``method`` with metadata ``md`` and a request that, from an agent, would be refused at
    once (its header names nobody, or no round is running): only the metadata is on trial."""
    nobody = join_request(SENSOR, 0)
    nobody.header.sender = "nobody"
    calls: dict[str, Callable[[], object]] = {
        "Describe": lambda: sim.stub.Describe(pb.DescribeRequest(), metadata=md,
                                              timeout=JOIN_PROBE),
        "Join": lambda: sim.stub.Join(nobody, metadata=md, timeout=JOIN_PROBE),
        "Feedback": lambda: sim.stub.Feedback(pb.FeedbackRequest(), metadata=md,
                                              timeout=JOIN_PROBE),
        "Step": lambda: list(sim.stub.Step(iter(()), metadata=md, timeout=JOIN_PROBE)),
    }
    try:
        calls[method]()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


VARIANTS: dict[str, tuple[Metadata, str]] = {
    "nothing": ((), f"no {AGENT_KEY} metadata"),
    "no token": (((AGENT_KEY, SENSOR),), f"no {TOKEN_KEY} metadata"),
    "no agent": (((TOKEN_KEY, f"Bearer {TOKENS[SENSOR]}"),), f"no {AGENT_KEY} metadata"),
    "unknown agent": (call_metadata("ghost", "x"), "no agent 'ghost' in this run"),
    "a long unknown agent": (call_metadata("g" * 500, "x"), f"no agent '{'g' * 64}'..."),
    "another's token": (call_metadata(SENSOR, TOKENS[PROCESSOR]), f"wrong token for {SENSOR}"),
    "no scheme": (((AGENT_KEY, SENSOR), (TOKEN_KEY, TOKENS[SENSOR])),
                  f"{TOKEN_KEY} metadata: expected 'Bearer <token>'"),
    "another scheme": (((AGENT_KEY, SENSOR), (TOKEN_KEY, f"Basic {TOKENS[SENSOR]}")),
                       "expected 'Bearer <token>'"),
    "two agents": ((*call_metadata(SENSOR, TOKENS[SENSOR]), (AGENT_KEY, PROCESSOR)),
                   f"2 {AGENT_KEY} metadata values; a call carries one"),
    "two tokens": ((*call_metadata(SENSOR, TOKENS[SENSOR]), (TOKEN_KEY, "Bearer x")),
                   f"2 {TOKEN_KEY} metadata values"),
    "binary agent": (((f"{AGENT_KEY}-bin", b"\xff\xfe"),
                      (TOKEN_KEY, f"Bearer {TOKENS[SENSOR]}")),
                     f"{AGENT_KEY}-bin metadata: the {AGENT_KEY} is text"),
    "binary token": (((AGENT_KEY, SENSOR), (f"{TOKEN_KEY}-bin", b"\x80Bearer")),
                     f"{TOKEN_KEY}-bin metadata: the {TOKEN_KEY} is text"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("md", "fragment"), VARIANTS.values(), ids=VARIANTS)
def test_metadata_that_names_no_agent_with_its_token_is_unauthenticated(
        sim: Client, method: str, md: Metadata, fragment: str, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        code, details = call(sim, method, md)
    assert (code, fragment in details) == (Code.UNAUTHENTICATED, True), (code, details)
    assert "\n" not in details and named_agents(details) <= 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_other_binary_metadata_is_not_read(sim: Client) -> None:
    """gRPC's own binary keys (``grpc-trace-bin``) may hold any bytes: not the agent's."""
    md = (*call_metadata(SENSOR, TOKENS[SENSOR]), ("trace-bin", b"\xff\x00\xfe"))
    assert call(sim, "Describe", md) == (Code.OK, "")
    sim.complete_round()


# -- fuzzing -------------------------------------------------------------------------------
KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
KEYS = st.text(KEY_CHARS, min_size=1, max_size=20).filter(
    lambda k: not k.startswith("grpc-") and not k.endswith("-bin"))
UNRELATED = (st.tuples(KEYS.map(lambda k: f"{k}-bin"), st.binary(max_size=16))
             | st.tuples(KEYS, TEXT))
ENTRIES = st.one_of(
    st.tuples(st.just(AGENT_KEY), st.sampled_from([*AGENTS, "ghost", ""]) | TEXT),
    st.tuples(st.just(TOKEN_KEY),
              st.sampled_from([f"Bearer {t}" for t in TOKENS.values()])
              | st.builds("{}{}".format, st.sampled_from(["Bearer ", "bearer ", "", "Bearer"]),
                          st.sampled_from(list(TOKENS.values())) | TEXT)),
    st.tuples(st.sampled_from([f"{AGENT_KEY}-bin", f"{TOKEN_KEY}-bin"]), st.binary(max_size=16)),
    UNRELATED,
)
# Mostly garbled; now and then an agent's own credentials among keys that are none of them.
METADATA = st.lists(ENTRIES, max_size=5).map(tuple) | st.builds(
    lambda agent, others: (*others, *call_metadata(agent, TOKENS[agent])),
    st.sampled_from(AGENTS), st.lists(UNRELATED, max_size=3))


def named_agents(details: str) -> int:
    """How many of the run's agents a refusal names: the one the call claims at most."""
    return sum(agent in details for agent in AGENTS)


def presents_an_agent(md: Metadata) -> bool:
    """Whether ``md`` names one agent of the run with its token (what the simulator admits)."""
    try:
        agent, token = claimed_identity(md)
    except ValueError:
        return False
    return TOKENS.get(agent) == token


def test_garbled_metadata_on_every_method_is_unauthenticated(sim: Client, caplog) -> None:
    @settings(max_examples=300, deadline=None)
    @given(method=st.sampled_from(METHODS), md=METADATA)
    def example(method: str, md: Metadata) -> None:
        code, details = call(sim, method, md)
        assert "\n" not in details, details
        if presents_an_agent(md):  # the call goes on, and is refused for its request
            event(f"agent: {code.name}")
            assert code not in {Code.UNAUTHENTICATED, Code.UNKNOWN}, (md, code, details)
            return
        event("unauthenticated")
        assert code == Code.UNAUTHENTICATED, (md, code, details)
        assert named_agents(details) <= 1, details

    with caplog.at_level(logging.DEBUG):
        example()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    expect(Code.UNAUTHENTICATED, "no x-fedcomm-agent metadata",
           lambda: sim.stub.Describe(pb.DescribeRequest(), timeout=JOIN_PROBE))
    sim.complete_round()
