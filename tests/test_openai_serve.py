"""`gptpipe serve` starts the OpenAI frontend after Triton is ready and stops it with the server:
a chat completion through the `openai` package, then SIGTERM, exit code 0, no process left."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import openai
import psutil

from serving.server import free_ports
from tests.test_server import _all_gone

SERVE_APP = "from serving.cli import app; app()"


def test_serve_runs_the_frontend_and_leaves_nothing_behind(inflight_session, tmp_path):
    repository = inflight_session.repository
    http, grpc, metrics, port = free_ports(4)
    assert not (repository / "manifest.json").exists()  # so the model id is the default
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_APP, "serve", "--repository", str(repository), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not output or "Press Ctrl-C to stop." not in output[-1]:
            assert proc.poll() is None, "".join(output)
            output.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        assert f"OpenAI   http://127.0.0.1:{port}/v1  (model 'gptpipe')" in "".join(output)
        children = psutil.Process(proc.pid).children(recursive=True)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
            out = client.chat.completions.create(model="gptpipe", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0)
        assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _all_gone(children)
    while not lines.empty():
        output.append(lines.get())
    assert "Stopped." in "".join(output)
    assert_nothing_listens(port)


def test_the_served_model_name_comes_from_the_manifest(tmp_path):
    from serving.openai.background import served_model_name

    assert served_model_name(tmp_path) == "gptpipe"
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "demo"}))
    assert served_model_name(tmp_path) == "demo"
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "/ckpts/my-gpt2/"}))
    assert served_model_name(tmp_path) == "my-gpt2"


def assert_nothing_listens(port: int) -> None:
    """Nothing listens on the frontend's port any more."""
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
