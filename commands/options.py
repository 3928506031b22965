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
import functools
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from fedcomm.commands.flags import (
    DEVICE,
    EXCLUSIVE,
    FED,
    FEDERATION_FLAGS,
    FEEDBACK_FLAGS,
    FLAG_NAMES,
    FLAGS,
    PRIVACY_FLAGS,
    TRAIN,
    TRAINING_FLAGS,
    Flag,
    FlagError,
    key_value,
)
from fedcomm.commands.sites import SITE_FLAGS, add_sites, preset_sites, site_flags
from fedcomm.config import FederationConfig, TrainConfig


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
    add_sites(p, federated)
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
    """Each flag, its help ending with the default each preset gives it."""
    for flag in flags:
        options = dict(flag.options)
        default = preset_default(flag, root, federated).replace("%", "%%")
        options["help"] = f"{options['help']} ({default})" if "help" in options else default
        group.add_argument(*flag.names, dest=root + flag.path, default=None, **options)


def given_flags(args: argparse.Namespace) -> list[str]:
    """The names of the configuration flags set on the command line."""
    names = {root + f.path: f.names[0] for root, flags in FLAGS.items() for f in flags}
    return [names[k] for k, v in vars(args).items() if k in names and v is not None]


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
    if args.env_opt or any(getattr(args, name, None) for name in SITE_FLAGS):
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
    values = given(args, TRAIN)  # the private default's design follows --epsilon
    base = federation_preset(args.env, kind, private, values.get("privacy.epsilon"))
    if private and "privacy.update_epsilon" in values:  # a fixed target, not the table's share
        base = replace(base, train=with_value(base.train, "privacy.update_share", None))
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
    fed = _client_dp_noise(fed, given(args, FED))
    return _accountable(lambda: replace(fed, train=calibrate(fed.train, Schedule.of(fed))))


Run = TypeVar("Run", TrainConfig, FederationConfig)


def _accountable(make: Callable[[], Run]) -> Run:
    """The calibrated run, once its privacy plan has been computed: an accountant pushed out
    of its numeric range (an epsilon or a delta this large, a noise this small) is refused
    now, in one line, not as a traceback where the command plans the run. (Whether the plan
    fits its budget is the command's to say.)"""
    from fedcomm.privacy.calibrate import Unreachable
    from fedcomm.releases.plan import plan_of

    try:
        run = make()
        with contextlib.suppress(ValueError):  # the plan's own refusal: the command gives it
            plan_of(run)
    except Unreachable as e:
        raise FlagError("--epsilon", f"too small for this run: its share of a mechanism "
                        f"needs more noise than any calibrated ({e}); give a larger --epsilon "
                        "(or a larger mechanism epsilon)") from None
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
    if fed.aggregation == "mean" and fed.client_dp_noise == 0 and not fed.secure_aggregation:
        return
    from fedcomm.server.layout import ReplyLayout, initial_arrays
    from fedcomm.server.robust import check_options

    try:
        check_options(fed, ReplyLayout.of(fed, initial_arrays(fed)).carriers())
    except ValueError as e:
        raise ValueError(in_flag_terms(str(e), FED)) from None


def _client_dp_noise(fed: FederationConfig, flags: Mapping[str, Any]) -> FederationConfig:
    """The agents' client-level noise calibrated to ``--client-dp-epsilon`` over the run's
    rounds, for every cohort's size and update."""
    if fed.client_dp_epsilon is None:
        return fed
    if "client_dp_noise" in flags:
        raise FlagError("--client-dp-epsilon", "give it or --client-dp-noise, not both")
    from fedcomm.releases.cohorts import noise_for_epsilon
    from fedcomm.server.secure import cohort_dims

    try:
        return replace(fed, client_dp_noise=noise_for_epsilon(fed, fed.client_dp_epsilon,
                                                              cohort_dims(fed)))
    except ValueError as e:
        raise FlagError("--client-dp-epsilon", str(e)) from None


def check_env(args: argparse.Namespace) -> None:
    """``--env`` and ``--env-opt``, checked against the environment's declared options."""
    if getattr(args, "env", None) is not None and hasattr(args, "env_opt"):
        env_options(args)


def env_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--env-opt`` as ``--env`` takes them, and the site flags; refused naming the flag and
    what to type."""
    from fedcomm.sim.registry import check_env_options, env_class

    try:
        env_class(args.env)
    except ValueError as e:
        raise FlagError("--env", str(e)) from None
    try:
        options = check_env_options(args.env, dict(args.env_opt))
    except ValueError as e:
        raise FlagError("--env-opt", str(e)) from None
    return {**options, **site_flags(args, preset_sites(args))}


def env_spec_of(args: argparse.Namespace) -> Any:
    """The spec of the environment ``--env`` and ``--env-opt`` name."""
    from fedcomm.config import env_spec

    return env_spec(args.env, env_options(args))


def check_args(args: argparse.Namespace) -> None:
    """What every command's arguments must satisfy beyond each value's own range, checked
    before the command runs: its environment and the environment's options."""
    check_env(args)

