"""``--help`` that tells the truth: short metavars, never the configuration path a flag is stored
under, and every flag's default as each environment's preset has it (read back from the help
text and compared with ``fedcomm.presets``)."""

from __future__ import annotations

import argparse
import re

import pytest

from fedcomm.commands import build_parser
from fedcomm.commands.flags import FED, FLAGS, TRAIN, Flag
from fedcomm.presets import (
    PRESET_ENVIRONMENTS,
    PRIVATE_FEDERATED,
    federation_preset,
    preset,
)


def subcommands(parser: argparse.ArgumentParser, prefix: str = "fedcomm"
                ) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, by its command line (``fedcomm deploy local``)."""
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= subcommands(sub, f"{prefix} {name}")
    return found


PARSERS = subcommands(build_parser())


@pytest.mark.parametrize("command", list(PARSERS))
def test_metavars_are_short_words_not_configuration_paths(command: str) -> None:
    parser = PARSERS[command]
    text = parser.format_help()
    assert not re.search(r"TRAIN:|FED:|train:|fed:", text), text
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.choices is not None:
            continue
        metavar = action.metavar or action.dest.upper()
        assert isinstance(metavar, str), action.option_strings
        assert ":" not in metavar and not re.search(r"\w\.\w", metavar), (action.option_strings,
                                                                          metavar)
        if ":" in action.dest:  # a configuration field's flag: its metavar is declared
            assert action.metavar and len(metavar) <= 8, (action.option_strings, metavar)


def helps(command: str) -> dict[str, str]:
    """Each option's help of ``command``, on one line."""
    return {action.option_strings[0]: " ".join((action.help or "").split()).replace("%%", "%")
            for action in PARSERS[command]._actions if action.option_strings}


def shown_defaults(help_text: str) -> dict[str, dict[str, str]]:
    """What a help's ``(default: ...)`` says, per environment: ``{env: {"default": value,
    "with --non-private": value, ...}}``."""
    text = re.search(r"\(default: (.*)\)$", help_text)
    assert text, help_text
    found = {}
    groups = text.group(1).split("; ")
    for group in groups:
        head, *variants = re.split(r", (?=[^,;]* with )", group)
        value, _, envs = head.partition(" for ")
        assert envs or len(groups) == 1, group
        names = re.split(r", | and ", envs) if envs else list(PRESET_ENVIRONMENTS)
        for env in names:
            found[env] = {"default": value}
            for variant in variants:
                shown, _, label = variant.partition(" with ")
                found[env][f"with {label}"] = shown
    assert set(found) == set(PRESET_ENVIRONMENTS), help_text
    return found


def presets_of(env: str, federated: bool) -> dict[str, object]:
    if not federated:
        return {"default": preset(env), "with the GPU preset": preset(env, "gpu")}
    private = env in PRIVATE_FEDERATED
    found: dict[str, object] = {
        "default": federation_preset(env, private=private),
        "with the GPU preset": federation_preset(env, "gpu", private=private)}
    if private:
        found["with --non-private"] = federation_preset(env)
    return found


def value_at(cfg: object, path: str) -> object:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


CASES = [(command, root, flag) for command, federated in (("fedcomm train", False),
                                                           ("fedcomm simulate", True),
                                                           ("fedcomm deploy local", True))
         for root in (TRAIN, FED) for flag in FLAGS[root]
         if flag.names[0] in helps(command)]


@pytest.mark.parametrize(("command", "root", "flag"), CASES,
                         ids=[f"{c} {f.names[0]}" for c, _, f in CASES])
def test_the_help_states_each_presets_default(command: str, root: str, flag: Flag) -> None:
    federated = command != "fedcomm train"
    shown = shown_defaults(helps(command)[flag.names[0]])
    path = f"train.{flag.path}" if federated and root == TRAIN else flag.path
    for env in PRESET_ENVIRONMENTS:
        for variant, cfg in presets_of(env, federated).items():
            text = shown[env].get(variant, shown[env]["default"])
            train = getattr(cfg, "train", cfg)
            if text == "calibrated to the budget":
                assert train.privacy.epsilon is not None, (env, variant)
            else:
                assert text == flag.show(value_at(cfg, path)), (env, variant, text)


def test_the_defaults_the_issue_names_are_the_ones_each_preset_uses() -> None:
    simulate, train = helps("fedcomm simulate"), helps("fedcomm train")
    assert ("default: senders for speaker_listener, all with --non-private; none for factory "
            "and platoon; all for mpe2:<name>") in simulate["--share"]
    assert ("default: 2 for speaker_listener, 1 with --non-private and for factory, platoon, "
            "mpe2:<name>") in simulate["--sites"]
    assert "(default: 1)" in train["--sites"]
    assert ("default: discrete for speaker_listener, gaussian with --non-private; gaussian for "
            "factory, platoon and mpe2:<name>") in simulate["--channel"]
    assert "default: 10 for speaker_listener, 1 with --non-private" in simulate["--recall-coef"]
    assert "(default: gaussian)" in train["--channel"] and "(default: none)" in train["--epsilon"]
    assert "(default: 8 for speaker_listener" in simulate["--epsilon"]


def test_env_opt_lists_every_environments_options() -> None:
    text = helps("fedcomm simulate")["--env-opt"]
    for option in ("say=true|false (true)", "n_actuators=N (3)", "fault_prob=X (0.25)",
                   "bandwidth=N (1)", "mpe2:<name>: max_cycles=N (25), mute=NAME"):
        assert option in text, text
