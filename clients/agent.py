"""One federated agent for one round: restored, given the global module, trained or evaluated
through the simulator under its budget, and saved.

``FederatedAgent`` builds the agent's party (``learning.party``: its models, optimizer and
transport, held to its privacy account, which refuses a batch its budget cannot pay for and
writes every release to the ledger before it leaves) from the run's configuration and the
node's settings, and runs its round's batches; the Flower ClientApp (``clients.host``) opens it
for each message, a deployment's worker keeps it between them.

What crosses a federated agent's boundary: to the simulator, its knowledge vectors, feedback
gradients and actions (``GrpcTransport``); to the server, its copy of the shared communication
module (and, only with ``aggregate_private``, its type's private networks), the environment steps
it trained on and metrics (``protocol/round.py``). Its private networks and training state stay
in its ``StateStore``.

Every agent of a run starts from the same initial team the centralized trainer builds for the
run's seed: the global shared module the server sends and its own slot's freshly initialised
private networks. Nothing trained on anyone's data is ever loaded from outside.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from fedcomm.clients.grpc_transport import GrpcTransport
from fedcomm.clients.node import AgentNode
from fedcomm.clients.state import StateStore, load_private_state, private_state_dict
from fedcomm.config import FederationConfig
from fedcomm.device import resolve_device
from fedcomm.learning.party import Party
from fedcomm.learning.ppo import annealed_lr
from fedcomm.models.team import Team
from fedcomm.privacy.ledger import GENESIS, LedgerError
from fedcomm.protocol.round import (
    AGENT_PHASES,
    Anchors,
    Proof,
    TrainReply,
    module_arrays,
    shared_part,
    type_part,
)
from fedcomm.releases.account import LEDGER, AgentPrivacy
from fedcomm.releases.schedule import (
    averages_private,
    composition_of_config,
    initial_routes,
    releases_anything,
    sends_to_server,
    shared_parts,
    update_dp,
    update_releases,
)

LABELS = 1_000_000  # a run's batch labels lie below this: the next seed's start above it


def batch_label(fed: FederationConfig, batch: int, replays: int) -> int:
    """The label (and ledger batch number) of the run's ``batch`` in an attempt after
    ``replays`` uncommitted ones: past every label an earlier attempt can have used, so a
    round run again plays fresh episodes whose releases compose with nothing before."""
    label = batch + replays * fed.total_batches
    if replays < 0 or label >= LABELS:
        raise ValueError(f"batch {batch} after {replays} replays has no label below {LABELS}: "
                         "the run has been started again too often")
    return label


def global_arrays(team: Team, with_private: bool = False,
                  parts: Sequence[str] | None = None, by_role: bool = False
                  ) -> dict[str, Tensor]:
    """What a one-type team sends to the server: its copy of the shared module (its ``parts``
    of it; ``by_role``, as its type's copy) and, with ``with_private``, its type's private
    networks."""
    private = {_type_name(team): team.type_state()} if with_private else {}
    return module_arrays(team.shared_state(parts), private,
                         _type_name(team) if by_role else None)


def load_global(team: Team, arrays: Mapping[str, Tensor],
                parts: Sequence[str] | None = None, by_role: bool = False) -> None:
    """Load the global shared module (its ``parts``: the others are the agent's own;
    ``by_role``, its type's copy) and this agent's type's averaged private networks."""
    team.load_shared_state(shared_part(arrays, _type_name(team) if by_role else None), parts)
    team.load_type_state(type_part(arrays, _type_name(team)))


def _type_name(team: Team) -> str:
    return team.spec.types[team.types[0]].name


class FederatedAgent:
    """One agent for one federated round: restored, given the global module, then trained or
    evaluated through the simulator, and saved."""

    def __init__(self, fed: FederationConfig, node: AgentNode, context_state,
                 restore_round: int) -> None:
        t0 = time.perf_counter()
        self.fed, self.node, self.spec = fed, node, fed.spec
        self.index = self.spec.agent_ids.index(node.agent_id)
        self.device = resolve_device(node.device or fed.train.device)
        train = fed.train
        # its slot of the run's initial team, in its own site: what it computes grows with its
        # site, not with the run
        team = Team.initial(self.spec, train.team, train.seed, [self.index]).in_own_site()
        team = team.to(self.device)
        routes = initial_routes(train)  # what the agent may release decides how it trains
        self.parts = shared_parts(self.spec, fed.share, routes, self.index)
        # Sharing only what is used, no agent's graph decides the routes: they stay the
        # allowed ones for the run.
        self.fixed_routes = routes if fed.share != "all" else None
        self.sends_private = averages_private(self.spec, fed.share, fed.aggregate_private,
                                              routes, self.index)
        sends = sends_to_server(self.spec, fed.share, fed.aggregate_private, routes,
                                self.index)
        self.sends = sends
        private = sends or releases_anything(self.spec, train.team, fed.share, routes,
                                             self.index)
        transport = GrpcTransport(node.sim_address, self.spec, node.agent_id, node.token,
                                  train.team, node.tls, timeout=fed.round_timeout,
                                  device=self.device)
        self.dp = update_dp(train.privacy, train.ppo) if private else None
        # an agent that releases or sends anything trains on none of its episodes where DP-SGD
        # has no share of the budget: its networks stay public (``update_share`` 0)
        self.learns = not private or train.privacy.trains_releasing_agents
        cap = node.policy.cap(train.privacy.budget)  # its own policy caps the run's budget
        cfg = (train.privacy if cap == train.privacy.budget
               else replace(train.privacy, epsilon_budget=cap))
        account = AgentPrivacy(node.agent_id, self.index, self.spec, train.team, cfg,
                               node.state_dir / LEDGER, fed.to_dict(), device=self.device,
                               composition=composition_of_config(fed.to_dict()),
                               episodes=train.num_envs, seeded_noise=node.policy.seeded_noise)
        # DP-SGD's steps compose with the agent's releases even where it sends no network
        # (they shape its later releases); a plain update counts where it is sent.
        steps = (update_releases(train.privacy, train.ppo)
                 if self.learns and (self.dp is not None or sends) else [])
        self.party = Party(team, transport, train.ppo, seed=train.seed * 1000 + self.index,
                           dp=self.dp, account=account, update_releases=steps)
        self.store = StateStore(node.state_dir, context_state)
        saved = self.store.load(restore_round)
        if saved is not None:
            load_private_state(self.party, saved.state)
        self.restored_round = saved.round if saved else 0
        self.restore_s = time.perf_counter() - t0

    def check_anchor(self, anchors: Anchors) -> None:
        """Refuse to go on unless the ledger extends what the server recorded of it: a ledger
        cut or rewritten since would let the budget forget what was spent."""
        entries, last = anchors.get(self.node.agent_id, (0, GENESIS))
        ledger = self.party.account.ledger
        held = ledger.entries
        if len(held) < entries or (entries and held[entries - 1]["hash"] != last):
            raise LedgerError(f"{ledger.path} no longer holds what the server recorded of it "
                              f"({entries} entries ending in {last[:12]}; it holds "
                              f"{len(held)}): it was cut or rewritten; restore it")

    def proof(self) -> Proof:
        """The reply's proof, unsigned: who the agent is and its ledger's anchor."""
        ledger = self.party.account.ledger
        return Proof(self.node.agent_id, len(ledger), ledger.last_hash)

    @property
    def team(self) -> Team:
        return self.party.team

    def continue_in_memory(self, last_round: int) -> None:
        """Go on from the end of ``last_round``, whose state this agent still holds (a
        worker keeps it between rounds): nothing to restore."""
        self.restored_round, self.restore_s = last_round, 0.0

    def routes(self) -> Tensor:
        """This round's routes: the global graph's, the same for every agent (or the fixed
        ones)."""
        if self.fixed_routes is not None:
            return self.fixed_routes.to(self.device)
        return self.team.kept_routes()

    def train_round(self, server_round: int, arrays: Mapping[str, Tensor],
                    time_frac: float = 0.0, replays: int = 0
                    ) -> tuple[dict[str, Tensor], TrainReply]:
        """Train this round's episode batches from the global module (``replays``:
        ``TrainInstruction.replays``); returns the agent's updated arrays (none if its budget
        kept it silent throughout) and its reply."""
        load_global(self.team, arrays, self.parts, self.fed.share == "role")
        routes = self.routes()
        train = self.fed.train
        batches = self.fed.batches_in(server_round)
        totals: dict[str, float] = {}
        trained = 0
        for it in batches:
            lr = (annealed_lr(train.ppo.lr, it, self.fed.total_batches, time_frac)
                  if train.anneal_lr else train.ppo.lr)
            label = batch_label(self.fed, it, replays)
            record = self.party.train_batch(round=server_round, batch=label, routes=routes,
                                            seed=train.seed * LABELS + label, lr=lr,
                                            update=self.learns)
            trained += record.spoke
            for k, v in record.stats.items():
                totals[k] = totals.get(k, 0.0) + v
        t0 = time.perf_counter()
        self.store.save(server_round, private_state_dict(self.party))
        n = max(len(batches), 1)
        timings = {k: totals.pop(k, 0.0) for k in AGENT_PHASES}
        timings |= {"restore_s": self.restore_s, "persist_s": time.perf_counter() - t0}
        stats = {k: v / n for k, v in totals.items()}
        reply = TrainReply(
            agent=self.index, env_steps=trained * self.party.transport.num_envs
            * self.spec.episode_length, batches=len(batches),
            silent_batches=len(batches) - trained, epsilon=self.party.account.spent().composed,
            restored_round=self.restored_round, return_mean=stats.pop("return_mean", 0.0),
            timings=timings, stats=stats)
        if not trained:  # nothing learned that the budget allowed to share
            return {}, reply
        return self.module(), reply

    def module(self) -> dict[str, Tensor]:
        """The arrays this agent sends the server, as it holds them now."""
        return global_arrays(self.team, self.sends_private, self.parts, self.fed.share == "role")

    def evaluate(self, arrays: Mapping[str, Tensor], batches: int, seed: int,
                 server_round: int = 0) -> list[float]:
        """Greedy episodes through the simulator; this agent's return in each."""
        load_global(self.team, arrays, self.parts, self.fed.share == "role")
        routes = self.routes()
        generator = torch.Generator(self.device).manual_seed(seed)
        num_envs = self.party.transport.num_envs
        returns: list[float] = []
        for i in range(batches):
            # Seeds of evaluation episodes lie far above the training batches' indices.
            first = seed + i * num_envs
            returns += self.party.play_batch(round=server_round, batch=first, routes=routes,
                                             seed=first, generator=generator).tolist()
        return returns

    def close(self) -> None:
        self.party.close()
