"""``fedcomm eval``: a trained run's team on an environment, greedy, the channel noise on."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fedcomm.commands.flags import COUNT, SEED
from fedcomm.commands.options import add_device, key_value, parser_of
from fedcomm.commands.output import console

if TYPE_CHECKING:
    from fedcomm.baselines import EvalResult
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
    p.add_argument("--cross-play", action="store_true",
                   help="in a run of sites: every site's senders with every site's receivers, "
                   "that never trained together; prints the gap closed, senders' site by row, "
                   "receivers' by column (with --json, a last line whose gap_closed is the "
                   "matrix)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def mute_as_trained(trained: EnvSpec, env: str, env_kwargs: dict, notice: bool = True) -> dict:
    """The original mpe2 environment with the agent types the run muted muted too (a private
    speaker_listener run mutes the speaker's ``say``): said on stderr, so ``--json`` stays
    clean; ``--env-opt mute=...`` chooses otherwise."""
    from fedcomm.learning.evaluate import muted_types
    from fedcomm.sim.registry import make_env

    muted = muted_types(trained, make_env(env, 1, "cpu", **env_kwargs).spec)
    if not muted:
        return env_kwargs
    if notice:
        console.print(f"{env}: muting {', '.join(muted)} as the run did (--env-opt "
                      f"mute={','.join(muted)})", highlight=False, soft_wrap=True)
    return {**env_kwargs, "mute": muted[0] if len(muted) == 1 else muted}


def run(args: argparse.Namespace) -> int:
    from fedcomm.device import resolve_device
    from fedcomm.learning.evaluate import evaluate_team
    from fedcomm.models.team import TEAM_FILE, load_team
    from fedcomm.modes.assemble import SITES_DIR

    config_path = args.run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if args.cross_play:
        return cross_play(args, config)
    trained = config["train"] if config.get("mode") == "federated" else config
    share = config.get("share")
    if not (args.run_dir / TEAM_FILE).exists():
        if (args.run_dir / SITES_DIR).is_dir():
            return each_site(args, trained)
        if share in ("none", "senders", "role"):
            raise FileNotFoundError(f"{args.run_dir} kept copies of the shared module that no "
                                    f"one team holds (--share {share}), so there is no team.pt "
                                    "to evaluate; its agents' own greedy evaluation is in "
                                    "summary.json")
    team = load_team(args.run_dir, resolve_device(args.device))
    env, env_kwargs = target(args, team.spec, trained["env"], trained["env_kwargs"])
    result = evaluate_team(team, env, args.episodes, args.seed, batch=_batch(env),
                           env_kwargs=env_kwargs)
    shares = paired(args, trained, env, [env_kwargs], result)
    if args.json:
        print(json.dumps(result.to_dict() | shares))
    else:
        console.print(f"{env}: return {result.return_mean:.3f} ± {result.return_se:.3f} "
                      f"(s.e., {result.episodes} episodes)")
        say_shares(shares)
    return 0


def paired(args: argparse.Namespace, trained: dict, env: str, site_kwargs: list[dict],
           result: EvalResult) -> dict:
    """The scripted teams (and the run's DP ceiling) on the very episodes the team played
    (the same seeds and batches, each site's options), averaged over the sites like the
    team's return, and the shares of their gaps the team closes: paired, so the episodes'
    own spread cancels from the comparison. Empty where ``env`` has no scripted teams but
    a random one (mpe2's)."""
    from fedcomm.baselines import EvalResult, baseline_summary, evaluate_baselines
    from fedcomm.config import TeamConfig
    from fedcomm.sim.registry import make_env

    if "no_comm" not in make_env(env, 1, **site_kwargs[0]).scripted_teams:
        return {}
    team = TeamConfig(**trained["team"]) if "team" in trained else None
    played: dict[str, dict[str, EvalResult]] = {}  # sites of the same options: once
    for kwargs in site_kwargs:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in played:
            played[key] = evaluate_baselines(env, args.episodes, args.seed, batch=_batch(env),
                                             env_kwargs=kwargs, team=team)
    each = [played[json.dumps(kwargs, sort_keys=True)] for kwargs in site_kwargs]
    mean = {name: EvalResult(sum(b[name].return_mean for b in each) / len(each),
                             math.sqrt(sum(b[name].return_se ** 2 for b in each)) / len(each),
                             sum(b[name].episodes for b in each)) for name in each[0]}
    summary = baseline_summary(result, mean)
    return {k: summary[k] for k in ("baselines", "gap_closed", "ceiling_gap_closed",
                                    "of_ceiling") if k in summary}


def say_shares(shares: dict) -> None:
    if shares.get("gap_closed") is None:
        return
    line = f"gap closed (no_comm -> oracle, on the same episodes): {shares['gap_closed']:.1%}"
    if shares.get("of_ceiling") is not None:
        line += (f"; of the DP ceiling's gap: {shares['of_ceiling']:.1%} (the ceiling closes "
                 f"{shares['ceiling_gap_closed']:.1%})")
    console.print(line, highlight=False, soft_wrap=True)


def target(args: argparse.Namespace, spec: EnvSpec, env: str, env_kwargs: dict,
           notice: bool = True) -> tuple[str, dict]:
    """The environment to play and its options: ``--env`` (muting what the run muted) or the
    one the team trained on, with ``--env-opt`` over its options."""
    if not args.env:
        return env, {**env_kwargs, **dict(args.env_opt)}
    kwargs = dict(args.env_opt)
    if args.env.startswith("mpe2:") and "mute" not in kwargs:
        kwargs = mute_as_trained(spec, args.env, kwargs, notice)
    return args.env, kwargs


def _batch(env: str) -> int:
    return 100 if env.startswith("mpe2:") else 1000


def each_site(args: argparse.Namespace, trained: dict) -> int:
    """A run of sites whose sites kept their own copies: each site's team (``sites/s<k>.pt``)
    on its own site's environment (or ``--env``), and the mean over the sites."""
    from fedcomm.baselines import EvalResult
    from fedcomm.device import resolve_device
    from fedcomm.learning.evaluate import evaluate_team
    from fedcomm.models.team import load_team
    from fedcomm.modes.assemble import site_team_file
    from fedcomm.sim.registry import SITES, one_site

    sites = int(trained["env_kwargs"].get(SITES, 1))
    device = resolve_device(args.device)
    results: list[EvalResult] = []
    site_kwargs: list[dict] = []
    for s in range(sites):
        team = load_team(site_team_file(args.run_dir, s), device)
        env, kwargs = target(args, team.spec, trained["env"], one_site(trained["env_kwargs"], s),
                             notice=s == 0)
        site_kwargs.append(kwargs)
        results.append(evaluate_team(team, env, args.episodes, args.seed, batch=_batch(env),
                                     env_kwargs=kwargs))
    mean = EvalResult(sum(r.return_mean for r in results) / sites,
                      math.sqrt(sum(r.return_se ** 2 for r in results)) / sites,
                      sum(r.episodes for r in results))
    shares = paired(args, trained, env, site_kwargs, mean)
    if args.json:
        print(json.dumps(mean.to_dict() | {"sites": [r.to_dict() for r in results]} | shares))
        return 0
    for s, r in enumerate(results):
        console.print(f"s{s}: return {r.return_mean:.3f} ± {r.return_se:.3f}", highlight=False)
    console.print(f"{env}: return {mean.return_mean:.3f} ± {mean.return_se:.3f} (s.e.; the "
                  f"mean of {sites} sites' teams, {args.episodes} episodes each)",
                  highlight=False)
    say_shares(shares)
    return 0


def cross_play(args: argparse.Namespace, config: dict) -> int:
    """``--cross-play``: the site-by-site matrix of gap closed (``learning.crossplay``)."""
    from fedcomm.device import resolve_device
    from fedcomm.learning.crossplay import cross_play as play
    from fedcomm.models.team import load_team
    from fedcomm.modes.assemble import site_team_file
    from fedcomm.sim.registry import SITES, one_site

    if args.env or args.env_opt:
        raise ValueError("--cross-play plays each pair on its receivers' site, as the run "
                         "trained: leave out --env and --env-opt")
    trained = config.get("train", config)
    sites = int(trained.get("env_kwargs", {}).get(SITES, 1)) if trained else 0
    if sites < 2:
        raise ValueError(f"{args.run_dir} is not a run of sites (config.json): cross-play "
                         "pairs the sites of a run started with --sites N")
    paths = [site_team_file(args.run_dir, s) for s in range(sites)]
    if not all(p.exists() for p in paths):
        raise FileNotFoundError(f"{args.run_dir} has no team per site ({paths[0].parent}): "
                                "its sites' agents keep copies no one team holds")
    device = resolve_device(args.device)
    teams = [load_team(p, device) for p in paths]
    kwargs = [one_site(trained["env_kwargs"], s) for s in range(sites)]
    result = play(teams, trained["env"], kwargs, args.episodes, args.seed, device)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    from rich.table import Table

    table = Table(title=f"cross-play, gap closed (no_comm -> oracle, %) over {args.episodes} "
                  "episodes: senders' site by row, receivers' by column")
    table.add_column("senders", no_wrap=True)
    for b in range(sites):
        table.add_column(f"s{b}", justify="right", no_wrap=True)
    for a, row in enumerate(result.gap_closed):
        table.add_row(f"s{a}", *(f"{100 * g:.0f}" for g in row))
    console.print(table)
    console.print(f"own site (diagonal) {100 * result.diagonal:.1f}%, across sites "
                  f"{100 * result.off_diagonal:.1f}% "
                  f"({100 * result.off_diagonal / result.diagonal:.0f}% of the diagonal)",
                  highlight=False)
    return 0
