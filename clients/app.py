"""The Flower ClientApp: one agent of the joint environment per SuperNode.

``train`` messages carry the global shared module and the round's configuration; the agent
trains its round's episode batches through the simulator and replies with its copy of the shared
module and metrics. ``evaluate`` messages run greedy episodes and reply with the agent's returns.
A failure is answered with one line saying what happened instead of a traceback, and the
server decides whether the run goes on.

The node settings say who the agent is and where it reaches the simulator (see
``AgentNode.from_settings``): Flower's node config in deployment; in simulation the defaults
given to ``make_client_app`` plus Flower's ``partition-id``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedcomm.clients.agent import FederatedAgent
from fedcomm.clients.failures import failure_line
from fedcomm.clients.node import AgentNode
from fedcomm.config import FederationConfig
from fedcomm.protocol.round import (
    ARRAYS,
    CONFIG,
    METRICS,
    EvaluateInstruction,
    EvaluateReply,
    TrainInstruction,
)


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22: start, in clock ticks
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return max(0.0, time.time() - boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, StopIteration):
        return 0.0


_handled_a_message = False


def _start_up() -> float:
    """Seconds from process start to the first message's handler (a deployment starts a
    ClientApp process per message; a simulation's actor once), 0 for later messages."""
    global _handled_a_message
    if _handled_a_message:
        return 0.0
    _handled_a_message = True
    return _process_age()


def _open(msg: Message, context: Context, defaults: dict, config: str, restore_round: int
          ) -> tuple[FederatedAgent, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)  # agents share the machine's cores with their peers
    fed = FederationConfig.from_json(config)
    node = AgentNode.from_settings({**defaults, **dict(context.node_config)}, fed.spec)
    arrays = msg.content[ARRAYS].to_torch_state_dict()
    return FederatedAgent(fed, node, context.state, restore_round), arrays


def _who(msg: Message, context: Context) -> str:
    """The failing agent's id, as far as the node config and the message tell it."""
    node = dict(context.node_config)
    if "agent-id" in node:
        return str(node["agent-id"])
    try:
        fed = FederationConfig.from_json(str(msg.content[CONFIG]["config"]))
        return fed.spec.agent_ids[int(node["partition-id"])]
    except Exception:  # the message itself may be what is wrong
        return f"node {context.node_id}"


def _failure(msg: Message, context: Context, e: Exception, defaults: dict) -> Message:
    settings = {**defaults, **dict(context.node_config)}
    reason = failure_line(_who(msg, context), e, str(settings.get("sim-address", "?")))
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)


def _train(msg: Message, context: Context, defaults: dict) -> Message:
    start_up, start = _start_up(), time.perf_counter()
    todo = TrainInstruction.from_record(msg.content[CONFIG])
    agent, arrays = _open(msg, context, defaults, todo.config, todo.server_round - 1)
    try:
        shared, reply = agent.train_round(todo.server_round, arrays, todo.time_frac)
    finally:
        agent.close()
    reply = replace(reply, timings=reply.timings | {"client_s": time.perf_counter() - start,
                                                    "start_s": start_up})
    return Message(RecordDict({ARRAYS: ArrayRecord(shared), METRICS: reply.to_record()}),
                   reply_to=msg)


def _evaluate(msg: Message, context: Context, defaults: dict) -> Message:
    todo = EvaluateInstruction.from_record(msg.content[CONFIG])
    agent, arrays = _open(msg, context, defaults, todo.config, todo.server_round)
    try:
        returns = agent.evaluate(arrays, todo.batches, todo.seed, todo.server_round)
    finally:
        agent.close()
    reply = EvaluateReply(agent.index, returns)
    return Message(RecordDict({METRICS: reply.to_record()}), reply_to=msg)


def _answering_failures(handler: Callable[[Message, Context, dict], Message],
                        defaults: dict) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context, defaults)
        except Exception as e:  # the server hears why; the node stays up for the next round
            return _failure(msg, context, e, defaults)

    return handle


def make_client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp whose node settings default to ``defaults`` (the node config overrides)."""
    app = ClientApp()
    app.train()(_answering_failures(_train, dict(defaults or {})))
    app.evaluate()(_answering_failures(_evaluate, dict(defaults or {})))
    return app


app = make_client_app()
