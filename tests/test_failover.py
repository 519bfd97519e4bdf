"""Several Triton replicas behind one client: three real tritonserver processes serving the same
repository (the tiny export, in-flight batching), the client given all three.

Sequences are spread over the replicas and stay on theirs; one replica is SIGKILLed while
generations are mid-stream (client-side loops paused between tokens by their consumer; a
server-side `generate` stream frozen with SIGSTOP right after its first token, so that it is
mid-stream for sure): every generation completes, greedy ones with the PyTorch reference's
tokens, a sampled one with the tokens of the same seed's run without failure; the killed replica
is skipped, and serves its sequences again once restarted and ready.

The correlation ids (random in the client) come from a list here, chosen so that each replica
owns a known share: with 12 random ids one replica gets none 2% of the time. Everything else
(the router, its probes, the transports, the servers) is the real thing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import signal
import socket
from contextlib import closing
from pathlib import Path

import pytest

from serving import AsyncClient, Client, ServerUnavailableError
from serving.client import failover
from serving.client.request import _new_correlation_id
from serving.client.routing import rendezvous_order
from serving.server import TritonServer, free_ports
from tests.conftest import metric, wait_for
from tests.test_client_errors import shm_files_of
from tests.triton_fixtures import READY_TIMEOUT_S, attach_server_log

PROMPTS = ["The return statement", "A class is", "def main():", "import os", "while True:", "An exception",
           "The for loop", "print(", "A tuple", "Lists are", "x = 1", "Modules"]
CLIENT_TOKENS = 60  # per client-side generation (prompts are ~2-6 tokens; n_positions is 128)
SERVER_TOKENS = 100  # per server-side stream


class Replicas:
    def __init__(self, model, tokenizer, repository: Path, servers: list[TritonServer]) -> None:
        self.model, self.tokenizer, self.repository, self.servers = model, tokenizer, repository, servers
        self._killed_shm: set[Path] = set()

    @property
    def urls(self) -> list[str]:
        return [s.grpc_url for s in self.servers]

    def reference(self, prompt: str, n: int, *, eos: bool = False) -> list[int]:
        """PyTorch's greedy tokens (eos ignored unless ``eos``: the streams run with ignore_eos)."""
        from export.model import generate_greedy

        return generate_greedy(self.model, self.tokenizer.encode(prompt), n,
                               eos_token_id=self.model.config.eos_token_id if eos else None)

    def text(self, prompt: str, ids: list[int]) -> str:
        """The text a generation of ``ids`` after ``prompt`` shows (no stop strings)."""
        from serving.tokenizer import TextStream

        stream = TextStream(self.tokenizer, (), prompt_ids=self.tokenizer.encode(prompt))
        return "".join(stream.push(i)[0] for i in ids) + stream.flush()

    def kill(self, i: int) -> None:
        """SIGKILL replica i with its stubs (its /dev/shm regions are removed at teardown)."""
        server = self.servers[i]
        self._killed_shm |= shm_files_of(server.pid)
        os.killpg(server.pid, signal.SIGKILL)
        server.stop()  # reaps it

    def freeze(self, i: int) -> None:
        os.killpg(self.servers[i].pid, signal.SIGSTOP)

    def restart(self, i: int) -> TritonServer:
        old = self.servers[i]
        server = TritonServer(self.repository, http_port=old.ports["http"], grpc_port=old.ports["grpc"],
                              metrics_port=old.ports["metrics"])
        self.servers[i] = server.start()
        server.wait_ready(READY_TIMEOUT_S)
        return server

    def cleanup(self) -> None:
        for server in self.servers:
            server.stop()
        for path in self._killed_shm:
            path.unlink(missing_ok=True)


def start_all(repository: Path, n: int) -> list[TritonServer]:
    """n servers of one repository, started together, then waited for."""
    servers = []
    try:
        for _ in range(n):
            http, grpc, metrics = free_ports(3)
            servers.append(TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics).start())
        for server in servers:
            server.wait_ready(READY_TIMEOUT_S)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture(scope="module")
