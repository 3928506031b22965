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
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedcomm.clients.agent import AgentNode, FederatedAgent, env_spec
from fedcomm.clients.grpc_transport import TransportError
from fedcomm.clients.transport import BatchTruncated
from fedcomm.config import FederationConfig

CONFIG_KEY = "fedcomm.config"


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


def _open(msg: Message, context: Context, defaults: dict, restore_round: int
          ) -> tuple[FederatedAgent, dict[str, torch.Tensor], ConfigRecord]:
    torch.set_num_threads(1)  # agents share the machine's cores with their peers
    config = msg.content["config"]
    fed = FederationConfig.from_json(str(config[CONFIG_KEY]))
    node = AgentNode.from_settings({**defaults, **dict(context.node_config)}, env_spec(fed))
    arrays = msg.content["arrays"].to_torch_state_dict()
    return FederatedAgent(fed, node, context.state, restore_round), arrays, config


def _who(msg: Message, context: Context) -> str:
    """The failing agent's id, as far as the node config and the message tell it."""
    node = dict(context.node_config)
    if "agent-id" in node:
        return str(node["agent-id"])
    try:
        fed = FederationConfig.from_json(str(msg.content["config"][CONFIG_KEY]))
        return env_spec(fed).agent_ids[int(node["partition-id"])]
    except Exception:  # the message itself may be what is wrong
        return f"node {context.node_id}"


def _failure(msg: Message, context: Context, e: Exception) -> Message:
    who = _who(msg, context)
    if isinstance(e, TransportError | BatchTruncated):
        reason = f"{who}: the simulator ended the batch: {e}"
    else:
        reason = f"{who}: {type(e).__name__}: {e}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)


def _train(msg: Message, context: Context, defaults: dict) -> Message:
    start_up, start = _start_up(), time.perf_counter()
    server_round = int(msg.content["config"]["server-round"])
    agent, arrays, config = _open(msg, context, defaults, restore_round=server_round - 1)
    try:
        shared, metrics = agent.train_round(server_round, arrays,
                                            float(config.get("time-frac", 0.0)))
    finally:
        agent.close()
    metrics |= {"agent": agent.index, "client_s": time.perf_counter() - start,
                "start_s": start_up}
    return Message(RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _evaluate(msg: Message, context: Context, defaults: dict) -> Message:
    config = msg.content["config"]
    server_round = int(config["server-round"])
    agent, arrays, config = _open(msg, context, defaults, restore_round=server_round)
    try:
        returns = agent.evaluate(arrays, int(config["eval-batches"]), int(config["eval-seed"]),
                                 server_round)
    finally:
        agent.close()
    metrics = MetricRecord({"num-examples": len(returns), "agent": agent.index,
                            "returns": returns})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _answering_failures(handler: Callable[[Message, Context, dict], Message],
                        defaults: dict) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context, defaults)
        except Exception as e:  # the server hears why; the node stays up for the next round
            return _failure(msg, context, e)

    return handle


def make_client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp whose node settings default to ``defaults`` (the node config overrides)."""
    app = ClientApp()
    app.train()(_answering_failures(_train, dict(defaults or {})))
    app.evaluate()(_answering_failures(_evaluate, dict(defaults or {})))
    return app


app = make_client_app()
