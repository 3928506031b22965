"""The flags that set a run's configuration, each declared once (``Flag``): its names, the
field's dotted path, the values it accepts (``Number``) and its metavar; and the parser that
refuses a bad value in one line naming the flag (``Parser``, ``FlagError``). How the flags
become a configuration is ``commands/options.py``.
"""


from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape

from fedcomm.commands.output import console
from fedcomm.config import AGGREGATIONS, SHARES, STRATEGIES

TRAIN, FED = "train:", "fed:"  # where a flag's field lives: TrainConfig, FederationConfig


class Parser(argparse.ArgumentParser):
    """fedcomm's parsers. A refused value is one line, ``error: argument --flag: ...``, exit
    code 2; an unknown or missing argument shows the usage of the (sub)command it was given to
    first, not fedcomm's, with the closest flag it has."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        # A subcommand's parser hands what it does not know back up to fedcomm's, which would
        # refuse it with its own usage; refused here, the usage is the subcommand's.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._closest(extras)}")
        return namespace, extras

    def _closest(self, extras: list[str]) -> str:
        known = [s for a in self._actions for s in a.option_strings]
        for extra in extras:
            close = difflib.get_close_matches(extra.partition("=")[0], known, n=1, cutoff=0.8)
            if extra.startswith("-") and close:
                return f" (did you mean {close[0]}?)"
        return ""

    def error(self, message: str) -> None:  # type: ignore[override]
        if not message.startswith("argument "):  # unknown, missing: what the command takes
            self.print_usage(sys.stderr)
        console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
        self.exit(2)


class FlagError(ValueError):
    """A value refused after parsing (by the preset, the environment, another flag): printed as
    ``error: argument FLAG: MESSAGE``, as the parser prints a value it refuses."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"argument {flag}: {message}")


