"""Agents as virtual clients: each site stepped on its own by the simulator, a site's agents
in their site's frame, and the server's waves of whole sites that fit a pool of ClientApps."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedcomm.clients.app import make_client_app
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.models.team import Team
from fedcomm.modes.simulation import actor_pool, engine_threads
from fedcomm.protocol.round import PROOF, identity_query, identity_reply
from fedcomm.protocol.signing import seal
from fedcomm.releases.plan import plan_of
from fedcomm.releases.schedule import initial_routes, peers
from fedcomm.server.federation import FederationError
from fedcomm.server.waves import Wave, agents_time, identities, split, waves
from fedcomm.sim.registry import make_env
from tests.harness.grids import FederatedRun, private_default
from tests.harness.secrets import AgentSecrets

SPEC = make_env("speaker_listener", 4, sites=5).spec  # 10 agents, type by type


@pytest.fixture(autouse=True, scope="module")
def server_identity():
    """Messages are made by a server task: the test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def nodes_of(spec) -> dict[int, str]:
    """Nodes 100, 101, ... in agent order (speakers first, as Flower's partitions are)."""
    return {100 + i: a for i, a in enumerate(spec.agent_ids)}


def test_a_site_is_an_environment_of_its_own_under_the_agents_run_wide_ids():
    site = SPEC.site(3)
    assert site.agent_ids == ("s3.speaker_0", "s3.listener_0")
    assert (site.n_agents, site.sites) == (2, 1)
    assert [SPEC.agent_ids[i] for i in SPEC.site_members(3)] == list(site.agent_ids)
    assert make_env("speaker_listener", 4).spec.site(0) == make_env("speaker_listener", 4).spec
    with pytest.raises(ValueError, match="no site 5"):
        SPEC.site(5)


def test_an_agent_computes_in_its_own_site_with_the_networks_of_its_slot():
    """An agent's team of the run's initial team, moved to its site: the same weights, its
    index within its site, and what it hears grows with the site (2 agents), not the run."""
    cfg = private_default().train.team
    spec = make_env("speaker_listener", 4, sites=64).spec
    whole = Team.initial(spec, cfg, 7)
    agent = spec.agent_ids.index("s40.listener_0")
    mine = Team.initial(spec, cfg, 7, [agent]).in_own_site()
    assert (mine.spec.n_agents, mine.agents) == (2, (1,))
    expected = whole.subteam([agent]).state_dict()
    assert list(mine.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in mine.state_dict().items())


def test_a_run_of_many_sites_is_planned_as_one_of_its_sites():
    """Every site's agents release alike: the calibrated noise, the plan and the agents'
    policy of 64 sites are those of one site (each kind of agent worked out once, so that a
    run's start-up does not grow with its sites), and a speaker reaches only its listener."""
    one, many = private_default("--sites", "1"), private_default("--sites", "64")
    assert many.train.team == one.train.team
    assert many.train.privacy.update_noise_multiplier == one.train.privacy.update_noise_multiplier
    assert plan_of(many) == plan_of(one)
    assert PrivacyPolicy.of_run(many) == PrivacyPolicy.of_run(one)
    speaker = many.spec.agent_ids.index("s40.speaker_0")
    assert peers(many.spec, initial_routes(many.train), speaker) == (1, 0)


def test_waves_hold_whole_sites_that_fit_the_pool():
    schedule = waves(SPEC, nodes_of(SPEC), capacity=4)
    assert [w.sites for w in schedule] == [(0, 1), (2, 3), (4,)]
    by_node = nodes_of(SPEC)
    for wave in schedule:  # each wave: exactly its sites' speakers and listeners
        agents = sorted(by_node[n] for n in wave.nodes)
        assert agents == sorted(f"s{s}.{t}_0" for s in wave.sites for t in ("speaker",
                                                                           "listener"))
    assert [w.sites for w in waves(SPEC, nodes_of(SPEC), capacity=5)] == [(0, 1), (2, 3), (4,)]
    with pytest.raises(ValueError, match="a site's 2 agents step together"):
        waves(SPEC, nodes_of(SPEC), capacity=1)
    messages = [identity_query("{}", n) for n in nodes_of(SPEC)]
    sent = [[m.metadata.dst_node_id for m in batch] for batch in split(messages, schedule)]
    assert [sorted(b) for b in sent] == [sorted(w.nodes) for w in schedule]


