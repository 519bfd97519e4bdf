"""serving.client.routing: endpoint parsing, rendezvous hashing (stable, minimal reshuffle), DNS
resolution (the real resolver for 'localhost'; a resolver function whose answers change for the
re-resolution rules), and health tracking against real HTTP ready endpoints."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import threading
import time

import pytest

from serving.generation import ServerUnavailableError
from serving.client.routing import (Router, grpc_ready_probe, http_ready_probe, parse_endpoints, rendezvous_order,
                             resolve_addresses, tcp_probe)
from tests.ready_servers import ready_server

IDS = range(3000)
THREE = ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]


def owners(endpoints: list[str]) -> dict[int, str]:
    return {i: rendezvous_order(i, endpoints)[0] for i in IDS}


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- parsing ---------------------------------------------------------------------------------

def test_endpoints_parse_from_a_comma_list_or_a_list() -> None:
    expected = [("host-a", 8001), ("host-b", 8001)]
    assert parse_endpoints("host-a:8001,host-b:8001") == expected
    assert parse_endpoints(" host-a:8001 , host-b:8001 ") == expected
    assert parse_endpoints(["host-a:8001", "host-b:8001"]) == expected
    assert parse_endpoints("[::1]:8001") == [("::1", 8001)]


@pytest.mark.parametrize("spec, message", [
    ("", "empty entry"), ([], "no endpoint"), ("host-a", "must be host:port"), ("host-a:0", "not in 1..65535"),
    ("host-a:99999", "must be host:port"), ("a:1,a:1", "listed twice"), ("a:1,", "empty entry"),
    ("grpc://a:1", "without a scheme"), ([8001], "not a 'host:port' string"), ("a:port", "must be host:port"),
])
def test_bad_endpoints_are_refused_with_the_entry_named(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_endpoints(spec)


# --- rendezvous hashing ----------------------------------------------------------------------

def test_each_endpoint_owns_about_a_third_of_the_sequences() -> None:
    counts = collections.Counter(owners(THREE).values())
    assert set(counts) == set(THREE)
    assert all(850 <= n <= 1150 for n in counts.values()), counts  # 1000 each, ± 5 sigma-ish


def test_removing_an_endpoint_moves_only_its_own_sequences_and_adding_it_back_restores_all() -> None:
    before = owners(THREE)
    after = owners(THREE[:1] + THREE[2:])  # 10.0.0.2 goes away
    moved = {i for i in IDS if before[i] != after[i]}
    assert moved == {i for i in IDS if before[i] == THREE[1]}  # nobody else moves
    # its sequences go to their second choice, spread over both survivors
    assert all(after[i] == rendezvous_order(i, THREE)[1] for i in moved)
    assert 0.35 < sum(after[i] == THREE[0] for i in moved) / len(moved) < 0.65
    assert owners(THREE) == before  # back: every sequence on its first owner again
    assert owners(list(reversed(THREE))) == before  # the order of the list does not matter


def test_the_owner_is_the_same_in_another_process() -> None:
    """Not Python's salted hash(): another process (another PYTHONHASHSEED) agrees."""
    code = ("from serving.client.routing import rendezvous_order; import sys; "
            f"print(','.join(rendezvous_order(i, {THREE!r})[0] for i in range(50)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "12345"}, check=True).stdout.strip()
    assert out.split(",") == [owners(THREE)[i] for i in range(50)]


def test_string_and_integer_ids_route() -> None:
    assert rendezvous_order("req-7", THREE)[0] in THREE
    assert rendezvous_order(7, THREE) == rendezvous_order("7", THREE)


# --- resolution ------------------------------------------------------------------------------

def test_localhost_resolves_through_the_real_resolver() -> None:
    assert resolve_addresses("localhost", 8001) == ["127.0.0.1:8001"]
    with Router("localhost:8001,127.0.0.2:9") as router:
        assert router.endpoints() == ["127.0.0.1:8001", "127.0.0.2:9"]
        assert router.healthy() == router.endpoints()


class ChangingDNS:
    """A resolver whose answers the test sets, counting its calls (a headless Service's DNS
    as pods come and go)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers, self.calls, self.fail, self.hang_s = answers, 0, False, 0.0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.fail:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [f"{a}:{port}" for a in self.answers.get(host, [])]


def test_a_name_stands_for_all_its_addresses_and_is_re_resolved() -> None:
    dns = ChangingDNS({"triton": ["10.0.0.1", "10.0.0.2"]})
    with Router("triton:8001", resolver=dns, resolve_interval_s=0.1) as router:
        assert router.endpoints() == ["10.0.0.1:8001", "10.0.0.2:8001"]
        dns.answers["triton"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # the HPA added a pod
        assert wait_until(lambda: "10.0.0.3:8001" in router.healthy(), 3.0)
        router.mark_failed("10.0.0.2:8001")
        dns.answers["triton"] = ["10.0.0.1", "10.0.0.3"]  # and one left
        assert wait_until(lambda: router.endpoints() == ["10.0.0.1:8001", "10.0.0.3:8001"], 3.0)
        assert router.failed() == []  # a pod that left is not tracked
        calls = dns.calls
        time.sleep(0.35)
        assert 1 <= dns.calls - calls <= 6  # periodic, with its bound: not on every pick


def test_a_failed_or_empty_lookup_keeps_the_last_answer() -> None:
    dns = ChangingDNS({"triton": ["10.0.0.1", "10.0.0.2"]})
    with Router("triton:8001", resolver=dns, resolve_interval_s=60) as router:
        dns.fail = True
        router.refresh()
        assert router.endpoints() == ["10.0.0.1:8001", "10.0.0.2:8001"]
        dns.fail, dns.answers = False, {}
        router.refresh()
        assert router.endpoints() == ["10.0.0.1:8001", "10.0.0.2:8001"]


def test_a_hanging_lookup_is_bounded_and_a_name_never_resolved_stands_for_itself() -> None:
    dns = ChangingDNS({})
    dns.hang_s = 2.0
    start = time.monotonic()
    with Router("triton:8001", resolver=dns, timeout_s=0.2) as router:
        assert time.monotonic() - start < 1.5
        assert router.endpoints() == ["triton:8001"]  # connecting to it names it in the error


# --- health ----------------------------------------------------------------------------------

def test_a_failed_endpoint_is_skipped_until_its_ready_probe_passes() -> None:
    with ready_server() as a, ready_server() as b:
        probe = http_ready_probe(["gpt", "generate"], timeout=2)
        with Router([a.endpoint, b.endpoint], probe=probe, probe_interval_s=60) as router:
            on_a = next(i for i in IDS if router.pick(i) == a.endpoint)
            router.mark_failed(a.endpoint)
            assert router.healthy() == [b.endpoint] and router.pick(on_a) == b.endpoint
            a.not_ready = {"/v2/models/generate/ready"}  # up, but one model is not ready
            assert router.check_failed() == [] and router.pick(on_a) == b.endpoint
            a.not_ready = set()
            assert router.check_failed() == [a.endpoint]
            assert router.pick(on_a) == a.endpoint  # back on its first owner
            assert router.healthy() == sorted([a.endpoint, b.endpoint])


def test_the_background_probe_brings_an_endpoint_back() -> None:
    with ready_server() as a, ready_server() as b:
        a.not_ready = {"/v2/health/ready"}
        with Router([a.endpoint, b.endpoint], probe=http_ready_probe([], timeout=1), probe_interval_s=0.1) as router:
            router.mark_failed(a.endpoint)
            time.sleep(0.5)  # probed ~4 times, still not ready
            assert router.failed() == [a.endpoint]
            a.not_ready = set()
            assert wait_until(lambda: router.failed() == [], 3.0)
            assert router.healthy() == sorted([a.endpoint, b.endpoint])


def test_connection_refused_keeps_an_endpoint_out_and_no_endpoint_left_is_a_typed_error() -> None:
    dead = f"127.0.0.1:{closed_port()}"
    with Router(dead, probe=tcp_probe(1.0), probe_interval_s=60) as router:
        assert router.pick(1) == dead  # nothing known against it yet
        router.mark_failed(dead)
        assert router.check_failed() == []
        with pytest.raises(ServerUnavailableError, match=f"no healthy Triton endpoint: {dead}"):
            router.pick(1)


def test_a_probe_of_an_endpoint_that_never_answers_is_bounded() -> None:
    with socket.socket() as sock:  # accepts into its backlog, never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
        with Router(endpoint, probe=http_ready_probe(["gpt"], timeout=0.3), probe_interval_s=60) as router:
            router.mark_failed(endpoint)
            start = time.monotonic()
            assert router.check_failed() == []
            assert time.monotonic() - start < 1.0


def test_http_probe_on_another_port_than_the_endpoint() -> None:
    with ready_server() as http:
        probe = http_ready_probe(["gpt"], http_port=http.server_address[1])
        assert probe("127.0.0.1:8001")  # a gRPC endpoint whose HTTP port is elsewhere
        assert not http_ready_probe(["gpt"], http_port=closed_port())("127.0.0.1:8001")


def test_marking_an_unknown_endpoint_is_ignored_and_close_stops_the_thread() -> None:
    router = Router(THREE)
    router.mark_failed("10.9.9.9:8001")
    assert router.failed() == [] and router.healthy() == THREE
    router.close()
    assert not any(t.name == "gptpipe-router" and t.is_alive() for t in threading.enumerate())


def test_bad_router_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_interval_s"):
        Router(THREE, probe_interval_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Router(THREE, timeout_s=-1)


def test_grpc_and_http_probes_against_a_real_tritonserver(tmp_path, triton_server_factory) -> None:
    from tests.triton_fixtures import write_echo_repository

    server = triton_server_factory(write_echo_repository(tmp_path / "repo"))
    assert grpc_ready_probe(["echo"], timeout=5)(server.grpc_url)
    assert not grpc_ready_probe(["echo", "gpt"], timeout=5)(server.grpc_url)
    assert http_ready_probe(["echo"], http_port=server.ports["http"])(server.grpc_url)
    dead = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    assert not grpc_ready_probe(["echo"], timeout=1)(dead)
    assert time.monotonic() - start < 3
    # a router over the live server and a dead port: the dead one, once failed, stays out
    with Router([server.grpc_url, dead], probe=grpc_ready_probe(["echo"], timeout=2), probe_interval_s=60) as router:
        router.mark_failed(dead)
        router.mark_failed(server.grpc_url)
        assert router.check_failed() == [server.grpc_url]
        assert router.healthy() == [server.grpc_url] and router.pick(42) == server.grpc_url


def test_three_real_replicas_share_the_sequences_and_one_that_stops_is_skipped_then_used_again(tmp_path) -> None:
    """Three tritonserver processes serving one repository: 60 sequences spread over all three
    (ports are random: with 12, one replica would get none 2% of the time);
    one replica stops: its sequences (only those) move, it is skipped while down, and after a
    restart on the same ports its ready probe brings it, and its sequences, back."""
    from serving.server import TritonServer
    from tests.triton_fixtures import start_server, write_echo_repository

    repo = write_echo_repository(tmp_path / "repo")
    replicas = [start_server(repo) for _ in range(3)]
    restarted: TritonServer | None = None
    try:
        by_url = {server.grpc_url: server for server in replicas}
        with Router(list(by_url), probe=grpc_ready_probe(["echo"], timeout=2), probe_interval_s=0.1) as router:
            ids = [1000 + i for i in range(60)]
            before = {i: router.pick(i) for i in ids}
            assert set(before.values()) == set(by_url)  # each replica serves some
            victim = replicas[1]
            victim.stop()
            router.mark_failed(victim.grpc_url)  # what the client does on its connection error
            time.sleep(0.4)  # probed a few times: still down
            assert router.failed() == [victim.grpc_url]
            during = {i: router.pick(i) for i in ids}
            assert {i for i in ids if during[i] != before[i]} == {i for i in ids if before[i] == victim.grpc_url}
            assert victim.grpc_url not in during.values()
            restarted = TritonServer(repo, http_port=victim.ports["http"], grpc_port=victim.ports["grpc"],
                                     metrics_port=victim.ports["metrics"])
            restarted.start()
            restarted.wait_ready(120)
            assert wait_until(lambda: router.failed() == [], 10.0)
            assert {i: router.pick(i) for i in ids} == before
    finally:
        for server in [*replicas, *([restarted] if restarted else [])]:
            server.stop()