def replicas_module(tiny_export, tmp_path_factory):
    from serving.repository import ServingOptions, write_repository

    model, tokenizer, onnx_path = tiny_export
    repository = write_repository(tmp_path_factory.mktemp("replicas") / "repo", engine_file=onnx_path,
                                  tokenizer_json=tokenizer.to_str(), model_config=model.config.to_dict(),
                                  options=ServingOptions(max_sequences=8))
    replicas = Replicas(model, tokenizer, repository, start_all(repository, 3))
    yield replicas
    replicas.cleanup()


@pytest.fixture
def replicas(replicas_module, request):
    for server in replicas_module.servers:
        attach_server_log(request, server)
    return replicas_module


def owned_ids(urls: list[str], owner: str, n: int, start: int = 1) -> list[int]:
    """n correlation ids whose rendezvous owner among ``urls`` is ``owner``."""
    return list(itertools.islice((i for i in itertools.count(start) if rendezvous_order(i, urls)[0] == owner), n))


@pytest.fixture
def ids(monkeypatch):
    """The correlation ids the client draws next (then random ones again)."""
    queue: collections.deque[int] = collections.deque()
    monkeypatch.setattr(failover, "_new_correlation_id", lambda: queue.popleft() if queue else _new_correlation_id())
    return queue


def active(server: TritonServer) -> float:
    return metric(server, "gptpipe_kv_active_sequences")


def balanced(urls: list[str], per_replica: int) -> tuple[list[int], dict[int, str]]:
    """per_replica ids owned by each url, interleaved, and each id's owner."""
    by_owner = [owned_ids(urls, url, per_replica, start=1000 * (k + 1)) for k, url in enumerate(urls)]
    chosen = [i for group in zip(*by_owner) for i in group]
    return chosen, {i: rendezvous_order(i, urls)[0] for i in chosen}


def test_one_url_is_the_single_server_client_and_no_replica_left_is_a_clear_error() -> None:
    with Client("127.0.0.1:8001") as one:
        assert one._replicas.router is None and one.endpoints == ["127.0.0.1:8001"]
    dead = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead.append(f"127.0.0.1:{sock.getsockname()[1]}")
    with Client(",".join(dead), timeout_s=2) as client:
        assert client.endpoints == sorted(dead)
        with pytest.raises(ServerUnavailableError, match="no Triton endpoint answered") as info:
            client.generate("x", max_new_tokens=2)
        assert all(url in str(info.value) for url in dead)
        with pytest.raises(ServerUnavailableError, match="no healthy Triton endpoint: " + ", ".join(sorted(dead))):
            client.generate("x", max_new_tokens=2)


def test_twelve_concurrent_generations_are_spread_over_the_replicas(replicas, ids) -> None:
    chosen, owner = balanced(replicas.urls, 4)
    ids.extend(chosen)
    counter = "gptpipe_step_requests_total"
    before = [metric(s, counter) for s in replicas.servers]
    with Client(replicas.urls) as client:
        results = client.generate(PROMPTS, max_new_tokens=12, temperature=0)
    assert [r.token_ids for r in results] == [replicas.reference(p, 12, eos=True) for p in PROMPTS]
    served_by = collections.Counter(r.timings.endpoints for r in results)
    assert served_by == {(url,): 4 for url in replicas.urls}  # one replica each, 4 per replica
    assert all(r.timings.failovers == 0 for r in results)
    after = [metric(s, counter) for s in replicas.servers]
    assert all(a - b >= 4 for a, b in zip(after, before)), (before, after)  # each replica stepped some


