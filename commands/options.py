"""The options every command shares, and how flags become a run's configuration.

Each flag that sets a configuration field is named after it and declared once, with the field's
dotted path (``Flag``): the parser stores it under that path, and :func:`train_config_from_args`
and :func:`federation_config_from_args` apply whatever was given to the environment's preset.
A flag that a command does not have is simply not there: nothing reads flags by name.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedcomm.config import AGGREGATIONS, SHARES, STRATEGIES, FederationConfig, TrainConfig

TRAIN, FED = "train:", "fed:"  # where a flag's field lives: TrainConfig, FederationConfig


@dataclass(frozen=True)
class Flag:
    """A flag that sets the field ``path`` (dotted, below ``TrainConfig`` or
    ``FederationConfig``); ``names`` are the flag and its aliases."""

    names: tuple[str, ...]
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    def add_to(self, group: argparse._ActionsContainer, root: str) -> None:
        group.add_argument(*self.names, dest=root + self.path, default=None, **self.options)


def _flag(*names: str, path: str, **options: Any) -> Flag:
    return Flag(names, path, options)


def _switch(name: str, path: str, value: bool, help: str) -> Flag:
    return Flag((name,), path, {"action": "store_const", "const": value, "help": help})


DEVICE = {"metavar": "{auto,cpu,cuda,cuda:N}",
          "help": "where tensors live: auto picks a CUDA GPU if torch sees one (default: auto)"}
"""``--device``, of a training run (a field of its configuration) and of every other command."""

TRAINING_FLAGS = (
    _flag("--seed", path="seed", type=int, help="the run's seed (default: 0)"),
    _flag("--device", path="device", **DEVICE),
    _flag("--num-envs", path="num_envs", type=int, help="parallel environments per episode batch"),
    _flag("--env-steps", path="env_steps", type=int, help="training budget in environment steps"),
    _flag("--time-budget", path="time_budget", type=float,
          help="stop after this many seconds of training"),
    _flag("--eval-episodes", path="eval_episodes", type=int),
    _flag("--noise-multiplier", "--noise", path="team.noise_multiplier", type=float,
          help="channel noise multiplier sigma (std = sigma*C)"),
    _flag("--clip", path="team.clip", type=float, help="clip norm C of every knowledge vector"),
    _switch("--no-comm", "team.communicate", False, "deliver no vectors (ablation)"),
    _switch("--recurrent", "team.recurrent", True, "give each agent a GRU state"),
    _switch("--accumulate", "team.accumulate", True,
            "receivers hear each sender's running mean over the episode"),
    _flag("--channel", path="team.channel", choices=["gaussian", "discrete"],
          help="gaussian: clipped, noised vectors; discrete: codewords privatised by "
          "randomized response (default: gaussian)"),
    _flag("--symbols", path="team.symbols", type=int,
          help="codewords of a discrete channel (default 4)"),
    _flag("--rr-epsilon", path="team.rr_epsilon", type=float,
          help="randomized response's epsilon per release of a discrete channel"),
    _flag("--release-every", path="team.release_every", type=int,
          help="a sender releases at steps 0, k, 2k, ... (needs --accumulate or --recurrent "
          "for k > 1; default 1)"),
    _flag("--routes", path="team.routes", metavar="S>R,...",
          help="the only routes senders may use, by type name (default: all; the graph learns "
          "which to keep)"),
    _flag("--encoder", path="team.encoder", choices=["mlp", "superposition"]),
    _flag("--hidden", path="team.hidden", type=int),
    _flag("--comm-dim", path="team.comm_dim", type=int),
    _flag("--lr", path="ppo.lr", type=float),
    _flag("--epochs", path="ppo.epochs", type=int),
    _flag("--minibatches", path="ppo.minibatches", type=int),
    _switch("--recall", "team.recall", True,
            help="each sender of a discrete channel also trains a private decoder that "
            "recalls what it saw from its release: an informative code, episode by episode "
            "(under DP-SGD too)"),
    _flag("--recall-coef", path="ppo.recall_coef", type=float,
          help="the weight of the recall error in each sender's loss (default 1)"),
    _flag("--signal-coef", path="ppo.signal_coef", type=float,
          help="positive signalling: reward a discrete channel's senders for codewords that "
          "say something about what they see (default 0; under DP-SGD only with "
          "--update-statistics)"),
)

PRIVACY_FLAGS = (
    _flag("--message-epsilon", path="privacy.message_epsilon", type=float,
          help="calibrate the channel noise so that the vectors that compose for one unit "
          "cost this epsilon (with --epsilon: their fixed share)"),
    _flag("--feedback-epsilon", path="privacy.feedback_epsilon", type=float,
          help="calibrate the feedback noise to this epsilon per unit (with --epsilon: its "
          "fixed share)"),
    _flag("--update-epsilon", path="privacy.update_epsilon", type=float,
          help="calibrate DP-SGD of a federated agent's update to this epsilon per unit "
          "(turns DP-SGD on; with --epsilon: its fixed share)"),
    _flag("--update-share", path="privacy.update_share", type=float,
          help="with --epsilon: DP-SGD's fixed share of it as a fraction (0.2: a fifth), "
          "the rest to the other mechanisms"),
    _flag("--epsilon", path="privacy.epsilon", type=float,
          help="one privacy budget per unit covering every release: split over the mechanisms "
          "in use (a federated run gets DP-SGD), each calibrated, the run refused if it "
          "cannot fit"),
    _flag("--epsilon-budget", path="privacy.epsilon_budget", type=float,
          help="each agent's epsilon cap per privacy unit (default: --epsilon, else none)"),
    _flag("--delta", path="privacy.delta", type=float,
          help="delta of every epsilon (default: 1e-5)"),
    _flag("--privacy-unit", path="privacy.unit", choices=["episode", "history"],
          help="one episode of one agent (default), or its whole history in the run"),
    _flag("--relation", path="privacy.relation", choices=["replace_one", "add_remove"],
          help="neighbouring relation (default: replace_one, sensitivity 2C)"),
    _flag("--accountant", path="privacy.accountant", choices=["pld", "rdp", "prv"],
          help="calibrates, checks budgets and reports: pld (default, tight), rdp (fast, a "
          "few percent loose), prv"),
    _flag("--on-budget-spent", path="privacy.on_budget_spent", choices=["silent", "stop"],
          help="an agent out of budget goes silent (default) or stops the run"),
    _flag("--update-noise-multiplier", "--update-noise",
          path="privacy.update_noise_multiplier", type=float,
          help="DP-SGD noise multiplier of a federated agent's update (default: off)"),
    _flag("--update-clip", path="privacy.update_clip", type=float,
          help="DP-SGD per-episode clip norm (default 1)"),
    _flag("--update-shared-share", path="privacy.update_shared_share", type=float,
          help="clip the shared module's part of each episode's DP-SGD gradient apart, to "
          "this share of the squared clip"),
    _switch("--update-statistics", "privacy.update_statistics", True,
            "DP-SGD first releases the batch's mean advantages per step (and a discrete "
            "code's marginal, for --signal-coef) as one more step"),
    _flag("--update-recall-share", path="privacy.update_recall_share", type=float,
          help="clip a sender's recall decoder's part of each episode's DP-SGD gradient "
          "apart, to this share of the squared clip"),
    _flag("--update-value-share", path="privacy.update_value_share", type=float,
          help="clip the value networks' part of each episode's DP-SGD gradient apart, to "
          "this share of the squared clip"),
)

FEEDBACK_FLAGS = (  # federated only: the centralized trainer has no feedback exchange
    _switch("--no-feedback", "team.feedback", False,
            "receivers send no DIAL feedback: a discrete channel's senders learn their code "
            "from the team reward (Gaussian: an ablation, encoders learn nothing through it)"),
    _flag("--feedback-noise-multiplier", "--feedback-noise",
          path="team.feedback_noise_multiplier", type=float, help="feedback noise multiplier"),
    _flag("--feedback-clip", path="team.feedback_clip", type=float,
          help="per-episode clip norm of feedback"),
)

FEDERATION_FLAGS = (
    _flag("--batches-per-round", path="batches_per_round", type=int,
          help="episode batches each agent trains on between aggregations"),
    _flag("--strategy", path="strategy", choices=STRATEGIES, help="aggregation (default: fedavg)"),
    _flag("--server-lr", path="server_lr", type=float,
          help="server learning rate (fedavgm, fedadam)"),
    _flag("--server-momentum", path="server_momentum", type=float,
          help="server momentum (fedavgm)"),
    _flag("--share", path="share", choices=list(SHARES),
          help="send every part of the shared module (default), each part only among the "
          "agents that use it, or none (every agent keeps its own copy)"),
    _switch("--aggregate-private", "aggregate_private", True,
            "also average each type's private networks (weaker privacy)"),
    _flag("--on-agent-failure", path="on_agent_failure", choices=["stop", "continue"],
          help="a round with a failed agent stops the run (default), or the round goes on "
          "without it"),
    _flag("--round-timeout", path="round_timeout", type=float,
          help="seconds for every reply of a round (default: 900)"),
    _flag("--node-timeout", path="node_timeout", type=float,
          help="seconds for every agent's node to connect (default: 120)"),
    _flag("--max-update-norm", path="max_update_norm", type=float,
          help="refuse a reply whose update (its arrays minus the global module sent) is "
          "longer than this L2 norm, as a failed agent (default: no bound)"),
    _flag("--aggregation", path="aggregation", choices=AGGREGATIONS,
          help="per key group: mean (default), or a robust rule of Flower's "
          "(docs/robustness.md)"),
    _flag("--faulty-agents", path="faulty_agents", type=int,
          help="faulty replies per key group trimmed_mean, krum, multikrum and bulyan "
          "withstand (default: 1)"),
    _flag("--client-dp-noise", path="client_dp_noise", type=float,
          help="client-level DP on the server: noise multiplier of each round's mean of "
          "clipped updates (default: 0, off)"),
    _flag("--client-dp-clip", path="client_dp_clip", type=float,
          help="client-level DP: L2 clip of each agent's update (default: 1)"),
)

# A noise multiplier (or randomized response's epsilon) is either given or calibrated to a
# target epsilon, not both.
EXCLUSIVE = (("team.noise_multiplier", "privacy.message_epsilon"),
             ("team.rr_epsilon", "privacy.message_epsilon"),
             ("team.feedback_noise_multiplier", "privacy.feedback_epsilon"),
             ("privacy.update_noise_multiplier", "privacy.update_epsilon"))


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
    p.add_argument("--device", default="auto", **DEVICE)


def add_env(p: argparse.ArgumentParser, default: str = "factory") -> None:
    p.add_argument("--env", default=default,
                   help="factory, speaker_listener, platoon, mpe2:<name> (default: %(default)s)")
    p.add_argument("--env-opt", type=key_value, action="append", default=[], metavar="K=V",
                   help="environment option, e.g. --env-opt n_actuators=4 (repeatable)")


def add_training(p: argparse.ArgumentParser, default_env: str = "factory") -> None:
    """The options of a training run, centralized or federated."""
    add_env(p, default_env)
    p.add_argument("--out", type=Path, help="run directory (default: runs/<env>-<time>)")
    p.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto",
                   help="the environment's settings for a CPU or for a GPU (more environments "
                   "and minibatches); auto: the GPU preset on a CUDA device "
                   "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_flags(p, TRAINING_FLAGS, TRAIN)
    _add_flags(p.add_argument_group("privacy (docs/privacy.md)"), PRIVACY_FLAGS, TRAIN)


def add_federation(p: argparse.ArgumentParser) -> None:
    """The options of a federated run, simulated or deployed."""
    add_training(p, default_env="speaker_listener")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint (its own config)")
    p.add_argument("--non-private", action="store_true",
                   help="start from the environment's non-private preset (a Gaussian channel "
                   "with DIAL feedback, trained by plain PPO: composed epsilon inf) where it "
                   "has a private one; speaker_listener's default is private (composed "
                   "epsilon 8 per episode)")
    _add_flags(p, FEEDBACK_FLAGS, TRAIN)
    _add_flags(p, FEDERATION_FLAGS, FED)


def _add_flags(group: argparse._ActionsContainer, flags: Iterable[Flag], root: str) -> None:
    for flag in flags:
        flag.add_to(group, root)


def given(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """The fields set on the command line below ``root``, by dotted path."""
    return {k[len(root):]: v for k, v in vars(args).items()
            if k.startswith(root) and v is not None}


def with_value(obj: Any, path: str, value: Any) -> Any:
    """``obj`` (a dataclass) with the field at dotted ``path`` set, validated on the way."""
    head, _, rest = path.partition(".")
    return replace(obj, **{head: with_value(getattr(obj, head), rest, value) if rest else value})


def with_values(obj: Any, values: dict[str, Any]) -> Any:
    for path, value in values.items():
        obj = with_value(obj, path, value)
    return obj


def _refuse_both(values: dict[str, Any], names: dict[str, str]) -> None:
    for a, b in EXCLUSIVE:
        if a in values and b in values:
            raise ValueError(f"give {names[a]} or {names[b]}, not both")


FLAG_NAMES = {f.path: f.names[0] for f in (*TRAINING_FLAGS, *PRIVACY_FLAGS, *FEEDBACK_FLAGS)}


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


def _with_flags(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    values = given(args, TRAIN)
    _refuse_both(values, FLAG_NAMES)
    if args.env_opt:
        base = replace(base, env_kwargs={**base.env_kwargs, **dict(args.env_opt)})
    cfg = with_values(base, values)
    _refuse_under_budget(values, cfg)
    return cfg


def _preset_kind(args: argparse.Namespace) -> str:
    from fedcomm.presets import preset_kind

    return preset_kind(args.preset, given(args, TRAIN).get("device", "auto"))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The environment's preset with every given training flag applied and the noise of the
    centralized run calibrated to any target epsilon."""
    from fedcomm.presets import preset
    from fedcomm.releases.plan import Schedule, calibrate

    cfg = _with_flags(args, preset(args.env, _preset_kind(args)))
    return calibrate(cfg, Schedule.of(cfg))


def federation_config_from_args(args: argparse.Namespace) -> FederationConfig:
    """The environment's federated preset with every given flag applied and the noise of the
    federated run calibrated to any target epsilon."""
    from fedcomm.presets import federation_preset
    from fedcomm.releases.plan import Schedule, calibrate

    base = federation_preset(args.env, _preset_kind(args), private=not args.non_private)
    fed = with_values(replace(base, train=_with_flags(args, base.train)), given(args, FED))
    return replace(fed, train=calibrate(fed.train, Schedule.of(fed)))


def env_spec_of(args: argparse.Namespace) -> Any:
    """The spec of the environment ``--env`` and ``--env-opt`` name."""
    from fedcomm.config import env_spec

    return env_spec(args.env, dict(args.env_opt))


