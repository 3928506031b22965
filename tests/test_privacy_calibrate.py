"""Calibration round trip: the returned noise meets the target, 1% less does not."""

from dataclasses import replace

import pytest

from fedcomm.privacy.accountants import make_accountant
from fedcomm.privacy.calibrate import Mechanism, noise_for_epsilon, split_budget
from fedcomm.privacy.events import (
    RELATION_FACTOR,
    GaussianRelease,
    RandomizedResponse,
    gaussian_release,
)

SETTINGS = [
    # (target, delta, sample_rate, count, relation, accountant)
    (1.0, 1e-5, 1.0, 40, "replace_one", "exact"),
    (8.0, 1e-5, 1.0, 1, "replace_one", "rdp"),
    (3.0, 1e-5, 0.01, 1000, "add_remove", "rdp"),
    (2.0, 1e-6, 1.0, 10, "add_remove", "pld"),
    (4.0, 1e-5, 0.05, 200, "replace_one", "pld"),
]


@pytest.mark.parametrize(("target", "delta", "q", "count", "relation", "name"), SETTINGS)
def test_round_trip(target, delta, q, count, relation, name):
    sigma = noise_for_epsilon(target, delta, sample_rate=q, count=count, relation=relation,
                              accountant=name)
    accountant = make_accountant(name)

    def epsilon(s):
        release = GaussianRelease("m", s, 1.0, RELATION_FACTOR[relation], q, count, relation)
        return accountant.epsilon([release], delta)

    assert epsilon(sigma) <= target
    assert epsilon(0.99 * sigma) > target
    assert sigma == round(sigma, 6)


def test_sensitivity_factor_scales_the_noise():
    base = noise_for_epsilon(2.0, 1e-5, count=5, accountant="exact", relation="add_remove")
    doubled = noise_for_epsilon(2.0, 1e-5, count=5, accountant="exact", sensitivity_factor=2.0,
                                relation="add_remove")
    replace_one = noise_for_epsilon(2.0, 1e-5, count=5, accountant="exact")
    assert doubled == pytest.approx(2 * base, rel=1e-4)
    assert replace_one == doubled


def test_invalid_target():
    with pytest.raises(ValueError, match="target epsilon must be positive"):
        noise_for_epsilon(0.0, 1e-5)
    assert noise_for_epsilon(float("inf"), 1e-5) == 0.0


def test_a_fixed_update_share_leaves_the_rest_to_randomized_response():
    """The update's fixed epsilon, a discrete channel's on the rest of one budget."""
    rr = Mechanism("message", lambda s: [RandomizedResponse("message", 1 / s, 4)], 0.5, None)
    update = Mechanism("update", lambda s: [gaussian_release("update", s, 1.0, count=8)],
                       0.25, 0.8)
    split = split_budget(4.0, 1e-5, [rr, update])
    assert split.epsilon["update"] == pytest.approx(0.8, rel=1e-3)
    assert 3.95 < split.composed <= 4.0 and 3.0 < split.epsilon["message"] < 3.3
    with pytest.raises(ValueError, match="fixed epsilons"):
        split_budget(3.0, 1e-5, [rr, replace(update, target=3.5)])
