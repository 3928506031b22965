"""``fedcomm simulate``: the federated system on one machine."""

from __future__ import annotations

import argparse

from fedcomm.commands.federated import run_federated
from fedcomm.commands.flags import EPSILON_OR_INF
from fedcomm.commands.options import add_federation, parser_of


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "simulate", help="the federated system on one machine (Flower + Ray)",
                  description="Run every agent as a Flower ClientApp on Flower's simulation "
                  "engine, the simulator on loopback and the ServerApp that aggregates the "
                  "shared communication module; write a run directory. With no arguments: "
                  "the embedded default, a speaker_listener team.")
    add_federation(p)
    p.add_argument("--agent-max-epsilon", type=EPSILON_OR_INF, metavar="E",
                   help="each agent's own privacy policy: the largest epsilon per unit it "
                   "accepts from the server (default: what the run promises; inf accepts any "
                   "run and sends metrics in the clear)")
    p.add_argument("--actors", type=int, metavar="N",
                   help="agents that run at once (Flower's pool of actors, about 0.5 GB each); "
                   "rounds go out in waves of whole sites that fit (default: as many as "
                   "Flower's engine runs at once here, CPU count + 4, at most 32)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="attach to this Ray cluster instead of starting one (auto: the one "
                   "`ray start --head` started here; docs/deployment.md)")
    p.add_argument("--sim-host", default="127.0.0.1", metavar="HOST",
                   help="the address the simulator listens on: one the actors on every node of "
                   "a Ray cluster reach (default: 127.0.0.1, this machine only; its channel is "
                   "not encrypted: docs/deployment.md)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fedcomm.clients.policy import PrivacyPolicy
    from fedcomm.modes.simulation import simulate

    def start(fed, out, plan):
        policy = PrivacyPolicy.of_run(fed)
        if args.agent_max_epsilon is not None:
            policy = replace(policy, max_epsilon=args.agent_max_epsilon)
        return simulate(fed, out, progress=not args.quiet, verbose=args.verbose, policy=policy,
                        plan=plan, actors=args.actors, ray_address=args.ray_address,
                        sim_host=args.sim_host)

    return run_federated(args, "simulate", start)
