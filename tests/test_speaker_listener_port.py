"""The batched speaker-listener port matches mpe2's original step for step."""

import numpy as np
import pytest
import torch
from mpe2 import simple_speaker_listener_v4

from fedcomm.sim.mpe2_adapter import Mpe2Env
from fedcomm.sim.speaker_listener import SpeakerListener

N_EPISODES = 16


def mpe2_initial_state(env) -> dict[str, np.ndarray]:
    world = env.unwrapped.world
    speaker, listener = world.agents
    return {
        "goal": world.landmarks.index(speaker.goal_b),
        "speaker_pos": speaker.state.p_pos.copy(),
        "listener_pos": listener.state.p_pos.copy(),
        "landmark_pos": np.stack([lm.state.p_pos for lm in world.landmarks]),
    }


def test_port_matches_mpe2_observations_and_rewards():
    originals = [simple_speaker_listener_v4.parallel_env(max_cycles=25)
                 for _ in range(N_EPISODES)]
    first_obs = [env.reset(seed=100 + i)[0] for i, env in enumerate(originals)]
    states = [mpe2_initial_state(env) for env in originals]
    port = SpeakerListener(N_EPISODES)
    port.set_state(**{k: torch.as_tensor(np.stack([s[k] for s in states])) for k in states[0]})

    obs = port.observe()
    for i, o in enumerate(first_obs):
        assert np.abs(obs[0][i, 0].numpy() - o["speaker_0"]).max() < 1e-6
        assert np.abs(obs[1][i, 0].numpy() - o["listener_0"]).max() < 1e-6

    rng = np.random.default_rng(0)
    max_obs_err = max_rew_err = 0.0
    for t in range(25):
        say = rng.integers(3, size=N_EPISODES)
        move = rng.integers(5, size=N_EPISODES)
        step = port.step([torch.as_tensor(say)[:, None], torch.as_tensor(move)[:, None]])
        for i, env in enumerate(originals):
            o, r, _, trunc, _ = env.step({"speaker_0": int(say[i]), "listener_0": int(move[i])})
            for k, name in enumerate(("speaker_0", "listener_0")):
                max_obs_err = max(max_obs_err, np.abs(step.obs[k][i, 0].numpy() - o[name]).max())
                max_rew_err = max(max_rew_err, abs(step.reward[i, k].item() - r[name]))
            assert trunc["listener_0"] == step.done == (t == 24)
    assert max_obs_err < 1e-4
    assert max_rew_err < 1e-4


def test_adapter_exposes_mpe2_through_the_batched_interface():
    env = Mpe2Env("simple_speaker_listener_v4", num_envs=3)
    port = SpeakerListener(3)
    assert env.spec.types == port.spec.types
    obs = env.reset(seed=0)
    assert [o.shape for o in obs] == [(3, 1, 3), (3, 1, 11)]
    total = torch.zeros(3, 2)
    for _ in range(25):
        step = env.step(env.random_actions())
        total += step.reward
    assert step.done and torch.equal(total[:, 0], total[:, 1])


def test_adapter_rejects_bad_names_and_actions():
    with pytest.raises(ValueError, match="no environment"):
        Mpe2Env("simple_nonexistent_v1", num_envs=1)
    env = Mpe2Env("simple_speaker_listener_v4", num_envs=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="must lie in"):
        env.step([torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), 7)])


def test_a_muted_speaker_has_one_action_in_the_port_and_in_mpe2():
    """Muted (``say=False``; mpe2's ``mute=speaker``), the speaker's one action changes
    nothing: the listener hears codeword 0, the oracle sends it, and both environments give
    the same spec, so a team trained on the port plays mpe2."""
    port = SpeakerListener(4, say=False)
    original = Mpe2Env("simple_speaker_listener_v4", 4, mute="speaker")
    assert port.spec.types[0].n_actions == 1 and port.spec.types[1].n_actions == 5
    assert [t.n_actions for t in original.spec.types] == [t.n_actions for t in port.spec.types]
    assert SpeakerListener(4).spec.types[0].n_actions == 3
    port.reset(seed=0)
    actions = port.oracle_actions()
    assert (actions[0] == 0).all()
    obs = port.step(actions).obs
    assert (obs[1][:, 0, -3:] == torch.tensor([1.0, 0.0, 0.0])).all()
    with pytest.raises(ValueError):
        port.step([torch.ones(4, 1, dtype=torch.long), actions[1]])
