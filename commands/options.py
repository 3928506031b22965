"""The options every command shares, and how flags become a run's configuration.

Each flag that sets a configuration field is named after it and declared once, with the field's
dotted path, the values it accepts and its metavar (``Flag``): the parser checks the value, stores
it under that path, and :func:`train_config_from_args` and :func:`federation_config_from_args`
apply whatever was given to the environment's preset. A flag that a command does not have is
simply not there: nothing reads flags by name. Every refusal happens before anything starts,
is written or spent: one line naming the flag and what it accepts, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from rich.markup import escape

from fedcomm.commands.output import console
from fedcomm.config import AGGREGATIONS, SHARES, STRATEGIES, FederationConfig, TrainConfig

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

    def add_to(self, group: argparse._ActionsContainer, root: str, federated: bool) -> None:
        options = dict(self.options)
        default = preset_default(self, root, federated).replace("%", "%%")
        options["help"] = f"{options['help']} ({default})" if "help" in options else default
        group.add_argument(*self.names, dest=root + self.path, default=None, **options)

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
    _flag("--hidden", path="team.hidden", accepts=COUNT, metavar="N",
          help="hidden units of every network"),
    _flag("--comm-dim", path="team.comm_dim", accepts=COUNT, metavar="N",
          help="size of a knowledge vector (a discrete channel's is its --symbols)"),
    _flag("--lr", path="ppo.lr", accepts=POSITIVE, metavar="LR", help="PPO's learning rate"),
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
    _flag("--update-share", path="privacy.update_share", accepts=FRACTION, metavar="P",
          help="with --epsilon: DP-SGD's fixed share of it as a fraction (0.2: a fifth), "
          "the rest to the other mechanisms"),
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
    _flag("--strategy", path="strategy", choices=STRATEGIES, help="aggregation"),
    _flag("--server-lr", path="server_lr", accepts=POSITIVE, metavar="LR",
          help="server learning rate (fedavgm, fedadam)"),
    _flag("--server-momentum", path="server_momentum",
          accepts=Number(low=0, high=1, high_open=True), metavar="M",
          help="server momentum (fedavgm)"),
    _flag("--share", path="share", choices=list(SHARES),
          help="send every part of the shared module, each part only among the agents that "
          "use it, or none (every agent keeps its own copy)"),
    _switch("--aggregate-private", "aggregate_private", True,
            "also average each type's private networks (weaker privacy)"),
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
          help="client-level DP: L2 clip of each agent's update"),
)

# A noise multiplier (or randomized response's epsilon) is either given or calibrated to a
# target epsilon, not both.
EXCLUSIVE = (("team.noise_multiplier", "privacy.message_epsilon"),
             ("team.rr_epsilon", "privacy.message_epsilon"),
             ("team.feedback_noise_multiplier", "privacy.feedback_epsilon"),
             ("privacy.update_noise_multiplier", "privacy.update_epsilon"))

FLAGS = {TRAIN: (*TRAINING_FLAGS, *PRIVACY_FLAGS, *FEEDBACK_FLAGS), FED: FEDERATION_FLAGS}
FLAG_NAMES = {f.path: f.names[0] for f in FLAGS[TRAIN]}


def preset_default(flag: Flag, root: str, federated: bool) -> str:
    """The default each environment's preset gives ``flag``, read from ``fedcomm.presets``
    (never written by hand, so it stays true): ``default: used for speaker_listener, all with
    --non-private; none for factory and platoon; all for mpe2:<name>``."""
    from fedcomm.presets import PRESET_ENVIRONMENTS

    path = f"train.{flag.path}" if federated and root == TRAIN else flag.path
    calibrated = {noise for noise, _ in EXCLUSIVE}
    by_text: dict[tuple[str, str], list[str]] = {}
    for env in PRESET_ENVIRONMENTS:
        shown = {}
        for variant, cfg in _variants(env, federated).items():
            train = cfg.train if isinstance(cfg, FederationConfig) else cfg
            budget = root == TRAIN and flag.path in calibrated and train.privacy.epsilon
            shown[variant] = ("calibrated to the budget" if budget
                              else flag.show(_value_at(cfg, path)))
        default = shown.pop("default")
        others = [f"{text} with {variant}" for variant, text in shown.items() if text != default]
        by_text.setdefault((default, ", ".join(others)), []).append(env)
    if len(by_text) == 1:
        ((default, others),) = by_text
        return f"default: {default}" + (f", {others}" if others else "")
    return "default: " + "; ".join(f"{default} for {_and(envs)}" + (f", {others}" if others else "")
                                   for (default, others), envs in by_text.items())


@functools.cache
def _variants(env: str, federated: bool) -> dict[str, TrainConfig | FederationConfig]:
    """The presets of ``env``, made once per process: only read (every parser states them)."""
    from fedcomm.presets import variants

    return variants(env, federated)


def _value_at(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def parser_of(sub: argparse._SubParsersAction, name: str, **kwargs: Any
              ) -> argparse.ArgumentParser:
    """A subcommand's parser; options are never abbreviated (``--epsilon`` is not
    ``--epsilon-budget``)."""
    return sub.add_parser(name, allow_abbrev=False, **kwargs)


def key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def default_out(env: str) -> Path:
    return Path("runs") / f"{env.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device`` of a command that is not a training run."""
    p.add_argument("--device", default="auto", metavar=DEVICE["metavar"],
                   help=DEVICE["help"] + " (default: %(default)s)")


