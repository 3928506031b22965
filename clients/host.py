"""An agent's rounds, message by message: what the ClientApp and the agent worker share.

``AgentHost.train`` and ``AgentHost.evaluate`` take a Flower message's content and the node's
settings and return the reply's content. The ClientApp opens the agent for each message and
closes it after (Flower starts a process per message). The worker (``keep``) holds it between
messages: the agent that ended round r goes on with round r + 1 from memory, its models,
optimizer, channel to the simulator and open ledger as they were. Nothing durable changes:
every round still ends with the agent's state written to its directory, so a worker that dies
is a failed round, and a new one continues from that state.

Before anything is opened or released, the run's configuration is checked against the
agent's own privacy policy (``clients.policy``): a configuration below it is refused with one
line. Then the agent's ledger must extend what the server recorded of it (the message's
anchors). Each reply carries the agent's proof (``protocol.round.Proof``), which the process
that answers the message signs (``protocol.signing.seal``).

A kept agent also keeps its last round's reply. The server sends a round again, unchanged,
when some reply of it was lost (a SuperNode killed while its agent worked on): that agent
then answers with the reply it computed, without training or releasing anything twice. It
does so once; asked again, it runs the round from its state before it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcomm.clients.agent import FederatedAgent
from fedcomm.clients.failures import failure_line
from fedcomm.clients.journal import Journal
from fedcomm.clients.node import AgentNode
from fedcomm.clients.secure import keep_input
from fedcomm.config import FederationConfig
from fedcomm.protocol.round import (
    ARRAYS,
    CONFIG,
    METRICS,
    PROOF,
    EvaluateInstruction,
    EvaluateReply,
    TrainInstruction,
    anchors_from_json,
)


@dataclass
class _Held:
    """An agent kept between messages."""

    agent: FederatedAgent
    config: str  # the run it belongs to
    round: int  # the round whose end its state is
    replay: tuple[str, RecordDict] | None = None  # its last train message's digest and reply


class AgentHost:
    """Opens the agent each message is for; ``keep``: holds it until the next message."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self._held: dict[tuple[str, Path], _Held] = {}

    def train(self, content: RecordDict, settings: dict, context_state: RecordDict,
              start_s: float = 0.0) -> RecordDict:
        """Train the round ``content`` instructs; the reply's arrays and metrics."""
        start = time.perf_counter()
        todo = TrainInstruction.from_record(_config(content))
        fed, node, key, held = self._take(todo.config, settings)
        digest = _digest(todo.config, todo.server_round, content) if self.keep else ""
        if held is not None and held.replay is not None and held.replay[0] == digest:
            reply, held.replay = held.replay[1], None  # its reply was lost: the same again
            self._held[key] = held
            return reply
        agent = self._open(held, fed, node, context_state, todo.config, todo.server_round - 1)
        try:
            agent.check_anchor(anchors_from_json(todo.anchors))
            sent = _arrays(content)
            shared, metrics = agent.train_round(todo.server_round, sent, todo.time_frac,
                                                todo.replays)
            if fed.secure_aggregation and agent.sends:  # the update leaves only masked
                keep_input(fed, agent.index, node.agent_id, node.state_dir, context_state,
                           todo.server_round, sent, shared or agent.module())
                shared = {}
        except BaseException:
            agent.close()
            raise
        metrics = replace(metrics, timings=metrics.timings | {
            "client_s": time.perf_counter() - start, "start_s": start_s})
        Journal(node.state_dir).train(todo.server_round, metrics.return_mean or 0.0,
                                      metrics.timings, metrics.stats)
        if node.policy.private:  # nothing that no mechanism covers leaves the agent
            metrics = metrics.withheld()
        reply = RecordDict({ARRAYS: ArrayRecord(shared), METRICS: metrics.to_record(),
                            PROOF: agent.proof().to_record()})
        self._done(key, _Held(agent, todo.config, todo.server_round, (digest, reply)))
        return reply

    def evaluate(self, content: RecordDict, settings: dict, context_state: RecordDict
                 ) -> RecordDict:
        """Play the greedy episodes ``content`` asks for; the reply's metrics."""
        todo = EvaluateInstruction.from_record(_config(content))
        fed, node, key, held = self._take(todo.config, settings)
        agent = self._open(held, fed, node, context_state, todo.config, todo.server_round)
        try:
            agent.check_anchor(anchors_from_json(todo.anchors))
            returns = agent.evaluate(_arrays(content), todo.batches, todo.seed,
                                     todo.server_round)
        except BaseException:
            agent.close()
            raise
        replay = held.replay if held is not None and held.agent is agent else None
        self._done(key, _Held(agent, todo.config, todo.server_round, replay))
        Journal(node.state_dir).evaluation(todo.server_round, todo.seed, returns)
        reply = EvaluateReply(agent.index, len(returns),
                              None if node.policy.private else returns)
        return RecordDict({METRICS: reply.to_record(), PROOF: agent.proof().to_record()})

    def _take(self, config: str, settings: dict
              ) -> tuple[FederationConfig, AgentNode, tuple[str, Path], _Held | None]:
        """The run (checked against the node's privacy policy), the node, and the agent held
        for it (taken out until the message is done)."""
        fed = FederationConfig.from_json(config)
        node = AgentNode.from_settings(settings, fed.spec)
        node.policy.check(fed, fed.spec.agent_ids.index(node.agent_id))
        key = (node.agent_id, node.state_dir)
        return fed, node, key, self._held.pop(key, None)

    def _open(self, held: _Held | None, fed: FederationConfig, node: AgentNode,
              context_state: RecordDict, config: str, restore_round: int) -> FederatedAgent:
        """The held agent if it is at ``restore_round`` of the same run; else the agent
        restored from its state directory (the held one closed first: one ledger writer)."""
        if held is not None:
            if held.config == config and held.round == restore_round:
                held.agent.continue_in_memory(restore_round)
                return held.agent
            held.agent.close()
        torch.set_num_threads(1)  # agents share the machine's cores with their peers
        return FederatedAgent(fed, node, context_state, restore_round)

    def _done(self, key: tuple[str, Path], held: _Held) -> None:
        if self.keep:
            self._held[key] = held
        else:
            held.agent.close()

    def close(self) -> None:
        """Close every held agent (their transports and ledgers)."""
        for held in self._held.values():
            held.agent.close()
        self._held.clear()


