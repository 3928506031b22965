"""The Flower strategies that aggregate the shared module, and what of them a checkpoint keeps.

Agents reply with the parts of the shared module they send (keys ``comm.*``) and, with
``aggregate_private``, their type's private networks (keys ``type.<name>.*``). Every reply is
checked and reweighed by the server's reply screen first (``server/validation.py``), once, in
the strategy's ``aggregate_train``, whose outcome the round loop reads from the screen; then
each group of keys is aggregated over the replies that carry it: by default averaged, weighted
by environment steps, with Flower's own ``aggregate_arrayrecords``, or by one of Flower's
robust strategies (``server/robust.py``). A group no reply carries keeps the global module's
value. Flower's FedAvgM or FedAdam then applies its server-side step to the result, handed to
it as the round's one reply (checked against flwr 1.41 and 1.42: its FedAvg leaves a single
reply as it is); client-level DP (``server/client_dp.py``) wraps the whole in Flower's
server-side fixed clipping. Under secure aggregation the replies carry no arrays: the round
loop hands the cohorts' sums (``server/secure.py``) to ``aggregate_sums``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy

from fedcomm.config import FederationConfig
from fedcomm.protocol.round import ARRAYS, METRICS, WEIGHT_KEY, Anchors, key_group
from fedcomm.server.layout import ReplyLayout, initial_arrays
from fedcomm.server.robust import check_options, reduce_group
from fedcomm.server.validation import ReplyScreen

STATE_ATTRS = ("m_t", "v_t", "momentum_vector")  # FedAdam's moments, FedAvgM's momentum


def aggregate_by_group(contents: list[RecordDict], weight_key: str, rule: str = "mean",
                       faulty: int = 1, carriers: dict[str, int] | None = None,
                       held: list[str] | None = None) -> ArrayRecord:
    """Aggregate each key group over the replies that carry it (a silent agent's reply, whose
    budget allowed no training, carries none) by ``rule``; a group the rule cannot aggregate
    with this few replies is left out and named in ``held``."""
    groups: dict[str, list[RecordDict]] = {}
    for content in contents:
        arrays = next(iter(content.array_records.values()), ArrayRecord())
        metrics = next(iter(content.metric_records.values()))
        split: dict[str, dict] = {}
        for key, value in arrays.items():
            split.setdefault(key_group(key), {})[key] = value
        for group, part in split.items():
            groups.setdefault(group, []).append(
                RecordDict({"arrays": ArrayRecord(part), "metrics": metrics}))
    merged = ArrayRecord()
    for group, records in groups.items():
        out = reduce_group(records, weight_key, rule, faulty, (carriers or {}).get(group, 0))
        if out is None:
            if held is not None:
                held.append(group)
            continue
        for key, value in out.items():
            merged[key] = value
    return merged


class GroupedFedAvg(FedAvg):
    """FedAvg over key groups (agents of different types may reply with different keys), and,
    where the run asks for one, the server step of Flower's FedAvgM or FedAdam on the result.

    Parameters
    ----------
    screen
        Checks and reweighs every reply before it is aggregated.
    rule, faulty
        Each group's aggregation (``server.robust``) and the faulty replies it withstands.
    carriers
        How many agents carry each key group.
    server_step
        Flower's FedAvgM or FedAdam: it sends the round's messages (so it knows the global
        module it steps from) and is handed the grouped average as the round's one reply
        (``aggregate_accepted``), which its own FedAvg leaves as it is; ``None``: FedAvg.
    fedavg
        Flower's ``FedAvg`` options.
    """

    def __init__(self, screen: ReplyScreen, rule: str = "mean", faulty: int = 1,
                 carriers: dict[str, int] | None = None, server_step: FedAvg | None = None,
                 **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.screen, self.rule, self.faulty = screen, rule, faulty
        self.carriers = carriers or {}
        self.server_step = server_step
        self.held: list[str] = []  # the groups the last round left as they were

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        sender = self.server_step or super()
        messages = list(sender.configure_train(server_round, arrays, config, grid))
        self.screen.configure(arrays, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen.screen(server_round, [m for m in replies if not m.has_error()])
        return self.aggregate_accepted(server_round, accepted.accepted)

    def aggregate_accepted(self, server_round: int, accepted: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global module from replies the screen accepted: each key group's
        aggregate, a group nobody updated as it was, then the server step."""
        self.held = []
        if not accepted:
            return None, None
        contents = [m.content for m in accepted]
        merged = aggregate_by_group(contents, self.weighted_by_key, self.rule, self.faulty,
                                    self.carriers, self.held)
        if not merged:
            return None, None
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return self.stepped(server_round, merged), metrics

    def aggregate_sums(self, server_round: int, sums: Mapping[str, np.ndarray],
                       counts: Mapping[str, int]) -> ArrayRecord | None:
        """The new global module from secure aggregation's sums of updates (``server.secure``):
        each key's mean update added to the module sent, then the server step."""
        if not sums:
            return None
        merged = ArrayRecord()
        for key, total in sums.items():
            sent = self.screen.sent[key].numpy()
            merged[key] = Array(np.asarray(sent + total / counts[key], dtype=sent.dtype))
        return self.stepped(server_round, merged)

    def stepped(self, server_round: int, merged: ArrayRecord) -> ArrayRecord | None:
        """``merged`` with every key of the global module (a group nobody updated keeps its
        value), after the server step."""
        merged = ArrayRecord({k: merged.get(k, v) for k, v in self.screen.sent.items()})
        if self.server_step is None:
            return merged
        average = Message(RecordDict({ARRAYS: merged,
                                      METRICS: MetricRecord({self.weighted_by_key: 1})}),
                          reply_to=self.screen.messages[0])
        stepped, _ = self.server_step.aggregate_train(server_round, [average])
        if stepped is None:
            return None
        # Flower's FedAdam computes in float64 under NumPy 2: the module keeps its own dtypes
        return ArrayRecord({k: Array(v.numpy().astype(merged[k].numpy().dtype))
                            for k, v in stepped.items()})


