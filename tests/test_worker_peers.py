"""What reaches an agent's worker besides its own ClientApp: malformed requests, idle and slow
peers, requests without its token; and a worker that does not answer its ClientApp.

What must hold: nothing a peer sends raises out of ``serve_forever``; every refusal is one line
of the worker's log and, where the peer still listens, its reply; an idle or slow peer is
dropped after ``REQUEST_S`` and the next connection is served; only a request with the
worker's token is answered; the relaying ClientApp gives up on a silent worker after the run's
round timeout, with one line.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedcomm.clients import relay
from fedcomm.clients import worker as worker_module
from fedcomm.clients.worker import AgentWorker, run_worker
from fedcomm.commands import build_parser
from fedcomm.protocol.auth import write_tokens
from fedcomm.protocol.round import PROOF, Proof, TrainInstruction
from fedcomm.protocol.signing import KEY_FILE
from fedcomm.protocol.worker import (
    MAX_FRAME,
    MAX_HEADER,
    WORKER_SOCKET,
    WORKER_TOKEN,
    WorkerAuthError,
    WorkerReply,
    WorkerRequest,
    ask,
    listen,
)
from tests.test_clientapp import server_identity  # noqa: F401 - makes messages as the server

TOKEN = "the-worker-token"


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def header(**change: object) -> bytes:
    fields = {"kind": "train", "settings": {"agent-id": "a"}, "start_s": 0.5, "token": TOKEN}
    return json.dumps({k: v for k, v in {**fields, **change}.items() if v is not ...}).encode()


EMPTY = RecordDict()
CONTENT = frame(recorddict_to_proto(EMPTY).SerializeToString())
GOOD = frame(header()) + CONTENT

# Each a whole conversation from a peer, and a word of the reason the worker must give.
MALFORMED = {
    "start_s not a number": (frame(header(start_s="abc")) + CONTENT, "start_s"),
    "start_s null": (frame(header(start_s=None)) + CONTENT, "start_s"),
    "start_s a list": (frame(header(start_s=[1])) + CONTENT, "start_s"),
    "start_s a boolean": (frame(header(start_s=True)) + CONTENT, "start_s"),
    "start_s negative": (frame(header(start_s=-1)) + CONTENT, "start_s"),
    "start_s NaN": (frame(header().replace(b"0.5", b"NaN")) + CONTENT, "start_s"),
    "start_s Infinity": (frame(header().replace(b"0.5", b"Infinity")) + CONTENT, "start_s"),
    "header not UTF-8": (frame(b'{"kind": "\xff\xfe"}') + CONTENT, "not JSON"),
    "header not JSON": (frame(b"{not json") + CONTENT, "not JSON"),
    "header nested too deep": (frame(b"[" * 200_000) + CONTENT, "not JSON"),
    "header a list": (frame(b"[1, 2]") + CONTENT, "not a JSON object"),
    "settings not strings": (frame(header(settings={"agent-id": 1})) + CONTENT, "settings"),
    "settings nested": (frame(header(settings={"a": {"b": "c"}})) + CONTENT, "settings"),
    "settings a list": (frame(header(settings=["a"])) + CONTENT, "settings"),
    "settings missing": (frame(header(settings=...)) + CONTENT, "settings"),
    "kind unknown": (frame(header(kind="query")) + CONTENT, "kind"),
    "kind an object": (frame(header(kind={"train": 1})) + CONTENT, "kind"),
    "kind missing": (frame(header(kind=...)) + CONTENT, "kind"),
    "token not a string": (frame(header(token=123)) + CONTENT, "token must be a string"),
    "token missing": (frame(header(token=...)) + CONTENT, "token"),
    "token wrong": (frame(header(token="guess")) + CONTENT, "token"),
    "content not protobuf": (frame(header()) + frame(b"\xff" * 7), "not a Flower RecordDict"),
    "content missing": (frame(header()), "closed the connection"),
    "frame truncated": ((100).to_bytes(8, "big") + b"0123456789", "closed the connection"),
    "length truncated": (b"\x00\x00\x01", "closed the connection"),
    "nothing at all": (b"", "closed the connection"),
    "absurd header length": ((1 << 63).to_bytes(8, "big"), "over the limit"),
    "header over its limit": ((MAX_HEADER + 1).to_bytes(8, "big"), "over the limit"),
    "content over its limit": (frame(header()) + (MAX_FRAME + 1).to_bytes(8, "big"),
                               "over the limit"),
}


def echo(request: WorkerRequest) -> WorkerReply:
    """The kind and start-up the worker got, and a proof for the relay to sign, as an agent's
    reply carries one."""
    return WorkerReply(RecordDict({"m": ConfigRecord({"kind": request.kind,
                                                      "start_s": request.start_s}),
                                   PROOF: Proof("a", 0, "0" * 64).to_record()}))


class Served:
    """An ``AgentWorker`` serving in a thread, its agent replaced by an echo of the kind."""

    def __init__(self, path: Path, token: str | None = TOKEN) -> None:
        self.worker = AgentWorker(path, "a", token)
        self.worker.answer = echo  # type: ignore[method-assign]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.worker.serve_forever()
        except OSError:  # closed by the test
            pass
        except BaseException as e:  # what must never happen
            self.errors.append(e)

    def converse(self, data: bytes, timeout: float = 10.0) -> WorkerReply:
        """Send ``data``, close the sending side, and read the worker's reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.worker.path))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return WorkerReply.receive(sock)

    def assert_serving(self) -> None:
        reply = self.converse(GOOD)
        assert reply.error is None, reply.error
        assert reply.content["m"]["kind"] == "train" and reply.content["m"]["start_s"] == 0.5
        assert self.thread.is_alive() and not self.errors, self.errors


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "w" / "a.sock")
    yield s
    s.worker.close()


