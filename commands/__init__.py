"""The ``fedcomm`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedcomm.config import TrainConfig

console = Console(stderr=True)
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam")


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _default_out(env: str) -> Path:
    return Path("runs") / f"{env.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where tensors live: auto picks a CUDA GPU if torch sees one "
                   "(default: %(default)s)")


def _add_env_args(p: argparse.ArgumentParser, default: str = "factory") -> None:
    p.add_argument("--env", default=default,
                   help="factory, speaker_listener, platoon, mpe2:<name> (default: %(default)s)")
    p.add_argument("--env-opt", type=_key_value, action="append", default=[], metavar="K=V",
                   help="environment option, e.g. --env-opt n_actuators=4 (repeatable)")


# -- fedcomm train ----------------------------------------------------------------------------
def _add_training_args(p: argparse.ArgumentParser, default_env: str = "factory") -> None:
    """Options shared by the centralized trainer and the federated simulation."""
    _add_env_args(p, default_env)
    p.add_argument("--out", type=Path, help="run directory (default: runs/<env>-<time>)")
    p.add_argument("--seed", type=int, default=0)
    _add_device_arg(p)
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="the environment's settings for a CPU or for a GPU (more environments "
                   "and minibatches); auto: the GPU preset on a CUDA device "
                   "(default: %(default)s)")
    p.add_argument("--num-envs", type=int, help="parallel environments per episode batch")
    p.add_argument("--env-steps", type=int, help="training budget in environment steps")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    p.add_argument("--noise", type=float, help="channel noise multiplier sigma (std = sigma*C)")
    p.add_argument("--clip", type=float, help="clip norm C of every knowledge vector")
    p.add_argument("--no-comm", action="store_true", help="deliver no vectors (ablation)")
    p.add_argument("--recurrent", action="store_true", help="give each agent a GRU state")
    p.add_argument("--accumulate", action="store_true",
                   help="receivers hear each sender's running mean over the episode")
    p.add_argument("--encoder", choices=["mlp", "superposition"])
    p.add_argument("--hidden", type=int)
    p.add_argument("--comm-dim", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--minibatches", type=int)
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("privacy (docs/privacy.md)")
    g.add_argument("--message-epsilon", type=float,
                   help="calibrate the channel noise so one episode's vectors cost this epsilon")
    g.add_argument("--feedback-epsilon", type=float,
                   help="calibrate the feedback noise to this epsilon per episode")
    g.add_argument("--update-epsilon", type=float,
                   help="calibrate DP-SGD of a federated agent's update to this epsilon per "
                   "episode (turns DP-SGD on)")
    g.add_argument("--epsilon-budget", type=float,
                   help="each agent's epsilon budget per privacy unit (default: none)")
    g.add_argument("--delta", type=float, help="delta of every epsilon (default: 1e-5)")
    g.add_argument("--privacy-unit", choices=["episode", "history"],
                   help="one episode of one agent (default), or its whole history in the run")
    g.add_argument("--relation", choices=["replace_one", "add_remove"],
                   help="neighbouring relation (default: replace_one, sensitivity 2C)")
    g.add_argument("--accountant", choices=["rdp", "pld", "prv"], help="default: rdp")
    g.add_argument("--on-budget-spent", choices=["silent", "stop"],
                   help="an agent out of budget goes silent (default) or stops the run")
    g.add_argument("--update-noise", type=float,
                   help="DP-SGD noise multiplier of a federated agent's update (default: off)")
    g.add_argument("--update-clip", type=float, help="DP-SGD per-episode clip norm (default 1)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="centralized reference trainer (all agents, one graph)",
                       description="Train every agent in one process with PPO and gradients "
                       "through the channel; write a run directory with metrics, summary, "
                       "checkpoint and plots.")
    _add_training_args(p)
    p.set_defaults(func=_run_train)


def train_config_from_args(args: argparse.Namespace, base: TrainConfig | None = None
                           ) -> TrainConfig:
    from fedcomm.presets import preset, preset_kind

    cfg = base or preset(args.env, preset_kind(args.preset, args.device))
    if args.env_opt:
        cfg.env_kwargs = {**cfg.env_kwargs, **dict(args.env_opt)}
    top = {"seed": args.seed, "device": args.device, "num_envs": args.num_envs,
           "env_steps": args.env_steps,
           "time_budget": args.time_budget, "eval_episodes": args.eval_episodes}
    team = {"noise_multiplier": args.noise, "clip": args.clip, "encoder": args.encoder,
            "hidden": args.hidden, "comm_dim": args.comm_dim,
            "feedback_noise_multiplier": getattr(args, "feedback_noise", None),
            "feedback_clip": getattr(args, "feedback_clip", None)}
    ppo = {"lr": args.lr, "epochs": args.epochs, "minibatches": args.minibatches}
    if args.no_comm:
        team["communicate"] = False
    if args.recurrent:
        team["recurrent"] = True
    if args.accumulate:
        team["accumulate"] = True

    privacy = {"message_epsilon": args.message_epsilon, "epsilon_budget": args.epsilon_budget,
               "feedback_epsilon": args.feedback_epsilon, "update_epsilon": args.update_epsilon,
               "delta": args.delta, "unit": args.privacy_unit, "relation": args.relation,
               "accountant": args.accountant, "on_exhausted": args.on_budget_spent,
               "update_noise_multiplier": args.update_noise, "update_clip": args.update_clip}
    cfg = replace(cfg, **_given(top), team=replace(cfg.team, **_given(team)),
                  ppo=replace(cfg.ppo, **_given(ppo)),
                  privacy=replace(cfg.privacy, **_given(privacy)))
    for noise, target in (("noise", "message_epsilon"), ("feedback_noise", "feedback_epsilon"),
                          ("update_noise", "update_epsilon")):
        if getattr(args, noise, None) is not None and getattr(args, target) is not None:
            raise ValueError(f"give --{noise.replace('_', '-')} or "
                             f"--{target.replace('_', '-')}, not both")
    from fedcomm.clients.privacy import calibrated

    team_cfg, privacy_cfg = calibrated(cfg.team, cfg.ppo, cfg.privacy,
                                       _spec(cfg.env, cfg.env_kwargs))
    return replace(cfg, team=team_cfg, privacy=privacy_cfg)


def _given(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _run_train(args: argparse.Namespace) -> int:
    from fedcomm.modes.centralized import train

    cfg = train_config_from_args(args)
    out = args.out or _default_out(cfg.env)
    console.print(f"[bold]fedcomm train[/] {cfg.env} -> {out}")
    result = train(cfg, out, progress=not args.quiet)
    _print_result(f"{cfg.env}: mean return per agent over {cfg.eval_episodes} episodes",
                  result.final, result.baselines, result.summary)
    console.print(f"run directory: {result.run_dir}")
    return 0


def _print_result(title: str, final, baselines: dict, summary: dict) -> None:
    table = Table(title=title)
    table.add_column("team")
    table.add_column("return", justify="right")
    table.add_column("± s.e.", justify="right")
    for name, res in [("trained", final), *baselines.items()]:
        table.add_row(name, f"{res.return_mean:.3f}", f"{res.return_se:.3f}")
    console.print(table)
    s = summary
    console.print(f"{_gap_closed(s)}; {s['env_steps']:,} env steps in {s['train_time_s']:.0f} s "
                  f"({s['agent_steps_per_s']:,.0f} agent-steps/s)")
    if "privacy" in s:
        p = s["privacy"]
        per = ", ".join(f"{k} {_eps(v)}" for k, v in p["epsilon"].items())
        console.print(f"privacy, largest over agents (per {p['unit']}, "
                      f"{p['relation'].replace('_', '-')}, delta {p['delta']:g}): {per}; "
                      f"composed {_eps(p['composed'])}; "
                      f"{'within budget' if p['within_budget'] else '[red]OVER BUDGET[/]'}; "
                      f"details in privacy_report.html", highlight=False)
    if "stopped" in s:
        console.print(f"[yellow]{s['stopped']}[/]")


def _gap_closed(summary: dict) -> str:
    """The share of the no_comm -> oracle gap closed, or why there is none to report."""
    if summary.get("gap_closed") is not None:
        return f"gap closed (no_comm -> oracle): {summary['gap_closed']:.1%}"
    missing = [m for m in summary.get("missing_baselines", []) if m in ("no_comm", "oracle")]
    if missing:
        return (f"gap closed: n/a ({summary['env']} has no scripted "
                f"{'/'.join(missing)} team)")
    return "gap closed: n/a (no_comm and oracle score the same)"


def _eps(value: float | str | None) -> str:
    value = float("inf") if value in (None, "inf") else float(value)
    return "inf (no DP)" if value == float("inf") else f"epsilon {value:.3g}"


# -- fedcomm simulate -------------------------------------------------------------------------
def _add_federation_args(p: argparse.ArgumentParser) -> None:
    """Options of a federated run, simulated or deployed."""
    _add_training_args(p, default_env="speaker_listener")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint (its own config)")
    p.add_argument("--batches-per-round", type=int,
                   help="episode batches each agent trains on between aggregations")
    p.add_argument("--strategy", choices=STRATEGY_NAMES, help="aggregation (default: fedavg)")
    p.add_argument("--server-lr", type=float, help="server learning rate (fedavgm, fedadam)")
    p.add_argument("--server-momentum", type=float, help="server momentum (fedavgm)")
    p.add_argument("--aggregate-private", action="store_true",
                   help="also average each type's private networks (weaker privacy)")
    p.add_argument("--on-agent-failure", choices=["stop", "continue"],
                   help="a round with a failed agent stops the run (default), or the round is "
                   "run again once every agent is back")
    p.add_argument("--feedback-noise", type=float, help="feedback noise multiplier")
    p.add_argument("--feedback-clip", type=float, help="per-episode clip norm of feedback")
    p.add_argument("--round-timeout", type=float,
                   help="seconds for every reply of a round (default: 900)")
    p.add_argument("--node-timeout", type=float,
                   help="seconds for every agent's node to connect (default: 120)")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="the federated system on one machine (Flower + Ray)",
                       description="Run every agent as a Flower ClientApp on Flower's "
                       "simulation engine, the simulator on loopback and the ServerApp that "
                       "aggregates the shared communication module; write a run directory. "
                       "With no arguments: the embedded default, a speaker_listener team.")
    _add_federation_args(p)
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(func=_run_simulate)


def federation_config_from_args(args: argparse.Namespace):
    from fedcomm.presets import federation_preset, preset_kind

    base = federation_preset(args.env, preset_kind(args.preset, args.device))
    train = train_config_from_args(args, base.train)
    fed = {"batches_per_round": args.batches_per_round, "strategy": args.strategy,
           "server_lr": args.server_lr, "server_momentum": args.server_momentum,
           "on_agent_failure": args.on_agent_failure, "round_timeout": args.round_timeout,
           "node_timeout": args.node_timeout,
           "aggregate_private": args.aggregate_private or None}
    return replace(base, train=train, **_given(fed))


def _exit_if_stranded(code: int) -> None:
    """Exit now if threads of the simulation engine outlived it.

    After an interrupted run Flower's message threads stay blocked on Ray actors that are
    already gone, and the interpreter would wait for them at exit forever. Everything of the
    run is on disk and every process it started is stopped by then.
    """
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_federated(args: argparse.Namespace, command: str, run) -> int:
    """A federated run, simulated or deployed: ``run(fed, out)`` returns its result."""
    from fedcomm.config import FederationConfig
    from fedcomm.server.federation import FederationError

    if args.resume:
        config = args.resume / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"no config.json in {args.resume}: is it a run directory "
                                    f"of fedcomm {command}?")
        fed = FederationConfig.from_dict(json.loads(config.read_text()))
        out = args.resume
    else:
        fed = federation_config_from_args(args)
        out = args.out or _default_out(fed.train.env)
    n = len(_spec(fed.train.env, fed.train.env_kwargs).agent_ids)
    console.print(f"[bold]fedcomm {command}[/] {fed.train.env}, {n} agents, {fed.rounds} rounds "
                  f"of {fed.batches_per_round} batches ({fed.strategy}) -> {out}")
    try:
        result = run(fed, out)
    except FederationError as e:  # a deployment's failures too
        console.print(f"[red]error:[/] {e}", soft_wrap=True, highlight=False)
        console.print(f"the run directory keeps every committed round: continue it with "
                      f"fedcomm {command} --resume {out}", highlight=False)
        _exit_if_stranded(1)
        return 1
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: continue with fedcomm {command} --resume {out}",
                      highlight=False)
        _exit_if_stranded(130)
        return 130
    _print_result(f"{fed.train.env}: federated, mean return per agent over "
                  f"{result.final.episodes} episodes", result.final, result.baselines,
                  result.summary)
    console.print(f"run directory: {result.run_dir}")
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    from fedcomm.modes.simulation import simulate

    return _run_federated(args, "simulate", lambda fed, out: simulate(
        fed, out, progress=not args.quiet, verbose=args.verbose))


# -- fedcomm deploy ---------------------------------------------------------------------------
def _add_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="the deployment: every party its own process",
                       description="Run the parties as separate processes with Flower's "
                       "SuperLink and SuperNodes (docs/deployment.md).")
    d = p.add_subparsers(dest="deploy_command", required=True)
    loc = d.add_parser("local", help="every party its own process on this host",
                       description="Make certificates, tokens and SuperNode keys; start the "
                       "SuperLink (TLS, node authentication), the simulator (mutual TLS) and "
                       "one SuperNode per agent on loopback; flwr run the federation; write "
                       "the same run directory as fedcomm simulate; stop every process.")
    _add_federation_args(loc)
    loc.add_argument("--no-restart", action="store_true",
                     help="do not restart an agent's SuperNode that dies")
    loc.set_defaults(func=_run_deploy_local)
    s = d.add_parser("secrets", help="make every certificate, key and token of a deployment",
                     description="A CA, server certificates for the SuperLink and the "
                     "simulator, and per agent: a client certificate, a SuperNode key pair and "
                     "a token. Hand each host its own folder.")
    _add_env_args(s, default="speaker_listener")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--superlink-host", action="append", default=[], metavar="NAME",
                   help="a name or IP agents reach the SuperLink by (repeatable)")
    s.add_argument("--sim-host", action="append", default=[], metavar="NAME",
                   help="a name or IP agents reach the simulator by (repeatable)")
    s.set_defaults(func=_run_deploy_secrets)
    a = d.add_parser("app", help="write the Flower app directory of a run for flwr run",
                     description="Write APP_DIR/pyproject.toml: the ServerApp and ClientApp "
                     "of the installed fedcomm, and this run's configuration.")
    _add_federation_args(a)
    a.add_argument("app_dir", type=Path)
    a.add_argument("--run-dir", required=True,
                   help="where the ServerApp writes the run directory (SuperLink's host)")
    a.set_defaults(func=_run_deploy_app)


def _run_deploy_local(args: argparse.Namespace) -> int:
    from fedcomm.deploy.local import deploy_local

    return _run_federated(args, "deploy local", lambda fed, out: deploy_local(
        fed, out, progress=not args.quiet, restart_agents=not args.no_restart,
        console=console))


def _run_deploy_secrets(args: argparse.Namespace) -> int:
    from fedcomm.deploy.secrets import LOOPBACK, make_secrets

    spec = _env_spec(args)
    make_secrets(args.out, spec.agent_ids, [*args.superlink_host, *LOOPBACK],
                 [*args.sim_host, *LOOPBACK])
    console.print(f"wrote the CA, SuperLink and simulator certificates and, for "
                  f"{', '.join(spec.agent_ids)}, certificates, SuperNode keys and tokens to "
                  f"{args.out}")
    return 0


def _run_deploy_app(args: argparse.Namespace) -> int:
    from fedcomm.deploy.flower_app import write_app

    if args.resume:
        raise ValueError("to continue a run, submit its app again: the ServerApp goes on from "
                         "the checkpoint in its --run-dir")
    fed = federation_config_from_args(args)
    write_app(args.app_dir, fed.to_json(), args.run_dir)
    console.print(f"wrote {args.app_dir / 'pyproject.toml'}: flwr run {args.app_dir} "
                  "<federation> --stream")
    return 0


# -- fedcomm eval -----------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on an environment",
                       description="Evaluate a run's checkpoint (greedy actions, channel noise "
                       "on). --env mpe2:<name> runs the original mpe2 environment.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--env", help="environment (default: the one the run trained on)")
    p.add_argument("--env-opt", type=_key_value, action="append", default=[], metavar="K=V")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    _add_device_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from fedcomm.clients.evaluate import evaluate_team
    from fedcomm.device import resolve_device
    from fedcomm.models.team import load_team

    team = load_team(args.run_dir, resolve_device(args.device))
    config = json.loads((args.run_dir / "config.json").read_text())
    trained = config["train"] if config.get("mode") == "federated" else config
    env = args.env or trained["env"]
    env_kwargs = (dict(args.env_opt) if args.env
                  else {**trained["env_kwargs"], **dict(args.env_opt)})
    batch = 100 if env.startswith("mpe2:") else 1000
    result = evaluate_team(team, env, args.episodes, args.seed, batch=batch, env_kwargs=env_kwargs)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(f"{env}: return {result.return_mean:.3f} ± {result.return_se:.3f} "
                      f"(s.e., {result.episodes} episodes)")
    return 0


# -- fedcomm sim serve / sim tokens ----------------------------------------------------------
def _add_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="the simulator: the joint environment and the router")
    sim = p.add_subparsers(dest="sim_command", required=True)
    s = sim.add_parser("serve", help="serve the joint environment over gRPC",
                       description="Host the fedcomm.v1 JointEnvironment service: agents join "
                       "episode batches, step them over a stream, and exchange DIAL feedback.")
    _add_env_args(s)
    s.add_argument("--num-envs", type=int, default=256, help="parallel environments per batch")
    s.add_argument("--seed", type=int, default=0, help="round r resets with seed + r")
    _add_device_arg(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    s.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    s.add_argument("--tokens", type=Path, required=True,
                   help="JSON {agent_id: token} (see `fedcomm sim tokens`)")
    s.add_argument("--run-id", default="fedcomm")
    s.add_argument("--tls-cert", type=Path, help="server certificate (PEM): enables TLS")
    s.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    s.add_argument("--tls-client-ca", type=Path, help="require client certificates from this CA")
    s.add_argument("--join-timeout", type=float, default=60.0)
    s.add_argument("--step-timeout", type=float, default=30.0)
    s.add_argument("--feedback-timeout", type=float, default=60.0)
    s.add_argument("--max-message-mb", type=float, default=64.0)
    s.set_defaults(func=_run_sim_serve)
    t = sim.add_parser("tokens", help="write a fresh token per agent of an environment")
    _add_env_args(t)
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=_run_sim_tokens)


def _spec(env: str, env_kwargs: dict):
    from fedcomm.sim.registry import make_env

    return make_env(env, 1, **env_kwargs).spec


def _env_spec(args: argparse.Namespace):
    return _spec(args.env, dict(args.env_opt))


def _run_sim_tokens(args: argparse.Namespace) -> int:
    from fedcomm.protocol.auth import generate_tokens, write_tokens

    spec = _env_spec(args)
    write_tokens(args.out, generate_tokens(spec.agent_ids))
    console.print(f"wrote tokens for {', '.join(spec.agent_ids)} to {args.out}")
    return 0


def _run_sim_serve(args: argparse.Namespace) -> int:
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
    cfg = SimConfig(env=args.env, env_kwargs=dict(args.env_opt), num_envs=args.num_envs,
                    seed=args.seed, run_id=args.run_id, tokens=read_tokens(args.tokens),
                    join_timeout=args.join_timeout, step_timeout=args.step_timeout,
                    feedback_timeout=args.feedback_timeout,
                    max_message_bytes=int(args.max_message_mb * 2**20), device=args.device)

    def announce(port: int) -> None:
        if args.port_file:
            args.port_file.write_text(str(port))
        console.print(f"[bold]fedcomm sim[/] serving {cfg.env} x {cfg.num_envs} on "
                      f"{args.host}:{port} ({'TLS' if tls else 'insecure'}"
                      f"{', mutual' if args.tls_client_ca else ''})")

    serve_forever(cfg, args.host, args.port, tls, on_start=announce)
    return 0


# -- fedcomm agent ----------------------------------------------------------------------------
def _add_agent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run one agent against a simulator over gRPC",
                       description="Load an agent's model, then per round: join the episode "
                       "batch, step it, exchange DIAL feedback, update locally.")
    p.add_argument("--sim", required=True, help="simulator address HOST:PORT")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="wait this long for the simulator to come up, retrying with backoff "
                   "(0: fail at once)")
    p.add_argument("--agent-id", required=True)
    auth = p.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", help="this agent's token")
    auth.add_argument("--tokens", type=Path, help="token file; the agent's entry is used")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="team.pt (or a run directory) holding this agent's model")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-update", action="store_true", help="roll out and exchange only")
    p.add_argument("--seed", type=int, default=0)
    _add_device_arg(p)
    p.add_argument("--tls-ca", type=Path, help="CA of the simulator's certificate: enables TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mutual TLS)")
    p.add_argument("--dump", type=Path, help="write each round's data here (for audits, tests)")
    p.add_argument("--save", type=Path, help="write the updated model here")
    p.add_argument("--ledger", type=Path,
                   help="the agent's privacy ledger (default: <agent-id>.ledger.jsonl)")
    p.add_argument("--epsilon-budget", type=float, help="epsilon budget per privacy unit")
    p.add_argument("--privacy-unit", choices=["episode", "history"], default="episode")
    p.set_defaults(func=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    import os
    from dataclasses import asdict

    # gRPC's core would log each failed connection attempt on stderr while the agent waits for
    # the simulator; the agent says once what failed. GRPC_VERBOSITY=INFO shows them again.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    import torch
    from rich.markup import escape

    from fedcomm.clients.grpc_transport import ClientTls, GrpcTransport, TransportError
    from fedcomm.clients.party import Party
    from fedcomm.clients.privacy import AgentPrivacy
    from fedcomm.clients.transport import BatchTruncated
    from fedcomm.device import resolve_device
    from fedcomm.models.team import load_team
    from fedcomm.privacy.config import PrivacyConfig
    from fedcomm.protocol.auth import read_tokens
    from fedcomm.protocol.codec import ProtocolError

    device = resolve_device(args.device)
    team = load_team(args.checkpoint, device)
    if args.agent_id not in team.spec.agent_ids:
        raise ValueError(f"the checkpoint's {team.spec.name} has no agent {args.agent_id!r}")
    index = team.spec.agent_ids.index(args.agent_id)
    party_team = team.subteam([index]) if team.agents != (index,) else team
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
        party = Party(party_team, transport, seed=args.seed)
        cfg = PrivacyConfig(unit=args.privacy_unit, epsilon_budget=args.epsilon_budget)
        privacy = AgentPrivacy(args.agent_id, index, team.spec, team.cfg, cfg,
                               args.ledger or Path(f"{args.agent_id}.ledger.jsonl"),
                               {"team": asdict(team.cfg), "privacy": asdict(cfg)},
                               device=device)
        for r in range(args.rounds):
            batch = len(privacy.ledger.entries) and privacy.ledger.entries[-1]["batch"] + 1
            routes = party_team.kept_routes()
            speaks = privacy.spend(privacy.batch_releases(routes), round=r, batch=batch)
            record = party.run_batch(update=not args.no_update, routes=routes,
                                     silent=not speaks, noise=privacy.noise)
            console.print(f"{args.agent_id} round {transport.round}: return "
                          f"{record.stats['return_mean']:.3f}"
                          + ("" if speaks else " (silent: privacy budget spent)"))
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                torch.save({"rollout": asdict(record.rollout), "sent": record.sent,
                            "senders": record.senders, "received": record.received,
                            "round": transport.round, "index": r},
                           args.dump / f"{args.agent_id}-{r}.pt")
    except (TransportError, BatchTruncated, ProtocolError) as e:
        console.print(f"[red]error:[/] {escape(_agent_failure(e, args))}", soft_wrap=True,
                      highlight=False)
        return 1
    finally:
        if transport is not None:
            transport.close()
        if privacy is not None:
            privacy.close()
    if args.save:
        party_team.save(args.save)
    return 0


_AGENT_ADVICE = {  # status code name -> what to do
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
    "RESOURCE_EXHAUSTED": "serve fewer --num-envs or raise the simulator's --max-message-mb",
}


def _agent_failure(e: Exception, args: argparse.Namespace) -> str:
    """One line for a round the simulator refused or ended: what happened, what to do."""
    from fedcomm.clients.grpc_transport import TransportError
    from fedcomm.clients.transport import BatchTruncated

    who = args.agent_id
    if isinstance(e, BatchTruncated):
        return (f"{who}: the simulator ended the episode batch early: {e}; another agent left "
                "or broke the protocol: see its output and the simulator's log, then start "
                "every agent of the environment again")
    if not isinstance(e, TransportError):  # a ProtocolError: the simulator's data is malformed
        return (f"{who}: the simulator at {args.sim} sent an invalid message: {e}; do the "
                "simulator and this agent run the same fedcomm version?")
    code, call = e.code.name, e.call or "call"
    if call == "Describe" and code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (f"{who}: cannot reach the simulator ({code}: {e.details}): is `fedcomm sim "
                f"serve` running at {args.sim}, and do the TLS settings match (--tls-ca for a "
                "simulator serving TLS, none for an insecure one)? To wait longer for it to "
                "come up, raise --connect-timeout")
    advice = _AGENT_ADVICE.get(code, "")
    if code == "DEADLINE_EXCEEDED" and "join barrier" in e.details:
        advice = ("another agent did not join; start every agent of the environment (one "
                  "`fedcomm agent` per agent id) within the simulator's --join-timeout of "
                  "each other")
    return f"{who}: the simulator refused the {call} ({code}: {e.details})" + (
        f"; {advice}" if advice else "")


# -- fedcomm report / audit -------------------------------------------------------------------
def _add_privacy_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render a run's privacy report again",
                       description="Write privacy_report.html from a run's privacy_report.json.")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_run_report)
    p = sub.add_parser("audit", help="verify a run's privacy report independently",
                       description="Check the ledgers' hash chains against the report, every "
                       "entry against the run config, every epsilon recomputed with Google's "
                       "dp-accounting, and the budgets. Exit 0 only if all of it verifies.")
    p.add_argument("path", type=Path, metavar="REPORT_OR_RUN_DIR")
    p.add_argument("--empirical", action="store_true",
                   help="also run a one-run canary audit of the message mechanism")
    p.set_defaults(func=_run_audit)


def _run_report(args: argparse.Namespace) -> int:
    from fedcomm.privacy.commands import report_command

    console.print(f"privacy report: {report_command(args.run_dir)}")
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    from fedcomm.privacy.commands import audit_command

    return audit_command(args.path, args.empirical, console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcomm", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"fedcomm {__import__('fedcomm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_simulate(sub)
    _add_eval(sub)
    _add_deploy(sub)
    _add_sim(sub)
    _add_agent(sub)
    _add_privacy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        console.print(f"[red]error:[/] {e}", soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
