"""Secure aggregation on the server: Flower's SecAgg+ workflow, stage by stage, per cohort.

Under ``secure_aggregation`` an agent's train reply carries no arrays: its update waits,
encoded, in its node (``clients.secure``). After the round's replies are screened, the server
runs SecAgg+ with each cohort (``releases.cohorts``: the agents that send the same arrays) and
learns the cohort's sum, and nothing of any one agent's update: with the reconstruction
threshold ``t`` (two thirds of the cohort), the masks of agents that drop out after sending
their masked input are removed with the others' shares, and a sum is unmasked only with ``t``
agents' inputs in it, so the noise the agents added for ``t`` is always in it.

Flower's ``SecAggPlusWorkflow`` (flwr 1.42.0) is written for the legacy ``LegacyContext``
round; its four stage methods (``setup_stage``, ``share_keys_stage``,
``collect_masked_vectors_stage``, ``unmask_stage``) are called here as shipped, with their own
protocol, cryptography and quantization, in a legacy context of one cohort: its ``Strategy``
names the cohort's nodes and receives the unmasked result (``_Cohort``), and its grid sends
each stage's messages with the round loop's ``exchange`` (``_StageGrid``). The result is the
cohort's mean of the encoded inputs, which ``SkellamCodec.decode`` turns back into the sum
of the updates; a sum longer than its cohort's honest inputs can be (``sum_bound``) is refused.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedcomm.config import FederationConfig
from fedcomm.privacy.skellam import SkellamCodec
from fedcomm.protocol.secure import MAX_WEIGHT, MODULUS, ROUND
from fedcomm.releases.cohorts import codec, cohorts
from fedcomm.server.layout import ReplyLayout, initial_arrays
from fedcomm.server.messaging import exchange, wire_bytes


@dataclass
class SecureSums:
    """What a round's secure aggregation gave the server: per key, the sum of the updates and
    how many agents' inputs it holds; one line per cohort that gave nothing; and its cost."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # agents that left, in the sum or not
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


class _StageGrid:
    """The grid as a SecAgg+ stage uses it: ``send_and_receive`` by the round loop's
    ``exchange``, each message marked with the round whose inputs it sums, every byte
    counted."""

    def __init__(self, grid: Grid, server_round: int, timeout: float,
                 stop: threading.Event | None) -> None:
        self.grid, self.round, self.timeout, self.stop = grid, server_round, timeout, stop
        self.sent = self.received = 0
        self.failures: list[str] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        for msg in messages:  # a stage sends one content to many nodes: each its own copy
            msg.content = copy.deepcopy(msg.content)
            msg.content.config_records[ROUND] = ConfigRecord({"round": self.round})
            self.sent += wire_bytes(msg.content)
        good, failures = exchange(self.grid, messages, self.timeout, self.stop)
        self.received += sum(wire_bytes(m.content) for m in good)
        self.failures += failures
        return good


class _Cohort(Strategy):
    """The legacy strategy of one cohort's SecAgg+: it names the cohort's nodes and keeps the
    unmasked result; nothing else of a legacy round is used."""

    def __init__(self, nodes: Sequence[int], grid: Grid) -> None:
        self.nodes, self.grid = list(nodes), grid
        self.result: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, self.grid, 0), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        parameters = results[0][1].parameters  # every result holds the unmasked aggregate
        self.result = parameters_to_ndarrays(parameters)
        return parameters, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def cohort_dims(fed: FederationConfig) -> list[int]:
    """Each cohort's coordinates (``releases.cohorts.cohorts`` order): what one agent's update
    of it holds."""
    return SecureAggregation(fed, ReplyLayout.of(fed, initial_arrays(fed))).dims


