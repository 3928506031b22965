"""Run the simulator service: in its own process (``fedcomm sim serve``) or on a background
thread of another one (tests, single-machine simulation)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError, Message

from fedcomm.protocol.codec import ProtocolError
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.limits import concurrent_calls, streams_per_connection
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


def server_options(service: JointEnvironmentService) -> list[tuple[str, int]]:
    """The service's message limit both ways, and the calls one connection may have open."""
    return [*message_options(service.max_message_bytes),
            ("grpc.max_concurrent_streams", streams_per_connection(service.spec.n_agents))]


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


async def _authenticated(service: JointEnvironmentService,
                         context: grpc.aio.ServicerContext) -> None:
    """Refuse a call that presents no agent of the run with its token (UNAUTHENTICATED) before
    anything it sends is read."""
    try:
        service.authenticate(context)
    except ProtocolError as e:
        await context.abort(e.code, e.message)


def _unary(method: Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]],
           request_type: type[Message], service: JointEnvironmentService,
           bad_calls: RateLimitedLog):
    """``method`` as a handler that authenticates the call first, then reads its one request
    within the step timeout (so that no caller holds a call open by sending nothing), and
    refuses bytes that are not a ``request_type`` with INVALID_ARGUMENT and one line instead of
    gRPC's UNKNOWN and a logged traceback.

    The request is read as a stream's first message: a unary handler would get control only
    once gRPC had read the whole request, from anyone."""
    name = request_type.__name__
    wait = service.cfg.step_timeout

    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                     ) -> Message:
        await _authenticated(service, context)
        try:
            raw = await asyncio.wait_for(anext(requests), wait)
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the call sent no {name}")
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no {name} arrived within {wait:g} s")
        try:
            request = request_type.FromString(raw)
        except DecodeError as e:
            bad_calls.warning(f"undecodable {name} from {context.peer()}: {e}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {name}: {e}")
        return await method(request, context)

    return handle


def _stream(service: JointEnvironmentService):
    """``service.Step``, once the call is authenticated; it parses frames as it reads them."""
    async def handle(requests: AsyncIterator[pb.AgentFrame],
                     context: grpc.aio.ServicerContext) -> None:
        await _authenticated(service, context)
        await service.Step(requests, context)

    return handle


def service_handler(service: JointEnvironmentService) -> grpc.GenericRpcHandler:
    """The ``fedcomm.v1.JointEnvironment`` methods of ``service``."""
    bad_calls = RateLimitedLog(log)
    unary = {"Describe": (pb.DescribeRequest, pb.SimInfo), "Join": (pb.JoinRequest, pb.JoinReply),
             "Feedback": (pb.FeedbackRequest, pb.FeedbackReply)}
    handlers = {name: grpc.stream_unary_rpc_method_handler(
        _unary(getattr(service, name), request, service, bad_calls),
        response_serializer=reply.SerializeToString) for name, (request, reply) in unary.items()}
    handlers["Step"] = grpc.stream_stream_rpc_method_handler(
        _stream(service), request_deserializer=pb.AgentFrame.FromString,
        response_serializer=pb.SimFrame.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start(service: JointEnvironmentService, host: str = "127.0.0.1", port: int = 0,
                tls: ServerTls | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving ``service``; returns the server and the bound port (``port=0`` picks a
    free one)."""
    server = grpc.aio.server(options=server_options(service),
                             maximum_concurrent_rpcs=concurrent_calls(service.spec.n_agents))
    server.add_generic_rpc_handlers((service_handler(service),))
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
        server, bound = await start(JointEnvironmentService(cfg), host, port, tls)
        if on_start:
            on_start(bound)
        await server.wait_for_termination()

    asyncio.run(main())


class SimServer:
    """The service (default: one for ``cfg``) on a background thread with its own event loop."""

    def __init__(self, cfg: SimConfig, host: str = "127.0.0.1", port: int = 0,
                 tls: ServerTls | None = None,
                 service: JointEnvironmentService | None = None) -> None:
        self.cfg, self.host = cfg, host
        self.service = service or JointEnvironmentService(cfg)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fedcomm-sim")
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(self.service, host, port, tls),
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
