"""What of a team is whose: the layout of its parameters, read and written by owner.

The shared communication module's parameters are ``comm.<path>``; every private one is
``<network>.<type position>.<path>`` with one row per agent of that type (``models.layers``).
``TeamState`` is the only code that reads that layout: what an agent sends the server (the
shared module, or its parts), what it keeps (its private networks), one agent's slot of a team,
and a type's networks named the same in every party of that type.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SHARED = "comm."  # the shared module's parameters; every other one is private


class TeamState:
    """The state methods of ``models.team.Team`` (its ``comm``, ``spec``, ``cfg``, ``agents``
    and ``types``)."""

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
    def load_type_state_of(self, agent: int, state: dict[str, Tensor]) -> None:
        """Load what ``type_state`` names (a one-agent party of ``agent``'s type, or its
        type's average) into ``agent``'s slot; entries it lacks keep their values."""
        pos, row = self._slot(agent)
        for head, p, path, param in self._private_params():
            if p == pos and f"{head}.{path}" in state:
                param[row].copy_(state[f"{head}.{path}"][0])

    @torch.no_grad()
    def subteam(self, agents: Sequence[int]) -> TeamState:
        """A team of some of this team's agents, with their weights and the shared module."""
        sub = type(self)(self.spec, self.cfg, agents).to(self.local_index.device)
        if not set(sub.agents) <= set(self.agents):
            raise ValueError(f"agents {agents} are not all in this team")
        sub.load_shared_state(self.shared_state())
        for agent in sub.agents:
            sub.load_agent_state(agent, self.agent_state(agent))
        return sub
