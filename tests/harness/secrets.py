"""The secrets of a run's parties, written as the commands write them: each agent's simulator
token and server key (``fedcomm.protocol.auth.write_tokens``), its node settings
(``fedcomm.clients.node.node_config``), and a throwaway PKI (a CA with a server and a client
pair, and a rogue CA with a client pair of its own). Nothing here starts or stops anything:
the files live in the folder a test gives, usually its ``tmp_path``.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcomm.clients.node import node_config
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.protocol.auth import generate_tokens, write_tokens


# -- tokens, server keys and node settings -----------------------------------------------------
@dataclass(frozen=True)
class AgentSecrets:
    """A run's token file (each agent's token at the simulator) and server-key file (each
    agent's key, shared with the server, that it signs its replies with)."""

    token_file: Path
    key_file: Path
    tokens: dict[str, str]
    keys: dict[str, str]

    @classmethod
    def write(cls, folder: Path, agent_ids: Sequence[str], tokens: dict[str, str] | None = None,
              keys: dict[str, str] | None = None) -> AgentSecrets:
        """``tokens.json`` and ``agent-keys.json`` in ``folder`` (made if missing), fresh
        secrets for ``agent_ids`` unless given."""
        folder.mkdir(parents=True, exist_ok=True)
        tokens = generate_tokens(agent_ids) if tokens is None else tokens
        keys = generate_tokens(agent_ids) if keys is None else keys
        secrets = cls(folder / "tokens.json", folder / "agent-keys.json", tokens, keys)
        write_tokens(secrets.token_file, tokens)
        write_tokens(secrets.key_file, keys)
        return secrets

    def node_settings(self, sim_address: str, policy: PrivacyPolicy,
                      state_root: Path | None = None, **node: object) -> dict[str, str]:
        """An agent's node settings: the simulator, these files, ``policy``, and either a state
        folder per agent under ``state_root`` (a simulation's ClientApp, each node naming its
        agent by Flower's ``partition-id``) or what ``node`` says (``node_config``'s
        ``agent_id``, ``state_dir``, ``worker_socket``, ...)."""
        return node_config(sim_address=sim_address, token_file=self.token_file,
                           server_key_file=self.key_file, state_root=state_root, policy=policy,
                           **node)


# -- a throwaway PKI ---------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA nobody trusts, with a client pair it signed
    rogue_cert: Path
    rogue_key: Path


def subject(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def issue(name: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool = False,
          usage: x509.ObjectIdentifier | None = None,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(path: Path, cert: x509.Certificate,
              key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return path


def make_pki(root: Path) -> Pki:
    """A throwaway CA with a server pair (localhost, 127.0.0.1) and a client pair; and a rogue
    CA with a client pair of its own; their files in ``root``."""
    paths: dict[str, Path] = {}
    for ca_name in ("ca", "rogue"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_subject = subject(f"{ca_name} CA")
        ca_cert = issue(ca_subject, ca_key, ca_subject, ca_key, ca=True)
        paths[ca_name] = write_pem(root / f"{ca_name}.pem", ca_cert)
        leaves = {"client": (ExtendedKeyUsageOID.CLIENT_AUTH, None)}
        if ca_name == "ca":
            leaves["server"] = (ExtendedKeyUsageOID.SERVER_AUTH, [
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        for leaf, (usage, sans) in leaves.items():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = issue(subject(leaf), key, ca_subject, ca_key, usage=usage, sans=sans)
            paths[f"{ca_name}-{leaf}"] = write_pem(root / f"{ca_name}-{leaf}.pem", cert, key)
    key_of = {name: path.with_suffix(".key") for name, path in paths.items()}
    return Pki(paths["ca"], paths["ca-server"], key_of["ca-server"], paths["ca-client"],
               key_of["ca-client"], paths["rogue"], paths["rogue-client"], key_of["rogue-client"])
