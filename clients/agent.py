"""A federated agent: one agent's private model, its copy of the shared module and its rounds.

What crosses the agent's boundary: to the simulator, its knowledge vectors, feedback gradients
and actions (``GrpcTransport``); to the server, its copy of the shared communication module
(and, only with ``aggregate_private``, its type's private networks), the number of environment
steps it trained on and metrics. Its private networks and training state stay in its
``StateStore``.

Every agent of a run starts from the same initial team the centralized trainer builds for the
run's seed: the global shared module the server sends and its own slot's freshly initialised
private networks. Nothing trained on anyone's data is ever loaded from outside.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from fedcomm.clients.grpc_transport import ClientTls, GrpcTransport
from fedcomm.clients.party import Party
from fedcomm.clients.ppo import annealed_lr
from fedcomm.clients.privacy import LEDGER, AgentPrivacy, update_dp, update_releases
from fedcomm.clients.rollout import collect
from fedcomm.clients.state import StateStore, load_private_state, private_state_dict
from fedcomm.config import FederationConfig
from fedcomm.device import resolve_device
from fedcomm.models.team import Team
from fedcomm.protocol.auth import read_tokens
from fedcomm.sim.base import EnvSpec
from fedcomm.sim.registry import make_env

SHARED = "comm."
PRIVATE = "type."  # "type.<type name>.<module path>": a private module averaged within its type


_GLOBAL_RNG = threading.Lock()  # initialisers draw from torch's process-wide generator


def initial_team(fed: FederationConfig, spec: EnvSpec, agents: list[int] | None = None
                 ) -> Team:
    """The run's initial team (or its ``agents``' part): the same weights for the server and
    every agent, per seed."""
    with _GLOBAL_RNG, torch.random.fork_rng():
        torch.manual_seed(fed.train.seed)
        team = Team(spec, fed.train.team)
        return team if agents is None else team.subteam(agents)


def shared_arrays(team: Team, with_private: bool = False) -> dict[str, Tensor]:
    """What the agent sends to the server: its copy of the shared module (and, with
    ``with_private``, its single type's private networks under that type's name)."""
    out = {SHARED + k: v.detach().to("cpu", copy=True)
           for k, v in team.comm.state_dict().items()}
    if with_private:
        name = team.spec.types[team.types[0]].name
        for k, v in team.named_parameters():
            head, _, rest = k.partition(".")
            if head != "comm":  # drop the type position: one type per agent
                out[f"{PRIVATE}{name}.{head}.{rest.partition('.')[2]}"] = v.detach().to(
                    "cpu", copy=True)
    return out


@torch.no_grad()
def load_shared(team: Team, arrays: dict[str, Tensor]) -> None:
    """Load the global shared module (and this agent's type's averaged private networks)."""
    comm = {k[len(SHARED):]: v for k, v in arrays.items() if k.startswith(SHARED)}
    team.comm.load_state_dict(comm)
    prefix = f"{PRIVATE}{team.spec.types[team.types[0]].name}."
    for k, param in team.named_parameters():
        head, _, rest = k.partition(".")
        key = f"{prefix}{head}.{rest.partition('.')[2]}"
        if head != "comm" and key in arrays:
            param.copy_(arrays[key])


@dataclass
class AgentNode:
    """Where an agent runs: its identity, the simulator it reaches, and its state directory."""

    agent_id: str
    sim_address: str
    token: str
    state_dir: Path
    tls: ClientTls | None = None
    device: str | None = None  # None: the run config's

    @classmethod
    def from_settings(cls, settings: dict, spec: EnvSpec) -> AgentNode:
        """From node settings: ``agent-id`` (or Flower's ``partition-id`` in simulation),
        ``sim-address``, ``token-file``, ``state-dir`` (or ``state-root``, one folder per
        agent), and optionally ``sim-ca``, ``sim-cert``, ``sim-key`` for TLS to the simulator
        and ``device`` (this node's, over the run config's ``--device``).
        """
        if "agent-id" in settings:
            agent_id = str(settings["agent-id"])
        elif "partition-id" in settings:
            pid = int(settings["partition-id"])
            if not 0 <= pid < spec.n_agents:
                raise ValueError(f"node {pid} has no agent: {spec.name} has {spec.n_agents}")
            agent_id = spec.agent_ids[pid]
        else:
            raise ValueError("the node config names no agent-id")
        if agent_id not in spec.agent_ids:
            raise ValueError(f"no agent {agent_id!r} in {spec.name}; agents: "
                             f"{', '.join(spec.agent_ids)}")
        for key in ("sim-address", "token-file"):
            if key not in settings:
                raise ValueError(f"the node config of {agent_id} lacks {key}")
        token = read_tokens(settings["token-file"]).get(agent_id)
        if not token:
            raise ValueError(f"no token for {agent_id} in {settings['token-file']}")
        if "state-dir" in settings:
            state_dir = Path(settings["state-dir"])
        elif "state-root" in settings:
            state_dir = Path(settings["state-root"]) / agent_id
        else:
            raise ValueError(f"the node config of {agent_id} lacks state-dir")
        tls = None
        if settings.get("sim-ca"):
            tls = ClientTls(Path(settings["sim-ca"]),
                            Path(settings["sim-cert"]) if settings.get("sim-cert") else None,
                            Path(settings["sim-key"]) if settings.get("sim-key") else None)
        device = str(settings["device"]) if settings.get("device") else None
        return cls(agent_id, str(settings["sim-address"]), token, state_dir, tls, device)


def env_spec(fed: FederationConfig) -> EnvSpec:
    return make_env(fed.train.env, 1, **fed.train.env_kwargs).spec


class FederatedAgent:
    """One agent for one federated round: restored, given the global module, then trained or
    evaluated through the simulator, and saved."""

    def __init__(self, fed: FederationConfig, node: AgentNode, context_state,
                 restore_round: int) -> None:
        t0 = time.perf_counter()
        self.fed, self.node, self.spec = fed, node, env_spec(fed)
        self.index = self.spec.agent_ids.index(node.agent_id)
        self.device = resolve_device(node.device or fed.train.device)
        team = initial_team(fed, self.spec, [self.index]).to(self.device)
        self.transport = GrpcTransport(node.sim_address, self.spec, node.agent_id, node.token,
                                       fed.train.team, node.tls, timeout=fed.round_timeout,
                                       device=self.device)
        self.party = Party(team, self.transport, fed.train.ppo,
                           seed=fed.train.seed * 1000 + self.index,
                           dp=update_dp(fed.train.privacy, fed.train.ppo))
        self.store = StateStore(node.state_dir, context_state)
        self.privacy = AgentPrivacy(node.agent_id, self.index, self.spec, fed.train.team,
                                    fed.train.privacy, node.state_dir / LEDGER, fed.to_dict(),
                                    device=self.device)
        saved = self.store.load(restore_round)
        if saved is not None:
            load_private_state(self.party, saved.state)
        self.restored_round = saved.round if saved else 0
        self.restore_s = time.perf_counter() - t0

    @property
    def team(self) -> Team:
        return self.party.team

    def train_round(self, server_round: int, arrays: dict[str, Tensor],
                    time_frac: float = 0.0) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Train this round's episode batches from the global module; returns the agent's
        updated shared module and its metrics (``num-examples``: environment steps)."""
        load_shared(self.team, arrays)
        routes = self.team.kept_routes()  # the global graph's, the same for every agent
        train = self.fed.train
        batches = self.fed.batches_in(server_round)
        totals: dict[str, float] = {}
        trained = 0
        for it in batches:
            lr = (annealed_lr(train.ppo.lr, it, self.fed.total_batches, time_frac)
                  if train.anneal_lr else train.ppo.lr)
            # Refused by the budget: the agent stays silent. Allowed: written down once the
            # simulator admitted the batch, before anything of it leaves, so that a batch that
            # never started (a peer missing at the join) costs nothing.
            releases = self.privacy.batch_releases(
                routes, update_releases(train.privacy, train.ppo))
            speaks = self.privacy.allows(releases, batch=it)
            charge = partial(self.privacy.charge, releases, round=server_round, batch=it)
            record = self.party.run_batch(seed=train.seed * 1_000_000 + it, routes=routes,
                                          lr=lr, silent=not speaks, noise=self.privacy.noise,
                                          on_joined=charge if speaks else None)
            trained += speaks
            for k, v in record.stats.items():
                totals[k] = totals.get(k, 0.0) + v
        t0 = time.perf_counter()
        self.store.save(server_round, private_state_dict(self.party))
        n = len(batches)
        metrics = {k: (v if k.endswith("_s") else v / max(n, 1)) for k, v in totals.items()}
        spent = self.privacy.spent()
        metrics |= {"num-examples": trained * self.transport.num_envs * self.spec.episode_length,
                    "batches": n, "silent_batches": n - trained,
                    "epsilon": spent.composed, "restored_round": self.restored_round,
                    "restore_s": self.restore_s, "persist_s": time.perf_counter() - t0}
        if not trained:  # nothing learned that the budget allowed to share
            return {}, metrics
        return shared_arrays(self.team, self.fed.aggregate_private), metrics

    @torch.no_grad()
    def evaluate(self, arrays: dict[str, Tensor], batches: int, seed: int,
                 server_round: int = 0) -> list[float]:
        """Greedy episodes through the simulator; this agent's return in each."""
        load_shared(self.team, arrays)
        routes = self.team.kept_routes()
        generator = torch.Generator(self.device).manual_seed(seed)
        returns = []
        for i in range(batches):
            # Evaluation episodes are episodes too: their vectors are releases, keyed by their
            # seed (a replayed seed composes with its first use; seeds lie far above the
            # training batches' indices).
            messages = [r for r in self.privacy.batch_releases(routes) if r.mechanism == "message"]
            episodes = seed + i * self.transport.num_envs
            speaks = self.privacy.allows(messages, batch=episodes)
            charge = partial(self.privacy.charge, messages, round=server_round, batch=episodes)
            rollout = collect(self.team, self.transport, seed=seed + i * self.transport.num_envs,
                              generator=generator, greedy=True, routes=routes,
                              silent=not speaks, noise=self.privacy.noise,
                              on_joined=charge if speaks else None)
            returns.extend(rollout.rewards.sum(dim=0)[:, 0].tolist())
        return returns

    def close(self) -> None:
        self.transport.close()
        self.privacy.close()
