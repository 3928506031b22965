"""The round contract between the server and an agent: what each Flower message of a round holds.

The server's messages carry an ``ArrayRecord`` (``"arrays"``, the global module) and a
``ConfigRecord`` (``"config"``: a :class:`TrainInstruction` or an :class:`EvaluateInstruction`);
an agent's replies carry its arrays, a ``MetricRecord`` (``"metrics"``: a :class:`TrainReply`
or an :class:`EvaluateReply`) and a ``ConfigRecord`` (``"proof"``: a :class:`Proof`, the
anchor of its privacy ledger and the signature that binds the reply to the agent and to the
message it answers, ``protocol.signing``). Each is a small dataclass with ``to_record`` and
``from_record``; the server and the agents share this module and nothing else of each other.

What an agent may send is classified field by field (:data:`RELEASES`): a private agent (one
whose policy promises a finite epsilon) sends only counts the server already knows,
post-processing of its ledger and DP releases; its training return, losses, timings and
evaluation returns stay in its own log.

Array keys: ``comm.<path>`` for the shared communication module, ``role.<type name>.<path>`` for
a type's own copy of it (``share="role"``: averaged among the agents of that type only), and
``type.<type name>.<path>`` for a type's private networks (sent only when a run averages them,
``aggregate_private``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

ARRAYS, CONFIG, METRICS, PROOF = "arrays", "config", "metrics", "proof"  # a message's records
SHARED = "comm."
ROLE = "role."
TYPE = "type."
WEIGHT_KEY = "num-examples"  # what Flower's averaging weighs a reply by
AGENT_PHASES = ("start_s", "client_s", "restore_s", "rollout_s", "feedback_s", "update_s",
                "persist_s")
"""Where an agent's time in a round went: process start-up, the whole handler, restoring its
state, rolling out, the feedback exchange, the update and writing its state."""

T = TypeVar("T")


def module_arrays(shared: Mapping[str, T], private: Mapping[str, Mapping[str, T]] | None = None,
                  role: str | None = None) -> dict[str, T]:
    """The arrays of a message: the shared module's (with ``role``, that type's copy of it)
    and, per type name, that type's private networks (each keyed by its path in the module)."""
    out = {shared_prefix(role) + k: v for k, v in shared.items()}
    for name, part in (private or {}).items():
        out |= {f"{TYPE}{name}.{k}": v for k, v in part.items()}
    return out


def shared_part(arrays: Mapping[str, T], role: str | None = None) -> dict[str, T]:
    """The shared module's arrays (with ``role``, that type's copy), keyed by path."""
    prefix = shared_prefix(role)
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def shared_prefix(role: str | None = None) -> str:
    """The keys of the shared module: ``comm.``, or a type's copy of it, ``role.<type>.``."""
    return SHARED if role is None else f"{ROLE}{role}."


def type_part(arrays: Mapping[str, T], type_name: str) -> dict[str, T]:
    """One type's private networks, keyed by path (empty unless the run averages them)."""
    prefix = f"{TYPE}{type_name}."
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def key_group(key: str) -> str:
    """What an array is averaged with: one part of the shared module (``comm.encoder``,
    ``comm.decoder``, ...: each averaged over the agents that send it), a type's copy of it
    (``role.<name>``) or a type's private networks (``type.<name>``)."""
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


Anchors = dict[str, tuple[int, str]]
"""Per agent id, the length and last hash of its ledger as the server last recorded them."""


def anchors_to_json(anchors: Mapping[str, tuple[int, str]]) -> str:
    return json.dumps({a: [int(n), str(h)] for a, (n, h) in sorted(anchors.items())})


def anchors_from_json(text: str) -> Anchors:
    try:
        raw = json.loads(text or "{}")
        return {str(a): (int(n), str(h)) for a, (n, h) in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"the ledger anchors are malformed: {e}") from None


@dataclass(frozen=True)
class TrainInstruction(_Record):
    """Server -> agent: train this round's episode batches from the global module.

    Parameters
    ----------
    config
        The run's ``FederationConfig`` as JSON: every agent reads the whole run from it, and
        checks it against its own privacy policy first.
    server_round
        The round; its batches are ``FederationConfig.batches_in(server_round)``.
    time_frac
        The share of the run's time budget spent (0 without one): the learning-rate schedule.
    anchors
        JSON of :data:`Anchors`: every agent's ledger as the server recorded it; an agent
        whose ledger does not extend its anchor (cut or rewritten) refuses the round.
    replays
        How many rounds were started before and never committed (stopped runs, rounds run
        again): the round's batches take episode labels and ledger batch numbers past those
        of every earlier attempt (``clients.agent.batch_label``), so an episode's data is
        never released in two attempts and the releases of one never count against another.
    """

    config: str
    server_round: int
    time_frac: float = 0.0
    anchors: str = "{}"
    replays: int = 0

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstruction:
        return cls._from(record)


