"""The simulator as a gRPC service: the joint environment and the router, for remote agents.

A round is one episode batch. Agents ``Join`` it (a barrier with a timeout), open their ``Step``
stream, and the round's driver runs the step loop: each agent's own observation down, its
knowledge vector up, the vectors the graph lets through down, its action up, then one step of
all ``B`` environments. After the batch, ``Feedback`` collects each receiver's DIAL gradients and
returns to each sender the sum over its receivers.

Every message is checked before use (``protocol/codec.py`` for tensors; headers, sequence
numbers, declared DP parameters and delivery here), and a violation is answered with a precise
status on the offender's call. An agent that breaks the protocol, leaves or stays silent past
the step timeout ends the batch for everyone: the others get an ``EpisodeEnd`` marked truncated
with the reason, and the service goes on serving the next round.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import grpc
import torch
from google.protobuf.message import DecodeError
from torch import Tensor

from fedcomm.device import resolve_device
from fedcomm.protocol.auth import claimed_identity, token_matches
from fedcomm.protocol.codec import ProtocolError, check_norms, decode, encode, invalid
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.registry import make_env
from fedcomm.sim.router import delivery_mask

log = logging.getLogger("fedcomm.sim")

FAILED = grpc.StatusCode.FAILED_PRECONDITION
SIM = "sim"


@dataclass
class SimConfig:
    env: str = "factory"
    env_kwargs: dict = field(default_factory=dict)
    num_envs: int = 256
    seed: int = 0
    run_id: str = "fedcomm"
    tokens: dict[str, str] = field(default_factory=dict)
    join_timeout: float = 60.0  # seconds for every agent of a round to join and open its stream
    step_timeout: float = 30.0  # seconds for every agent to answer within one phase of a step
    feedback_timeout: float = 60.0
    max_message_bytes: int = 64 * 2**20
    device: str = "auto"  # where the environment steps (fedcomm.device); the wire is the host's


class Phase(Enum):
    JOINING = "joining"
    RUNNING = "running"
    FEEDBACK = "feedback"
    CLOSED = "closed"


class _Left:
    """Marker in an agent's inbox: its stream ended."""

    def __init__(self, why: str) -> None:
        self.why = why


class Truncate(Exception):
    """Raised inside the driver to end the episode batch early, with the reason."""

    def __init__(self, reason: str, offender: Slot | None = None,
                 error: ProtocolError | None = None) -> None:
        super().__init__(reason)
        self.reason, self.offender, self.error = reason, offender, error


@dataclass
class Slot:
    """One agent's place in a round."""

    index: int
    agent_id: str
    seq: int = 1  # the last sequence number received (the join carries 1)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)

    def next_seq(self, header: pb.Header) -> None:
        if header.seq != self.seq + 1:
            what = "replayed" if header.seq <= self.seq else "out of order"
            raise invalid(f"sequence number {header.seq} is {what}: expected {self.seq + 1}")
        self.seq = header.seq


