"""The local tritonserver process: `TritonServer` starts it, waits until it is ready, keeps its log
and stops it with its whole process group."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.server.children import new_shm_prefix, remove_shm_regions, stub_processes
from serving.server.common import (
    ADMIN_KEY_HEADER,
    STARTUP_ARGS,
    TritonServerError,
    check_repository,
    has_nvidia_gpu,
    restricted_api_args,
)
from serving.server.install import TritonInstall, find_tritonserver, prepare_backend_directory, server_env
from serving.server.ports import check_port, check_ports_free, host_port

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 30.0
# Without a GPU these only produce CUDA errors/warnings at start-up (pinned memory needs the
# CUDA driver, GPU metrics need NVML/DCGM); the python backend does not use them on CPU.
_NO_GPU_ARGS = (
    "--pinned-memory-pool-byte-size=0",
    "--allow-gpu-metrics=false",
)


def _die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn``: tritonserver gets SIGTERM when the thread that started it dies.

    Without it a killed test run or CLI leaves a server (in its own session) holding the
    ports. libc is looked up here, in the parent, so the child only makes one call.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class TritonServer:
    """A local tritonserver process serving ``repository``.

    Use as a context manager (start + wait until ready, stop on exit), or call
    :meth:`start`, :meth:`wait_ready` and :meth:`stop` yourself. The server runs in its own
    process group; :meth:`stop` leaves no ``triton_python_backend_stub`` behind. If the
    thread that called :meth:`start` dies (or the whole process is killed), the server gets
    SIGTERM, so start it from a thread that outlives it (normally the main thread).

    ``extra_args`` go after the defaults, so they override them (e.g.
    ``("--model-control-mode=explicit", "--load-model=gpt")``). ``env`` entries override
    this process's environment; ``PATH`` and ``LD_LIBRARY_PATH`` are then extended with
    what the python backend needs. Without ``log_file`` the log goes to a temporary file
    that :meth:`stop` removes after keeping its text for :meth:`log_text`.

    The python backend's /dev/shm regions carry a prefix of this server's own
    (``shm_prefix``); :meth:`stop` and :meth:`kill` remove them once the server is gone, also
    after a crash. With ``admin_key``, Triton's admin APIs (repository, model config, shared
    memory, statistics, trace, logging) answer only requests with the header
    ``admin-key: <key>``; with ``api_key``, inference too (header ``api-key``).
    """

    def __init__(
        self,
        repository: Path | str,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_verbose: int = 0,
        log_file: Path | str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        backend_directory: Path | str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
        admin_key: str | None = None,
        api_key: str | None = None,
        shm_prefix: str | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.host = host
        self.ports = {
            "http": check_port(http_port, "http_port"),
            "grpc": check_port(grpc_port, "grpc_port"),
            "metrics": check_port(metrics_port, "metrics_port"),
        }
        if not isinstance(log_verbose, int) or log_verbose < 0:
            raise ValueError(f"log_verbose: {log_verbose!r} must be an integer >= 0")
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.backend_directory = Path(backend_directory) if backend_directory else None
        self.startup_timeout = startup_timeout
        self.admin_key = admin_key
        self.api_key = api_key
        self.shm_prefix = shm_prefix or new_shm_prefix()
        restricted_api_args(admin_key, api_key)  # checks the keys now, not at start()
        self._log_path = Path(log_file).resolve() if log_file else None
        self._owns_log = log_file is None
        self._final_log: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit_code: int | None = None
        self._started_at = 0.0
        self.args: list[str] = []

    # endpoints: tritonclient wants "host:port" for HTTP and gRPC
    @property
    def http_url(self) -> str:
        return host_port(self.host, self.ports["http"])

    @property
    def grpc_url(self) -> str:
        return host_port(self.host, self.ports["grpc"])

    @property
    def metrics_url(self) -> str:
        return f"http://{host_port(self.host, self.ports['metrics'])}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def exit_code(self) -> int | None:
        """The exit code once the server has exited (negative: killed by that signal), else None."""
        return self._exit_code if self._proc is not None and self._exited() else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def build_args(self, install: TritonInstall, backend_root: Path) -> list[str]:
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_root}",
            *STARTUP_ARGS,
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *restricted_api_args(self.admin_key, self.api_key),
        ]
        if not has_nvidia_gpu():
            args += _NO_GPU_ARGS
        return args + list(self.extra_args)

    def start(self) -> TritonServer:
        """Check the repository and ports, then launch tritonserver (does not wait)."""
        if self._proc is not None and self._proc.returncode is None:
            raise TritonServerError(f"tritonserver already started (pid {self._proc.pid}); stop() it first")
        check_repository(self.repository)
        check_ports_free(self.host, self.ports)
        install = find_tritonserver()
        backend_root = prepare_backend_directory(install, self.backend_directory)
        self.args = self.build_args(install, backend_root)
        env = server_env(install, {**os.environ, **self.env})
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._final_log = None
        self._exit_code = None
        logger.info("starting tritonserver: %s (log: %s)", " ".join(self.args), self._log_path)
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own process group, so stop() can kill the stubs too.
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        self._started_at = time.monotonic()
        return self

    def _exited(self) -> bool:
        """True once tritonserver has exited; does not reap it.

        Leaving the zombie unreaped until stop() keeps its pid (= the group id) from being
        reused, so killing the process group later cannot hit a stranger.
        """
        if self._proc is None:
            return True
        if self._exit_code is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already
            self._exit_code = self._proc.returncode if self._proc.returncode is not None else -1
            return True
        if info is None:
            return False
        self._exit_code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        return True

    def is_running(self) -> bool:
        return self._proc is not None and not self._exited()

    def is_ready(self) -> bool:
        """One probe of ``/v2/health/ready`` (ready = server up and every model loaded)."""
        # No proxies: a proxy from the environment must not see loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float | None = None, *, interval: float = 0.1) -> float:
        """Poll until ready; return the seconds since start. Raises with the log's tail."""
        if self._proc is None:
            raise TritonServerError("tritonserver was not started; call start() first")
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self._exited():
                raise TritonServerError(
                    f"tritonserver exited with code {self._exit_code} before it was ready; "
                    f"log {self._log_path}, last lines:\n{self.log_tail()}"
                )
            if self.is_ready():
                elapsed = time.monotonic() - self._started_at
                logger.info("tritonserver ready after %.2f s", elapsed)
                return elapsed
            if time.monotonic() >= deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f} s; "
                    f"log {self._log_path}, last lines:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the whole process group.

        Returns the server's exit code (None if it was never started). Idempotent.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            if not self._exited():
                # TERM to the server alone: it unloads the models and ends its stubs itself.
                os.kill(proc.pid, signal.SIGTERM)
                if not self._wait_exit(timeout):
                    logger.warning("tritonserver did not stop within %.0f s; killing it", timeout)
            # Whatever is left in the group (hung stubs, or all of it after a timeout).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            self._exit_code = proc.returncode
        remove_shm_regions(self.shm_prefix)  # a crash or a kill leaves them; a clean stop does not
        if self._owns_log and self._log_path is not None and self._final_log is None:
            self._final_log = self._read_log()
            self._log_path.unlink(missing_ok=True)
        logger.info("tritonserver stopped (exit code %s)", self._exit_code)
        return self._exit_code

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a server that is broken anyway), reap it and
        remove its shm regions. Returns the exit code; the log stays readable."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            self._exit_code = proc.returncode
        remove_shm_regions(self.shm_prefix)
        return self._exit_code

    def stubs(self) -> dict[str, int]:
        """The live python-backend stubs: ``{"<model>_<instance>": pid}``."""
        return {} if self._proc is None or self._exited() else stub_processes(self._proc.pid)

    def _read_log(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def log_text(self) -> str:
        """Everything the server (and its stubs) wrote so far, also after stop()."""
        return self._final_log if self._final_log is not None else self._read_log()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def model_index(self) -> list[dict[str, Any]]:
        """The repository index (name, version, state) as the server reports it."""
        import tritonclient.http as httpclient  # heavy (gevent); only when asked

        client = httpclient.InferenceServerClient(url=self.http_url)
        headers = {ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else None
        try:
            return list(client.get_model_repository_index(headers=headers))
        finally:
            client.close()

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.repository)!r}, http={self.http_url}, {state})"