@pytest.mark.integration  # a worker serving its socket
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_request_is_refused_in_one_line_and_the_worker_goes_on(served, capsys,
                                                                           case):
    data, reason = MALFORMED[case]
    reply = served.converse(data)
    assert reply.error is not None and reply.error.startswith("a: its worker refused the "
                                                              "request (")
    assert reason in reply.error
    served.assert_serving()
    refusals = [line for line in capsys.readouterr().out.splitlines() if "refused" in line]
    assert len(refusals) == 1 and reason in refusals[0], refusals


@pytest.mark.integration  # a worker serving its socket
def test_no_fuzzed_request_stops_the_worker(served, capsys):
    """Requests with random bytes changed, cut short or inserted: each is answered or refused
    (a change in a string may leave a valid request), and the worker serves on."""
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(GOOD)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            how = rng.choice(("flip", "cut", "insert"))
            if how == "flip":
                data[at] = rng.randrange(256)
            elif how == "cut":
                del data[at:at + rng.randint(1, 16)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 16))
        served.converse(bytes(data), timeout=5.0)
    served.assert_serving()
    log = capsys.readouterr().out.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in log)  # one line each


@pytest.mark.integration  # a worker serving its socket
def test_an_idle_or_slow_peer_is_dropped_and_the_next_connection_served(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_module, "REQUEST_S", 0.5)
    s = Served(tmp_path / "w" / "a.sock")
    try:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(s.worker.path))
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(str(s.worker.path))
        stop = threading.Event()

        def trickle() -> None:  # a byte every 0.1 s: never idle for a whole REQUEST_S
            for byte in GOOD:
                if stop.wait(0.1):
                    return
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        start = time.monotonic()
        s.assert_serving()  # behind both: served once each has had its 0.5 s
        assert time.monotonic() - start < 5
        stop.set()
        for peer in (idle, slow):
            peer.settimeout(5)
            with peer:
                reply = WorkerReply.receive(peer)
            assert reply.error is not None and "no complete request within 0.5 s" in reply.error
    finally:
        s.worker.close()


@pytest.mark.integration  # a worker serving its socket
def test_only_a_request_with_the_workers_token_is_answered(tmp_path):
    s = Served(tmp_path / "w" / "a.sock")
    try:
        for token in ("", "guess", TOKEN[:-1], TOKEN + "x"):
            reply = ask(s.worker.path, WorkerRequest("train", {}, EMPTY, token=token), 10)
            assert "does not carry this worker's token" in (reply.error or ""), token
        reply = ask(s.worker.path, WorkerRequest("train", {}, EMPTY, token=TOKEN), 10)
        assert reply.error is None
        # Refused on its header: the content of a request without the token is never read.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(s.worker.path))
            sock.sendall(frame(header(token="guess")))  # and its content never comes
            start = time.monotonic()
            assert "token" in (WorkerReply.receive(sock).error or "")
            assert time.monotonic() - start < worker_module.REQUEST_S / 2
    finally:
        s.worker.close()


def test_the_token_is_checked_in_the_protocol_before_the_content():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame(header(token="guess")))
        with pytest.raises(WorkerAuthError):
            WorkerRequest.receive(b, 1.0, TOKEN)
        a.sendall(GOOD)
        assert WorkerRequest.receive(b, 1.0, TOKEN).token == TOKEN
        assert TOKEN not in repr(WorkerRequest("train", {}, EMPTY, token=TOKEN))


