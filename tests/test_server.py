"""serving.server and `gptpipe serve` against a real tritonserver (python backend)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import typer
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

import serving
from serving.commands.serve import serve
from serving.server import (
    CONTAINER_REPOSITORY,
    DOCKER_IMAGE,
    STARTUP_ARGS,
    STUB_NAME,
    TRITON_BASE_IMAGE,
    PortInUseError,
    TritonServer,
    TritonServerError,
    docker_command,
    free_ports,
)
from tests.triton_fixtures import attach_server_log, start_server, write_echo_repository

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
LOCAL_ONLY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_echo_repository(tmp_path_factory.mktemp("echo_repo"))


@pytest.fixture(scope="module")
def echo_server(echo_repo: Path) -> Iterator[TritonServer]:
    server = start_server(echo_repo)
    yield server
    server.stop()


@pytest.fixture
def echo(echo_server: TritonServer, request: pytest.FixtureRequest) -> TritonServer:
    attach_server_log(request, echo_server)
    return echo_server


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _all_gone(processes: list[psutil.Process], timeout: float = 5.0) -> bool:
    """Every process exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() >= deadline:
            return not alive
        time.sleep(0.05)


# --- a real server -----------------------------------------------------------------


def test_server_is_ready_on_loopback_and_serves_metadata(echo: TritonServer) -> None:
    assert echo.is_ready()
    listening = {
        (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)  # gRPC listens on an IPv4-mapped socket
        for c in psutil.Process(echo.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", port) for port in echo.ports.values()}

    client = grpcclient.InferenceServerClient(echo.grpc_url)
    meta = client.get_model_metadata("echo", as_json=True)
    client.close()
    assert meta["platform"] == "python"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("INPUT0", "FP32", ["-1", "-1"])]
    assert {t["name"] for t in meta["outputs"]} == {"OUTPUT0", "ENV"}
    assert echo.model_index() == [{"name": "echo", "version": "1", "state": "READY"}]

    with LOCAL_ONLY.open(echo.metrics_url, timeout=5) as response:
        assert 'nv_inference_count{model="echo",version="1"}' in response.read().decode()


def test_python_backend_runs_this_environment(echo: TritonServer) -> None:
    client = httpclient.InferenceServerClient(echo.http_url)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)  # (B, N)
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("echo", [inp])
    client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    env = json.loads(result.as_numpy("ENV")[0, 0])
    # The stub embeds this very interpreter build and sees this venv, editable install included.
    assert env["prefix"] == sys.prefix
    assert env["version"] == sys.version
    assert env["serving"] == serving.__file__
    assert env["onnxruntime"] == importlib.metadata.version("onnxruntime")


def test_busy_port_is_refused_before_starting(echo: TritonServer, echo_repo: Path) -> None:
    http, grpc, metrics = free_ports(3)
    # The HTTP port of a running server; a bare listening socket for the other two.
    cases = {"http": echo.ports["http"]}
    with socket.socket() as grpc_sock, socket.socket() as metrics_sock:
        for name, sock in (("grpc", grpc_sock), ("metrics", metrics_sock)):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            cases[name] = sock.getsockname()[1]
        for name, busy in cases.items():
            ports = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, f"{name}_port": busy}
            server = TritonServer(echo_repo, **ports)
            with pytest.raises(PortInUseError, match=rf"{name} port {busy} on 127\.0\.0\.1 is already in use.*--{name}-port"):
                server.start()
            assert server.pid is None  # nothing was launched
    with pytest.raises(ValueError, match="grpc_port: .* is also the http port"):
        TritonServer(echo_repo, http_port=http, grpc_port=http, metrics_port=metrics).start()
    with pytest.raises(ValueError, match="http_port: 70000 is not a port number"):
        TritonServer(echo_repo, http_port=70000)


def test_bad_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repository: .*missing does not exist"):
        TritonServer(tmp_path / "missing").start()
    with pytest.raises(ValueError, match="repository: .* holds no model"):
        TritonServer(tmp_path).start()


