"""A discrete channel's code formed before training on public observations
(``models.warmup``): every seed's code tells the goals apart, every party computes it alike,
and nothing but the senders' networks moves."""

from __future__ import annotations

import pytest
import torch

from fedcomm.config import TeamConfig
from fedcomm.models.team import Team
from fedcomm.models.warmup import WARMUP_SEED, public_observations, warm_up_code
from fedcomm.presets import CODE_WARMUP, federation_preset

SPEC = federation_preset("speaker_listener", private=True).spec  # two sites, say muted


def team_config(symbols: int, warmup: int) -> TeamConfig:
    return TeamConfig(channel="discrete", symbols=symbols, release_every=25, accumulate=True,
                      routes="speaker>listener", feedback=False, recall=True,
                      code_warmup=warmup)


def code_of(team: Team) -> torch.Tensor:
    """``[goals, speakers]`` each speaker's most likely codeword for each goal, as trained."""
    obs = public_observations(SPEC, 256, seed=WARMUP_SEED + 1)
    with torch.no_grad():
        encoded = team.comm.encode(team.encode_steps(obs), team.local_types)
        probs = torch.softmax(team.channel.code_logits(encoded), dim=-1)
    speakers = probs[:, : SPEC.types[0].count]  # the speakers come first
    goals = obs[0][0].argmax(dim=-1)  # [B, speakers]: the brightest colour is the goal
    return torch.stack([speakers[goals[:, 0] == g].mean(dim=0).argmax(dim=-1)
                        for g in range(3)])


@pytest.mark.parametrize("symbols", [3, 4])
def test_every_seed_forms_a_code_that_tells_the_goals_apart(symbols):
    for seed in range(4):  # 32 seeds of each were measured (BENCHMARKS.md)
        code = code_of(Team.initial(SPEC, team_config(symbols, CODE_WARMUP), seed))
        for speaker in code.T:  # three goals, three codewords
            assert len(set(speaker.tolist())) == 3, (seed, code)


def test_without_the_warm_up_some_seeds_start_with_one_codeword_for_everything():
    codes = [code_of(Team.initial(SPEC, team_config(3, 0), seed)) for seed in range(8)]
    assert any(len(set(c[:, 0].tolist())) < 3 for c in codes)


def test_every_party_computes_the_same_team_and_only_the_senders_networks_move():
    cfg = team_config(3, CODE_WARMUP)
    one, two = Team.initial(SPEC, cfg, 5), Team.initial(SPEC, cfg, 6)
    again = Team.initial(SPEC, cfg, 5)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in one.state_dict().items())
    torch.manual_seed(5)
    cold = Team(SPEC, team_config(3, 0))
    errors = warm_up_code(cold, CODE_WARMUP)
    assert errors[1] < errors[0] / 3
    moved = {k for k, v in cold.state_dict().items() if not torch.equal(v, one.state_dict()[k])}
    assert not moved  # the warm-up is all that differs from a cold team of the same seed
    cold = Team(SPEC, team_config(3, 0))
    before = {k: v.clone() for k, v in cold.state_dict().items()}
    warm_up_code(cold, 20)
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k, v in cold.state_dict().items()
             if not torch.equal(v, before[k])}
    assert moved <= {"features.0", "recall.0", "comm.encoder"} and "recall.0" in moved
    assert not torch.equal(one.state_dict()["recall.0.0.weight"],
                           two.state_dict()["recall.0.0.weight"])


def test_a_warm_up_needs_a_recall_decoder():
    with pytest.raises(ValueError, match="recall"):
        TeamConfig(channel="discrete", code_warmup=10)
    with pytest.raises(ValueError, match="non-negative"):
        team_config(3, -1)
    with pytest.raises(ValueError, match="recall"):
        warm_up_code(Team(SPEC, TeamConfig(channel="discrete")), 5)
