"""``fedcomm worker``: an agent's long-lived worker beside its SuperNode (``clients.worker``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcomm.commands.options import parser_of


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "worker", help="keep an agent between a deployment's rounds",
                  description="Serve the SuperNode's ClientApp (fedcomm.clients.relay) on a "
                  "Unix socket that only this user can open, keeping the agent's models, "
                  "optimizer, simulator channel and ledger open between rounds. The node "
                  "config names the socket as worker-socket and the token file as "
                  "worker-token-file.")
    p.add_argument("--socket", type=Path, required=True,
                   help="the socket's path; its folder must be this user's alone (made 0700 "
                   "if new)")
    p.add_argument("--agent-id", help="serve only this agent's messages")
    p.add_argument("--token-file", type=Path,
                   help="answer only requests that carry the token in this file (the agent's "
                   "worker.token of `fedcomm deploy secrets`, named worker-token-file in the "
                   "node config); without it, any process of this user may ask")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcomm.clients.worker import run_worker

    run_worker(args.socket, args.agent_id, args.token_file)
    return 0
