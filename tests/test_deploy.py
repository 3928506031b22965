"""``fedcomm deploy local`` end to end: real ``flower-superlink``, ``flower-supernode``s and
``fedcomm sim serve`` processes on loopback, TLS and node authentication on; then a SuperNode,
an agent's worker and the SuperLink killed in the middle of a round."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from fedcomm.baselines import EVAL_SEED
from fedcomm.clients.grpc_transport import ClientTls
from fedcomm.commands import build_parser, federation_config_from_args, main
from fedcomm.deploy.local import LocalDeployment, free_port, tool
from fedcomm.deploy.secrets import make_secrets
from fedcomm.modes.processes import ChildProcess
from fedcomm.protocol.auth import call_metadata
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.server.checkpoint import load_checkpoint
from tests.harness.processes import (
    ROUND_STEPS,
    SMALL,
    assert_nothing_left,
    deploy,
    processes_mentioning,
    rounds_in,
)

AGENTS = ("sensor_0", "processor_0", "actuator_0")

pytestmark = pytest.mark.integration  # every test starts a deployment


def wait_for_round(run_dir: Path, rounds: int, proc: subprocess.Popen,
                   timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(rounds_in(run_dir)) >= rounds):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"round {rounds} did not complete"
        time.sleep(0.2)


def pid_of(needle: str, also: str) -> int:
    return next(pid for pid, line in processes_mentioning(needle).items() if also in line)


def wait_for_clientapp(run_dir: Path, agent: str, timeout: float = 60) -> None:
    """Until ``agent``'s SuperNode has started a ClientApp for the round."""
    home = str(run_dir / "deploy" / "nodes" / agent)
    deadline = time.monotonic() + timeout
    while not any("flwr-clientapp" in line for line in processes_mentioning(home).values()):
        assert time.monotonic() < deadline, f"{agent} got no message"
        time.sleep(0.1)


def ledger_keys(run_dir: Path, agent: str) -> Counter:
    lines = (run_dir / "agents" / agent / "ledger.jsonl").read_text().splitlines()
    return Counter((e["round"], e["batch"], e["mechanism"]) for e in map(json.loads, lines))


def secret_texts(run_dir: Path) -> list[str]:
    """Every token and server key, a line of every private key's body, and the simulator's
    episode key (in hex)."""
    secrets = run_dir / "deploy" / "secrets"
    texts = list(json.loads((secrets / "sim" / "tokens.json").read_text()).values())
    texts += list(json.loads((secrets / "superlink" / "agent-keys.json").read_text()).values())
    texts += [(secrets / "agents" / a / "worker.token").read_text().strip() for a in AGENTS]
    texts.append((secrets / "sim" / "episode.key").read_bytes().hex())
    for key in secrets.rglob("*.key"):
        if key.name == "episode.key":
            continue
        body = [line for line in key.read_text().splitlines() if "PRIVATE KEY" not in line]
        texts.append(body[1])
    return texts


def test_deploy_runs_two_rounds_over_tls_with_node_authentication(tmp_path):
    out = tmp_path / "run"
    proc = deploy("--env-steps", str(2 * ROUND_STEPS), "--out", "run", cwd=tmp_path)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log
    assert "gap closed" in log and "Traceback" not in log
    # the same run directory as fedcomm simulate
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "team.pt",
                 "learning_curve.png", "privacy_report.json", "privacy_report.html"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["env_steps"] for r in rows] == [ROUND_STEPS, 2 * ROUND_STEPS]
    assert [r["restored_round_min"] for r in rows] == [0, 1]
    assert all(r["agents"] == 3 and r["failures"] == 0 and r["start_s"] > 0 for r in rows)
    assert load_checkpoint(out).round == 2
    assert main(["audit", str(out)]) == 0
    assert main(["eval", str(out), "--episodes", "64"]) == 0
    # every party was its own process, over TLS, the SuperNodes authenticated
    logs = out / "deploy" / "logs"
    assert "Uvicorn running on https://" in (logs / "superlink.log").read_text()
    assert "TLS, mutual" in (logs / "sim.log").read_text()
    for agent in AGENTS:
        assert (logs / f"supernode-{agent}.log").exists()
        assert (out / "agents" / agent / "state-r000002.pt").exists()
        # each worker answered its own ClientApp, which showed it the agent's worker token
        worker_log = (logs / f"worker-{agent}.log").read_text()
        assert "refused" not in worker_log and "no token file" not in worker_log
        assert worker_log.count(f"train for {agent}: answered") >= 2
    # secrets, ledgers and private state are their owner's alone
    private = [*(out / "deploy" / "secrets").rglob("*.key"),
               *(out / "deploy" / "secrets").rglob("*token*"), *(out / "agents").rglob("*.pt"),
               *(out / "agents").rglob("ledger.jsonl")]
    assert len(private) >= 4 + 5 * len(AGENTS)
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for agent in AGENTS:
        assert stat.S_IMODE((out / "agents" / agent).stat().st_mode) == 0o700
    # no secret in any log or in the output
    everything = log + "".join(p.read_text(errors="replace") for p in logs.iterdir())
    for secret in secret_texts(out):
        assert secret not in everything
    assert_nothing_left(out)


