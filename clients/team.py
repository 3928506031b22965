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

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fedcomm.clients.comm import CommModule, clip_norm
from fedcomm.clients.layers import GroupGRUCell, group_mlp
from fedcomm.sim.base import EnvSpec, Obs
from fedcomm.sim.router import delivery_mask, priority


@dataclass
class TeamConfig:
    hidden: int = 64
    comm_dim: int = 16
    encoder: str = "mlp"  # or "superposition"
    n_superpositions: int = 8
    recurrent: bool = False
    clip: float = 1.0  # C: every knowledge vector is clipped to this L2 norm
    noise_multiplier: float = 0.5  # sigma: channel noise std is sigma * C per coordinate
    communicate: bool = True  # False delivers nothing: the no-communication ablation
    prune_threshold: float = 0.3  # routes whose strength falls below this are not sent
    graph_init: float = 1.0  # initial route logit (strength sigmoid(1) = 0.73)

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.noise_multiplier < 0:
            raise ValueError("clip must be positive and noise_multiplier non-negative")
        if self.hidden < 1 or self.comm_dim < 1:
            raise ValueError("hidden and comm_dim must be positive")


@dataclass
class TeamOutput:
    logits: list[Tensor]  # per type [B, count, n_actions]
    values: Tensor  # [B, N]
    messages: Tensor  # [B, N, D], as sent: clipped and noised
    hidden: Tensor | None  # [B, N, H] recurrent state after this step
    extras: dict[str, Tensor] = field(default_factory=dict)


class Team(nn.Module):
    def __init__(self, spec: EnvSpec, cfg: TeamConfig | None = None) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg or TeamConfig()
        h = self.cfg.hidden
        self.features = nn.ModuleList(group_mlp(t.count, [t.obs_dim, h, h]) for t in spec.types)
        self.rnn = (nn.ModuleList(GroupGRUCell(t.count, h, h) for t in spec.types)
                    if self.cfg.recurrent else None)
        self.comm = CommModule(len(spec.types), h, self.cfg.comm_dim, self.cfg.encoder,
                               self.cfg.n_superpositions, self.cfg.graph_init)
        self.policy = nn.ModuleList(
            group_mlp(t.count, [2 * h, h, t.n_actions], out_gain=0.01) for t in spec.types)
        self.value = nn.ModuleList(
            group_mlp(t.count, [2 * h, h, 1], out_gain=1.0) for t in spec.types)
        self.register_buffer("type_of_agent", torch.tensor(spec.type_of_agent), persistent=False)

    # -- the pieces of a step ---------------------------------------------------------------
    def initial_hidden(self, batch: int) -> Tensor | None:
        if not self.cfg.recurrent:
            return None
        return torch.zeros(batch, self.spec.n_agents, self.cfg.hidden,
                           device=self.type_of_agent.device)

    def encode_obs(self, obs: Obs, hidden: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Private features ``[B, N, H]`` (and the new recurrent state)."""
        feats = torch.cat([net(o) for net, o in zip(self.features, obs)], dim=1)
        if self.rnn is None:
            return feats, None
        if hidden is None:
            raise ValueError("a recurrent team needs its hidden state")
        parts = zip(self.rnn, self.split(feats), self.split(hidden))
        feats = torch.cat([cell(f, h) for cell, f, h in parts], dim=1)
        return feats, feats

    def speak(self, feats: Tensor) -> Tensor:
        """Knowledge vectors before noise: encoded and clipped to norm C."""
        return clip_norm(self.comm.encode(feats), self.cfg.clip)

    def sample_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None
                     ) -> Tensor:
        std = self.cfg.noise_multiplier * self.cfg.clip
        noise = torch.randn(*shape, generator=generator, device=self.type_of_agent.device)
        return noise * std

    def delivery_weights(self, messages: Tensor) -> Tensor:
        """``[B or 1, N, N]`` weight of the vector from sender ``i`` at receiver ``j``."""
        if not self.cfg.communicate:
            return messages.new_zeros(1, self.spec.n_agents, self.spec.n_agents)
        routes = self.comm.kept_routes(self.cfg.prune_threshold)
        mask = delivery_mask(self.type_of_agent, routes, messages, self.spec.bandwidth)
        t = self.type_of_agent
        weights = self.comm.route_strength()[t][:, t].T[None] * mask
        if self.spec.bandwidth is not None:
            weights = weights * priority(messages)[:, None, :]
        return weights

    def act(self, feats: Tensor, context: Tensor) -> tuple[list[Tensor], Tensor]:
        joint = self.split(torch.cat([feats, context], dim=-1))
        logits = [net(x) for net, x in zip(self.policy, joint)]
        values = torch.cat([net(x) for net, x in zip(self.value, joint)], dim=1)
        return logits, values.squeeze(-1)

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        """Per-type views along the agent dimension (split, not slicing: its backward is a cat
        rather than one zero-filled full-size gradient per slice)."""
        return x.split([t.count for t in self.spec.types], dim=1)

    # -- a whole step, all agents in one graph -----------------------------------------------
    def forward(self, obs: Obs, hidden: Tensor | None = None, noise: Tensor | None = None
                ) -> TeamOutput:
        feats, hidden = self.encode_obs(obs, hidden)
        clean = self.speak(feats)
        if noise is None:
            noise = self.sample_noise(tuple(clean.shape))
        messages = clean + noise
        weights = self.delivery_weights(messages)
        incoming = messages[:, None]  # every receiver sees the same senders: broadcast
        context = self.comm.listen(feats, incoming, weights)
        logits, values = self.act(feats, context)
        return TeamOutput(logits, values, messages, hidden,
                          {"feats": feats, "incoming": incoming, "weights": weights})

    def save_config(self) -> dict:
        return {"spec": self.spec.to_dict(), "team": asdict(self.cfg)}


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