def test_stop_leaves_no_stub_processes(echo_repo: Path) -> None:
    server = start_server(echo_repo)
    children = _descendants(server.pid)
    assert STUB_NAME in {p.name() for p in children}
    assert {os.getpgid(p.pid) for p in children} == {server.pid}  # the group stop() kills
    assert server.stop() == 0
    assert _all_gone(children)
    assert not psutil.pid_exists(server.pid)  # reaped, not left a zombie
    assert server.stop() == 0  # idempotent
    assert "successfully unloaded 'echo'" in server.log_text()  # kept after stop


def test_model_failing_to_load_raises_with_log(tmp_path: Path) -> None:
    broken = textwrap.dedent('''\
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("the echo model refuses to load")
        ''')
    repo = write_echo_repository(tmp_path, model_py=broken)
    server = TritonServer(repo, **dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3))))
    server.start()
    pid = server.pid
    with pytest.raises(TritonServerError, match=r"(?s)exited with code 1 before it was ready.*refuses to load"):
        server.wait_ready(60)
    assert server.stop() == 1
    assert not psutil.pid_exists(pid)


def test_failing_test_shows_server_log(tmp_path: Path) -> None:
    test_file = tmp_path / "test_fails.py"
    test_file.write_text(textwrap.dedent('''\
        from tests.triton_fixtures import write_echo_repository

        def test_fails(triton_server_factory, tmp_path):
            server = triton_server_factory(write_echo_repository(tmp_path))
            assert not server.is_ready(), "deliberate failure"
        '''))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.triton_fixtures", "-p", "no:cacheprovider", "-q", str(test_file)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deliberate failure" in result.stdout
    assert "tritonserver log, last 80 lines" in result.stdout
    assert "successfully loaded 'echo'" in result.stdout


# --- Docker ------------------------------------------------------------------------


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


# --- `gptpipe serve` ---------------------------------------------------------------

SERVE_APP = """\
import typer
from serving.commands.serve import serve

app = typer.Typer()

@app.callback()
def main() -> None:
    "gptpipe (serve only)"

app.command("serve")(serve)
app()
"""


def _serve_app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("serve")(serve)
    return app


def _flat(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_serve_rejects_dry_run_without_docker(echo_repo: Path) -> None:
    result = CliRunner().invoke(_serve_app(), ["serve", "--repository", str(echo_repo), "--dry-run"])
    assert result.exit_code == 2
    assert "--dry-run only applies with --docker" in _flat(result.output)


def test_serve_rejects_missing_repository(tmp_path: Path) -> None:
    result = CliRunner().invoke(_serve_app(), ["serve", "--repository", str(tmp_path / "nope"), "--docker", "--dry-run"])
    assert result.exit_code == 2
    assert "does not exist" in _flat(result.output)


def test_serve_docker_dry_run_prints_the_command(echo_repo: Path) -> None:
    args = ["serve", "--docker", "--dry-run", "--repository", str(echo_repo), "--http-port", "9000",
            "--grpc-port", "9001", "--metrics-port", "9002", "--host", "0.0.0.0"]
    result = CliRunner().invoke(_serve_app(), args)
    assert result.exit_code == 0, result.output
    expected = docker_command(echo_repo, http_port=9000, grpc_port=9001, metrics_port=9002, host="0.0.0.0")
    assert result.output.strip() == shlex.join(expected)
    assert "0.0.0.0:9000:8000" in result.output


def test_serve_locally_until_sigterm(echo_repo: Path) -> None:
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_APP, "serve", "--repository", str(echo_repo),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not output or "Press Ctrl-C to stop." not in output[-1]:
            assert proc.poll() is None, "".join(output)
            output.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        printed = "".join(output)
        assert f"HTTP     http://127.0.0.1:{http}" in printed
        assert f"gRPC     127.0.0.1:{grpc}" in printed
        assert f"metrics  http://127.0.0.1:{metrics}/metrics" in printed
        assert "echo  version 1  READY" in printed
        server_processes = _descendants(proc.pid)
        assert STUB_NAME in {p.name() for p in server_processes}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    while not lines.empty():
        output.append(lines.get())
    assert "Stopped." in "".join(output)
    assert _all_gone(server_processes)
