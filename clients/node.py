"""Where an agent runs: its identity, the simulator it reaches and its durable state directory.

A SuperNode's node config says it in deployment; in simulation the defaults ``fedcomm
simulate`` gives the ClientApp plus Flower's ``partition-id`` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcomm.clients.grpc_transport import ClientTls
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.protocol.auth import read_tokens
from fedcomm.sim.base import EnvSpec


@dataclass
class AgentNode:
    """Where an agent runs: its identity, the simulator it reaches, its state directory, and
    the privacy policy it holds every round's configuration to."""

    agent_id: str
    sim_address: str
    token: str
    state_dir: Path
    policy: PrivacyPolicy
    tls: ClientTls | None = None
    device: str | None = None  # None: the run config's

    @classmethod
    def from_settings(cls, settings: dict, spec: EnvSpec) -> AgentNode:
        """From node settings: ``agent-id`` (or Flower's ``partition-id`` in simulation),
        ``sim-address``, ``token-file``, ``state-dir`` (or ``state-root``, one folder per
        agent), and optionally ``sim-ca``, ``sim-cert``, ``sim-key`` for TLS to the simulator
        and ``device`` (this node's, over the run config's ``--device``).
        """
        if "agent-id" in settings:
            agent_id = str(settings["agent-id"])
        elif "partition-id" in settings:
            pid = int(settings["partition-id"])
            if not 0 <= pid < spec.n_agents:
                raise ValueError(f"node {pid} has no agent: {spec.name} has {spec.n_agents}")
            agent_id = spec.agent_ids[pid]
        else:
            raise ValueError("the node config names no agent-id")
        if agent_id not in spec.agent_ids:
            raise ValueError(f"no agent {agent_id!r} in {spec.name}; agents: "
                             f"{', '.join(spec.agent_ids)}")
        for key in ("sim-address", "token-file"):
            if key not in settings:
                raise ValueError(f"the node config of {agent_id} lacks {key}")
        token = read_tokens(settings["token-file"]).get(agent_id)
        if not token:
            raise ValueError(f"no token for {agent_id} in {settings['token-file']}")
        if "state-dir" in settings:
            state_dir = Path(settings["state-dir"])
        elif "state-root" in settings:
            state_dir = Path(settings["state-root"]) / agent_id
        else:
            raise ValueError(f"the node config of {agent_id} lacks state-dir")
        tls = None
        if settings.get("sim-ca"):
            tls = ClientTls(Path(settings["sim-ca"]),
                            Path(settings["sim-cert"]) if settings.get("sim-cert") else None,
                            Path(settings["sim-key"]) if settings.get("sim-key") else None)
        device = str(settings["device"]) if settings.get("device") else None
        policy = PrivacyPolicy.from_settings(settings, agent_id)
        return cls(agent_id, str(settings["sim-address"]), token, state_dir, policy, tls,
                   device)

