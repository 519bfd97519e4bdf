"""serving.server (install, process, ports) and `gptpipe serve` against a real tritonserver
(python backend); the Docker side is tests/test_server_docker.py."""

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
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import typer
from typer.testing import CliRunner

import serving
from serving.commands.serve import serve
from serving.server import (
    STUB_NAME,
    PortInUseError,
    TritonServer,
    TritonServerError,
    docker_command,
    free_ports,
)
from tests.triton_fixtures import attach_server_log, start_server, write_echo_repository

ROOT = Path(__file__).resolve().parents[1]
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
    http, grpc, metrics, openai_port = free_ports(4)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_APP, "serve", "--repository", str(echo_repo),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--openai-port", str(openai_port)],
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