def env_opt_help() -> str:
    """``--env-opt``'s help: every environment's options, as declared on it."""
    from fedcomm.sim.base import shown
    from fedcomm.sim.registry import ENVIRONMENTS, MPE2_ANY, env_class

    def listed(name: str) -> str:
        options = env_class(name).options
        return ", ".join(f"{key}={o.metavar}" + ("" if o.many else f" ({shown(o.default)})")
                         for key, o in options.items())

    names = [*ENVIRONMENTS, MPE2_ANY]
    envs = "; ".join(f"{name}: {listed(name if name != MPE2_ANY else 'mpe2:any')}"
                     for name in names)
    return f"an option of the environment (repeatable): {envs}"


def add_env(p: argparse.ArgumentParser, default: str | None = "factory",
            help: str | None = None) -> None:
    from fedcomm.sim.registry import ENVIRONMENTS, MPE2_ANY

    p.add_argument("--env", default=default, metavar="ENV",
                   help=help or f"{', '.join([*ENVIRONMENTS, MPE2_ANY])} (default: %(default)s)")
    p.add_argument("--env-opt", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help=env_opt_help().replace("%", "%%"))


def add_training(p: argparse.ArgumentParser, default_env: str = "factory",
                 federated: bool = False) -> None:
    """The options of a training run, centralized or federated (whose help shows the
    federated presets' defaults)."""
    add_env(p, default_env)
    p.add_argument("--out", type=Path, metavar="RUN_DIR",
                   help="run directory (default: runs/<env>-<time>)")
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="the environment's settings for a CPU or for a GPU (more environments "
                   "and minibatches); auto: the GPU preset on a CUDA device "
                   "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_flags(p, TRAINING_FLAGS, TRAIN, federated)
    _add_flags(p.add_argument_group("privacy (docs/privacy.md)"), PRIVACY_FLAGS, TRAIN,
               federated)


def _non_private_help() -> str:
    from fedcomm.presets import PRIVATE_FEDERATED, federation_preset

    private = []
    for env in PRIVATE_FEDERATED:
        privacy = federation_preset(env, private=True).train.privacy
        private.append(f"{env}'s default is private (composed epsilon {privacy.epsilon:g} per "
                       f"{privacy.unit})")
    return ("start from the environment's non-private preset (a Gaussian channel with DIAL "
            "feedback, trained by plain PPO: composed epsilon inf) where it has a private "
            f"one; {'; '.join(private)}")


def add_federation(p: argparse.ArgumentParser) -> None:
    """The options of a federated run, simulated or deployed."""
    add_training(p, default_env="speaker_listener", federated=True)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint (its own config)")
    p.add_argument("--non-private", action="store_true", help=_non_private_help())
    _add_flags(p, FEEDBACK_FLAGS, TRAIN, True)
    _add_flags(p, FEDERATION_FLAGS, FED, True)


def _add_flags(group: argparse._ActionsContainer, flags: Iterable[Flag], root: str,
               federated: bool) -> None:
    for flag in flags:
        flag.add_to(group, root, federated)


