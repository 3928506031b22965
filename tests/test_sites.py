"""Sites: N copies of a joint environment, each with its own agents, sharing only what the server
aggregates (``sim.sites``, the router, the release schedule, cross-play)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedcomm.config import FederationConfig, TeamConfig, env_spec
from fedcomm.learning.crossplay import cross_play, paired, sender_types
from fedcomm.models.team import Team
from fedcomm.presets import federation_preset
from fedcomm.releases.report import server_text
from fedcomm.releases.schedule import initial_routes, peers, sends_to_server, shared_parts
from fedcomm.sim.registry import check_env_options, make_env, one_site
from fedcomm.sim.router import delivery_mask, sites_of
from fedcomm.sim.sites import Sites, site_seed


def test_agents_are_numbered_type_by_type_then_site_by_site():
    spec = make_env("factory", 2, sites=3).spec
    one = make_env("factory", 2).spec
    assert spec.n_agents == 3 * one.n_agents and spec.sites == 3
    assert spec.agent_ids[:2] == ("s0.sensor_0", "s0.sensor_1")
    assert spec.agent_ids[2] == "s1.sensor_0"
    assert len(set(spec.agent_ids)) == spec.n_agents
    assert spec.site_of_agent[:6] == (0, 0, 1, 1, 2, 2)
    assert type(spec).from_dict(spec.to_dict()) == spec
    assert "sites" not in one.to_dict()  # a run of one site reads as before


def test_each_site_plays_its_own_episodes_and_its_agents_get_its_rewards():
    whole = make_env("speaker_listener", 16, sites=3)
    obs = whole.reset(7)
    for s in range(3):  # each site: the environment seeded by site_seed
        alone = make_env("speaker_listener", 16)
        own = alone.reset(site_seed(7, s))
        assert torch.equal(obs[0][:, s], own[0][:, 0])
        assert torch.equal(obs[1][:, s], own[1][:, 0])
    assert len({site_seed(7, s) for s in range(3)}) == 3
    step = whole.step(whole.oracle_actions())
    # speakers then listeners, site by site; both of a site get the site's reward
    assert torch.equal(step.reward[:, 0], step.reward[:, 3])
    assert not torch.equal(step.reward[:, 0], step.reward[:, 1])


def test_vectors_stay_within_their_site():
    spec = make_env("factory", 1, sites=2).spec
    types = torch.tensor(spec.type_of_agent)
    routes = torch.ones(len(spec.types), len(spec.types), dtype=torch.bool)
    mask = delivery_mask(types, routes, site_of_agent=sites_of(spec), sites=2)[0]
    site = torch.tensor(spec.site_of_agent)
    assert not mask[site[:, None] != site[None, :]].any()
    assert mask[(site[:, None] == site[None, :]) & ~torch.eye(spec.n_agents, dtype=torch.bool)
                ].all()


def test_bandwidth_holds_per_site():
    spec = make_env("platoon", 1, sites=2).spec
    types = torch.tensor(spec.type_of_agent)
    routes = torch.ones(len(spec.types), len(spec.types), dtype=torch.bool)
    messages = torch.randn(4, spec.n_agents, 3)
    mask = delivery_mask(types, routes, messages, 1, site_of_agent=sites_of(spec), sites=2)
    delivered_senders = mask.any(dim=1)  # [B, N]
    for s in range(2):
        of_site = torch.tensor(spec.site_of_agent) == s
        assert (delivered_senders[:, of_site].sum(dim=1) == 1).all()


def test_a_speaker_reaches_only_its_own_listener_and_shares_the_encoder_across_sites():
    fed = federation_preset("speaker_listener", private=True)
    fed.train.env_kwargs = {**fed.train.env_kwargs, "sites": 4}
    routes = initial_routes(fed.train)
    assert peers(fed.spec, routes, 0) == (1, 0)  # s0.speaker_0 reaches s0.listener_0 only
    assert shared_parts(fed.spec, "used", routes, 0) == ("encoder",)
    assert "decoder" in shared_parts(fed.spec, "used", routes, 4)
    assert shared_parts(fed.spec, "none", routes, 0) == ()
    assert server_text(fed) == ("server aggregates (fedavg) encoder among 4 speakers; the "
                                "private networks of 4 speakers (each type's among its own)")
    fed.share = "used"
    assert server_text(fed) == ("server aggregates (fedavg) encoder among 4 speakers; "
                                "gate_state, gate_message, decoder, graph among 4 listeners; the "
                                "private networks of all 8 agents (each type's among its own)")
    fed.share = "none"  # none leaves any agent, its private networks included
    assert server_text(fed) == "server aggregates nothing"
    one = federation_preset("speaker_listener", private=True)
    one.train.env_kwargs = {**one.train.env_kwargs, "sites": 1}
    assert server_text(one) == "server aggregates nothing"


def test_site_options_are_checked_and_each_site_gets_its_own():
    checked = check_env_options("speaker_listener",
                                {"sites": 2, "site_options": [{}, {"episode_length": 10}]})
    assert one_site(checked, 1) == {"episode_length": 10}
    with pytest.raises(ValueError, match="no option 'nope'"):
        check_env_options("speaker_listener", {"sites": 2, "site_options": [{"nope": 1}]})
    with pytest.raises(ValueError, match="options for 3 sites, but the run has 2"):
        check_env_options("speaker_listener", {"sites": 2, "site_options": [{}, {}, {}]})
    with pytest.raises(ValueError, match="sites=0"):
        check_env_options("speaker_listener", {"sites": 0})
    with pytest.raises(ValueError, match="same agents and horizon"):
        make_env("speaker_listener", 2, sites=2, site_options=[{}, {"episode_length": 10}])


def test_scripted_teams_of_sites_play_as_each_site_alone():
    whole = make_env("speaker_listener", 64, sites=2)
    whole.reset(3)
    alone = [make_env("speaker_listener", 64) for _ in range(2)]
    for s, env in enumerate(alone):
        env.reset(site_seed(3, s))
    total = torch.zeros(64, 4)
    singles = [torch.zeros(64, 2) for _ in alone]
    for _ in range(25):
        total += whole.step(whole.oracle_actions()).reward
        for s, env in enumerate(alone):
            singles[s] += env.step(env.oracle_actions()).reward
    assert torch.allclose(total[:, [0, 2]], singles[0])
    assert torch.allclose(total[:, [1, 3]], singles[1])
    assert set(whole.channel_symbols()) == {0, 1}


def test_cross_play_swaps_the_senders_and_the_encoder():
    spec = env_spec("speaker_listener")
    cfg = TeamConfig(routes="speaker>listener")
    a, b = Team(spec, cfg), Team(spec, cfg)
    assert sender_types(a) == [0]
    team = paired(a, b)
    assert torch.equal(team.agent_state(0)["features.0.0.weight"],
                       a.agent_state(0)["features.0.0.weight"])
    assert torch.equal(team.agent_state(1)["features.0.0.weight"],
                       b.agent_state(1)["features.0.0.weight"])
    assert torch.equal(team.shared_state(["encoder"])["encoder.0.weight"],
                       a.shared_state(["encoder"])["encoder.0.weight"])
    assert torch.equal(team.shared_state(["decoder"])["decoder.weight"],
                       b.shared_state(["decoder"])["decoder.weight"])
    result = cross_play([a, b], "speaker_listener", [{}, {}], episodes=50)
    assert len(result.gap_closed) == 2 and len(result.gap_closed[0]) == 2
    assert result.to_dict()["gap_closed"] == result.gap_closed


def test_cross_play_needs_agents_that_only_send():
    with pytest.raises(ValueError, match="every type that sends also receives"):
        sender_types(Team(env_spec("factory")))


def test_sites_flags_make_the_environment_options(tmp_path):
    from fedcomm.commands import build_parser
    from fedcomm.commands.options import federation_config_from_args

    args = build_parser().parse_args(
        ["simulate", "--sites", "3", "--site-opt", "1/episode_length=25"])
    fed: FederationConfig = federation_config_from_args(args)
    assert fed.train.env_kwargs["sites"] == 3
    assert fed.train.env_kwargs["site_options"] == [{}, {"episode_length": 25}, {}]
    assert fed.spec.n_agents == 6
    args = build_parser().parse_args(["simulate", "--sites", "2", "--site-opt",
                                      "0/goal_weights=0.8,0.1,0.1"])
    options = federation_config_from_args(args).train.env_kwargs["site_options"]
    assert options == [{"goal_weights": [0.8, 0.1, 0.1]}, {}]
    args = build_parser().parse_args(["simulate", "--sites", "3", "--site-dist", "dirichlet/0.5"])
    drawn = federation_config_from_args(args).train.env_kwargs["site_options"]
    assert len(drawn) == 3 and all(abs(sum(o["goal_weights"]) - 1) < 1e-5 for o in drawn)
    assert drawn != [drawn[0]] * 3  # each site its own, from the run's seed
    assert drawn == federation_config_from_args(args).train.env_kwargs["site_options"]
    env = make_env("speaker_listener", 2000, sites=2, site_options=options)
    env.reset(0)
    assert (env.envs[0].goal == 0).float().mean() > 0.75  # the first site's goals: skewed
    assert (env.envs[1].goal == 0).float().mean() < 0.4


@pytest.mark.integration
@pytest.mark.parametrize("flags, says", [
    (["--sites", "0"], "argument --sites: 0: expected an integer from 1 to 4096"),
    (["--sites", "2", "--site-opt", "2/say=false"], "argument --site-opt: site 2, but the run "
     "has 2"),
    (["--sites", "2", "--site-opt", "0/nope=1"], "argument --site-opt: speaker_listener has no "
     "option 'nope'"),
    (["--site-opt", "x/say=false"], "expected S/KEY=VALUE"),
    (["--sites", "2", "--site-dist", "dirichlet/0"], "argument --site-dist: 'dirichlet/0': "
     "expected dirichlet/ALPHA"),
    (["--env", "factory", "--sites", "2", "--site-dist", "dirichlet/1"], "argument "
     "--site-dist: factory has no option to draw per site"),
])
def test_bad_sites_flags_are_refused_in_one_line(flags, says, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedcomm", "simulate", *flags,
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_eval_cross_play_refuses_a_run_of_one_site(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"mode": "federated", "train": {
        "env": "speaker_listener", "env_kwargs": {}}}))
    out = subprocess.run([sys.executable, "-m", "fedcomm", "eval", str(tmp_path),
                          "--cross-play"], capture_output=True, text=True)
    assert out.returncode != 0 and "not a run of sites" in out.stderr
    assert "Traceback" not in out.stderr


def test_sites_is_a_vecenv_with_the_whole_spec():
    whole = make_env("factory", 4, sites=2)
    assert isinstance(whole, Sites)
    obs = whole.reset(1)
    assert [o.shape[1] for o in obs] == [t.count for t in whole.spec.types]
    whole.step(whole.random_actions())


def test_a_typed_module_encodes_by_type_and_serves_every_type():
    from fedcomm.models.comm import CommModule

    comm = CommModule(3, 8, 4, typed=True)
    feats = torch.randn(2, 3, 8).expand(2, 3, 8).clone()
    feats[:, 1] = feats[:, 0]
    feats[:, 2] = feats[:, 0]
    out = comm.encode(feats, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[:, 0], out[:, 1])  # the same features, another type
    with pytest.raises(ValueError, match="needs each agent's type"):
        comm.encode(feats)
    plain = CommModule(3, 8, 4)
    assert plain.encode(feats).shape == out.shape
    team = Team(env_spec("factory"), TeamConfig(typed_comm=True))
    obs = make_env("factory", 5).reset(0)
    assert team(obs, team.initial_hidden(5)).messages.shape[:2] == (5, team.n_local)


def test_role_share_sends_each_type_its_own_copy():
    from fedcomm.server.layout import ReplyLayout, initial_arrays

    fed = federation_preset("factory")
    fed.share = "role"
    fed.train.env_kwargs = {"sites": 2}
    arrays = initial_arrays(fed)
    assert {k.split(".")[0] for k in arrays} == {"role"}
    assert {k.split(".")[1] for k in arrays} == {t.name for t in fed.spec.types}
    layout = ReplyLayout.of(fed, arrays)
    for i, expected in enumerate(layout.agents):
        kind = fed.spec.types[fed.spec.type_of_agent[i]].name
        assert expected and all(k.startswith(f"role.{kind}.") for k in expected)
    assert server_text(fed).startswith("server aggregates (fedavg) each type's copy of the "
                                       "shared module among its agents: 4 sensors")


def test_the_default_runs_two_sites_whose_speakers_are_averaged_and_flags_change_it():
    from fedcomm.commands import build_parser
    from fedcomm.commands.options import federation_config_from_args

    def fed_of(*flags: str) -> FederationConfig:
        return federation_config_from_args(build_parser().parse_args(["simulate", *flags]))

    fed = fed_of()
    assert (fed.spec.sites, fed.share, fed.aggregate_private) == (2, "senders", True)
    assert server_text(fed_of("--no-aggregate-private")) == ("server aggregates (fedavg) "
                                                             "encoder among 2 speakers")
    assert server_text(fed_of("--share", "none")) == "server aggregates nothing"
    assert fed_of("--site-opt", "1/goal_weights=1,0,0").spec.sites == 2  # the default's sites
    assert fed_of("--sites", "1").spec.sites == 1
    assert fed_of("--non-private").spec.sites == 1


def test_senders_with_private_networks_average_the_speakers_whole_models_only():
    """``--share senders --aggregate-private``: each speaker sends its encoder and its private
    networks, a listener sends nothing (so it releases no network and trains without DP-SGD)."""
    from fedcomm.server.layout import ReplyLayout, initial_arrays

    fed = federation_preset("speaker_listener", private=True)
    fed.share, fed.aggregate_private = "senders", True
    fed.train.env_kwargs = {**fed.train.env_kwargs, "sites": 3}
    spec, routes = fed.spec, initial_routes(fed.train)
    arrays = initial_arrays(fed)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in arrays if k.startswith("type.")} \
        == {"type.speaker"}
    layout = ReplyLayout.of(fed, arrays)
    for i, expected in enumerate(layout.agents):
        speaker = spec.types[spec.type_of_agent[i]].name == "speaker"
        assert sends_to_server(spec, fed.share, True, routes, i) == speaker
        assert bool(expected) == speaker
        assert not speaker or any(k.startswith("type.speaker.") for k in expected)
    assert server_text(fed) == ("server aggregates (fedavg) encoder among 3 speakers; the "
                                "private networks of 3 speakers (each type's among its own)")
    fed.share = "used"
    assert server_text(fed).endswith("the private networks of all 6 agents "
                                     "(each type's among its own)")


@pytest.mark.integration
def test_the_private_default_averages_the_speakers_across_two_sites_within_budget(tmp_path):
    """``fedcomm simulate`` end to end, its default of two sites: the speakers' encoders and
    private networks are averaged (the checkpoint's module is the round's average, not the
    initial one) and every site's team plays that one speaker; each listener keeps its own
    networks and releases nothing; every agent's composed epsilon holds and ``fedcomm audit``
    verifies it; cross-play and ``fedcomm eval`` play each site's team."""
    import numpy as np

    from fedcomm.models.team import load_team
    from fedcomm.server.checkpoint import load_checkpoint
    from fedcomm.server.layout import initial_arrays
    from tests.harness.processes import simulate

    out = tmp_path / "run"
    proc = simulate("--num-envs", "8", "--batches-per-round", "2", "--env-steps",
                    str(2 * 8 * 25), "--eval-episodes", "16", "--quiet", "--out", str(out))
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aggregated"] == ("server aggregates (fedavg) encoder among 2 speakers; the "
                                     "private networks of 2 speakers (each type's among its "
                                     "own)")
    fed = FederationConfig.from_json((out / "config.json").read_text())
    assert fed.spec.sites == 2
    first, last = initial_arrays(fed), load_checkpoint(out).arrays
    assert not any(k.startswith("type.listener") for k in last)
    assert np.array_equal(np.asarray(first["comm.decoder.weight"]), last["comm.decoder.weight"])
    for key in ("comm.encoder.0.weight", "type.speaker.policy.0.weight"):
        assert key in last and not np.allclose(np.asarray(first[key]), last[key]), key
    teams = [load_team(out / "sites" / f"s{k}.pt") for k in range(2)]
    speakers = [t.agent_state(0) for t in teams]
    listeners = [t.agent_state(1) for t in teams]
    assert all(torch.equal(speakers[0][k], speakers[1][k]) for k in speakers[0])
    assert not all(torch.equal(listeners[0][k], listeners[1][k]) for k in listeners[0])
    report = json.loads((out / "privacy_report.json").read_text())
    assert set(report["agents"]) == set(fed.spec.agent_ids)
    for agent in report["agents"].values():
        assert agent["composed"]["epsilon"] <= 8.0 + 1e-6
    assert report["agents"]["s1.listener_0"]["composed"]["epsilon"] == 0  # nothing left it
    assert report["agents"]["s1.speaker_0"]["composed"]["epsilon"] > 0
    audit = subprocess.run([sys.executable, "-m", "fedcomm", "audit", str(out)],
                           capture_output=True, text=True)
    assert audit.returncode == 0 and "verified" in audit.stdout + audit.stderr, audit.stderr
    play = subprocess.run([sys.executable, "-m", "fedcomm", "eval", str(out), "--cross-play",
                           "--episodes", "20", "--json"], capture_output=True, text=True)
    assert play.returncode == 0, play.stderr
    matrix = json.loads(play.stdout.strip().splitlines()[-1])["gap_closed"]
    assert len(matrix) == 2 and matrix[0] == matrix[1]  # one speaker: every row the same
    played = subprocess.run([sys.executable, "-m", "fedcomm", "eval", str(out), "--episodes",
                             "20", "--json"], capture_output=True, text=True)
    assert played.returncode == 0, played.stderr  # no one team: each site's team plays
    result = json.loads(played.stdout.strip().splitlines()[-1])
    assert len(result["sites"]) == 2 and result["episodes"] == 40
    assert result["return_mean"] == pytest.approx(
        sum(r["return_mean"] for r in result["sites"]) / 2)


def test_the_report_says_what_the_server_averaged_among_whom():
    from fedcomm.privacy.page import _released

    run = {"released": {"num-examples": "known"},
           "aggregated": "server aggregates (fedavg) encoder among 8 speakers"}
    page = _released(run)
    assert "What the server did with the networks it was sent: server aggregates (fedavg) " \
           "encoder among 8 speakers." in page
    assert "What the server did" not in _released({"released": {}})


@pytest.mark.parametrize("actions, says", [
    ([torch.zeros(4, 2, dtype=torch.long)], "expected actions for 2 agent types, got 1"),
    ([torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long)],
     r"actions for 'speaker': expected shape \(4, 2\), got \(4, 3\)"),
    ([torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), 9)],
     r"actions for 'listener' must lie in \[0, 5\)"),
])
def test_bad_actions_of_sites_are_refused_by_name(actions, says):
    whole = make_env("speaker_listener", 4, sites=2)
    whole.reset(0)
    with pytest.raises(ValueError, match=says):
        whole.step(actions)