def test_a_replica_killed_mid_stream_loses_no_token_and_comes_back(replicas, ids) -> None:
    """Sync client, both loops: 3 client-side generations + 1 server-side stream per replica."""
    urls, victim = replicas.urls, 1
    sampled = dict(temperature=0.9, top_k=40, seed=11)
    with Client(urls, timeout_s=10) as client:
        expected_sampled = [e.token_id for e in client.events(PROMPTS[4], max_new_tokens=CLIENT_TOKENS,
                                                                ignore_eos=True, **sampled)]
        chosen, owner = balanced(urls, 4)  # generation k on owner[chosen[k]]
        server_side = {k for k in range(12) if k % 4 == 3}  # 3, 7, 11: one per replica
        order = [k for k in range(12) if k not in server_side] + sorted(server_side)
        ids.extend(chosen[k] for k in order)  # drawn in the order the generations start
        on_victim = {k for k in range(12) if owner[chosen[k]] == urls[victim]}
        assert len(on_victim) == 4 and len(on_victim & server_side) == 1
        streams, seen = {}, {}
        with contextlib.ExitStack() as opened:  # every stream closed, also when an assert fails
            for k in order:
                server = k in server_side
                if k == order[9]:  # the 9 client-side sequences are open and paused: 3 on each replica
                    for s in replicas.servers:
                        assert wait_for(lambda s=s: active(s) == 3, 5), active(s)
                kw = sampled if k == 4 else dict(temperature=0)
                streams[k] = opened.enter_context(closing(client.events(
                    PROMPTS[k], max_new_tokens=SERVER_TOKENS if server else CLIENT_TOKENS,
                    mode="server" if server else "client", ignore_eos=True, **kw)))
                seen[k] = [next(streams[k])]
                if server and k in on_victim:
                    replicas.freeze(victim)  # mid-stream for sure: frozen right after its first token
            assert {k: e[0].endpoint for k, e in seen.items()} == {k: owner[chosen[k]] for k in range(12)}
            replicas.kill(victim)
            for k in order:
                seen[k].extend(streams[k])
        for k, got in seen.items():
            n = SERVER_TOKENS if k in server_side else CLIENT_TOKENS
            tokens = [e.token_id for e in got]
            assert tokens == (expected_sampled if k == 4 else replicas.reference(PROMPTS[k], n)), k
            assert "".join(e.text for e in got) == replicas.text(PROMPTS[k], tokens), k  # none lost at the move
            assert got[-1].finish_reason == "length"
            if k in on_victim:
                assert got[-1].failovers == 1 and got[0].endpoint == urls[victim], k
                assert got[-1].endpoint != urls[victim], k
            else:
                assert got[-1].failovers == 0 and {e.endpoint for e in got} == {owner[chosen[k]]}, k
        # skipped while down: its sequences go to the others
        router = client._replicas.router
        assert router.failed() == [urls[victim]]
        ids.extend(owned_ids(urls, urls[victim], 2))
        for result in client.generate(PROMPTS[:2], max_new_tokens=4, temperature=0):
            assert result.timings.failovers == 0 and urls[victim] not in result.timings.endpoints
        # restarted on its ports and ready: the router's probe brings it back, and its sequences
        replicas.restart(victim)
        assert wait_for(lambda: router.failed() == [], 15)
        ids.extend(owned_ids(urls, urls[victim], 2))
        for result in client.generate(PROMPTS[:2], max_new_tokens=4, temperature=0):
            assert result.timings.endpoints == (urls[victim],) and result.timings.failovers == 0


def test_the_async_client_fails_over_too(replicas, ids) -> None:
    """AsyncClient, both loops: 2 client-side generations and 1 server-side stream on the victim."""
    urls, victim = replicas.urls, 2
    ids.extend(owned_ids(urls, urls[victim], 3))
    modes = ["client", "client", "server"]
    lengths = [SERVER_TOKENS if mode == "server" else CLIENT_TOKENS for mode in modes]

    async def scenario():
        async with AsyncClient(urls, timeout_s=10) as client:
            streams, seen = [], []
            async with contextlib.AsyncExitStack() as opened:
                for k, mode in enumerate(modes):
                    streams.append(await opened.enter_async_context(contextlib.aclosing(await client.events(
                        PROMPTS[k], max_new_tokens=lengths[k], temperature=0, mode=mode, ignore_eos=True))))
                    seen.append([await streams[k].__anext__()])
                replicas.freeze(victim)
                replicas.kill(victim)
                for events, got in zip(streams, seen):
                    got.extend([e async for e in events])
            router = client._replicas.router
            assert router.failed() == [urls[victim]]
            replicas.restart(victim)  # on this thread: a server dies with the thread that started it (PDEATHSIG)
            assert await asyncio.to_thread(wait_for, lambda: router.failed() == [], 15)
            ids.extend(owned_ids(urls, urls[victim], 1))
            back = await client.generate(PROMPTS[0], max_new_tokens=4, temperature=0)
            return seen, back

    seen, back = asyncio.run(scenario())
    for k, got in enumerate(seen):
        assert [e.token_id for e in got] == replicas.reference(PROMPTS[k], lengths[k]), k
        assert "".join(e.text for e in got) == replicas.text(PROMPTS[k], [e.token_id for e in got]), k
        assert got[0].endpoint == urls[victim] and got[-1].failovers == 1, k
        assert got[-1].endpoint != urls[victim] and got[-1].finish_reason == "length", k
    assert back.timings.endpoints == (urls[victim],)


