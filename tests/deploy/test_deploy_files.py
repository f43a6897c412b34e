"""deploy/, docker-compose.yml and .dockerignore agree with each other and with the code.

Port, health path, data directory and variable names are read from the server's code
(``Settings``, the health router, ``statehost serve --help``), never copied, so a change
there fails here until the deploy files follow.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from statehost.server.routes.health import router as health_router
from statehost.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "statehost.env.example"
UNIT = DEPLOY / "systemd" / "statehost.service"

# The one image the deploy files share; the CPU variant is the same repository, tag "cpu".
IMAGE = "statehost:latest"
IMAGE_REPO = IMAGE.partition(":")[0]
DATA_DIR = "/data"
GRACE_SECONDS = 60


# ------------------------------------------------------------------ values from the code
def _env(field: str) -> str:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert field in names, f"Settings has no field {field!r}"
    return f"STATEHOST_{field.upper()}"


def _health_path() -> str:
    paths = [r.path for r in health_router.routes if "GET" in getattr(r, "methods", ())]
    assert len(paths) == 1, paths
    return paths[0]


PORT = Settings().port
HEALTH = _health_path()
HEALTH_URL = f"http://127.0.0.1:{PORT}{HEALTH}"
ALL_ENV = {_env(f.name) for f in dataclasses.fields(Settings)}


@pytest.fixture(scope="module")
def serve_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "statehost.server", "serve", "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", out))


def _load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def _seconds(text: str | int) -> float:
    if str(text).isdigit():  # systemd's bare seconds
        return int(text)
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    assert match and any(match.groups()), f"cannot read a duration from {text!r}"
    minutes, seconds = (int(g or 0) for g in match.groups())
    return 60 * minutes + seconds


# ------------------------------------------------------------------ Dockerfile
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip())
            for ln in text.splitlines()]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, args in _instructions():
        if op == "FROM":
            parts = args.split()
            current = [(op, parts[0])]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages[name] = current
        else:
            current.append((op, args))
    return stages


def _one(op: str) -> str:
    found = [args for o, args in _instructions() if o == op]
    assert len(found) == 1, f"expected one {op} in the Dockerfile, found {found}"
    return found[0]


def test_dockerfile_targets() -> None:
    stages = _stages()
    assert {"cpu", "cuda"} <= stages.keys()
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim|python:3\.1[1-9]-slim",
                        stages["base"][0][1])
    default = re.search(r"ARG PYTHON_VERSION=(3\.\d+)", DOCKERFILE.read_text())
    assert default and tuple(map(int, default[1].split("."))) >= (3, 11)
    runs = {name: " ".join(a for o, a in body if o == "RUN") for name, body in stages.items()}
    assert '"jax[cuda13]"' in runs["build-cuda"] and '".[server]"' in runs["build-cuda"]
    assert "cuda" not in runs["build-cpu"] and '".[server]"' in runs["build-cpu"]
    assert list(stages)[-1] == "cpu", "a plain `docker build` should give the CPU image"


def test_dockerfile_runtime() -> None:
    assert _one("EXPOSE") == str(PORT)
    [runtime_env] = [args for op, args in _stages()["runtime"] if op == "ENV"]
    env = dict(re.findall(r"(\w+)=(\S+)", runtime_env))
    assert env[_env("data_dir")] == DATA_DIR
    assert json.loads(_one("VOLUME")) == [DATA_DIR]
    assert HEALTH_URL in _one("HEALTHCHECK")
    user = _one("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "runAsNonRoot needs a numeric non-root USER"
    assert json.loads(_one("ENTRYPOINT")) == ["statehost"]
    assert json.loads(_one("CMD"))[:1] == ["serve"]


def test_dockerfile_entrypoint_is_the_project_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[json.loads(_one("ENTRYPOINT"))[0]] == "statehost._cli:main"


def test_dockerfile_cmd_is_accepted_by_the_cli() -> None:
    cmd = json.loads(_one("CMD"))
    assert cmd == ["serve", "--host", "0.0.0.0"]
    proc = subprocess.run([sys.executable, "-m", "statehost.server", *cmd, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "**/__pycache__", "data", "build", ".env"} <= ignored


# ------------------------------------------------------------------ docker compose
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


def test_compose_gpu_service(compose: dict[str, Any]) -> None:
    svc = compose["services"]["statehost"]
    assert svc["image"] == IMAGE
    assert svc["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile", "target": "cuda"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "profiles" not in svc


def test_compose_cpu_profile(compose: dict[str, Any]) -> None:
    svc = compose["services"]["statehost-cpu"]
    assert svc["profiles"] == ["cpu"]
    assert svc["image"].partition(":")[0] == IMAGE_REPO
    assert svc["build"]["target"] == "cpu" and svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "deploy" not in svc, "the CPU service must not reserve GPUs"
    cmd = svc["command"]
    assert cmd[cmd.index("--cpu-devices") + 1] == str(Settings().cpu_devices)


@pytest.mark.parametrize("name", ["statehost", "statehost-cpu"])
def test_compose_common(compose: dict[str, Any], name: str, serve_flags: set[str]) -> None:
    svc = compose["services"][name]
    for flag in svc["command"][1:]:
        if flag.startswith("--"):
            assert flag in serve_flags
    assert svc["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]
    assert svc["environment"][_env("data_dir")] == DATA_DIR
    mount, *others = svc["volumes"]
    volume, target = mount.split(":")
    assert target == DATA_DIR and volume in compose["volumes"]
    # The Unix socket's directory (README, "Same machine"): shared, and nothing else.
    assert [m.split(":")[1] for m in others] == [
        os.path.dirname(svc["environment"][_env("unix")])]
    assert svc["shm_size"]
    assert svc["env_file"] == ".env"
    assert svc["restart"] == "unless-stopped"
    assert _seconds(svc["stop_grace_period"]) >= GRACE_SECONDS
    assert HEALTH_URL in " ".join(svc["healthcheck"]["test"])
    assert svc["build"]["target"] in _stages()


def test_compose_services_do_not_share_data(compose: dict[str, Any]) -> None:
    volumes = [svc["volumes"][0].split(":")[0] for svc in compose["services"].values()]
    assert len(set(volumes)) == len(volumes)


def test_env_example() -> None:
    values = dict(ln.split("=", 1) for ln in ENV_EXAMPLE.read_text().splitlines()
                  if ln.strip() and not ln.startswith("#"))
    assert set(values) <= ALL_ENV
    assert values[_env("tokens")] == "", "a placeholder token would be accepted if left as is"
    commented = re.findall(r"^# (STATEHOST_\w+)=", ENV_EXAMPLE.read_text(), re.M)
    assert set(commented) <= ALL_ENV


def _run_ok(*cmd: str) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_compose_config(tmp_path: Path) -> None:
    if not _run_ok("docker", "compose", "version"):
        pytest.skip("`docker compose version` fails here (no docker or no compose plugin)")
    # A copy with the example env file, so a checkout without .env still validates.
    shutil.copy(COMPOSE, tmp_path / COMPOSE.name)
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    proc = subprocess.run(["docker", "compose", "--profile", "cpu", "config", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_docker_build_check() -> None:
    if not _run_ok("docker", "info"):
        pytest.skip("no working docker daemon (`docker info` fails)")
    if not _run_ok("docker", "buildx", "build", "--help"):
        pytest.skip("docker buildx is not available")
    proc = subprocess.run(["docker", "buildx", "build", "--check", "-f", str(DOCKERFILE),
                           str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ Kubernetes
def _manifests() -> dict[str, dict[str, Any]]:
    return {p.name: _load(p) for p in sorted(K8S.glob("*.yaml"))}


def test_kustomization_lists_every_manifest_but_the_secret() -> None:
    kust = _load(K8S / "kustomization.yaml")
    expected = sorted(set(_manifests()) - {"kustomization.yaml", "secret.yaml"})
    assert sorted(kust["resources"]) == expected
    # `apply -k` would overwrite the real tokens with the placeholder.
    assert "secret.yaml" not in kust["resources"]
    [image] = kust["images"]
    assert f"{image['newName']}:{image['newTag']}" == IMAGE
    assert image["name"] == IMAGE_REPO
    assert any(lab.get("includeSelectors") for lab in kust["labels"])


def test_deployment() -> None:
    m = _manifests()
    dep = m["deployment.yaml"]
    spec = dep["spec"]
    assert dep["kind"] == "Deployment" and spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= GRACE_SECONDS
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = int(_one("USER").split(":")[0])
    assert pod["securityContext"]["runAsUser"] == user
    [ctr] = pod["containers"]
    assert ctr["image"] == IMAGE
    assert ctr["args"] == json.loads(_one("CMD"))
    assert int(ctr["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert [p["containerPort"] for p in ctr["ports"]] == [PORT]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ctr[probe]["httpGet"] == {"path": HEALTH, "port": PORT}, probe

    env = {e["name"]: e for e in ctr["env"]}
    assert set(env) <= ALL_ENV
    assert env[_env("data_dir")]["value"] == DATA_DIR
    ref = env[_env("tokens")]["valueFrom"]["secretKeyRef"]
    secret = m["secret.yaml"]
    assert secret["kind"] == "Secret" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]

    [mount] = ctr["volumeMounts"]
    assert mount["mountPath"] == DATA_DIR
    [volume] = pod["volumes"]
    assert volume["name"] == mount["name"]
    pvc = m["pvc.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_secret_placeholder_is_not_a_usable_token() -> None:
    secret = _manifests()["secret.yaml"]
    assert all(v == "" for v in secret["stringData"].values())
    text = (K8S / "secret.yaml").read_text()
    assert "change-me" in text and "kubectl create secret generic" in text


def test_service() -> None:
    m = _manifests()
    svc = m["service.yaml"]
    assert svc["kind"] == "Service" and svc["spec"]["type"] == "ClusterIP"
    [port] = svc["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == PORT
    labels = m["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


# ------------------------------------------------------------------ systemd
def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit(serve_flags: set[str]) -> None:
    svc = _unit()["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/opt/statehost/.venv/bin/statehost" and argv[1] == "serve"
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert flags and set(flags) <= serve_flags
    data_dir = argv[argv.index("--data-dir") + 1]
    assert data_dir == f"/var/lib/{svc['StateDirectory']}"
    assert svc["User"] == "statehost"
    assert svc["EnvironmentFile"] == "/etc/statehost/statehost.env"
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert _seconds(svc["TimeoutStopSec"]) >= GRACE_SECONDS
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert "PrivateDevices" not in svc, "PrivateDevices hides the GPUs"
    assert "MemoryDenyWriteExecute" not in svc, "XLA's JIT needs W+X memory"


# ------------------------------------------------------------------ a group of hosts
K8S_GROUP = DEPLOY / "k8s-cluster"
COMPOSE_GROUP = DEPLOY / "cluster" / "docker-compose.yml"


def _group_manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S_GROUP.glob("*.yaml"))}


def test_group_kustomization_lists_every_manifest() -> None:
    kust = _load(K8S_GROUP / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(set(_group_manifests()) - {"kustomization.yaml"})
    [image] = kust["images"]
    assert f"{image['newName']}:{image['newTag']}" == IMAGE


def test_group_statefulset_gives_each_pod_its_process_index() -> None:
    m = _group_manifests()
    [sts] = m["statefulset.yaml"]
    spec = sts["spec"]
    assert sts["kind"] == "StatefulSet"
    # jax.distributed holds every process until all have joined: start them together.
    assert spec["podManagementPolicy"] == "Parallel"
    services = {s["metadata"]["name"]: s for s in m["service.yaml"]}
    headless = services[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # the group forms unready
    [ctr] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in ctr["env"]}
    assert set(env) <= ALL_ENV
    assert int(env[_env("num_processes")]["value"]) == spec["replicas"]
    index = env[_env("process_id")]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.labels['apps.kubernetes.io/pod-index']"
    host, _, port = env[_env("coordinator")]["value"].partition(":")
    assert host == f"{sts['metadata']['name']}-0.{spec['serviceName']}"  # pod 0's DNS name
    assert int(port) in {p["containerPort"] for p in ctr["ports"]}
    assert int(ctr["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ctr[probe]["httpGet"] == {"path": HEALTH, "port": PORT}, probe
    assert env[_env("data_dir")]["value"] == DATA_DIR
    [claim] = spec["volumeClaimTemplates"]
    assert [v["mountPath"] for v in ctr["volumeMounts"] if v["name"] ==
            claim["metadata"]["name"]] == [DATA_DIR]


def test_group_clients_reach_the_leader_only() -> None:
    m = _group_manifests()
    [sts] = m["statefulset.yaml"]
    [client] = [s for s in m["service.yaml"] if s["metadata"]["name"] != sts["spec"]["serviceName"]]
    assert client["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == \
        f"{sts['metadata']['name']}-0"
    [port] = client["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == PORT


def test_group_compose_runs_one_process_per_service(serve_flags: set[str]) -> None:
    services = _load(COMPOSE_GROUP)["services"]
    commands = {name: svc["command"] for name, svc in services.items()}
    ids = {}
    for name, cmd in commands.items():
        assert cmd[0] == "serve"
        assert {f for f in cmd if f.startswith("--")} <= serve_flags, cmd
        assert int(cmd[cmd.index("--num-processes") + 1]) == len(services)
        ids[int(cmd[cmd.index("--process-id") + 1])] = name
    assert sorted(ids) == list(range(len(services)))
    coordinators = {cmd[cmd.index("--coordinator") + 1] for cmd in commands.values()}
    [coordinator] = coordinators
    assert coordinator.partition(":")[0] == ids[0]  # process 0's service name
    assert services[ids[0]]["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]
    assert all("ports" not in services[n] for i, n in ids.items() if i)  # followers: no API
    volumes = [svc["volumes"][0].split(":")[0] for svc in services.values()]
    assert len(set(volumes)) == len(volumes)
    for svc in services.values():
        assert svc["environment"][_env("data_dir")] == DATA_DIR
        assert HEALTH_URL in " ".join(svc["healthcheck"]["test"])
