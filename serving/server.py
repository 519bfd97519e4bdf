"""Start, wait for and stop a real Triton Inference Server.

Locally the server is the ``tritonserver`` binary (Triton 2.51, python backend only) that
the ``nvidia-pytriton`` wheel carries; with a GPU and Docker it is the project's image built
``FROM nvcr.io/nvidia/tritonserver:24.10-py3`` (see ``docker/``).

Example::

    from serving.server import TritonServer

    with TritonServer("model_repository", http_port=8000) as server:  # started and ready
        print(server.http_url, server.grpc_url, server.metrics_url)

What the local binary needs (found by hand, see the shared FACTS):

* a backend directory we own with ``python/libtriton_python.so``,
  ``python/triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for
  the running Python (the wheel ships one stub per Python version);
* ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` (the copied stub loses its
  ``$ORIGIN`` RUNPATH) and the running interpreter's ``libpython`` directory, so the stub
  embeds the same CPython build as this process instead of whatever ``libpython3.X.so``
  the OS has;
* ``PATH`` starting with this interpreter's ``bin`` directory: the embedded interpreter
  finds its home by looking ``python3`` up on ``PATH``; a venv's ``python3`` brings
  ``pyvenv.cfg`` and with it the venv's site-packages (numpy, onnxruntime, tokenizers and
  this project, editable installs included).
"""

from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Triton 2.51 in both: the local binary of nvidia-pytriton 0.7.0 and this image.
TRITON_BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# The image docker/Dockerfile builds: the base plus this project's python-backend runtime.
DOCKER_IMAGE = "gptpipe-triton:0.1.0"
# docker/Dockerfile.tensorrt: Triton 24.11 (TensorRT 10.6) + gptpipe's TensorRT runtime, for
# repositories whose gpt model is a TensorRT engine (an engine runs only on the TensorRT that built it).
TENSORRT_DOCKER_IMAGE = "gptpipe-triton-trt:0.1.0"
TENSORRT_ENGINE_SUFFIXES = (".plan", ".engine")
CONTAINER_REPOSITORY = "/models"
# Ports inside the container are Triton's defaults; the host side is configurable.
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
DEFAULT_STARTUP_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 30.0
STUB_NAME = "triton_python_backend_stub"

# Options every launch gets: load the whole repository at start-up, say "ready" only when
# every model is, and exit (rather than serve half a repository) when a model fails. On stop,
# in-flight requests get a few seconds; open sequences (idle between steps) must not hold it up.
STARTUP_ARGS = (
    "--model-control-mode=none",
    "--strict-readiness=true",
    "--exit-on-error=true",
    "--exit-timeout-secs=5",
)
# Without a GPU these only produce CUDA errors/warnings at start-up (pinned memory needs the
# CUDA driver, GPU metrics need NVML/DCGM); the python backend does not use them on CPU.
_NO_GPU_ARGS = (
    "--pinned-memory-pool-byte-size=0",
    "--allow-gpu-metrics=false",
)


class TritonServerError(RuntimeError):
    """tritonserver could not be found, started, or did not become ready."""


class PortInUseError(TritonServerError):
    """A port the server should listen on is taken; raised before anything is started."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the nvidia-pytriton wheel keeps tritonserver and its python backend."""

    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path
    version: str


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver in the installed nvidia-pytriton wheel (without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "tritonserver not found: the nvidia-pytriton wheel is not installed "
            "(pip install 'gptpipe[server]'), or use --docker"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    server_dir = package_dir / "tritonserver"
    py = python_version_tag()
    install = TritonInstall(
        binary=server_dir / "bin" / "tritonserver",
        libs_dir=package_dir.parent / "nvidia_pytriton.libs",
        python_backend_dir=server_dir / "backends" / "python",
        stub=server_dir / "python_backend_stubs" / py / STUB_NAME,
        version=importlib.metadata.version("nvidia-pytriton"),
    )
    if not install.stub.is_file():
        shipped = sorted(p.name for p in (server_dir / "python_backend_stubs").glob("*"))
        raise TritonServerError(
            f"nvidia-pytriton {install.version} has no python backend stub for Python {py} "
            f"(it ships {', '.join(shipped)})"
        )
    for path in (install.binary, install.libs_dir, install.python_backend_dir / "libtriton_python.so"):
        if not path.exists():
            raise TritonServerError(f"incomplete nvidia-pytriton install: {path} is missing")
    return install


def default_backend_root(install: TritonInstall) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gptpipe" / "triton-backends" / f"pytriton-{install.version}-py{python_version_tag()}"


def _backend_sources(install: TritonInstall) -> dict[str, Path]:
    """File name in <backends>/python/ -> the wheel file it is copied from."""
    sources = {p.name: p for p in install.python_backend_dir.iterdir() if p.is_file()}
    sources[STUB_NAME] = install.stub
    return sources


def _is_current_copy(target: Path, sources: Mapping[str, Path]) -> bool:
    for name, source in sources.items():
        copy = target / name
        if not copy.is_file():
            return False
        a, b = copy.stat(), source.stat()
        # copy2 keeps mtimes, so size + mtime tell a stale copy from a current one.
        if (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
            return False
    return True


def prepare_backend_directory(install: TritonInstall, root: Path | None = None) -> Path:
    """Build ``<root>/python/`` (the python backend + this Python's stub); return ``root``.

    The result is what ``--backend-directory`` wants. It is reused while it matches the
    wheel; concurrent callers are safe (built in a temporary directory, then renamed).
    """
    root = Path(root) if root is not None else default_backend_root(install)
    target = root / "python"
    sources = _backend_sources(install)
    if _is_current_copy(target, sources):
        return root
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=root))
    for name, source in sources.items():
        shutil.copy2(source, staging / name)  # keeps the stub's exec bit and the mtime
    if target.exists():
        logger.info("replacing stale python backend copy in %s", target)
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        # Another process won the race; its copy is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_current_copy(target, sources):
            raise
    logger.info("python backend for Python %s prepared in %s", python_version_tag(), target)
    return root


