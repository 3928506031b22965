"""Each agent's Flower ClientApp against a real simulator on loopback, called the way a
SuperNode calls it: what leaves an agent, and what its evaluation measures.

The simulator runs in process with a service that records every request it receives; the three
agents (a sensor, a processor, an actuator) run their ClientApps in threads, as their SuperNodes
would run them at once.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedcomm.baselines import EVAL_SEED
from fedcomm.clients.agent import global_arrays
from fedcomm.clients.app import make_client_app
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.clients.state import StateStore
from fedcomm.config import FederationConfig, PPOConfig, TeamConfig, TrainConfig
from fedcomm.learning.dpsgd import dp_steps
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team
from fedcomm.privacy.audit import audit
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.privacy.ledger import read_ledger
from fedcomm.protocol.codec import decode
from fedcomm.protocol.round import EvaluateInstruction, TrainInstruction
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.releases.account import LEDGER, AgentPrivacy
from fedcomm.releases.report import write_run_report
from fedcomm.releases.schedule import update_releases
from fedcomm.sim.episodes import episode_seed
from fedcomm.sim.registry import make_env
from fedcomm.sim.serve import SimServer
from fedcomm.sim.service import JointEnvironmentService, SimConfig
from tests.harness.replies import pushed
from tests.harness.secrets import AgentSecrets

pytestmark = pytest.mark.integration  # every test starts a simulator on loopback

B = 16
FACTORY = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1}
FED = FederationConfig(
    train=TrainConfig(env="factory", env_kwargs=FACTORY, num_envs=B, env_steps=4 * B * 25,
                      eval_episodes=B, team=TeamConfig(hidden=16, comm_dim=4,
                                                       noise_multiplier=0.3,
                                                       feedback_noise_multiplier=0.2,
                                                       feedback_clip=0.1),
                      ppo=PPOConfig(epochs=1, minibatches=2)),
    batches_per_round=2)


class RecordingService(JointEnvironmentService):
    """The simulator's service, keeping every request an agent sends it."""

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.requests: list[object] = []
        self.lock = threading.Lock()

    def record(self, request: object) -> None:
        with self.lock:
            self.requests.append(request)

    async def Describe(self, request, context):
        self.record(request)
        return await super().Describe(request, context)

    async def Join(self, request, context):
        self.record(request)
        return await super().Join(request, context)

    async def Feedback(self, request, context):
        self.record(request)
        return await super().Feedback(request, context)

    async def Step(self, request_iterator, context):
        async def recorded():
            async for frame in request_iterator:
                self.record(frame)
                yield frame

        return await super().Step(recorded(), context)


class Nodes:
    """Three SuperNodes' worth of contexts and one ClientApp, against ``service``."""

    def __init__(self, tmp: Path, fed: FederationConfig, service: RecordingService,
                 port: int, policy: PrivacyPolicy | None = None) -> None:
        self.fed, self.service = fed, service
        self.state_root = tmp / "agents"
        self.spec = fed.spec
        self.secrets = AgentSecrets.write(tmp, self.spec.agent_ids, tokens=service.cfg.tokens)
        self.keys = self.secrets.keys
        self.sim_address, self.policy = f"127.0.0.1:{port}", policy or PrivacyPolicy.of_run(fed)
        self.app_settings = self.secrets.node_settings(self.sim_address, self.policy,
                                                       self.state_root)
        self.app = make_client_app(self.app_settings)
        self.contexts = [Context(run_id=1, node_id=i + 1,
                                 node_config={"partition-id": i, "num-partitions": 3},
                                 state=RecordDict(), run_config={})
                         for i in range(self.spec.n_agents)]

    def send(self, kind: str, arrays: dict[str, torch.Tensor], server_round: int,
             batches: int = 0, seed: int = 0, app=None, contexts=None) -> list[Message]:
        """Every node's reply to ``kind`` (by ``app`` in ``contexts``, default the
        ClientApp in the nodes' own)."""
        contexts = contexts or self.contexts
        config = self.fed.to_json()
        record = (TrainInstruction(config, server_round) if kind == MessageType.TRAIN
                  else EvaluateInstruction(config, server_round, batches, seed)).to_record()
        messages = pushed([Message(RecordDict({"arrays": ArrayRecord(arrays), "config": record}),
                                   dst_node_id=c.node_id, message_type=kind) for c in contexts])
        with ThreadPoolExecutor(len(messages)) as pool:
            return list(pool.map(app or self.app, messages, contexts))


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are made by a server task: this test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


