"""Does federation pay? The same sites trained federated (the server averages what the sites'
agents of one role share) against trained alone (``--share none``), in environment steps per
site, and whether federated sites speak one language (cross-play).

Each arm is ``fedcomm simulate --sites N`` with its flags, per seed; greedy evaluations come from
the agents' own journals (a private agent's returns never reach the server): each round's
periodic evaluation and the final one on the held-out evaluation seed. Gap closed is
``(return - no_comm) / (oracle - no_comm)`` with the run's own scripted teams. The steps per
site to reach a share of the gap are read off each run's evaluation curve (linear between
evaluations). Cross-play is ``fedcomm eval RUN --cross-play``.

    python benchmarks/sites.py --out runs/bench-sites --sites 8 --num-envs 128 \\
        --env-steps 409600 --seeds 0 1 --arm federated= --arm alone=--share=none
    python benchmarks/sites.py --out runs/bench-sites --analyze   # the figures, from the runs

Writes ``results.json``, ``curves.png`` and ``crossplay.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from fedcomm.baselines import EVAL_SEED, evaluate_scripted
from fedcomm.config import env_spec
from fedcomm.sim.registry import one_site


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-s{seed}"


def train(args: argparse.Namespace, arm: str, flags: list[str], seed: int) -> Path:
    path = run_dir(args.out, arm, seed)
    if (path / "summary.json").exists():
        return path
    cmd = [sys.executable, "-m", "fedcomm", "simulate", "--env", args.env, "--sites",
           str(args.sites), "--num-envs", str(args.num_envs), "--env-steps",
           str(args.env_steps), "--seed", str(seed), "--out", str(path), "--quiet", *flags]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return path


def curve(path: Path) -> dict:
    """A run's greedy evaluations from its agents' journals: gap closed by round (all sites,
    and per site), the final one, and the environment steps per site of each round."""
    config = json.loads((path / "config.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    base = {name: r["return_mean"] for name, r in summary["baselines"].items()}
    low, high = base["no_comm"], base["oracle"]
    train = config["train"]
    batch = train["num_envs"] * env_spec(train["env"], one_site(train["env_kwargs"], 0)
                                         ).episode_length
    per_round = config["batches_per_round"] * batch
    rounds: dict[int, dict[str, list[float]]] = {}
    final: dict[str, list[float]] = {}
    for journal in sorted((path / "agents").glob("*/journal.jsonl")):
        site = journal.parent.name.split(".")[0]
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] != "evaluate":
                continue
            mean = statistics.fmean(row["returns"])
            target = final if row["seed"] == EVAL_SEED else rounds.setdefault(row["round"], {})
            target.setdefault(site, []).append(mean)

    def gap(by_site: dict[str, list[float]]) -> tuple[float, dict[str, float]]:
        sites = {s: (statistics.fmean(v) - low) / (high - low) for s, v in by_site.items()}
        return statistics.fmean(sites.values()), sites

    # each site's own gap, against its own scripted teams (non-IID sites differ)
    own = {}
    if final:
        for site, returns in final.items():
            kwargs = one_site(train["env_kwargs"], int(site[1:]))
            lo, hi = (evaluate_scripted(train["env"], name, 1000, EVAL_SEED,
                                        env_kwargs=kwargs).return_mean
                      for name in ("no_comm", "oracle"))
            own[site] = (statistics.fmean(returns) - lo) / (hi - lo)

    return {"steps_per_site": [r * per_round for r in sorted(rounds)],
            "gap_closed": [gap(rounds[r])[0] for r in sorted(rounds)],
            "final_gap_closed": gap(final)[0] if final else None,
            "final_per_site": own or None,
            "final_steps_per_site": train["env_steps"] // batch * batch,
            "baselines": base, "privacy": summary.get("privacy", {}).get("composed")}


def steps_to(points: dict, share: float) -> float | None:
    """Steps per site at which the curve first reaches ``share`` of the gap (linear between
    evaluations); ``None`` if it never does."""
    xs, ys = [0, *points["steps_per_site"]], [0.0, *points["gap_closed"]]
    if points["final_gap_closed"] is not None:
        xs, ys = [*xs, points["final_steps_per_site"]], [*ys, points["final_gap_closed"]]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= share:
            return x0 + (x1 - x0) * (share - y0) / (y1 - y0) if y1 > y0 else x1
    return None


def cross_play(path: Path, episodes: int) -> dict | None:
    out = subprocess.run([sys.executable, "-m", "fedcomm", "eval", str(path), "--cross-play",
                          "--episodes", str(episodes), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, runs) in enumerate(results["arms"].items()):
        for j, run in enumerate(runs.values()):
            xs = [0, *run["steps_per_site"], run["final_steps_per_site"]]
            ys = [0.0, *run["gap_closed"], run["final_gap_closed"]]
            ax.plot(xs, [100 * y for y in ys], "o-", color=f"C{i}", alpha=0.8, ms=3,
                    label=arm if j == 0 else None)
    ax.axhline(90, color="gray", ls=":", lw=1, label="90% of the gap")
    ax.set_xlabel("environment steps per site")
    ax.set_ylabel("gap closed, greedy (%)")
    ax.set_title(results["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plays = {arm: c for arm, c in results.get("cross_play", {}).items() if c}
    if not plays:
        return
    fig, axes = plt.subplots(1, len(plays), figsize=(4.2 * len(plays), 3.8), squeeze=False)
    for ax, (arm, c) in zip(axes[0], plays.items()):
        im = ax.imshow([[100 * g for g in row] for row in c["gap_closed"]], vmin=-50,
                       vmax=100, cmap="viridis")
        ax.set_title(f"{arm}: own site {100 * c['diagonal']:.0f}%, across "
                     f"{100 * c['off_diagonal']:.0f}%", fontsize=9)
        ax.set_xlabel("receivers' site")
        ax.set_ylabel("senders' site")
    fig.colorbar(im, ax=axes[0].tolist(), label="gap closed (%)")
    fig.savefig(out / "crossplay.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--env", default="speaker_listener")
    p.add_argument("--sites", type=int, default=8)
    p.add_argument("--num-envs", type=int, default=128)
    p.add_argument("--env-steps", type=int, default=409_600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="an arm: its name and its flags, comma-separated (alone=--share=none)")
    p.add_argument("--crossplay-episodes", type=int, default=500)
    p.add_argument("--share", type=float, default=0.9, help="of the gap, for steps-to-reach")
    p.add_argument("--analyze", action="store_true", help="only read the runs in --out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    arms = dict(a.split("=", 1) for a in args.arm) or {"federated": "", "alone": "--share=none"}
    if args.analyze:
        arms = {}
        for path in sorted(args.out.glob("*-s*/summary.json")):
            arms.setdefault(path.parent.name.rsplit("-s", 1)[0], "")
    results: dict = {"title": "", "arms": {}, "cross_play": {}, "steps_to": {}}
    if not args.analyze:  # seed by seed, so that a first comparison is complete early
        for seed in args.seeds:
            for arm, flags in arms.items():
                train(args, arm, [f for f in flags.split(",") if f], seed)
    for arm in arms:
        runs = {seed: curve(run_dir(args.out, arm, seed)) for seed in args.seeds
                if (run_dir(args.out, arm, seed) / "summary.json").exists()}
        results["arms"][arm] = runs
        results["steps_to"][arm] = {s: steps_to(r, args.share) for s, r in runs.items()}
        first = run_dir(args.out, arm, min(runs)) if runs else None
        results["cross_play"][arm] = (cross_play(first, args.crossplay_episodes)
                                      if first is not None else None)
    configs = sorted(args.out.glob("*-s*/config.json"))
    if configs:  # the runs' own settings (with --analyze, not the flags')
        run = json.loads(configs[0].read_text())["train"]
        results["title"] = (f"{run['env']}, {run['env_kwargs'].get('sites', 1)} sites, "
                            f"{run['num_envs']} episodes per batch per site")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out)
    for arm, runs in results["arms"].items():
        for seed, run in runs.items():
            reach = results["steps_to"][arm][seed]
            print(f"{arm} seed {seed}: final gap closed {100 * run['final_gap_closed']:.1f}%, "
                  f"90% at {'never' if reach is None else f'{reach:,.0f}'} steps per site")
        c = results["cross_play"][arm]
        if c:
            print(f"{arm} cross-play: own site {100 * c['diagonal']:.1f}%, across sites "
                  f"{100 * c['off_diagonal']:.1f}%")


if __name__ == "__main__":
    main()
