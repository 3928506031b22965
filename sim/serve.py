"""Run the simulator service: in its own process (``fedcomm sim serve``) or on a background
thread of another one (tests, single-machine simulation)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError, Message

from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.service import JointEnvironmentService, SimConfig

log = logging.getLogger("fedcomm.sim")
SERVICE = pb.DESCRIPTOR.services_by_name["JointEnvironment"].full_name


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


class RateLimitedLog:
    """At most ``burst`` warnings per ``period`` seconds; the next one after a quiet spell says
    how many were dropped. Anyone who can reach the port can send bad calls: they must not
    be able to flood the log."""

    def __init__(self, logger: logging.Logger, period: float = 60.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.period, self.burst, self.clock = logger, period, burst, clock
        self.window_start, self.in_window, self.dropped = -float("inf"), 0, 0

    def warning(self, message: str) -> None:
        now = self.clock()
        if now - self.window_start >= self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.dropped += 1
            return
        self.in_window += 1
        if self.dropped:
            message += f" ({self.dropped} similar warnings dropped)"
            self.dropped = 0
        self.logger.warning(message)


def _parsing(method: Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]],
             request_type: type[Message], bad_calls: RateLimitedLog):
    """``method`` taking the request's raw bytes: bytes that are not a ``request_type`` get
    INVALID_ARGUMENT with one line, instead of gRPC's UNKNOWN and a logged traceback."""
    name = request_type.__name__

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = request_type.FromString(raw)
        except DecodeError as e:
            bad_calls.warning(f"undecodable {name} from {context.peer()}: {e}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {name}: {e}")
        return await method(request, context)

    return handle


def service_handler(service: JointEnvironmentService) -> grpc.GenericRpcHandler:
    """The ``fedcomm.v1.JointEnvironment`` methods of ``service``."""
    bad_calls = RateLimitedLog(log)
    unary = {"Describe": (pb.DescribeRequest, pb.SimInfo), "Join": (pb.JoinRequest, pb.JoinReply),
             "Feedback": (pb.FeedbackRequest, pb.FeedbackReply)}
    handlers = {name: grpc.unary_unary_rpc_method_handler(
        _parsing(getattr(service, name), request, bad_calls),
        response_serializer=reply.SerializeToString) for name, (request, reply) in unary.items()}
    handlers["Step"] = grpc.stream_stream_rpc_method_handler(  # frames are parsed in Step
        service.Step, request_deserializer=pb.AgentFrame.FromString,
        response_serializer=pb.SimFrame.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start(cfg: SimConfig, host: str = "127.0.0.1", port: int = 0,
                tls: ServerTls | None = None, service: JointEnvironmentService | None = None
                ) -> tuple[grpc.aio.Server, int]:
    """Start serving ``service`` (default: one for ``cfg``); returns the server and the bound
    port (``port=0`` picks a free one)."""
    server = grpc.aio.server(options=message_options(cfg.max_message_bytes))
    server.add_generic_rpc_handlers((service_handler(service or JointEnvironmentService(cfg)),))
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
