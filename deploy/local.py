"""``fedcomm deploy local``: the deployment, every party its own process, on this host.

Flower's own components, as on many hosts: ``flower-superlink`` (TLS, SuperNode
authentication), one
``flower-supernode`` per agent (its own authentication key and node config: agent id, state
directory, the simulator's address, mutual-TLS certificates and its token file), ``fedcomm sim
serve`` (mutual TLS, one token per agent), then ``flwr run`` of the same ServerApp and ClientApp
as in simulation. The launcher makes the secrets, follows the run's progress in its
``metrics.jsonl``, restarts an agent's SuperNode that dies (as a process supervisor on a real
host would), and stops every process it started on success, failure, Ctrl-C and SIGTERM.

Everything lives in the run directory: the run's files as ``fedcomm simulate`` writes them,
``agents/<id>/`` (each agent's durable state and privacy ledger) and ``deploy/`` (secrets,
the Flower app, Flower's homes and every process's log). The workers' sockets live in a
folder of this user's alone under the system's temporary directory (a Unix socket's path is
short), removed when the deployment stops; each worker answers only requests that carry its
agent's worker token (``--token-file``, and ``worker-token-file`` in the node config).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from fedcomm.clients.grpc_transport import ClientTls
from fedcomm.clients.node import node_config
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.config import FederationConfig
from fedcomm.deploy.flower_app import write_app
from fedcomm.deploy.secrets import DeploymentSecrets, make_secrets
from fedcomm.modes.processes import ChildProcess, SimProcess, child_env, stop_tagged
from fedcomm.modes.simulation import check_ledgers_extend, complete_run, terminate_as_interrupt
from fedcomm.progress import progress_bar, status
from fedcomm.releases.plan import PrivacyPlan, plan_of
from fedcomm.server.app import ERROR_FILE
from fedcomm.server.federation import FederationError
from fedcomm.summary import RunResult

FEDERATION = "local"  # the SuperLink connection's name in Flower's config
DEPLOYMENT_TAG = "FEDCOMM_DEPLOYMENT"  # environment variable naming the deployment's run
# A SuperNode killed without signing off stays online at the SuperLink until two heartbeats
# (30 s apart) are missed, and Flower refuses to activate it again before that: a restarted
# node is retried for this long.
RESTART_WINDOW_S = 150.0
RESTART_PAUSE_S = 5.0
POLL_S = 0.5
# How often a SuperNode's SuperExec looks for a message to start a ClientApp for (Flower's
# default: 1 s); a relaying ClientApp is cheap, so the wait was a large part of a round.
SUPEREXEC_POLL_S = "0.1"


class DeploymentError(FederationError):
    """A party of the deployment failed; the message says which and where its log is."""


def tool(name: str) -> str:
    """A console command of this environment (next to its Python), else from ``PATH``."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} is not installed: install fedcomm, which brings Flower")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(process: ChildProcess, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive:
            break
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise DeploymentError(f"the {process.name} did not start listening on port {port}:\n"
                          f"{process.tail()}")


def flower_node_config(settings: dict[str, str]) -> str:
    """Flower's ``--node-config`` text: space-separated TOML ``key="value"`` pairs."""
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in settings.items())


