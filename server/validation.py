"""Every agent's reply checked before it can reach the global module, and weighed by the server.

A registered agent is trusted with nothing it replies. A train reply passes, in order:

1. the message: it answers one of this round's messages, from the node that message went to,
   and no other reply answered that message before (a replay or a duplicate is refused);
2. its records: an ``ArrayRecord`` (``"arrays"``), a ``MetricRecord`` (``"metrics"``, a
   :class:`TrainReply` whose counts are integers) and a ``ConfigRecord`` (``"proof"``);
3. who it is: the proof's signature verifies under the key of the agent it names
   (``protocol.signing``), so a node answers only as the agent whose key it holds, and one
   agent is counted once a round;
4. the round: the batches it claims are the round's, it restored a state of an earlier round,
   the environment steps it claims are those the server scheduled less its silent batches,
   and its ledger's anchor extends the one recorded before (a ledger never shrinks);
5. its arrays: exactly the parts of the module its agent sends (``server.layout``), or none
   for an agent silent all round, each of the global module's shape and dtype and finite
   (under secure aggregation: none, the update comes masked, ``server.secure``);
6. its update (its arrays minus the global module it was sent): no parameter moved further
   than an honest agent's optimizer can move one in the round (Adam's steps are bounded by
   the learning rate, ``fedcomm.config.adam_step_bound``), its L2 norm within
   ``max_update_norm`` where one is set, and, in a part that three or more agents carry, its
   norm in that part within ``RELATIVE_NORM`` times the part's median this round.

The first check that fails is the reason, one line naming the node and the agent; the reply
is then a failed agent for the round (``on_agent_failure``) and never reaches the average.
A reply that passes is weighed by what the server knows, not by what it says (its
``num-examples`` is rewritten): the round's scheduled batches less the silent ones it declares
(which can only lower its weight) times the environment steps of one batch; under client-level
DP every agent that contributes weighs the same (1). An agent silent in every batch weighs 0
and its arrays are dropped.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedcomm.config import FederationConfig
from fedcomm.protocol.round import (
    ARRAYS,
    METRICS,
    PROOF,
    TYPE,
    WEIGHT_KEY,
    Anchors,
    EvaluateReply,
    Proof,
    TrainReply,
    key_group,
)
from fedcomm.protocol.signing import SIGNATURE, verifies
from fedcomm.server.layout import ReplyLayout

INTEGERS = ("agent", "env_steps", "batches", "silent_batches", "restored_round")
RELATIVE_NORM = 10.0
"""A reply's update of a part three or more agents carry may be at most this many times the
median of that part's updates in the round."""


class Rejected(Exception):
    """A reply that may not be aggregated; the message names the agent and says why."""


