"""The Flower ClientApp: one agent of the joint environment per SuperNode.

``train`` messages carry the global shared module and the round's configuration; the agent
checks the configuration against its own privacy policy, trains its round's episode batches
through the simulator and replies with its copy of the shared module, metrics and its signed
proof (``protocol.signing``); under secure aggregation it replies without its arrays and sends
its update masked, in the SecAgg+ stages that follow (``clients.secure``). ``evaluate``
messages run greedy episodes; ``query`` messages ask which agent the node runs (for the
server's waves, ``server.waves``).
A failure is answered with one line saying what happened instead of a traceback, and the
server decides whether the run goes on.

The node settings say who the agent is and where it reaches the simulator (see
``AgentNode.from_settings``): Flower's node config in deployment; in simulation the defaults
given to ``make_client_app`` plus Flower's ``partition-id``. The agent is opened for each
message (``AgentHost``); a deployment's agent worker holds it between messages instead
(``clients.relay``, ``clients.worker``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcomm.clients.host import AgentHost, agent_of_node, failure_reason
from fedcomm.clients.messages import error_reply, process_age
from fedcomm.clients.secure import answer_stage, is_stage
from fedcomm.protocol.round import identity_reply
from fedcomm.protocol.signing import seal

_handled_a_message = False


def _start_up() -> float:
    """Seconds from process start to the first message's handler (a deployment starts a
    ClientApp process per message; a simulation's actor once), 0 for later messages."""
    global _handled_a_message
    if _handled_a_message:
        return 0.0
    _handled_a_message = True
    return process_age()


def make_client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp whose node settings default to ``defaults`` (the node config overrides)."""
    host, defaults = AgentHost(), dict(defaults or {})
    app = ClientApp()

    def answer(msg: Message, context: Context, kind: str) -> Message:
        settings = {**defaults, **dict(context.node_config)}
        try:
            if kind == "train":
                content = host.train(msg.content, settings, context.state, _start_up())
            else:
                content = host.evaluate(msg.content, settings, context.state)
            seal(content, msg.metadata.message_id, settings)
        except Exception as e:  # the server hears why; the node stays up for the next round
            return error_reply(msg, failure_reason(msg.content, settings, e,
                                                   f"node {context.node_id}"))
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_stage(msg.content):  # SecAgg+ of the round's updates (clients.secure)
            try:
                return answer_stage(msg, context)
            except Exception as e:
                settings = {**defaults, **dict(context.node_config)}
                return error_reply(msg, failure_reason(msg.content, settings, e,
                                                       f"node {context.node_id}"))
        return answer(msg, context, "train")

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer(msg, context, "evaluate")

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which agent this node runs (``protocol.round.identity_query``), signed."""
        settings = {**defaults, **dict(context.node_config)}
        try:
            content = identity_reply(agent_of_node(msg.content, settings))
            seal(content, msg.metadata.message_id, settings)
        except Exception as e:
            return error_reply(msg, failure_reason(msg.content, settings, e,
                                                   f"node {context.node_id}"))
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
