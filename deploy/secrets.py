"""Every secret a deployment needs, made in one place: ``fedcomm deploy secrets``.

- a private CA, and server certificates signed by it for the SuperLink and the simulator;
- one client certificate per agent, for mutual TLS to the simulator;
- one ECDSA P-384 key pair per agent's SuperNode (OpenSSH format, what Flower's node
  authentication reads); the SuperLink admits only registered public keys;
- one simulator token per agent: ``tokens.json`` for the simulator, and a file with only its
  own token for each agent;
- one worker token per agent (``worker.token``), which its relaying ClientApp shows its worker;
- one server key per agent, which signs its replies to the server (``protocol.signing``): a file
  with only its own key for each agent, and ``agent-keys.json`` for the SuperLink's host;
- the simulator's episode key (``sim/episode.key``), which keys every episode batch's
  randomness (``sim.episodes``): a restarted simulator goes on with the same one.

Private keys and tokens are written readable by their owner only (``fedcomm.files``: also over
a file or link that was there); the layout is one folder per party, so that each host is handed
its own folder and the CA certificate, nothing else::

    DIR/ca.crt  DIR/ca.key
    DIR/superlink/{server.crt,server.key,agent-keys.json}
    DIR/sim/{server.crt,server.key,tokens.json,episode.key}
    DIR/agents/<agent>/{ca.crt,client.crt,client.key,node.key,node.pub,token.json,worker.token,
                        server-key.json}
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcomm.files import write_private
from fedcomm.protocol.auth import generate_tokens, write_tokens
from fedcomm.sim.episodes import KEY_BYTES

VALID_DAYS = 365
LOOPBACK = ("localhost", "127.0.0.1")


class AgentSecrets:
    """What one agent's host holds."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ca = folder / "ca.crt"
        self.cert, self.key = folder / "client.crt", folder / "client.key"  # mTLS to the sim
        self.node_key, self.node_pub = folder / "node.key", folder / "node.pub"  # SuperNode auth
        self.token_file = folder / "token.json"
        self.worker_token = folder / "worker.token"  # what its ClientApp shows its worker
        self.server_key = folder / "server-key.json"  # signs its replies to the server


class DeploymentSecrets:
    """Every party's secrets, in one folder per party."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ca = folder / "ca.crt"
        self.superlink, self.sim = folder / "superlink", folder / "sim"
        self.tokens = self.sim / "tokens.json"
        self.episode_key = self.sim / "episode.key"  # keys the episodes' randomness
        self.agent_keys = self.superlink / "agent-keys.json"  # every agent's server key

    def agent(self, agent_id: str) -> AgentSecrets:
        return AgentSecrets(self.dir / "agents" / agent_id)

    def exists(self, agent_ids: Sequence[str]) -> bool:
        """Whether they were made, for these agents (secrets of an older layout lack a worker
        token or a server key)."""
        made = (self.ca, self.tokens, self.agent_keys, self.episode_key)
        return all(p.exists() for p in made) and all(
            self.agent(a).worker_token.exists() and self.agent(a).server_key.exists()
            for a in agent_ids)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class _Authority:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("fedcomm CA"))
            .issuer_name(_name("fedcomm CA")).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256()))

    def issue(self, out: Path, stem: str, common_name: str, hosts: Sequence[str],
              server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_san(hosts), critical=False)
            .sign(self.key, hashes.SHA256()))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(out / f"{stem}.key", _pem_key(key))


def _node_keys(agent: AgentSecrets) -> None:
    """The SuperNode's authentication key pair: ECDSA P-384 in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(agent.node_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    agent.node_pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def make_secrets(out: str | Path, agent_ids: Sequence[str],
                 superlink_hosts: Sequence[str] = LOOPBACK,
                 sim_hosts: Sequence[str] = LOOPBACK) -> DeploymentSecrets:
    """Make every certificate, key and token of a deployment under ``out``.

    ``superlink_hosts`` and ``sim_hosts`` are the names (or IP addresses) agents use to reach
    those two servers: they go into the server certificates, and TLS checks them.
    """
    secrets = DeploymentSecrets(Path(out))
    secrets.dir.mkdir(parents=True, exist_ok=True)
    ca = _Authority()
    secrets.ca.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    write_private(secrets.dir / "ca.key", _pem_key(ca.key))
    ca.issue(secrets.superlink, "server", "superlink", superlink_hosts, server=True)
    ca.issue(secrets.sim, "server", "sim", sim_hosts, server=True)
    tokens, worker_tokens = generate_tokens(agent_ids), generate_tokens(agent_ids)
    server_keys = generate_tokens(agent_ids)
    for agent_id in agent_ids:
        agent = secrets.agent(agent_id)
        ca.issue(agent.dir, "client", agent_id, [agent_id], server=False)
        (agent.dir / "ca.crt").write_bytes(secrets.ca.read_bytes())
        _node_keys(agent)
        write_tokens(agent.token_file, {agent_id: tokens[agent_id]})
        write_private(agent.worker_token, worker_tokens[agent_id] + "\n")
        write_tokens(agent.server_key, {agent_id: server_keys[agent_id]})
    write_tokens(secrets.tokens, tokens)
    write_tokens(secrets.agent_keys, server_keys)
    write_private(secrets.episode_key, os.urandom(KEY_BYTES))
    return secrets