def given(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """The fields set on the command line below ``root``, by dotted path."""
    return {k[len(root):]: v for k, v in vars(args).items()
            if k.startswith(root) and v is not None}


def with_value(obj: Any, path: str, value: Any) -> Any:
    """``obj`` (a dataclass) with the field at dotted ``path`` set, validated on the way."""
    head, _, rest = path.partition(".")
    return replace(obj, **{head: with_value(getattr(obj, head), rest, value) if rest else value})


def with_values(obj: Any, values: dict[str, Any]) -> Any:
    """``obj`` with every field of ``values`` set at once, each dataclass replaced once: the
    checks see the whole result, never a half-set one, whatever the flags' order."""
    here = {k: v for k, v in values.items() if "." not in k}
    below: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        if "." in path:
            head, _, rest = path.partition(".")
            below.setdefault(head, {})[rest] = value
    for head, inner in below.items():
        here[head] = with_values(getattr(obj, head), inner)
    return replace(obj, **here) if here else obj


def in_flag_terms(message: str, root: str = TRAIN) -> str:
    """A configuration's refusal with the fields it names (``release_every``) as the flags that
    set them (``--release-every``); fields named in plain words are left as they are."""
    names = {f.path.rpartition(".")[2]: f.names[0] for f in FLAGS[root]}
    if root == FED:
        names |= {f.path.rpartition(".")[2]: f.names[0] for f in FLAGS[TRAIN]}
    fields_ = sorted((n for n in names if "_" in n), key=len, reverse=True)
    if not fields_:
        return message
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, fields_)) + r")(?![\w-])")
    return pattern.sub(lambda m: names[m.group(1)], message)


def _refuse_both(values: dict[str, Any], names: dict[str, str]) -> None:
    for a, b in EXCLUSIVE:
        if a in values and b in values:
            raise ValueError(f"give {names[a]} or {names[b]}, not both")


def _refuse_under_budget(values: dict[str, Any], cfg: TrainConfig) -> None:
    """A noise multiplier given where one budget calibrates every mechanism would be
    silently replaced: refused, with what to give instead."""
    if cfg.privacy.epsilon is None:
        return
    for noise, target in EXCLUSIVE:
        if noise in values:
            source = ("--epsilon" if "privacy.epsilon" in values
                      else "the private default's budget (--non-private: none)")
            raise ValueError(f"{FLAG_NAMES[noise]} under {source}: one budget calibrates "
                             f"every mechanism; give {FLAG_NAMES[target]} to fix its share")


def _applied(base: Any, values: dict[str, Any], root: str) -> Any:
    """``base`` with ``values`` set; a refusal in the flags' terms."""
    try:
        return with_values(base, values)
    except ValueError as e:
        raise ValueError(in_flag_terms(str(e), root)) from None


def _with_flags(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    values = given(args, TRAIN)
    _refuse_both(values, FLAG_NAMES)
    if args.env_opt:
        base = replace(base, env_kwargs={**base.env_kwargs, **env_options(args)})
    cfg = _applied(base, values, TRAIN)
    _refuse_under_budget(values, cfg)
    return cfg


def _check_run(train: TrainConfig, values: dict[str, Any]) -> None:
    """What a run's flags must satisfy together with the preset, before anything starts: a
    device torch knows the name of, routes between the environment's types, at least one
    episode batch and a minibatch of at least one episode."""
    from fedcomm.device import resolve_device

    if train.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+",
                                                                         train.device):
        try:
            resolve_device(train.device)
        except ValueError as e:
            raise FlagError("--device", str(e)) from None
    try:
        train.team.allowed_routes(train.spec)
    except ValueError as e:
        raise FlagError("--routes", str(e)) from None
    batch = train.batch_steps
    if train.env_steps < batch:
        raise FlagError("--env-steps", f"{train.env_steps} is less than one episode batch of "
                        f"{train.env}: --num-envs {train.num_envs} x {train.spec.episode_length}"
                        f" steps = {batch}; give at least {batch}")
    if train.ppo.minibatches > train.num_envs:
        preset = "" if "ppo.minibatches" in values else " (the preset's)"
        raise FlagError("--minibatches" if preset == "" else "--num-envs",
                        f"{train.ppo.minibatches} minibatches{preset} of {train.num_envs} "
                        "episodes: give --minibatches at most --num-envs")


