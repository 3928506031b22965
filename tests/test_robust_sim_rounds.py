"""Replayed and stale round numbers at the simulator, refused as NaN vectors and norms above
the clip are: a join, a step frame and feedback that name a round other than the one in
progress. Over the wire against the in-process simulator of tests/harness/sim.py (the
fixture ``sim``), and the round's own refusal directly."""

from __future__ import annotations

import pytest

from fedcomm.protocol.codec import ProtocolError
from fedcomm.sim.rounds import Phase, Round, round_to_join
from tests.harness.sim import (
    AGENTS,
    INVALID,
    PROCESSOR,
    SENSOR,
    Client,
    Code,
    check_reply,
    expect,
    others,
)


def played_round(sim: Client) -> tuple[int, dict]:
    """A round played to its end; its streams (feedback not yet sent)."""
    number = sim.describe().round
    streams = sim.open_round()
    sim.play(streams)
    return number, streams


@pytest.mark.integration  # a simulator
def test_a_join_replaying_a_round_that_ran_is_refused(sim: Client) -> None:
    number, streams = played_round(sim)
    for future in [sim.submit_feedback(s) for s in streams.values()]:
        check_reply(future.result())
    expect(Code.FAILED_PRECONDITION, f"round {number} already ran; the next round is "
                                     f"{number + 1}", lambda: sim.join(SENSOR, number))
    sim.complete_round()


@pytest.mark.integration  # a simulator
def test_a_step_frame_of_the_round_before_is_refused_and_ends_the_batch(sim: Client) -> None:
    stale = sim.describe().round
    sim.complete_round()
    streams = sim.open_round()
    offender = streams[PROCESSOR]
    offender.round = stale  # the frame it sends names the round before
    for stream in streams.values():
        stream.send(stream.frame("vector", 0))
    offender.fails(INVALID, f"message for round {stale} during round {stale + 1}")
    for stream in others(streams):
        stream.truncated(f"{PROCESSOR} sent an invalid message at step 0: message for round "
                         f"{stale}")
    sim.complete_round()


@pytest.mark.integration  # a simulator
def test_feedback_for_the_round_before_is_refused_and_the_exchange_completes(
        sim: Client) -> None:
    first, old = played_round(sim)
    requests = {agent: stream.feedback() for agent, stream in old.items()}
    for future in [sim.pool.submit(sim.feedback, a, r) for a, r in requests.items()]:
        check_reply(future.result())
    replay = requests[PROCESSOR]  # sent again one round later
    _, streams = played_round(sim)
    futures = [sim.submit_feedback(s) for s in others(streams)]
    expect(INVALID, f"message for round {first} during round {first + 1}",
           lambda: sim.feedback(PROCESSOR, replay))
    check_reply(sim.feedback(PROCESSOR, streams[PROCESSOR].feedback()))
    for future in futures:
        check_reply(future.result())


def test_an_agent_waiting_for_feedback_cannot_end_the_round_by_joining_the_next() -> None:
    waiting = Round(3, AGENTS, phase=Phase.FEEDBACK)
    waiting.feedback[1] = ([0], None)  # the processor's feedback is in
    with pytest.raises(ProtocolError) as refused:
        round_to_join(waiting, 3, 4, AGENTS, joiner=1)
    assert refused.value.message == (f"{PROCESSOR} sent its feedback for round 3, which is not "
                                     "complete; cannot join round 4")
    assert waiting.phase is Phase.FEEDBACK and waiting.failure is None
    # one that sent none has left the round: it ends, and the new round begins
    assert round_to_join(waiting, 3, 4, AGENTS, joiner=2).number == 4
    assert waiting.failure == "round 4 began before round 3's feedback completed"


def test_replayed_and_stale_joins_are_refused_in_every_phase() -> None:
    for phase, fragment in ((Phase.JOINING, "round 5 is gathering agents; cannot join round 4"),
                            (Phase.RUNNING, "round 5 is running; join after it ends"),
                            (Phase.FEEDBACK, "round 4 already ran; the next round is 6"),
                            (Phase.CLOSED, "round 4 already ran; the next round is 6")):
        current = Round(5, AGENTS, phase=phase)
        with pytest.raises(ProtocolError, match=fragment):
            round_to_join(current, 5 if phase is not Phase.JOINING else 4, 4, AGENTS,
                          joiner=0)
