"""The Docker Compose file and the Kubernetes manifests of a run: ``fedcomm deploy manifests``.

Every party of a deployment is its own service or workload, one SuperNode and one worker per
agent, so the files list the run's agents and name its environment. They are written from the
templates in ``deploy/templates/`` (the files of the 3-agent factory with placeholders), so
that every run gets the same security settings, volumes and comments; ``deploy/compose/`` and
``deploy/k8s/`` are what this writes for the 3-agent factory (``tests/test_manifests.py``
checks it byte for byte). A placeholder is ``{{name}}``; one that ends a line and stands for
several lines repeats the text before it (indentation, ``#``) on each of them.

Names: an agent keeps its id where Compose takes it (services, volumes, secret folders) and in
the label ``fedcomm/agent-id``; Kubernetes object names take its DNS-1035 form
(``s0.sensor_0``: ``agent-s0-sensor-0``, ``state-s0-sensor-0``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"
WIDTH = 96  # the width the files' comments and scripts are wrapped at
SITES, SITE_OPTIONS = "sites", "site_options"  # as ``sim.registry`` names them

# A template's value: the text, or a function of the width left after the line's prefix.
Value = str | Callable[[int], str]
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
_COMPOSE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a Compose service or volume name
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_YAML_PLAIN = re.compile(r"(--?)?[A-Za-z_][A-Za-z0-9_.=/+-]*(:[A-Za-z0-9_.=/+-]+)*")


def render(template: str, values: Mapping[str, Value]) -> str:
    """``template`` with every ``{{name}}`` replaced by ``values[name]``. A placeholder that
    ends its line takes a value of several lines (or a function of the width it has), each
    line after the same prefix as the placeholder."""
    def inline(text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: _text(values[m.group(1)], WIDTH), text)

    out = []
    for line in template.splitlines():
        found = list(_PLACEHOLDER.finditer(line))
        last = found[-1] if found else None
        if last is None or last.end() != len(line):
            out.append(inline(line))
            continue
        prefix = inline(line[:last.start()])
        for part in _text(values[last.group(1)], WIDTH - len(prefix)).split("\n"):
            out.append(prefix + part if part else prefix.rstrip())
    return "\n".join(out) + "\n"


def _text(value: Value, width: int) -> str:
    return value(width) if callable(value) else value


def paragraph(text: str) -> Value:
    """``text`` wrapped to the width it has, a `code span` never broken."""
    def wrap(width: int) -> str:
        kept = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
        lines = textwrap.wrap(kept, width, break_long_words=False, break_on_hyphens=False)
        return "\n".join(lines).replace("\0", " ")

    return wrap


def command(units: Sequence[str], continued: bool = False) -> Value:
    """A shell command of ``units`` (each a word, or an option and its value, never split),
    wrapped with ``\\`` to the width it has, each further line indented by two; ``continued``:
    the command goes on after the last line too."""
    def wrap(width: int) -> str:
        lines = [units[0]]
        for unit in units[1:]:
            if len(lines[-1]) + 1 + len(unit) + 2 <= width:
                lines[-1] += " " + unit
            else:
                lines.append("  " + unit)
        return " \\\n".join(lines) + (" \\" if continued else "")

    return wrap


def k8s_name(agent_id: str) -> str:
    """The agent's name in Kubernetes objects (DNS-1035: lower case, digits and ``-``):
    ``s0.sensor_0`` is ``s0-sensor-0``."""
    return re.sub(r"[^a-z0-9]+", "-", agent_id.lower()).strip("-")


def check_agents(agent_ids: Sequence[str]) -> None:
    """Agent ids the files can name: Compose service and volume names, Kubernetes label values,
    and DNS-1035 names that are all different and fit in 63 characters with their prefix."""
    names: dict[str, str] = {}
    for agent in agent_ids:
        if not (_COMPOSE_NAME.fullmatch(agent) and _LABEL_VALUE.fullmatch(agent)):
            raise ValueError(f"agent id {agent!r} cannot name a service or label: letters, "
                             "digits, '_', '.' and '-' only, at most 63")
        name = k8s_name(agent)
        if not name or len(f"agent-{name}") > 63:
            raise ValueError(f"agent id {agent!r} makes no Kubernetes name of 63 characters")
        if name in names:
            raise ValueError(f"agents {names[name]!r} and {agent!r} would both be "
                             f"agent-{name} in Kubernetes")
        names[name] = agent


def run_options(env: str, env_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The environment options the simulator serves and the submitted run is given: the
    federated preset's (``fedcomm deploy app``'s default: speaker_listener's mutes ``say``)
    under ``env_kwargs``, all spelled out, so that the two agree whatever the run's flags."""
    from fedcomm.presets import PRIVATE_FEDERATED, federation_preset

    preset = federation_preset(env, private=env in PRIVATE_FEDERATED).train.env_kwargs
    options = {**preset, **env_kwargs}
    if options.get(SITES) == 1 and not options.get(SITE_OPTIONS):
        del options[SITES]  # one site is no site: the same agents, the same files
    return options


