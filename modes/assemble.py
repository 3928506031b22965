"""The team a finished run's parties make, assembled where every party's state is at hand.

A simulation (or a deployment on one host) has every agent's private state on this machine, so
afterwards one team can be built from the global shared module and each agent's private
networks, for ``fedcomm eval``: as a whole (``team.pt``) where one team can hold the parties,
and, in a run of sites, each site's own team (``sites/s<k>.pt``) where one team can hold that
site's, for cross-play (``learning.crossplay``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedcomm.clients.state import StateStore
from fedcomm.config import FederationConfig, env_spec
from fedcomm.models.team import Team
from fedcomm.protocol.round import shared_part, type_part
from fedcomm.releases.schedule import (
    RECEIVER_PARTS,
    SENDER_PARTS,
    initial_routes,
    shared_parts,
    uses,
)
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.sim.registry import one_site

SITES_DIR = "sites"  # a run directory's per-site teams: s0.pt, s1.pt, ...


def site_team_file(run_dir: str | Path, site: int) -> Path:
    return Path(run_dir) / SITES_DIR / f"s{site}.pt"


def one_team_holds(fed: FederationConfig, agents: list[int] | None = None) -> bool:
    """Whether one team can hold the run's parties (or ``agents``): every part of the shared
    module that two of them use is averaged among them. With ``share="none"`` each keeps its
    own copy, and a team has one copy of each part."""
    routes = initial_routes(fed.train)
    owners: dict[str, set] = {}  # who holds each part's copy: an agent, or (role) a type
    for i in range(fed.spec.n_agents) if agents is None else agents:
        shared = shared_parts(fed.spec, fed.share, routes, i)
        for part in uses(fed.spec, routes, i):
            if part not in shared:
                owners.setdefault(part, set()).add(("agent", i))
            elif fed.share == "role":
                owners.setdefault(part, set()).add(("type", fed.spec.type_of_agent[i]))
    return all(len(n) <= 1 for n in owners.values())


def site_agents(fed: FederationConfig, site: int) -> list[int]:
    """The agents of ``site``, in agent order (their order in a one-site team)."""
    return [i for i, s in enumerate(fed.spec.site_of_agent) if s == site]


def assemble_team(run_dir: Path, fed: FederationConfig, site: int | None = None) -> Team:
    """The team as a whole: the global shared module and every agent's private networks; with
    ``site``, that site's agents as a team of one site's environment."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    if site is None:
        spec, agents = fed.spec, list(range(fed.spec.n_agents))
    else:
        spec = env_spec(fed.train.env, one_site(fed.train.env_kwargs, site))
        agents = site_agents(fed, site)
    team = Team(spec, fed.train.team)
    arrays = {k: torch.from_numpy(v) for k, v in ckpt.arrays.items()}
    if fed.share != "role":
        team.load_shared_state(shared_part(arrays))
    routes = initial_routes(fed.train)
    for local, i in enumerate(agents):
        agent = fed.spec.agent_ids[i]
        saved = StateStore(run_dir / "agents" / agent, {}).load(ckpt.round)
        if saved is None:
            raise FileNotFoundError(f"no private state of {agent} in {run_dir}/agents")
        team.load_agent_state(local, saved.state["team"])  # the agent's own one-agent team's
        # where its type's networks were averaged, the round's average, as it plays
        team.load_type_state_of(local, type_part(arrays, fed.spec.types[
            fed.spec.type_of_agent[i]].name))
        # the parts of the shared module only this agent used are its own copy's
        shared = shared_parts(fed.spec, fed.share, routes, i)
        if fed.share == "role":  # the parts it shares are its type's copy's
            kind = fed.spec.types[fed.spec.type_of_agent[i]].name
            team.load_shared_state(shared_part(arrays, kind), shared)
        own = [part for part in (*SENDER_PARTS, *RECEIVER_PARTS) if part not in shared
               and part in uses(fed.spec, routes, i)]
        if own and "comm" in saved.state:
            team.load_shared_state(saved.state["comm"], own)
    return team


def save_site_teams(run_dir: Path, fed: FederationConfig) -> int:
    """Each site's team in ``sites/``, where one team can hold each site's agents; how many
    were written (none in a run of one site)."""
    sites = fed.spec.sites
    if sites == 1 or not all(one_team_holds(fed, site_agents(fed, s)) for s in range(sites)):
        return 0
    for s in range(sites):
        path = site_team_file(run_dir, s)
        path.parent.mkdir(exist_ok=True)
        assemble_team(run_dir, fed, s).save(path)
    return sites
