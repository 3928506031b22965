"""One-run canary audit: honest mechanisms pass, an under-noised one is caught."""

import time

import pytest

from fedcomm.privacy.canary import empirical_audit, empirical_response_audit, epsilon_lower_bound

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("config", [
    {"noise_multiplier": 1.0, "relation": "add_remove"},
    {"noise_multiplier": 1.0, "relation": "replace_one"},
    {"noise_multiplier": 2.0, "relation": "replace_one", "releases_per_unit": 4},
])
def test_honest_mechanism_stays_below_its_claim(config):
    start = time.perf_counter()
    for seed in SEEDS:
        result = empirical_audit(**config, seed=seed)
        assert result.canaries == 100_000 and result.guesses == 2000
        assert 0 < result.epsilon_lower_bound <= result.claimed_epsilon
        assert result.consistent
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(("config", "true_sigma"), [
    ({"noise_multiplier": 4.0, "relation": "add_remove"}, 1.0),
    ({"noise_multiplier": 5.0, "relation": "replace_one"}, 1.0),
    ({"noise_multiplier": 8.0, "relation": "replace_one", "releases_per_unit": 4}, 1.0),
])
def test_under_noised_mechanism_is_caught(config, true_sigma):
    for seed in SEEDS:
        result = empirical_audit(**config, seed=seed, true_noise_multiplier=true_sigma)
        assert result.epsilon_lower_bound > result.claimed_epsilon
        assert not result.consistent


def test_lower_bound_grows_with_correct_guesses():
    bounds = [epsilon_lower_bound(10_000, 200, v, 1e-5) for v in (100, 150, 190, 200)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > 2


@pytest.mark.parametrize(("epsilon", "symbols", "per_unit"), [(1.0, 3, 1), (4.0, 3, 1),
                                                              (1.0, 4, 4)])
def test_honest_randomized_response_stays_below_its_claim(epsilon, symbols, per_unit):
    for seed in range(3):
        found = empirical_response_audit(epsilon, symbols, releases_per_unit=per_unit,
                                         canaries=40_000, seed=seed)
        assert found.consistent, found
    assert found.epsilon_lower_bound > 0.3 * found.claimed_epsilon  # the audit has power


def test_under_randomised_response_is_caught():
    """A mechanism that claims epsilon 1 but keeps the codeword as often as epsilon 4."""
    found = empirical_response_audit(1.0, 3, canaries=40_000, seed=0, true_epsilon=4.0)
    assert not found.consistent and found.epsilon_lower_bound > 2.0
