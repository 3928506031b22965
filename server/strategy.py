"""The Flower strategies that aggregate the shared module, and what of them a checkpoint keeps.

Agents reply with their copy of the shared module (keys ``comm.*``) and, with
``aggregate_private``, their type's private networks (keys ``type.<name>.*``). Each group of keys
is averaged over the replies that carry it, weighted by environment steps, with Flower's own
``aggregate_arrayrecords``; FedAvgM and FedAdam then apply their server-side step to the result.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcomm.config import FederationConfig
from fedcomm.protocol.round import WEIGHT_KEY, key_group

STATE_ATTRS = ("m_t", "v_t", "momentum_vector")  # FedAdam's moments, FedAvgM's momentum


def aggregate_by_group(contents: list[RecordDict], weight_key: str) -> ArrayRecord:
    """Average each key group over the replies that carry it (a silent agent's reply, whose
    budget allowed no training, carries none)."""
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
    for records in groups.values():
        for key, value in aggregate_arrayrecords(records, weight_key).items():
            merged[key] = value
    return merged


class GroupedFedAvg(FedAvg):
    """FedAvg over key groups; agents of different types may reply with different keys."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        merged = aggregate_by_group(contents, self.weighted_by_key)
        if not merged:
            return None, None
        return (merged,
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))


class GroupedFedAvgM(FedAvgM, GroupedFedAvg):
    """FedAvgM whose averaging step is ``GroupedFedAvg``'s."""


class GroupedFedAdam(FedAdam, GroupedFedAvg):
    """FedAdam whose averaging step is ``GroupedFedAvg``'s."""


def make_strategy(fed: FederationConfig, n_agents: int) -> FedAvg:
    """The configured strategy; every agent trains in every round."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": n_agents,
              "min_available_nodes": n_agents, "weighted_by_key": WEIGHT_KEY}
    if fed.strategy == "fedavgm":
        return GroupedFedAvgM(server_learning_rate=fed.server_lr,
                              server_momentum=fed.server_momentum, **common)
    if fed.strategy == "fedadam":
        return GroupedFedAdam(eta=fed.server_lr, eta_l=fed.train.ppo.lr, **common)
    return GroupedFedAvg(**common)


def strategy_state(strategy: FedAvg) -> dict:
    """The server-side optimizer state a resumed run needs (none for FedAvg)."""
    out: dict = {}
    for name in STATE_ATTRS:
        value = getattr(strategy, name, None)
        if value is not None:
            out[name] = ({k: np.asarray(v) for k, v in value.items()} if isinstance(value, dict)
                         else [np.asarray(v) for v in value])
    return out


def load_strategy_state(strategy: FedAvg, state: dict) -> None:
    for name, value in state.items():
        if name not in STATE_ATTRS or not hasattr(strategy, name):
            raise ValueError(f"the checkpoint's strategy state {name!r} does not fit "
                             f"{type(strategy).__name__}")
        setattr(strategy, name, value)