def test_killed_supernode_is_restarted_and_rejoins_with_its_private_state(tmp_path):
    """``--on-agent-failure continue``: the round with the dead agent ends with the reasons
    within the round timeout, is run again once the node is back, and the agent continues
    from its own state of the round before."""
    out = tmp_path / "run"
    proc = deploy("--env-steps", str(3 * ROUND_STEPS), "--out", str(out),
                  "--on-agent-failure", "continue", "--round-timeout", "60")
    wait_for_round(out, 1, proc)
    wait_for_clientapp(out, "sensor_0")  # still starting: round 2 never reaches its worker
    os.killpg(pid_of("flower-supernode", "agents/sensor_0/node.key"), signal.SIGKILL)
    killed = time.monotonic()
    log, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, log
    assert "SuperNode of sensor_0 stopped" in log
    run_log = (out / "deploy" / "logs" / "flwr-run.log").read_text()
    assert "round 2:" in run_log and "sensor_0" in run_log  # the failed round, and why
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["restored_round_min"] for r in rows] == [0, 1, 2]
    assert rows[1]["wall_time_s"] - rows[0]["wall_time_s"] < 60 + 150  # timeout + rerun
    assert time.monotonic() - killed < 400
    # The failed attempt never got past the join: nothing charged. Round 2 ran again, and
    # round 3 after it, on batches labelled past the first attempt's (6 batches in the run).
    for agent in AGENTS:
        keys = ledger_keys(out, agent)
        training = {(r, b) for r, b, _ in keys if b < EVAL_SEED}  # evaluation is keyed by seed
        assert training == {(1, 1), (1, 2), (2, 9), (2, 10), (3, 11), (3, 12)}
        assert set(keys.values()) == {1}, keys
    assert main(["audit", str(out)]) == 0
    assert_nothing_left(out)


def test_killed_worker_fails_its_round_and_a_restarted_one_continues_from_its_state(tmp_path):
    """An agent's worker SIGKILLed in the middle of round 2: its ClientApp answers at once
    that the worker stopped, the others' batch ends at the simulator, the launcher starts the
    worker again, and round 2 runs again with every agent restored from its round-1 state.
    Every release that happened is in the ledgers: a batch joined before the kill was released
    then, and the rerun plays fresh episodes."""
    out = tmp_path / "run"
    proc = deploy("--env-steps", str(3 * ROUND_STEPS), "--out", str(out),
                  "--on-agent-failure", "continue", "--round-timeout", "60")
    wait_for_round(out, 1, proc)
    worker_log = out / "deploy" / "logs" / "worker-sensor_0.log"
    deadline = time.monotonic() + 120
    while worker_log.read_text().count("train for sensor_0: received") < 2:  # round 2's
        assert time.monotonic() < deadline and proc.poll() is None, "round 2 never came"
        time.sleep(0.05)
    os.kill(pid_of("fedcomm worker", "--agent-id sensor_0"), signal.SIGKILL)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log
    assert "worker of sensor_0 stopped" in log
    run_log = (out / "deploy" / "logs" / "flwr-run.log").read_text()
    assert "sensor_0: its worker at" in run_log  # the failed round, and why
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["restored_round_min"] for r in rows] == [0, 1, 2]
    # Round 2 ran again, and round 3 after it, on batches labelled past the first attempt's
    # (6 batches in the run): what the first attempt released stays, and composes with none.
    for agent in AGENTS:
        keys = ledger_keys(out, agent)
        training = {k: n for k, n in keys.items() if k[1] < EVAL_SEED}
        batches = {(r, b) for r, b, _ in training}
        assert {(1, 1), (1, 2), (2, 9), (2, 10), (3, 11), (3, 12)} <= batches
        assert batches <= {(1, 1), (1, 2), (2, 3), (2, 4), (2, 9), (2, 10), (3, 11), (3, 12)}
        assert set(training.values()) == {1}, keys
    assert main(["audit", str(out)]) == 0
    assert_nothing_left(out)