def test_a_request_arriving_too_slowly_times_out_as_a_whole():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(GOOD[:20])
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            WorkerRequest.receive(b, 0.3)
        assert time.monotonic() - start < 2


# -- the relaying ClientApp -------------------------------------------------------------------
def message(content: RecordDict) -> Message:
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def run_config(round_timeout: float) -> RecordDict:
    config = json.dumps({"round_timeout": round_timeout, "rounds": 3})
    return RecordDict({"config": TrainInstruction(config, 1).to_record()})


def test_the_relay_waits_for_the_worker_as_long_as_the_round(tmp_path):
    assert relay.answer_timeout(run_config(42.5)) == 42.5
    for content in (RecordDict(), RecordDict({"config": ConfigRecord({"config": "{not"})}),
                    RecordDict({"config": ConfigRecord({"config": "[1]"})}),
                    RecordDict({"config": ConfigRecord({"config": '{"round_timeout": "x"}'})}),
                    RecordDict({"config": ConfigRecord({"other": 1})}), run_config(-1)):
        assert relay.answer_timeout(content) == relay.ANSWER_S


def silent_worker(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A socket that takes connections and requests and never answers."""
    sock, taken = listen(path), []

    def take() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            taken.append(conn)

    threading.Thread(target=take, daemon=True).start()
    return sock, taken


@pytest.mark.integration  # a socket taking connections
def test_a_worker_that_does_not_answer_fails_the_message_in_one_line(tmp_path):
    path = tmp_path / "w" / "a.sock"
    sock, taken = silent_worker(path)
    token_file = tmp_path / "worker.token"
    token_file.write_text(TOKEN)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"agent-id": "a", WORKER_SOCKET: str(path),
                                   WORKER_TOKEN: str(token_file)})
    try:
        start = time.monotonic()
        reply = relay.relay(message(run_config(0.5)), context, "train")
        assert 0.5 <= time.monotonic() - start < 5
        assert reply.has_error()
        assert reply.error.reason == f"a: its worker at {path} did not answer within 0.5 s"
    finally:
        sock.close()
        for conn in taken:
            conn.close()


@pytest.mark.integration  # a worker serving its socket
def test_the_relay_shows_the_token_in_its_file_and_says_when_it_cannot(tmp_path):
    s = Served(tmp_path / "w" / "a.sock")
    token_file = tmp_path / "worker.token"
    write_tokens(tmp_path / "server-key.json", {"a": "its key shared with the server"})
    settings = {"agent-id": "a", WORKER_SOCKET: str(s.worker.path),
                WORKER_TOKEN: str(token_file), KEY_FILE: str(tmp_path / "server-key.json")}
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config=settings)
    try:
        token_file.write_text(TOKEN + "\n")
        assert not relay.relay(message(run_config(10)), context, "train").has_error()
        token_file.write_text("another")
        reply = relay.relay(message(run_config(10)), context, "train")
        assert reply.error.reason == ("a: its worker refused the request (the request does "
                                      "not carry this worker's token)")
        token_file.unlink()
        reply = relay.relay(message(run_config(10)), context, "train")
        assert reply.error.reason.startswith("a: cannot read the worker token file")
        del settings[WORKER_TOKEN]  # no token at all
        reply = relay.relay(message(run_config(10)), context, "train")
        assert "does not carry this worker's token" in reply.error.reason
    finally:
        s.worker.close()


@pytest.mark.integration  # a worker serving its socket
def test_a_refusal_reaches_a_relay_still_sending_a_large_request(tmp_path):
    """The worker stops reading at a wrong token's header; the relay, its send cut short,
    still reads why."""
    s = Served(tmp_path / "w" / "a.sock")
    big = RecordDict({"c": ConfigRecord({"blob": b"x" * (8 << 20)})})
    try:
        reply = ask(s.worker.path, WorkerRequest("train", {}, big, token="guess"), 10)
        assert "does not carry this worker's token" in (reply.error or "")
    finally:
        s.worker.close()


def test_fedcomm_worker_reads_its_token_from_a_file(tmp_path, monkeypatch):
    args = build_parser().parse_args(["worker", "--socket", "s.sock", "--agent-id", "a",
                                      "--token-file", "t"])
    assert args.token_file == Path("t")
    assert build_parser().parse_args(["worker", "--socket", "s.sock"]).token_file is None
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        run_worker(tmp_path / "w" / "a.sock", "a", empty)
    with pytest.raises(ValueError, match="cannot read"):
        run_worker(tmp_path / "w" / "a.sock", "a", tmp_path / "missing")
