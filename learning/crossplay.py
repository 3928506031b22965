"""Cross-play: the senders of one site with the receivers of another, that never trained together.

Federated sites whose shared module the server averaged should speak one language: a speaker
of site ``a`` and a listener of site ``b`` understand each other about as well as each site's
own pair. Sites trained alone (``--share none``) each invent a code, equal up to a permutation
at best, so across sites they should do no better than not communicating. The matrix holds the
gap closed (no communication -> oracle, the receivers' site's scripted teams) with senders'
site by row and receivers' by column; its diagonal is each site's own team.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedcomm.baselines import evaluate_scripted
from fedcomm.learning.evaluate import evaluate_team
from fedcomm.models.team import Team
from fedcomm.releases.schedule import SENDER_PARTS


def sender_types(team: Team) -> list[int]:
    """The types whose vectors reach another type and that receive none, on the routes the
    team keeps: the team's speakers. ``ValueError`` where every sending type also receives
    (no side to swap)."""
    allowed = team.kept_routes().cpu()
    out = [k for k in range(len(team.spec.types))
           if bool(allowed[k].any()) and not bool(allowed[:, k].any())]
    if not out:
        names = ", ".join(t.name for t in team.spec.types)
        raise ValueError(f"cross-play pairs the agents that only send with those that receive; "
                         f"in {team.spec.name} every type that sends also receives ({names})")
    return out


def paired(senders: Team, receivers: Team) -> Team:
    """``receivers``' team with its sending agents, and the encoder, taken from ``senders``."""
    team = copy.deepcopy(receivers)
    kinds = sender_types(team)
    for i in team.agents:
        if team.spec.type_of_agent[i] in kinds:
            team.load_agent_state(i, senders.agent_state(i))
    team.load_shared_state(senders.shared_state(SENDER_PARTS), SENDER_PARTS)
    return team


@dataclass(frozen=True)
class CrossPlay:
    """``returns[a][b]``: the senders of site ``a`` with the receivers of site ``b``;
    ``gap_closed[a][b]`` the same as a share of site ``b``'s gap (no_comm -> oracle)."""

    returns: list[list[float]]
    gap_closed: list[list[float]]

    @property
    def diagonal(self) -> float:
        """The mean gap closed by each site's own team."""
        n = len(self.gap_closed)
        return sum(self.gap_closed[i][i] for i in range(n)) / n

    @property
    def off_diagonal(self) -> float:
        """The mean gap closed by pairs of different sites."""
        n = len(self.gap_closed)
        cells = [self.gap_closed[a][b] for a in range(n) for b in range(n) if a != b]
        return sum(cells) / len(cells)

    def to_dict(self) -> dict:
        return {"gap_closed": self.gap_closed, "returns": self.returns,
                "diagonal": self.diagonal, "off_diagonal": self.off_diagonal}


def cross_play(teams: Sequence[Team], env: str, site_kwargs: Sequence[dict], episodes: int,
               seed: int = 0, device: str | torch.device = "cpu") -> CrossPlay:
    """Every site's senders with every site's receivers, each pair greedy on the receivers'
    site's environment (``site_kwargs[b]``), ``episodes`` each from ``seed``."""
    if len(teams) != len(site_kwargs) or len(teams) < 2:
        raise ValueError("cross-play needs a team and the options of each of at least 2 sites")
    n = len(teams)
    gaps, returns = [[0.0] * n for _ in range(n)], [[0.0] * n for _ in range(n)]
    for b in range(n):
        low = evaluate_scripted(env, "no_comm", episodes, seed, env_kwargs=site_kwargs[b],
                                device=device).return_mean
        high = evaluate_scripted(env, "oracle", episodes, seed, env_kwargs=site_kwargs[b],
                                 device=device).return_mean
        for a in range(n):
            team = teams[b] if a == b else paired(teams[a], teams[b])
            r = evaluate_team(team, env, episodes, seed, env_kwargs=site_kwargs[b]).return_mean
            returns[a][b] = r
            gaps[a][b] = (r - low) / (high - low) if high != low else float("nan")
    return CrossPlay(returns, gaps)
