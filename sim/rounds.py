"""A round of the simulator service: one episode batch, from the joins to the feedback.

A round gathers agents (``JOINING``) until every agent has joined and agreed on its terms, runs
its episode batch (``RUNNING``), collects each receiver's DIAL feedback (``FEEDBACK``) and ends
(``CLOSED``). It can fail on the way (a join barrier or the feedback times out, an agent breaks
the protocol or leaves, a later round begins): it then closes with the reason and the status
that every call still waiting on it is answered with. Each phase change is one method of
``Round``; the service does the I/O around them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum

import grpc
import torch
from torch import Tensor

from fedcomm.protocol.codec import ProtocolError
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.limits import INBOX_FRAMES
from fedcomm.sim.validation import FAILED, Terms, check_round_number, next_seq, same_terms


class Phase(Enum):
    JOINING = "joining"
    RUNNING = "running"
    FEEDBACK = "feedback"
    CLOSED = "closed"


def _inbox() -> asyncio.Queue:
    """Room for ``INBOX_FRAMES`` frames and the two ends a stream reports: its reader's (closed,
    failed, refused) and its handler's, so that an end never waits and is never lost."""
    return asyncio.Queue(INBOX_FRAMES + 2)


@dataclass
class Slot:
    """One agent's place in a round, and the queues between its Step stream and the driver."""

    index: int
    agent_id: str
    seq: int = 1  # the last sequence number received (the join carries 1)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: asyncio.Queue = field(default_factory=_inbox)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)

    def next_seq(self, header: pb.Header) -> None:
        self.seq = next_seq(header, self.seq)

    def take(self, frame: object) -> bool:
        """Queue a frame of the agent's stream for the driver; False, queueing nothing, once
        ``INBOX_FRAMES`` wait: more than an honest agent ever has in flight."""
        if self.inbox.qsize() >= INBOX_FRAMES:
            return False
        self.inbox.put_nowait(frame)
        return True

    def end(self, why: object) -> None:
        """Tell the driver how the agent's stream ended (see ``_inbox`` for why there is room)."""
        self.inbox.put_nowait(why)

    def overflow(self, error: ProtocolError) -> None:
        """The agent sent more than ``INBOX_FRAMES`` ahead: its frames are dropped, the driver
        gets ``error`` next, and so does the agent's stream, at once."""
        while not self.inbox.empty():
            self.inbox.get_nowait()
        self.end(error)
        self.outbox.put_nowait(error)


