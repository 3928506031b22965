"""The simulator service under bad input, as agents join a round: a caller that is no agent,
a join that declares what its agent is not, disagrees with the round's first joiner or names
another round, and a join barrier that times out. Each violation is answered with a precise
status on the offender's call, and the simulator neither crashes nor hangs and goes on serving
the next round.

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

from fedcomm.protocol.auth import call_metadata
from fedcomm.protocol.codec import encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from tests.harness.sim import (
    ACTUATOR,
    JOIN_PROBE,
    PROCESSOR,
    RUN,
    SENSOR,
    TIMEOUT,
    B,
    Client,
    Code,
    D,
    T,
    expect,
    join_request,
    metadata,
    replace,
    run_parties,
)

pytestmark = pytest.mark.integration  # every test starts a simulator


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
