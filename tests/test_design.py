"""``--epsilon E`` picks speaker_listener's private design for E from a table
(``presets.PRIVATE_DESIGNS``), flags given with it override each value, and a design that
gives DP-SGD no share is planned as one episode's releases at the whole budget."""

from __future__ import annotations

import pytest

from fedcomm.commands import build_parser
from fedcomm.commands.options import federation_config_from_args
from fedcomm.config import FederationConfig
from fedcomm.presets import CODE_WARMUP, PRIVATE_DESIGNS, design_for
from fedcomm.releases.plan import plan_of
from fedcomm.releases.schedule import training_of


def configured(*flags: str) -> FederationConfig:
    return federation_config_from_args(build_parser().parse_args(["simulate", *flags]))


def test_the_default_budget_keeps_the_default_split():
    fed = configured()
    assert fed.train.privacy.epsilon == 8 and fed.train.privacy.update_share is None
    assert fed.train.privacy.split == pytest.approx({"message": 5.333, "update": 2.667},
                                                    abs=1e-3)
    assert (fed.train.team.symbols, fed.train.team.code_warmup) == (4, CODE_WARMUP)
    assert plan_of(fed).training == "dp_sgd" and fed == configured("--epsilon", "8")


@pytest.mark.parametrize("epsilon, steps", [(4, 3_000_000), (2, 5_000_000), (1, 6_000_000),
                                            (0.5, 6_000_000)])
def test_a_smaller_budget_goes_to_the_message_with_more_episodes(epsilon, steps):
    fed = configured("--epsilon", str(epsilon))
    train = fed.train
    assert design_for("speaker_listener", epsilon).update_share == 0
    assert (train.env_steps, train.num_envs, train.team.symbols) == (steps, 1024, 3)
    assert train.privacy.update_noise_multiplier is None
    assert train.privacy.split == pytest.approx({"message": epsilon}, rel=1e-4)
    plan = plan_of(fed)
    assert plan.training == "none" and plan.composition == "batch"
    assert plan.composed == pytest.approx(epsilon, rel=1e-4)
    assert "the agents that release do not train" in plan.headline()
    assert training_of(fed.to_dict()) == "none"  # what the agents and the audit read


def test_flags_given_override_the_design():
    fed = configured("--epsilon", "2", "--symbols", "4", "--num-envs", "256",
                     "--env-steps", "100000")
    assert (fed.train.team.symbols, fed.train.num_envs, fed.train.env_steps) == (4, 256, 100000)
    fed = configured("--epsilon", "4", "--update-share", "0.2")
    assert fed.train.privacy.split == pytest.approx({"message": 3.2, "update": 0.8}, abs=5e-3)
    assert plan_of(fed).training == "dp_sgd"
    fed = configured("--epsilon", "4", "--update-epsilon", "0.8")  # a target, not a share
    assert fed.train.privacy.update_share is None
    assert fed.train.privacy.split == pytest.approx({"message": 3.2, "update": 0.8}, abs=5e-3)
    fed = configured("--non-private", "--epsilon", "4")  # the Gaussian preset: no table
    assert fed.train.team.channel == "gaussian" and fed.train.team.code_warmup == 0


def test_every_budget_has_one_row():
    rows = PRIVATE_DESIGNS["speaker_listener"]
    assert [r.epsilon for r in rows] == sorted((r.epsilon for r in rows), reverse=True)
    assert rows[-1].epsilon == 0
    assert design_for("speaker_listener", 100) is rows[0]
    assert design_for("speaker_listener", 1e-3) is rows[-1]
    assert all("codewords" in r.describe() for r in rows)


def test_the_run_states_its_design_what_was_given_instead_and_its_ceiling():
    from fedcomm.commands.output import design_lines

    lines = design_lines(configured("--epsilon", "4", "--symbols", "4"), private_default=True)
    assert lines[0].startswith("design for epsilon 4: the goal as one of 3 codewords")
    assert lines[0].endswith("given instead: --symbols 4")
    assert lines[1].startswith("DP ceiling of this design: ")
    share = float(lines[1].split(": ")[1].split("%")[0])
    assert 80 < share < 90  # 4-ary randomized response at 4
    assert not design_lines(configured("--non-private"), private_default=False)