@dataclass
class Round:
    """The agents of one episode batch, the terms they agreed on, and what they exchanged."""

    number: int
    agent_ids: tuple[str, ...]  # every agent of the environment, in index order
    phase: Phase = Phase.JOINING
    slots: dict[int, Slot] = field(default_factory=dict)
    terms: Terms | None = None  # declared by the first joiner still there
    silent: set[int] = field(default_factory=set)  # agents that release nothing this round
    joined: asyncio.Event = field(default_factory=asyncio.Event)  # set once it starts or fails
    failure: str | None = None
    failure_code: grpc.StatusCode = grpc.StatusCode.ABORTED
    delivered: Tensor = field(init=False)  # [receiver, sender] bool: any vector delivered
    feedback: dict[int, tuple[list[int], Tensor]] = field(default_factory=dict)
    feedback_sums: Tensor | None = None  # [N, T, B, D]
    feedback_done: asyncio.Event = field(default_factory=asyncio.Event)  # set once it closes
    driver: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.delivered = torch.zeros(self.n_agents, self.n_agents, dtype=torch.bool)

    @property
    def n_agents(self) -> int:
        return len(self.agent_ids)

    def missing(self) -> list[str]:
        """The agents that have not joined."""
        return [a for i, a in enumerate(self.agent_ids) if i not in self.slots]

    # -- JOINING -------------------------------------------------------------------------------
    def admit(self, index: int, terms: Terms, silent: bool) -> bool:
        """Give agent ``index`` a slot; returns whether every agent has one now.

        The first joiner sets the round's terms; every later one must declare the same.
        """
        if index in self.slots:
            raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                f"{self.agent_ids[index]} already joined round {self.number}")
        if self.terms is None:
            self.terms = terms
        else:
            same_terms(terms, self.terms)
        self.slots[index] = Slot(index, self.agent_ids[index])
        if silent:
            self.silent.add(index)
        return len(self.slots) == self.n_agents

    def leave(self, index: int) -> None:
        """Agent ``index`` left before the round started: it may join again. A round nobody is
        left in drops its terms, which bound only the agents that agreed to them."""
        if self.phase is not Phase.JOINING:
            return
        self.slots.pop(index, None)
        self.silent.discard(index)
        if not self.slots:
            self.terms = None

    def start(self, driver: asyncio.Task) -> None:
        """Every agent joined: ``driver`` runs the episode batch, the joins return."""
        self.phase, self.driver = Phase.RUNNING, driver
        self.joined.set()

    def time_out_joins(self, seconds: float) -> None:
        self.fail(f"round {self.number}: join barrier timed out after {seconds:g} s, missing "
                  f"{', '.join(self.missing())}", grpc.StatusCode.DEADLINE_EXCEEDED)

    # -- RUNNING -------------------------------------------------------------------------------
    def record_delivery(self, reaches: Tensor) -> None:
        """``reaches[receiver, sender]``: a vector went from sender to receiver in some
        environment; only such senders may get the receiver's feedback."""
        self.delivered |= reaches

    def finish_episode(self) -> None:
        """The episode batch ran to its end: the round waits for feedback."""
        self.phase = Phase.FEEDBACK

    # -- FEEDBACK ------------------------------------------------------------------------------
    def check_feedback_pending(self, index: int) -> None:
        """Each receiver's feedback counts once: a second one is refused, not summed in."""
        if index in self.feedback:
            raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                f"{self.agent_ids[index]} already sent its feedback")

    def record_feedback(self, index: int, senders: list[int], grads: Tensor) -> bool:
        """Keep receiver ``index``'s checked feedback ``[S, T, B, D]`` for ``senders``; once
        every agent's is in, sum it for each sender and close. Returns whether it closed."""
        self.check_feedback_pending(index)
        self.feedback[index] = (senders, grads)
        if len(self.feedback) < self.n_agents:
            return False
        sums = torch.zeros(self.n_agents, *grads.shape[1:])
        for s, g in self.feedback.values():
            if s:
                sums.index_add_(0, torch.tensor(s), g)
        self.feedback_sums = sums
        self._close()
        return True

    def time_out_feedback(self) -> None:
        missing = [self.agent_ids[i] for i in self.slots if i not in self.feedback]
        self.fail(f"round {self.number}: feedback timed out, missing {', '.join(missing)}",
                  grpc.StatusCode.DEADLINE_EXCEEDED)

    # -- any phase -----------------------------------------------------------------------------
    def fail(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        """End the round; the first failure is the one every waiting call is answered with."""
        if self.failure is None:
            self.failure, self.failure_code = reason, code
        self._close()

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self.joined.set()
        self.feedback_done.set()


def round_to_join(current: Round | None, started: int, number: int,
                  agent_ids: tuple[str, ...], joiner: int | None = None) -> Round:
    """The round a join for round ``number`` goes to: the one gathering agents, or a new one.

    Only the next round (``started + 1``, what ``Describe`` tells agents) can be joined: a join
    for a later one would open a round that every honest join is refused from until it times
    out.

    Parameters
    ----------
    current
        The service's latest round, if any.
    started
        The last round whose episode batch started: no round up to it is joined again.
    number
        The round the join asks for.
    agent_ids
        Every agent of the environment, for a new round.
    joiner
        The joining agent's index, where known. An agent whose feedback the latest round holds
        is still waiting for that round's answer: its join for a new round is refused rather
        than ending the round the others are finishing (one that has sent none has left it,
        and the round ends).
    """
    if current is not None and current.phase is Phase.JOINING and number != current.number:
        raise ProtocolError(FAILED, f"round {current.number} is gathering agents; "
                                    f"cannot join round {number}")
    if current is not None and current.phase is Phase.RUNNING:
        raise ProtocolError(FAILED, f"round {current.number} is running; join after it ends")
    if number <= started:
        raise ProtocolError(FAILED, f"round {number} already ran; the next round is "
                                    f"{started + 1}")
    if number > started + 1:
        raise ProtocolError(FAILED, f"round {number} is not open; the next round is "
                                    f"{started + 1}")
    check_round_number(number)
    if current is not None and current.phase is Phase.JOINING:
        return current
    if current is not None and current.phase is Phase.FEEDBACK:
        if joiner is not None and joiner in current.feedback:
            raise ProtocolError(FAILED, f"{agent_ids[joiner]} sent its feedback for round "
                                        f"{current.number}, which is not complete; cannot "
                                        f"join round {number}")
        current.fail(f"round {number} began before round {current.number}'s feedback completed")
    return Round(number, agent_ids)