def _preset_kind(args: argparse.Namespace) -> str:
    from fedcomm.presets import preset_kind

    return preset_kind(args.preset, given(args, TRAIN).get("device", "auto"))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The environment's preset with every given training flag applied and the noise of the
    centralized run calibrated to any target epsilon."""
    from fedcomm.presets import preset
    from fedcomm.releases.plan import Schedule, calibrate

    check_env(args)
    cfg = _with_flags(args, preset(args.env, _preset_kind(args)))
    _check_run(cfg, given(args, TRAIN))
    return _accountable(lambda: calibrate(cfg, Schedule.of(cfg)))


def federation_config_from_args(args: argparse.Namespace) -> FederationConfig:
    """The environment's federated preset with every given flag applied and the noise of the
    federated run calibrated to any target epsilon."""
    from fedcomm.presets import PRIVATE_FEDERATED, federation_preset
    from fedcomm.releases.plan import Schedule, calibrate

    check_env(args)
    kind = _preset_kind(args)
    private = not args.non_private and args.env in PRIVATE_FEDERATED
    base = federation_preset(args.env, kind, private=private)
    try:
        train = _with_flags(args, base.train)
    except ValueError as e:
        if private and _fits(args, federation_preset(args.env, kind).train):
            raise ValueError(f"{e} (with the private default of {args.env}; --non-private "
                             "starts from its non-private preset)") from None
        raise
    fed = _applied(replace(base, train=train), given(args, FED), FED)
    _check_run(fed.train, given(args, TRAIN))
    _check_messages(fed.train)
    _check_robustness(fed)
    return _accountable(lambda: replace(fed, train=calibrate(fed.train, Schedule.of(fed))))


Run = TypeVar("Run", TrainConfig, FederationConfig)


def _accountable(make: Callable[[], Run]) -> Run:
    """The calibrated run, once its privacy plan has been computed: an accountant pushed out
    of its numeric range (an epsilon or a delta this large, a noise this small) is refused
    now, in one line, not as a traceback where the command plans the run. (Whether the plan
    fits its budget is the command's to say.)"""
    from fedcomm.releases.plan import plan_of

    try:
        run = make()
        with contextlib.suppress(ValueError):  # the plan's own refusal: the command gives it
            plan_of(run)
    except ArithmeticError as e:
        raise ValueError(f"the privacy accountants cannot compute this run's epsilon ({e}): an "
                         "epsilon or delta this large, or a noise multiplier this small, is out "
                         "of their range") from None
    return run


def _fits(args: argparse.Namespace, base: TrainConfig) -> bool:
    try:
        _with_flags(args, base)
    except ValueError:
        return False
    return True


def _check_messages(train: TrainConfig) -> None:
    """A federated run's messages through the simulator, within gRPC's limit."""
    from fedcomm.sim.limits import message_limit

    try:
        message_limit(train.spec, train.num_envs, train.team.comm_dim)
    except ValueError as e:
        raise FlagError("--num-envs", in_flag_terms(str(e))) from None


def _check_robustness(fed: FederationConfig) -> None:
    """Robust aggregation and client-level DP that cannot do their job in this run, refused
    now rather than by the server once the run has started."""
    if fed.aggregation == "mean" and fed.client_dp_noise == 0:
        return
    from fedcomm.server.layout import ReplyLayout, initial_arrays
    from fedcomm.server.robust import check_options

    try:
        check_options(fed, ReplyLayout.of(fed, initial_arrays(fed)).carriers())
    except ValueError as e:
        raise ValueError(in_flag_terms(str(e), FED)) from None


def check_env(args: argparse.Namespace) -> None:
    """``--env`` and ``--env-opt``, checked against the environment's declared options."""
    if getattr(args, "env", None) is not None and hasattr(args, "env_opt"):
        env_options(args)


def env_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--env-opt`` as ``--env`` takes them; refused naming the flag and what to type."""
    from fedcomm.sim.registry import check_env_options, env_class

    try:
        env_class(args.env)
    except ValueError as e:
        raise FlagError("--env", str(e)) from None
    try:
        return check_env_options(args.env, dict(args.env_opt))
    except ValueError as e:
        raise FlagError("--env-opt", str(e)) from None


def env_spec_of(args: argparse.Namespace) -> Any:
    """The spec of the environment ``--env`` and ``--env-opt`` name."""
    from fedcomm.config import env_spec

    return env_spec(args.env, env_options(args))


def check_args(args: argparse.Namespace) -> None:
    """What every command's arguments must satisfy beyond each value's own range, checked
    before the command runs: its environment and the environment's options."""
    check_env(args)

