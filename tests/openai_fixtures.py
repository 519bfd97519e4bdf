"""A real OpenAI frontend process (`gptpipe openai`, uvicorn on a free port) in front of the
session's in-flight tritonserver; stopped (and checked gone) after the tests that use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from serving.server import free_ports

MODEL = "tiny"
READY_TIMEOUT_S = 60.0
QUEUE_TIMEOUT_S = 1.0  # a request gives up on a full KV pool after this long (the 503 test)


class Frontend:
    def __init__(self, served, *, api_key: Optional[str] = None, extra: tuple[str, ...] = ()) -> None:
        (self.port,) = free_ports(1)
        self.served, self.api_key = served, api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "serving.cli", "openai", "--url", served.server.grpc_url,
                   "--port", str(self.port), "--served-model-name", MODEL,
                   "--queue-timeout", str(QUEUE_TIMEOUT_S), *extra]
        env = {k: v for k, v in os.environ.items() if k != "GPTPIPE_API_KEY"}
        if api_key:
            command += ["--api-key", api_key]
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gptpipe-openai-{self.port}.log"
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        cwd=Path(__file__).resolve().parents[1])
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the frontend exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the frontend was not ready in {READY_TIMEOUT_S} s:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body=None, *, headers=None, raw: Optional[bytes] = None):
        """(status, headers, parsed JSON or text) of one plain HTTP request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if self.api_key and "Authorization" not in all_headers:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, hdrs, text = r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            status, hdrs, text = e.code, dict(e.headers), e.read().decode()
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log_file.close()


@pytest.fixture(scope="module")
def frontend(inflight_session):
    front = Frontend(inflight_session)
    yield front
    front.stop()
    assert front.process.returncode is not None