def test_what_counts_as_a_replica_failure() -> None:
    """The messages a replica that lost a sequence sends (gpt's scheduler; Triton's sequence
    batcher, FACTS.md) move the sequence without marking the replica failed; a transport
    failure marks it; any other error is the caller's."""
    from serving.client.errors import error_from_message
    from serving.generation import InvalidParameterError, ServerBusyError, ServerError

    lost = [error_from_message("unknown sequence id 77: start it with the START flag (it may have ended, failed, "
                               "or idled out after 60 s)"),
            error_from_message("inference request for sequence 77 to model 'gpt' must specify the START flag on "
                               "the first request of the sequence")]
    assert [failover._replica_failure(e) for e in lost] == ["lost", "lost"]
    assert failover._replica_failure(ServerUnavailableError("Triton server at x:1 (grpc) is unavailable")) == "down"
    assert failover._replica_failure(ServerError("the gpt stream ended without an answer")) == "down"
    for error in (ServerBusyError("server busy: 8 of 8"), InvalidParameterError("top_p"), ServerError("boom")):
        assert failover._replica_failure(error) is None
    with Client("dns:///localhost:8001") as named:  # resolved again and again, even with one address now
        assert named._replicas.router is not None and named.endpoints == ["127.0.0.1:8001"]
    with pytest.raises(Exception, match="failover=False takes one"):
        Client(["127.0.0.1:1", "127.0.0.1:2"], failover=False)


def test_server_side_streams_over_http_on_several_replicas(replicas, ids) -> None:
    http = [f"127.0.0.1:{s.ports['http']}" for s in replicas.servers]
    chosen, owner = balanced(http, 1)
    ids.extend(chosen)
    with Client(http, protocol="http") as client:
        assert client.endpoints == sorted(http)
        streams = [list(client.events(p, max_new_tokens=8, temperature=0, mode="server", ignore_eos=True))
                   for p in PROMPTS[:3]]
    for k, events in enumerate(streams):
        assert [e.token_id for e in events] == replicas.reference(PROMPTS[k], 8)
        assert {e.endpoint for e in events} == {owner[chosen[k]]}


def test_the_generate_command_takes_several_replicas(replicas, ids) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from serving.commands.generate import generate

    app = typer.Typer()
    app.command("generate")(generate)
    app.command("version")(lambda: None)  # two commands: `generate` stays a subcommand
    ids.extend(owned_ids(replicas.urls, replicas.urls[0], 1))
    result = CliRunner().invoke(app, ["generate", PROMPTS[0], "--url", ",".join(replicas.urls), "--max-new-tokens",
                                      "8", "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == replicas.reference(PROMPTS[0], 8, eos=True)
    assert out["timings"]["endpoints"] == [replicas.urls[0]] and out["timings"]["failovers"] == 0


def test_the_openai_frontend_takes_several_replicas(replicas) -> None:
    """`gptpipe openai --url a,b,c`: ready while replicas are, completions with the reference's text."""
    from types import SimpleNamespace

    from tests.openai_fixtures import MODEL, Frontend

    front = Frontend(SimpleNamespace(server=SimpleNamespace(grpc_url=",".join(replicas.urls))))
    try:
        status, _, health = front.request("GET", "/health")
        assert status == 200 and len(health["replicas"]) == 3, health
        for prompt in PROMPTS[:3]:
            status, _, body = front.request("POST", "/v1/completions", {
                "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert status == 200, body
            ids = replicas.reference(prompt, 8, eos=True)
            expected = replicas.text(prompt, [i for i in ids if i != replicas.model.config.eos_token_id])
            assert body["choices"][0]["text"] == expected
    finally:
        front.stop()
