"""Waves: the agents a round's messages go to at once, where not every agent can run at once.

A site's agents step their copy of the environment in lockstep, so all of them must be running
together; a simulation runs a pool of ClientApps (Flower's actors) that may be smaller than
the run. The server then sends each round's messages wave by wave: whole sites, as many as
the pool runs at once, the next wave when the last one has answered. Sites are independent
until the server averages them, so a round in waves trains the same as one all at once.

To know which node is which agent, the server asks each node it does not know (a Flower
``QUERY`` message carrying the run's configuration); the answer counts only signed with that
agent's key (``protocol.signing``), so no node can take another agent's place in a wave.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message

from fedcomm.protocol.round import AGENT_PHASES, PROOF
from fedcomm.protocol.signing import SIGNATURE, verifies
from fedcomm.sim.base import EnvSpec


def identities(queries: Sequence[Message], replies: Sequence[Message],
               keys: Mapping[str, str]) -> dict[int, str]:
    """Each answering node's agent, from its reply to one of ``queries``
    (``protocol.round.identity_query``); ``ValueError`` (one line) where a reply does not
    answer as an agent of the run under that agent's key."""
    sent = {m.metadata.message_id for m in queries}
    out: dict[int, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        proof = reply.content.get(PROOF)
        agent = str(proof.get("agent_id", "")) if isinstance(proof, ConfigRecord) else ""
        asked = reply.metadata.reply_to_message_id
        if agent not in keys or asked not in sent or not verifies(
                keys[agent], asked, agent, reply.content, str(proof.get(SIGNATURE, ""))):
            raise ValueError(f"node {node} does not answer as an agent of the run under its "
                             "key")
        out[node] = agent
    return out


@dataclass(frozen=True)
class Wave:
    """Sites whose agents run at once, and their nodes."""

    sites: tuple[int, ...]
    nodes: tuple[int, ...]


def waves(spec: EnvSpec, agent_of: Mapping[int, str], capacity: int) -> list[Wave]:
    """The nodes of ``agent_of`` in waves of whole sites, each at most ``capacity`` agents,
    sites in order. A site larger than ``capacity`` cannot run (``ValueError``)."""
    site_of = dict(zip(spec.agent_ids, spec.site_of_agent))
    per_site = spec.site_size
    if per_site > capacity:
        raise ValueError(f"a site's {per_site} agents step together, and only {capacity} "
                            "run at once")
    by_site: dict[int, list[int]] = {}
    for node, agent in sorted(agent_of.items()):
        by_site.setdefault(site_of[agent], []).append(node)
    out: list[Wave] = []
    sites: list[int] = []
    for site in sorted(by_site):
        if sites and (len(sites) + 1) * per_site > capacity:
            out.append(_wave(sites, by_site))
            sites = []
        sites.append(site)
    if sites:
        out.append(_wave(sites, by_site))
    return out


def _wave(sites: list[int], by_site: Mapping[int, list[int]]) -> Wave:
    return Wave(tuple(sites), tuple(n for s in sites for n in by_site[s]))


def split(messages: Sequence[Message], schedule: Sequence[Wave]) -> Iterator[list[Message]]:
    """``messages`` wave by wave (each wave's, by destination node)."""
    for wave in schedule:
        nodes = set(wave.nodes)
        yield [m for m in messages if m.metadata.dst_node_id in nodes]


def agents_time(timings: Sequence[tuple[int, Mapping[str, float]]],
                schedule: Sequence[Wave]) -> dict[str, float]:
    """Each phase of a round's agents (``timings``: each agent's site and phases) as the
    round's time sees it: within a wave, the slowest agent's (they run side by side), summed
    over the waves (one after another). Without waves, the slowest agent's."""
    wave_of = {site: w for w, wave in enumerate(schedule) for site in wave.sites}
    by_wave: dict[int, list[Mapping[str, float]]] = {}
    for site, phases in timings:
        by_wave.setdefault(wave_of.get(site, 0), []).append(phases)
    return {k: sum(max(p.get(k, 0.0) for p in rows) for rows in by_wave.values())
            for k in AGENT_PHASES}