def _value(value: Any) -> str:
    """An option's value as ``--env-opt KEY=VALUE`` reads it back (JSON, else the text)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value, separators=(",", ":"))


def env_flags(env: str, options: Mapping[str, Any], sites: bool) -> list[tuple[str, str]]:
    """The environment's flags: ``--env``, its ``--env-opt``s, and its sites as ``--sites`` and
    ``--site-opt`` (``sites``) or as ``--env-opt`` (for ``fedcomm sim serve``)."""
    flags = [("--env", env)]
    flags += [("--env-opt", f"{k}={_value(v)}") for k, v in options.items()
              if k not in (SITES, SITE_OPTIONS)]
    if not sites:
        return flags + [("--env-opt", f"{k}={_value(options[k])}")
                        for k in (SITES, SITE_OPTIONS) if k in options]
    if SITES in options:
        flags.append(("--sites", str(options[SITES])))
    for site, own in enumerate(options.get(SITE_OPTIONS) or []):
        flags += [("--site-opt", f"{site}/{k}={_value(v)}") for k, v in own.items()]
    return flags


def _dollars(word: str) -> str:
    """``$`` as Compose and Kubernetes read it literally in a command: ``$$``."""
    return word.replace("$", "$$")


def _yaml(word: str) -> str:
    if _YAML_PLAIN.fullmatch(word) and word.lower() not in ("true", "false", "yes", "no",
                                                            "on", "off", "null", "y", "n"):
        return word
    return "'" + word.replace("'", "''") + "'"


def _shell(flags: Sequence[tuple[str, str]]) -> list[str]:
    return [f"{flag} {_dollars(shlex.quote(value))}" for flag, value in flags]


def _yaml_items(flags: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"- {_yaml(_dollars(word))}" for pair in flags for word in pair)


def _described(env: str, agent_ids: Sequence[str], options: Mapping[str, Any]) -> str:
    sites = options.get(SITES, 1)
    return f"the {len(agent_ids)}-agent {env}" + (f" in {sites} sites" if sites > 1 else "")


def _padded(key: str, note: str) -> str:
    """A volume of Compose's list, its note at the column the file's notes start at."""
    return f"{key:<19} # {note}" if note else key


def compose_file(env: str, agent_ids: Sequence[str], options: Mapping[str, Any],
                 out: str = "deploy", root: str = "../..") -> str:
    """``compose/compose.yaml``: the SuperLink, the simulator, a SuperNode and a worker per
    agent and the one-shot submission. ``root`` is the folder of ``fedcomm deploy secrets
    --out secrets`` and the build context, relative to the file; ``out`` the folder as the
    comments' commands name it."""
    agent = (TEMPLATES / "compose-agent.yaml").read_text()
    services = [render(agent, {"agent": a, "root": root,
                               "state_note": "   # its model and privacy ledger" if i == 0
                               else ""}).rstrip("\n")
                for i, a in enumerate(agent_ids)]
    secrets = "${FEDCOMM_SECRETS:-" + root + "/secrets}"
    mounts = [f'- {{type: bind, source: "{secrets}/agents/{a}/node.pub", '
              f"target: /secrets/keys/{a}.pub, read_only: true}}" for a in agent_ids]
    volumes = [_padded(f"{a}-{kind}:", note if i == 0 else "")
               for kind, note in (("state", "each agent's private state: never shared with "
                                   "another party"),
                                  ("worker", "each agent's worker socket: its SuperNode's and "
                                   "its worker's only"))
               for i, a in enumerate(agent_ids)]
    about = (f"fedcomm with Docker Compose: {_described(env, agent_ids, options)} "
             f"({', '.join(agent_ids)}), every party in its own container as it would be on "
             "its own host. Walk-through: docs/deployment.md.")
    return render((TEMPLATES / "compose.yaml").read_text(), {
        "compose_about": paragraph(about),
        "secrets_command": command(["fedcomm deploy secrets",
                                    *(f"{f} {shlex.quote(v)}" for f, v in
                                      env_flags(env, options, sites=True)),
                                    "--out secrets", "--superlink-host superlink",
                                    "--sim-host sim"]),
        "out": out, "root": root,
        "sim_env": _yaml_items(env_flags(env, options, sites=False)),
        "agents": "\n\n".join(services),
        "public_key_mounts": "\n".join(mounts),
        "app_command": command(["fedcomm deploy app /tmp/app",
                                *_shell(env_flags(env, options, sites=True))], continued=True),
        "agent_volumes": "\n".join(volumes)})


