"""The simulator service over TLS: it serves clients that trust its CA only, and with mutual
TLS only clients with a certificate its CA signed; a whole training round runs over it.

The simulator runs in process (``SimServer``) with a one-sensor, one-processor, one-actuator
factory and short timeouts; clients are ``GrpcTransport``s, and ``Party``s for the round.
Every client call carries a deadline, so a hang fails its test instead of stalling the run.
The harness is tests/harness/sim.py, the PKI tests/harness/secrets.py's; the fixtures
``start`` and ``pki`` are in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedcomm.clients.grpc_transport import ClientTls, GrpcTransport, TransportError
from fedcomm.sim.serve import ServerTls
from tests.harness.secrets import Pki
from tests.harness.sim import (
    SENSOR,
    SPEC,
    TEAM_CFG,
    TIMEOUT,
    TOKENS,
    B,
    Client,
    Code,
    run_parties,
)

pytestmark = pytest.mark.integration  # every test starts a simulator


# -- 7. TLS --------------------------------------------------------------------------------
def transport(target: str, tls: ClientTls | None) -> GrpcTransport:
    """A GrpcTransport; building one is a Describe over its channel."""
    return GrpcTransport(target, SPEC, SENSOR, TOKENS[SENSOR], TEAM_CFG, tls, timeout=TIMEOUT)


def refused_transport(target: str, tls: ClientTls | None) -> str:
    with pytest.raises(TransportError) as e:
        transport(target, tls)
    assert e.value.code is Code.UNAVAILABLE, e.value
    return e.value.details


def test_tls_serves_clients_that_trust_its_ca_only(start: Callable[..., Client],
                                                   pki: Pki) -> None:
    sim = start(tls=ServerTls(pki.server_cert, pki.server_key))
    for host in ("localhost", "127.0.0.1"):
        client = transport(f"{host}:{sim.port}", ClientTls(pki.ca))
        assert client.num_envs == B
        client.close()
    refused_transport(f"localhost:{sim.port}", ClientTls(pki.rogue_ca))
    refused_transport(f"localhost:{sim.port}", None)  # plaintext
    run_parties(f"localhost:{sim.port}", ClientTls(pki.ca))


def test_mutual_tls_admits_only_clients_with_a_certificate_its_ca_signed(
        start: Callable[..., Client], pki: Pki) -> None:
    sim = start(tls=ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca))
    target = f"localhost:{sim.port}"
    refused_transport(target, ClientTls(pki.ca))
    refused_transport(target, ClientTls(pki.ca, pki.rogue_cert, pki.rogue_key))
    client = transport(target, ClientTls(pki.ca, pki.client_cert, pki.client_key))
    assert client.num_envs == B
    client.close()
