"""`gptpipe serve`'s supervision against real processes: a crashing request (a deeply nested JSON
body), a SIGKILLed `gpt` stub, SIGTERM with open sequences (the drain), the /dev/shm regions of a
killed server, and the restricted admin APIs."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from serving import Client, ServerBusyError
from serving.server import STUB_NAME, TritonServer, free_ports
from serving.server.children import shm_regions
from tests.conftest import Served
from tests.triton_fixtures import start_server, write_echo_repository

LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROMPT = "The return statement"
DRAIN_S = 3.0


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory):
    """The tiny export with the default serving options (a decoupled `gpt`)."""
    from serving.repository import ServingOptions, write_repository

    model, tokenizer, onnx_path = tiny_export
    repository = write_repository(tmp_path_factory.mktemp("supervised") / "repo", engine_file=onnx_path,
                                  tokenizer_json=tokenizer.to_str(), model_config=model.config.to_dict(),
                                  options=ServingOptions(max_sequences=8))
    return Served(model, tokenizer, repository, None)


class ServeProcess:
    """`python -m serving.cli serve ...` on free ports, its output collected line by line."""

    def __init__(self, repository: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--repository", str(repository),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def text(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def wait_for_output(self, needle: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"{needle!r} not printed within {timeout} s:\n{self.text()}"
            time.sleep(0.1)

    def tritonserver(self) -> psutil.Process:
        (server,) = [p for p in psutil.Process(self.proc.pid).children() if p.name() == "tritonserver"]
        return server

    def stub(self, model: str) -> psutil.Process:
        stubs = [p for p in self.tritonserver().children(recursive=True)
                 if p.name() == STUB_NAME and f"/{model}/1/model.py" in " ".join(p.cmdline())]
        assert len(stubs) == 1, stubs
        return stubs[0]

    def shm(self) -> list[Path]:
        return shm_regions(f"gptpipe_{self.proc.pid}_")

    def ready(self) -> bool:
        try:
            with LOCAL.open(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve_process(request):
    started: list[ServeProcess] = []

    def start(repository: Path, *args: str, **kw) -> ServeProcess:
        process = ServeProcess(repository, *args, **kw)
        started.append(process)
        process.wait_for_output("Press Ctrl-C to stop.")
        return process

    yield start
    for process in started:
        process.close()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(process.text())


def post(port: int, path: str, body: bytes | dict, headers: dict | None = None, timeout: float = 30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
    try:
        with LOCAL.open(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def greedy_ids(port: int, max_tokens: int = 8) -> list[int]:
    status, text = post(port, "/v2/models/generate/generate",
                        {"text_input": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, text
    return json.loads(text)["output_ids"]


def nested_json(depth: int) -> bytes:
    """A generate body whose text_input is an array nested ``depth`` deep (~2 bytes a level)."""
    return b'{"max_tokens": 1, "text_input": ' + b"[" * depth + b"]" * depth + b"}"


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_nested_json_kills_tritonserver_and_the_supervisor_restarts_it(repo, serve_process) -> None:
    serve = serve_process(repo.repository, "--drain-timeout", str(DRAIN_S))
    reference = repo.reference(PROMPT, 8)
    assert greedy_ids(serve.http) == reference
    first = serve.tritonserver().pid
    try:  # Triton 2.51's HTTP JSON parser dies on this body (SIGSEGV); 30,000 deep gets a 400
        post(serve.http, "/v2/models/generate/generate", nested_json(60_000), timeout=10)
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    assert wait_until(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie", 10)
    assert wait_until(lambda: serve.ready() and serve.tritonserver().pid != first, 60), serve.text()
    assert greedy_ids(serve.http) == reference
    assert serve.proc.poll() is None


def test_dead_gpt_stub_is_noticed_and_the_server_restarted(repo, serve_process) -> None:
    serve = serve_process(repo.repository, "--drain-timeout", str(DRAIN_S))
    reference = repo.reference(PROMPT, 8)
    first = serve.tritonserver().pid
    stub = serve.stub("gpt")
    stub_region = Path(stub.cmdline()[2])
    region = Path("/dev/shm") / stub_region.name
    stub.kill()  # Triton 2.51 neither restarts it nor stops saying ready
    assert wait_until(lambda: serve.ready() and serve.tritonserver().pid != first, 60), serve.text()
    assert greedy_ids(serve.http) == reference
    assert "[restarting] python-backend stub(s) ['gpt_0'] died" in serve.text()
    with Client(f"127.0.0.1:{serve.grpc}") as client:  # client-side loop over a gRPC stream
        assert client.generate(PROMPT, max_new_tokens=8, temperature=0).token_ids == reference
    assert not region.exists(), "the killed server's shm regions are removed"


def test_restart_never_exits_when_a_stub_dies(repo, serve_process) -> None:
    serve = serve_process(repo.repository, "--restart", "never")
    serve.stub("gpt").kill()
    assert serve.proc.wait(timeout=30) == 1
    assert "not restarted (--restart never)" in serve.text()
    assert serve.shm() == []


def test_sigterm_drains_open_sequences_and_exits_cleanly(repo, serve_process) -> None:
    serve = serve_process(repo.repository, "--drain-timeout", str(DRAIN_S))
    client = Client(f"127.0.0.1:{serve.grpc}")
    idle = client.generate(PROMPT, max_new_tokens=30, temperature=0, stream=True)
    next(idle)  # a client-side sequence open on the server, its client idle between steps
    assert serve.shm(), "the server's regions carry its own prefix"
    started = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    status, text = post(serve.http, "/v2/models/generate/generate", {"text_input": PROMPT, "max_tokens": 4})
    assert status >= 400 and "server shutting down" in text, (status, text)
    rc = serve.proc.wait(timeout=DRAIN_S + 30)
    elapsed = time.monotonic() - started
    output = serve.text()
    assert rc == 0, output
    assert elapsed <= DRAIN_S + 5, (elapsed, output)
    assert "Stopped." in output
    assert "[draining] drain up to 3 s" in output and "[stopped]" in output
    assert serve.shm() == []
    with pytest.raises(Exception):  # the idle sequence's next step fails, and says so
        list(idle)
    client.close()


def test_a_killed_server_leaves_its_shm_regions_until_stop_removes_them(tmp_path) -> None:
    server = start_server(write_echo_repository(tmp_path / "repo"))
    try:
        regions = shm_regions(server.shm_prefix)
        assert regions, "the python backend's regions carry the server's own prefix"
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: not server.is_running(), 10)
        os.killpg(server.pid, signal.SIGKILL)  # the stubs too: nothing removes the files now
        time.sleep(0.5)
        assert any(p.exists() for p in regions)
    finally:
        server.stop()
    assert shm_regions(server.shm_prefix) == []


def test_a_normal_stop_leaves_no_shm_regions(tmp_path) -> None:
    server = start_server(write_echo_repository(tmp_path / "repo"))
    assert shm_regions(server.shm_prefix)
    assert server.stop() == 0
    assert shm_regions(server.shm_prefix) == []


def test_admin_apis_need_the_admin_key(tmp_path) -> None:
    key = "k" * 24
    server = start_server(write_echo_repository(tmp_path / "repo"), admin_key=key)
    try:
        port = server.ports["http"]
        body = {"log_verbose_level": 1}
        assert post(port, "/v2/logging", body)[0] == 403
        assert post(port, "/v2/logging", body, {"admin-key": "wrong" * 4})[0] == 403
        assert post(port, "/v2/logging", body, {"admin-key": key})[0] == 200
        assert post(port, "/v2/repository/index", {})[0] == 403
        for path in ("/v2/models/stats", "/v2/models/echo/stats"):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            with pytest.raises(urllib.error.HTTPError) as e:
                LOCAL.open(req, timeout=5)
            assert e.value.code == 403
        # inference, metadata and the model config stay open without --api-key
        with LOCAL.open(f"http://127.0.0.1:{port}/v2/models/echo/config", timeout=5) as r:
            assert json.loads(r.read())["name"] == "echo"
        assert post(port, "/v2/models/echo/infer", {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32",
                                                               "data": [1, 2]}]})[0] == 200
        assert [m["name"] for m in server.model_index()] == ["echo"]  # passes the key
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                grpc.update_log_settings({"log_verbose_level": 1})
            grpc.update_log_settings({"log_verbose_level": 0}, headers={"triton-grpc-protocol-admin-key": key})
            assert grpc.get_model_config("echo").config.name == "echo"
        finally:
            grpc.close()
    finally:
        server.stop()


def test_api_key_restricts_inference(tmp_path) -> None:
    key = "a" * 20
    server = start_server(write_echo_repository(tmp_path / "repo"), api_key=key)
    try:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        port = server.ports["http"]
        assert post(port, "/v2/models/echo/infer", body)[0] == 403
        assert post(port, "/v2/models/echo/infer", body, {"api-key": key})[0] == 200
    finally:
        server.stop()


def test_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="admin_key"):
        TritonServer("x", admin_key="short")
    with pytest.raises(ValueError, match="api_key"):
        TritonServer("x", api_key="a" * 20 + ":x")


def test_busy_rejections_are_a_metric_not_a_warning_per_retry(repo) -> None:
    from tests.conftest import metric

    server = start_server(repo.repository)
    try:
        with Client(server.grpc_url) as holder, Client(server.grpc_url, queue_timeout=1.0) as late:
            open_streams = [holder.generate(PROMPT, max_new_tokens=40, temperature=0, stream=True) for _ in range(8)]
            for stream in open_streams:
                next(stream)  # all 8 KV slots taken
            before = metric(server, "gptpipe_busy_rejections_total")
            lines = len(server.log_text().splitlines())
            with pytest.raises(ServerBusyError):
                late.generate(PROMPT, max_new_tokens=2, temperature=0)  # retried for 1 s
            assert metric(server, "gptpipe_busy_rejections_total") - before >= 5
            new = server.log_text().splitlines()[lines:]
            assert not [line for line in new if "conflict" in line], new[:3]
    finally:
        server.stop()


def test_generations_in_flight_fail_fast_when_the_gpt_stub_dies(repo) -> None:
    """Without a bound on generate's BLS steps, a step the dead stub had taken never comes back and
    its generation hangs until the client gives up (3 of 4 did, 40 s)."""
    server = start_server(repo.repository, env={"GPTPIPE_STEP_TIMEOUT_S": "2"})
    results: list[tuple[float, int | str]] = []

    def generate() -> None:
        started = time.monotonic()
        try:
            status, _ = post(server.ports["http"], "/v2/models/generate/generate",
                             {"text_input": PROMPT, "max_tokens": 120, "temperature": 0}, timeout=15)
        except (urllib.error.URLError, OSError) as e:
            status = repr(e)
        results.append((time.monotonic() - started, status))

    try:
        assert greedy_ids(server.ports["http"]) == repo.reference(PROMPT, 8)
        threads = [threading.Thread(target=generate) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        os.kill(server.stubs()["gpt_0"], signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        assert len(results) == 4
        assert all(seconds < 10 for seconds, _ in results), results
        assert any(status != 200 for _, status in results), results
    finally:
        server.kill()
        server.stop()


def test_the_client_passes_the_admin_key_when_the_model_config_is_restricted(repo, monkeypatch) -> None:
    """As deploy/k8s runs Triton: model-config restricted too; the client reads GPTPIPE_ADMIN_KEY."""
    key = "c" * 24
    restricted = f"model-config:admin-key={key}"
    server = start_server(repo.repository, extra_args=(f"--http-restricted-api={restricted}",
                                                       f"--grpc-restricted-protocol={restricted}"))
    try:
        monkeypatch.delenv("GPTPIPE_ADMIN_KEY", raising=False)
        with Client(server.grpc_url) as client, pytest.raises(Exception, match="restricted"):
            client.generate(PROMPT, max_new_tokens=4, temperature=0)
        monkeypatch.setenv("GPTPIPE_ADMIN_KEY", key)
        with Client(server.grpc_url) as client:
            assert client.generate(PROMPT, max_new_tokens=8, temperature=0).token_ids == repo.reference(PROMPT, 8)
    finally:
        server.stop()


def test_drain_lets_running_generations_finish_and_ends_the_rest(repo, serve_process) -> None:
    """Two client-side generations keep stepping (a step every 0.3 s: not idle) through SIGTERM:
    the short one finishes within the drain; the long one is ended with "server shutting down"
    (it got Triton's "must specify the START flag" when the drain ENDed it behind its back)."""
    serve = serve_process(repo.repository, "--drain-timeout", str(DRAIN_S))
    outcome: dict[str, object] = {}
    stepping = {"short": threading.Event(), "long": threading.Event()}

    def slow(name: str, tokens: int) -> None:
        with Client(f"127.0.0.1:{serve.grpc}") as client:
            try:
                ids = []  # one event per token (text deltas skip the tokens of an unfinished character)
                for event in client.events(PROMPT, max_new_tokens=tokens, temperature=0):
                    ids.append(event.token_id)
                    stepping[name].set()
                    time.sleep(0.3)
                outcome[name] = len(ids)
            except Exception as e:  # noqa: BLE001 - the assertion below says which
                outcome[name] = e

    threads = [threading.Thread(target=slow, args=("short", 6)), threading.Thread(target=slow, args=("long", 60))]
    for thread in threads:
        thread.start()
    assert all(event.wait(30) for event in stepping.values()), outcome
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=DRAIN_S + 30) == 0, serve.text()
    for thread in threads:
        thread.join(30)
    assert outcome["short"] == 6, outcome
    assert isinstance(outcome["long"], Exception) and "server shutting down" in str(outcome["long"]), outcome
    assert serve.shm() == []


