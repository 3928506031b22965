"""``fedcomm sim serve`` and ``fedcomm sim tokens``: the simulator, on its own."""

from __future__ import annotations

import argparse
import os
import secrets
import stat
from pathlib import Path

from fedcomm.commands.flags import COUNT, PORT, POSITIVE, SEED
from fedcomm.commands.options import add_device, add_env, env_options, env_spec_of, parser_of
from fedcomm.commands.output import console
from fedcomm.sim.limits import DEFAULT_MAX_COMM_DIM


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "sim", help="the simulator: the joint environment and the router")
    sim = p.add_subparsers(dest="sim_command", required=True)
    s = parser_of(sim, "serve", help="serve the joint environment over gRPC",
                  description="Host the fedcomm.v1 JointEnvironment service: agents join "
                  "episode batches, step them over a stream, and exchange DIAL feedback.")
    add_env(s)
    s.add_argument("--num-envs", type=COUNT, default=256, metavar="N",
                   help="parallel environments per batch (default: %(default)s)")
    s.add_argument("--seed", type=SEED, default=0, metavar="N",
                   help="a batch whose agents declare no label is labelled seed + its round "
                   "(default: %(default)s)")
    s.add_argument("--episode-key", type=Path,
                   help="the secret that keys every batch's seed (32 bytes or more, mode 0600); "
                   "made there if missing. Default: a fresh one, held in memory only")
    s.add_argument("--comm-dim", type=COUNT, default=DEFAULT_MAX_COMM_DIM, metavar="N",
                   help="the largest comm_dim an agent may declare; it sizes the message limit "
                   "(default: %(default)s)")
    add_device(s)
    s.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    s.add_argument("--port", type=PORT, default=50051, metavar="PORT",
                   help="0 picks a free port (default: %(default)s)")
    s.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    s.add_argument("--tokens", type=Path, required=True,
                   help="JSON {agent_id: token} (see `fedcomm sim tokens`)")
    s.add_argument("--run-id", default="fedcomm", metavar="ID",
                   help="the run's name agents must join (default: %(default)s)")
    s.add_argument("--tls-cert", type=Path, help="server certificate (PEM): enables TLS")
    s.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    s.add_argument("--tls-client-ca", type=Path, help="require client certificates from this CA")
    for name, default, what in (("join", 60.0, "every agent of a batch to join"),
                                ("step", 30.0, "every agent's actions of a step"),
                                ("feedback", 60.0, "every receiver's feedback of a batch")):
        s.add_argument(f"--{name}-timeout", type=POSITIVE, default=default, metavar="SECONDS",
                       help=f"seconds to wait for {what} (default: %(default)g)")
    s.set_defaults(func=run_serve)
    t = parser_of(sim, "tokens", help="write a fresh token per agent of an environment")
    add_env(t)
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=run_tokens)


def run_tokens(args: argparse.Namespace) -> int:
    from fedcomm.protocol.auth import generate_tokens, write_tokens

    spec = env_spec_of(args)
    write_tokens(args.out, generate_tokens(spec.agent_ids))
    console.print(f"wrote tokens for {', '.join(spec.agent_ids)} to {args.out}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from rich.logging import RichHandler

    from fedcomm.protocol.auth import read_tokens
    from fedcomm.sim.serve import ServerTls, serve_forever
    from fedcomm.sim.service import SimConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    env_spec_of(args)  # the environment, checked before a key is made
    tokens = read_tokens(args.tokens)
    keyed = {"episode_key": episode_key(args.episode_key)} if args.episode_key else {}
    cfg = SimConfig(env=args.env, env_kwargs=env_options(args), num_envs=args.num_envs,
                    seed=args.seed, run_id=args.run_id, tokens=tokens,
                    max_comm_dim=args.comm_dim, join_timeout=args.join_timeout,
                    step_timeout=args.step_timeout, feedback_timeout=args.feedback_timeout,
                    device=args.device, **keyed)

    def announce(port: int) -> None:
        if args.port_file:
            args.port_file.write_text(str(port))
        console.print(f"[bold]fedcomm sim[/] serving {cfg.env} x {cfg.num_envs} on "
                      f"{args.host}:{port} ({'TLS' if tls else 'insecure'}"
                      f"{', mutual' if args.tls_client_ca else ''})")

    serve_forever(cfg, args.host, args.port, tls, on_start=announce)
    return 0


def episode_key(path: Path) -> bytes:
    """The episode key in ``path``, or a fresh one written there (mode 0600) if it does not
    exist. A key that others could read, or one too short, is refused: whoever reads it can
    regenerate every agent's private observations."""
    from fedcomm.files import write_private
    from fedcomm.sim.episodes import KEY_BYTES

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        key = secrets.token_bytes(KEY_BYTES)
        write_private(path, key)
        return key
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"the episode key {path} is not a regular file")
        if mode & 0o077:
            raise ValueError(f"the episode key {path} is open to group or others (mode "
                             f"{stat.S_IMODE(mode):o}): chmod 600 it, or make a new one")
        key = f.read()
    if len(key) < KEY_BYTES:
        raise ValueError(f"the episode key {path} holds {len(key)} bytes; it needs at least "
                         f"{KEY_BYTES}")
    return key
