"""The agents' models, vectorised over agents: per-type private modules plus the shared channel.

A ``Team`` holds any set of agents of an environment: all of them in the centralized trainer (one
autograd graph, so a receiver's loss reaches every sender through the channel), or only the
agents of one party in federated mode. Each agent has private feature, policy and value networks
(stacked per type, see ``layers``) and uses the one shared ``CommModule``.

One step, per agent: features of its own observation (optionally through a GRU), a knowledge
vector ``clip(encode(features), C) + N(0, (sigma C)^2)``, the context decoded from the vectors
the router delivers to it, then policy logits and a value from features and context.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedcomm.config import TeamConfig
from fedcomm.models.channel import Channel, categorical_entropy
from fedcomm.models.comm import CommModule
from fedcomm.models.layers import GroupGRUCell, group_mlp
from fedcomm.models.state import TeamState
from fedcomm.models.warmup import warm_up_code
from fedcomm.sim.base import EnvSpec, Obs
from fedcomm.sim.router import delivery_mask, priority, sites_of

TEAM_FILE = "team.pt"  # a run directory's trained team
_GLOBAL_RNG = threading.Lock()  # initialisers draw from torch's process-wide generator

_last_initial: tuple[str, Team] | None = None  # Team.initial's last whole team, by its key

Memory = tuple[Tensor, Tensor]  # with ``accumulate``: delivered sums and counts so far


def memory_of(out_extras: dict[str, Tensor]) -> Memory | None:
    """What a step with ``accumulate`` passes on to the next."""
    if "heard_sum" not in out_extras:
        return None
    return out_extras["heard_sum"], out_extras["heard_count"]


@dataclass
class TeamOutput:
    logits: list[Tensor]  # per local type [B, count, n_actions]
    values: Tensor  # [B, n_local]
    messages: Tensor  # [B, n_local, D] the local agents' vectors as sent: clipped and noised
    hidden: Tensor | None  # [B, n_local, H] recurrent state after this step
    extras: dict[str, Tensor] = field(default_factory=dict)
    # With ``cfg.code_from_reward``, [B, n_local]: the log-probability and the entropy of each
    # local sender's released codeword (zero where it released none).
    code_logp: Tensor | None = None
    code_entropy: Tensor | None = None
    # A discrete channel's [B, n_local, K] release distributions (``speak``), from
    # ``forward_steps``: what positive signalling (``ppo.signalling``) reads.
    code_probs: Tensor | None = None


class Team(TeamState, nn.Module):
    """The models of ``agents`` (default: all agents of ``spec``).

    A team that holds every agent routes vectors itself; a team that holds some of them is given,
    each step, the vectors the router delivered from the others (``received``, ``delivered``).
    """

    def __init__(self, spec: EnvSpec, cfg: TeamConfig | None = None,
                 agents: Sequence[int] | None = None) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg or TeamConfig()
        n = spec.n_agents
        self.agents = tuple(range(n)) if agents is None else tuple(sorted(set(agents)))
        if not self.agents or not all(0 <= i < n for i in self.agents):
            raise ValueError(f"a team holds between 1 and {n} of the agents 0..{n - 1}, "
                             f"got {agents}")
        local_types = [spec.type_of_agent[i] for i in self.agents]
        self.types = tuple(k for k in range(len(spec.types)) if k in local_types)
        self.counts = tuple(local_types.count(k) for k in self.types)
        kinds = [spec.types[k] for k in self.types]
        h = self.cfg.hidden
        self.features = nn.ModuleList(
            group_mlp(c, [t.obs_dim, h, h]) for t, c in zip(kinds, self.counts))
        self.rnn = (nn.ModuleList(GroupGRUCell(c, h, h) for c in self.counts)
                    if self.cfg.recurrent else None)
        self.comm = CommModule(len(spec.types), h, self.cfg.comm_dim, self.cfg.encoder,
                               self.cfg.n_superpositions, self.cfg.graph_init,
                               self.cfg.typed_comm)
        self.channel = Channel(self.cfg)
        self.policy = nn.ModuleList(group_mlp(c, [2 * h, h, t.n_actions], out_gain=0.01)
                                    for t, c in zip(kinds, self.counts))
        self.value = nn.ModuleList(
            group_mlp(c, [2 * h, h, 1], out_gain=1.0) for c in self.counts)
        self.register_buffer("type_of_agent", torch.tensor(spec.type_of_agent), persistent=False)
        self.register_buffer("local_index", torch.tensor(self.agents), persistent=False)
        self.register_buffer("site_of_agent", sites_of(spec), persistent=False)
        self.register_buffer("local_types", torch.tensor(local_types), persistent=False)
        self.register_buffer("allowed", torch.tensor(self.cfg.allowed_routes(spec)),
                             persistent=False)
        # The part of the graph's price each local agent type pays (see ``route_cost``).
        paid = torch.zeros(len(spec.types))
        for k, c in zip(self.types, self.counts):
            paid[k] = c / spec.types[k].count
        self.register_buffer("price_part", paid, persistent=False)
        # Built last, so that the other networks' initial weights are those without it.
        self.recall = (nn.ModuleList(group_mlp(c, [self.cfg.symbols, h, t.obs_dim])
                                     for t, c in zip(kinds, self.counts))
                       if self.cfg.recall else None)

    @classmethod
    def initial(cls, spec: EnvSpec, cfg: TeamConfig, seed: int,
                agents: Sequence[int] | None = None) -> Team:
        """A run's initial team for ``seed`` (or its ``agents``' part): the same weights for
        the server, every agent and the centralized trainer."""
        global _last_initial
        key = json.dumps([spec.to_dict(), asdict(cfg), seed, cls.__qualname__], sort_keys=True)
        with _GLOBAL_RNG, torch.random.fork_rng():  # a subteam draws initial weights too
            if agents is None or _last_initial is None or _last_initial[0] != key:
                torch.manual_seed(seed)
                team = cls(spec, cfg)
                if cfg.code_warmup:
                    warm_up_code(team, cfg.code_warmup)
                if agents is None:
                    return team
                # kept: a process that builds many agents' parts (a simulation's actor
                # serving agent after agent) builds the whole team once
                _last_initial = key, team
            return _last_initial[1].subteam(agents)

    def in_own_site(self) -> Team:
        """This team of agents of one site as a team of that site alone (``EnvSpec.site``): the
        same networks, the agents numbered within their site. Vectors never leave a site, so it
        computes the same, and what it hears grows with its site, not with the run. A team of
        a run without sites is itself."""
        if self.spec.sites == 1:
            return self
        sites = {self.spec.site_of_agent[i] for i in self.agents}
        if len(sites) != 1:
            raise ValueError(f"a team in its own site holds agents of one site, got {sites}")
        site = sites.pop()
        members = self.spec.site_members(site)
        with _GLOBAL_RNG, torch.random.fork_rng():  # its initial weights are replaced
            team = type(self)(self.spec.site(site), self.cfg, [members.index(i)
                                                                for i in self.agents])
        team.load_state_dict(self.state_dict())
        return team.to(self.local_index.device)

    @property
    def n_local(self) -> int:
        return len(self.agents)

    @property
    def whole(self) -> bool:
        return self.n_local == self.spec.n_agents

    # -- the pieces of a step ---------------------------------------------------------------
    def initial_hidden(self, batch: int) -> Tensor | None:
        if not self.cfg.recurrent:
            return None
        return torch.zeros(batch, self.n_local, self.cfg.hidden, device=self.local_index.device)

    def encode_obs(self, obs: Obs, hidden: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Private features ``[B, n_local, H]`` (and the new recurrent state).

        ``obs`` holds one tensor per agent type present in the team, ``[B, count, obs_dim]``.
        """
        feats = self._features(obs)
        if self.rnn is None:
            return feats, None
        if hidden is None:
            raise ValueError("a recurrent team needs its hidden state")
        parts = zip(self.rnn, self.split(feats), self.split(hidden))
        feats = torch.cat([cell(f, h) for cell, f, h in parts], dim=1)
        return feats, feats

    def encode_steps(self, obs: Obs) -> Tensor:
        """Private features of ``T`` steps of ``B`` episodes, ``[T * B, n_local, H]``, from
        observations ``[T, B, count, obs_dim]`` per type: the feature networks of every step
        in one batch; a recurrent team's GRU cells then unroll from the zero state."""
        t, b = obs[0].shape[:2]
        feats = self._features([o.flatten(0, 1) for o in obs])
        if self.rnn is None:
            return feats
        steps = feats.unflatten(0, (t, b))
        parts = zip(self.rnn, steps.split(self.counts, dim=2),
                    self.split(self.initial_hidden(b)))
        return torch.cat([cell.unroll(f, h) for cell, f, h in parts], dim=2).flatten(0, 1)

    def _features(self, obs: Obs) -> Tensor:
        """Each agent's feature network on its observation, ``[B, n_local, H]``."""
        if len(obs) != len(self.types):
            raise ValueError(f"expected observations for {len(self.types)} agent types, "
                             f"got {len(obs)}")
        for k, c, o in zip(self.types, self.counts, obs):
            t = self.spec.types[k]
            if o.dim() != 3 or o.shape[1:] != (c, t.obs_dim):
                raise ValueError(f"observations for {t.name!r}: expected [B, {c}, {t.obs_dim}], "
                                 f"got {list(o.shape)}")
        return torch.cat([net(o) for net, o in zip(self.features, obs)], dim=1)

    def speak(self, feats: Tensor) -> Tensor:
        """What the channel's release is drawn around, differentiable in the sender's networks
        (``Channel.expected`` of the encoded features)."""
        return self.channel.expected(self.comm.encode(feats, self.local_types))

    def code_terms(self, clean: Tensor, drawn: Tensor, step: int | Tensor
                   ) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """``[B, n_local]`` the log-probability of each local sender's released codeword and
        the entropy of its release, where it released one; ``(None, None)`` unless the code is
        learned from the reward (``cfg.code_from_reward``).

        The release's distribution, ``clean``, is the sender's policy over codewords, randomized
        response included: with the environment action it makes the joint action whose ratio
        PPO clips and whose entropy it rewards.
        """
        if not self.cfg.code_from_reward:
            return None, None
        speaks = self.speakers().to(clean.dtype)
        release = self.releases_at(step)
        if isinstance(release, Tensor):
            speaks = speaks * release[:, None].to(clean.dtype)
        elif not release:
            speaks = speaks * 0
        logp = (clean * drawn.detach()).sum(dim=-1).clamp(min=1e-30).log()
        return logp * speaks, categorical_entropy(clean) * speaks

    def recall_error(self, obs: Obs, probs: Tensor) -> Tensor:
        """The local senders' summed recall error: at each release step, the mean squared
        error of what each one's recall decoder makes of its release distribution against
        what it saw. ``obs``: per type ``[T, B, count, obs_dim]``; ``probs``: ``[T, B, n_local,
        K]`` (``code_probs``). Each episode's term is its own."""
        if self.recall is None:
            raise ValueError("this team has no recall decoders (TeamConfig.recall)")
        steps = torch.arange(probs.shape[0], device=probs.device)
        release = self.releases_at(steps)
        speaks = self.speakers()
        total = probs.new_zeros(())
        for net, o, p, s in zip(self.recall, obs, probs.split(self.counts, dim=2),
                                speaks.split(self.counts)):
            error = (net(p[release]) - o[release]).pow(2).mean(dim=-1)  # [S, B, count]
            total = total + (error.mean(dim=(0, 1)) * s.to(error.dtype)).sum()
        return total

    def speakers(self) -> Tensor:
        """``[n_local]`` bool: which local agents have a kept route to send on."""
        own = self.type_of_agent.index_select(0, self.local_index)
        return self.kept_routes().index_select(0, own).any(dim=1)

    def releases_at(self, step: int | Tensor) -> bool | Tensor:
        """Whether the local senders release at ``step`` of the episode (the schedule); a
        tensor of steps gives a bool tensor."""
        return step % self.cfg.release_every == 0

    def kept_routes(self) -> Tensor:
        """``[K, K]`` the type-to-type routes this round's graph keeps (what the router uses).

        A team that does not communicate keeps none, so nothing is sent at all; routes the
        configuration does not allow are never kept.
        """
        routes = self.comm.kept_routes(self.cfg.prune_threshold) & self.allowed
        return routes if self.cfg.communicate else torch.zeros_like(routes)

    def route_cost(self) -> Tensor:
        """The local agents' part of the graph's price: each receiver pays for the routes into
        it, split among the agents of its type. Summed over parties this is the whole graph's
        strength, so every party's loss is its part of the centralized loss; were each to pay
        for the whole graph, federated averaging would price routes ``N`` times higher than
        the receivers' gain from them."""
        return (self.comm.route_strength().sum(dim=0) * self.price_part).sum()

    def route(self, senders: Tensor) -> Tensor:
        """``[B or 1, n_local, N]`` what the router delivers to the local agents."""
        mask = delivery_mask(self.type_of_agent, self.kept_routes(), senders,
                             self.spec.bandwidth, site_of_agent=self.site_of_agent,
                             sites=self.spec.sites)
        return mask.index_select(1, self.local_index)

    def delivery_weights(self, senders: Tensor, delivered: Tensor) -> Tensor:
        """``[B or 1, n_local, N]`` weight of sender ``i``'s vector at each local receiver."""
        if not self.cfg.communicate:
            return senders.new_zeros(1, self.n_local, self.spec.n_agents)
        t = self.type_of_agent
        strength = self.comm.route_strength()[t][:, t.index_select(0, self.local_index)].T
        weights = strength[None] * delivered
        if self.spec.bandwidth is not None:
            weights = weights * priority(senders)[:, None, :]
        return weights

    def heard(self, messages: Tensor, received: Tensor | None) -> Tensor:
        """``[B, N, D]`` every sender's vector as the receivers hear it: the local agents'
        ``messages`` in ``received`` (all of them when the team holds every agent). Without
        feedback no receiver's gradient reaches a sender, in one process as over the wire."""
        if not self.cfg.feedback:
            messages = messages.detach()
        return messages if received is None else received.index_copy(
            1, self.local_index, messages)

    def act(self, feats: Tensor, context: Tensor) -> tuple[list[Tensor], Tensor]:
        joint = self.split(torch.cat([feats, context], dim=-1))
        logits = [net(x) for net, x in zip(self.policy, joint)]
        values = torch.cat([net(x) for net, x in zip(self.value, joint)], dim=1)
        return logits, values.squeeze(-1)

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        """Per-type views along the agent dimension (split, not slicing: its backward is a cat
        rather than one zero-filled full-size gradient per slice)."""
        return x.split(self.counts, dim=1)

    def respond(self, feats: Tensor, messages: Tensor, received: Tensor | None,
                delivered: Tensor, memory: Memory | None = None
                ) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """Logits and values of the local agents, given what the router delivered.

        ``received`` holds every sender's vector ``[B, N, D]`` (entries of local agents are
        replaced by ``messages``); ``None`` when the team holds every agent. ``memory``: with
        ``accumulate``, the sums and counts of the episode's earlier deliveries (the extras
        ``heard_sum`` and ``heard_count`` of the previous step).
        """
        senders = self.heard(messages, received)
        extras = {"feats": feats, "senders": senders}
        if self.cfg.accumulate:
            mask = delivered.expand(senders.shape[0], -1, -1).to(senders.dtype)
            total, count = senders[:, None] * mask[..., None], mask  # [B, n_local, N, (D)]
            if memory is not None:
                total, count = total + memory[0], count + memory[1]
            incoming = total / count.clamp(min=1)[..., None]
            weights = self.delivery_weights(senders, count > 0)
            extras |= {"heard_sum": total, "heard_count": count}
        else:
            incoming, weights = senders[:, None], self.delivery_weights(senders, delivered)
        context = self.comm.listen(feats, incoming, weights, self.local_types)
        logits, values = self.act(feats, context)
        return logits, values, extras | {"incoming": incoming, "weights": weights}

    # -- a whole step -------------------------------------------------------------------------
    def forward(self, obs: Obs, hidden: Tensor | None = None, noise: Tensor | None = None,
                received: Tensor | None = None, delivered: Tensor | None = None,
                memory: Memory | None = None, step: int = 0) -> TeamOutput:
        """Step ``step`` of the local agents.

        Parameters
        ----------
        noise
            ``[B, n_local, D]`` the channel's draw for the local vectors (``draw``; drawn if
            ``None``).
        received, delivered
            For a team without every agent: ``[B, N, D]`` the vectors of all senders as
            delivered by the router (entries of local agents are ignored) and ``[B or 1,
            n_local, N]`` which of them reached each local agent.
        """
        feats, hidden = self.encode_obs(obs, hidden)
        clean = self.speak(feats)
        drawn = self.channel.draw(clean) if noise is None else noise
        messages = self.channel.release(clean, drawn)
        if received is None and not self.whole:
            raise ValueError("a team without every agent needs the vectors it received")
        if delivered is None:
            if received is not None:
                raise ValueError("received vectors come with their delivery mask")
            delivered = self.route(messages) & self.releases_at(step)
        logits, values, extras = self.respond(feats, messages, received, delivered, memory)
        return TeamOutput(logits, values, messages, hidden, extras,
                          *self.code_terms(clean, drawn, step))

    def forward_steps(self, obs: Obs, noise: Tensor, received: Tensor | None,
                      delivered: Tensor | None) -> TeamOutput:
        """``T`` steps of the local agents from the start of their episodes, inputs and outputs
        ``[T, B, ...]``: every step's features and vectors in one batch (a GRU's recurrence
        alone step after step), and what ``accumulate``'s receivers heard up to each step as a
        cumulative sum over steps (the same as stepping, without a loop over steps)."""
        t, b = noise.shape[:2]
        feats = self.encode_steps(obs)
        clean = self.speak(feats)
        drawn = noise.flatten(0, 1)
        messages = self.channel.release(clean, drawn)
        steps = torch.arange(t, device=noise.device).repeat_interleave(b)
        release = self.releases_at(steps)
        if received is None:
            if not self.whole:
                raise ValueError("a team without every agent needs the vectors it received")
            mask = self.route(messages) & release[:, None, None]
        else:
            mask = delivered.expand(t, b, *delivered.shape[2:]).flatten(0, 1)
            received = received.flatten(0, 1)
        memory = None
        if self.cfg.accumulate:  # each step's deliveries, summed over the steps before it
            senders = self.heard(messages, received)
            heard = mask.expand(t * b, -1, -1).to(senders.dtype)
            total = (senders[:, None] * heard[..., None]).unflatten(0, (t, b))
            count = heard.unflatten(0, (t, b))
            memory = ((total.cumsum(0) - total).flatten(0, 1),
                      (count.cumsum(0) - count).flatten(0, 1))
        logits, values, _ = self.respond(feats, messages, received, mask, memory)
        code = [None if x is None else x.unflatten(0, (t, b))
                for x in self.code_terms(clean, drawn, steps)]
        probs = clean.unflatten(0, (t, b)) if self.cfg.channel == "discrete" else None
        return TeamOutput([lg.unflatten(0, (t, b)) for lg in logits],
                          values.unflatten(0, (t, b)), messages.unflatten(0, (t, b)), None,
                          code_logp=code[0], code_entropy=code[1], code_probs=probs)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """A checkpoint of host tensors, which loads on any device (``load_team``)."""
        torch.save(_on_cpu({"spec": self.spec.to_dict(), "team": asdict(self.cfg),
                            "agents": self.agents, "state_dict": self.state_dict(),
                            **(extra or {})}), path)


