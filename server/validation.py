"""Every agent's reply checked before it can reach the global module, and weighed by the server.

A registered agent is trusted with nothing it replies. A train reply passes, in order:

1. its records: one ``ArrayRecord`` (``"arrays"``) and one ``MetricRecord`` (``"metrics"``), the
   metrics a :class:`TrainReply` whose counts are integers and whose return is finite;
2. who it is: a node answers as one agent for the whole run (the first agent it answers as,
   in a round no other node answers as that agent), and no two nodes answer as one agent;
3. the round: the batches it claims are the round's, it restored a state of an earlier round,
   and the environment steps it claims are those the server scheduled less its silent batches;
4. its arrays: exactly its agent's keys (the shared module's, and with ``aggregate_private``
   its own type's networks, never another type's; with ``share="used"`` whole parts of the
   shared module may be left out), each of the global module's shape and dtype and finite;
5. its update: the L2 norm of its arrays minus the global module it was sent, within
   ``max_update_norm`` where one is configured.

The first check that fails is the reason, one line naming the agent; the reply is then a
failed agent for the round (``on_agent_failure``) and never reaches the average. A reply that
passes is weighed by what the server knows, not by what it says (its ``num-examples`` is
rewritten): the round's scheduled batches less the silent ones it declares (which can only
lower its weight) times the environment steps of one batch; under client-level DP every agent
that contributes weighs the same (1). An agent silent in every batch weighs 0 and its arrays
are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedcomm.config import FederationConfig
from fedcomm.protocol.round import (
    ARRAYS,
    METRICS,
    SHARED,
    TYPE,
    WEIGHT_KEY,
    TrainReply,
    key_group,
)
from fedcomm.server.layout import Layout

INTEGERS = ("agent", "env_steps", "batches", "silent_batches", "restored_round")


class Rejected(Exception):
    """A reply that may not be aggregated; the message names the agent and says why."""


@dataclass
class Screened:
    """A round's replies after the checks: those accepted, one line per rejected one, and the
    update norm of each accepted agent (by agent id)."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)


