"""Which Triton replica serves a sequence: endpoint lists and DNS names (re-resolved), rendezvous
hashing of the correlation id over the healthy endpoints, and health tracking.

A sequence's KV cache lives in one replica, so every step of it must go to the same endpoint.
Rendezvous (highest-random-weight) hashing gives that without shared state: each client and
frontend replica computes the same endpoint for a correlation id, and when an endpoint goes
away only the sequences that were on it move (to their next-highest endpoint). An endpoint
the caller saw fail (connection refused, stream broken) is skipped until a ready probe passes.

    router = Router("gptpipe-triton:8001", probe=http_ready_probe(["gpt"], http_port=8000))
    endpoint = router.pick(correlation_id)      # "10.0.3.7:8001"
    ...                                         # on a connection error:
    router.mark_failed(endpoint)                # then pick() again and re-prefill there
    router.healthy()                            # ["10.0.3.7:8001", "10.0.5.2:8001"]
    router.close()

Probes: ``grpc_ready_probe`` (tritonclient, on the endpoint itself), ``http_ready_probe``
(``serving.health``: the ready paths over HTTP, e.g. port 8000 beside gRPC's 8001),
``tcp_probe`` (the default: the port accepts a connection).

Names are resolved with the system resolver (a headless Kubernetes Service returns one address
per ready pod), IPv4 addresses first, again at most every ``resolve_interval_s`` in a background
thread; a failed lookup keeps the last answer. Every lookup and probe has a bound. Torch-free,
tritonclient-free: the probe is a callable, so the client can pass one over gRPC.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from serving.generation import ServerUnavailableError
from serving.health import check_ready, split_host_port

logger = logging.getLogger(__name__)

Probe = Callable[[str], bool]  # endpoint -> ready? It must bound its own time.
Resolver = Callable[[str, int], list[str]]  # (host, port) -> endpoints "addr:port"
EndpointSpec = Union[str, Sequence[str]]

DEFAULT_RESOLVE_INTERVAL_S = 10.0
DEFAULT_PROBE_INTERVAL_S = 1.0
DEFAULT_TIMEOUT_S = 2.0
MIN_INTERVAL_S = 0.05  # floors for the background thread's periods


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(spec: EndpointSpec) -> list[tuple[str, int]]:
    """``"host-a:8001,host-b:8001"`` or ``["host-a:8001", "host-b:8001"]`` → [(host, port)], in
    order. ValueError naming the entry for an empty list, a missing or bad port, a duplicate."""
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    parsed: list[tuple[str, int]] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"endpoints: {entry!r} is not a 'host:port' string")
        text = entry.strip()
        if not text:
            raise ValueError(f"endpoints: empty entry in {spec!r}")
        if "/" in text:
            raise ValueError(f"endpoints: {text!r} must be host:port, without a scheme or path")
        host, port = split_host_port(text, field="endpoints")
        if not 0 < port < 65536:
            raise ValueError(f"endpoints: {text!r}: port {port} is not in 1..65535")
        if (host, port) in parsed:
            raise ValueError(f"endpoints: {text!r} is listed twice")
        parsed.append((host, port))
    if not parsed:
        raise ValueError("endpoints: no endpoint given")
    return parsed


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_addresses(host: str, port: int) -> list[str]:
    """The endpoints a name stands for: its IPv4 addresses (IPv6 only if it has none), sorted."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    return [format_endpoint(addr, port) for addr in (v4 or v6)]


