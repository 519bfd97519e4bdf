"""The soak suite's server side: `gptpipe serve` as a subprocess on loopback ports, its processes
(tritonserver, python-backend stubs) sampled for RSS, file descriptors and KV slots, and cleaned up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from serving.server import free_ports

HOST = "127.0.0.1"
SHM_PREFIX = "triton_python_backend_shm_region_"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def serve_help() -> str:
    """`gptpipe serve --help`: what this checkout's serve command supports."""
    out = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    return out.stdout + out.stderr


def http_get(url: str, timeout: float = 2.0) -> Optional[bytes]:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class Sample:
    t: float
    triton_pid: Optional[int]
    rss_mib: Optional[float]
    fds: Optional[int]
    kv_active: Optional[float]


@dataclass
class SoakServer:
    """One `gptpipe serve` subprocess (its own session, so cleanup reaches every child)."""

    repository: Path
    openai: bool
    log_path: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    openai_port: int = 0
    proc: Optional[subprocess.Popen] = None
    shm_regions: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port, self.openai_port = free_ports(4, HOST)

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def openai_base(self) -> str:
        return f"{HOST}:{self.openai_port}"

    def start(self, timeout: float = 180.0) -> float:
        args = [sys.executable, "-m", "serving.cli", "serve", "--repository", str(self.repository),
                "--host", HOST, "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port)]
        if self.openai:
            args += ["--openai-port", str(self.openai_port)]
        elif "--no-openai" in serve_help():
            args += ["--no-openai"]
        self.log = open(self.log_path, "wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if not self.wait_ready(timeout):
            raise RuntimeError(f"gptpipe serve was not ready in {timeout:.0f} s; log tail:\n{self.log_tail()}")
        return time.monotonic() - started

    def ready(self) -> bool:
        if http_get(f"http://{self.http_url}/v2/models/gpt/ready") is None:
            return False
        if http_get(f"http://{self.http_url}/v2/models/generate/ready") is None:
            return False
        return not self.openai or http_get(f"http://{self.openai_base}/v1/models") is not None

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            if self.ready():
                return True
            time.sleep(0.2)
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def restarts(self) -> list[str]:
        """Why the supervisor restarted tritonserver, once per restart (its "[restarting] ..." lines)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if line.startswith("[restarting]")]

    # ------------------------------------------------------------ processes
    def triton(self) -> Optional[psutil.Process]:
        if self.proc is None:
            return None
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name().startswith("tritonserver"):
                    return child
        except psutil.Error:
            pass
        return None

    def stubs(self, triton: Optional[psutil.Process] = None) -> list[psutil.Process]:
        triton = triton or self.triton()
        if triton is None:
            return []
        try:
            return [p for p in triton.children(recursive=True) if "stub" in p.name()]
        except psutil.Error:
            return []

    def stub_of(self, model: str) -> Optional[psutil.Process]:
        """The python-backend stub of `model` (its cmdline names the model's folder)."""
        for stub in self.stubs():
            try:
                if any(f"/{model}/" in arg for arg in stub.cmdline()):
                    return stub
            except psutil.Error:
                continue
        return None

    def kv_active(self) -> Optional[float]:
        text = http_get(f"http://{HOST}:{self.metrics_port}/metrics")
        if text is None:
            return None
        match = re.search(r"^gptpipe_kv_active_sequences\{[^}]*\} (\S+)$", text.decode(), re.M)
        return float(match.group(1)) if match else None

    def sample(self, t: float) -> Sample:
        triton = self.triton()
        rss = fds = None
        if triton is not None:
            procs = [triton, *self.stubs(triton)]
            rss_b, fds = 0, 0
            try:
                for p in procs:
                    rss_b += p.memory_info().rss
                    fds += p.num_fds()
                    for arg in p.cmdline():
                        if arg.startswith(SHM_PREFIX):
                            self.shm_regions.add(arg)
                rss = rss_b / 2**20
            except psutil.Error:
                rss = fds = None
        return Sample(t, triton.pid if triton else None, rss, fds, self.kv_active())

    def stop(self, timeout: float = 45.0) -> dict:
        """SIGTERM, wait, then SIGKILL the whole session; remove this server's /dev/shm regions."""
        result = {"rc": None, "hard_killed": False, "shm_left": [], "shm_removed": []}
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    result["hard_killed"] = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            result["rc"] = self.proc.returncode
            self.log.close()
        time.sleep(0.5)
        for name in sorted(self.shm_regions):
            path = Path("/dev/shm") / name
            if path.exists():
                result["shm_left"].append(name)
                try:
                    path.unlink()
                    result["shm_removed"].append(name)
                except OSError:
                    pass
        return result