def test_the_pool_is_whole_sites_of_what_the_engine_runs_at_once():
    assert actor_pool(SPEC, 5) == 4 and actor_pool(SPEC, 100) == 10
    assert actor_pool(SPEC) == min(engine_threads() // 2 * 2, 10)
    factory = make_env("factory", 4, sites=3).spec  # 7 agents a site
    assert actor_pool(factory) == max(7, engine_threads() // 7 * 7)
    with pytest.raises(ValueError, match="--actors 6: a site's 7 agents step together"):
        actor_pool(factory, 6)


def test_a_node_says_which_agent_it_runs_under_its_key_and_nothing_else_counts(tmp_path):
    """The ClientApp answers the server's query with its agent's id, signed; a reply naming
    another agent, or signed with another key, is refused."""
    fed = private_default("--sites", "3")
    secrets = AgentSecrets.write(tmp_path, fed.spec.agent_ids)
    settings = secrets.node_settings("127.0.0.1:1", PrivacyPolicy.of_run(fed),
                                     tmp_path / "agents")
    app = make_client_app(settings)
    query = identity_query(fed.to_json(), 7)
    query.metadata.__dict__["_message_id"] = "q7"
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 4}, state=RecordDict(),
                      run_config={})
    reply = app(query, context)
    reply.metadata.__dict__["_src_node_id"] = 7
    assert reply.content[PROOF]["agent_id"] == fed.spec.agent_ids[4] == "s1.listener_0"
    assert identities([query], [reply], secrets.keys) == {7: "s1.listener_0"}

    forged = Message(seal(identity_reply("s2.listener_0"), "q7",
                          {**settings, "agent-id": "s2.listener_0"}), reply_to=query)
    forged.metadata.__dict__["_src_node_id"] = 7
    other_keys = {**secrets.keys, "s2.listener_0": "another key"}
    with pytest.raises(ValueError, match="node 7 does not answer as an agent of the run"):
        identities([query], [forged], other_keys)
    unsigned = Message(RecordDict({PROOF: ConfigRecord({"agent_id": "s0.speaker_0"})}),
                       reply_to=query)
    unsigned.metadata.__dict__["_src_node_id"] = 7
    with pytest.raises(ValueError, match="node 7"):
        identities([query], [unsigned], secrets.keys)


def test_the_agents_time_of_a_round_in_waves_adds_each_waves_slowest_agent():
    """Agents of a wave run side by side, waves one after another: what of a round's time is
    the agents' (and so what is Flower's) sums each wave's slowest agent."""
    schedule = [Wave((0, 1), ()), Wave((2,), ())]
    timings = [(0, {"client_s": 3.0, "start_s": 0.5}), (1, {"client_s": 4.0}),
               (2, {"client_s": 2.0, "start_s": 1.0})]
    phases = agents_time(timings, schedule)
    assert phases["client_s"] == 6.0 and phases["start_s"] == 1.5
    assert agents_time(timings, [])["client_s"] == 4.0  # one wave: the slowest agent's


@pytest.mark.integration
def test_three_sites_train_in_waves_on_a_pool_of_two_clientapps(tmp_path: Path):
    """Three speaker/listener sites, six agents, on a pool of two ClientApps (as Flower's
    engine runs a pool of actors): the server sends one site at a time and every round
    completes, each site's agents having trained; sent all at once, the pool runs both
    speakers first, whose site's listener never comes, and the join barrier fails the round."""
    fed = private_default("--sites", "3")
    run = FederatedRun(fed, tmp_path / "waves", pool=2, join_timeout=5.0)
    try:
        result = run.federation().run_rounds()
    finally:
        run.close()
    rows = [json.loads(line) for line in (tmp_path / "waves" / "metrics.jsonl").open()]
    assert [r["waves"] for r in rows] == [3] * fed.rounds
    assert all(r["agents"] == 6 and r["failures"] == 0 for r in rows)
    assert all(r["slowest_site"] in ("s0", "s1", "s2") for r in rows)
    assert result.summary.rounds == fed.rounds
    # every agent trained every batch: its ledger holds its releases of each
    for agent in fed.spec.agent_ids:
        assert (tmp_path / "waves" / "agents" / agent / "ledger.jsonl").exists(), agent
    queried = [m for m in run.grid.sent if m.metadata.message_type == "query"]
    assert len(queried) == 6  # asked once, at the start

    control = FederatedRun(fed, tmp_path / "at-once", pool=2, join_timeout=5.0)
    try:
        with pytest.raises(FederationError, match="join barrier timed out"):
            control.federation(waves=False).run_rounds()
    finally:
        control.close()


@pytest.mark.integration
def test_a_simulation_attaches_to_a_ray_cluster_started_by_hand(tmp_path: Path):
    """As docs/deployment.md writes it: ``ray start --head --num-cpus 4``, then ``fedcomm
    simulate --ray-address ...``: three sites' six agents run on the cluster's four actors, in
    waves of two sites and one; ``ray stop`` ends the cluster."""
    from tests.harness.processes import simulate

    ray = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([ray, "start", "--head", "--num-cpus", "4", "--port", str(port),
                    "--include-dashboard=false", "--disable-usage-stats"], check=True,
                   capture_output=True, timeout=180)
    try:
        out = tmp_path / "run"
        proc = simulate("--sites", "3", "--ray-address", f"127.0.0.1:{port}", "--num-envs",
                        "8", "--batches-per-round", "2", "--env-steps", str(2 * 8 * 25),
                        "--eval-episodes", "16", "--quiet", "--out", str(out))
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, text
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        assert rows and all(r["waves"] == 2 and r["agents"] == 6 for r in rows)
        assert rows[-1]["wave_sites"] == [[0, 1], [2]]
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=180)

