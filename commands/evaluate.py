"""``fedcomm eval``: a trained run's team on an environment, greedy, the channel noise on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedcomm.commands.flags import COUNT, SEED
from fedcomm.commands.options import add_device, key_value, parser_of
from fedcomm.commands.output import console

if TYPE_CHECKING:
    from fedcomm.sim.base import EnvSpec


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "eval", help="evaluate a trained run on an environment",
                  description="Evaluate a run's checkpoint (greedy actions, channel noise "
                  "on). --env mpe2:<name> runs the original mpe2 environment.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--env", help="environment (default: the one the run trained on)")
    p.add_argument("--env-opt", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="an option of the environment (repeatable)")
    p.add_argument("--episodes", type=COUNT, default=1000, metavar="N",
                   help="(default: %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, metavar="N", help="(default: %(default)s)")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def mute_as_trained(trained: EnvSpec, env: str, env_kwargs: dict) -> dict:
    """The original mpe2 environment with the agent types the run muted muted too (a private
    speaker_listener run mutes the speaker's ``say``): said on stderr, so ``--json`` stays
    clean; ``--env-opt mute=...`` chooses otherwise."""
    from fedcomm.learning.evaluate import muted_types
    from fedcomm.sim.registry import make_env

    muted = muted_types(trained, make_env(env, 1, "cpu", **env_kwargs).spec)
    if not muted:
        return env_kwargs
    console.print(f"{env}: muting {', '.join(muted)} as the run did (--env-opt "
                  f"mute={','.join(muted)})", highlight=False, soft_wrap=True)
    return {**env_kwargs, "mute": muted[0] if len(muted) == 1 else muted}


def run(args: argparse.Namespace) -> int:
    from fedcomm.device import resolve_device
    from fedcomm.learning.evaluate import evaluate_team
    from fedcomm.models.team import TEAM_FILE, load_team

    config_path = args.run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if config.get("share") == "none" and not (args.run_dir / TEAM_FILE).exists():
        raise FileNotFoundError(f"{args.run_dir} kept a copy of the shared module per agent "
                                "(--share none): no one team holds them, so there is no team.pt to "
                                "evaluate; its agents' own greedy evaluation is in summary.json")
    team = load_team(args.run_dir, resolve_device(args.device))
    trained = config["train"] if config.get("mode") == "federated" else config
    env = args.env or trained["env"]
    env_kwargs = (dict(args.env_opt) if args.env
                  else {**trained["env_kwargs"], **dict(args.env_opt)})
    if env.startswith("mpe2:") and "mute" not in env_kwargs:
        env_kwargs = mute_as_trained(team.spec, env, env_kwargs)
    batch = 100 if env.startswith("mpe2:") else 1000
    result = evaluate_team(team, env, args.episodes, args.seed, batch=batch, env_kwargs=env_kwargs)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(f"{env}: return {result.return_mean:.3f} ± {result.return_se:.3f} "
                      f"(s.e., {result.episodes} episodes)")
    return 0
