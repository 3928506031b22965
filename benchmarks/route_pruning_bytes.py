"""How route pruning changes the bytes on the wire, for a factory of 12 agents.

One federated round (rollout and feedback exchange, no update) of 4 sensors, 4 processors and
4 actuators through the simulator service on loopback: with every type-to-type route kept, with
the routes a trained team's graph keeps, and with only those of them whose vectors move a
receiver's policy (counterfactual importance above 1e-3). Each agent's ``GrpcTransport`` counts the
protobuf bytes of every message it sends and receives; the table sums them over the 12 agents.
Pruned routes are not sent, and an agent whose type has no kept route releases no vector at all.

    python benchmarks/route_pruning_bytes.py --checkpoint runs/factory12 [--num-envs 256]
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedcomm.clients.grpc_transport import GrpcTransport
from fedcomm.learning.importance import communication_importance
from fedcomm.learning.party import Party
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team, load_team
from fedcomm.protocol.auth import generate_tokens
from fedcomm.sim.factory import Factory
from fedcomm.sim.serve import SimServer
from fedcomm.sim.service import SimConfig

KINDS = {  # wire message -> what it carries
    "sent vector": "knowledge vectors (agent -> sim)",
    "received routed": "routed vectors (sim -> agent)",
    "sent FeedbackRequest": "feedback gradients (receiver -> sim)",
    "received FeedbackReply": "summed feedback (sim -> sender)",
    "received observation": "observations and rewards",
    "sent action": "actions",
}


def one_round(team: Team, env_kwargs: dict, num_envs: int) -> Counter:
    spec = team.spec
    tokens = generate_tokens(spec.agent_ids)
    cfg = SimConfig(env="factory", env_kwargs=env_kwargs, num_envs=num_envs, tokens=tokens)
    totals: Counter = Counter()
    errors: list[BaseException] = []
    with SimServer(cfg) as server:
        def run(i: int) -> None:
            agent = spec.agent_ids[i]
            try:
                transport = GrpcTransport(server.address, spec, agent, tokens[agent], team.cfg)
                Party(team.subteam([i]), transport, seed=i).run_batch(update=False)
                transport.close()
                totals.update(transport.wire_bytes)
            except BaseException as e:  # reported after the round
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(spec.n_agents)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained 12-agent factory run")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--json", help="write the byte counts here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained = load_team(args.checkpoint)
    spec = trained.spec
    if spec.name != "factory" or spec.n_agents != 12:
        raise SystemExit(f"{args.checkpoint} holds {spec.name} with {spec.n_agents} agents")
    env_kwargs = dict(zip(("n_sensors", "n_processors", "n_actuators"),
                          (t.count for t in spec.types)))
    names = [t.name for t in spec.types]
    learned = trained.kept_routes()
    everything = trained.subteam(range(12))
    with torch.no_grad():
        everything.comm.graph.fill_(10.0)  # every route kept
    with torch.no_grad():
        rollout = collect(trained, LocalTransport(Factory(64, **env_kwargs)), seed=0)
        moving = learned & (communication_importance(trained, rollout).nan_to_num(0) > 1e-3)
        policy_only = trained.subteam(range(12))
        policy_only.comm.graph.masked_fill_(~moving, -10.0)
    runs = {"all routes": (everything, everything.kept_routes()),
            "learned graph": (trained, learned),
            "policy routes": (policy_only, policy_only.kept_routes())}
    counts = {name: one_round(team, env_kwargs, args.num_envs)
              for name, (team, _) in runs.items()}

    console = Console(width=120)
    for name, (_, routes) in runs.items():
        kept = [f"{names[s]}->{names[r]}" for s in range(3) for r in range(3) if routes[s, r]]
        console.print(f"{name}: {', '.join(kept)}")
    table = Table(title=f"Bytes on the wire, one round, factory 4/4/4, {args.num_envs} envs")
    table.add_column("message")
    for name in counts:
        table.add_column(name, justify="right")
    def cells(values: list[int]) -> list[str]:
        saved = [f"-{1 - v / values[0]:.0%}" if values[0] else "" for v in values[1:]]
        return [f"{values[0] / 2**20:.2f} MiB",
                *(f"{v / 2**20:.2f} MiB ({d})" for v, d in zip(values[1:], saved))]

    for key, label in KINDS.items():
        table.add_row(label, *cells([counts[n][key] for n in counts]))
    table.add_row("[bold]all messages", *cells([sum(c.values()) for c in counts.values()]))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({k: dict(v) for k, v in counts.items()}, indent=2))


if __name__ == "__main__":
    main()