class LocalFiles:
    """Where a local deployment keeps its files, inside the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.root = run_dir / "deploy"
        self.secrets = DeploymentSecrets(self.root / "secrets")
        self.logs = self.root / "logs"
        self.flwr_home = self.root / "flwr"  # the SuperLink's and the `flwr` CLI's

    def node_home(self, agent_id: str) -> Path:
        return self.root / "nodes" / agent_id

    def state_dir(self, agent_id: str) -> Path:
        return self.run_dir / "agents" / agent_id


class LocalDeployment:
    """The processes of one deployment on this host; a context manager that stops them all."""

    def __init__(self, fed: FederationConfig, run_dir: Path, console: Console,
                 restart_agents: bool = True, worker: bool = True,
                 policy: PrivacyPolicy | None = None) -> None:
        self.fed, self.console, self.restart_agents = fed, console, restart_agents
        self.policy = policy or PrivacyPolicy.of_run(fed)  # each agent's, in its node config
        self.worker = worker
        self.workers: dict[str, ChildProcess] = {}
        self.sockets: Path | None = None
        self.files = LocalFiles(run_dir.resolve())  # Flower wants absolute paths
        self.agents = fed.spec.agent_ids
        self.nodes: dict[str, ChildProcess] = {}
        self.down_since: dict[str, float] = {}  # agents whose SuperNode is being restarted
        self.sim: SimProcess | None = None
        self.superlink: ChildProcess | None = None
        self.flwr_run: ChildProcess | None = None
        # Every process of the deployment carries the tag, Flower's own children included.
        self.env = {"FLWR_HOME": str(self.files.flwr_home),
                    DEPLOYMENT_TAG: str(self.files.run_dir),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_S,
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        files = self.files
        files.logs.mkdir(parents=True, exist_ok=True)
        secrets = files.secrets
        if not secrets.exists(self.agents):
            make_secrets(secrets.dir, self.agents)
        self.sim = SimProcess(self.fed, secrets.tokens, files.logs / "sim.log",
                              tls=(secrets.sim / "server.crt", secrets.sim / "server.key",
                                   secrets.ca),
                              timeout=min(180.0, self.fed.round_timeout / 2),
                              episode_key=secrets.episode_key)
        port = free_port()
        self._write_flower_config(port)
        self.superlink = ChildProcess("superlink", [
            tool("flower-superlink"), "--ssl-ca-certfile", str(secrets.ca),
            "--ssl-certfile", str(secrets.superlink / "server.crt"),
            "--ssl-keyfile", str(secrets.superlink / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port)], files.logs / "superlink.log", self.env)
        _wait_listening(self.superlink, port)
        self.superlink_address = f"127.0.0.1:{port}"
        self._register_nodes()
        if self.worker:  # every worker starts at once: each imports torch for a second or two
            self.sockets = Path(tempfile.mkdtemp(prefix="fedcomm-workers-"))  # mode 0700
            started = {agent: self._spawn_worker(agent) for agent in self.agents}
            for agent, worker in started.items():
                self.workers[agent] = self._await_worker(agent, worker)
        for agent in self.agents:
            self.nodes[agent] = self._start_node(agent)

    def _write_flower_config(self, port: int) -> None:
        home = self.files.flwr_home
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{port}"\n'
            f"root-certificates = {json.dumps(str(self.files.secrets.ca))}\n")

    def _flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([tool("flwr"), *args], env=child_env(self.env),
                              capture_output=True, text=True, timeout=120)

    def _register_nodes(self) -> None:
        """Register every agent's public key with the SuperLink.

        The SuperLink keeps its state in memory, so a restarted deployment registers again.
        (With a database, the nodes of a SuperLink that was killed would stay "online" there,
        and be refused activation, until two of their heartbeats had been missed.)
        """
        for agent in self.agents:
            out = self._flwr("supernode", "register",
                             str(self.files.secrets.agent(agent).node_pub), FEDERATION,
                             "--name", agent)
            if out.returncode != 0:
                raise DeploymentError(f"registering {agent}'s SuperNode key failed:\n"
                                      f"{out.stdout}{out.stderr}")

    def _socket(self, agent: str) -> Path:
        assert self.sockets is not None
        return self.sockets / f"{self.agents.index(agent)}.sock"

    def _start_worker(self, agent: str) -> ChildProcess:
        """``agent``'s worker, once it listens."""
        return self._await_worker(agent, self._spawn_worker(agent))

    def _spawn_worker(self, agent: str) -> ChildProcess:
        path, token = self._socket(agent), self.files.secrets.agent(agent).worker_token
        path.unlink(missing_ok=True)
        return ChildProcess(f"worker of {agent}", [
            sys.executable, "-m", "fedcomm", "worker", "--socket", str(path),
            "--agent-id", agent, "--token-file", str(token)],
            self.files.logs / f"worker-{agent}.log", self.env)

    def _await_worker(self, agent: str, worker: ChildProcess,
                      timeout: float = 60.0) -> ChildProcess:
        path, deadline = self._socket(agent), time.monotonic() + timeout
        while not path.exists():
            if not worker.alive or time.monotonic() > deadline:
                worker.stop()
                raise DeploymentError(f"the {worker.name} did not start:\n{worker.tail()}")
            time.sleep(0.05)
        return worker

    def _start_node(self, agent: str) -> ChildProcess:
        mine = self.files.secrets.agent(agent)
        assert self.sim is not None
        settings = node_config(
            agent_id=agent, state_dir=self.files.state_dir(agent),
            sim_address=f"localhost:{self.sim.port}", token_file=mine.token_file,
            tls=ClientTls(mine.ca, mine.cert, mine.key), server_key_file=mine.server_key,
            policy=self.policy, worker_socket=self._socket(agent) if self.worker else None,
            worker_token=mine.worker_token if self.worker else None)
        home = self.files.node_home(agent)
        home.mkdir(parents=True, exist_ok=True)
        return ChildProcess(f"SuperNode of {agent}", [
            tool("flower-supernode"), "--root-certificates", str(mine.ca),
            "--superlink", self.superlink_address,
            "--auth-supernode-private-key", str(mine.node_key),
            "--port", str(free_port()), "--node-config", flower_node_config(settings)],
            self.files.logs / f"supernode-{agent}.log", {**self.env, "FLWR_HOME": str(home)})

    # -- run --------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> None:
        """Submit the run with ``flwr run`` and follow it to its end."""
        files = self.files
        app = write_app(files.root / "app", self.fed.to_json(), files.run_dir,
                        files.secrets.agent_keys)
        self.flwr_run = ChildProcess("flwr run", [
            tool("flwr"), "run", str(app), FEDERATION, "--stream"],
            files.logs / "flwr-run.log", self.env)
        with progress_bar(progress, self.console, "rounds") as bar:
            task = bar.add_task(f"deployed {self.fed.train.env} x {len(self.agents)} agents",
                                total=self.fed.rounds, status="starting")
            while self.flwr_run.alive:
                self._check_parties()
                row = self._last_row()
                if row:
                    bar.update(task, completed=row["round"], status=status(row))
                time.sleep(POLL_S)
        error = files.run_dir / ERROR_FILE
        if not error.exists():
            self._check_parties()  # `flwr run` also ends when the SuperLink dies: say so
        if error.exists():
            raise FederationError(error.read_text().strip())
        if not (files.run_dir / "summary.json").exists():
            raise DeploymentError(f"the run ended without a result:\n{self.flwr_run.tail()}")

    def _last_row(self) -> dict | None:
        path = self.files.run_dir / "metrics.jsonl"
        if not path.exists():
            return None
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None

    def _check_parties(self) -> None:
        for party in (self.sim, self.superlink):
            if party is not None and not party.alive:
                raise DeploymentError(f"the {party.name} stopped (exit code "
                                      f"{party.proc.returncode}); its log is {party.log}")
        for agent, worker in self.workers.items():
            if not worker.alive:  # its round fails; the next one continues from its state
                worker.stop()
                if not self.restart_agents:
                    raise DeploymentError(f"the {worker.name} stopped (exit code "
                                          f"{worker.proc.returncode}); its log is {worker.log}")
                self.console.print(f"[yellow]the {worker.name} stopped (exit code "
                                   f"{worker.proc.returncode}): restarting it[/]",
                                   highlight=False)
                self.workers[agent] = self._start_worker(agent)
        now = time.monotonic()
        for agent, node in self.nodes.items():
            if node.alive:
                if now - node.started > RESTART_WINDOW_S:
                    self.down_since.pop(agent, None)  # it is back
                continue
            node.stop()
            first = agent not in self.down_since
            since = self.down_since.setdefault(agent, now)
            if not self.restart_agents or now - since > RESTART_WINDOW_S:
                raise DeploymentError(f"{node.name} stopped (exit code "
                                      f"{node.proc.returncode}); its log is {node.log}")
            if first:
                self.console.print(f"[yellow]{node.name} stopped (exit code "
                                   f"{node.proc.returncode}): restarting it[/]", highlight=False)
            else:
                time.sleep(RESTART_PAUSE_S)  # the SuperLink still holds the dead one online
            self.nodes[agent] = self._start_node(agent)

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Agents first, then the SuperLink, then the simulator (Flower's order)."""
        if self.flwr_run is not None:
            self.flwr_run.stop(grace=2)
        for node in self.nodes.values():
            node.stop(grace=5)
        for worker in self.workers.values():
            worker.stop(grace=5)
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
        for party in (self.superlink, self.sim):
            if party is not None:
                party.stop(grace=5)
        # e.g. the ServerApp of a SuperLink that was killed
        stray = stop_tagged(f"{DEPLOYMENT_TAG}={self.files.run_dir}")
        if stray:
            self.console.print(f"[red]processes {stray} of the deployment could not be "
                               "stopped[/]")

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy_local(fed: FederationConfig, out: str | Path, progress: bool = True,
                 restart_agents: bool = True, console: Console | None = None,
                 worker: bool = True, plan: PrivacyPlan | None = None) -> RunResult:
    """Run (or, if ``out`` holds a checkpoint, continue) a federated run deployed on this host;
    a run that cannot fit its privacy budget (its ``plan``, made here if not given) is refused
    (``ValueError``) before anything starts."""
    if plan is None:  # the caller has not planned the run: refused here if it cannot fit
        plan_of(fed)
    run_dir = Path(out)
    check_ledgers_extend(run_dir, fed)
    run_dir.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    with terminate_as_interrupt(), LocalDeployment(fed, run_dir, console, restart_agents,
                                                   worker) as deployment:
        deployment.start()
        deployment.run(progress)
    return complete_run(run_dir, fed)