def agent_of_node(content: RecordDict, settings: dict) -> str:
    """The agent a node's settings name in the run ``content``'s configuration holds."""
    fed = FederationConfig.from_json(str(_config(content)["config"]))
    return AgentNode.from_settings(settings, fed.spec).agent_id


def failure_reason(content: RecordDict, settings: dict, e: Exception, node: str) -> str:
    """One line for the server: which agent failed, what happened."""
    return failure_line(_who(content, settings, node), e,
                        str(settings.get("sim-address", "?")))


def _who(content: RecordDict, settings: dict, node: str) -> str:
    """The failing agent's id, as far as the node's settings and the message tell it."""
    if "agent-id" in settings:
        return str(settings["agent-id"])
    try:
        fed = FederationConfig.from_json(str(_config(content)["config"]))
        return fed.spec.agent_ids[int(settings["partition-id"])]
    except Exception:  # the message itself may be what is wrong
        return node


def _config(content: RecordDict) -> ConfigRecord:
    record = content.get(CONFIG)
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"the message carries no {CONFIG!r} record")
    return record


def _arrays(content: RecordDict) -> dict[str, torch.Tensor]:
    record = content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"the message carries no {ARRAYS!r} record")
    return record.to_torch_state_dict()


def _digest(config: str, server_round: int, content: RecordDict) -> str:
    """What identifies a train message: the run, the round and the global module."""
    h = hashlib.sha256(f"{server_round}\0{config}".encode())
    arrays = content.get(ARRAYS)
    if isinstance(arrays, ArrayRecord):
        for name in sorted(arrays):
            h.update(name.encode() + b"\0" + arrays[name].data)
    return h.hexdigest()
