"""The DP ceiling: a scripted team that communicates through a run's own mechanism, schedule
and budget, and what a run's summary says against it."""

from __future__ import annotations

import pytest

from fedcomm.baselines import (
    BASELINE_EPISODES,
    CEILING,
    EvalResult,
    baseline_episodes,
    baseline_summary,
    evaluate_baselines,
    evaluate_ceiling,
    evaluate_scripted,
)
from fedcomm.config import TeamConfig

EPISODES = 2000


def gap(result: EvalResult, env: str = "speaker_listener") -> float:
    low = evaluate_scripted(env, "no_comm", EPISODES).return_mean
    high = evaluate_scripted(env, "oracle", EPISODES).return_mean
    return (result.return_mean - low) / (high - low)


def once(epsilon: float) -> TeamConfig:
    """The goal once per episode by 4-ary randomized response, kept by the receiver."""
    return TeamConfig(channel="discrete", symbols=4, rr_epsilon=epsilon, release_every=25,
                      accumulate=True)


def test_the_ceiling_rises_with_epsilon_from_no_comm_to_the_oracle():
    shares = [gap(evaluate_ceiling("speaker_listener", once(e), EPISODES)) for e in (0.05, 2, 8)]
    assert abs(shares[0]) < 0.1  # randomized response at epsilon 0.05 says almost nothing
    assert 0.2 < shares[1] < 0.8
    assert shares[2] > 0.97  # the true goal with probability 0.9993: an oracle's return
    assert shares[0] < shares[1] < shares[2]


def test_a_receiver_without_memory_hears_only_the_latest_release():
    noisy = TeamConfig(noise_multiplier=2.0)  # Gaussian, a release every step
    pooled = evaluate_ceiling("speaker_listener", TeamConfig(noise_multiplier=2.0,
                                                             accumulate=True), EPISODES)
    latest = evaluate_ceiling("speaker_listener", noisy, EPISODES)
    assert gap(pooled) > gap(latest) + 0.2


def test_no_ceiling_where_no_codebook_or_no_communication():
    assert evaluate_ceiling("factory", TeamConfig(comm_dim=2), 10) is None  # values > dims
    assert CEILING not in evaluate_baselines("speaker_listener", 10,
                                             team=TeamConfig(communicate=False))


def test_a_summary_states_the_gap_against_the_ceiling():
    baselines = evaluate_baselines("speaker_listener", EPISODES, team=once(2.0))
    assert list(baselines) == ["random", "no_comm", "oracle", CEILING]
    low, top = baselines["no_comm"].return_mean, baselines[CEILING].return_mean
    halfway = EvalResult((low + top) / 2, 0.1, EPISODES)
    summary = baseline_summary(halfway, baselines)
    assert summary["of_ceiling"] == pytest.approx(0.5)
    assert summary["ceiling_gap_closed"] == pytest.approx(gap(baselines[CEILING]), rel=0.02)
    assert summary["gap_closed"] == pytest.approx(0.5 * summary["ceiling_gap_closed"])


def test_no_share_of_a_ceiling_within_noise_of_no_comm():
    baselines = evaluate_baselines("speaker_listener", EPISODES, team=once(0.01))
    summary = baseline_summary(baselines["oracle"], baselines)
    assert summary["of_ceiling"] is None and summary["gap_closed"] == pytest.approx(1.0)


def test_the_ceiling_releases_through_the_teams_own_codewords():
    """K-ary randomized response over the team's K codewords: a fourth codeword the goal
    never needs takes a share of the noise, so the same epsilon carries less."""
    three = TeamConfig(channel="discrete", symbols=3, rr_epsilon=2.0, release_every=25,
                       accumulate=True)
    assert gap(evaluate_ceiling("speaker_listener", three, EPISODES)) > gap(
        evaluate_ceiling("speaker_listener", once(2.0), EPISODES)) + 0.02


def test_the_ceilings_listener_hedges_between_landmarks():
    """Its best response to an uncertain posterior is the posterior mean position, which
    beats steering to the most likely landmark on the same episodes and releases."""
    from fedcomm.baselines import run_ceiling
    from fedcomm.sim.base import one_hot
    from fedcomm.sim.speaker_listener import SpeakerListener

    class MostLikely(SpeakerListener):
        def channel_actions(self, posteriors, obs):
            likely = one_hot(posteriors[0].argmax(dim=1), 3).float()
            return super().channel_actions({0: likely}, obs)

    team = TeamConfig(channel="discrete", symbols=3, rr_epsilon=1.0, release_every=25,
                      accumulate=True)
    hedged = run_ceiling(SpeakerListener(EPISODES, say=False), team, 7).mean()
    decided = run_ceiling(MostLikely(EPISODES, say=False), team, 7).mean()
    assert hedged > decided + 0.5


def test_scripted_teams_that_define_a_gap_play_many_episodes():
    assert baseline_episodes("speaker_listener", 64) == BASELINE_EPISODES
    assert baseline_episodes("speaker_listener", 20_000) == 20_000
    assert baseline_episodes("mpe2:simple_reference_v3", 16) == 16  # a random team alone
