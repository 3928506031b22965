"""Where an agent runs: its identity, the simulator it reaches and its durable state directory.

A SuperNode's node config says it in deployment; in simulation the defaults ``fedcomm
simulate`` gives the ClientApp plus Flower's ``partition-id`` do. ``node_config`` writes such
settings and ``AgentNode.from_settings`` reads them: the keys live here alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcomm.clients.grpc_transport import ClientTls
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.protocol.auth import read_tokens
from fedcomm.protocol.signing import KEY_FILE
from fedcomm.protocol.worker import WORKER_SOCKET, WORKER_TOKEN
from fedcomm.sim.base import EnvSpec


def node_config(*, sim_address: str, token_file: str | Path, server_key_file: str | Path,
                policy: PrivacyPolicy, agent_id: str | None = None,
                state_dir: str | Path | None = None, state_root: str | Path | None = None,
                tls: ClientTls | None = None, device: str | None = None,
                worker_socket: str | Path | None = None,
                worker_token: str | Path | None = None) -> dict[str, str]:
    """The node settings ``AgentNode.from_settings`` reads: who the agent is (``agent_id``;
    in simulation Flower's ``partition-id`` instead), where it reaches the simulator and with
    what token and TLS files, the key it signs its replies with, its state directory (or a
    root of one per agent), its privacy policy, its device, and its worker's socket and token
    where it has one."""
    settings: dict[str, object] = {
        "agent-id": agent_id, "state-dir": state_dir, "state-root": state_root,
        "sim-address": sim_address, "token-file": token_file, KEY_FILE: server_key_file,
        "device": device, WORKER_SOCKET: worker_socket, WORKER_TOKEN: worker_token}
    if tls is not None:
        settings |= {"sim-ca": tls.ca, "sim-cert": tls.cert, "sim-key": tls.key}
    return {k: str(v) for k, v in settings.items() if v is not None} | policy.to_settings()


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

