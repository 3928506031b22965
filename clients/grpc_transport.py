"""One agent's connection to the simulator service, speaking ``fedcomm.v1`` over gRPC."""

from __future__ import annotations

import queue
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from torch import Tensor

from fedcomm.config import TeamConfig
from fedcomm.learning.transport import BatchTruncated, Transport, TransportStep
from fedcomm.protocol.auth import call_metadata
from fedcomm.protocol.codec import decode, encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.base import Actions, EnvSpec, Obs
from fedcomm.sim.serve import message_options


class TransportError(RuntimeError):
    """The simulator refused a call or the connection failed; ``code`` says how, ``call``
    which call it was (``Describe``, ``Join``, ``Step``, ``Feedback``; empty if unknown)."""

    def __init__(self, code: grpc.StatusCode, details: str, call: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.call = code, details, call

    @classmethod
    def of(cls, e: grpc.RpcError, call: str = "") -> TransportError:
        return cls(e.code(), e.details() or "", call)


@dataclass
class ClientTls:
    """PEM files: the CA that signed the simulator's certificate, and for mTLS our own pair."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None)


# gRPC reconnects to an unreachable simulator with exponential backoff from 1 s; capped here
# at a few seconds instead of two minutes, so that a simulator that comes up late is found soon.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 1000),
                     ("grpc.max_reconnect_backoff_ms", 4000)]


class GrpcTransport(Transport):
    """``timeout`` bounds every call in seconds, an episode batch's whole step stream included.

    ``spec`` is the run's; the transport speaks for its agent's site (``EnvSpec.site``: the
    simulator steps each site on its own, its agents numbered from 0), so ``spec``, ``index``
    and what it receives are its site's.

    The constructor describes the simulator. While nothing answers at ``target`` (the simulator
    is not up yet) it keeps trying for ``connect_timeout`` seconds, with gRPC's reconnection
    backoff, and calls ``on_wait`` once with the first failure; 0 fails at once. It raises
    TransportError if the simulator stays unreachable. What arrives is moved to ``device``
    (the agent's team's) once per message; what leaves is encoded from the host.
    """

    def __init__(self, target: str, spec: EnvSpec, agent_id: str, token: str,
                 team_cfg: TeamConfig, tls: ClientTls | None = None, run_id: str | None = None,
                 timeout: float = 600.0, max_message_bytes: int = 64 * 2**20,
                 connect_timeout: float = 0.0,
                 on_wait: Callable[[TransportError], None] | None = None,
                 device: str | torch.device = "cpu") -> None:
        if agent_id not in spec.agent_ids:
            raise ValueError(f"no agent {agent_id!r} in {spec.name}")
        # the simulator steps each site on its own, its agents numbered within it
        spec = spec.site(spec.site_of_agent[spec.agent_ids.index(agent_id)])
        options = message_options(max_message_bytes) + RECONNECT_OPTIONS
        self.channel = (grpc.secure_channel(target, tls.credentials(), options) if tls
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.JointEnvironmentStub(self.channel)
        self.spec, self.agent_id, self.timeout = spec, agent_id, timeout
        self.device = torch.device(device)
        self.metadata = call_metadata(agent_id, token)
        self.index = spec.agent_ids.index(agent_id)
        self.agents = (self.index,)
        self.kind = spec.types[spec.type_of_agent[self.index]]
        self.comm_dim = team_cfg.comm_dim
        self.vector_dp = (
            pb.DpParams(clip_norm=1.0, rr_epsilon=team_cfg.rr_epsilon, symbols=team_cfg.symbols)
            if team_cfg.channel == "discrete" else
            pb.DpParams(clip_norm=team_cfg.clip, noise_multiplier=team_cfg.noise_multiplier))
        self.release_every = team_cfg.release_every
        self.feedback_dp = pb.DpParams(clip_norm=team_cfg.feedback_clip,
                                       noise_multiplier=team_cfg.feedback_noise_multiplier)
        self.wire_bytes: Counter[str] = Counter()  # protobuf bytes per direction and kind
        try:
            info = self._connect(target, connect_timeout, on_wait)
        except BaseException:
            self.channel.close()
            raise
        self._check_describes(info)
        self.run_id = run_id or info.run_id
        self.num_envs = info.num_envs
        self.round, self.t, self.seq = -1, 0, 0
        self._requests: queue.Queue | None = None
        self._responses = None
        self._last_obs: Obs = []
        self._speaks = True

    def _check_describes(self, info: pb.SimInfo) -> None:
        served = [a.agent_id for a in info.agents]
        if served != list(self.spec.agent_ids) or info.episode_length != self.spec.episode_length:
            raise ValueError(f"the simulator serves {info.env} with agents {served} and "
                             f"{info.episode_length}-step episodes; this agent's model was "
                             f"built for {self.spec.name} with {list(self.spec.agent_ids)}")

    def _connect(self, target: str, timeout: float,
                 on_wait: Callable[[TransportError], None] | None) -> pb.SimInfo:
        """Describe the simulator, waiting up to ``timeout`` s for it to become reachable."""
        describe = pb.DescribeRequest()
        if timeout <= 0:
            return self._call(self.stub.Describe, describe)
        deadline = time.monotonic() + timeout
        try:
            try:  # fails fast (UNAVAILABLE) where nothing listens; bounded where nothing answers
                return self._call(self.stub.Describe, describe, min(timeout, self.timeout))
            except TransportError as e:
                if e.code is not grpc.StatusCode.UNAVAILABLE:
                    raise
                if on_wait is not None:
                    on_wait(e)
            try:  # the call waits while gRPC reconnects with backoff
                return self._call(self.stub.Describe, describe,
                                  max(0.001, min(deadline - time.monotonic(), self.timeout)),
                                  wait_for_ready=True)
            except TransportError as e:
                if e.code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            # Time is up: one more try without waiting, whose failure says why.
            return self._call(self.stub.Describe, describe, 1.0)
        except TransportError as e:
            if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            raise TransportError(e.code, f"nothing answered at {target} within {timeout:g} s: "
                                         f"{e.details}", e.call) from None

    # -- plumbing --------------------------------------------------------------------------
    def _call(self, method, request, timeout: float | None = None,
              wait_for_ready: bool | None = None):
        name = type(request).__name__
        self.wire_bytes[f"sent {name}"] += request.ByteSize()
        try:
            reply = method(request, metadata=self.metadata, timeout=timeout or self.timeout,
                           wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            raise TransportError.of(e, name.removesuffix("Request")) from None
        self.wire_bytes[f"received {type(reply).__name__}"] += reply.ByteSize()
        return reply

    def _header(self, step: int) -> pb.Header:
        self.seq += 1
        return pb.Header(run_id=self.run_id, round=self.round, step=step,
                         sender=self.agent_id, seq=self.seq)

    def _send(self, frame: pb.AgentFrame) -> None:
        assert self._requests is not None, "reset the transport first"
        self.wire_bytes[f"sent {frame.WhichOneof('body')}"] += frame.ByteSize()
        self._requests.put(frame)

    def _receive(self, expected: str) -> pb.SimFrame:
        try:
            frame = next(self._responses)
        except grpc.RpcError as e:
            raise TransportError.of(e, "Step") from None
        except StopIteration:
            raise BatchTruncated("the simulator closed the step stream") from None
        body = frame.WhichOneof("body")
        self.wire_bytes[f"received {body}"] += frame.ByteSize()
        if body == "end" and frame.end.truncated:
            self._close_stream()
            raise BatchTruncated(frame.end.reason)
        if body != expected and not (expected == "observation" and body == "end"):
            raise TransportError(grpc.StatusCode.INTERNAL,
                                 f"expected {expected} from the simulator, got {body}", "Step")
        return frame

    def _close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
            self._requests = None

    def _obs(self, msg: pb.Observation) -> Obs:
        obs = decode(msg.obs, "observation", pb.FLOAT32, (self.num_envs, self.kind.obs_dim))
        return [obs[:, None, :].to(self.device)]

    def _reward(self, tensor: pb.Tensor) -> Tensor:
        return decode(tensor, "reward", pb.FLOAT32, (self.num_envs,))[:, None].to(self.device)

    # -- Transport -------------------------------------------------------------------------
    def reset(self, routes: Tensor, seed: int | None = None, silent: bool = False) -> Obs:
        self._close_stream()
        info = self._call(self.stub.Describe, pb.DescribeRequest())
        self.round, self.t, self.seq = info.round, 0, 0
        self._speaks = not silent and bool(routes[self.spec.type_of_agent[self.index]].any())
        join = pb.JoinRequest(
            header=self._header(0), agent_type=self.kind.name, obs_dim=self.kind.obs_dim,
            n_actions=self.kind.n_actions, comm_dim=self.comm_dim, vector_dp=self.vector_dp,
            feedback_dp=self.feedback_dp, routes=encode(routes.to(torch.bool).contiguous()),
            seed=seed, silent=silent, release_every=self.release_every)
        self._call(self.stub.Join, join)
        self._requests = queue.Queue()
        self._responses = self.stub.Step(iter(self._requests.get, None), metadata=self.metadata,
                                         timeout=self.timeout)
        self._last_obs = self._obs(self._receive("observation").observation)
        return self._last_obs

    def exchange(self, vectors: Tensor, release: bool = True) -> tuple[Tensor | None, Tensor]:
        msg = pb.KnowledgeVector(header=self._header(self.t), dp=self.vector_dp)
        if self._speaks and release:  # nothing where every route is pruned, or off schedule
            msg.vector.CopyFrom(encode(vectors[:, 0].contiguous()))
        self._send(pb.AgentFrame(vector=msg))
        routed = self._receive("routed").routed
        senders = torch.tensor(list(routed.senders), dtype=torch.long)
        s, b, n = len(senders), self.num_envs, self.spec.n_agents
        incoming = decode(routed.vectors, "routed vectors", pb.FLOAT32, (s, b, self.comm_dim))
        delivered = decode(routed.delivered, "delivery mask", pb.BOOL, (s, b))
        received = torch.zeros(b, n, self.comm_dim)
        mask = torch.zeros(b, 1, n, dtype=torch.bool)
        if s:
            received[:, senders] = incoming.transpose(0, 1)
            mask[:, 0, senders] = delivered.T
        return received.to(self.device), mask.to(self.device)

    def step(self, actions: Actions) -> TransportStep:
        msg = pb.Action(header=self._header(self.t), action=encode(actions[0][:, 0].contiguous()))
        self._send(pb.AgentFrame(action=msg))
        frame = self._receive("observation")
        self.t += 1
        if frame.WhichOneof("body") == "end":
            self._close_stream()
            return TransportStep(self._last_obs, self._reward(frame.end.reward), True)
        self._last_obs = self._obs(frame.observation)
        return TransportStep(self._last_obs, self._reward(frame.observation.reward), False)

    def feedback(self, grads: Tensor, senders: Tensor) -> Tensor:
        senders = senders.clone()
        senders[self.index] = False
        idx = senders.nonzero().flatten()
        payload = grads.index_select(2, idx).permute(2, 0, 1, 3).contiguous()
        request = pb.FeedbackRequest(header=self._header(self.spec.episode_length),
                                     senders=idx.tolist(), grads=encode(payload),
                                     dp=self.feedback_dp)
        reply = self._call(self.stub.Feedback, request)
        t, b = self.spec.episode_length, self.num_envs
        grad = decode(reply.grad, "feedback", pb.FLOAT32, (t, b, self.comm_dim))
        return grad[:, :, None, :].to(self.device)

    def close(self) -> None:
        self._close_stream()
        self.channel.close()