def _on_cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _on_cpu(v) for k, v in x.items()}
    return x


def load_team(source: str | Path, device: str | torch.device = "cpu") -> Team:
    """A team from a checkpoint file, or a run directory holding ``team.pt``, on ``device``."""
    path = Path(source)
    if path.is_dir() or not path.suffix:
        path = path / TEAM_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: is {source} a fedcomm run directory?")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    team = Team(EnvSpec.from_dict(ckpt["spec"]), TeamConfig(**ckpt["team"]), ckpt["agents"])
    team.load_state_dict(ckpt["state_dict"])
    return team.to(device)


def log_probs(logits: list[Tensor], actions: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-agent log-probability of the actions and entropy, each ``[B, N]``."""
    lps, ents = [], []
    for lg, a in zip(logits, actions):
        logp = torch.log_softmax(lg, dim=-1)
        lps.append(logp.gather(-1, a[..., None]).squeeze(-1))
        ents.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(lps, dim=-1), torch.cat(ents, dim=-1)


def sample_actions(logits: list[Tensor], greedy: bool = False,
                   generator: torch.Generator | None = None) -> list[Tensor]:
    """Greedy, or a categorical sample by the Gumbel-max trick (one op per type)."""
    if greedy:
        return [lg.argmax(dim=-1) for lg in logits]
    out = []
    for lg in logits:
        u = torch.rand(lg.shape, generator=generator, device=lg.device).clamp_(min=1e-20)
        out.append((lg - torch.log(-torch.log(u))).argmax(dim=-1))
    return out
