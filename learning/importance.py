"""Counterfactual communication importance: how much each incoming vector moves a policy.

For every delivered route ``i -> j`` the receiver's policy is recomputed as if ``i``'s vector had
not arrived, and the KL divergence ``KL(pi_j(. | all) || pi_j(. | all but i))`` is averaged per
(sender type, receiver type). All counterfactuals of a step are evaluated as one batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedcomm.learning.rollout import Rollout
from fedcomm.models.team import Team, memory_of


@torch.no_grad()
def communication_importance(team: Team, rollout: Rollout) -> Tensor:
    """``[K, K]`` mean KL per (sender type, receiver type); NaN where nothing was delivered."""
    spec = team.spec
    n, k = spec.n_agents, len(spec.types)
    pair = (team.type_of_agent[:, None] * k + team.type_of_agent[None, :]).flatten()  # [i, j]
    device = team.local_index.device
    total = torch.zeros(k * k, device=device)
    count = torch.zeros(k * k, device=device)
    hidden, memory = team.initial_hidden(rollout.num_envs), None
    eye = torch.eye(n, dtype=torch.bool, device=device)
    for t in range(rollout.rewards.shape[0]):
        out = team([o[t] for o in rollout.obs], hidden, rollout.noise[t], memory=memory)
        hidden, memory = out.hidden, memory_of(out.extras)
        feats, incoming = out.extras["feats"], out.extras["incoming"]
        b = feats.shape[0]
        weights = out.extras["weights"].expand(b, n, n)
        # Counterfactual c drops sender c's vector at every receiver: [B, c, Nr, Ns].
        w_cf = weights[:, None] * ~eye[None, :, None, :]
        ctx = team.comm.listen(
            feats[:, None].expand(b, n, n, -1).flatten(0, 1),
            incoming[:, None].expand(b, n, *incoming.shape[1:]).flatten(0, 1),
            w_cf.flatten(0, 1), team.local_types)
        logits_cf, _ = team.act(feats[:, None].expand(b, n, n, -1).flatten(0, 1), ctx)
        kl = []
        for full, cf in zip(out.logits, logits_cf):
            lp_full = torch.log_softmax(full, -1)[:, None]  # [B, 1, n_k, A]
            lp_cf = torch.log_softmax(cf, -1).unflatten(0, (b, n))  # [B, c, n_k, A]
            kl.append((lp_full.exp() * (lp_full - lp_cf)).sum(-1))
        kl_cr = torch.cat(kl, dim=-1)  # [B, sender c, receiver r]
        delivered = weights.transpose(1, 2) > 0  # [B, sender, receiver]
        total.index_add_(0, pair, (kl_cr * delivered).sum(0).flatten())
        count.index_add_(0, pair, delivered.sum(0).flatten().float())
    return (total / count).reshape(k, k)  # 0/0 -> NaN: no route of that kind delivered