@pytest.fixture
def nodes(tmp_path: Path):
    def start(fed: FederationConfig = FED, join_timeout: float = 20.0,
              policy: PrivacyPolicy | None = None) -> Nodes:
        spec = fed.spec
        cfg = SimConfig(env="factory", env_kwargs=FACTORY, num_envs=B, run_id="clientapp-test",
                        tokens={a: f"token-{a}" for a in spec.agent_ids},
                        join_timeout=join_timeout, step_timeout=20, feedback_timeout=20,
                        episode_key=b"the same episodes in every test run")
        service = RecordingService(cfg)
        server = SimServer(cfg, service=service)
        servers.append(server)
        return Nodes(tmp_path, fed, service, server.port, policy)

    servers: list[SimServer] = []
    yield start
    for server in servers:
        server.stop()


def test_only_the_shared_module_metrics_vectors_feedback_and_actions_leave_an_agent(nodes):
    n = nodes()
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    replies = n.send(MessageType.TRAIN, global_arrays(team), server_round=1)

    comm_keys = {f"comm.{k}" for k in team.comm.state_dict()}
    for i, reply in enumerate(replies):
        assert not reply.has_error(), reply.error
        assert set(reply.content.array_records) == {"arrays"}
        sent = reply.content["arrays"].to_torch_state_dict()
        assert set(sent) == comm_keys  # the shared module and nothing else
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == 2 * B * 25 and metrics["agent"] == i
        assert all(isinstance(v, int | float) for v in metrics.values())
        # The agent's private networks, as it keeps them, appear nowhere in what it sent.
        saved = StateStore(n.state_root / n.spec.agent_ids[i], {}).load(1)
        assert saved is not None and saved.round == 1
        for value in saved.state["team"].values():
            assert not any(v.shape == value.shape and torch.equal(v, value)
                           for v in sent.values())

    kinds = {type(r).__name__ if not isinstance(r, pb.AgentFrame) else r.WhichOneof("body")
             for r in n.service.requests}
    assert kinds == {"DescribeRequest", "JoinRequest", "vector", "action", "FeedbackRequest"}
    d, k = FED.train.team.comm_dim, len(n.spec.types)
    for r in n.service.requests:
        if isinstance(r, pb.JoinRequest):
            assert tuple(r.routes.shape) == (k, k) and r.HasField("seed")
        elif isinstance(r, pb.FeedbackRequest):
            assert tuple(r.grads.shape) == (len(r.senders), 25, B, d)
        elif isinstance(r, pb.AgentFrame) and r.WhichOneof("body") == "vector":
            assert tuple(r.vector.vector.shape) in {(B, d), ()}
        elif isinstance(r, pb.AgentFrame):
            assert tuple(decode(r.action.action, "action", pb.INT64, (B,)).shape) == (B,)
    # Every batch of the round was joined with the trainer's seed for that batch.
    seeds = sorted({r.seed for r in n.service.requests if isinstance(r, pb.JoinRequest)})
    assert seeds == [FED.train.seed * 1_000_000 + it for it in (1, 2)]


def test_a_federated_evaluation_measures_what_the_team_would_in_process(nodes):
    # Without channel noise, greedy episodes are deterministic: the agents playing through the
    # simulator, each with only its own part of the team, must score what the whole team scores
    # in one process on the same seeds.
    fed = replace(FED, train=replace(FED.train, team=replace(FED.train.team,
                                                             noise_multiplier=0.0)))
    n = nodes(fed)
    team = Team.initial(n.spec, fed.train.team, fed.train.seed)
    replies = n.send(MessageType.EVALUATE, global_arrays(team),
                     server_round=0, batches=2, seed=EVAL_SEED)
    returns = torch.tensor([list(r.content["metrics"]["returns"]) for r in replies])
    assert returns.shape == (3, 2 * B)

    # the simulator played the episodes its key derives from the labels, which it alone knows
    cfg = n.service.cfg
    env = make_env("factory", B, **FACTORY)
    expected = torch.cat([collect(team, LocalTransport(env), seed=episode_seed(
        cfg.episode_key, cfg.run_id, EVAL_SEED + i * B, 0), greedy=True).rewards.sum(dim=0)
        for i in range(2)]).T
    torch.testing.assert_close(returns, expected, rtol=0, atol=1e-5)
    assert returns.std() > 0  # the episodes differ: a real measurement, not a constant


def test_a_restarted_node_resumes_from_its_own_durable_state(nodes):
    n = nodes()
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    first = n.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    assert all(r.content["metrics"]["restored_round"] == 0 for r in first)
    for context in n.contexts:  # every SuperNode restarts: its context state is gone
        context.state = RecordDict()
    second = n.send(MessageType.TRAIN, global_arrays(team), server_round=2)
    assert all(not r.has_error() for r in second)
    assert all(r.content["metrics"]["restored_round"] == 1 for r in second)
    # A round the server never committed is not restored: round 2 again starts from round 1.
    again = n.send(MessageType.TRAIN, global_arrays(team), server_round=2)
    assert all(r.content["metrics"]["restored_round"] == 1 for r in again)