def make_strategy(fed: FederationConfig, n_agents: int, keys: Mapping[str, str],
                  arrays: dict[str, object] | None = None,
                  run_dir: str | Path | None = None,
                  anchors: Anchors | None = None) -> Strategy:
    """The configured strategy, screening every reply; every agent trains in every round.

    ``keys`` are the agents' keys shared with the server (each reply is verified under its
    agent's); ``arrays`` is the run's initial global module (built from the models if not
    given); ``run_dir`` is where client-level DP keeps its ledgers (needed with
    ``client_dp_noise``); ``anchors`` the ledger anchors recorded so far. Options that cannot
    work in this run raise ``ValueError``.
    """
    layout = ReplyLayout.of(fed, arrays if arrays is not None else initial_arrays(fed))
    check_options(fed, layout.carriers())
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": n_agents,
              "min_available_nodes": n_agents, "weighted_by_key": WEIGHT_KEY}
    server_step: FedAvg | None = None
    if fed.strategy == "fedavgm":
        server_step = FedAvgM(server_learning_rate=fed.server_lr,
                              server_momentum=fed.server_momentum, **common)
    elif fed.strategy == "fedadam":
        server_step = FedAdam(eta=fed.server_lr, eta_l=fed.train.ppo.lr, **common)
    private = fed.client_dp_noise > 0 and not fed.secure_aggregation  # else the agents' noise
    uniform = fed.client_dp_noise > 0 or fed.secure_aggregation
    strategy = GroupedFedAvg(ReplyScreen(fed, layout, keys, uniform=uniform, anchors=anchors),
                             fed.aggregation, fed.faulty_agents, layout.carriers(),
                             server_step, **common)
    if not private:
        return strategy
    if run_dir is None:
        raise ValueError("client-level DP needs the run directory for its ledgers")
    from fedcomm.server.client_dp import ClientLevelDP

    return ClientLevelDP(strategy, fed, run_dir)


def screen_of(strategy: Strategy) -> ReplyScreen:
    """The reply screen of a strategy ``make_strategy`` built."""
    screen = getattr(strategy, "screen", None)
    if screen is None:
        raise TypeError(f"{type(strategy).__name__} screens no replies")
    return screen


def strategy_state(strategy: Strategy) -> dict:
    """The server-side optimizer state a resumed run needs (none for FedAvg)."""
    step = _server_step(strategy)
    out: dict = {}
    for name in STATE_ATTRS:
        value = getattr(step, name, None)
        if value is not None:
            out[name] = ({k: np.asarray(v) for k, v in value.items()} if isinstance(value, dict)
                         else [np.asarray(v) for v in value])
    return out


def load_strategy_state(strategy: Strategy, state: dict) -> None:
    step = _server_step(strategy)
    for name, value in state.items():
        if name not in STATE_ATTRS or step is None or not hasattr(step, name):
            raise ValueError(f"the checkpoint's strategy state {name!r} does not fit "
                             f"{type(step or strategy).__name__}")
        setattr(step, name, value)


def _server_step(strategy: Strategy) -> FedAvg | None:
    """The FedAvgM or FedAdam whose state a checkpoint keeps (inside client-level DP too)."""
    grouped = getattr(strategy, "strategy", strategy)  # Flower's DP wrapper holds the inner one
    return getattr(grouped, "server_step", None)
