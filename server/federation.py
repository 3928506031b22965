"""The federated training loop the ServerApp runs: rounds, failures, evaluation, checkpoints.

Per round: send the global shared module, the round's configuration and every agent's ledger
anchor to every agent, wait for their replies, screen them (``server/validation.py``),
aggregate with the configured Flower strategy, write one line of ``metrics.jsonl`` (with the
anchors the replies stated) and a checkpoint. Every agent takes part in every round, because
the joint environment needs all of them. At the end the agents play greedy evaluation episodes
through the simulator (nobody ever assembles the team), and the server compares the result with
the scripted reference teams, which it runs on its own copy of the environment. Private agents
keep their returns (``protocol.round.RELEASES``): the server then states only the baselines, and
whoever runs every party reads the result from the agents' journals.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedcomm.baselines import EVAL_SEED, EvalResult, baseline_episodes, evaluate_baselines
from fedcomm.config import FederationConfig
from fedcomm.progress import progress_bar, status
from fedcomm.protocol.round import (
    AGENT_PHASES,
    ARRAYS,
    CONFIG,
    METRICS,
    PROOF,
    EvaluateInstruction,
    TrainInstruction,
    TrainReply,
    anchors_to_json,
    identity_query,
    shared_part,
)
from fedcomm.rundir import RunDir
from fedcomm.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcomm.server.layout import ReplyLayout, initial_arrays
from fedcomm.server.messaging import FederationError, exchange, wait_for_nodes, wire_bytes
from fedcomm.server.secure import SecureAggregation
from fedcomm.server.strategy import (
    load_strategy_state,
    make_strategy,
    screen_of,
    strategy_state,
)
from fedcomm.server.waves import Wave, agents_time, identities, split, waves
from fedcomm.summary import RunResult, RunSummary

__all__ = ["Federation", "FederationError", "round_medians"]

PERIODIC_EVAL_STRIDE = 10_000_000  # seeds apart of two periodic evaluations


def round_medians(rows: list[dict]) -> dict[str, float | None]:
    """The median seconds of each part of a round over ``rows`` (``None`` for a part no row
    states: a private run's agents keep their timings)."""
    out: dict[str, float | None] = {}
    for k in ("round_time_s", "flower_s", "aggregate_s", *AGENT_PHASES):
        values = [m[k] for m in rows if k in m]
        out[k] = statistics.median(values) if values else None
    return out


def _released(replies: list[Message]) -> list[str]:
    """Every field of the replies' metrics and proof: what the agents released this round."""
    names: set[str] = set()
    for m in replies:
        for record in (METRICS, PROOF):
            names |= set(m.content.get(record, {}).keys())
    return sorted(names)


@dataclass
class RoundReplies:
    """What came back from a round's train messages."""

    messages: list[Message]  # the good replies, arrays and metrics
    replies: list[TrainReply]  # their metrics, typed
    failures: list[str]  # one line per agent that failed, did not answer or was rejected
    seconds: float
    norms: dict[str, float] = field(default_factory=dict)  # each accepted update's L2 norm
    released: list[str] = field(default_factory=list)  # every field the replies carried
    reach: float = 0.0  # Screened.reach
    median_ratio: float = 0.0  # Screened.median_ratio
    arrays: ArrayRecord | None = None  # the new global module (None: nothing to aggregate)
    aggregate_s: float = 0.0  # seconds the strategy took to screen and aggregate
    wire: dict = field(default_factory=dict)  # bytes of the round's messages; SecAgg+'s cost


def _named(reply: Message) -> str:
    """The agent a reply's proof names (not yet verified)."""
    proof = reply.content.get(PROOF)
    return str(proof.get("agent_id", "")) if proof is not None else ""


class Federation:
    """One run of the loop; ``resume`` continues from the run directory's checkpoint.

    Each round reads like Flower's ``Strategy.start``: configure and send the train messages,
    receive the replies (``train_round``), aggregate them (``aggregate``), evaluate now and
    then (``evaluate``) and record the round (``commit``: one metrics line, then the
    checkpoint).

    ``keys`` are the agents' keys shared with the server: a reply counts only under its
    agent's signature. ``local_status`` adds to the progress line what the operator of every
    party sees of round r (``fedcomm simulate``: the agents' own journals). ``capacity``: how
    many agents can run at once (a simulation's pool of ClientApps); with fewer than the run's,
    messages go out in waves of whole sites (``server.waves``).
    """

    def __init__(self, grid: Grid, fed: FederationConfig, run_dir: str | Path,
                 keys: Mapping[str, str], progress: bool = True,
                 console: Console | None = None, stop: threading.Event | None = None,
                 local_status: Callable[[int], str] | None = None,
                 capacity: int | None = None) -> None:
        self.grid, self.fed, self.run = grid, fed, RunDir(run_dir)
        self.stop, self.local_status = stop, local_status
        self.keys, self.capacity = dict(keys), capacity
        self.agent_of: dict[int, str] = {}  # each node's agent, where the run needs waves
        self.schedule: list[Wave] = []
        self.on_wave: Callable[[str], None] = lambda text: None  # the progress line's
        self.sent: dict = {}  # how the latest messages went out: waves, the slowest site
        self.spec = fed.spec
        self.console = console or Console(stderr=True)
        self.progress = progress
        initial = initial_arrays(fed)
        ckpt = load_checkpoint(self.run.path)
        try:
            self.strategy = make_strategy(fed, self.spec.n_agents, keys, initial,
                                          self.run.path, ckpt.anchors if ckpt else None)
        except ValueError as e:
            raise FederationError(str(e)) from None
        self.screen = screen_of(self.strategy)
        self.secure = (SecureAggregation(fed, ReplyLayout.of(fed, initial))
                       if fed.secure_aggregation else None)
        self.failed_in_a_row = 0
        self.started = 0  # train rounds sent over the run's life (run_dir/rounds_started.json)
        if ckpt is None:
            self.run.write_config({"mode": "federated", **fed.to_dict()})
            self.arrays = ArrayRecord(initial)
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
            self.started = max(self.run.rounds_started() or 0, self.done)
            if self.started > self.done:
                self.console.print(
                    f"round {self.done + 1} was started and not committed: what its agents "
                    "released then stays in their ledgers; it runs again on fresh episodes",
                    highlight=False)

    # -- the run ----------------------------------------------------------------------------
    def run_rounds(self, on_round: Callable[[dict], None] | None = None) -> RunResult:
        fed, n = self.fed, self.spec.n_agents
        start = time.perf_counter()
        nodes = wait_for_nodes(self.grid, n, fed.node_timeout, self.stop)
        with progress_bar(self.progress, self.console, "rounds") as bar:
            task = bar.add_task(f"federated {fed.train.env} x {n} agents", total=fed.rounds,
                                completed=self.done, status="")
            self.on_wave = lambda text: bar.update(task, status=text)
            rnd = self.done + 1
            while rnd <= fed.rounds:
                nodes = wait_for_nodes(self.grid, n, fed.node_timeout, self.stop)
                self.plan_waves(nodes)
                replies = self.train_round(rnd)
                if not replies.messages:
                    continue  # the same round again: nothing was aggregated
                row = self.aggregate(rnd, replies)
                if self.evaluates_after(rnd):
                    row |= self.evaluate_periodically(nodes, rnd)
                row["wall_time_s"] = time.perf_counter() - start
                self.commit(rnd, row)
                if on_round:
                    on_round(row)
                line = status(row)
                if self.local_status is not None:
                    line = " | ".join(t for t in (line, self.local_status(rnd)) if t)
                bar.update(task, completed=rnd, status=line)
                if fed.train.time_budget and self.train_time >= fed.train.time_budget:
                    break
                rnd += 1
        return self._finish(nodes, start)

    # -- configure, send and receive --------------------------------------------------------
    def train_round(self, rnd: int) -> RoundReplies:
        """Send the round's train messages and collect the replies. A failed agent (one that
        failed, did not answer, or replied what the server's checks refuse) stops the run or,
        with ``on_agent_failure="continue"``, is left out of the round; a round with no reply
        at all is run again, up to ``max_failed_rounds`` times in a row."""
        budget = self.fed.train.time_budget
        replays = self.started - self.done  # rounds sent before that committed nothing
        todo = TrainInstruction(self.fed.to_json(), rnd,
                                self.train_time / budget if budget else 0.0,
                                anchors_to_json(self.screen.anchors), replays)
        self.started += 1
        self.run.note_round_started(self.started)  # before any agent can release
        t0 = time.perf_counter()
        messages = list(self.strategy.configure_train(rnd, self.arrays, todo.to_record(),
                                                      self.grid))
        good, failures = self.send(messages, f"round {rnd}")
        if failures and self.fed.on_agent_failure == "stop":
            raise FederationError(f"round {rnd}: " + "; ".join(failures))
        t1 = time.perf_counter()
        # the strategy screens every reply (nothing reaches the average unless it passes) and
        # aggregates those accepted. A run that then stops on a refused reply has charged
        # client-level DP's ledgers for a mean it never released: an over-count, never under
        arrays, _ = self.strategy.aggregate_train(rnd, good)
        screened = self.screen.last
        good, failures = screened.accepted, failures + screened.rejected
        typed = [TrainReply.from_message(m) for m in good]
        wire = {"bytes_sent": sum(wire_bytes(m.content) for m in messages),
                "bytes_received": sum(wire_bytes(m.content) for m in good)}
        if self.secure is not None and good:  # the updates, summed by cohort under SecAgg+
            sums = self.secure.run(self.grid, rnd, {r.agent: m.metadata.src_node_id
                                                    for r, m in zip(typed, good)}, self.stop)
            arrays = self.strategy.aggregate_sums(rnd, sums.sums, sums.counts)
            failures += sums.failures
            wire |= {"secure_s": sums.seconds, "secure_bytes_sent": sums.bytes_sent,
                     "secure_bytes_received": sums.bytes_received, "secure_left": sums.dropped}
            if sums.dropped:
                self.console.print(f"[yellow]warning:[/] round {rnd}: left secure aggregation: "
                                   + ", ".join(sums.dropped), highlight=False)
        replies = RoundReplies(good, typed, failures, t1 - t0, screened.norms, _released(good),
                               screened.reach, screened.median_ratio, arrays,
                               time.perf_counter() - t1, wire)
        if failures:
            message = f"round {rnd}: " + "; ".join(failures)
            if self.fed.on_agent_failure == "stop":
                raise FederationError(message)
            self.console.print(f"[yellow]warning:[/] {message}", highlight=False)
            if not good:
                self.failed_in_a_row += 1
                if self.failed_in_a_row >= self.fed.max_failed_rounds:
                    raise FederationError(f"{self.failed_in_a_row} rounds in a row failed; "
                                          f"the last: {message}")
        if good:
            self.failed_in_a_row = 0
        return replies

    def plan_waves(self, nodes: list[int]) -> None:
        """Put ``nodes`` in waves of whole sites that fit ``capacity``, asking the nodes not
        met before which agent each runs; without a capacity, or room for all, one wave."""
        n, sites = self.spec.n_agents, tuple(range(self.spec.sites))
        if self.capacity is None or self.capacity >= n:
            self.schedule = [Wave(sites, tuple(nodes))]
            return
        self.agent_of = {k: a for k, a in self.agent_of.items() if k in nodes}
        queries = [identity_query(self.fed.to_json(), k) for k in nodes if k not in self.agent_of]
        good, failures = (exchange(self.grid, queries, self.fed.round_timeout, self.stop)
                          if queries else ([], []))
        try:
            if failures:
                raise ValueError("; ".join(failures))
            self.agent_of |= identities(queries, good, self.keys)
            self.schedule = waves(self.spec, self.agent_of, self.capacity)
        except ValueError as e:
            raise FederationError(f"which agent each node runs: {e}") from None

    def send(self, messages: list[Message], what: str) -> tuple[list[Message], list[str]]:
        """``messages`` sent and their replies collected wave by wave (``plan_waves``; after a
        wave with a failure, none more where a failure stops the run); the good replies and
        one line per failed node. Notes in ``sent`` how it went: the waves,
        and the slowest site (its slowest agent's seconds from its wave's start)."""
        if not self.schedule:  # a round sent without the run's loop: its nodes planned now
            self.plan_waves(sorted({m.metadata.dst_node_id for m in messages}))
        good: list[Message] = []
        failures: list[str] = []
        site_s: dict[int, float] = {}
        site_of = dict(zip(self.spec.agent_ids, self.spec.site_of_agent))
        for w, batch in enumerate(split(messages, self.schedule)):
            if len(self.schedule) > 1:
                self.on_wave(f"{what}: wave {w + 1}/{len(self.schedule)}, sites "
                             f"{len(site_s)}/{self.spec.sites} done")
            arrived: dict[int, float] = {}
            got, failed = exchange(self.grid, batch, self.fed.round_timeout, self.stop,
                                   arrived)
            good, failures = good + got, failures + failed
            if failed and self.fed.on_agent_failure == "stop":
                break  # the round will not count: the later waves release nothing for it
            named = {m.metadata.src_node_id: _named(m) for m in got}  # for progress only
            for node, seconds in arrived.items():
                site = site_of.get(self.agent_of.get(node) or named.get(node, ""))
                if site is not None:
                    site_s[site] = max(site_s.get(site, 0.0), seconds)
        self.sent = {"waves": len(self.schedule)}
        if len(self.schedule) > 1:
            self.sent["wave_sites"] = [list(w.sites) for w in self.schedule]
        if self.spec.sites > 1 and site_s:
            slowest = max(site_s, key=site_s.__getitem__)
            self.sent |= {"slowest_site": f"s{slowest}", "slowest_site_s": site_s[slowest]}
        return good, failures

    # -- aggregate ---------------------------------------------------------------------------
    def aggregate(self, rnd: int, replies: RoundReplies) -> dict:
        """Take the round's new global module; returns the round's metrics row."""
        if replies.arrays is not None:  # None: every agent was silent, its budget spent
            self.arrays = replies.arrays
        aggregate_s = replies.aggregate_s
        got = replies.replies
        self.env_steps += len(self.fed.batches_in(rnd)) * self.fed.train.batch_steps
        row = {"round": rnd, "env_steps": self.env_steps,
               "agent_steps": self.env_steps * self.spec.n_agents,
               "agents": len(got), "failures": len(replies.failures),
               "round_time_s": replies.seconds, "aggregate_s": aggregate_s,
               "train_time_s": self.train_time + replies.seconds + aggregate_s,
               "epsilon_max": max(r.epsilon for r in got),
               "silent_agents": sum(r.silent_batches > 0 for r in got),
               "silent": {self.spec.agent_ids[r.agent]: r.silent_batches for r in got
                          if r.silent_batches},
               # every agent continued from its state of the round before
               "restored_round_min": min(r.restored_round for r in got),
               "released": replies.released, **self.sent, **replies.wire,
               "ledgers": {a: list(anchor) for a, anchor in sorted(self.screen.anchors.items())}}
        if all(r.return_mean is not None for r in got):  # agents that promise no epsilon
            row["return_mean"] = statistics.fmean(r.return_mean for r in got)
        if all(r.timings for r in got):
            phases = agents_time([(self.spec.site_of_agent[r.agent], r.timings) for r in got],
                                 self.schedule)
            row |= {"flower_s": replies.seconds - phases["client_s"] - phases["start_s"],
                    **phases}
        if replies.failures:  # who was left out of the round, and why
            row["failed"] = list(replies.failures)
        norms = [v for v in replies.norms.values() if math.isfinite(v)]
        if norms:  # what max_update_norm is compared with, and the default bounds' margins
            row |= {"update_norm_max": max(norms), "update_reach_max": replies.reach,
                    "update_median_ratio_max": replies.median_ratio}
        held = getattr(self.strategy, "held", [])
        if held:  # groups too few replies for the robust rule: kept as they were
            row["held_groups"] = list(held)
        self.train_time = row["train_time_s"]
        return row

    # -- evaluate ----------------------------------------------------------------------------
    def evaluates_after(self, rnd: int) -> bool:
        interval = self.fed.eval_interval
        return bool(interval) and rnd % interval == 0 and rnd < self.fed.rounds

    def evaluate_periodically(self, nodes: list[int], rnd: int) -> dict:
        t0 = time.perf_counter()
        try:
            result = self.evaluate(nodes, self.fed.train.eval_episodes, rnd,
                                   seed=EVAL_SEED + rnd * PERIODIC_EVAL_STRIDE)
        except FederationError as e:
            self._tolerate(e)
            return {"eval_s": time.perf_counter() - t0, "eval_failed": str(e)}
        row = {"eval_s": time.perf_counter() - t0}
        return row if result is None else row | {"eval_return": result.return_mean}

    def _tolerate(self, e: FederationError) -> None:
        """Go on past a failed evaluation where the run goes on without failed agents; stop
        otherwise."""
        if self.fed.on_agent_failure == "stop":
            raise e
        self.console.print(f"[yellow]warning:[/] {e}", highlight=False)

    def evaluate(self, nodes: list[int], episodes: int, rnd: int, seed: int = EVAL_SEED
                 ) -> EvalResult | None:
        """Greedy episodes played by every agent through the simulator (rounded up to whole
        episode batches); each episode's return is averaged over agents. ``None`` where the
        agents keep their returns (private agents).

        Evaluation episodes are labelled from ``seed`` (the simulator keys each label with its
        own secret); the periodic evaluations use labels apart from the final one's, so that no
        episode's vectors are released twice.
        """
        batches = math.ceil(episodes / self.fed.train.num_envs)
        todo = EvaluateInstruction(self.fed.to_json(), rnd, batches, seed,
                                   anchors_to_json(self.screen.anchors))
        messages = [Message(RecordDict({ARRAYS: self.arrays, CONFIG: todo.to_record()}),
                            dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        good, failures = self.send(messages, "evaluation")
        problems, replies = self.screen.evaluation(messages, good,
                                                   batches * self.fed.train.num_envs)
        failures += problems
        if failures or len(replies) != self.spec.n_agents:
            raise FederationError("evaluation failed: " + "; ".join(failures))
        if any(r.returns is None for r in replies.values()):
            return None
        returns = torch.tensor([r.returns for r in replies.values()])
        return EvalResult.of(returns.mean(dim=0))

    # -- record ------------------------------------------------------------------------------
    def commit(self, rnd: int, row: dict) -> None:
        """The round's metrics line, then its checkpoint: a round is committed once its
        checkpoint is on disk (a resume drops metrics lines past it)."""
        t0 = time.perf_counter()
        self.run.append_metrics(row)
        save_checkpoint(self.run.path, Checkpoint(
            rnd, {k: v.numpy() for k, v in self.arrays.items()}, self.fed.to_dict(),
            strategy_state(self.strategy), self.env_steps, self.train_time,
            dict(self.screen.anchors)))
        row["checkpoint_s"] = time.perf_counter() - t0
        self.done = rnd

    def _finish(self, nodes: list[int], start: float) -> RunResult:
        fed = self.fed
        try:
            final = self.evaluate(nodes, fed.train.eval_episodes, self.done)
        except FederationError as e:
            self._tolerate(e)
            final = None
        baselines = evaluate_baselines(
            fed.train.env, baseline_episodes(fed.train.env, fed.train.eval_episodes,
                                             fed.train.env_kwargs),
            EVAL_SEED, env_kwargs=fed.train.env_kwargs, team=fed.train.team)
        metrics = self.run.metrics()
        later = [m for m in metrics if m["round"] > 1]  # the first round starts the actors
        if fed.share == "all":
            graph = torch.sigmoid(torch.as_tensor(shared_part(self.arrays)["graph"].numpy()))
        else:  # no global graph decides the routes: the allowed ones stay
            graph = torch.tensor(fed.train.team.allowed_routes(self.spec), dtype=torch.float32)
        silent: dict[str, int] = {}
        for m in metrics:
            for agent, n in m.get("silent", {}).items():
                silent[agent] = silent.get(agent, 0) + n
        summary = RunSummary.of(
            env=fed.train.env, mode="federated", final=final, baselines=baselines,
            env_steps=self.env_steps, train_time_s=self.train_time,
            wall_time_s=time.perf_counter() - start, n_agents=self.spec.n_agents,
            agent_types=[t.name for t in self.spec.types],
            route_strength=graph, prune_threshold=fed.train.team.prune_threshold,
            rounds=self.done, strategy=fed.strategy, batches_per_round=fed.batches_per_round,
            silent_batches=silent, round_time=round_medians(later),
            ledgers={a: list(anchor) for a, anchor in sorted(self.screen.anchors.items())})
        self.run.write_summary(summary)
        if fed.client_dp_noise > 0 and not fed.secure_aggregation:  # else the agents' ledgers
            from fedcomm.server.client_dp import report

            report(self.run.path, fed, self.console)
        return RunResult(self.run.path, summary, metrics)
