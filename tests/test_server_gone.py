"""When the server goes away mid-generation, every path raises ServerUnavailableError naming the URL
(issue 14, finding 8): client-side and server-side loops, gRPC and HTTP, blocking and asyncio."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from serving.client import AsyncClient, Client
from serving.generation import ServerUnavailableError

KW = dict(max_new_tokens=100, temperature=0.8, stream=True)


class _Loop:
    """An event loop on a thread of its own: async streams that outlive one call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _open(server, paths, loop):
    """(name, url, next_delta, close) for each path, each stream's first delta already read."""
    opened = []
    for protocol, mode, kind in paths:
        url = server.grpc_url if protocol == "grpc" else server.http_url
        name = f"{kind} {mode}-side {protocol}"
        if kind == "sync":
            client = Client(url, protocol=protocol, timeout_s=10)
            stream = client.generate("hello there", mode=mode, **KW)
            opened.append((name, url, lambda s=stream: next(s), client.close))
        else:
            client = AsyncClient(url, protocol=protocol, timeout_s=10)
            stream = loop.run(_agenerate(client, mode))
            opened.append((name, url, lambda s=stream: loop.run(s.__anext__()),
                           lambda c=client: loop.run(c.close())))
        opened[-1][2]()  # the first delta: the generation runs
    return opened


async def _agenerate(client, mode):
    return client.generate("hello there", mode=mode, **KW)


def _errors_after_kill(server, paths):
    loop = _Loop()
    opened = []
    try:
        opened = _open(server, paths, loop)
        os.kill(server.pid, signal.SIGKILL)
        errors = {}
        for name, url, next_delta, _ in opened:
            try:
                for _ in range(1000):
                    next_delta()
                errors[name] = (url, None)
            except (StopIteration, StopAsyncIteration):
                errors[name] = (url, "ended without an error")
            except Exception as e:  # noqa: BLE001 - what the test looks at
                errors[name] = (url, e)
        return errors
    finally:
        for *_, close in opened:
            try:
                close()
            except Exception:  # noqa: BLE001 - the server is gone
                pass
        loop.close()
        server.stop()


def _check(errors):
    wrong = {name: f"{type(e).__name__}: {e}" for name, (url, e) in errors.items()
             if not (isinstance(e, ServerUnavailableError) and url in str(e))}
    assert not wrong, wrong


def test_server_killed_mid_generation_decoupled_gpt(inflight, triton_server_factory):
    server = triton_server_factory(inflight.repository)
    _check(_errors_after_kill(server, [("grpc", "client", "sync"), ("grpc", "client", "async")]))


@pytest.mark.parametrize("path", [("grpc", "server", "sync"), ("grpc", "server", "async"),
                                  ("http", "server", "sync"), ("http", "server", "async")])
def test_server_killed_mid_server_side_generation(inflight, triton_server_factory, path):
    """One server-side stream per server: a stream the server runs on its own would finish while
    the next ones are being opened, and a finished stream has nothing left to fail."""
    server = triton_server_factory(inflight.repository)
    _check(_errors_after_kill(server, [path]))


def test_server_killed_mid_generation_plain_gpt(served, triton_server_factory):
    server = triton_server_factory(served.repository)
    _check(_errors_after_kill(server, [
        ("grpc", "client", "sync"), ("grpc", "client", "async"),
        ("http", "client", "sync"), ("http", "client", "async"),
    ]))


def test_a_server_that_never_was_is_unavailable_on_every_path():
    for protocol in ("grpc", "http"):
        for mode in ("client", "server"):
            with Client("127.0.0.1:1", protocol=protocol, timeout_s=5) as client:
                with pytest.raises(ServerUnavailableError, match="127.0.0.1:1"):
                    client.generate("hello", max_new_tokens=2, mode=mode)


def test_new_server_side_generations_after_the_server_died_are_unavailable(inflight, triton_server_factory):
    """A client that had served requests, after its server was SIGKILLed: every new server-side
    gRPC generation raises ServerUnavailableError. tritonclient's stream fails before the
    request is written, and its raw "The stream is no longer in valid state" came out untyped
    (the fault soak counted 66 of them)."""
    server = triton_server_factory(inflight.repository)
    with Client(server.grpc_url, timeout_s=10) as client:
        assert client.generate("hello there", max_new_tokens=2, temperature=0, mode="server").token_ids
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
        for _ in range(20):
            with pytest.raises(ServerUnavailableError, match=server.grpc_url):
                client.generate("hello there", max_new_tokens=2, temperature=0, mode="server")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_reconnects_within_a_second_of_its_restarted_server(inflight, triton_server_factory, stream):
    """A restarted server (the supervisor's restart: same ports) is reached again at once. gRPC's
    default reconnect backoff grows to 120 s: after a 20 s outage the soak's frontend still got
    "failed to connect" seconds after the server was back."""
    import time

    server = triton_server_factory(inflight.repository)
    with Client(server.grpc_url, timeout_s=10) as client:
        def generate():
            return client.generate("hello there", max_new_tokens=2, temperature=0, stream=stream)

        assert generate()
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # failing calls through the outage, as traffic does
            with pytest.raises(ServerUnavailableError):
                list(generate()) if stream else generate()
            time.sleep(0.5)
        server.start()
        server.wait_ready(120)
        ready, waited = time.monotonic(), None
        while time.monotonic() - ready < 15:
            try:
                list(generate()) if stream else generate()
                waited = time.monotonic() - ready
                break
            except ServerUnavailableError:
                time.sleep(0.05)
        assert waited is not None and waited < 1.5, waited