def rendezvous_weight(key: str, endpoint: str) -> int:
    """Stable across processes and runs (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{endpoint}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: object, endpoints: Iterable[str]) -> list[str]:
    """``endpoints`` from the highest weight for ``key`` down: the first is the owner, the next
    is where the key goes if the owner is gone."""
    text = str(key)
    return sorted(endpoints, key=lambda e: (rendezvous_weight(text, e), e), reverse=True)


def tcp_probe(timeout: float = DEFAULT_TIMEOUT_S) -> Probe:
    """Ready = the endpoint accepts a TCP connection within ``timeout``."""
    def probe(endpoint: str) -> bool:
        host, port = split_host_port(endpoint, field="endpoint")
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError:
            return False
        return True
    return probe


def http_ready_probe(models: Sequence[str], *, http_port: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Probe:
    """Ready = Triton's ``/v2/health/ready`` and each model's ready endpoint answer 200, over HTTP
    on the endpoint's host at ``http_port`` (default: the endpoint's own port)."""
    def probe(endpoint: str) -> bool:
        host, port = split_host_port(endpoint, field="endpoint")
        problems = check_ready(format_endpoint(host, http_port or port), models, timeout=timeout)
        if problems:
            logger.debug("%s not ready: %s", endpoint, "; ".join(problems))
        return not problems
    return probe


def grpc_ready_probe(models: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> Probe:
    """Ready = Triton answers ready for the server and each model over gRPC on the endpoint
    itself (tritonclient, imported on first use; each call bounded by ``timeout``)."""
    def probe(endpoint: str) -> bool:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(endpoint)
        try:
            return bool(client.is_server_ready(client_timeout=timeout)) and all(
                client.is_model_ready(name, client_timeout=timeout) for name in models)
        except InferenceServerException as exc:
            logger.debug("%s not ready: %s", endpoint, exc)
            return False
        finally:
            client.close()
    return probe


class Router:
    """The endpoints of one deployment and their health; see the module docstring.

    ``pick``, ``mark_failed`` and ``healthy`` never block on the network (after the first
    resolution in the constructor, bounded by ``timeout_s``): re-resolution and the probes of
    failed endpoints run in one daemon thread, stopped by :meth:`close`.
    """

    def __init__(self, endpoints: EndpointSpec, *, probe: Probe | None = None,
                 resolver: Resolver = resolve_addresses,
                 resolve_interval_s: float = DEFAULT_RESOLVE_INTERVAL_S,
                 probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        for name, value in (("resolve_interval_s", resolve_interval_s), ("probe_interval_s", probe_interval_s)):
            if not value >= MIN_INTERVAL_S:
                raise ValueError(f"{name}: {value!r} must be >= {MIN_INTERVAL_S} seconds")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: {timeout_s!r} must be > 0 seconds")
        self._specs = parse_endpoints(endpoints)
        self._probe = probe or tcp_probe(timeout_s)
        self._resolver = resolver
        self.resolve_interval_s = resolve_interval_s
        self.probe_interval_s = probe_interval_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a lookup that hangs past its bound is abandoned to this pool, never waited for again
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="gptpipe-resolve")
        self._resolved: dict[tuple[str, int], list[str]] = {}
        self._failed: dict[str, float] = {}  # endpoint -> monotonic time it was marked failed
        self._names = [(h, p) for h, p in self._specs if not _is_address(h)]
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="gptpipe-router", daemon=True)
        self._thread.start()

    # --- the interface the client uses ------------------------------------------------------

    def pick(self, seq_id: object) -> str:
        """The healthy endpoint that owns ``seq_id`` (same answer for the same id and endpoints)."""
        healthy = self.healthy()
        if not healthy:
            with self._lock:
                known = sorted(self._all())
            raise ServerUnavailableError(
                f"no healthy Triton endpoint: {', '.join(known)} all failed; "
                f"each is retried every {self.probe_interval_s:g} s until it is ready")
        return rendezvous_order(seq_id, healthy)[0]

    def mark_failed(self, endpoint: str) -> None:
        """Skip ``endpoint`` until a ready probe passes (the caller saw it fail)."""
        with self._lock:
            if endpoint not in self._all():
                return  # gone from DNS since it was picked: nothing to track
            if endpoint not in self._failed:
                logger.warning("Triton endpoint %s failed; skipped until it is ready again", endpoint)
            self._failed.setdefault(endpoint, time.monotonic())

    def healthy(self) -> list[str]:
        """The endpoints a new sequence may be sent to, sorted."""
        with self._lock:
            return sorted(e for e in self._all() if e not in self._failed)

    # --- the rest ---------------------------------------------------------------------------

    def endpoints(self) -> list[str]:
        """Every known endpoint, healthy or not, sorted."""
        with self._lock:
            return sorted(self._all())

    def failed(self) -> list[str]:
        with self._lock:
            return sorted(self._failed)

    def _all(self) -> list[str]:
        out: list[str] = []
        for host, port in self._specs:
            for endpoint in self._resolved.get((host, port), [format_endpoint(host, port)]):
                if endpoint not in out:
                    out.append(endpoint)
        return out

    def refresh(self) -> None:
        """Resolve every name now (each lookup bounded by ``timeout_s``). A failed or empty
        lookup keeps the name's last answer; a name never resolved stands for itself."""
        futures = {spec: self._pool.submit(self._resolver, *spec) for spec in self._names}
        deadline = time.monotonic() + self.timeout_s
        answers: dict[tuple[str, int], list[str]] = {}
        for spec, future in futures.items():
            try:
                answer = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 (gaierror, timeout, a resolver's own error)
                logger.warning("resolving %s failed (%s: %s); keeping %s", format_endpoint(*spec),
                               type(exc).__name__, exc, self._resolved.get(spec, "the name"))
                continue
            if answer:
                answers[spec] = list(answer)
        with self._lock:
            before = set(self._all())
            self._resolved.update(answers)
            now = set(self._all())
            for endpoint in list(self._failed):
                if endpoint not in now:
                    del self._failed[endpoint]  # a pod that left; if its address returns, it is new
        if now != before and before:
            logger.info("Triton endpoints now %s (added %s, removed %s)", sorted(now),
                        sorted(now - before), sorted(before - now))

    def check_failed(self, *, due_only: bool = False) -> list[str]:
        """Probe the failed endpoints once now (with ``due_only``, those last marked or probed
        at least ``probe_interval_s`` ago); return those ready again, no longer skipped."""
        now = time.monotonic()
        with self._lock:
            todo = sorted(e for e, t in self._failed.items() if not due_only or now - t >= self.probe_interval_s)
        back = []
        for endpoint in todo:
            try:
                ready = bool(self._probe(endpoint))
            except Exception as exc:  # noqa: BLE001 (a probe's own error is "not ready")
                logger.debug("probe of %s raised %s: %s", endpoint, type(exc).__name__, exc)
                ready = False
            with self._lock:
                if endpoint not in self._failed:
                    continue
                if ready:
                    del self._failed[endpoint]
                    back.append(endpoint)
                else:
                    self._failed[endpoint] = time.monotonic()  # next probe one period later
            if ready:
                logger.info("Triton endpoint %s is ready again", endpoint)
        return back

    def _run(self) -> None:
        next_resolve = time.monotonic() + self.resolve_interval_s
        tick = min(self.probe_interval_s, self.resolve_interval_s, 1.0)
        while not self._stop.wait(tick):
            if self._names and time.monotonic() >= next_resolve:
                self.refresh()
                next_resolve = time.monotonic() + self.resolve_interval_s
            self.check_failed(due_only=True)

    def close(self) -> None:
        """Stop the background thread (waits at most one probe or lookup bound)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.timeout_s + self.probe_interval_s + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Router(healthy={self.healthy()}, failed={self.failed()})"
