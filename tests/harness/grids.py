"""Flower's grid as the server's round loop (``Federation``) uses it, and a federated run in
one process.

``Grid`` hands each message to its node's answer: a function of the test's, called as the
message is pushed, or (``Grid.of_client_app``) a real ClientApp, on a thread per node so that
every agent runs at once; ``close`` stops those threads. ``FederatedRun`` starts every party of
a run in this process, each the real thing: the simulator service on loopback (``SimServer``),
each agent's ClientApp on a node of its own over a ``Grid`` (or a pool of fewer threads), and
the server's round loop; ``close`` stops the grid's threads and then the simulator. What
Flower's simulation engine adds (Ray actors, its own grid) is left out so that a test can see
every message and the simulator's state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from rich.console import Console

from fedcomm.clients.app import make_client_app
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.commands import build_parser, federation_config_from_args
from fedcomm.config import FederationConfig
from fedcomm.server.federation import Federation
from fedcomm.sim.serve import SimServer
from fedcomm.sim.service import JointEnvironmentService, SimConfig
from tests.harness.secrets import AgentSecrets

Answer = Callable[[int, Message], Message | None]  # node id, message -> reply (None: silence)


class Grid:
    """What the loop uses of Flower's grid: node ids, push, pull. ``answers[node]`` replies to
    each message sent to ``node``: at once as it is pushed, or with ``workers``, on a pool of
    that many threads. Every message pushed is kept in ``sent``, every reply pulled in
    ``replies``."""

    def __init__(self, answers: dict[int, Answer], workers: int = 0) -> None:
        self.answers = answers
        self.pool = ThreadPoolExecutor(workers) if workers else None
        self.running: dict[str, Future] = {}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    @classmethod
    def of_client_app(cls, app, contexts: list[Context], pool: int | None = None) -> Grid:
        """Each message runs on its node's ClientApp ``app``, in the node's context, every node
        on a thread of its own (``pool``: on that many threads, as Flower's engine runs its
        actors)."""
        by_node = {c.node_id: c for c in contexts}
        grid = cls({node: lambda node, msg: app(msg, by_node[node]) for node in by_node},
                   workers=pool or len(by_node))
        grid.app, grid.contexts = app, by_node
        return grid

    def get_node_ids(self) -> Iterable[int]:
        return list(self.answers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if self.pool is not None:
                self.running[msg.metadata.message_id] = self.pool.submit(self._answer, node, msg)
            else:
                answered: Future = Future()
                answered.set_result(self._answer(node, msg))
                self.running[msg.metadata.message_id] = answered
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, node: int, msg: Message) -> Message | None:
        reply = self.answers[node](node, msg)
        if reply is not None:
            reply.metadata.__dict__["_src_node_id"] = node
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        done = [i for i in message_ids if i in self.running and self.running[i].done()]
        out = [reply for i in done if (reply := self.running.pop(i).result()) is not None]
        self.replies += out
        return out

    def close(self) -> None:
        """Wait for the answers still running, and stop their threads."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)


# -- a federated run in one process --------------------------------------------------------------
B = 64


def private_default(*flags: str) -> FederationConfig:
    """``fedcomm simulate``'s private default with ``flags``, scaled to ``B`` environments and
    two batches in two rounds, of one site: one speaker and one listener, what each peer
    sees of its own site (``tests/test_sites.py`` runs the default's sites)."""
    return federation_config_from_args(build_parser().parse_args([
        "simulate", "--sites", "1", "--num-envs", str(B), "--env-steps", str(2 * B * 25),
        "--eval-episodes", str(B), "--batches-per-round", "1", *flags]))


class FederatedRun:
    """The parties of one run of ``fed``, its run directory ``run_dir``; each agent holds
    ``policy`` (default: what ``fed`` promises)."""

    def __init__(self, fed: FederationConfig, run_dir: Path, policy: PrivacyPolicy | None = None,
                 episode_key: bytes = b"k" * 32, service=JointEnvironmentService,
                 join_timeout: float = 60.0, pool: int | None = None) -> None:
        self.fed, self.run_dir, self.pool = fed, run_dir, pool
        spec = fed.spec
        secrets = AgentSecrets.write(run_dir, spec.agent_ids)
        self.keys = secrets.keys
        train = fed.train
        cfg = SimConfig(env=train.env, env_kwargs=train.env_kwargs, num_envs=train.num_envs,
                        run_id="federated-run-test", tokens=secrets.tokens,
                        episode_key=episode_key, max_comm_dim=max(train.team.comm_dim, 16),
                        join_timeout=join_timeout)
        self.service = service(cfg)
        self.sim = SimServer(cfg, service=self.service)
        settings = secrets.node_settings(self.sim.address, policy or PrivacyPolicy.of_run(fed),
                                         run_dir / "agents")
        contexts = [Context(run_id=1, node_id=i + 1, node_config={"partition-id": i},
                            state=RecordDict(), run_config={}) for i in range(spec.n_agents)]
        self.grid = Grid.of_client_app(make_client_app(settings), contexts, pool)
        self.lock = threading.Lock()

    def federation(self, fed: FederationConfig | None = None, waves: bool = True
                   ) -> Federation:
        """The server's loop, for ``fed`` (default: the run's own configuration); with a
        ``pool``, sending in waves that fit it unless ``waves`` is false."""
        return Federation(self.grid, fed or self.fed, self.run_dir, self.keys, progress=False,
                          console=Console(quiet=True), capacity=self.pool if waves else None)

    def close(self) -> None:
        self.grid.close()
        self.sim.stop()
