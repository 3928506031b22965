"""A federated run in one process, every party the real thing: the simulator service on
loopback, each agent's ClientApp on a node of its own, and the server's round loop
(``Federation``) over a grid that hands each message to its node's ClientApp, every agent at
once, and keeps every reply. What Flower's simulation engine adds (Ray actors, its own grid)
is left out so that a test can see every message and the simulator's state."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from rich.console import Console

from fedcomm.clients.app import make_client_app
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.commands import build_parser, federation_config_from_args
from fedcomm.config import FederationConfig
from fedcomm.protocol.auth import generate_tokens, write_tokens
from fedcomm.server.federation import Federation
from fedcomm.sim.serve import SimServer
from fedcomm.sim.service import JointEnvironmentService, SimConfig

B = 64


def private_default(*flags: str) -> FederationConfig:
    """``fedcomm simulate``'s private default with ``flags``, scaled to ``B`` environments and
    two batches in two rounds."""
    return federation_config_from_args(build_parser().parse_args([
        "simulate", "--num-envs", str(B), "--env-steps", str(2 * B * 25), "--eval-episodes",
        str(B), "--batches-per-round", "1", *flags]))


class Grid:
    """Flower's grid as the loop uses it; each message runs on its node's ClientApp."""

    def __init__(self, app, contexts: list[Context]) -> None:
        self.app, self.contexts = app, {c.node_id: c for c in contexts}
        self.pool = ThreadPoolExecutor(len(contexts))
        self.running: dict[str, Future] = {}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            self.running[msg.metadata.message_id] = self.pool.submit(
                self._answer, msg, self.contexts[node])
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, msg: Message, context: Context) -> Message:
        reply = self.app(msg, context)
        reply.metadata.__dict__["_src_node_id"] = context.node_id
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        done = [i for i in message_ids if i in self.running and self.running[i].done()]
        out = [self.running.pop(i).result() for i in done]
        self.replies += out
        return out


class FederatedRun:
    """The parties of one run of ``fed``, its run directory ``run_dir``; each agent holds
    ``policy`` (default: what ``fed`` promises)."""

    def __init__(self, fed: FederationConfig, run_dir: Path, policy: PrivacyPolicy | None = None,
                 episode_key: bytes = b"k" * 32, service=JointEnvironmentService,
                 join_timeout: float = 60.0) -> None:
        self.fed, self.run_dir = fed, run_dir
        spec = fed.spec
        tokens = generate_tokens(spec.agent_ids)
        self.keys = generate_tokens(spec.agent_ids)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_tokens(run_dir / "tokens.json", tokens)
        write_tokens(run_dir / "agent-keys.json", self.keys)
        train = fed.train
        cfg = SimConfig(env=train.env, env_kwargs=train.env_kwargs, num_envs=train.num_envs,
                        run_id="federated-run-test", tokens=tokens, episode_key=episode_key,
                        max_comm_dim=max(train.team.comm_dim, 16), join_timeout=join_timeout)
        self.service = service(cfg)
        self.sim = SimServer(cfg, service=self.service)
        settings = {"sim-address": self.sim.address, "token-file": str(run_dir / "tokens.json"),
                    "server-key-file": str(run_dir / "agent-keys.json"),
                    "state-root": str(run_dir / "agents"),
                    **(policy or PrivacyPolicy.of_run(fed)).to_settings()}
        contexts = [Context(run_id=1, node_id=i + 1, node_config={"partition-id": i},
                            state=RecordDict(), run_config={}) for i in range(spec.n_agents)]
        self.grid = Grid(make_client_app(settings), contexts)
        self.lock = threading.Lock()

    def federation(self, fed: FederationConfig | None = None) -> Federation:
        """The server's loop, for ``fed`` (default: the run's own configuration)."""
        return Federation(self.grid, fed or self.fed, self.run_dir, self.keys, progress=False,
                          console=Console(quiet=True))

    def close(self) -> None:
        self.grid.pool.shutdown(wait=True)
        self.sim.stop()
