"""Releases validate their inputs; noise generators are cryptographically seeded."""

import math

import pytest
import torch

from fedcomm.privacy.events import GaussianRelease, gaussian_release
from fedcomm.privacy.noise import secure_generator


def test_release_fields_and_conversion():
    r = gaussian_release("message", 0.8, 2.0, count=5)
    assert (r.sensitivity, r.relation, r.std) == (4.0, "replace_one", 1.6)
    assert r.effective_noise == pytest.approx(0.4)
    ar = r.as_relation("add_remove")
    assert (ar.sensitivity, ar.relation, ar.count) == (2.0, "add_remove", 5)
    assert ar.as_relation("replace_one") == r
    episode = gaussian_release("dpsgd", 1.0, 1.0, relation="add_remove", sample_rate=0.1,
                               contributions=3)
    assert episode.sensitivity == 3.0 and episode.sampled


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clip": 0.0}, "clip must be positive"),
    ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"count": 0}, "count"),
    ({"count": 2.0}, "count"),
    ({"sensitivity": math.inf}, "finite"),
    ({"noise_multiplier": math.nan}, "finite"),
    ({"relation": "swap"}, "neighbouring relation"),
    ({"mechanism": ""}, "mechanism"),
])
def test_invalid_releases_are_refused(kwargs, match):
    args = {"mechanism": "m", "noise_multiplier": 1.0, "clip": 1.0, "sensitivity": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        GaussianRelease(**args)


def test_secure_generator():
    a, b = secure_generator(7), secure_generator(7)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    seeds = {secure_generator().initial_seed() for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
