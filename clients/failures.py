"""What an agent says when a batch fails: one line, what happened and what to do.

The same wording serves the ClientApp (the server hears it as the reply's error) and ``fedcomm
agent`` (printed); each passes the advice that fits how it was started.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedcomm.clients.grpc_transport import TransportError
from fedcomm.clients.policy import PolicyRefusal
from fedcomm.learning.transport import BatchTruncated
from fedcomm.protocol.codec import ProtocolError

NODE_ADVICE: Mapping[str, str] = {}  # a SuperNode's agent: the server's failure policy decides

AGENT_ADVICE: Mapping[str, str] = {  # ``fedcomm agent``: status code name -> what to do
    "UNAVAILABLE": "is `fedcomm sim serve` still running? Start every agent again once it is",
    "UNAUTHENTICATED": "pass this agent's token from the file the simulator serves with "
                       "(--tokens, or --token)",
    "NOT_FOUND": "check --agent-id",
    "DEADLINE_EXCEEDED": "another agent stopped answering; see its output, and run every agent "
                         "for the same --rounds",
    "ABORTED": "see the other agents' output and the simulator's log, then start every agent "
               "again",
    "ALREADY_EXISTS": "is another `fedcomm agent` already running as this agent? Start each "
                      "agent id once",
    "INVALID_ARGUMENT": "every agent of a round must declare the same routes, seed, comm_dim "
                        "and DP settings: start them all from the same checkpoint",
    "FAILED_PRECONDITION": "start every agent of the environment together, against a "
                           "simulator that is not running another round",
    "RESOURCE_EXHAUSTED": "serve fewer --num-envs: the simulator's message limit follows the "
                          "run's shapes",
    "join barrier": "another agent did not join; start every agent of the environment (one "
                    "`fedcomm agent` per agent id) within the simulator's --join-timeout of "
                    "each other",
    "truncated": "another agent left or broke the protocol: see its output and the "
                 "simulator's log, then start every agent of the environment again",
    "unreachable": "is `fedcomm sim serve` running there, and do the TLS settings match "
                   "(--tls-ca for a simulator serving TLS, none for an insecure one)? To wait "
                   "longer for it to come up, raise --connect-timeout",
}


def failure_line(who: str, e: Exception, sim: str,
                 advice: Mapping[str, str] = NODE_ADVICE) -> str:
    """One line for agent ``who``'s failed batch against the simulator at ``sim``."""
    def said(line: str, key: str) -> str:
        return line + (f"; {advice[key]}" if key in advice else "")

    if isinstance(e, PolicyRefusal):  # names the agent and the setting already
        return str(e)
    if isinstance(e, BatchTruncated):
        return said(f"{who}: the simulator ended the episode batch early: {e}", "truncated")
    if isinstance(e, ProtocolError):  # the simulator's data is malformed
        return (f"{who}: the simulator at {sim} sent an invalid message: {e}; do the "
                "simulator and this agent run the same fedcomm version?")
    if not isinstance(e, TransportError):
        return f"{who}: {type(e).__name__}: {e}"
    code, call = e.code.name, e.call or "call"
    if call == "Describe" and code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return said(f"{who}: cannot reach the simulator at {sim} ({code}: {e.details})",
                    "unreachable")
    line = f"{who}: the simulator refused the {call} ({code}: {e.details})"
    if code == "DEADLINE_EXCEEDED" and "join barrier" in e.details:
        return said(line, "join barrier")
    return said(line, code)
