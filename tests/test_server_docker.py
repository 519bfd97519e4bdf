"""serving.server.docker: the `docker run` command, the image tag, and the Dockerfile, requirements
and compose file it runs, checked against pyproject and the start-up options of a local server."""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serving.server import CONTAINER_REPOSITORY, DOCKER_IMAGE, STARTUP_ARGS, TRITON_BASE_IMAGE, docker_command

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"


def test_docker_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo").mkdir()
    command = docker_command("repo", http_port=9000, grpc_port=9001, metrics_port=9002, host="127.0.0.1")
    assert command == [
        "docker", "run", "--gpus", "all", "--rm",
        "--shm-size=1g", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864",
        "-p", "127.0.0.1:9000:8000", "-p", "127.0.0.1:9001:8001", "-p", "127.0.0.1:9002:8002",
        "-v", f"{tmp_path.resolve() / 'repo'}:/models:ro",
        DOCKER_IMAGE,
        "tritonserver", "--model-repository=/models",
        "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=5",
    ]
    ipv6 = docker_command("repo", image="x:1", host="::1")
    assert {"[::1]:8000:8000", "[::1]:8001:8001", "[::1]:8002:8002", "x:1"} <= set(ipv6)
    with pytest.raises(ValueError, match="metrics_port: 0 is not a port number"):
        docker_command("repo", metrics_port=0)


def test_image_tag_follows_project_version() -> None:
    assert DOCKER_IMAGE == f"gptpipe-triton:{importlib.metadata.version('gptpipe')}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def test_dockerfile_builds_from_the_pinned_image_and_copies_what_exists() -> None:
    instructions = _dockerfile_instructions()
    assert [arg for op, arg in instructions if op == "FROM"] == [TRITON_BASE_IMAGE]
    sources = [src for op, arg in instructions if op == "COPY" for src in shlex.split(arg)[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "export", "serving", "docker/requirements.txt"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignore = (DOCKER_DIR / "Dockerfile.dockerignore").read_text().split()
    for src in sources:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"
    (cmd,) = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    assert cmd == ["tritonserver", f"--model-repository={CONTAINER_REPOSITORY}", *STARTUP_ARGS]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.tensorrt"])
def test_dockerfile_runs_as_the_non_root_user_the_k8s_manifests_expect(dockerfile: str) -> None:
    text = (DOCKER_DIR / dockerfile).read_text().replace("\\\n", " ")
    users = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users == ["1000:1000"]  # deploy/k8s: runAsUser/runAsGroup 1000, runAsNonRoot
    assert text.index("USER ") > text.index("pip install")  # installs run as root, the server does not


def test_docker_requirements_follow_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {}
    for line in (DOCKER_DIR / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"unpinned image requirement: {line}"
            pinned[canonicalize_name(req.name)] = (spec.version, req.extras)
    assert "onnxruntime" not in pinned  # onnxruntime-gpu owns the module in the image
    for dep in map(Requirement, project["dependencies"]):
        name = "onnxruntime-gpu" if canonicalize_name(dep.name) == "onnxruntime" else canonicalize_name(dep.name)
        assert name in pinned, f"{dep} is missing from docker/requirements.txt"
        version, extras = pinned[name]
        assert dep.specifier.contains(version), f"docker/requirements.txt pins {name}=={version}, pyproject wants {dep}"
        assert dep.extras <= extras


def test_compose_runs_the_image_on_a_gpu() -> None:
    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    triton = compose["services"]["triton"]
    assert triton["image"] == DOCKER_IMAGE
    assert (DOCKER_DIR / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve() == DOCKER_DIR / "Dockerfile"
    assert triton["command"] == ["tritonserver", f"--model-repository={CONTAINER_REPOSITORY}", *STARTUP_ARGS]
    assert triton["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert triton["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"]
    (volume,) = triton["volumes"]
    source, target = volume.split(":")[:2]
    assert target == CONTAINER_REPOSITORY
    assert (DOCKER_DIR / source).resolve() == ROOT / "model_repository"
