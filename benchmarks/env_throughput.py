"""Environment throughput of fedcomm's speaker-listener port against mpe2 and VMAS.

Measured, in env-steps/s (one environment advancing one step; a batch of B envs stepping once
counts B env-steps):

* ``port``: ``fedcomm.sim.speaker_listener.SpeakerListener`` (batched torch, CPU) at each
  batch size;
* ``mpe2``: mpe2's original ``simple_speaker_listener_v4`` parallel API, one env in a Python loop;
* ``vmas``: VMAS's ``simple_speaker_listener`` (discrete actions, ``max_steps=25``, CPU) at each
  batch size, when ``vmas`` is importable (otherwise the output says so and the rest still runs).

Every measurement runs whole 25-step episodes, each starting with a reset that is timed too, with
either constant no-op actions or random actions drawn every step (also timed). Each configuration
is warmed up and calibrated to take about ``--duration`` seconds, then the configurations are
timed round-robin (the starting configuration rotates every round) ``--repeats`` times. The table
shows the median, min and max of the repeats and the ratios port/mpe2 and port/VMAS of medians at
the same batch size and action mode; ``--json`` writes every sample.

    python benchmarks/env_throughput.py [--batch-sizes 1024 4096] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedcomm.sim.speaker_listener import SpeakerListener

EPISODE_LENGTH = 25
ENVS = ("port", "vmas", "mpe2")
MPE2_TARGET = 50.0  # the port should be at least this many times faster than mpe2
VMAS_TARGET = 1.0  # ... and at least as fast as VMAS

Runner = Callable[[int], int]
"""Runs that many whole episodes (reset included) and returns the env-steps taken."""


@dataclass
class Config:
    env: str
    batch: int
    actions: str  # "const" or "random"
    run: Runner
    episodes: int = 1  # per measurement, set by calibration
    samples: list[float] = field(default_factory=list)  # env-steps/s, one per repeat

    @property
    def label(self) -> str:
        return f"{self.env} B={self.batch} {self.actions}"

    def stats(self) -> dict[str, float]:
        return {"median": statistics.median(self.samples), "min": min(self.samples),
                "max": max(self.samples)}


# -- runners ---------------------------------------------------------------------------------------
def port_runner(batch: int, random_actions: bool, seed: int) -> Runner:
    env = SpeakerListener(batch)
    env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    const = [torch.zeros(batch, t.count, dtype=torch.long) for t in env.spec.types]

    def run(episodes: int) -> int:
        steps = 0
        for _ in range(episodes):
            env.reset()
            done = False
            while not done:
                actions = env.random_actions(gen) if random_actions else const
                done = env.step(actions).done
                steps += batch
        return steps

    return run


def vmas_runner(batch: int, random_actions: bool, seed: int) -> Runner:
    import vmas

    env = vmas.make_env("simple_speaker_listener", num_envs=batch, device="cpu",
                        continuous_actions=False, max_steps=EPISODE_LENGTH, seed=seed)
    # Discrete(27) for the speaker (3x3 movement x 3 messages), Discrete(9) for the listener;
    # action 0 is "stay" (and message 0).
    sizes = [int(space.n) for space in env.action_space]
    gen = torch.Generator().manual_seed(seed)
    const = [torch.zeros(batch, 1, dtype=torch.long) for _ in sizes]

    def run(episodes: int) -> int:
        steps = 0
        for _ in range(episodes):
            env.reset()
            for _ in range(10 * EPISODE_LENGTH):
                actions = ([torch.randint(n, (batch, 1), generator=gen) for n in sizes]
                           if random_actions else const)
                _, _, dones, _ = env.step(actions)
                steps += batch
                if bool(dones.all()):
                    break
            else:
                raise RuntimeError("VMAS episode did not end")
        return steps

    return run


def mpe2_runner(batch: int, random_actions: bool, seed: int) -> Runner:
    from mpe2 import simple_speaker_listener_v4

    if batch != 1:
        raise ValueError("mpe2 runs a single environment")
    env = simple_speaker_listener_v4.parallel_env(max_cycles=EPISODE_LENGTH)
    env.reset(seed=seed)
    n_actions = {a: int(env.action_space(a).n) for a in env.possible_agents}
    rng = np.random.default_rng(seed)
    const = dict.fromkeys(env.possible_agents, 0)

    def run(episodes: int) -> int:
        steps = 0
        for _ in range(episodes):
            env.reset()
            while env.agents:
                actions = ({a: int(rng.integers(n_actions[a])) for a in env.agents}
                           if random_actions else const)
                env.step(actions)
                steps += 1
        return steps

    return run


RUNNERS: dict[str, Callable[[int, bool, int], Runner]] = {
    "port": port_runner, "vmas": vmas_runner, "mpe2": mpe2_runner,
}


# -- measurement -----------------------------------------------------------------------------------
def timed(cfg: Config, episodes: int) -> tuple[float, int]:
    gc.collect()
    t0 = time.perf_counter()
    steps = cfg.run(episodes)
    return time.perf_counter() - t0, steps


def calibrate(cfg: Config, warmup: float, duration: float) -> None:
    """Warm up for about ``warmup`` seconds, then size a measurement to about ``duration``."""
    episodes, spent = 1, 0.0
    while True:
        dt, _ = timed(cfg, episodes)
        spent += dt
        if spent >= warmup and dt >= 0.1:
            break
        episodes *= 2
    cfg.episodes = max(1, math.ceil(duration * episodes / dt))


def measure(configs: list[Config], repeats: int, console: Console) -> None:
    for r in range(repeats):
        k = r % len(configs)
        for cfg in configs[k:] + configs[:k]:
            dt, steps = timed(cfg, cfg.episodes)
            cfg.samples.append(steps / dt)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        console.log(f"round {r + 1}/{repeats} done (load avg {load})")


def ratios(configs: list[Config]) -> list[dict[str, Any]]:
    """port/mpe2 and port/VMAS (ratios of medians) for each port configuration."""
    def median_of(env: str, batch: int, actions: str) -> float | None:
        for c in configs:
            if (c.env, c.batch, c.actions) == (env, batch, actions) and c.samples:
                return statistics.median(c.samples)
        return None

    out = []
    for c in configs:
        if c.env != "port":
            continue
        port = statistics.median(c.samples)
        mpe2 = median_of("mpe2", 1, c.actions)
        vmas = median_of("vmas", c.batch, c.actions)
        out.append({"batch": c.batch, "actions": c.actions,
                    "port_over_mpe2": port / mpe2 if mpe2 else None,
                    "port_over_vmas": port / vmas if vmas else None})
    return out


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:,.2f}M" if x >= 1e6 else f"{x / 1e3:,.1f}k"


def fmt_ratio(x: float | None, target: float) -> str:
    if x is None:
        return "n/a"
    colour = "green" if x >= target else "red"
    return f"[{colour}]{x:,.1f}x[/{colour}]"


def report(configs: list[Config], meta: dict[str, Any], console: Console) -> list[dict[str, Any]]:
    rat = {(r["batch"], r["actions"]): r for r in ratios(configs)}
    table = Table(title="Speaker-listener environment throughput (env-steps/s)",
                  caption=(f"torch {meta['torch']} CPU, {meta['torch_threads']} threads, "
                           f"{meta['cpu_count']} CPUs; {meta['repeats']} interleaved repeats of "
                           f"~{meta['duration_s']} s; load avg {meta['loadavg_before']} -> "
                           f"{meta['loadavg_after']}"))
    for name in ("env", "envs", "actions", "median", "min", "max", "port/mpe2", "port/VMAS"):
        table.add_column(name, justify="left" if name in ("env", "actions") else "right")
    for c in sorted(configs, key=lambda c: (c.batch, ENVS.index(c.env), c.actions)):
        s = c.stats()
        r = rat.get((c.batch, c.actions)) if c.env == "port" else None
        table.add_row(c.env, str(c.batch), c.actions, fmt_rate(s["median"]), fmt_rate(s["min"]),
                      fmt_rate(s["max"]),
                      fmt_ratio(r["port_over_mpe2"], MPE2_TARGET) if r else "",
                      fmt_ratio(r["port_over_vmas"], VMAS_TARGET) if r else "")
    console.print(table)
    console.print(f"Targets: port/mpe2 >= {MPE2_TARGET:g}x, port/VMAS >= {VMAS_TARGET:g}x "
                  "(green: met). Timings on a shared machine are noisy.")
    return list(rat.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--duration", type=float, default=1.5, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per config")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--actions", choices=("const", "random", "both"), default="both")
    p.add_argument("--envs", nargs="+", choices=ENVS, default=list(ENVS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write all samples and summaries here")
    args = p.parse_args(argv)

    console = Console()
    torch.set_num_threads(args.threads)
    modes = ["const", "random"] if args.actions == "both" else [args.actions]

    envs = list(args.envs)
    if "vmas" in envs:
        try:
            import vmas  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            console.print(f"[yellow]vmas is not importable ({type(e).__name__}: {e}); "
                          "skipping VMAS.[/yellow] Install with `pip install --no-deps vmas "
                          "gym six 'pyglet<=1.5.27'`.")
            envs.remove("vmas")

    configs = [Config(env, batch, mode, RUNNERS[env](batch, mode == "random", args.seed))
               for env in envs for batch in ([1] if env == "mpe2" else args.batch_sizes)
               for mode in modes]
    loadavg_before = os.getloadavg()
    for cfg in configs:
        calibrate(cfg, args.warmup, args.duration)
        console.log(f"warm-up {cfg.label}: {cfg.episodes} episodes per measurement")
    measure(configs, args.repeats, console)

    meta = {
        "torch": torch.__version__, "vmas": version("vmas") if "vmas" in envs else None,
        "mpe2": version("mpe2"), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "repeats": args.repeats, "duration_s": args.duration,
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    rat = report(configs, meta, console)
    if args.json:
        results = [{"env": c.env, "batch": c.batch, "actions": c.actions,
                    "episodes_per_measurement": c.episodes, "steps_per_s": c.samples,
                    **c.stats()} for c in configs]
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "ratios": rat}, f, indent=2)
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