@dataclass(frozen=True)
class Number:
    """What a numeric flag accepts: an integer or a finite number within bounds (``inf`` only
    where it means something), said in words when refused."""

    integer: bool = False
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # ``low`` itself refused
    high_open: bool = False
    inf: bool = False  # ``inf`` accepted too

    def __call__(self, text: str) -> int | float:
        try:
            number = float(text)
            if not self.integer:
                value: int | float = number
            elif re.fullmatch(r"\s*[-+]?[\d_]+\s*", text):
                value = int(text)
            elif math.isfinite(number) and number.is_integer():  # 1e6
                value = int(number)
            else:
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self}, got {text!r}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self}, got {text!r}")
        return value

    def accepts(self, value: float) -> bool:
        if value == math.inf and self.inf:
            return True
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low, high = math.isfinite(self.low), math.isfinite(self.high)
        if low and high and self.integer:
            text = f"{kind} from {self.low:g} to {self.high:.0f}"
        elif low and high:
            text = (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        elif low:
            kind = kind if self.integer or self.inf else "a finite number"
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif high:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = kind
        return text + (", or inf" if self.inf else "")


COUNT = Number(integer=True, low=1)  # environments, steps, episodes, rounds, layers
NONNEGATIVE_INT = Number(integer=True, low=0)
SEED = Number(integer=True, low=0, high=2**32 - 1)
POSITIVE = Number(low=0, low_open=True)
NONNEGATIVE = Number(low=0)
FRACTION = Number(low=0, high=1, low_open=True, high_open=True)  # a share or a delta
SHARE_OR_NONE = Number(low=0, high=1, high_open=True)  # a share, 0 for none
EPSILON = POSITIVE  # a budget: finite (no budget is no flag)
EPSILON_OR_INF = Number(low=0, low_open=True, inf=True)
PORT = Number(integer=True, low=0, high=65535)


@dataclass(frozen=True)
class Flag:
    """A flag that sets the field ``path`` (dotted, below ``TrainConfig`` or
    ``FederationConfig``); ``names`` are the flag and its aliases. Its help ends with the
    default each preset uses (``unset``: how a preset's ``None`` or empty value reads)."""

    names: tuple[str, ...]
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    unset: str = "none"

    def show(self, value: Any) -> str:
        """A preset's value of the field, as this flag's help says it."""
        if self.options.get("action") == "store_const":
            return "on" if value == self.options["const"] else "off"
        if value is None or value == "":
            return self.unset
        return f"{value:g}" if isinstance(value, float) else str(value)


def _flag(*names: str, path: str, accepts: Number | None = None, unset: str = "none",
          **options: Any) -> Flag:
    if accepts is not None:
        options["type"] = accepts
    if "choices" not in options and "metavar" not in options:
        raise TypeError(f"{names[0]} needs a metavar: its dest is a configuration path")
    return Flag(names, path, options, unset)


def _switch(name: str, path: str, value: bool, help: str) -> Flag:
    return Flag((name,), path, {"action": "store_const", "const": value, "help": help})


DEVICE = {"metavar": "DEVICE",
          "help": "where tensors live: auto, cpu, cuda or cuda:N; auto picks a CUDA GPU if "
          "torch sees one"}
"""``--device``, of a training run (a field of its configuration) and of every other command."""

TRAINING_FLAGS = (
    _flag("--seed", path="seed", accepts=SEED, metavar="N", help="the run's seed"),
    _flag("--device", path="device", **DEVICE),
    _flag("--num-envs", path="num_envs", accepts=COUNT, metavar="N",
          help="parallel environments per episode batch"),
    _flag("--env-steps", path="env_steps", accepts=COUNT, metavar="N",
          help="training budget in environment steps (at least one episode batch)"),
    _flag("--time-budget", path="time_budget", accepts=POSITIVE, metavar="SECONDS",
          help="stop after this many seconds of training"),
    _flag("--eval-episodes", path="eval_episodes", accepts=COUNT, metavar="N",
          help="episodes of each greedy evaluation"),
    _flag("--noise-multiplier", "--noise", path="team.noise_multiplier", accepts=NONNEGATIVE,
          metavar="SIGMA", help="channel noise multiplier sigma (std = sigma*C)"),
    _flag("--clip", path="team.clip", accepts=POSITIVE, metavar="C",
          help="clip norm C of every knowledge vector"),
    _switch("--no-comm", "team.communicate", False, "deliver no vectors (ablation)"),
    _switch("--recurrent", "team.recurrent", True, "give each agent a GRU state"),
    _switch("--accumulate", "team.accumulate", True,
            "receivers hear each sender's running mean over the episode"),
    _flag("--channel", path="team.channel", choices=["gaussian", "discrete"],
          help="gaussian: clipped, noised vectors; discrete: codewords privatised by "
          "randomized response"),
    _flag("--symbols", path="team.symbols", accepts=Number(integer=True, low=2), metavar="N",
          help="codewords of a discrete channel"),
    _flag("--rr-epsilon", path="team.rr_epsilon", accepts=EPSILON, metavar="E",
          help="randomized response's epsilon per release of a discrete channel"),
    _flag("--release-every", path="team.release_every", accepts=COUNT, metavar="K",
          help="a sender releases at steps 0, k, 2k, ... (needs --accumulate or --recurrent "
          "for k > 1)"),
    _flag("--routes", path="team.routes", metavar="S>R,...", unset="all",
          help="the only routes senders may use, by type name (all: the graph learns which "
          "to keep)"),
    _flag("--encoder", path="team.encoder", choices=["mlp", "superposition"],
          help="the encoder of knowledge vectors"),
    _switch("--typed-comm", "team.typed_comm", True,
            help="the shared module takes each agent's type as an input: one module for every "
            "type, averaged across a heterogeneous team with --share all"),
    _flag("--hidden", path="team.hidden", accepts=COUNT, metavar="N",
          help="hidden units of every network"),
    _flag("--comm-dim", path="team.comm_dim", accepts=COUNT, metavar="N",
          help="size of a knowledge vector (a discrete channel's is its --symbols)"),
    _flag("--lr", path="ppo.lr", accepts=POSITIVE, metavar="LR", help="PPO's learning rate"),
    _flag("--ent-coef", path="ppo.ent_coef", accepts=NONNEGATIVE, metavar="W",
          help="the weight of the entropy bonus in each agent's loss"),
    _flag("--epochs", path="ppo.epochs", accepts=COUNT, metavar="N",
          help="PPO epochs over each episode batch"),
    _flag("--minibatches", path="ppo.minibatches", accepts=COUNT, metavar="N",
          help="PPO minibatches per epoch (at most --num-envs)"),
    _switch("--recall", "team.recall", True,
            help="each sender of a discrete channel also trains a private decoder that "
            "recalls what it saw from its release: an informative code, episode by episode "
            "(under DP-SGD too)"),
    _flag("--recall-coef", path="ppo.recall_coef", accepts=NONNEGATIVE, metavar="W",
          help="the weight of the recall error in each sender's loss"),
    _flag("--code-warmup", path="team.code_warmup", accepts=NONNEGATIVE_INT, metavar="N",
          help="form the senders' code before training: N steps of their recall error on "
          "observations the environment starts from under a public seed (no agent's data, "
          "nothing released; 0: the code forms in training)"),
    _flag("--signal-coef", path="ppo.signal_coef", accepts=NONNEGATIVE, metavar="W",
          help="positive signalling: reward a discrete channel's senders for codewords that "
          "say something about what they see (under DP-SGD only with --update-statistics)"),
)

PRIVACY_FLAGS = (
    _flag("--message-epsilon", path="privacy.message_epsilon", accepts=EPSILON, metavar="E",
          help="calibrate the channel noise so that the vectors that compose for one unit "
          "cost this epsilon (with --epsilon: their fixed share)"),
    _flag("--feedback-epsilon", path="privacy.feedback_epsilon", accepts=EPSILON, metavar="E",
          help="calibrate the feedback noise to this epsilon per unit (with --epsilon: its "
          "fixed share)"),
    _flag("--update-epsilon", path="privacy.update_epsilon", accepts=EPSILON, metavar="E",
          help="calibrate DP-SGD of a federated agent's update to this epsilon per unit "
          "(turns DP-SGD on; with --epsilon: its fixed share)"),
    _flag("--update-share", path="privacy.update_share", accepts=SHARE_OR_NONE, metavar="P",
          help="with --epsilon: DP-SGD's fixed share of it as a fraction (0.2: a fifth), "
          "the rest to the other mechanisms; 0: no DP-SGD, the agents that release or send "
          "anything do not train (their networks stay what --code-warmup made them) and "
          "the whole budget goes to their releases"),
    _flag("--epsilon", path="privacy.epsilon", accepts=EPSILON, metavar="E",
          help="one privacy budget per unit covering every release: split over the mechanisms "
          "in use (a federated run gets DP-SGD), each calibrated, the run refused if it "
          "cannot fit"),
    _flag("--epsilon-budget", path="privacy.epsilon_budget", accepts=EPSILON, metavar="E",
          unset="--epsilon, else none",
          help="each agent's epsilon cap per privacy unit"),
    _flag("--delta", path="privacy.delta", accepts=FRACTION, metavar="DELTA",
          help="delta of every epsilon"),
    _flag("--privacy-unit", path="privacy.unit", choices=["episode", "history"],
          help="one episode of one agent, or its whole history in the run"),
    _flag("--relation", path="privacy.relation", choices=["replace_one", "add_remove"],
          help="neighbouring relation (replace_one: sensitivity 2C)"),
    _flag("--accountant", path="privacy.accountant", choices=["pld", "rdp", "prv"],
          help="calibrates, checks budgets and reports: pld (tight), rdp (fast, a few "
          "percent loose), prv"),
    _flag("--on-budget-spent", path="privacy.on_budget_spent", choices=["silent", "stop"],
          help="an agent out of budget goes silent or stops the run"),
    _flag("--update-noise-multiplier", "--update-noise",
          path="privacy.update_noise_multiplier", accepts=NONNEGATIVE, metavar="SIGMA",
          unset="off", help="DP-SGD noise multiplier of a federated agent's update"),
    _flag("--update-clip", path="privacy.update_clip", accepts=POSITIVE, metavar="C",
          help="DP-SGD per-episode clip norm"),
    _flag("--update-shared-share", path="privacy.update_shared_share", accepts=FRACTION,
          metavar="P", unset="one clip",
          help="clip the shared module's part of each episode's DP-SGD gradient apart, to "
          "this share of the squared clip"),
    _switch("--update-statistics", "privacy.update_statistics", True,
            "DP-SGD first releases the batch's mean advantages per step (and a discrete "
            "code's marginal, for --signal-coef) as one more step"),
    _flag("--update-recall-share", path="privacy.update_recall_share", accepts=FRACTION,
          metavar="P", unset="one clip",
          help="clip a sender's recall decoder's part of each episode's DP-SGD gradient "
          "apart, to this share of the squared clip"),
    _flag("--update-value-share", path="privacy.update_value_share", accepts=FRACTION,
          metavar="P", unset="one clip",
          help="clip the value networks' part of each episode's DP-SGD gradient apart, to "
          "this share of the squared clip"),
)

FEEDBACK_FLAGS = (  # federated only: the centralized trainer has no feedback exchange
    _switch("--no-feedback", "team.feedback", False,
            "receivers send no DIAL feedback: a discrete channel's senders learn their code "
            "from the team reward (Gaussian: an ablation, encoders learn nothing through it)"),
    _flag("--feedback-noise-multiplier", "--feedback-noise",
          path="team.feedback_noise_multiplier", accepts=NONNEGATIVE, metavar="SIGMA",
          help="feedback noise multiplier"),
    _flag("--feedback-clip", path="team.feedback_clip", accepts=POSITIVE, metavar="C",
          help="per-episode clip norm of feedback"),
)

FEDERATION_FLAGS = (
    _flag("--batches-per-round", path="batches_per_round", accepts=COUNT, metavar="N",
          help="episode batches each agent trains on between aggregations"),
    _flag("--eval-every", path="eval_every", accepts=COUNT, metavar="N",
          help="rounds between greedy evaluations (unset: as often as the centralized "
          "trainer's, every 25 episode batches)"),
    _flag("--strategy", path="strategy", choices=STRATEGIES, help="aggregation"),
    _flag("--server-lr", path="server_lr", accepts=POSITIVE, metavar="LR",
          help="server learning rate (fedavgm, fedadam)"),
    _flag("--server-momentum", path="server_momentum",
          accepts=Number(low=0, high=1, high_open=True), metavar="M",
          help="server momentum (fedavgm)"),
    _flag("--share", path="share", choices=list(SHARES),
          help="send every part of the shared module, each part only among the agents that "
          "use it, only the encoder among the senders (receivers keep theirs), each part "
          "among the agents of one type that use it (role: each type its own copy, sensors "
          "with sensors across sites), or none (nothing leaves an agent: every agent keeps "
          "its own copy)"),
    _switch("--aggregate-private", "aggregate_private", True,
            "also average each type's private networks among its agents (with --share "
            "senders, the senders' only: their whole models; --share none: none); a network "
            "sent trains under DP-SGD in a private run"),
    _switch("--no-aggregate-private", "aggregate_private", False,
            "average no agent's private networks: only the parts of the shared module --share "
            "names leave an agent"),
    _flag("--on-agent-failure", path="on_agent_failure", choices=["stop", "continue"],
          help="a round with a failed agent stops the run, or the round goes on without it"),
    _flag("--round-timeout", path="round_timeout", accepts=POSITIVE, metavar="SECONDS",
          help="seconds for every reply of a round"),
    _flag("--node-timeout", path="node_timeout", accepts=POSITIVE, metavar="SECONDS",
          help="seconds for every agent's node to connect"),
    _flag("--max-update-norm", path="max_update_norm", accepts=POSITIVE, metavar="NORM",
          unset="no bound",
          help="refuse a reply whose update (its arrays minus the global module sent) is "
          "longer than this L2 norm, as a failed agent"),
    _flag("--aggregation", path="aggregation", choices=AGGREGATIONS,
          help="per key group: the mean, or a robust rule of Flower's (docs/robustness.md)"),
    _flag("--faulty-agents", path="faulty_agents", accepts=NONNEGATIVE_INT, metavar="N",
          help="faulty replies per key group trimmed_mean, krum, multikrum and bulyan "
          "withstand"),
    _flag("--client-dp-noise", path="client_dp_noise", accepts=NONNEGATIVE, metavar="SIGMA",
          help="client-level DP on the server: noise multiplier of each round's mean of "
          "clipped updates (0: off)"),
    _flag("--client-dp-clip", path="client_dp_clip", accepts=POSITIVE, metavar="C",
          help="client-level DP: L2 clip of each agent's update (under --secure-aggregation "
          "each agent clips its own)"),
    _flag("--client-dp-epsilon", path="client_dp_epsilon", accepts=POSITIVE, metavar="E",
          help="under --secure-aggregation: the agents' noise calibrated so that each agent's "
          "whole participation costs at most E (delta as --delta), every round composed"),
    _switch("--secure-aggregation", "secure_aggregation", True,
            "Flower's SecAgg+: the server learns only the sum of each cohort's updates (agents "
            "that send the same arrays, three or more); with --client-dp-noise each agent adds "
            "its share of the noise (docs/privacy.md)"),
)

# A noise multiplier (or randomized response's epsilon) is either given or calibrated to a
# target epsilon, not both.
EXCLUSIVE = (("team.noise_multiplier", "privacy.message_epsilon"),
             ("team.rr_epsilon", "privacy.message_epsilon"),
             ("team.feedback_noise_multiplier", "privacy.feedback_epsilon"),
             ("privacy.update_noise_multiplier", "privacy.update_epsilon"))

FLAGS = {TRAIN: (*TRAINING_FLAGS, *PRIVACY_FLAGS, *FEEDBACK_FLAGS), FED: FEDERATION_FLAGS}
FLAG_NAMES = {f.path: f.names[0] for f in FLAGS[TRAIN]}


def key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value
