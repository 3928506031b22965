"""``fedcomm deploy``: every party its own process (``local``), or the pieces for many hosts
(``secrets``, ``app``, ``manifests``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcomm.commands.federated import run_federated
from fedcomm.commands.options import (
    add_env,
    add_federation,
    env_options,
    env_spec_of,
    federation_config_from_args,
    parser_of,
)
from fedcomm.commands.output import console
from fedcomm.commands.sites import add_sites


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "deploy", help="the deployment: every party its own process",
                  description="Run the parties as separate processes with Flower's "
                  "SuperLink and SuperNodes (docs/deployment.md).")
    d = p.add_subparsers(dest="deploy_command", required=True)
    loc = parser_of(d, "local", help="every party its own process on this host",
                    description="Make certificates, tokens and SuperNode keys; start the "
                    "SuperLink (TLS, node authentication), the simulator (mutual TLS) and "
                    "one SuperNode per agent on loopback; flwr run the federation; write "
                    "the same run directory as fedcomm simulate; stop every process.")
    add_federation(loc)
    loc.add_argument("--no-restart", action="store_true",
                     help="do not restart an agent's SuperNode or worker that dies")
    loc.add_argument("--no-worker", action="store_true",
                     help="run each agent in the ClientApp process Flower starts per message "
                     "(slower: it is opened and restored every round) instead of in a "
                     "long-lived worker beside its SuperNode")
    loc.set_defaults(func=run_local)
    s = parser_of(d, "secrets", help="make every certificate, key and token of a deployment",
                  description="A CA, server certificates for the SuperLink and the "
                  "simulator, and per agent: a client certificate, a SuperNode key pair, "
                  "a simulator token, a worker token and a server key. Hand each host its "
                  "own folder.")
    add_env(s, default="speaker_listener")
    add_sites(s, federated=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--superlink-host", action="append", default=[], metavar="NAME",
                   help="a name or IP agents reach the SuperLink by (repeatable)")
    s.add_argument("--sim-host", action="append", default=[], metavar="NAME",
                   help="a name or IP agents reach the simulator by (repeatable)")
    s.set_defaults(func=run_secrets)
    a = parser_of(d, "app", help="write the Flower app directory of a run for flwr run",
                  description="Write APP_DIR/pyproject.toml: the ServerApp and ClientApp "
                  "of the installed fedcomm, and this run's configuration.")
    add_federation(a)
    a.add_argument("app_dir", type=Path)
    a.add_argument("--run-dir", required=True,
                   help="where the ServerApp writes the run directory (SuperLink's host)")
    a.add_argument("--agent-keys", required=True,
                   help="the agents' server keys on the SuperLink's host (superlink/"
                   "agent-keys.json of fedcomm deploy secrets)")
    a.set_defaults(func=run_app)
    m = parser_of(d, "manifests", help="write the Compose file and Kubernetes manifests of a run",
                  description="Write DIR/compose/compose.yaml and DIR/k8s/ (as deploy/compose "
                  "and deploy/k8s, which are those of the 3-agent factory) for the agents of "
                  "this environment: a SuperNode and a worker per agent, the simulator and the "
                  "submission of this environment. Run it from the folder where `fedcomm "
                  "deploy secrets --out secrets` runs: the Compose file finds the secrets and "
                  "the build context there.")
    add_env(m, default="speaker_listener")
    add_sites(m, federated=True)
    m.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the folder to write them in (its compose/ and k8s/)")
    m.set_defaults(func=run_manifests)


def run_local(args: argparse.Namespace) -> int:
    from fedcomm.deploy.local import deploy_local

    return run_federated(args, "deploy local", lambda fed, out, plan: deploy_local(
        fed, out, progress=not args.quiet, restart_agents=not args.no_restart,
        console=console, worker=not args.no_worker, plan=plan))


def run_secrets(args: argparse.Namespace) -> int:
    from fedcomm.deploy.secrets import LOOPBACK, make_secrets

    spec = env_spec_of(args)
    make_secrets(args.out, spec.agent_ids, [*args.superlink_host, *LOOPBACK],
                 [*args.sim_host, *LOOPBACK])
    console.print(f"wrote the CA, SuperLink and simulator certificates and, for "
                  f"{', '.join(spec.agent_ids)}, certificates, SuperNode keys and tokens to "
                  f"{args.out}")
    return 0


def run_app(args: argparse.Namespace) -> int:
    from fedcomm.deploy.flower_app import write_app

    if args.resume:
        raise ValueError("to continue a run, submit its app again: the ServerApp goes on from "
                         "the checkpoint in its --run-dir")
    fed = federation_config_from_args(args)
    write_app(args.app_dir, fed.to_json(), args.run_dir, args.agent_keys)
    console.print(f"wrote {args.app_dir / 'pyproject.toml'}: flwr run {args.app_dir} "
                  "<federation> --stream")
    return 0


def run_manifests(args: argparse.Namespace) -> int:
    from fedcomm.deploy.manifests import write_manifests

    agent_ids, written = write_manifests(args.out, args.env, env_options(args))
    console.print(f"wrote {args.out / 'compose' / 'compose.yaml'} and {len(written) - 1} "
                  f"files under {args.out / 'k8s'} for {', '.join(agent_ids)}", soft_wrap=True,
                  highlight=False)
    return 0
