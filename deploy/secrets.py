"""Every secret a deployment needs, made in one place: ``fedcomm deploy secrets``.

- a private CA, and server certificates signed by it for the SuperLink and the simulator;
- one client certificate per agent, for mutual TLS to the simulator;
- one ECDSA P-384 key pair per agent's SuperNode (OpenSSH format, what Flower's node
  authentication reads); the SuperLink admits only registered public keys;
- one simulator token per agent: ``tokens.json`` for the simulator, and a file with only its
  own token for each agent.

Private keys and tokens are written readable by their owner only; the layout is one folder per
party, so that each host is handed its own folder and the CA certificate, nothing else::

    DIR/ca.crt  DIR/ca.key
    DIR/superlink/{server.crt,server.key}
    DIR/sim/{server.crt,server.key,tokens.json}
    DIR/agents/<agent>/{ca.crt,client.crt,client.key,node.key,node.pub,token.json}
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

from fedcomm.protocol.auth import generate_tokens, write_tokens

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


class DeploymentSecrets:
    """Every party's secrets, in one folder per party."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ca = folder / "ca.crt"
        self.superlink, self.sim = folder / "superlink", folder / "sim"
        self.tokens = self.sim / "tokens.json"

    def agent(self, agent_id: str) -> AgentSecrets:
        return AgentSecrets(self.dir / "agents" / agent_id)

    def exists(self) -> bool:
        return self.ca.exists() and self.tokens.exists()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
        _write_private(out / f"{stem}.key", _pem_key(key))


def _node_keys(agent: AgentSecrets) -> None:
    """The SuperNode's authentication key pair: ECDSA P-384 in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(agent.node_key, key.private_bytes(
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
    _write_private(secrets.dir / "ca.key", _pem_key(ca.key))
    ca.issue(secrets.superlink, "server", "superlink", superlink_hosts, server=True)
    ca.issue(secrets.sim, "server", "sim", sim_hosts, server=True)
    tokens = generate_tokens(agent_ids)
    for agent_id in agent_ids:
        agent = secrets.agent(agent_id)
        ca.issue(agent.dir, "client", agent_id, [agent_id], server=False)
        (agent.dir / "ca.crt").write_bytes(secrets.ca.read_bytes())
        _node_keys(agent)
        write_tokens(agent.token_file, {agent_id: tokens[agent_id]})
    write_tokens(secrets.tokens, tokens)
    return secrets
