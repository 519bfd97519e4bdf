"""A client that dies frees its KV slots within seconds (issue 14, finding 4): client-side streams
(the step's open request is the sequence's lease), server-side gRPC streams and HTTP SSE."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from serving.client import Client
from tests.conftest import metric, wait_for

# A process that opens 8 generations, reads the first token of each, says "ready" and waits.
CHILD = r'''
import sys, time
from serving.client import Client
client = Client(sys.argv[1], protocol=sys.argv[2])
streams = [client.events("hello there", max_new_tokens=120, temperature=0.8, mode=sys.argv[3], ignore_eos=True)
           for _ in range(8)]
for s in streams:
    next(s)
print("ready", flush=True)
time.sleep(120)
'''


def _kill_a_client_with_8_streams(served, protocol: str, mode: str) -> float:
    url = served.server.grpc_url if protocol == "grpc" else served.server.http_url
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, protocol, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        if mode == "client":  # the server-side loop runs ahead of its reader: some may be done already
            assert served.active_sequences() == 8
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    t0 = time.monotonic()
    assert wait_for(lambda: served.active_sequences() == 0, timeout=5.0), served.active_sequences()
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["client", "server"])
def test_sigkilled_client_with_8_grpc_streams_frees_its_slots_within_5s(inflight, mode):
    """No request is sent after the kill: the gauges must move by themselves (the watcher)."""
    freed_s = _kill_a_client_with_8_streams(inflight, "grpc", mode)
    assert metric(inflight.server, "gptpipe_kv_free_slots") == 8
    with Client(inflight.server.grpc_url) as client:  # and the server serves on
        assert client.generate("hello", max_new_tokens=3, temperature=0).finish_reason == "length"
    print(f"{mode}-side: 8 slots freed {freed_s:.2f} s after SIGKILL")


def test_sigkilled_http_sse_client_frees_its_slots_within_5s(inflight):
    """(The server-side paths cancelled on a dead client before issue 14 too; kept as guards.)"""
    _kill_a_client_with_8_streams(inflight, "http", "server")


def test_closed_sse_socket_stops_the_generation(inflight):
    before = metric(inflight.server, "gptpipe_step_requests_total")
    body = json.dumps({"text_input": "hello", "max_tokens": 100, "stream": True}).encode()
    host, port = inflight.server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v2/models/generate/generate_stream HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        received, deadline = b"", time.monotonic() + 10
        while b"data:" not in received and time.monotonic() < deadline:  # headers and events come apart
            received += s.recv(4096)
        assert b"data:" in received
    assert wait_for(lambda: inflight.active_sequences() == 0, timeout=5.0)
    time.sleep(0.5)
    steps = metric(inflight.server, "gptpipe_step_requests_total") - before
    assert steps < 50, f"{steps} steps ran for a client that left after the first token (of 100)"