def k8s_files(env: str, agent_ids: Sequence[str], options: Mapping[str, Any],
              out: str = "deploy") -> dict[str, str]:
    """``k8s/``: every manifest by its path, one ``agent-<name>.yaml`` per agent."""
    files = {path.relative_to(TEMPLATES).as_posix(): path.read_text()
             for path in sorted((TEMPLATES / "k8s").rglob("*.yaml"))}
    agent = files.pop("k8s/agent.yaml")
    names = [k8s_name(a) for a in agent_ids]
    about = (f"The parties of {_described(env, agent_ids, options)}: `kubectl apply -k "
             f"{out}/k8s`. The Secrets are not here: create them from the output of `fedcomm "
             "deploy secrets` (docs/deployment.md). The submission is its own kustomization: "
             f"`kubectl apply -k {out}/k8s/submit`.")
    values: dict[str, Value] = {
        "out": out,
        "kustomization_about": paragraph(about),
        "agent_files": "\n".join(f"- agent-{n}.yaml" for n in names),
        "sim_env": _yaml_items(env_flags(env, options, sites=False)),
        "app_command": command(["fedcomm deploy app /tmp/app",
                                *_shell(env_flags(env, options, sites=True))], continued=True),
        "public_keys": "\n".join(f"- {{key: {a}.pub, path: keys/{a}.pub}}" for a in agent_ids)}
    made = {path: render(text, values) for path, text in files.items()}
    for agent_id, name in zip(agent_ids, names):
        made[f"k8s/agent-{name}.yaml"] = render(agent, {"agent": agent_id, "name": name,
                                                        "out": out})
    return made


def manifests(env: str, env_kwargs: Mapping[str, Any] | None = None, out: str = "deploy",
              root: str = "../..") -> tuple[tuple[str, ...], dict[str, str]]:
    """The run's agents, and every file for them by its path under ``out``:
    ``compose/compose.yaml`` and ``k8s/...``. ``ValueError`` for agents the files cannot
    name."""
    from fedcomm.config import env_spec

    options = run_options(env, env_kwargs or {})
    agent_ids = env_spec(env, options).agent_ids
    check_agents(agent_ids)
    files = {"compose/compose.yaml": compose_file(env, agent_ids, options, out, root),
             **k8s_files(env, agent_ids, options, out)}
    return agent_ids, dict(sorted(files.items()))


def write_manifests(folder: Path, env: str, env_kwargs: Mapping[str, Any] | None = None
                    ) -> tuple[tuple[str, ...], list[Path]]:
    """Write the files of ``manifests`` under ``folder``, their paths relative to the working
    directory (where ``fedcomm deploy secrets --out secrets`` and ``docker compose`` run)."""
    root = Path(os.path.relpath(Path.cwd().resolve(), (folder / "compose").resolve())).as_posix()
    agent_ids, files = manifests(env, env_kwargs, folder.as_posix(), root)
    written = []
    for path, text in files.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return agent_ids, written
