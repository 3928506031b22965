"""The agent worker behind a deployment's ClientApp: Flower's relaying ClientApp
(``clients.relay``), called the way a SuperNode calls it, hands each message over a real Unix
socket to a real worker, which trains through a real simulator on loopback.

What must hold: an agent kept between rounds computes what an agent restored every round
computes; a round sent again unchanged is answered with its reply and releases nothing twice;
a worker that is gone fails the message with one line, and a new one continues from the
state on disk; only this user, with the worker's token, and only the agent a worker serves,
reach it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedcomm.clients import relay
from fedcomm.clients.agent import global_arrays
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.clients.worker import AgentWorker
from fedcomm.models.team import Team
from fedcomm.protocol.round import TrainInstruction
from fedcomm.protocol.worker import (
    MAX_FRAME,
    WORKER_SOCKET,
    WORKER_TOKEN,
    WorkerProtocolError,
    WorkerReply,
    WorkerRequest,
    listen,
)
from tests.test_clientapp import FED, nodes, server_identity  # noqa: F401 - fixtures

SEEDED = replace(PrivacyPolicy.of_run(FED), seeded_noise=True)  # reproducible noise


class Workers:
    """One worker per agent, each serving in a thread and asking for its own token, and the
    SuperNodes' contexts, which name the token's file as a deployment's node config does."""

    def __init__(self, tmp: Path, n) -> None:
        self.n, self.folder = n, Path(tmp) / "sockets"
        self.workers: dict[int, AgentWorker] = {}
        self.contexts = []
        self.tokens = [f"worker-token-{i}" for i in range(n.spec.n_agents)]
        for i, agent in enumerate(n.spec.agent_ids):
            token_file = Path(tmp) / f"worker-{i}.token"
            token_file.write_text(self.tokens[i] + "\n")
            settings = n.secrets.node_settings(n.sim_address, n.policy, agent_id=agent,
                                               state_dir=n.state_root / agent,
                                               worker_socket=self.folder / f"{i}.sock",
                                               worker_token=token_file)
            self.contexts.append(Context(run_id=1, node_id=i + 1, node_config=settings,
                                         state=RecordDict(), run_config={}))
            self.start(i)

    def start(self, i: int) -> AgentWorker:
        worker = AgentWorker(self.contexts[i].node_config[WORKER_SOCKET],
                             self.n.spec.agent_ids[i], self.tokens[i])
        threading.Thread(target=_serve, args=(worker,), daemon=True).start()
        self.workers[i] = worker
        return worker

    def stop(self, i: int) -> None:
        self.workers.pop(i).close()

    def send(self, kind: str, arrays: dict[str, torch.Tensor], server_round: int
             ) -> list[Message]:
        return self.n.send(kind, arrays, server_round, app=relay.app, contexts=self.contexts)

    def close(self) -> None:
        for i in list(self.workers):
            self.stop(i)


def _serve(worker: AgentWorker) -> None:
    with contextlib.suppress(OSError):  # closed
        worker.serve_forever()


@pytest.fixture
def workers(nodes, tmp_path):  # noqa: F811 - the fixture of tests.test_clientapp
    made = []

    def start(fed=FED, join_timeout=20.0):
        n = nodes(fed, join_timeout, policy=SEEDED)
        w = Workers(tmp_path, n)
        made.append(w)
        return w

    yield start
    for w in made:
        w.close()


def arrays_of(reply: Message) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error
    return reply.content["arrays"].to_torch_state_dict()


def ledger_lines(n, agent: str) -> list[str]:
    return (n.state_root / agent / "ledger.jsonl").read_text().splitlines()


@pytest.mark.integration  # a simulator and workers
def test_a_kept_agent_computes_what_an_agent_restored_every_round_computes(nodes,  # noqa: F811
                                                                           workers):
    fresh = nodes(FED, policy=SEEDED)
    team = Team.initial(fresh.spec, FED.train.team, FED.train.seed)
    start = global_arrays(team)
    r1 = fresh.send(MessageType.TRAIN, start, server_round=1)
    r2 = fresh.send(MessageType.TRAIN, arrays_of(r1[0]), server_round=2)

    w = workers()
    k1 = w.send(MessageType.TRAIN, start, server_round=1)
    k2 = w.send(MessageType.TRAIN, arrays_of(r1[0]), server_round=2)
    for a, b in zip(r1 + r2, k1 + k2):
        for key, value in arrays_of(a).items():
            torch.testing.assert_close(arrays_of(b)[key], value, rtol=0, atol=1e-6)
    for reply in k2:  # round 2 went on from memory: nothing restored
        metrics = reply.content["metrics"]
        assert metrics["restored_round"] == 1 and metrics["restore_s"] == 0.0
        assert metrics["start_s"] > 0  # the relaying process's own start-up