@dataclass
class Round:
    number: int
    n_agents: int
    phase: Phase = Phase.JOINING
    slots: dict[int, Slot] = field(default_factory=dict)
    routes: Tensor | None = None
    seed: int | None = None  # declared by the joiners; None: the simulator's seed + round
    silent: set[int] = field(default_factory=set)  # agents that release nothing this round
    comm_dim: int = 0
    vector_dp: pb.DpParams | None = None
    feedback_dp: pb.DpParams | None = None
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None
    failure_code: grpc.StatusCode = grpc.StatusCode.ABORTED
    delivered: Tensor | None = None  # [receiver, sender] bool: any vector delivered this round
    feedback: dict[int, tuple[list[int], Tensor]] = field(default_factory=dict)
    feedback_sums: Tensor | None = None  # [N, T, B, D]
    feedback_done: asyncio.Event = field(default_factory=asyncio.Event)
    driver: asyncio.Task | None = None

    def fail(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        if self.failure is None:
            self.failure, self.failure_code = reason, code
        self.phase = Phase.CLOSED
        self.joined.set()
        self.feedback_done.set()


class JointEnvironmentService(pb_grpc.JointEnvironmentServicer):
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.env = make_env(cfg.env, cfg.num_envs, resolve_device(cfg.device), **cfg.env_kwargs)
        self.spec = self.env.spec
        missing = set(self.spec.agent_ids) - set(cfg.tokens)
        if missing:
            raise ValueError(f"no token for agents {sorted(missing)}")
        self.type_of_agent = torch.tensor(self.spec.type_of_agent)
        self.round: Round | None = None
        self.started = -1  # the last round whose episode batch started: never joined again

    # -- checks ----------------------------------------------------------------------------
    def _authenticate(self, context: grpc.aio.ServicerContext) -> int:
        agent_id, token = claimed_identity(context.invocation_metadata() or ())
        if agent_id not in self.spec.agent_ids:
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"no agent {agent_id!r} in {self.spec.name}; agents: "
                                f"{', '.join(self.spec.agent_ids)}")
        if not token_matches(self.cfg.tokens[agent_id], token):
            raise ProtocolError(grpc.StatusCode.UNAUTHENTICATED, f"wrong token for {agent_id}")
        return self.spec.agent_ids.index(agent_id)

    def _check_header(self, header: pb.Header, index: int, round_number: int | None = None,
                      step: int | None = None) -> None:
        if header.sender != self.spec.agent_ids[index]:
            raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                f"{self.spec.agent_ids[index]} cannot speak as "
                                f"{header.sender!r}")
        if header.run_id != self.cfg.run_id:
            raise ProtocolError(FAILED, f"run {header.run_id!r} is not this simulator's run "
                                        f"{self.cfg.run_id!r}")
        if round_number is not None and header.round != round_number:
            raise invalid(f"message for round {header.round} during round {round_number}")
        if step is not None and header.step != step:
            raise invalid(f"message for step {header.step} during step {step}")

    @staticmethod
    def _check_dp(dp: pb.DpParams, what: str) -> None:
        if not (math.isfinite(dp.clip_norm) and dp.clip_norm > 0
                and math.isfinite(dp.noise_multiplier) and dp.noise_multiplier >= 0):
            raise invalid(f"{what}: clip norm must be positive and noise multiplier "
                          f"non-negative, got {dp.clip_norm}, {dp.noise_multiplier}")

    @staticmethod
    def _same_dp(got: pb.DpParams, agreed: pb.DpParams, what: str) -> None:
        if (got.clip_norm, got.noise_multiplier) != (agreed.clip_norm, agreed.noise_multiplier):
            raise invalid(f"{what} declares clip {got.clip_norm:g}, noise multiplier "
                          f"{got.noise_multiplier:g}; the round agreed on "
                          f"{agreed.clip_norm:g}, {agreed.noise_multiplier:g}")

    def _header(self, round_number: int, step: int) -> pb.Header:
        return pb.Header(run_id=self.cfg.run_id, round=round_number, step=step, sender=SIM)

    # -- Describe --------------------------------------------------------------------------
    async def Describe(self, request: pb.DescribeRequest, context) -> pb.SimInfo:
        cur = self.round
        current = cur.number if cur and cur.phase is Phase.JOINING else self.started + 1
        return pb.SimInfo(
            run_id=self.cfg.run_id, env=self.spec.name, num_envs=self.cfg.num_envs,
            episode_length=self.spec.episode_length, bandwidth=self.spec.bandwidth or 0,
            agents=self._agent_infos(), agent_types=[t.name for t in self.spec.types],
            round=current, max_message_bytes=self.cfg.max_message_bytes)

    def _agent_infos(self) -> list[pb.AgentInfo]:
        return [pb.AgentInfo(agent_id=a, agent_type=self.spec.types[k].name, index=i)
                for i, (a, k) in enumerate(zip(self.spec.agent_ids, self.spec.type_of_agent))]

    # -- Join ------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        try:
            index = self._authenticate(context)
            self._check_header(request.header, index)
            if request.header.seq != 1:
                raise invalid(f"a join carries sequence number 1, got {request.header.seq}")
            routes = self._check_join(request, index)
            rnd = self._round_for(request.header.round)
            self._admit(rnd, index, request, routes)
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        try:
            await asyncio.wait_for(rnd.joined.wait(), self.cfg.join_timeout)
        except asyncio.TimeoutError:  # not yet TimeoutError on Python 3.10
            missing = [self.spec.agent_ids[i] for i in range(self.spec.n_agents)
                       if i not in rnd.slots]
            rnd.fail(f"round {rnd.number}: join barrier timed out after "
                     f"{self.cfg.join_timeout:g} s, missing {', '.join(missing)}",
                     grpc.StatusCode.DEADLINE_EXCEEDED)
        except asyncio.CancelledError:
            if rnd.phase is Phase.JOINING:
                rnd.slots.pop(index, None)  # the caller left; it may join again
                rnd.silent.discard(index)
                if not rnd.slots:  # and nobody is left who agreed to the round's terms
                    rnd.routes = None
            raise
        if rnd.failure is not None:
            await context.abort(rnd.failure_code, rnd.failure)
        return pb.JoinReply(header=self._header(rnd.number, 0), agent_index=index,
                            agents=self._agent_infos(), num_envs=self.cfg.num_envs,
                            episode_length=self.spec.episode_length,
                            bandwidth=self.spec.bandwidth or 0)

    def _check_join(self, request: pb.JoinRequest, index: int) -> Tensor:
        """The join's declarations match the agent; returns the routes it declares."""
        kind = self.spec.types[self.spec.type_of_agent[index]]
        declared = (request.agent_type, request.obs_dim, request.n_actions)
        if declared != (kind.name, kind.obs_dim, kind.n_actions):
            raise invalid(f"{self.spec.agent_ids[index]} is a {kind.name} with observations of "
                          f"{kind.obs_dim} and {kind.n_actions} actions; the join declares "
                          f"{declared}")
        if request.comm_dim < 1:
            raise invalid("comm_dim must be positive")
        self._check_dp(request.vector_dp, "vector_dp")
        self._check_dp(request.feedback_dp, "feedback_dp")
        k = len(self.spec.types)
        return decode(request.routes, "routes", pb.BOOL, (k, k))

    def _round_for(self, number: int) -> Round:
        cur = self.round
        if cur is not None and cur.phase is Phase.JOINING:
            if number != cur.number:
                raise ProtocolError(FAILED, f"round {cur.number} is gathering agents; "
                                            f"cannot join round {number}")
            return cur
        if cur is not None and cur.phase is Phase.RUNNING:
            raise ProtocolError(FAILED, f"round {cur.number} is running; join after it ends")
        if number <= self.started:
            raise ProtocolError(FAILED, f"round {number} already ran; the next round is "
                                        f"{self.started + 1} or later")
        if number >= 2**32 - 1:  # rounds are uint32 on the wire: the next one needs a number
            raise invalid(f"round {number} leaves no number for the round after it")
        if cur is not None and cur.phase is Phase.FEEDBACK:
            cur.fail(f"round {number} began before round {cur.number}'s feedback completed")
        self.round = Round(number, self.spec.n_agents)
        return self.round

    def _admit(self, rnd: Round, index: int, request: pb.JoinRequest, routes: Tensor) -> None:
        if index in rnd.slots:
            raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                f"{self.spec.agent_ids[index]} already joined round {rnd.number}")
        seed = request.seed if request.HasField("seed") else None
        if rnd.routes is None:  # the first agent sets the round's terms; the others must agree
            rnd.routes, rnd.comm_dim, rnd.seed = routes, request.comm_dim, seed
            rnd.vector_dp, rnd.feedback_dp = request.vector_dp, request.feedback_dp
        else:
            if not torch.equal(routes, rnd.routes):
                raise invalid("routes differ from those the round's first agent declared")
            if seed != rnd.seed:
                def show(x: int | None) -> str:
                    return "no seed" if x is None else f"seed {x}"

                raise invalid(f"{show(seed)} declared; the round's first agent declared "
                              f"{show(rnd.seed)}")
            if request.comm_dim != rnd.comm_dim:
                raise invalid(f"comm_dim {request.comm_dim}, the round uses {rnd.comm_dim}")
            self._same_dp(request.vector_dp, rnd.vector_dp, "vector_dp")
            self._same_dp(request.feedback_dp, rnd.feedback_dp, "feedback_dp")
        rnd.slots[index] = Slot(index, self.spec.agent_ids[index])
        if request.silent:
            rnd.silent.add(index)
        if len(rnd.slots) == self.spec.n_agents:
            rnd.phase, self.started = Phase.RUNNING, rnd.number
            rnd.driver = asyncio.get_running_loop().create_task(self._drive(rnd))
            rnd.joined.set()

    # -- Step ------------------------------------------------------------------------------
    async def Step(self, request_iterator, context) -> None:
        try:
            index = self._authenticate(context)
            rnd = self.round
            slot = rnd.slots.get(index) if rnd is not None else None
            if rnd is None or rnd.phase is not Phase.RUNNING or slot is None:
                raise ProtocolError(FAILED, f"{self.spec.agent_ids[index]} has no running round "
                                            "to step: join first")
            if slot.streaming.is_set():
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                    f"{slot.agent_id} already has a step stream")
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        slot.streaming.set()
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, slot))
        try:
            while True:
                item = await slot.outbox.get()
                if item is None:
                    return
                if isinstance(item, ProtocolError):
                    await context.abort(item.code, item.message)
                await context.write(item)
        finally:
            reader.cancel()
            slot.inbox.put_nowait(_Left("its step stream closed"))

    @staticmethod
    async def _read(request_iterator, slot: Slot) -> None:
        try:
            async for frame in request_iterator:
                await slot.inbox.put(frame)
            await slot.inbox.put(_Left("it closed its step stream"))
        except asyncio.CancelledError:
            raise
        except DecodeError as e:  # the sender broke the protocol: its call gets the status
            await slot.inbox.put(invalid(f"cannot parse the frame: {e}"))
        except Exception as e:  # any other failure ends the stream
            await slot.inbox.put(_Left(f"its stream failed: {e}"))

    # -- the driver: one episode batch ----------------------------------------------------
    async def _drive(self, rnd: Round) -> None:
        t = 0
        try:
            await self._await_streams(rnd)
            obs = self.env.reset(self.cfg.seed + rnd.number if rnd.seed is None else rnd.seed)
            obs = [o.cpu() for o in obs]  # one transfer per step from an accelerator
            reward: Tensor | None = None
            rnd.delivered = torch.zeros(self.spec.n_agents, self.spec.n_agents, dtype=torch.bool)
            for t in range(self.spec.episode_length):
                self._send_observations(rnd, t, obs, reward)
                vectors = await self._gather(rnd, t, "vector")
                self._route(rnd, t, torch.stack([vectors[i] for i in sorted(vectors)], dim=1))
                actions = await self._gather(rnd, t, "action")
                flat = torch.stack([actions[i] for i in sorted(actions)], dim=1)
                flat = flat.to(self.env.device)  # checked on the host (_check_frame)
                step = self.env.step(list(flat.split([k.count for k in self.spec.types], 1)))
                obs, reward = [o.cpu() for o in step.obs], step.reward.cpu()
            for slot in rnd.slots.values():
                end = pb.EpisodeEnd(header=self._header(rnd.number, t + 1),
                                    reward=encode(reward[:, slot.index].contiguous()))
                slot.outbox.put_nowait(pb.SimFrame(end=end))
                slot.outbox.put_nowait(None)
            rnd.phase = Phase.FEEDBACK
            log.info("round %d: episode batch done", rnd.number)
        except Truncate as e:
            self._truncate(rnd, t, e)
        except Exception as e:  # never leave agents hanging on an internal error
            log.exception("round %d: internal error", rnd.number)
            self._truncate(rnd, t, Truncate(f"simulator error: {e}"))

    async def _await_streams(self, rnd: Round) -> None:
        waits = [s.streaming.wait() for s in rnd.slots.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.cfg.join_timeout)
        except asyncio.TimeoutError:
            missing = [s.agent_id for s in rnd.slots.values() if not s.streaming.is_set()]
            raise Truncate(f"{', '.join(missing)} never opened a step stream") from None

    def _send_observations(self, rnd: Round, t: int, obs: list[Tensor],
                           reward: Tensor | None) -> None:
        starts = self.spec.type_starts()
        for slot in rnd.slots.values():
            k = self.spec.type_of_agent[slot.index]
            mine = obs[k][:, slot.index - starts[k]].contiguous()
            msg = pb.Observation(header=self._header(rnd.number, t), obs=encode(mine))
            if reward is not None:
                msg.reward.CopyFrom(encode(reward[:, slot.index].contiguous()))
            slot.outbox.put_nowait(pb.SimFrame(observation=msg))

    async def _gather(self, rnd: Round, t: int, kind: str) -> dict[int, Tensor]:
        """Every agent's frame of this phase, checked; ends the batch on the first failure."""
        deadline = time.monotonic() + self.cfg.step_timeout
        out = {}
        for slot in rnd.slots.values():
            try:
                item = await asyncio.wait_for(slot.inbox.get(),
                                              max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise Truncate(f"{slot.agent_id} did not answer within "
                               f"{self.cfg.step_timeout:g} s at step {t}") from None
            if isinstance(item, _Left):
                raise Truncate(f"{slot.agent_id} left at step {t}: {item.why}")
            try:
                if isinstance(item, ProtocolError):  # the frame did not parse
                    raise item
                out[slot.index] = self._check_frame(rnd, slot, t, kind, item)
            except ProtocolError as e:
                raise Truncate(f"{slot.agent_id} sent an invalid message at step {t}: "
                               f"{e.message}", slot, e) from None
        return out

    def _check_frame(self, rnd: Round, slot: Slot, t: int, kind: str,
                     frame: pb.AgentFrame) -> Tensor:
        body = frame.WhichOneof("body")
        if body != kind:
            raise invalid(f"expected a {kind} at step {t}, got {body or 'an empty frame'}")
        msg = getattr(frame, kind)
        self._check_header(msg.header, slot.index, rnd.number, t)
        slot.next_seq(msg.header)
        b = self.cfg.num_envs
        if kind == "vector":
            self._same_dp(msg.dp, rnd.vector_dp, "the vector")
            silent = slot.index in rnd.silent
            speaks = not silent and bool(rnd.routes[self.spec.type_of_agent[slot.index]].any())
            if msg.HasField("vector") != speaks:
                raise invalid("the agent joined silent: send no vector" if silent else
                              "every route from this agent's type is pruned: send no vector"
                              if not speaks else "the knowledge vector is missing")
            if not speaks:  # nothing released, nothing routed
                return torch.zeros(b, rnd.comm_dim)
            vector = decode(msg.vector, "vector", pb.FLOAT32, (b, rnd.comm_dim))
            check_norms(vector, "vector", msg.dp, row_dims=1)
            return vector
        action = decode(msg.action, "action", pb.INT64, (b,))
        n = self.spec.types[self.spec.type_of_agent[slot.index]].n_actions
        if action.numel() and (int(action.min()) < 0 or int(action.max()) >= n):
            raise invalid(f"actions must lie in [0, {n})")
        return action

    def _route(self, rnd: Round, t: int, vectors: Tensor) -> None:
        """Send each agent the vectors its routes carry; pruned routes are not sent at all."""
        silent = torch.zeros(self.spec.n_agents, dtype=torch.bool)
        silent[list(rnd.silent)] = True
        mask = delivery_mask(self.type_of_agent, rnd.routes, vectors, self.spec.bandwidth, silent)
        mask = mask.expand(self.cfg.num_envs, -1, -1)  # [B, receiver, sender]
        reaches = mask.any(dim=0)
        rnd.delivered |= reaches
        for slot in rnd.slots.values():
            senders = reaches[slot.index].nonzero().flatten()
            routed = pb.RoutedVectors(
                header=self._header(rnd.number, t), senders=senders.tolist(),
                vectors=encode(vectors.index_select(1, senders).transpose(0, 1).contiguous()),
                delivered=encode(mask[:, slot.index].index_select(1, senders).T.contiguous()))
            slot.outbox.put_nowait(pb.SimFrame(routed=routed))

    def _truncate(self, rnd: Round, t: int, e: Truncate) -> None:
        log.warning("round %d truncated: %s", rnd.number, e.reason)
        rnd.fail(e.reason)
        for slot in rnd.slots.values():
            if slot is e.offender and e.error is not None:
                slot.outbox.put_nowait(e.error)
                continue
            end = pb.EpisodeEnd(header=self._header(rnd.number, t), truncated=True,
                                reason=e.reason)
            slot.outbox.put_nowait(pb.SimFrame(end=end))
            slot.outbox.put_nowait(None)

    # -- Feedback --------------------------------------------------------------------------
    async def Feedback(self, request: pb.FeedbackRequest, context) -> pb.FeedbackReply:
        try:
            index = self._authenticate(context)
            rnd = self.round
            if rnd is None or rnd.phase is not Phase.FEEDBACK or index not in rnd.slots:
                raise ProtocolError(FAILED, "no episode batch is waiting for feedback from "
                                            f"{self.spec.agent_ids[index]}")
            slot = rnd.slots[index]
            self._check_header(request.header, index, rnd.number, self.spec.episode_length)
            slot.next_seq(request.header)
            if index in rnd.feedback:
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                    f"{slot.agent_id} already sent its feedback")
            senders, grads = self._check_feedback(rnd, index, request)
            rnd.feedback[index] = (senders, grads)
            if len(rnd.feedback) == self.spec.n_agents:
                self._sum_feedback(rnd)
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        try:
            await asyncio.wait_for(rnd.feedback_done.wait(), self.cfg.feedback_timeout)
        except asyncio.TimeoutError:
            missing = [self.spec.agent_ids[i] for i in rnd.slots if i not in rnd.feedback]
            rnd.fail(f"round {rnd.number}: feedback timed out, missing {', '.join(missing)}",
                     grpc.StatusCode.DEADLINE_EXCEEDED)
        if rnd.feedback_sums is None:
            await context.abort(rnd.failure_code, rnd.failure or "feedback did not complete")
        receivers = int(rnd.delivered[:, index].sum())
        return pb.FeedbackReply(header=self._header(rnd.number, self.spec.episode_length),
                                grad=encode(rnd.feedback_sums[index]), receivers=receivers)

    def _check_feedback(self, rnd: Round, index: int, request: pb.FeedbackRequest
                        ) -> tuple[list[int], Tensor]:
        self._same_dp(request.dp, rnd.feedback_dp, "the feedback")
        senders = list(request.senders)
        if senders and index in rnd.silent:
            raise invalid("the agent joined silent: send feedback for no sender")
        if len(set(senders)) != len(senders):
            raise invalid("a sender appears twice in the feedback")
        for s in senders:
            if s >= self.spec.n_agents or not rnd.delivered[index, s]:
                name = self.spec.agent_ids[s] if s < self.spec.n_agents else f"#{s}"
                raise invalid(f"feedback for {name}, whose vectors never reached "
                              f"{self.spec.agent_ids[index]}")
        shape = (len(senders), self.spec.episode_length, self.cfg.num_envs, rnd.comm_dim)
        grads = decode(request.grads, "feedback", pb.FLOAT32, shape)
        check_norms(grads.permute(0, 2, 1, 3), "feedback", request.dp, row_dims=2)
        return senders, grads

    def _sum_feedback(self, rnd: Round) -> None:
        t, b = self.spec.episode_length, self.cfg.num_envs
        sums = torch.zeros(self.spec.n_agents, t, b, rnd.comm_dim)
        for senders, grads in rnd.feedback.values():
            if senders:
                sums.index_add_(0, torch.tensor(senders), grads)
        rnd.feedback_sums = sums
        rnd.phase = Phase.CLOSED
        rnd.feedback_done.set()
        log.info("round %d: feedback exchanged", rnd.number)
