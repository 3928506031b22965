"""What the simulator takes in at most, derived from the run: message sizes, calls in flight
and frames queued per agent.

Anyone who reaches the port can send bytes, and every agent can send frames faster than the
step loop reads them. Each bound here is what an honest party of this run can need, with some
headroom: past it, a call is refused (``RESOURCE_EXHAUSTED``) before what it sends is held in
memory.
"""

from __future__ import annotations

from fedcomm.sim.base import EnvSpec

FLOAT32_BYTES = 4
INT64_BYTES = 8
# Headers, DP parameters, shapes, the sender list and a join's routes around a message's tensors.
ENVELOPE_BYTES = 64 * 2**10
GRPC_MESSAGE_BYTES = 2**31 - 1  # gRPC's own ceiling (a signed 32-bit length)
# The largest comm_dim a join may declare unless the simulator is told otherwise (the default
# team's is 16).
DEFAULT_MAX_COMM_DIM = 64
# Describe, Join, Step and Feedback: the most calls one agent needs in flight at once.
CALLS_PER_AGENT = 4
# Connections full of calls the whole server handles at once: the agents' own, and callers
# being refused.
BUSY_CONNECTIONS = 4
# An honest agent sends each frame after the simulator's answer to the one before, so at most
# one waits for the step loop; a second is slack.
INBOX_FRAMES = 2


def message_limit(spec: EnvSpec, num_envs: int, comm_dim: int) -> int:
    """The largest message of a run of ``spec`` with ``num_envs`` environments whose agents
    declare ``comm_dim`` at most, plus a sixteenth and an envelope of headroom.

    The largest is usually a receiver's feedback for every other agent, ``[N-1, T, B, comm_dim]``
    float32; otherwise the feedback sum a sender gets back, the routed vectors with their mask,
    or an observation with its reward.
    """
    others, t, b, d = spec.n_agents - 1, spec.episode_length, num_envs, comm_dim
    obs_dim = max(kind.obs_dim for kind in spec.types)
    tensors = max(others * t * b * d * FLOAT32_BYTES,
                  t * b * d * FLOAT32_BYTES,
                  others * b * (d * FLOAT32_BYTES + 1),
                  b * (obs_dim + 1) * FLOAT32_BYTES,
                  b * INT64_BYTES)
    limit = tensors + tensors // 16 + ENVELOPE_BYTES
    if limit > GRPC_MESSAGE_BYTES:
        raise ValueError(f"messages of up to {limit} bytes exceed gRPC's limit of "
                         f"{GRPC_MESSAGE_BYTES}: serve fewer environments or a smaller comm_dim")
    return limit


def streams_per_connection(n_agents: int) -> int:
    """Calls one connection may have in flight: every agent's at once (a test, or a process of
    several agents, shares one). A caller that knows the limit waits to open more; streams
    opened past it are refused (the caller sees UNAVAILABLE)."""
    return CALLS_PER_AGENT * n_agents


def concurrent_calls(n_agents: int) -> int:
    """Calls the whole server handles at once; past it a call gets RESOURCE_EXHAUSTED."""
    return BUSY_CONNECTIONS * streams_per_connection(n_agents)