@dataclass
class Screened:
    """A round's replies after the checks: those accepted, one line per rejected one, the
    update norm of each accepted agent and its ledger anchor (by agent id); and how close the
    accepted updates came to the default bounds: the largest move of a parameter as a
    fraction of the optimizer's reach, and the largest norm of a part over that part's median
    (where three or more agents carry it)."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)
    anchors: Anchors = field(default_factory=dict)
    reach: float = 0.0
    median_ratio: float = 0.0


@dataclass
class _Candidate:
    msg: Message
    reply: TrainReply
    proof: Proof
    norms: dict[str, float]  # the update's L2 norm per key group
    reach: float  # its largest move of a parameter as a fraction of the optimizer's reach


class ReplyScreen:
    """The checks of one run's replies.

    Parameters
    ----------
    fed
        The run: its agents, the batches of each round, the optimizer, ``max_update_norm``.
    layout
        The arrays each agent's reply carries.
    keys
        Each agent's key shared with the server, by agent id: a reply counts only under the
        signature of the agent it names.
    uniform
        Every contributing agent weighs 1 (client-level DP needs equal weights) instead of its
        environment steps.
    anchors
        Each agent's ledger anchor as recorded so far (a resumed run's checkpoint).
    """

    def __init__(self, fed: FederationConfig, layout: ReplyLayout, keys: Mapping[str, str],
                 uniform: bool = False, anchors: Anchors | None = None) -> None:
        self.fed, self.layout, self.uniform = fed, layout, uniform
        self.agent_ids = fed.spec.agent_ids
        missing = [a for a in self.agent_ids if not keys.get(a)]
        if missing:
            raise ValueError(f"no server key for {', '.join(missing)}: the server verifies "
                             "every reply under its agent's key")
        self.keys = dict(keys)
        self.anchors: Anchors = dict(anchors or {})
        self.sent = ArrayRecord()  # the global module the round's replies started from
        self._base: dict[str, np.ndarray] = {}  # the same, in float64 for the updates
        self.messages: list[Message] = []  # the round's train messages, ids set when pushed
        self.last = Screened()  # the latest round's outcome, for the round loop to act on

    def configure(self, arrays: ArrayRecord, messages: Sequence[Message]) -> None:
        """The global module sent this round, and the messages it went in (their ids are
        read when the replies are screened: the grid assigns them as it pushes)."""
        self.sent = arrays
        self._base = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()}
        self.messages = list(messages)

    # -- a round's replies ---------------------------------------------------------------------
    def screen(self, server_round: int, replies: Iterable[Message]) -> Screened:
        """Check every reply of ``server_round`` (error replies are left out: they are the
        transport's failures); the accepted ones are reweighed in place. The outcome is also
        kept as ``last``."""
        out = Screened()
        sent = {m.metadata.message_id: m for m in self.messages}
        answered: set[str] = set()
        counted: set[int] = set()
        candidates = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                _answers(msg, sent, answered)
                reply, proof = self._identified(msg, _train_reply)
                if reply.agent in counted:
                    raise Rejected(f"{self._who(msg, reply.agent)}: a second reply this round")
                counted.add(reply.agent)
                candidates.append(_Candidate(msg, reply, proof,
                                             *self._check(server_round, msg, reply, proof)))
            except Rejected as e:
                out.rejected.append(str(e))
        kept, out.median_ratio = self._within_the_median(candidates, out.rejected)
        for candidate in kept:
            name = self.agent_ids[candidate.reply.agent]
            out.accepted.append(candidate.msg)
            out.norms[name] = math.sqrt(sum(n * n for n in candidate.norms.values()))
            out.anchors[name] = (candidate.proof.ledger_entries, candidate.proof.ledger_hash)
            out.reach = max(out.reach, candidate.reach)
        self.anchors |= out.anchors
        self.last = out
        return out

    def _identified(self, msg: Message, metrics_of) -> tuple:
        """The reply's metrics (parsed by ``metrics_of``) and proof, once its signature
        verifies under the key of the agent it names."""
        node = msg.metadata.src_node_id
        content = msg.content
        record = content.get(PROOF)
        if not isinstance(record, ConfigRecord):
            raise Rejected(f"node {node}: a reply carries a ConfigRecord {PROOF!r}")
        try:
            proof = Proof.from_record(record)
        except (ValueError, TypeError) as e:
            raise Rejected(f"node {node}: {e}") from None
        if proof.agent_id not in self.agent_ids:
            raise Rejected(f"node {node}: answers as {proof.agent_id!r}, no agent of the run")
        if not verifies(self.keys[proof.agent_id], msg.metadata.reply_to_message_id,
                        proof.agent_id, content, record.get(SIGNATURE, "")):
            raise Rejected(f"node {node}: its reply is not signed with {proof.agent_id}'s key; "
                           "not counted")
        reply = metrics_of(node, content)
        if reply.agent != self.agent_ids.index(proof.agent_id):
            raise Rejected(f"node {node}: its metrics speak for agent {reply.agent}, its proof "
                           f"for {proof.agent_id}")
        return reply, proof

    def _check(self, server_round: int, msg: Message, reply: TrainReply, proof: Proof
               ) -> tuple[dict[str, float], float]:
        """The round's checks of one identified reply, which is then reweighed; returns its
        update's L2 norm per key group (none for a silent agent) and its reach (``_update``)."""
        name = self._who(msg, reply.agent)
        scheduled = len(self.fed.batches_in(server_round))
        if reply.batches != scheduled:
            raise Rejected(f"{name}: replies for {reply.batches} batches; round {server_round} "
                           f"has {scheduled}")
        if not 0 <= reply.restored_round < server_round:
            raise Rejected(f"{name}: continued from round {reply.restored_round}, not from one "
                           f"before round {server_round}")
        silent = min(max(reply.silent_batches, 0), scheduled)
        steps = (scheduled - silent) * self.fed.train.batch_steps
        if reply.env_steps != steps:
            raise Rejected(f"{name}: claims {reply.env_steps} environment steps; the server "
                           f"scheduled {scheduled} batches of {self.fed.train.batch_steps} "
                           f"steps, {silent} of them silent: {steps}")
        self._check_anchor(name, proof)
        arrays = msg.content[ARRAYS]
        if self.fed.secure_aggregation:  # its update comes masked, in SecAgg+ (server.secure)
            if arrays:
                raise Rejected(f"{name}: replies with its arrays in the clear; under secure "
                               "aggregation an update leaves an agent masked only")
            msg.content[METRICS][WEIGHT_KEY] = 1 if steps else 0
            return {}, 0.0
        if steps == 0 or not arrays:  # silent: nothing of it enters the average
            msg.content[ARRAYS] = ArrayRecord()
            msg.content[METRICS][WEIGHT_KEY] = 0
            return {}, 0.0
        values = self._arrays(name, reply.agent, arrays)
        norms, reach = self._update(name, values, scheduled)
        msg.content[METRICS][WEIGHT_KEY] = 1 if self.uniform else steps
        return norms, reach

    def _check_anchor(self, name: str, proof: Proof) -> None:
        entries, last = self.anchors.get(proof.agent_id, (0, ""))
        if proof.ledger_entries < entries or (
                proof.ledger_entries == entries and entries and proof.ledger_hash != last):
            raise Rejected(f"{name}: its ledger holds {proof.ledger_entries} entries ending in "
                           f"{proof.ledger_hash[:12]}; the server recorded {entries} ending in "
                           f"{last[:12]}: a ledger never shrinks or changes")

    def _arrays(self, name: str, agent: int, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        expected = self.layout.agents[agent]
        keys = set(arrays.keys())
        own = self.layout.type_names[agent]
        foreign = sorted({key_group(k) for k in keys - set(expected)
                          if k.startswith(TYPE) and key_group(k) != f"{TYPE}{own}"})
        if foreign:
            raise Rejected(f"{name}: a {own} replies with the networks of "
                           f"{', '.join(g[len(TYPE):] for g in foreign)}")
        extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
        if extra:
            raise Rejected(f"{name}: carries arrays of parts it does not send: {_few(extra)}")
        if missing:
            raise Rejected(f"{name}: lacks {len(missing)} of its {len(expected)} arrays: "
                           f"{_few(missing)}")
        values = {}
        for key, spec in expected.items():
            try:
                value = arrays[key].numpy()
            except Exception as e:  # bytes that are no array
                raise Rejected(f"{name}: {key} cannot be read: {e}") from None
            if value.shape != spec.shape or value.dtype != spec.dtype:
                raise Rejected(f"{name}: {key} is {value.dtype}{list(value.shape)}; the global "
                               f"module's is {spec.dtype}{list(spec.shape)}")
            if not np.isfinite(value).all():
                nan = int(np.isnan(value).sum())
                raise Rejected(f"{name}: {key} is not finite ({nan} NaN, "
                               f"{value.size - nan - int(np.isfinite(value).sum())} infinite)")
            values[key] = value
        return values

    def _update(self, name: str, values: Mapping[str, np.ndarray], batches: int
                ) -> tuple[dict[str, float], float]:
        """The update's L2 norm per key group, once it is within the optimizer's reach and
        ``max_update_norm``, and its largest move of a parameter as a fraction of that
        reach."""
        if not self._base:
            return {}, 0.0
        reach = self.step_bound(batches)
        squares: dict[str, float] = {}
        furthest = 0.0
        for key, value in values.items():
            diff = value.astype(np.float64) - self._base[key]
            moved = float(np.abs(diff).max(initial=0.0))
            if moved > reach:
                raise Rejected(f"{name}: {key} moved {moved:.4g}, further than an honest "
                               f"agent's optimizer can in {batches} batches ({reach:.4g})")
            furthest = max(furthest, moved)
            group = key_group(key)
            squares[group] = squares.get(group, 0.0) + float(np.dot(diff.ravel(), diff.ravel()))
        norm = math.sqrt(sum(squares.values()))
        bound = self.fed.max_update_norm
        if bound is not None and not norm <= bound:
            raise Rejected(f"{name}: its update's L2 norm {norm:.4g} exceeds max_update_norm "
                           f"{bound:g}")
        return {group: math.sqrt(s) for group, s in squares.items()}, furthest / reach

    def step_bound(self, batches: int) -> float:
        """The furthest an honest agent's optimizer moves one parameter in ``batches`` episode
        batches (``TrainConfig.step_reach``)."""
        return self.fed.train.step_reach(batches)

    def _within_the_median(self, candidates: list[_Candidate], rejected: list[str]
                           ) -> tuple[list[_Candidate], float]:
        """The candidates whose update of every part three or more of them carry is within
        ``RELATIVE_NORM`` times that part's median this round, and the largest ratio to the
        median among them."""
        by_group: dict[str, list[float]] = {}
        for c in candidates:
            for group, norm in c.norms.items():
                by_group.setdefault(group, []).append(norm)
        limits = {g: RELATIVE_NORM * statistics.median(n) for g, n in by_group.items()
                  if len(n) >= 3}
        kept, ratio = [], 0.0
        for c in candidates:
            over = [(g, n) for g, n in c.norms.items() if g in limits and n > limits[g]]
            if over and limits[over[0][0]] > 0:
                group, norm = over[0]
                rejected.append(f"{self._who(c.msg, c.reply.agent)}: its update of {group} has "
                                f"norm {norm:.4g}, over {RELATIVE_NORM:g} times the round's "
                                f"median ({limits[group] / RELATIVE_NORM:.4g})")
                continue
            kept.append(c)
            ratio = max([ratio, *(RELATIVE_NORM * n / limits[g] for g, n in c.norms.items()
                                  if limits.get(g, 0) > 0)])
        return kept, ratio

    # -- evaluation ----------------------------------------------------------------------------
    def evaluation(self, messages: Sequence[Message], replies: Iterable[Message],
                   returns_each: int) -> tuple[list[str], dict[int, EvaluateReply]]:
        """An evaluation's replies: what is wrong with them (empty: nothing), and each
        agent's reply. Each answers one of ``messages`` from its node, is signed by the agent
        it names, played ``returns_each`` episodes and, where it sends its returns, holds that
        many finite ones."""
        problems: list[str] = []
        sent = {m.metadata.message_id: m for m in messages}
        answered: set[str] = set()
        out: dict[int, EvaluateReply] = {}
        for msg in replies:
            try:
                _answers(msg, sent, answered)
                reply, proof = self._identified(msg, _evaluate_reply)
                name = self._who(msg, reply.agent)
                if reply.agent in out:
                    raise Rejected(f"{name}: a second evaluation reply")
                returns = reply.returns
                if reply.episodes != returns_each or (returns is not None and (
                        len(returns) != returns_each
                        or not all(math.isfinite(x) for x in returns))):
                    raise Rejected(f"{name}: an evaluation reply holds {returns_each} episodes "
                                   "and, if any, as many finite returns")
                self._check_anchor(name, proof)
                self.anchors[proof.agent_id] = (proof.ledger_entries, proof.ledger_hash)
                out[reply.agent] = reply
            except Rejected as e:
                problems.append(str(e))
        return problems, out

    def _who(self, msg: Message, agent: int) -> str:
        return f"{self.agent_ids[agent]} (node {msg.metadata.src_node_id})"


def _answers(msg: Message, sent: Mapping[str, Message], answered: set[str]) -> None:
    """Refuse a reply that answers none of ``sent``, comes from another node than the one the
    message went to, or answers a message already answered."""
    node, to = msg.metadata.src_node_id, msg.metadata.reply_to_message_id
    asked = sent.get(to)
    if asked is None or not to:
        raise Rejected(f"node {node}: its reply answers no message of this round (a replay?)")
    if asked.metadata.dst_node_id != node:
        raise Rejected(f"node {node}: answers the message sent to node "
                       f"{asked.metadata.dst_node_id}")
    if to in answered:
        raise Rejected(f"node {node}: a second reply to one message")
    answered.add(to)


def _train_reply(node: int, content) -> TrainReply:
    if set(content.keys()) != {ARRAYS, METRICS, PROOF} or \
            not isinstance(content.get(ARRAYS), ArrayRecord) or \
            not isinstance(content.get(METRICS), MetricRecord):
        raise Rejected(f"node {node}: a reply holds an ArrayRecord {ARRAYS!r}, a MetricRecord "
                       f"{METRICS!r} and a ConfigRecord {PROOF!r}, this one "
                       f"{sorted(content.keys())}")
    metrics = content[METRICS]
    for name in INTEGERS:
        value = metrics.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise Rejected(f"node {node}: {name} must be an integer, got {value!r}")
    try:
        reply = TrainReply.from_record(metrics)
    except (ValueError, TypeError) as e:
        raise Rejected(f"node {node}: {e}") from None
    return _checked_numbers(node, reply)


def _evaluate_reply(node: int, content) -> EvaluateReply:
    metrics = content.get(METRICS)
    if set(content.keys()) != {METRICS, PROOF} or not isinstance(metrics, MetricRecord):
        raise Rejected(f"node {node}: an evaluation reply holds a MetricRecord {METRICS!r} and "
                       f"a ConfigRecord {PROOF!r}, this one {sorted(content.keys())}")
    for name in ("agent", "episodes"):
        value = metrics.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise Rejected(f"node {node}: {name} must be an integer, got {value!r}")
    returns = metrics.get("returns")
    if returns is not None and not (isinstance(returns, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in returns)):
        raise Rejected(f"node {node}: returns must be a list of numbers")
    return EvaluateReply.from_record(metrics)


def _checked_numbers(node: int, reply: TrainReply) -> TrainReply:
    if (reply.return_mean is not None and not math.isfinite(reply.return_mean)) \
            or math.isnan(reply.epsilon):
        raise Rejected(f"node {node}: its return and epsilon must be numbers, got "
                       f"{reply.return_mean}, {reply.epsilon}")
    return reply


def _few(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
