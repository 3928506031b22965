"""The DP ceiling: a scripted team that communicates through a run's own mechanism, schedule
and budget, and what a run's summary says against it."""

from __future__ import annotations

import pytest

from fedcomm.baselines import (
    CEILING,
    EvalResult,
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
