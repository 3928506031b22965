"""The federated training loop the ServerApp runs: rounds, failures, evaluation, checkpoints.

Per round: send the global shared module and the round's configuration to every agent, wait
for their replies, aggregate with the configured Flower strategy, write one line of
``metrics.jsonl`` and a checkpoint. Every agent takes part in every round, because the joint
environment needs all of them. At the end the agents play greedy evaluation episodes through the
simulator (nobody ever assembles the team), and the server compares the result with the scripted
reference teams, which it runs on its own copy of the environment.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedcomm.baselines import EVAL_SEED, EvalResult, baseline_summary, evaluate_baselines
from fedcomm.clients.agent import env_spec, initial_team, shared_arrays
from fedcomm.clients.app import CONFIG_KEY
from fedcomm.config import FederationConfig
from fedcomm.progress import progress_bar, status
from fedcomm.rundir import RunDir
from fedcomm.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcomm.server.strategy import load_strategy_state, make_strategy, strategy_state

PERIODIC_EVAL_STRIDE = 10_000_000  # seeds apart of two periodic evaluations

POLL_S = 0.05  # seconds between polls for replies
AGENT_PHASES = ("start_s", "client_s", "restore_s", "rollout_s", "feedback_s", "update_s",
                "persist_s")


class FederationError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class FederationResult:
    run_dir: Path
    final: EvalResult
    baselines: dict[str, EvalResult]
    summary: dict
    rounds: int = 0
    metrics: list[dict] = field(default_factory=list)


def wait_for_nodes(grid: Grid, n: int, timeout: float,
                   stop: threading.Event | None = None) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if stop is not None and stop.is_set():
            raise FederationError("stopped")
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} of {n} agents' nodes connected within "
                                  f"{timeout:g} s: start a SuperNode for every agent")
        time.sleep(0.2)
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout: float,
             stop: threading.Event | None = None) -> tuple[list[Message], list[str]]:
    """Send ``messages`` and collect the replies: the good ones, and one line for each node
    that failed or did not answer within ``timeout``. ``stop`` ends the wait early."""
    ids = list(grid.push_messages(messages))
    node_of = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise FederationError("stopped")
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(POLL_S)
    good = [m for m in replies if not m.has_error()]
    failures = []
    for m in replies:
        if m.has_error():
            node = node_of.get(m.metadata.reply_to_message_id)
            reason = m.error.reason or "failed"
            # the ClientApp's own errors name the agent; the SuperLink's name nobody
            failures.append(reason if m.metadata.src_node_id == node else f"node {node}: {reason}")
    failures += [f"node {node_of[i]} did not answer within {timeout:g} s" for i in sorted(pending)]
    return good, failures


def _metric(reply: Message, key: str) -> float:
    return float(next(iter(reply.content.metric_records.values()))[key])


class Federation:
    """One run of the loop; ``resume`` continues from the run directory's checkpoint."""

    def __init__(self, grid: Grid, fed: FederationConfig, run_dir: str | Path,
                 progress: bool = True, console: Console | None = None,
                 stop: threading.Event | None = None) -> None:
        self.grid, self.fed, self.run = grid, fed, RunDir(run_dir)
        self.stop = stop
        self.spec = env_spec(fed)
        self.console = console or Console(stderr=True)
        self.progress = progress
        self.strategy = make_strategy(fed, self.spec.n_agents)
        ckpt = load_checkpoint(self.run.path)
        if ckpt is None:
            self.run.write_config({"mode": "federated", **fed.to_dict()})
            team = initial_team(fed, self.spec)
            self.arrays = ArrayRecord(shared_arrays(team, fed.aggregate_private))
            self.done, self.env_steps, self.train_time = 0, 0, 0.0
        else:
            if FederationConfig.from_dict(ckpt.config).to_dict() != fed.to_dict():
                raise FederationError(f"{self.run.path} was started with another "
                                      "configuration; resume it with its own config.json")
            self.arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in ckpt.arrays.items()})
            load_strategy_state(self.strategy, ckpt.strategy)
            self.done, self.env_steps = ckpt.round, ckpt.env_steps
            self.train_time = ckpt.train_time_s
            self.run.keep_metrics(lambda row: row.get("round", 0) <= ckpt.round)

    # -- one round --------------------------------------------------------------------------
    def _round_config(self) -> ConfigRecord:
        budget = self.fed.train.time_budget
        return ConfigRecord({CONFIG_KEY: self.fed.to_json(),
                             "time-frac": self.train_time / budget if budget else 0.0})

    def train_round(self, rnd: int) -> tuple[list[Message], list[str]]:
        messages = list(self.strategy.configure_train(rnd, self.arrays, self._round_config(),
                                                      self.grid))
        return exchange(self.grid, messages, self.fed.round_timeout, self.stop)

    def evaluate(self, nodes: list[int], episodes: int, rnd: int, seed: int = EVAL_SEED
                 ) -> EvalResult:
        """Greedy episodes played by every agent through the simulator (rounded up to whole
        episode batches); each episode's return is averaged over agents.

        The final evaluation plays the scripted baselines' seeds; the periodic ones play fresh
        seeds, so that no episode's vectors are released twice.
        """
        batches = math.ceil(episodes / self.fed.train.num_envs)
        config = ConfigRecord({CONFIG_KEY: self.fed.to_json(), "server-round": rnd,
                               "eval-batches": batches, "eval-seed": seed})
        messages = [Message(RecordDict({"arrays": self.arrays, "config": config}),
                            dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        good, failures = exchange(self.grid, messages, self.fed.round_timeout, self.stop)
        if failures or len(good) != self.spec.n_agents:
            raise FederationError("evaluation failed: " + "; ".join(failures))
        returns = torch.tensor([list(next(iter(m.content.metric_records.values()))["returns"])
                                for m in good])
        return EvalResult.of(returns.mean(dim=0))

    # -- the run ----------------------------------------------------------------------------
    def run_rounds(self, on_round: Callable[[dict], None] | None = None) -> FederationResult:
        fed, n = self.fed, self.spec.n_agents
        start = time.perf_counter()
        nodes = wait_for_nodes(self.grid, n, fed.node_timeout, self.stop)
        interval = fed.eval_interval
        failed_in_a_row, message = 0, ""
        with progress_bar(self.progress, self.console, "rounds") as bar:
            task = bar.add_task(f"federated {fed.train.env} x {n} agents", total=fed.rounds,
                                completed=self.done, status="")
            rnd = self.done + 1
            while rnd <= fed.rounds:
                nodes = wait_for_nodes(self.grid, n, fed.node_timeout, self.stop)
                t0 = time.perf_counter()
                good, failures = self.train_round(rnd)
                t1 = time.perf_counter()
                if failures:
                    message = f"round {rnd}: " + "; ".join(failures)
                    if fed.on_agent_failure == "stop":
                        raise FederationError(message)
                    self.console.print(f"[yellow]warning:[/] {message}", highlight=False)
                if not good:
                    failed_in_a_row += 1
                    if failed_in_a_row >= fed.max_failed_rounds:
                        raise FederationError(f"{failed_in_a_row} rounds in a row failed; "
                                              f"the last: {message}")
                    continue  # the same round again: nothing was aggregated
                failed_in_a_row = 0
                arrays, _ = self.strategy.aggregate_train(rnd, good)
                if arrays is not None:  # None: every agent was silent, its budget spent
                    self.arrays = arrays
                t2 = time.perf_counter()
                row = self._row(rnd, good, failures, t1 - t0, t2 - t1)
                self.train_time += t2 - t0
                if interval and rnd % interval == 0 and rnd < fed.rounds:
                    t3 = time.perf_counter()
                    row["eval_return"] = self.evaluate(
                        nodes, fed.train.eval_episodes, rnd,
                        seed=EVAL_SEED + rnd * PERIODIC_EVAL_STRIDE).return_mean
                    row["eval_s"] = time.perf_counter() - t3
                row["wall_time_s"] = time.perf_counter() - start
                t4 = time.perf_counter()
                self.run.append_metrics(row)  # before the checkpoint: a resume drops it
                save_checkpoint(self.run.path, Checkpoint(
                    rnd, {k: v.numpy() for k, v in self.arrays.items()}, fed.to_dict(),
                    strategy_state(self.strategy), self.env_steps, self.train_time))
                row["checkpoint_s"] = time.perf_counter() - t4
                self.done = rnd
                if on_round:
                    on_round(row)
                bar.update(task, completed=rnd, status=status(row))
                if fed.train.time_budget and self.train_time >= fed.train.time_budget:
                    break
                rnd += 1
        return self._finish(nodes, start)

    def _row(self, rnd: int, good: list[Message], failures: list[str], round_s: float,
             aggregate_s: float) -> dict:
        batches = max(int(_metric(m, "batches")) for m in good)  # the same for every agent
        self.env_steps += batches * self.fed.train.num_envs * self.spec.episode_length
        phases = {k: max(_metric(m, k) for m in good) for k in AGENT_PHASES}
        return {"round": rnd, "env_steps": self.env_steps,
                "agent_steps": self.env_steps * self.spec.n_agents,
                "return_mean": statistics.fmean(_metric(m, "return_mean") for m in good),
                "agents": len(good), "failures": len(failures), "round_time_s": round_s,
                "aggregate_s": aggregate_s,
                "flower_s": round_s - phases["client_s"] - phases["start_s"],
                **phases, "train_time_s": self.train_time + round_s + aggregate_s,
                "epsilon_max": max(_metric(m, "epsilon") for m in good),
                "silent_agents": sum(_metric(m, "silent_batches") > 0 for m in good),
                # every agent continued from its state of the round before
                "restored_round_min": min(_metric(m, "restored_round") for m in good)}

    def _finish(self, nodes: list[int], start: float) -> FederationResult:
        fed = self.fed
        final = self.evaluate(nodes, fed.train.eval_episodes, self.done)
        baselines = evaluate_baselines(fed.train.env, fed.train.eval_episodes, EVAL_SEED,
                                       env_kwargs=fed.train.env_kwargs)
        metrics = self.run.metrics()
        later = [m for m in metrics if m["round"] > 1]  # the first round starts the actors
        comm = {k[len("comm."):]: torch.as_tensor(v.numpy()) for k, v in self.arrays.items()
                if k.startswith("comm.")}
        strength = torch.sigmoid(comm["graph"])
        summary = {
            "env": fed.train.env, "mode": "federated", "strategy": fed.strategy,
            "final": final.to_dict(),
            **baseline_summary(final, baselines),
            "rounds": self.done, "batches_per_round": fed.batches_per_round,
            "env_steps": self.env_steps, "train_time_s": self.train_time,
            "wall_time_s": time.perf_counter() - start,
            "env_steps_per_s": self.env_steps / max(self.train_time, 1e-9),
            "agent_steps_per_s": self.env_steps * self.spec.n_agents
            / max(self.train_time, 1e-9),
            "agent_types": [t.name for t in self.spec.types],
            "route_strength": strength.tolist(),
            "kept_routes": (strength > fed.train.team.prune_threshold).tolist(),
            "round_time": {k: statistics.median(m[k] for m in later) if later else None
                           for k in ("round_time_s", "flower_s", "aggregate_s",
                                     *AGENT_PHASES)},
        }
        self.run.write_summary(summary)
        return FederationResult(self.run.path, final, baselines, summary, self.done, metrics)