def test_a_failing_agent_answers_with_one_line_instead_of_a_traceback(nodes, tmp_path):
    n = nodes(join_timeout=2.0)
    n.contexts[1].node_config = {**n.contexts[1].node_config, "token-file": str(tmp_path / "no")}
    team = Team.initial(n.spec, FED.train.team, FED.train.seed)
    replies = n.send(MessageType.TRAIN, global_arrays(team), server_round=1)
    assert replies[1].has_error()
    assert replies[1].error.reason.startswith("processor_0: ")
    assert "cannot read the token file" in replies[1].error.reason
    assert "Traceback" not in replies[1].error.reason
    # The others waited at the simulator's join barrier, which timed out with the reason.
    for reply in (replies[0], replies[2]):
        assert reply.has_error() and "processor_0" in reply.error.reason
        # A TransportError is one line too, saying which call the simulator refused and why.
        assert "the simulator refused the Join (DEADLINE_EXCEEDED" in reply.error.reason
        assert "join barrier timed out" in reply.error.reason
        assert "\n" not in reply.error.reason and "Traceback" not in reply.error.reason
    # Nothing of the batch left the agents that waited, so nothing is charged for it: the
    # ledger is written once the simulator admits the batch.
    for agent in ("sensor_0", "actuator_0"):
        ledger = n.state_root / agent / LEDGER
        assert not ledger.exists() or not read_ledger(ledger), agent


def test_an_agent_out_of_budget_goes_silent_at_the_boundary_and_never_past_it(nodes, tmp_path):
    # A budget over each agent's whole history that one batch fits into and two do not; the
    # update is trained with DP-SGD, so that everything released has a finite epsilon.
    private = PrivacyConfig(unit="history", update_noise_multiplier=1.0)
    probe = AgentPrivacy("sensor_0", 0, FED.spec, FED.train.team, private,
                         tmp_path / "probe.jsonl", {}, episodes=B)
    one_batch = probe.account.budget.epsilon_of(probe.batch_releases(
        torch.ones(3, 3) > 0, update_releases(private, FED.train.ppo)))
    budget = 1.5 * one_batch
    private = replace(private, epsilon_budget=budget)
    fed = replace(FED, train=replace(FED.train, privacy=private))
    n = nodes(fed, policy=PrivacyPolicy(math.inf))  # the run's budget alone decides
    team = Team.initial(n.spec, fed.train.team, fed.train.seed)
    replies = n.send(MessageType.TRAIN, global_arrays(team), server_round=1)

    ledgers = {}
    for agent, reply in zip(n.spec.agent_ids, replies, strict=True):
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        assert metrics["batches"] == 2 and metrics["silent_batches"] == 1
        assert metrics["epsilon"] <= budget
        assert metrics["num-examples"] == B * 25  # it trained on the batch it could pay for
        ledgers[agent] = n.state_root / agent / LEDGER
        entries = read_ledger(ledgers[agent])
        assert {e["batch"] for e in entries} == {1}
        update = [e for e in entries if e["mechanism"] == "update"]
        # over the whole history every DP-SGD step sums the clipped gradients of all of the
        # agent's episodes it sampled: no amplification, B times the clip (replace-one: 2 C B)
        assert len(update) == 1 and update[0]["sample_rate"] == 1.0
        assert update[0]["sensitivity"] == 2 * update[0]["clip"] * B
        assert update[0]["count"] == dp_steps(FED.train.ppo, 0.5)  # 1 / minibatches
    joins = [r for r in n.service.requests if isinstance(r, pb.JoinRequest)]
    assert sorted(r.silent for r in joins) == [False] * 3 + [True] * 3
    spoken = [r for r in n.service.requests if isinstance(r, pb.AgentFrame)
              and r.WhichOneof("body") == "vector" and r.vector.HasField("vector")]
    assert len(spoken) == 3 * 25  # every vector of the first batch, none of the second
    feedback = [r for r in n.service.requests if isinstance(r, pb.FeedbackRequest)]
    assert sorted(len(r.senders) > 0 for r in feedback) == [False] * 3 + [True] * 3

    report = write_run_report(tmp_path, fed.to_dict(), fed.train.team, private, ledgers,
                              ppo=fed.train.ppo)
    assert report["verdict"]["within_budget"] and audit(tmp_path).ok
    for section in report["agents"].values():
        assert float(section["composed"]["epsilon"]) <= budget
