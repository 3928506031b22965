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

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedcomm.config import TeamConfig
from fedcomm.models.comm import CommModule, clip_norm
from fedcomm.models.layers import GroupGRUCell, group_mlp
from fedcomm.sim.base import EnvSpec, Obs, one_hot
from fedcomm.sim.router import delivery_mask, priority

SHARED = "comm."  # the shared module's parameters; every other one is private
TEAM_FILE = "team.pt"  # a run directory's trained team
_GLOBAL_RNG = threading.Lock()  # initialisers draw from torch's process-wide generator

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


class Team(nn.Module):
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
                               self.cfg.n_superpositions, self.cfg.graph_init)
        self.policy = nn.ModuleList(group_mlp(c, [2 * h, h, t.n_actions], out_gain=0.01)
                                    for t, c in zip(kinds, self.counts))
        self.value = nn.ModuleList(
            group_mlp(c, [2 * h, h, 1], out_gain=1.0) for c in self.counts)
        self.register_buffer("type_of_agent", torch.tensor(spec.type_of_agent), persistent=False)
        self.register_buffer("local_index", torch.tensor(self.agents), persistent=False)
        self.register_buffer("allowed", torch.tensor(self.cfg.allowed_routes(spec)),
                             persistent=False)
        # Each local agent type's share of the graph's price (see ``route_cost``).
        share = torch.zeros(len(spec.types))
        for k, c in zip(self.types, self.counts):
            share[k] = c / spec.types[k].count
        self.register_buffer("route_share", share, persistent=False)
        # Built last, so that the other networks' initial weights are those without it.
        self.recall = (nn.ModuleList(group_mlp(c, [self.cfg.symbols, h, t.obs_dim])
                                     for t, c in zip(kinds, self.counts))
                       if self.cfg.recall else None)

    @classmethod
    def initial(cls, spec: EnvSpec, cfg: TeamConfig, seed: int,
                agents: Sequence[int] | None = None) -> Team:
        """A run's initial team for ``seed`` (or its ``agents``' part): the same weights for
        the server, every agent and the centralized trainer."""
        with _GLOBAL_RNG, torch.random.fork_rng():  # a subteam draws initial weights too
            torch.manual_seed(seed)
            team = cls(spec, cfg)
            return team if agents is None else team.subteam(agents)

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
        """What the channel's release is drawn around, differentiable in the sender's networks.

        Gaussian: the vector encoded and clipped to norm C (the noise is added to it).
        Discrete: the expected released one-hot, ``b + (a - b) softmax(logits)``, where ``a``
        is randomized response's probability of keeping the sampled codeword and ``b`` of each
        other one: the released codeword is drawn from it, and its gradient is the
        straight-through one (``release``).
        """
        encoded = self.comm.encode(feats)
        if self.cfg.channel == "gaussian":
            return clip_norm(encoded, self.cfg.clip)
        keep, other = self.response_probabilities()
        return other + (keep - other) * torch.softmax(self.code_logits(encoded), dim=-1)

    def code_logits(self, encoded: Tensor) -> Tensor:
        """A discrete code's logits: the encoder's output standardised over the codewords and
        scaled by ``cfg.code_scale``, so that a new code depends on what its sender sees."""
        centred = encoded - encoded.mean(dim=-1, keepdim=True)
        scale = centred.pow(2).mean(dim=-1, keepdim=True).add(1e-6).rsqrt()
        return centred * (scale * self.cfg.code_scale)

    def response_probabilities(self) -> tuple[float, float]:
        """Randomized response's probabilities: the codeword kept, each other one."""
        k, eps = self.cfg.symbols, self.cfg.rr_epsilon
        other = 1.0 / (math.exp(eps) + k - 1)
        return 1.0 - (k - 1) * other, other

    def draw(self, clean: Tensor, generator: torch.Generator | None = None,
             greedy: bool = False) -> Tensor:
        """The channel's privacy noise for ``clean`` (``speak``'s output), the release's random
        part: Gaussian noise of std ``sigma C``; or, discrete, the released one-hot: a codeword
        sampled from the encoder (its most likely one when ``greedy``), then kept with
        probability ``a`` and replaced by each other one with ``b``. Drawn from ``generator``
        (the privacy noise's)."""
        device = self.local_index.device
        if self.cfg.channel == "gaussian":
            noise = torch.randn(*clean.shape, generator=generator, device=device)
            return noise * (self.cfg.noise_multiplier * self.cfg.clip)
        keep, other = self.response_probabilities()
        k = self.cfg.symbols
        # The encoder's own choice, then randomized response applied to whatever it is: the
        # mechanism's guarantee does not depend on the encoder's output being a distribution.
        probs = ((clean - other) / (keep - other)).nan_to_num(0.0, 0.0, 0.0).clamp_(min=0.0)
        total = probs.sum(dim=-1, keepdim=True)
        probs = torch.where(total > 0, probs / total.clamp(min=1e-30), 1.0 / k)
        if greedy:
            chosen = probs.argmax(dim=-1)
        else:
            u = torch.rand(clean.shape, generator=generator, device=device).clamp_(min=1e-20)
            chosen = (probs.clamp(min=1e-30).log() - torch.log(-torch.log(u))).argmax(dim=-1)
        kept = torch.rand(chosen.shape, generator=generator, device=device) < keep
        shift = torch.randint(1, k, chosen.shape, generator=generator, device=device)
        symbol = torch.where(kept, chosen, (chosen + shift) % k)
        return one_hot(symbol, k).to(clean.dtype)

    def release(self, clean: Tensor, drawn: Tensor) -> Tensor:
        """The released vector: ``clean + noise`` (Gaussian); the drawn one-hot, with the
        gradient of its expectation ``clean`` (discrete, straight-through)."""
        if self.cfg.channel == "gaussian":
            return clean + drawn
        return drawn + (clean - clean.detach())

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
        """The local agents' share of the graph's price: each receiver pays for the routes into
        it, split among the agents of its type. Summed over parties this is the whole graph's
        strength, so every party's loss is its share of the centralized loss; were each to pay
        for the whole graph, federated averaging would price routes ``N`` times higher than
        the receivers' gain from them."""
        return (self.comm.route_strength().sum(dim=0) * self.route_share).sum()

    def route(self, senders: Tensor) -> Tensor:
        """``[B or 1, n_local, N]`` what the router delivers to the local agents."""
        mask = delivery_mask(self.type_of_agent, self.kept_routes(), senders,
                             self.spec.bandwidth)
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
        context = self.comm.listen(feats, incoming, weights)
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
        drawn = self.draw(clean) if noise is None else noise
        messages = self.release(clean, drawn)
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
        messages = self.release(clean, drawn)
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

    # -- what of the team is whose: the layout of its parameters -------------------------------
    # The shared module's parameters are ``comm.<path>``; every private one is
    # ``<network>.<type position>.<path>`` with one row per agent of that type (``layers``).
    # Only these methods read that layout.
    def shared_state(self, parts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Host copies of the shared communication module (or of its ``parts``: ``encoder``,
        ``decoder``, ...), by path in it: what an agent sends to the server."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.comm.state_dict().items()
                if parts is None or k.partition(".")[0] in parts}

    @torch.no_grad()
    def load_shared_state(self, state: dict[str, Tensor], parts: Sequence[str] | None = None
                          ) -> None:
        """Load the shared module (or its ``parts``) from ``shared_state`` output."""
        if parts is None:
            self.comm.load_state_dict(state)
            return
        chosen = {k: v for k, v in state.items() if k.partition(".")[0] in parts}
        self.comm.load_state_dict(chosen, strict=False)

    def private_state(self) -> dict[str, Tensor]:
        """Everything but the shared module: the local agents' private networks."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(SHARED)}

    def load_private_state(self, state: dict[str, Tensor]) -> None:
        """Load the private networks; ``ValueError`` if ``state`` is another team's."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ
            raise ValueError(f"the saved private state does not fit this agent's model: {e}"
                             ) from None
        if unexpected or any(not k.startswith(SHARED) for k in missing):
            raise ValueError(f"the saved private state does not fit this agent's model "
                             f"(missing {missing}, unexpected {unexpected})")

    def _slot(self, agent: int) -> tuple[int, int]:
        """Where ``agent``'s private weights are: its type's position here, and its row."""
        if agent not in self.agents:
            raise ValueError(f"agent {agent} is not in this team (agents {self.agents})")
        k = self.spec.type_of_agent[agent]
        members = [i for i in self.agents if self.spec.type_of_agent[i] == k]
        return self.types.index(k), members.index(agent)

    def _private_params(self) -> list[tuple[str, int, str, Tensor]]:
        """``(network, type position, path, parameter)`` of every private parameter."""
        out = []
        for name, param in self.named_parameters():
            head, _, rest = name.partition(".")
            if head != "comm":
                pos, _, path = rest.partition(".")
                out.append((head, int(pos), path, param))
        return out

    def agent_state(self, agent: int) -> dict[str, Tensor]:
        """``agent``'s private networks as a team holding only that agent names them."""
        pos, row = self._slot(agent)
        return {f"{head}.0.{path}": param.detach()[row:row + 1]
                for head, p, path, param in self._private_params() if p == pos}

    @torch.no_grad()
    def load_agent_state(self, agent: int, state: dict[str, Tensor]) -> None:
        """Load ``agent``'s private networks from ``agent_state`` output (of any team)."""
        pos, row = self._slot(agent)
        for head, p, path, param in self._private_params():
            if p == pos:
                param[row].copy_(state[f"{head}.0.{path}"][0])

    def type_state(self) -> dict[str, Tensor]:
        """Host copies of a one-type team's private networks, named without the type
        position: the same names in every party of that type (for averaging them)."""
        if len(self.types) != 1:
            raise ValueError("type_state is for a team of one agent type")
        return {f"{head}.{path}": param.detach().to("cpu", copy=True)
                for head, _, path, param in self._private_params()}

    @torch.no_grad()
    def load_type_state(self, state: dict[str, Tensor]) -> None:
        """Load what ``type_state`` names; entries it lacks keep their values."""
        for head, _, path, param in self._private_params():
            if f"{head}.{path}" in state:
                param.copy_(state[f"{head}.{path}"])

    @torch.no_grad()
    def subteam(self, agents: Sequence[int]) -> Team:
        """A team of some of this team's agents, with their weights and the shared module."""
        sub = Team(self.spec, self.cfg, agents).to(self.local_index.device)
        if not set(sub.agents) <= set(self.agents):
            raise ValueError(f"agents {agents} are not all in this team")
        sub.load_shared_state(self.shared_state())
        for agent in sub.agents:
            sub.load_agent_state(agent, self.agent_state(agent))
        return sub

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


def categorical_entropy(p: Tensor) -> Tensor:
    """The entropy of each distribution ``p`` over the last dimension."""
    return -(p * p.clamp(min=1e-30).log()).sum(dim=-1)


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