def test_a_probe_that_times_out_under_load_is_not_a_failure_but_a_hung_server_is(repo, caplog) -> None:
    """The liveness probe of a loaded server: its 1-token generate waits in the queue past the probe
    timeout while other generations complete. Counting that as a failure restarted a busy server in
    the middle of a soak (CI); a SIGSTOPped (hung) tritonserver completes nothing and still fails."""
    from serving.server.supervisor import Supervisor, SupervisorOptions

    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo.repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    supervisor = Supervisor(server, SupervisorOptions(probe_timeout_s=0.003, probe_failures=2))
    stop = threading.Event()
    errors: list[Exception] = []

    def load() -> None:
        with Client(server.grpc_url) as client:
            while not stop.is_set():
                try:
                    client.generate(PROMPT, max_new_tokens=6, temperature=0, mode="server")
                except Exception as e:  # noqa: BLE001 - asserted below
                    errors.append(e)

    supervisor.start()
    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        with caplog.at_level("INFO", logger="serving.server.supervisor"):
            problems = []
            for _ in range(8):
                problems.append(supervisor.check())
                time.sleep(0.3)
        assert problems == [None] * 8, problems
        assert "probe slow under load" in caplog.text  # the probes did time out: the case was exercised
        stop.set()
        for thread in threads:
            thread.join(30)
        assert errors == []
        os.kill(server.pid, signal.SIGSTOP)
        try:
            assert supervisor.check() is None  # one failed probe: not yet
            problem = supervisor.check()
            assert problem is not None and "no answer within" in problem, problem
        finally:
            os.kill(server.pid, signal.SIGCONT)
    finally:
        stop.set()
        server.stop()
        supervisor.close()
