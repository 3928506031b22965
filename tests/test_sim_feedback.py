"""The simulator service under bad feedback: feedback that breaks the protocol, is sent twice,
comes without a batch waiting for it, never comes, or is left incomplete as a new round begins.
Each violation is answered with a precise status on the offender's call, the others' exchange
completes or learns why it did not, and the simulator goes on serving the next round.

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

from fedcomm.protocol.codec import encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from tests.harness.sim import (
    ACTUATOR,
    ALL_ROUTES,
    INVALID,
    JOIN_PROBE,
    PROCESSOR,
    RUN,
    SENSOR,
    TIMEOUT,
    VECTOR_DP,
    B,
    Client,
    Code,
    D,
    T,
    check_reply,
    expect,
    others,
    outcome,
    refuse_then_accept,
    replace,
)

pytestmark = pytest.mark.integration  # every test starts a simulator


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