class ReplyScreen:
    """The checks of one run's replies, and the node each agent answers from.

    Parameters
    ----------
    fed
        The run: its agents, the batches of each round, ``max_update_norm``.
    layout
        The arrays each agent's reply carries.
    uniform
        Every contributing agent weighs 1 (client-level DP needs equal weights) instead of its
        environment steps.
    """

    def __init__(self, fed: FederationConfig, layout: Layout, uniform: bool = False) -> None:
        self.fed, self.layout, self.uniform = fed, layout, uniform
        self.agent_ids = fed.spec.agent_ids
        self.sent = ArrayRecord()  # the global module the round's replies started from
        self._base: dict[str, np.ndarray] = {}  # the same, in float64 for the update norms
        self.node_of: dict[int, int] = {}  # agent index -> the node that answers as it
        self.live: set[int] | None = None  # the nodes connected when the round was sent

    def configure(self, arrays: ArrayRecord, live_nodes: Iterable[int] | None = None) -> None:
        """The global module sent this round, and the nodes connected: an agent whose node is
        gone may answer from a new one (a restarted SuperNode)."""
        self.sent = arrays
        self._base = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()}
        self.live = None if live_nodes is None else set(live_nodes)

    # -- a round's replies ---------------------------------------------------------------------
    def screen(self, server_round: int, replies: Iterable[Message]) -> Screened:
        """Check every reply of ``server_round`` (error replies are left out: they are the
        transport's failures); the accepted ones are reweighed in place."""
        out = Screened()
        claims: list[tuple[Message, TrainReply]] = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                claims.append((msg, self._parse(msg)))
            except Rejected as e:
                out.rejected.append(str(e))
        for msg, reply in self._identified(claims, out.rejected):
            try:
                out.norms[self.agent_ids[reply.agent]] = self._check(server_round, msg, reply)
                out.accepted.append(msg)
            except Rejected as e:
                out.rejected.append(str(e))
        return out

    def _parse(self, msg: Message) -> TrainReply:
        node = msg.metadata.src_node_id
        content = msg.content
        if set(content.keys()) != {ARRAYS, METRICS} or \
                not isinstance(content.get(ARRAYS), ArrayRecord) or \
                not isinstance(content.get(METRICS), MetricRecord):
            raise Rejected(f"node {node}: a reply holds an ArrayRecord {ARRAYS!r} and a "
                           f"MetricRecord {METRICS!r}, this one {sorted(content.keys())}")
        metrics = content[METRICS]
        for name in INTEGERS:
            value = metrics.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise Rejected(f"node {node}: {name} must be an integer, got {value!r}")
        try:
            reply = TrainReply.from_record(metrics)
        except (ValueError, TypeError) as e:
            raise Rejected(f"node {node}: {e}") from None
        if not 0 <= reply.agent < len(self.agent_ids):
            raise Rejected(f"node {node}: answers as agent {reply.agent}; the run has agents "
                           f"0 to {len(self.agent_ids) - 1}")
        if not math.isfinite(reply.return_mean) or math.isnan(reply.epsilon):
            raise Rejected(f"{self.agent_ids[reply.agent]} (node {node}): its return and "
                           f"epsilon must be numbers, got {reply.return_mean}, {reply.epsilon}")
        return reply

    def _identified(self, claims: list[tuple[Message, TrainReply]], rejected: list[str]
                    ) -> list[tuple[Message, TrainReply]]:
        """The replies from the node each agent answers from; a node answering as an agent
        another node answers as (or as another agent than before) is rejected, and where two
        nodes claim an agent neither answered as before, both are."""
        by_agent: dict[int, list[tuple[Message, TrainReply]]] = {}
        for msg, reply in claims:
            by_agent.setdefault(reply.agent, []).append((msg, reply))
        bound_agent = {node: agent for agent, node in self.node_of.items()}
        out = []
        for agent, mine in by_agent.items():
            name = self.agent_ids[agent]
            owner = self.node_of.get(agent)
            if owner is not None and self.live is not None and owner not in self.live:
                owner = None  # its node is gone: it may answer from a new one
            nodes = [m.metadata.src_node_id for m, _ in mine]
            if owner is None and len(mine) > 1:
                rejected.append(f"{name}: nodes {', '.join(map(str, nodes))} all answer as it; "
                                "none is counted")
                continue
            for msg, reply in mine:
                node = msg.metadata.src_node_id
                before = bound_agent.get(node)
                if before is not None and before != agent:
                    rejected.append(f"node {node} answers as {name}, but it is "
                                    f"{self.agent_ids[before]}")
                elif owner is not None and node != owner:
                    rejected.append(f"node {node} answers as {name}, which node {owner} "
                                    "answers as")
                else:
                    self.node_of[agent] = node
                    out.append((msg, reply))
        return out

    def _check(self, server_round: int, msg: Message, reply: TrainReply) -> float:
        """The round's checks of one identified reply, which is then reweighed; returns the
        L2 norm of its update (0 for a silent agent, NaN if no global module was sent)."""
        name = f"{self.agent_ids[reply.agent]} (node {msg.metadata.src_node_id})"
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
        arrays = msg.content[ARRAYS]
        if steps == 0 or not arrays:  # silent: nothing of it enters the average
            msg.content[ARRAYS] = ArrayRecord()
            msg.content[METRICS][WEIGHT_KEY] = 0
            return 0.0
        values = self._arrays(name, reply.agent, arrays)
        norm = self._norm(values)
        bound = self.fed.max_update_norm
        if bound is not None and not norm <= bound:
            raise Rejected(f"{name}: its update's L2 norm {norm:.4g} exceeds max_update_norm "
                           f"{bound:g}")
        expected = self.layout.agents[reply.agent]
        msg.content[ARRAYS] = ArrayRecord({k: arrays[k] for k in expected if k in arrays})
        msg.content[METRICS][WEIGHT_KEY] = 1 if self.uniform else steps
        return norm

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
            raise Rejected(f"{name}: carries arrays the global module has no place for: "
                           f"{_few(extra)}")
        if self.layout.partial:  # whole parts of the shared module may stay with the agent
            sent = {key_group(k) for k in keys}
            missing = [k for k in missing if key_group(k) in sent or not k.startswith(SHARED)]
        if missing:
            raise Rejected(f"{name}: lacks {len(missing)} of its {len(expected)} arrays: "
                           f"{_few(missing)}")
        values = {}
        for key, spec in expected.items():
            if key not in keys:
                continue
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

    def _norm(self, values: Mapping[str, np.ndarray]) -> float:
        if not self._base:
            return math.nan
        total = 0.0
        for key, value in values.items():
            diff = value.astype(np.float64) - self._base[key]
            total += float(np.dot(diff.ravel(), diff.ravel()))
        return math.sqrt(total)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluation(self, replies: Iterable[Message], returns_each: int) -> list[str]:
        """What is wrong with an evaluation's replies (empty: nothing): each is from the node
        its agent answers from and holds ``returns_each`` finite returns."""
        problems, seen = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            metrics = msg.content.get(METRICS)
            agent = metrics.get("agent") if isinstance(metrics, MetricRecord) else None
            if not isinstance(agent, int) or not 0 <= agent < len(self.agent_ids):
                problems.append(f"node {node}: an evaluation reply names no agent of the run")
                continue
            name = self.agent_ids[agent]
            returns = metrics.get("returns")
            if self.node_of.get(agent, node) != node or agent in seen:
                problems.append(f"node {node} answers as {name}, which another node answers as")
            elif not isinstance(returns, list) or len(returns) != returns_each or \
                    not all(isinstance(x, (int, float)) and math.isfinite(x) for x in returns):
                problems.append(f"{name}: an evaluation reply holds {returns_each} finite "
                                "returns")
            seen.add(agent)
        return problems


def _few(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