@dataclass(frozen=True)
class EvaluateInstruction(_Record):
    """Server -> agent: play ``batches`` greedy episode batches labelled from ``seed`` on
    (the simulator keys each label with its own secret)."""

    config: str
    server_round: int
    batches: int
    seed: int
    anchors: str = "{}"

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
        Its composed epsilon spent so far (``inf`` where a release carries no noise):
        post-processing of its ledger.
    restored_round
        The round whose end its private state continued from (0: a fresh agent).
    return_mean, timings, stats
        Its mean training return over the round's batches, seconds per phase
        (``AGENT_PHASES``) and the update's statistics averaged over the batches: functions
        of its private episodes that no mechanism covers, sent only by an agent that promises
        no finite epsilon (``None`` and empty otherwise; the agent logs them itself).
    """

    agent: int
    env_steps: int
    batches: int
    silent_batches: int
    epsilon: float
    restored_round: int
    return_mean: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> MetricRecord:
        scalars = {k: v for k, v in self.to_dict().items()
                   if k not in ("timings", "stats") and v is not None}
        return MetricRecord({**self.stats, **self.timings, **scalars,
                             WEIGHT_KEY: self.env_steps})

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainReply:
        named = {f.name for f in fields(cls)} | {WEIGHT_KEY}
        timings = {k: float(record[k]) for k in AGENT_PHASES if k in record}
        stats = {k: float(v) for k, v in record.items() if k not in named and k not in timings}
        return cls._from({"return_mean": None, **record, "timings": timings, "stats": stats})

    def withheld(self) -> TrainReply:
        """The reply without what no mechanism covers (a private agent's)."""
        return replace(self, return_mean=None, timings={}, stats={})

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        return cls.from_record(message.content[METRICS])


@dataclass(frozen=True)
class EvaluateReply(_Record):
    """Agent -> server: how many evaluation episodes the agent played and, where its policy
    promises no finite epsilon, its return in each (``None``: kept in its own log)."""

    agent: int
    episodes: int
    returns: list[float] | None = None

    def to_record(self) -> MetricRecord:
        out: dict[str, Any] = {"agent": self.agent, "episodes": self.episodes,
                               WEIGHT_KEY: self.episodes}
        if self.returns is not None:
            out["returns"] = list(self.returns)
        return MetricRecord(out)

    @classmethod
    def from_record(cls, record: MetricRecord) -> EvaluateReply:
        returns = record.get("returns")
        return cls(int(record["agent"]), int(record["episodes"]),
                   None if returns is None else [float(x) for x in returns])

    @classmethod
    def from_message(cls, message: Message) -> EvaluateReply:
        return cls.from_record(message.content[METRICS])


@dataclass(frozen=True)
class Proof(_Record):
    """Agent -> server, beside every reply: who sent it, the anchor of its privacy ledger, and
    the signature (``protocol.signing``) that binds the reply to that agent and to the message
    it answers.

    Parameters
    ----------
    agent_id
        The agent the reply speaks for; the server verifies the signature with its key.
    ledger_entries, ledger_hash
        The length and last hash of the agent's ledger after the round: the server records
        them, and an audit or a resumed run requires the ledger to extend them.
    signature
        HMAC-SHA256 with the agent's server key over the message id answered and the reply's
        content (empty until signed).
    """

    agent_id: str
    ledger_entries: int
    ledger_hash: str
    signature: str = ""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Proof:
        return cls._from(record)


Release = Literal["known", "ledger", "dp", "clear"]
"""How the server may learn a field: a count or identity it already knows (``known``),
post-processing of the agent's ledger (``ledger``), a DP release in the ledger (``dp``), or
in the clear, covered by no mechanism (``clear``)."""

RELEASES: dict[str, Release] = {
    "agent": "known", "agent_id": "known", "env_steps": "known", WEIGHT_KEY: "known",
    "batches": "known", "silent_batches": "known", "restored_round": "known",
    "episodes": "known",
    "epsilon": "ledger", "ledger_entries": "ledger", "ledger_hash": "ledger",
    "signature": "known",  # a MAC of the reply under a key the server holds: nothing new
    "return_mean": "clear", "returns": "clear", **dict.fromkeys(AGENT_PHASES, "clear"),
}
"""Every field a reply's metrics and proof may hold; any other (the update's statistics) is
``clear``."""


def release_of(name: str) -> Release:
    """How the server learns the reply field ``name`` (:data:`RELEASES`)."""
    return RELEASES.get(name, "clear")


def arrays_release(dp_sgd: bool) -> Release:
    """How the server learns an agent's arrays: post-processing of its DP-SGD steps (each in
    its ledger) where it trains under DP-SGD, in the clear otherwise."""
    return "dp" if dp_sgd else "clear"


def identity_query(config: str, node: int) -> Message:
    """Ask ``node`` which agent it runs (``config``: the run, whose ids the node maps its
    own settings to)."""
    return Message(RecordDict({CONFIG: ConfigRecord({"config": config})}),
                   dst_node_id=node, message_type=MessageType.QUERY)


def identity_reply(agent_id: str) -> RecordDict:
    """A node's answer to ``identity_query``, to be sealed with its agent's key."""
    return RecordDict({PROOF: ConfigRecord({"agent_id": agent_id})})
