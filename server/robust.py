"""Robust aggregation of one key group, with Flower's own robust strategies.

Each key group (each part of the shared module, ``comm.encoder``, ``comm.decoder``, ...,
and with ``aggregate_private`` each type's networks, ``type.<name>``) is aggregated
over the replies that carry it by ``FederationConfig.aggregation``: ``mean`` is FedAvg's mean
weighted by environment steps; the others run Flower's ``FedMedian``, ``FedTrimmedAvg``,
``Krum``, ``MultiKrum`` or ``Bulyan`` on that group's replies alone, set to withstand
``faulty_agents`` faulty ones. What each protects in a group of n (docs/robustness.md):

* ``median`` (coordinate-wise, unweighted): n = 2 is the mean of the two, so nothing; from
  n = 3 every coordinate lies within the range of the honest agents' values while fewer than
  half are faulty.
* ``trimmed_mean``: drops the f largest and f smallest values of each coordinate (beta = f / n);
  needs n >= 2f + 1 (at n = 3, f = 1 it is the median).
* ``krum``: the one reply closest to its n - f - 2 nearest others; ``multikrum`` averages the
  n - f such replies (weighted by environment steps); both need n >= 2f + 1 here (Krum's
  guarantee needs n >= 2f + 3).
* ``bulyan``: Multi-Krum's selection, then a trimmed mean around the median; needs n >= 4f + 3
  (seven agents for f = 1).

A group of one agent is that agent's own (there is nobody to protect it from) and is averaged
as is. A group with fewer replies in a round than its rule needs (agents failed) keeps its
value from the round before. Median, trimmed mean, Krum and Bulyan ignore the weights.
In every group the update-norm bound (``max_update_norm``) is what holds where the rule cannot.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcomm.config import FederationConfig
from fedcomm.protocol.round import WEIGHT_KEY

ROBUST = ("median", "trimmed_mean", "krum", "multikrum", "bulyan")


def min_replies(rule: str, faulty: int) -> int:
    """The fewest replies in a group (of more than one agent) that ``rule`` can aggregate
    while withstanding ``faulty`` of them."""
    return {"mean": 1, "median": 1, "trimmed_mean": 2 * faulty + 1, "krum": 2 * faulty + 1,
            "multikrum": 2 * faulty + 1, "bulyan": 4 * faulty + 3}[rule]


def check_options(fed: FederationConfig, carriers: dict[str, int]) -> None:
    """Refuse robustness options that cannot do their job in this run (``ValueError``);
    ``carriers`` is how many agents carry each key group."""
    rule, f = fed.aggregation, fed.faulty_agents
    share = getattr(fed, "share", "all")
    if fed.secure_aggregation:
        _check_secure(fed)
        return
    if share != "all" and (rule != "mean" or fed.client_dp_noise > 0):
        raise ValueError(f"with share={share} the agents that carry each part of the shared "
                         "module follow from their routes, which the server does not reckon: "
                         "robust aggregation and client-level DP need share=all")
    for group, n in carriers.items():
        if n > 1 and n < min_replies(rule, f):
            raise ValueError(
                f"aggregation {rule} withstands {f} faulty agent(s) in a key group of at "
                f"least {min_replies(rule, f)}; {group} is carried by {n} agents: use median "
                "or mean with max_update_norm, or fewer faulty_agents")
    if fed.client_dp_noise > 0:
        if fed.strategy != "fedavg" or rule != "mean" or fed.aggregate_private:
            raise ValueError("client-level DP noises the mean of the shared module's clipped "
                             "updates: it needs strategy fedavg, aggregation mean and no "
                             "aggregate_private")
        if fed.max_update_norm is not None:
            raise ValueError("under client-level DP the clip bounds every update; refusing "
                             "updates by their norm (max_update_norm) would depend on the data")


def _check_secure(fed: FederationConfig) -> None:
    """Under secure aggregation the server sees each cohort's sum alone: what needs single
    updates is refused; each agent clips its own update and the server checks the sum."""
    from fedcomm.releases.cohorts import check_cohorts

    if fed.aggregation != "mean":
        raise ValueError(f"under secure_aggregation the server sees only sums, and aggregation "
                         f"{fed.aggregation} needs every agent's update: use aggregation mean "
                         "(each agent clips its update to client_dp_clip; the server checks "
                         "the sum's norm)")
    if fed.max_update_norm is not None:
        raise ValueError("under secure_aggregation the server sees no agent's update to bound "
                         "(max_update_norm): each agent clips its own to client_dp_clip")
    check_cohorts(fed)


def _strategy(rule: str, n: int, faulty: int) -> FedAvg:
    if rule == "median":
        return FedMedian()
    if rule == "trimmed_mean":
        return FedTrimmedAvg(beta=(faulty + 0.25) / n)  # int(beta * n) = faulty
    if rule == "krum":
        return Krum(num_malicious_nodes=faulty)
    if rule == "multikrum":
        return MultiKrum(num_malicious_nodes=faulty, num_nodes_to_select=n - faulty)
    return Bulyan(num_malicious_nodes=faulty)


class _Kept(ArrayRecord):
    """A group's arrays that stay as they are when a strategy reads them: Flower's Bulyan
    reads with ``keep_input=False``, which runs a full ``gc.collect()`` per reply (0.1 s each
    in a process holding torch), for copies that are dropped right after anyway."""

    def to_numpy_ndarrays(self, *, keep_input: bool = True) -> list:
        return [v.numpy() for v in self.values()]


def _message(arrays: ArrayRecord, weight: float) -> Message:
    """A reply holding one group's arrays, for a Flower strategy to aggregate."""
    metadata = Metadata(run_id=0, message_id="", src_node_id=0, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=0.0,
                        message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"arrays": _Kept(dict(arrays.items())),
                                       "metrics": MetricRecord({WEIGHT_KEY: weight})}),
                   metadata=metadata)


def reduce_group(records: list[RecordDict], weight_key: str, rule: str = "mean",
                 faulty: int = 1, carriers: int = 0) -> ArrayRecord | None:
    """One group's aggregate of ``records`` (each a group's arrays and metrics); ``None``
    where the rule cannot withstand ``faulty`` with this few replies. ``carriers`` is how
    many agents carry the group (a group of one is averaged as is)."""
    if rule == "mean" or carriers == 1:
        return aggregate_arrayrecords(records, weight_key)
    if len(records) < min_replies(rule, faulty):
        return None
    messages = [_message(next(iter(r.array_records.values())),
                         float(next(iter(r.metric_records.values()))[weight_key]))
                for r in records]
    arrays, _ = _strategy(rule, len(records), faulty).aggregate_train(0, messages)
    return arrays