def _python_libdir() -> Path | None:
    """Directory holding this interpreter's libpython, if it is a shared build."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return Path(libdir)
    return None


def _prepend(paths: Sequence[Path | str], current: str | None) -> str:
    parts = [str(p) for p in paths] + ([current] if current else [])
    return os.pathsep.join(parts)


def server_env(install: TritonInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so its python stubs run this very Python environment."""
    env = dict(os.environ if base is None else base)
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "python3").exists():
        logger.warning(
            "%s has no python3: python-backend models may not see this environment's packages",
            bin_dir,
        )
    env["PATH"] = _prepend([bin_dir], env.get("PATH"))
    libdir = _python_libdir()
    if libdir is None:
        logger.warning(
            "this Python is not a shared build: the python backend stub will load the "
            "system libpython%s", python_version_tag(),
        )
    lib_paths = [install.libs_dir] + ([libdir] if libdir else [])
    env["LD_LIBRARY_PATH"] = _prepend(lib_paths, env.get("LD_LIBRARY_PATH"))
    return env


def check_repository(repository: Path | str) -> list[str]:
    """Names of the models in a Triton repository; ValueError if it is missing or empty."""
    path = Path(repository)
    if not path.exists():
        raise ValueError(f"repository: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"repository: {path} is not a directory")
    models = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())
    if not models:
        raise ValueError(f"repository: {path} holds no model (expected <model>/config.pbtxt in it)")
    return models


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


# --- ports --------------------------------------------------------------------------

def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free right now (all held open while choosing)."""
    sockets = [socket.socket(_family(host), socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _check_port(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{field}: {value!r} is not a port number in 1..65535")
    return value


def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """Raise PortInUseError naming the port and the option to change, before starting.

    ``ports`` maps a protocol (``http``, ``grpc``, ``metrics``) to its port.
    """
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise ValueError(f"{name}_port: {port} is also the {seen[port]} port; give each its own port")
        seen[port] = name
    for name, port in ports.items():
        flag = f"--{name}-port"
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            # Same as a server: a port in TIME_WAIT is free, one with a listener is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"{name} port {port} on {host} is already in use (another tritonserver?); "
                        f"choose a free one with {flag} (or {name}_port=)"
                    ) from e
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ValueError(f"host: {host} is not an address of this machine") from e
                raise


def _client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _host_port(host: str, port: int) -> str:
    host = _client_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- Docker -------------------------------------------------------------------------

def docker_image_for(repository: Path | str) -> str:
    """The TensorRT image when the repository's `gpt` model holds a TensorRT engine
    (``gpt/<version>/*.plan``), else the default image."""
    gpt = Path(repository) / "gpt"
    engines = [p for p in gpt.glob("*/*") if p.suffix in TENSORRT_ENGINE_SUFFIXES and p.is_file()]
    return TENSORRT_DOCKER_IMAGE if engines else DOCKER_IMAGE


def docker_command(
    repository: Path | str,
    *,
    image: str = DOCKER_IMAGE,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
) -> list[str]:
    """``docker run`` for the project's Triton image with ``repository`` mounted at /models.

    The host ports are published on ``host`` only (127.0.0.1 by default); inside the
    container Triton listens on its default ports on all interfaces, as Docker needs.
    """
    ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
    for name, port in ports.items():
        _check_port(port, f"{name}_port")
    bind = f"[{host}]" if ":" in host else host
    publish: list[str] = []
    for name, port in ports.items():
        publish += ["-p", f"{bind}:{port}:{CONTAINER_PORTS[name]}"]
    return [
        "docker", "run", "--gpus", "all", "--rm",
        # The python backend exchanges tensors with its stubs through /dev/shm; Docker's
        # default 64 MB is too small for KV caches. Limits as in NVIDIA's Triton docs.
        "--shm-size=1g", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864",
        *publish,
        "-v", f"{Path(repository).resolve()}:{CONTAINER_REPOSITORY}:ro",
        image,
        "tritonserver", f"--model-repository={CONTAINER_REPOSITORY}", *STARTUP_ARGS,
    ]


# --- the local server ---------------------------------------------------------------

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
    ) -> None:
        self.repository = Path(repository).resolve()
        self.host = host
        self.ports = {
            "http": _check_port(http_port, "http_port"),
            "grpc": _check_port(grpc_port, "grpc_port"),
            "metrics": _check_port(metrics_port, "metrics_port"),
        }
        if not isinstance(log_verbose, int) or log_verbose < 0:
            raise ValueError(f"log_verbose: {log_verbose!r} must be an integer >= 0")
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.backend_directory = Path(backend_directory) if backend_directory else None
        self.startup_timeout = startup_timeout
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
        return _host_port(self.host, self.ports["http"])

    @property
    def grpc_url(self) -> str:
        return _host_port(self.host, self.ports["grpc"])

    @property
    def metrics_url(self) -> str:
        return f"http://{_host_port(self.host, self.ports['metrics'])}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

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
        if self._owns_log and self._log_path is not None and self._final_log is None:
            self._final_log = self._read_log()
            self._log_path.unlink(missing_ok=True)
        logger.info("tritonserver stopped (exit code %s)", self._exit_code)
        return self._exit_code

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
        try:
            return list(client.get_model_repository_index())
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
