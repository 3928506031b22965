"""The round contract between the server and an agent: what each Flower message of a round holds.

The server's messages carry an ``ArrayRecord`` (``"arrays"``, the global module) and a
``ConfigRecord`` (``"config"``: a :class:`TrainInstruction` or an :class:`EvaluateInstruction`);
an agent's replies carry its arrays and a ``MetricRecord`` (``"metrics"``: a
:class:`TrainReply` or an :class:`EvaluateReply`). Each is a small dataclass with ``to_record``
and ``from_record``; the server and the agents share this module and nothing else of each other.

Array keys: ``comm.<path>`` for the shared communication module, ``type.<type name>.<path>`` for
a type's private networks (sent only when a run averages them, ``aggregate_private``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Message, MetricRecord

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # the keys of a message's records
SHARED = "comm."
TYPE = "type."
WEIGHT_KEY = "num-examples"  # what Flower's averaging weighs a reply by
AGENT_PHASES = ("start_s", "client_s", "restore_s", "rollout_s", "feedback_s", "update_s",
                "persist_s")
"""Where an agent's time in a round went: process start-up, the whole handler, restoring its
state, rolling out, the feedback exchange, the update and writing its state."""

T = TypeVar("T")


def module_arrays(shared: Mapping[str, T], private: Mapping[str, Mapping[str, T]] | None = None
                  ) -> dict[str, T]:
    """The arrays of a message: the shared module's and, per type name, that type's private
    networks (each keyed by its path in the module)."""
    out = {SHARED + k: v for k, v in shared.items()}
    for name, part in (private or {}).items():
        out |= {f"{TYPE}{name}.{k}": v for k, v in part.items()}
    return out


def shared_part(arrays: Mapping[str, T]) -> dict[str, T]:
    """The shared module's arrays, keyed by path."""
    return {k[len(SHARED):]: v for k, v in arrays.items() if k.startswith(SHARED)}


def type_part(arrays: Mapping[str, T], type_name: str) -> dict[str, T]:
    """One type's private networks, keyed by path (empty unless the run averages them)."""
    prefix = f"{TYPE}{type_name}."
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def key_group(key: str) -> str:
    """What an array is averaged with: one part of the shared module (``comm.encoder``,
    ``comm.decoder``, ...: each averaged over the agents that send it) or a type's private
    networks (``type.<name>``)."""
    head, _, rest = key.partition(".")
    return f"{head}.{rest.partition('.')[0]}"


R = TypeVar("R", bound="_Record")


@dataclass(frozen=True)
class _Record:
    """A dataclass of scalars sent as one Flower record."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def _from(cls: type[R], record: Mapping[str, Any]) -> R:
        missing = [f.name for f in fields(cls) if f.name not in record]
        if missing:
            raise ValueError(f"the {cls.__name__} lacks {', '.join(missing)}")
        return cls(**{f.name: _typed(f.type, record[f.name]) for f in fields(cls)})


def _typed(kind: Any, value: Any) -> Any:
    """A record value as the field's type (records hold ints, floats, strings and lists)."""
    kind = str(kind)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "str":
        return str(value)
    return value


@dataclass(frozen=True)
class TrainInstruction(_Record):
    """Server -> agent: train this round's episode batches from the global module.

    Parameters
    ----------
    config
        The run's ``FederationConfig`` as JSON: every agent reads the whole run from it.
    server_round
        The round; its batches are ``FederationConfig.batches_in(server_round)``.
    time_frac
        The share of the run's time budget spent (0 without one): the learning-rate schedule.
    """

    config: str
    server_round: int
    time_frac: float = 0.0

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstruction:
        return cls._from(record)


@dataclass(frozen=True)
class EvaluateInstruction(_Record):
    """Server -> agent: play ``batches`` greedy episode batches from ``seed`` on."""

    config: str
    server_round: int
    batches: int
    seed: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> EvaluateInstruction:
        return cls._from(record)


@dataclass(frozen=True)
class TrainReply(_Record):
    """Agent -> server: what one agent did in a round, beside its arrays.

    Parameters
    ----------
    agent
        The agent's index in the environment.
    env_steps
        Environment steps of the batches it trained on (0 if its budget kept it silent in all
        of them); sent as ``num-examples``, the weight of its arrays in the average.
    batches, silent_batches
        The round's episode batches, and those in which it stayed silent (budget spent).
    epsilon
        Its composed epsilon spent so far (``inf`` where a release carries no noise).
    restored_round
        The round whose end its private state continued from (0: a fresh agent).
    return_mean
        Its mean training return over the round's batches.
    timings
        Seconds per phase (``AGENT_PHASES``).
    stats
        The update's statistics, averaged over the round's batches.
    """

    agent: int
    env_steps: int
    batches: int
    silent_batches: int
    epsilon: float
    restored_round: int
    return_mean: float
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> MetricRecord:
        scalars = {k: v for k, v in self.to_dict().items() if k not in ("timings", "stats")}
        return MetricRecord({**self.stats, **self.timings, **scalars,
                             WEIGHT_KEY: self.env_steps})

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainReply:
        named = {f.name for f in fields(cls)} | {WEIGHT_KEY}
        timings = {k: float(record[k]) for k in AGENT_PHASES if k in record}
        stats = {k: float(v) for k, v in record.items() if k not in named and k not in timings}
        return cls._from({**record, "timings": timings, "stats": stats})

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        return cls.from_record(message.content[METRICS])


@dataclass(frozen=True)
class EvaluateReply(_Record):
    """Agent -> server: the agent's return in each evaluation episode."""

    agent: int
    returns: list[float]

    def to_record(self) -> MetricRecord:
        return MetricRecord({"agent": self.agent, "returns": list(self.returns),
                             WEIGHT_KEY: len(self.returns)})

    @classmethod
    def from_record(cls, record: MetricRecord) -> EvaluateReply:
        return cls(int(record["agent"]), [float(x) for x in record["returns"]])

    @classmethod
    def from_message(cls, message: Message) -> EvaluateReply:
        return cls.from_record(message.content[METRICS])