@pytest.mark.integration  # a simulator and workers
def test_a_round_sent_again_is_answered_with_its_reply_and_releases_nothing_twice(workers):
    w = workers()
    n = w.n
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    first = w.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    ledgers = {a: ledger_lines(n, a) for a in n.spec.agent_ids}
    joins = len(n.service.requests)
    again = w.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    for a, b in zip(first, again):
        assert arrays_of(a).keys() == arrays_of(b).keys()
        for key, value in arrays_of(a).items():
            assert torch.equal(arrays_of(b)[key], value)
    assert len(n.service.requests) == joins  # the simulator saw nothing of it
    assert {a: ledger_lines(n, a) for a in n.spec.agent_ids} == ledgers
    # Once: asked a third time, the round runs again from the state before it, and its
    # releases are written (they happen again).
    third = w.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    assert all(r.content["metrics"]["restored_round"] == 0 for r in third)
    assert all(len(ledger_lines(n, a)) > len(ledgers[a]) for a in n.spec.agent_ids)


@pytest.mark.integration  # a simulator and workers
def test_a_worker_gone_fails_the_message_and_a_new_one_continues_from_disk(workers,
                                                                             monkeypatch):
    w = workers(join_timeout=3.0)
    n = w.n
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    r1 = w.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    w.stop(0)
    monkeypatch.setattr(relay, "CONNECT_S", 0.5)
    failed = w.send(MessageType.TRAIN, arrays_of(r1[0]), server_round=2)
    assert failed[0].has_error()
    assert failed[0].error.reason.startswith(f"{n.spec.agent_ids[0]}: its worker is not "
                                             "listening at")
    assert all("join barrier" in r.error.reason for r in failed[1:])  # waited for it, alone
    # A new worker on the same socket: round 2 again, every agent restored from disk (the
    # others closed theirs when their round failed).
    w.start(0)
    r2 = w.send(MessageType.TRAIN, arrays_of(r1[0]), server_round=2)
    metrics = [r.content["metrics"] for r in r2]
    assert [m["restored_round"] for m in metrics] == [1, 1, 1]
    assert all(m["restore_s"] > 0 for m in metrics)


@pytest.mark.integration  # a simulator and workers
def test_a_worker_serves_its_own_agent_only(workers):
    w = workers()
    n = w.n
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    w.contexts[1].node_config[WORKER_SOCKET] = w.contexts[0].node_config[WORKER_SOCKET]
    w.contexts[1].node_config[WORKER_TOKEN] = w.contexts[0].node_config[WORKER_TOKEN]
    replies = w.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    assert replies[1].has_error()
    assert (f"this worker serves {n.spec.agent_ids[0]}, not {n.spec.agent_ids[1]}"
            in replies[1].error.reason)


def test_the_socket_is_this_users_alone(tmp_path):
    sock = listen(tmp_path / "w" / "a.sock")
    try:
        assert stat.S_IMODE((tmp_path / "w").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "w" / "a.sock").stat().st_mode) == 0o600
    finally:
        sock.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(PermissionError, match="closed to others"):
        listen(shared / "a.sock")


def test_malformed_and_oversized_frames_are_refused():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(len(b"{not json").to_bytes(8, "big") + b"{not json")
        with pytest.raises(WorkerProtocolError, match="not JSON"):
            WorkerRequest.receive(b)
        a.sendall((MAX_FRAME + 1).to_bytes(8, "big"))
        with pytest.raises(WorkerProtocolError, match="over the limit"):
            WorkerRequest.receive(b)
        header = json.dumps({"kind": "query", "settings": {}}).encode()
        a.sendall(len(header).to_bytes(8, "big") + header + (0).to_bytes(8, "big"))
        with pytest.raises(WorkerProtocolError, match="needs a kind"):
            WorkerRequest.receive(b)
        a.sendall((5).to_bytes(8, "big") + b"ab")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(WorkerProtocolError, match="closed the connection"):
            WorkerRequest.receive(b)


def test_requests_and_replies_cross_the_socket_unchanged():
    content = RecordDict({"arrays": ArrayRecord({"w": torch.arange(6.0).reshape(2, 3)}),
                          "config": TrainInstruction("{}", 3, 0.5).to_record()})
    a, b = socket.socketpair()
    with a, b:
        WorkerRequest("train", {"agent-id": "x"}, content, 1.25).send(a)
        got = WorkerRequest.receive(b)
        assert (got.kind, got.settings, got.start_s) == ("train", {"agent-id": "x"}, 1.25)
        assert torch.equal(got.content["arrays"].to_torch_state_dict()["w"],
                           torch.arange(6.0).reshape(2, 3))
        assert TrainInstruction.from_record(got.content["config"]).server_round == 3
        WorkerReply(error="agent x: failed").send(b)
        assert WorkerReply.receive(a).error == "agent x: failed"
        WorkerReply(RecordDict({"m": ConfigRecord({"k": 1})})).send(b)
        reply = WorkerReply.receive(a)
        assert reply.error is None and reply.content["m"]["k"] == 1


@pytest.mark.integration  # a simulator and workers
def test_without_a_worker_socket_the_clientapp_runs_the_agent_itself(workers):
    w = workers()
    n = w.n
    contexts = [Context(run_id=1, node_id=c.node_id, state=RecordDict(), run_config={},
                        node_config={k: v for k, v in c.node_config.items()
                                     if k != WORKER_SOCKET}) for c in w.contexts]
    w.close()  # no worker listens: the agents run in the ClientApp's process
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    replies = n.send(MessageType.TRAIN, global_arrays(team), 1, app=relay.app,
                     contexts=contexts)
    assert all(r.content["metrics"]["restored_round"] == 0 for r in replies)
    assert all(arrays_of(r) for r in replies)
