"""``fedcomm simulate``: the whole federated system on one machine.

The simulator runs as its own process on loopback (``fedcomm sim serve``), the ServerApp and
one ClientApp per agent run on Flower's simulation engine (Ray). Agents are virtual clients: a
pool of actors (``actor_pool``: as many as Flower's engine runs at once, whole sites) serves
them all, each agent's state on disk between its messages; a site's agents step together, so
the ServerApp sends each round's messages in waves of whole sites that fit the pool
(``server.waves``). Memory and processes grow with the pool, not with the agents.
Everything started here is stopped here, on success, failure and Ctrl-C.

Every party's state is on this machine in a simulation, so afterwards the run directory also
gets ``team.pt``, the team assembled from the global shared module and each agent's private
state, for ``fedcomm eval``, where one team can hold them: not where agents keep their own
copies of a part that several use (``share="none"``). A deployment has no such file: the
private networks stay with their agents. For the same reason the result and the learning curve
of a private run, whose agents keep their returns from the server, are read from the agents'
own journals (``clients.journal``).

Each agent holds a privacy policy (``clients.policy``): by default exactly what the run as
given on the command line promises, so a server that sent anything less would be refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

from fedcomm.baselines import EVAL_SEED, EvalResult
from fedcomm.clients.journal import read_journal
from fedcomm.clients.node import node_config
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.clients.secure import LEDGER as CLIENT_LEDGER
from fedcomm.config import FederationConfig
from fedcomm.device import resolve_device
from fedcomm.learning.importance import communication_importance
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import TEAM_FILE
from fedcomm.modes.assemble import assemble_team, one_team_holds, save_site_teams
from fedcomm.modes.processes import SimProcess
from fedcomm.privacy.ledger import LedgerError, read_ledger
from fedcomm.protocol.auth import generate_tokens, write_tokens
from fedcomm.protocol.round import arrays_release, release_of
from fedcomm.releases.account import LEDGER
from fedcomm.releases.cohorts import codec, cohorts
from fedcomm.releases.plan import PrivacyPlan, plan_of
from fedcomm.releases.report import (
    report_summary,
    server_text,
    write_client_level_report,
    write_run_report,
)
from fedcomm.releases.schedule import (
    initial_routes,
    sends_to_server,
)
from fedcomm.rundir import RunDir
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.server.federation import FederationError, round_medians
from fedcomm.server.secure import cohort_dims
from fedcomm.server.waves import Wave, agents_time
from fedcomm.sim.base import EnvSpec
from fedcomm.sim.registry import make_env
from fedcomm.summary import RunResult


def engine_threads() -> int:
    """ClientApps Flower's simulation engine runs at once: its message workers share a thread
    pool of Python's default size, ``min(32, CPU count + 4)``
    (``flwr.server.superlink.fleet.vce.vce_api``, flwr 1.41 and 1.42)."""
    cpus = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    return min(32, cpus + 4)


def actor_pool(spec: EnvSpec, actors: int | None = None) -> int:
    """The agents a simulation runs at once, in whole sites: ``actors`` (default: as many as
    Flower's engine runs at once here, ``engine_threads``), at most every agent, at least one
    site (``ValueError`` where ``actors`` is fewer: a site's agents step together)."""
    per_site = spec.site_size
    want = engine_threads() if actors is None else actors
    if want < per_site:
        if actors is not None:
            raise ValueError(f"--actors {actors}: a site's {per_site} agents step together; "
                             f"give at least {per_site}")
        want = per_site  # more_engine_threads gives the engine room for one site
    return min(want // per_site * per_site, spec.n_agents)


@contextlib.contextmanager
def more_engine_threads(n: int) -> Iterator[None]:
    """Let Flower's simulation engine run ``n`` ClientApps at once where that is more than
    ``engine_threads``: the one adapter to Flower's internals, checked against flwr 1.41 and
    1.42 (the versions pyproject admits), and used only where one site has more agents than
    the engine runs at once on this machine (the factory's 7 on 2 cores) or ``--actors`` asks
    for more. The engine sizes its thread pool by the CPU count and offers no setting for it;
    for the run, the pool's class is given ``n`` threads."""
    if n <= engine_threads():
        yield
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.ThreadPoolExecutor
    vce_api.ThreadPoolExecutor = partial(original, max_workers=n)
    try:
        yield
    finally:
        vce_api.ThreadPoolExecutor = original


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind as KeyboardInterrupt, so everything started here is stopped
    either way; the errors Flower then logs about its dying actors are expected and dropped."""
    flower = logging.getLogger("flwr")

    def interrupt(signum: int, frame: object) -> None:
        flower.disabled = True
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        flower.disabled = False


@contextlib.contextmanager
def _quiet_flower(verbose: bool) -> Iterator[None]:
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def backend_config(pool: int, device: torch.device, verbose: bool = False) -> dict:
    """Flower's simulation backend: a pool of ``pool`` actors, each with one CPU and, on a GPU,
    an equal share of one device (fractional GPUs). Where the run is attached to a Ray cluster
    (``attach_ray``), Flower leaves Ray as it is and ``init_args`` go unused: one actor per CPU
    of the cluster."""
    gpu = device.type == "cuda"
    return {"client_resources": {"num_cpus": 1, "num_gpus": 1 / pool if gpu else 0.0},
            "init_args": {"num_cpus": pool, "num_gpus": 1 if gpu else 0,
                          "include_dashboard": False, "log_to_driver": verbose,
                          "logging_level": logging.INFO if verbose else logging.ERROR}}


def attach_ray(address: str, spec: EnvSpec, pool: int, verbose: bool) -> int:
    """Connect to the Ray cluster at ``address`` (Flower's engine then uses it as it is); the
    pool that its CPUs hold, one actor each, in whole sites (``ValueError`` where not one
    site fits)."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=verbose)
    except ConnectionError as e:
        raise ValueError(f"cannot attach to a Ray cluster at {address}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < spec.site_size:
        ray.shutdown()
        raise ValueError(f"the Ray cluster at {address} has {cpus} CPUs: a site's "
                         f"{spec.site_size} agents step together, one actor (one CPU) each")
    return min(pool, cpus // spec.site_size * spec.site_size)


def run_flower(fed: FederationConfig, run_dir: Path, sim_address: str, tokens: Path,
               keys: Path, policy: PrivacyPolicy, progress: bool, verbose: bool,
               actors: int | None = None, ray_address: str | None = None) -> RunResult:
    """The ServerApp and every agent's ClientApp (each holding ``policy``) on Flower's
    simulation engine, ``actor_pool(actors)`` of them at once; ``keys`` is the file of the
    agents' keys shared with the server."""
    import ray
    from flwr.simulation import run_simulation

    from fedcomm.clients.app import make_client_app
    from fedcomm.server.app import make_server_app

    n, pool = fed.spec.n_agents, actor_pool(fed.spec, actors)
    if ray_address is not None:
        pool = attach_ray(ray_address, fed.spec, pool, verbose)
    results: list = []
    stop = threading.Event()
    local = journal_status(run_dir, fed) if policy.private else None
    server_app = make_server_app(fed, run_dir, progress, results, stop, keys, local, pool)
    device = resolve_device(fed.train.device)
    # on a GPU, Ray sets each actor's CUDA_VISIBLE_DEVICES to its share
    defaults = node_config(sim_address=sim_address, token_file=tokens, server_key_file=keys,
                           policy=policy, state_root=run_dir / "agents",
                           device="cuda" if device.type == "cuda" else None)
    client_app = make_client_app(defaults)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the actors: one thread per agent
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs are asked for
    backend = backend_config(pool, device, verbose)
    try:
        with more_engine_threads(pool), _quiet_flower(verbose):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                           backend_config=backend, verbose_logging=verbose)
    finally:
        stop.set()
        if ray.is_initialized():
            ray.shutdown()
    if not results:
        raise FederationError("the ServerApp ended without a result; rerun with --verbose")
    if isinstance(results[0], FederationError):
        raise results[0]
    return results[0]


def agent_journals(run_dir: Path, fed: FederationConfig) -> dict[str, list[dict]]:
    """Every agent's journal, by agent id (all of them on this machine)."""
    return {a: read_journal(run_dir / "agents" / a) for a in fed.spec.agent_ids}


def journal_status(run_dir: Path, fed: FederationConfig) -> Callable[[int], str]:
    """Round r's mean training return over the agents, from their journals: what the operator
    of every party sees where the server sees no return."""
    def status(rnd: int) -> str:
        rows = [r for rows in agent_journals(run_dir, fed).values() for r in rows
                if r["kind"] == "train" and r["round"] == rnd]
        if len(rows) != fed.spec.n_agents:
            return ""
        return f"return {statistics.fmean(r['return_mean'] for r in rows):.2f} (journals)"

    return status


def operator_view(metrics: list[dict], journals: dict[str, list[dict]],
                  final_round: int, spec: EnvSpec | None = None
                  ) -> tuple[list[dict], EvalResult | None]:
    """The server's metrics rows completed from the agents' journals (each round's mean
    training return, periodic evaluation and the agents' phases, where the server has none;
    a round in waves needs the run's ``spec`` for its agents' sites), and the final evaluation
    the journals hold (``None`` if an agent's is missing)."""
    rows = []
    for row in metrics:
        rnd, row = row["round"], dict(row)
        train = [r for j in journals.values() for r in j
                 if r["kind"] == "train" and r["round"] == rnd]
        if "return_mean" not in row and len(train) == len(journals):
            row["return_mean"] = statistics.fmean(r["return_mean"] for r in train)
        if "client_s" not in row and len(train) == len(journals):
            site = dict(zip(spec.agent_ids, spec.site_of_agent)) if spec else {}
            schedule = [Wave(tuple(sites), ()) for sites in row.get("wave_sites", [])]
            phases = agents_time([(site.get(a, 0), r) for a, j in journals.items() for r in j
                                  if r["kind"] == "train" and r["round"] == rnd], schedule)
            row |= {**phases, "flower_s": row["round_time_s"] - phases["client_s"]
                    - phases["start_s"]}
        periodic = [r["returns"] for j in journals.values() for r in j
                    if r["kind"] == "evaluate" and r["round"] == rnd and r["seed"] != EVAL_SEED]
        if "eval_s" in row and "eval_return" not in row and len(periodic) == len(journals):
            row["eval_return"] = float(torch.tensor(periodic).mean())
        rows.append(row)
    final = [r["returns"] for j in journals.values() for r in j
             if r["kind"] == "evaluate" and r["round"] == final_round and r["seed"] == EVAL_SEED]
    if len(final) != len(journals) or len({len(r) for r in final}) != 1:
        return rows, None
    return rows, EvalResult.of(torch.tensor(final).mean(dim=0))


def complete_run(run_dir: Path, fed: FederationConfig) -> RunResult:
    """Finish a run whose rounds are done, with every agent's state on this machine (a
    simulation, or a deployment on one host): the result and learning curve completed from
    the agents' journals where they kept them from the server, the team for ``fedcomm eval``,
    communication importance, the privacy report from every agent's ledger."""
    run = RunDir(run_dir)
    summary = run.summary()
    metrics, final = operator_view(run.metrics(), agent_journals(run_dir, fed),
                                   summary.rounds or 0, fed.spec)
    if summary.final is None:
        summary = summary.with_final(final)
        summary.round_time = round_medians([m for m in metrics if m["round"] > 1])
    if one_team_holds(fed):  # else the agents' own evaluation (summary.json) is the team's
        team = assemble_team(run_dir, fed)
        team.save(run.path / TEAM_FILE)
        env = make_env(fed.train.env, 256, **fed.train.env_kwargs)
        batch = collect(team, LocalTransport(env), seed=EVAL_SEED, greedy=True)
        summary.importance = communication_importance(team, batch).tolist()
    save_site_teams(run_dir, fed)  # for cross-play (fedcomm eval --cross-play)
    ledgers = {a: run_dir / "agents" / a / LEDGER for a in fed.spec.agent_ids}
    report = write_run_report(run_dir, fed.to_dict(), fed.train.team, fed.train.privacy,
                              ledgers, ppo=fed.train.ppo,
                              extra={"silent_batches": summary.silent_batches or {},
                                     "utility": summary.utility(),
                                     "released": released_fields(run.metrics(), fed),
                                     "aggregated": server_text(fed)})
    summary.privacy = report_summary(report)
    if fed.secure_aggregation and fed.client_dp_noise > 0:  # the agents' own client-level ledgers
        releases = [codec(fed, len(c), d).release()
                    for c, d in zip(cohorts(fed), cohort_dims(fed), strict=True)]
        client = write_client_level_report(run_dir, fed, {
            a: run_dir / "agents" / a / CLIENT_LEDGER for a in fed.spec.agent_ids}, releases)
        summary.privacy["client_level"] = {
            "epsilon": report_summary(client)["composed"], "delta": fed.train.privacy.delta}
    summary.aggregated = server_text(fed)
    run.write_summary(summary)
    from fedcomm.plots import curve_title, learning_curve

    learning_curve(metrics, summary, run_dir / "learning_curve.png",
                   curve_title(fed.train.env, "federated", fed.train.team, summary.privacy,
                               server_text(fed)))
    return RunResult(run_dir, summary, metrics)


def released_fields(metrics: list[dict], fed: FederationConfig) -> dict[str, str]:
    """Every field the agents' replies carried to the server over the run (as the server
    recorded them), and how the server learns it (``protocol.round.RELEASES``); ``arrays``
    where any agent sends parts of its networks."""
    fields = {name for row in metrics for name in row.get("released", [])}
    out: dict[str, str] = {name: release_of(name) for name in sorted(fields)}
    routes = initial_routes(fed.train)
    if any(sends_to_server(fed.spec, fed.share, fed.aggregate_private, routes, i)
           for i in range(fed.spec.n_agents)):
        out["arrays"] = arrays_release(fed.train.privacy.update_noise_multiplier is not None)
    return out


def check_ledgers_extend(run_dir: Path, fed: FederationConfig) -> None:
    """Refuse (``ValueError``, one line) to resume a run whose agents' ledgers do not extend
    what the server recorded of them in its checkpoint: a cut or rewritten ledger would let
    an agent's budget forget what it spent."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        return
    for agent in fed.spec.agent_ids:
        entries, last = ckpt.anchors.get(agent, (0, ""))
        path = run_dir / "agents" / agent / LEDGER
        if not path.exists():
            if entries:
                raise ValueError(f"cannot resume: {agent}'s ledger {path} is gone; the server "
                                 f"recorded {entries} entries of it")
            continue
        try:
            held = read_ledger(path)
        except LedgerError as e:
            raise ValueError(f"cannot resume: {e}") from None
        if len(held) < entries or (entries and held[entries - 1]["hash"] != last):
            raise ValueError(f"cannot resume: {agent}'s ledger {path} holds {len(held)} "
                             f"entries and does not extend the {entries} the server recorded "
                             "(cut or rewritten); restore it")


def simulate(fed: FederationConfig, out: str | Path, progress: bool = True,
             verbose: bool = False, policy: PrivacyPolicy | None = None,
             plan: PrivacyPlan | None = None, actors: int | None = None,
             ray_address: str | None = None, sim_host: str = "127.0.0.1") -> RunResult:
    """Run (or, if ``out`` holds a checkpoint, continue) a federated simulation whose agents
    hold ``policy`` (default: what ``fed`` promises), ``actors`` at once (``actor_pool``), on
    this machine or attached to the Ray cluster at ``ray_address`` (whose actors reach the
    simulator at ``sim_host``, and the run directory at its path); a run that cannot fit its
    privacy budget (its ``plan``, made here if not given), or whose ledgers do not extend the
    checkpoint's record, is refused (``ValueError``) before anything starts."""
    if plan is None:  # the caller has not planned the run: refused here if it cannot fit
        plan_of(fed)
    actor_pool(fed.spec, actors)  # refused here: too few actors for a site
    run_dir = Path(out)
    check_ledgers_extend(run_dir, fed)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens, keys = run_dir / "tokens.json", run_dir / "agent-keys.json"
    for path in (tokens, keys):
        if not path.exists():
            write_tokens(path, generate_tokens(fed.spec.agent_ids))
    with terminate_as_interrupt(), SimProcess(fed, tokens, run_dir / "sim.log",
                                              sim_host) as sim:
        run_flower(fed, run_dir, sim.address, tokens, keys, policy or PrivacyPolicy.of_run(fed),
                   progress, verbose, actors, ray_address)
    return complete_run(run_dir, fed)