def test_killed_superlink_resumes_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = deploy("--env-steps", str(2 * ROUND_STEPS), "--out", str(out))
    wait_for_round(out, 1, proc)
    wait_for_clientapp(out, "sensor_0")
    os.killpg(pid_of("flower-superlink", str(out)), signal.SIGKILL)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, log
    assert "superlink stopped" in log and f"--resume {out}" in log.replace("\n", "")
    assert_nothing_left(out)
    assert rounds_in(out) == [1] and load_checkpoint(out).round == 1

    proc = subprocess.run([sys.executable, "-m", "fedcomm", "deploy", "local", "--resume",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["env_steps"] for r in rows] == [ROUND_STEPS, 2 * ROUND_STEPS]
    assert rows[1]["restored_round_min"] == 1  # every agent went on from its round-1 state
    assert load_checkpoint(out).round == 2
    for agent in AGENTS:
        keys = ledger_keys(out, agent)
        assert all(keys[(1, b, kind)] == 1 for b in (1, 2) for kind in ("message", "update"))
    assert main(["audit", str(out)]) == 0
    assert_nothing_left(out)


def _join_status(address: str, credentials: grpc.ChannelCredentials | None, agent: str,
                 token: str) -> grpc.StatusCode:
    channel = (grpc.secure_channel(address, credentials) if credentials
               else grpc.insecure_channel(address))
    with channel:
        stub = pb_grpc.JointEnvironmentStub(channel)
        try:
            stub.Join(pb.JoinRequest(), metadata=call_metadata(agent, token), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _refused(node: ChildProcess, timeout: float = 60) -> str:
    """The SuperNode's log once it gave up; fails if it is still running."""
    try:
        node.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{node.name} was not refused:\n{node.tail()}") from None
    assert node.proc.returncode != 0
    return node.tail(40)


def test_deployment_refuses_unregistered_nodes_plaintext_and_wrong_tokens(tmp_path):
    fed = federation_config_from_args(build_parser().parse_args(["simulate", *SMALL]))
    with LocalDeployment(fed, tmp_path / "run", Console(quiet=True)) as deployment:
        deployment.start()
        secrets = deployment.files.secrets
        mine = secrets.agent("sensor_0")
        intruder = make_secrets(tmp_path / "intruder", ["sensor_0"]).agent("sensor_0")
        base = [tool("flower-supernode"), "--superlink", deployment.superlink_address,
                "--max-retries", "1", "--port", str(free_port())]
        # a key the SuperLink never registered
        log = _refused(ChildProcess("unregistered", [
            *base, "--root-certificates", str(mine.ca),
            "--auth-supernode-private-key", str(intruder.node_key)], tmp_path / "u.log"))
        assert "activate" in log.lower() or "denied" in log.lower(), log
        # a registered key over plaintext
        _refused(ChildProcess("plaintext", [
            *base, "--insecure", "--auth-supernode-private-key", str(mine.node_key)],
            tmp_path / "p.log"))
        # the simulator: a wrong token, no client certificate, plaintext
        sim = f"localhost:{deployment.sim.port}"
        token = json.loads(mine.token_file.read_text())["sensor_0"]
        mtls = ClientTls(mine.ca, mine.cert, mine.key).credentials()
        assert _join_status(sim, mtls, "sensor_0", "wrong") == grpc.StatusCode.UNAUTHENTICATED
        assert _join_status(sim, mtls, "processor_0", token) == grpc.StatusCode.UNAUTHENTICATED
        no_cert = ClientTls(mine.ca).credentials()
        assert _join_status(sim, no_cert, "sensor_0", token) == grpc.StatusCode.UNAVAILABLE
        assert _join_status(sim, None, "sensor_0", token) == grpc.StatusCode.UNAVAILABLE
        # the agent itself gets past authentication (to the check of its empty message)
        assert _join_status(sim, mtls, "sensor_0", token) == grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_left(tmp_path / "run")


def test_ctrl_c_stops_every_process_of_the_deployment(tmp_path):
    out = tmp_path / "run"
    proc = deploy("--env-steps", str(2 * ROUND_STEPS), "--out", str(out))
    wait_for_clientapp(out, "actuator_0")
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log
    assert f"fedcomm deploy local --resume {out}" in log.replace("\n", "")
    assert "Traceback" not in log
    assert_nothing_left(out)
