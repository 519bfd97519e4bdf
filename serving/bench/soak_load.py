"""The soak suite's load: one request of each kind (client-side gRPC, server-side gRPC, HTTP SSE,
OpenAI SSE, a child process killed mid-stream), run to the end, cancelled, or killed, with its outcome."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from serving.generation import GptpipeError

KINDS = ("grpc-client", "grpc-server", "http-sse", "openai")
STEP_TIMEOUT_S = 30.0  # the most any one token may take (client timeout_s, socket timeouts)
CHILD_START_TIMEOUT_S = 60.0

_CHILD = r"""
import sys
from serving import Client
url, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client(url, timeout_s=30) as client:
    for event in client.events(prompt, max_new_tokens=n, temperature=0):
        print(event.token_id, flush=True)
"""


@dataclass
class Plan:
    kind: str
    prompt_index: int
    max_tokens: int
    greedy: bool
    cancel_after: Optional[int] = None  # stop reading after this many tokens
    kill_after: Optional[int] = None  # SIGKILL the child process after this many tokens


@dataclass
class Outcome:
    kind: str
    prompt_index: int
    max_tokens: int
    greedy: bool
    started: float
    ended: float = 0.0
    ttft_s: Optional[float] = None
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    status: str = "ok"  # ok | cancelled | killed | error
    error_type: Optional[str] = None
    error: Optional[str] = None
    check: Optional[str] = None  # match | mismatch | None (not checked)
    classification: Optional[str] = None

    def record(self) -> dict:
        d = asdict(self)
        d["tokens"] = len(self.token_ids) or None
        d.pop("token_ids")
        d["text"] = self.text[:80]
        return d


class HttpStreamError(Exception):
    """A typed error from a raw HTTP stream: an HTTP status with its body, or an error event."""


def _sse(conn: http.client.HTTPConnection, path: str, body: dict, headers: Optional[dict] = None):
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    if response.status != 200:
        raise HttpStreamError(f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}")
    for line in response:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        yield json.loads(payload)


class Runner:
    """Runs plans against one server; thread-safe (one Client shared by the threads)."""

    def __init__(self, server: Any, prompts: list[str], openai_model: Optional[str]) -> None:
        from serving import Client

        self.server, self.prompts, self.openai_model = server, prompts, openai_model
        self.client = Client(server.grpc_url, timeout_s=STEP_TIMEOUT_S)
        self.children: set = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()
        with self._lock:
            for child in list(self.children):
                child.kill()

    def run(self, plan: Plan) -> Outcome:
        out = Outcome(plan.kind, plan.prompt_index, plan.max_tokens, plan.greedy, started=time.time())
        try:
            if plan.kill_after is not None:
                self._killed_child(plan, out)
            elif plan.kind in ("grpc-client", "grpc-server"):
                self._grpc(plan, out)
            elif plan.kind == "http-sse":
                self._http_sse(plan, out)
            else:
                self._openai(plan, out)
        except (GptpipeError, HttpStreamError, OSError, http.client.HTTPException, ValueError) as e:
            out.status = "error"
            out.error_type = type(e).__name__
            out.error = str(e)[:400]
        except Exception as e:  # noqa: BLE001 - anything else is an unexplained error of the suite
            out.status = "error"
            out.error_type = "unexpected:" + type(e).__name__
            out.error = str(e)[:400]
        out.ended = time.time()
        return out

    def _token(self, out: Outcome, t0: float) -> None:
        if out.ttft_s is None:
            out.ttft_s = time.perf_counter() - t0

    def _grpc(self, plan: Plan, out: Outcome) -> None:
        t0 = time.perf_counter()
        events = self.client.events(self.prompts[plan.prompt_index], max_new_tokens=plan.max_tokens,
                                    temperature=0 if plan.greedy else 0.8, top_k=0 if plan.greedy else 40,
                                    mode="client" if plan.kind == "grpc-client" else "server")
        try:
            for event in events:
                self._token(out, t0)
                out.token_ids.append(event.token_id)
                out.text += event.text
                out.finish_reason = event.finish_reason
                if plan.cancel_after is not None and len(out.token_ids) >= plan.cancel_after:
                    out.status = "cancelled"
                    break
        finally:
            events.close()

    def _http_sse(self, plan: Plan, out: Outcome) -> None:
        body = {"text_input": self.prompts[plan.prompt_index], "max_tokens": plan.max_tokens,
                "temperature": 0 if plan.greedy else 0.8}
        conn = http.client.HTTPConnection(self.server.http_url.split(":")[0],
                                          int(self.server.http_url.split(":")[1]), timeout=STEP_TIMEOUT_S)
        t0 = time.perf_counter()
        try:
            for data in _sse(conn, "/v2/models/generate/generate_stream", body):
                if "error" in data:
                    raise HttpStreamError(f"error event: {data['error']}")
                self._token(out, t0)
                ids = data.get("output_ids")
                if ids is not None:
                    out.token_ids.extend(ids if isinstance(ids, list) else [ids])
                out.text += data.get("text_output", "")
                out.finish_reason = data.get("finish_reason") or out.finish_reason
                if plan.cancel_after is not None and len(out.token_ids) >= plan.cancel_after:
                    out.status = "cancelled"
                    break
                if out.finish_reason:
                    break
        finally:
            conn.close()

    def _openai(self, plan: Plan, out: Outcome) -> None:
        host, port = self.server.openai_base.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=STEP_TIMEOUT_S)
        chat = not plan.greedy  # greedy requests go to /v1/completions (the prompt as is, checked)
        body: dict = {"model": self.openai_model, "max_tokens": plan.max_tokens, "stream": True,
                      "temperature": 0 if plan.greedy else 0.8}
        if chat:
            # the chat template adds tokens: a short message keeps it inside a small model's context
            words = self.prompts[plan.prompt_index].split()[:8]
            body["messages"] = [{"role": "user", "content": " ".join(words)}]
        else:
            body["prompt"] = self.prompts[plan.prompt_index]
        t0 = time.perf_counter()
        chunks = 0
        try:
            for data in _sse(conn, "/v1/chat/completions" if chat else "/v1/completions", body):
                if "error" in data:
                    raise HttpStreamError(f"error event: {data['error']}")
                for choice in data.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        self._token(out, t0)
                        out.text += piece
                        chunks += 1
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                if plan.cancel_after is not None and chunks >= plan.cancel_after:
                    out.status = "cancelled"
                    break
        finally:
            conn.close()

    def _killed_child(self, plan: Plan, out: Outcome) -> None:
        """A client-side gRPC stream in a child process, SIGKILLed after `kill_after` tokens."""
        child = subprocess.Popen([sys.executable, "-c", _CHILD, self.server.grpc_url,
                                  self.prompts[plan.prompt_index], str(plan.max_tokens)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        with self._lock:
            self.children.add(child)
        timer = threading.Timer(CHILD_START_TIMEOUT_S, child.kill)  # bound: a child that never streams
        timer.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                out.token_ids.append(int(line))
                if len(out.token_ids) >= plan.kill_after:
                    child.send_signal(signal.SIGKILL)
                    break
            child.wait(10)
            if child.returncode == -signal.SIGKILL and len(out.token_ids) >= plan.kill_after:
                out.status = "killed"
            elif child.returncode == 0:
                out.status = "ok"  # it finished before the kill point (a short generation)
            else:
                err = child.stderr.read().decode(errors="replace")[-400:] if child.stderr else ""
                raise HttpStreamError(f"child client exited {child.returncode}: {err}")
        finally:
            timer.cancel()
            if child.poll() is None:
                child.kill()
                child.wait(10)
            with self._lock:
                self.children.discard(child)