class SecureAggregation:
    """The run's cohorts and the arrays of each, and their SecAgg+ every round."""

    def __init__(self, fed: FederationConfig, layout: ReplyLayout) -> None:
        self.fed = fed
        self.cohorts = cohorts(fed)
        self.arrays = [{k: layout.agents[c[0]][k].shape for k in sorted(layout.agents[c[0]])}
                       for c in self.cohorts]
        self.dims = [sum(math.prod(s) for s in shapes.values()) for shapes in self.arrays]

    def run(self, grid: Grid, server_round: int, node_of: dict[int, int],
            stop: threading.Event | None = None) -> SecureSums:
        """SecAgg+ with the nodes of every cohort's agents in ``node_of`` (agent index ->
        node: those whose train reply was accepted)."""
        out, t0 = SecureSums(), time.perf_counter()
        for cohort, shapes, dim in zip(self.cohorts, self.arrays, self.dims, strict=True):
            nodes = [node_of[a] for a in cohort if a in node_of]
            encoding = codec(self.fed, len(cohort), dim)
            who = f"cohort of {self.fed.spec.agent_ids[cohort[0]]} ({len(cohort)} agents)"
            if len(nodes) < encoding.threshold:
                out.failures.append(f"{who}: {len(nodes)} agents replied, SecAgg+ unmasks "
                                    f"{encoding.threshold} or more; its arrays keep their value")
                continue
            stage_grid = _StageGrid(grid, server_round, self.fed.round_timeout, stop)
            try:
                result, summed, left = _secagg(stage_grid, server_round, nodes, encoding)
            except Exception as e:  # a reply Flower's stages cannot use (a faulty agent's)
                stage_grid.failures.append(f"{type(e).__name__}: {e}")
                result, summed, left = None, set(), []
            count = len(summed)
            out.bytes_sent += stage_grid.sent
            out.bytes_received += stage_grid.received
            agent_of = {n: self.fed.spec.agent_ids[a] for a, n in node_of.items()}
            out.dropped += [f"{agent_of[n]} ({'in' if n in summed else 'not in'} the sum)"
                            for n in left]
            if result is None:
                out.failures.append(f"{who}: SecAgg+ did not complete ("
                                    + ("; ".join(stage_grid.failures) or "too few agents")
                                    + "); its arrays keep their value")
                continue
            total = encoding.decode(result, count)
            norm, bound = float(np.linalg.norm(total)), encoding.sum_bound(count)
            if not norm <= bound:
                out.failures.append(f"{who}: the unmasked sum's norm {norm:.4g} exceeds what "
                                    f"{count} agents' clipped updates and noise reach "
                                    f"({bound:.4g}); its arrays keep their value")
                continue
            offset = 0
            for key, shape in shapes.items():
                size = math.prod(shape)
                part = total[offset:offset + size].reshape(shape)
                offset += size
                out.sums[key] = out.sums.get(key, 0.0) + part
                out.counts[key] = out.counts.get(key, 0) + count
        out.seconds = time.perf_counter() - t0
        return out


def _secagg(grid: _StageGrid, server_round: int, nodes: list[int], encoding: SkellamCodec
            ) -> tuple[np.ndarray | None, set[int], list[int]]:
    """Flower's four SecAgg+ stages with ``nodes``: the unmasked mean of their inputs (or
    ``None``), the nodes whose inputs it holds, and the nodes that left before the end (those
    in the sum sent their masked input first; their masks are removed with the others'
    shares)."""
    workflow = SecAggPlusWorkflow(  # every node shares with every other (num_shares 1.0)
        num_shares=1.0, reconstruction_threshold=encoding.threshold,
        max_weight=MAX_WEIGHT, clipping_range=encoding.clipping_range,
        quantization_range=encoding.target_range, modulus_range=MODULUS)
    strategy = _Cohort(nodes, grid.grid)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {"current_round": server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    state = WorkflowState()
    if not workflow.setup_stage(grid, context, state):
        return None, set(), []
    # the agents hold the global module already: the third stage carries only key shares
    state.nid_to_fitins = {n: RecordDict() for n in state.nid_to_fitins}
    if not workflow.share_keys_stage(grid, context, state):
        return None, set(), []
    # a node lost before its shares went out is in nobody's masks: the round goes on without
    # it (Flower's stages would ask for shares of its secrets, which nobody holds)
    state.sampled_node_ids = set(state.active_node_ids)
    for nid in state.nid_to_neighbours:
        state.nid_to_neighbours[nid] &= state.sampled_node_ids
    if not workflow.collect_masked_vectors_stage(grid, context, state):
        return None, set(), []
    summed = set(state.active_node_ids)
    if not workflow.unmask_stage(grid, context, state) or strategy.result is None:
        return None, set(), []
    return strategy.result[0], summed, sorted(set(nodes) - state.active_node_ids)
