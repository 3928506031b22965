"""The simulator and three agents of different types as separate processes over real gRPC.

With the noise off, the feedback each sender receives over the wire equals the gradient the
in-process trainer computes for the same batch, in one autograd graph.
"""

import pytest
import torch

from fedcomm.config import PPOConfig, TeamConfig
from fedcomm.learning.feedback import in_process_feedback
from fedcomm.learning.ppo import ValueNorm, compute_targets
from fedcomm.learning.rollout import Rollout, replay
from fedcomm.models.team import Team
from fedcomm.sim.factory import factory_spec
from tests.harness.processes import fedcomm, finish

pytestmark = pytest.mark.integration  # `fedcomm sim serve` and three `fedcomm agent` processes

FACTORY = ("n_sensors=1", "n_processors=1", "n_actuators=1")
NUM_ENVS = 32


@pytest.mark.parametrize("channel", [
    {}, {"channel": "discrete", "symbols": 4, "rr_epsilon": 3.0, "accumulate": True,
         "release_every": 5}], ids=["gaussian", "discrete-every-5"])
def test_three_agent_processes_match_the_in_process_trainer(tmp_path, sim_process, channel):
    spec = factory_spec(n_sensors=1, n_processors=1, n_actuators=1)
    torch.manual_seed(0)
    cfg = TeamConfig(noise_multiplier=0.0, feedback_noise_multiplier=0.0, feedback_clip=1e6,
                     **channel)
    whole = Team(spec, cfg)
    whole.save(tmp_path / "team.pt")
    tokens = tmp_path / "tokens.json"
    env_opts = [a for opt in FACTORY for a in ("--env-opt", opt)]
    list(finish([fedcomm("sim", "tokens", "--env", "factory", *env_opts, "--out", str(tokens))]))
    address = sim_process("--env", "factory", *env_opts, "--num-envs", str(NUM_ENVS),
                          "--tokens", str(tokens), "--seed", "7")

    agents = [fedcomm("agent", "--sim", address, "--agent-id", agent, "--tokens", str(tokens),
                      "--checkpoint", str(tmp_path / "team.pt"), "--rounds", "1",
                      "--no-update", "--dump", str(tmp_path / "dump"),
                      "--ledger", str(tmp_path / f"{agent}.ledger.jsonl"))
              for agent in spec.agent_ids]
    list(finish(agents))
    dumps = [torch.load(tmp_path / "dump" / f"{a}-0.pt", weights_only=True)
             for a in spec.agent_ids]

    # The batch as one process would hold it: each agent contributed only its own data.
    parts = [d["rollout"] for d in dumps]
    rollout = Rollout(
        obs=[p["obs"][0] for p in parts], actions=[p["actions"][0] for p in parts],
        noise=torch.cat([p["noise"] for p in parts], 2),
        logprobs=torch.cat([p["logprobs"] for p in parts], 2),
        values=torch.cat([p["values"] for p in parts], 2),
        rewards=torch.cat([p["rewards"] for p in parts], 2))
    assert rollout.rewards.shape == (spec.episode_length, NUM_ENVS, 3)
    assert torch.equal(rollout.rewards[..., 0], rollout.rewards[..., 2])  # a team reward

    # What each agent received is what the others sent.
    with torch.no_grad():
        messages = replay(whole, rollout).messages
    for i, part in enumerate(parts):
        delivered = part["delivered"][:, :, 0]  # [T, B, N]
        expected = messages * delivered[..., None]
        torch.testing.assert_close(part["received"] * delivered[..., None], expected,
                                   rtol=0, atol=1e-6)
        assert not delivered[..., i].any()

    cfg_ppo = PPOConfig()
    reference = in_process_feedback(whole, rollout,
                                    compute_targets(rollout, cfg_ppo, ValueNorm(3)), cfg_ppo)
    # (a sensor has one action: its policy gradient, and so its feedback, is zero)
    scale = reference.abs().max()
    assert scale > 1e-6, "no gradient reached any sender"
    for i, d in enumerate(dumps):
        over_wire = d["received"][:, :, 0]
        assert (over_wire - reference[:, :, i]).abs().max() < 1e-4 * scale
