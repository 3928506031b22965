"""Rollout throughput over gRPC against in process, for the same agents and environment.

The team is a factory with one sensor, one processor and one actuator (three agent types).
In process, one ``Team`` steps a local environment (2 torch threads). Over gRPC, ``fedcomm sim
serve`` and three agent processes (one torch thread each) run the same models on loopback; each
agent is a ``GrpcTransport`` driving the same ``collect`` loop. Configurations alternate, several
rounds each; the table gives env-steps/s (median over episode batches), the gRPC/in-process
ratio, and p50/p99 step latency (the time an agent's loop takes per environment step).

Where the time goes is reported per agent step: time inside the transport (serialisation,
the round trips, waiting at the router's barrier for the slowest agent) against the agent's own
compute; and the cost of encoding and decoding the step's tensors alone.

    python benchmarks/grpc_throughput.py [--batch-sizes 256 1024] [--rounds 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedcomm.config import TeamConfig
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport, Transport
from fedcomm.models.team import Team, load_team
from fedcomm.protocol.auth import generate_tokens, write_tokens
from fedcomm.protocol.codec import decode, encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.factory import Factory

FACTORY = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1}


class Timed(Transport):
    """Wraps a transport and records when each step ends and the time spent inside it."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.spec, self.agents = inner, inner.spec, inner.agents
        self.num_envs = inner.num_envs
        self.step_ends: list[float] = []
        self.inside = 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.inside += time.perf_counter() - t0
        return out

    def reset(self, routes, seed=None, silent=False):
        self.step_ends = [time.perf_counter()]
        return self._timed(self.inner.reset, routes, seed, silent)

    def exchange(self, vectors):
        return self._timed(self.inner.exchange, vectors)

    def step(self, actions):
        out = self._timed(self.inner.step, actions)
        self.step_ends.append(time.perf_counter())
        return out


def measure(team: Team, transport: Transport, rounds: int) -> dict:
    timed = Timed(transport)
    batch_s, latencies, inside, total = [], [], 0.0, 0.0
    for r in range(rounds + 1):  # the first round warms up
        timed.inside = 0.0
        t0 = time.perf_counter()
        collect(team, timed, seed=r)
        elapsed = time.perf_counter() - t0
        if r == 0:
            continue
        batch_s.append(elapsed)
        ends = timed.step_ends
        latencies += [b - a for a, b in pairwise(ends[1:])]  # steps after the first
        inside += timed.inside
        total += elapsed
    return {"batch_s": batch_s, "latency_s": latencies, "transport_share": inside / total}


def worker(args: argparse.Namespace) -> None:
    """One agent process: roll out over gRPC and print the timings as JSON."""
    from fedcomm.clients.grpc_transport import GrpcTransport

    torch.set_num_threads(1)
    team = load_team(args.checkpoint)
    index = team.spec.agent_ids.index(args.agent)
    party = team.subteam([index])
    transport = GrpcTransport(args.sim, team.spec, args.agent, args.token, team.cfg)
    result = measure(party, transport, args.rounds)
    transport.close()
    print(json.dumps(result))


def spawn(*argv: str, threads: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def over_grpc(team_path: Path, tokens: dict, tmp: Path, num_envs: int, rounds: int) -> dict:
    token_file, port_file = tmp / "tokens.json", tmp / f"port-{num_envs}-{time.time_ns()}"
    write_tokens(token_file, tokens)
    opts = [a for k, v in FACTORY.items() for a in ("--env-opt", f"{k}={v}")]
    server = spawn("-m", "fedcomm", "sim", "serve", "--env", "factory", *opts,
                   "--num-envs", str(num_envs), "--port", "0", "--port-file", str(port_file),
                   "--tokens", str(token_file))
    try:
        while not (port_file.exists() and port_file.read_text()):
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read())
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        agents = [spawn(__file__, "worker", "--sim", address, "--agent", a, "--token", t,
                        "--checkpoint", str(team_path), "--rounds", str(rounds))
                  for a, t in tokens.items()]
        results = []
        for proc in agents:
            out, err = proc.communicate(timeout=600)
            if proc.returncode:
                raise RuntimeError(err)
            results.append(json.loads(out))
    finally:
        server.terminate()
        server.wait()
    # A batch is done when its slowest agent is; latencies pool all agents' steps.
    return {"batch_s": [max(b) for b in zip(*(r["batch_s"] for r in results))],
            "latency_s": [x for r in results for x in r["latency_s"]],
            "transport_share": statistics.mean(r["transport_share"] for r in results)}


def codec_cost(num_envs: int, comm_dim: int, obs_dim: int, repeats: int = 200) -> float:
    """Seconds to encode and decode one agent's tensors of one step (both directions)."""
    vec, obs = torch.randn(num_envs, comm_dim), torch.randn(num_envs, obs_dim)
    routed, act = torch.randn(2, num_envs, comm_dim), torch.randint(3, (num_envs,))
    t0 = time.perf_counter()
    for _ in range(repeats):
        for x, dtype, shape in ((vec, pb.FLOAT32, None), (obs, pb.FLOAT32, None),
                                (routed, pb.FLOAT32, None), (act, pb.INT64, None)):
            msg = pb.Tensor.FromString(encode(x).SerializeToString())
            decode(msg, "x", dtype, tuple(shape or x.shape))
    return (time.perf_counter() - t0) / repeats


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    for flag in ("--sim", "--agent", "--token", "--checkpoint"):
        w.add_argument(flag, required=True)
    w.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=6, help="episode batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    if args.mode == "worker":
        return worker(args)

    torch.set_num_threads(2)
    torch.manual_seed(0)
    team = Team(Factory(1, **FACTORY).spec, TeamConfig())
    tokens = generate_tokens(team.spec.agent_ids)
    samples: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        team_path = Path(tmp) / "team.pt"
        team.save(team_path)
        for _ in range(args.repeats):
            for b in args.batch_sizes:
                local = measure(team, LocalTransport(Factory(b, **FACTORY)), args.rounds)
                samples.setdefault(("in process", b), []).append(local)
                remote = over_grpc(team_path, tokens, Path(tmp), b, args.rounds)
                samples.setdefault(("gRPC", b), []).append(remote)

    table = Table(title="Rollout throughput: factory, 3 agent types, 25-step batches")
    for col in ("transport", "envs", "env-steps/s", "ratio", "step p50", "step p99",
                "in transport", "codec/step"):
        table.add_column(col, justify="right")
    report = {}
    for b in args.batch_sizes:
        rates = {}
        for name in ("in process", "gRPC"):
            runs = samples[(name, b)]
            batches = [x for r in runs for x in r["batch_s"]]
            lat = [x for r in runs for x in r["latency_s"]]
            rates[name] = b * 25 / statistics.median(batches)
            share = statistics.mean(r["transport_share"] for r in runs)
            report[f"{name} {b}"] = {"env_steps_per_s": rates[name], "p50_s": pct(lat, 0.5),
                                     "p99_s": pct(lat, 0.99), "transport_share": share}
            ratio = f"{rates['gRPC'] / rates['in process']:.0%}" if name == "gRPC" else ""
            codec = f"{codec_cost(b, 16, 6) * 1e3:.2f} ms" if name == "gRPC" else ""
            table.add_row(name, str(b), f"{rates[name]:,.0f}", ratio,
                          f"{pct(lat, 0.5) * 1e3:.2f} ms", f"{pct(lat, 0.99) * 1e3:.2f} ms",
                          f"{share:.0%}", codec)
    Console(width=120).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
