"""Run the simulator service: in its own process (``fedcomm sim serve``) or on a background
thread of another one (tests, single-machine simulation)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.service import JointEnvironmentService, SimConfig


@dataclass
class ServerTls:
    """PEM files. With ``client_ca`` every client must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=ca,
            require_client_auth=ca is not None)


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes)]


async def start(cfg: SimConfig, host: str = "127.0.0.1", port: int = 0,
                tls: ServerTls | None = None, service: JointEnvironmentService | None = None
                ) -> tuple[grpc.aio.Server, int]:
    """Start serving ``service`` (default: one for ``cfg``); returns the server and the bound
    port (``port=0`` picks a free one)."""
    server = grpc.aio.server(options=message_options(cfg.max_message_bytes))
    pb_grpc.add_JointEnvironmentServicer_to_server(service or JointEnvironmentService(cfg),
                                                   server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, tls.credentials()) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, bound


def serve_forever(cfg: SimConfig, host: str, port: int, tls: ServerTls | None = None,
                  on_start=None) -> None:
    async def main() -> None:
        server, bound = await start(cfg, host, port, tls)
        if on_start:
            on_start(bound)
        await server.wait_for_termination()

    asyncio.run(main())


class SimServer:
    """The service on a background thread with its own event loop."""

    def __init__(self, cfg: SimConfig, host: str = "127.0.0.1", port: int = 0,
                 tls: ServerTls | None = None,
                 service: JointEnvironmentService | None = None) -> None:
        self.cfg, self.host = cfg, host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fedcomm-sim")
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(cfg, host, port, tls, service),
                                                  self._loop)
        self._server, self.port = future.result(timeout=30)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(grace=0.5), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
