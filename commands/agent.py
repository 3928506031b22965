"""``fedcomm agent``: one agent against a simulator over gRPC, without Flower.

The agent's model comes from a checkpoint; every round it runs one episode batch through the
same runtime a federated agent uses (``learning.party.Party`` with its privacy account): its
budget checked and its releases written to its ledger before they leave.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcomm.commands.flags import COUNT, EPSILON, NONNEGATIVE, SEED
from fedcomm.commands.options import add_device, parser_of
from fedcomm.commands.output import console


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "agent", help="run one agent against a simulator over gRPC",
                  description="Load an agent's model, then per round: join the episode "
                  "batch, step it, exchange DIAL feedback, update locally.")
    p.add_argument("--sim", required=True, metavar="ADDRESS",
                   help="the simulator's address, HOST:PORT")
    p.add_argument("--connect-timeout", type=NONNEGATIVE, default=30.0, metavar="SECONDS",
                   help="wait this long for the simulator to come up, retrying with backoff "
                   "(0: fail at once; default: %(default)g)")
    p.add_argument("--agent-id", required=True, metavar="ID")
    auth = p.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", help="this agent's token")
    auth.add_argument("--tokens", type=Path, help="token file; the agent's entry is used")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="team.pt (or a run directory) holding this agent's model")
    p.add_argument("--rounds", type=COUNT, default=1, metavar="N",
                   help="episode batches to run (default: %(default)s)")
    p.add_argument("--no-update", action="store_true", help="roll out and exchange only")
    p.add_argument("--seed", type=SEED, default=0, metavar="N",
                   help="the seed of the agent's own stream (default: %(default)s)")
    add_device(p)
    p.add_argument("--tls-ca", type=Path, help="CA of the simulator's certificate: enables TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mutual TLS)")
    p.add_argument("--dump", type=Path, help="write each round's data here (for audits, tests)")
    p.add_argument("--save", type=Path, help="write the updated model here")
    p.add_argument("--ledger", type=Path,
                   help="the agent's privacy ledger (default: <agent-id>.ledger.jsonl)")
    p.add_argument("--epsilon-budget", type=EPSILON, metavar="E",
                   help="epsilon budget per privacy unit (default: none)")
    p.add_argument("--privacy-unit", choices=["episode", "history"], default="episode",
                   help="(default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from dataclasses import asdict

    # gRPC's core would log each failed connection attempt on stderr while the agent waits for
    # the simulator; the agent says once what failed. GRPC_VERBOSITY=INFO shows them again.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    import torch
    from rich.markup import escape

    from fedcomm.clients.failures import AGENT_ADVICE, failure_line
    from fedcomm.clients.grpc_transport import ClientTls, GrpcTransport, TransportError
    from fedcomm.device import resolve_device
    from fedcomm.learning.party import Party
    from fedcomm.learning.transport import BatchTruncated
    from fedcomm.models.team import load_team
    from fedcomm.privacy.config import PrivacyConfig
    from fedcomm.protocol.auth import read_tokens
    from fedcomm.protocol.codec import ProtocolError
    from fedcomm.releases.account import AgentPrivacy
    from fedcomm.releases.schedule import composition_for

    device = resolve_device(args.device)
    team = load_team(args.checkpoint, device)
    if args.agent_id not in team.spec.agent_ids:
        raise ValueError(f"the checkpoint's {team.spec.name} has no agent {args.agent_id!r}")
    index = team.spec.agent_ids.index(args.agent_id)
    party_team = team.subteam([index]) if team.agents != (index,) else team
    party_team = party_team.in_own_site()  # as the simulator serves it: its site's agents
    token = args.token or read_tokens(args.tokens).get(args.agent_id)
    if not token:
        raise ValueError(f"no token for {args.agent_id} in {args.tokens}")
    tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None

    def waiting(e: TransportError) -> None:
        console.print(f"waiting for the simulator at {escape(args.sim)} (up to "
                      f"{args.connect_timeout:g} s)", soft_wrap=True, highlight=False)

    transport = privacy = None
    try:
        transport = GrpcTransport(args.sim, team.spec, args.agent_id, token, team.cfg, tls,
                                  connect_timeout=args.connect_timeout, on_wait=waiting,
                                  device=device)
        cfg = PrivacyConfig(unit=args.privacy_unit, epsilon_budget=args.epsilon_budget)
        training = "none" if args.no_update else "plain"
        privacy = AgentPrivacy(args.agent_id, index, team.spec, team.cfg, cfg,
                               args.ledger or Path(f"{args.agent_id}.ledger.jsonl"),
                               {"team": asdict(team.cfg), "privacy": asdict(cfg),
                                "training": training},
                               device=device, composition=composition_for(training),
                               episodes=transport.num_envs)
        party = Party(party_team, transport, seed=args.seed, account=privacy)
        for r in range(args.rounds):
            record = party.train_batch(round=r, batch=privacy.next_batch,
                                       routes=party_team.kept_routes(),
                                       update=not args.no_update)
            console.print(f"{args.agent_id} round {transport.round}: return "
                          f"{record.stats['return_mean']:.3f}"
                          + ("" if record.spoke else " (silent: privacy budget spent)"))
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                torch.save({"rollout": asdict(record.rollout), "sent": record.sent,
                            "senders": record.senders, "received": record.received,
                            "round": transport.round, "index": r},
                           args.dump / f"{args.agent_id}-{r}.pt")
    except (TransportError, BatchTruncated, ProtocolError) as e:
        line = failure_line(args.agent_id, e, args.sim, AGENT_ADVICE)
        console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
        return 1
    finally:
        if transport is not None:
            transport.close()
        if privacy is not None:
            privacy.close()
    if args.save:
        party_team.save(args.save)
    return 0
