"""A client given several Triton replicas: one transport per endpoint, a replica per sequence, and failover.

:class:`_Replicas` holds a client's endpoints: one URL is the single-server client of old (one
transport, no router, no thread, errors raised as they come); several (a list, a comma list, or
a DNS name that resolves to several addresses: a headless Service) get a
:class:`serving.client.routing.Router` and one transport per endpoint, made on first use.

Each new sequence takes a fresh correlation id and the replica that owns it by rendezvous
hashing over the healthy endpoints; every step of it goes there. When that replica fails
mid-sequence (connection refused, stream broken, UNAVAILABLE, no answer within the timeout, or
"unknown sequence" from a replica that restarted and lost its KV cache), it is marked failed
(skipped until its ready probe passes) and the generation continues on another replica: the
step that failed is replaced by a START there with prompt + every token generated so far (a new
correlation id), whose logits are the ones the lost step would have given. The sampler and the
stop-string state live in the client's :class:`serving.generation.Generation`, so the caller
sees no error, no duplicated and no missing token; greedy tokens are those of a run with no
failure, sampled ones continue with the same draws. The `generate` model (server-side loop) is
re-issued on another replica with prompt + tokens so far and the remaining budget; its text is
then detokenized here (the old replica may have held back text), and a sampled stream continues
with a seed derived from its seed and the tokens so far, because `generate` takes no sampler
position: reproducible, but not the draws of a run with no failure.

A failover at most ``2 × endpoints + 1`` times per generation, each attempt bounded by the
client's timeout; with no healthy replica left, a ServerUnavailableError lists them all.
An abandoned sequence on a replica that is alive but was too slow is freed by its idle timeout.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, closing
from dataclasses import replace
from typing import Any, Optional, Union

import numpy as np

from serving.client.request import _new_correlation_id, _Request, _strip_scheme
from serving.client.routing import Router, grpc_ready_probe, http_ready_probe, resolve_addresses
from serving.generation import (
    Generation,
    GptpipeError,
    ServerError,
    ServerUnavailableError,
    TokenEvent,
    finish_token,
)
from serving.health import split_host_port

logger = logging.getLogger(__name__)

Endpoints = Union[str, Sequence[str]]

# what a replica that lost a sequence says (it restarted, or the sequence idled out): the replica
# is alive, the sequence is gone: re-prefill, without marking the replica failed
_LOST_SEQUENCE = ("unknown sequence id", "must specify the start flag", "sequence not started")
# a stream that closed under a step: the replica is going away (drain, crash)
_BROKEN_STREAM = ("stream ended without",)
_RESOLVE_TIMEOUT_S = 2.0
DNS_SCHEME = "dns:///"  # "dns:///gptpipe-triton:8001": route over the name's addresses even while it has one


def _replica_failure(error: BaseException) -> Optional[str]:
    """"down" (mark the replica failed), "lost" (it lost the sequence), or None (not a replica
    failure: raise it)."""
    if isinstance(error, ServerUnavailableError):
        return "down"
    if isinstance(error, ServerError):
        message = str(error).lower()
        if any(m in message for m in _LOST_SEQUENCE):
            return "lost"
        if any(m in message for m in _BROKEN_STREAM):
            return "down"
    return None


def _several_addresses(url: str) -> bool:
    """Does ``url``'s host name stand for several addresses (a headless Service)? One bounded
    lookup; an address, a failed lookup or a single address is one endpoint."""
    try:
        host, port = split_host_port(url, field="url")
    except ValueError:
        return False  # not host:port: passed on as it is, as a one-URL client always did
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    answer: list[list[str]] = []
    thread = threading.Thread(target=lambda: answer.append(resolve_addresses(host, port)), daemon=True,
                              name="gptpipe-resolve-once")
    thread.start()
    thread.join(_RESOLVE_TIMEOUT_S)
    return bool(answer) and len(answer[0]) > 1


class _Replicas:
    """A client's endpoints and their transports (see the module docstring).

    url: "host:port", "a:8001,b:8001", a list of them, or None (the protocol's default);
    failover: None decides (several endpoints, a name with several addresses, or a
    ``dns:///name:port``), True uses the router even for one endpoint (a headless Service with
    one pod now), False never does."""

    def __init__(self, url: Optional[Endpoints], default: str, protocol: str, make_transport: Callable[[str], Any],
                 *, models: Sequence[str], failover: Optional[bool] = None) -> None:
        if not url:
            url = default
        entries = [e.strip() for e in url.split(",")] if isinstance(url, str) else list(url)
        if any(isinstance(e, str) and e.startswith(DNS_SCHEME) for e in entries) and failover is None:
            failover = True  # gRPC's name syntax: a name to resolve again and again, however many it has now
        entries = [e[len(DNS_SCHEME):] if isinstance(e, str) and e.startswith(DNS_SCHEME) else e for e in entries]
        entries = [_strip_scheme(e) if isinstance(e, str) else e for e in entries]
        self._make = make_transport
        self._lock = threading.Lock()
        self._transports: dict[str, Any] = {}
        if failover is None:
            failover = len(entries) > 1 or (len(entries) == 1 and isinstance(entries[0], str)
                                             and _several_addresses(entries[0]))
        self.router: Optional[Router] = None
        if failover:
            probe = grpc_ready_probe(models) if protocol == "grpc" else http_ready_probe(models)
            self.router = Router(entries, probe=probe)
            self.url = ",".join(str(e) for e in entries)
        else:
            if len(entries) != 1 or not isinstance(entries[0], str):
                raise ValueError(f"url: failover=False takes one 'host:port', got {url!r}")
            self.url = entries[0]
            self.transport(self.url)  # the one transport, made now (as a one-URL client always did)

    @property
    def routed(self) -> bool:
        return self.router is not None

    def transport(self, endpoint: str) -> Any:
        with self._lock:
            transport = self._transports.get(endpoint)
            if transport is None:
                transport = self._transports[endpoint] = self._make(endpoint)
            return transport

    def single(self) -> Any:
        """The transport of a one-URL client."""
        return self.transport(self.url)

    def setup_order(self) -> list[str]:
        """Where to ask for the config and the tokenizer: the one URL, or the healthy endpoints."""
        if self.router is None:
            return [self.url]
        healthy = self.router.healthy()
        if not healthy:
            self.router.pick(0)  # raises the ServerUnavailableError that lists them
        return healthy

    def not_answering(self, endpoint: str, errors: list[str], error: GptpipeError) -> None:
        """A setup call failed on ``endpoint``: raise it unless another endpoint may answer."""
        if self.router is None or not isinstance(error, ServerUnavailableError):
            raise error
        self.router.mark_failed(endpoint)
        errors.append(f"{endpoint}: {error}")

    def transports(self) -> list[Any]:
        with self._lock:
            return list(self._transports.values())

    def close_router(self) -> None:
        if self.router is not None:
            self.router.close()


def _none_answered(errors: list[str]) -> ServerUnavailableError:
    return ServerUnavailableError("no Triton endpoint answered: " + "; ".join(errors))


class _Route:
    """Where one generation runs: its replica, and its failovers so far."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.endpoint: Optional[str] = None  # the replica of the current attempt
        self.failovers = 0
        self.errors: list[str] = []
        self.broken = False  # an error went out to the caller: no more failover (the END cleanup)
        self._limit = 2 * len(router.endpoints()) + 1

    def pick(self, key: object) -> str:
        if self.broken:
            raise ServerUnavailableError("the generation already failed: " + "; ".join(self.errors[-1:]))
        try:
            self.endpoint = self.router.pick(key)
        except ServerUnavailableError as e:
            self.broken = True
            raise ServerUnavailableError(f"{e}; errors: {'; '.join(self.errors) or 'none'}") from None
        return self.endpoint

    def failed(self, error: GptpipeError) -> None:
        """Mark the current replica after ``error``, or raise ``error`` if it is not a replica
        failure (or the limit of failovers is reached)."""
        kind = None if self.broken else _replica_failure(error)
        if kind is None:
            self.broken = True
            raise error
        endpoint = self.endpoint
        self.errors.append(f"{endpoint}: {error}")
        if kind == "down" and endpoint is not None:
            self.router.mark_failed(endpoint)
        self.failovers += 1
        if self.failovers > self._limit:
            self.broken = True
            raise ServerUnavailableError(f"gave up after {self.failovers - 1} failovers: "
                                         + "; ".join(self.errors)) from None
        logger.warning("replica %s failed mid-sequence (%s); continuing on another", endpoint, error)

    def tag(self, event: TokenEvent) -> TokenEvent:
        return replace(event, endpoint=self.endpoint, failovers=self.failovers)


class _Moving:
    """The sequence of one client-side generation, on one replica at a time: which step function
    to call and with what (the driver's step, or on a fresh replica mid-sequence a START with
    prompt + everything generated so far, which ends with the driver's tokens), and what to do
    when it fails. new_step(endpoint, correlation_id) -> that replica's step function."""

    def __init__(self, route: _Route, generation: Generation, new_step: Callable[[str, int], Any]) -> None:
        self.route, self.generation, self.new_step = route, generation, new_step
        self.step: Optional[Callable[..., Any]] = None  # the current replica's step function
        self.fresh = True  # nothing sent on the current replica yet

    def next(self, tokens: Sequence[int], start: bool) -> tuple[Callable[..., Any], Sequence[int], bool]:
        """(step function, tokens, start) to send."""
        if self.step is None:
            cid = _new_correlation_id()
            self.step, self.fresh = self.new_step(self.route.pick(cid), cid), True
        if not self.fresh or start or self.route.broken:  # broken: the END cleanup, as the driver sends it
            return self.step, tokens, start
        history = self.generation.prompt_ids + self.generation.generated
        assert tuple(history[len(history) - len(tokens):]) == tuple(tokens), "re-prefill must end with the step"
        return self.step, history, True

    def answered(self) -> None:
        self.fresh = False

    def failed(self, error: GptpipeError, start: bool, end: bool) -> None:
        """Move on (return: try again), or raise ``error``. The END-only step of a generation
        that already finished is never worth a failover."""
        if self.generation.finish_reason is not None and end and not start:
            raise error
        self.route.failed(error)  # raises an error that is not the replica's: the END cleanup goes there
        self.step = None


def _failover_step(route: _Route, generation: Generation, new_step: Callable[[str, int], Any]):
    """Blocking: a step function that moves the generation to another replica on failure."""
    moving = _Moving(route, generation, new_step)

    def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        while True:
            call, send, send_start = moving.next(tokens, start)
            try:
                out = call(send, start=send_start, end=end)
            except GptpipeError as e:
                moving.failed(e, start, end)
                continue
            moving.answered()
            return out

    return step


def _async_failover_step(route: _Route, generation: Generation, new_step: Callable[[str, int], Any]):
    """asyncio: the same, with awaitable steps."""
    moving = _Moving(route, generation, new_step)

    async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        while True:
            call, send, send_start = moving.next(tokens, start)
            try:
                out = await call(send, start=send_start, end=end)
            except GptpipeError as e:
                moving.failed(e, start, end)
                continue
            moving.answered()
            return out

    return step


def _tagged(events: Iterator[TokenEvent], route: _Route) -> Iterator[TokenEvent]:
    """Each event with the replica that served it (closing this closes ``events``: END is sent)."""
    with closing(events):  # type: ignore[type-var]
        for event in events:
            yield route.tag(event)


async def _atagged(events: AsyncIterator[TokenEvent], route: _Route) -> AsyncIterator[TokenEvent]:
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            yield route.tag(event)


# ---------------------------------------------------------------------------- server mode


class _Continuation:
    """A `generate` stream that may move: the tokens so far, the next attempt's inputs, and the
    text, detokenized here once the stream moved (the old replica may have held text back)."""

    def __init__(self, generation: Generation, request: _Request, inputs: dict[str, np.ndarray], tokenizer: Any) -> None:
        from serving.tokenizer import TextStream

        self.generation, self.request, self.inputs = generation, request, inputs
        self.ids: list[int] = []
        self._text = TextStream(tokenizer, request.stop, prompt_ids=generation.prompt_ids)
        self.moved = False

    def next_inputs(self) -> dict[str, np.ndarray]:
        if not self.ids:
            return self.inputs
        self.moved = True
        inputs = dict(self.inputs)
        ids = self.generation.prompt_ids + self.ids
        inputs["input_ids"] = np.asarray(ids, dtype=self.inputs["input_ids"].dtype)
        budget = self.request.max_new_tokens - len(self.ids)
        inputs["max_tokens"] = np.asarray([budget], dtype=self.inputs["max_tokens"].dtype)
        if "min_tokens" in inputs:  # what is left of it
            left = max(0, self.generation.min_tokens - len(self.ids))
            inputs["min_tokens"] = np.asarray([left], dtype=self.inputs["min_tokens"].dtype)
        if not self.request.params.greedy:  # no sampler position in `generate`'s inputs: a derived seed
            digest = hashlib.blake2b(f"{self.generation.seed}:{len(self.ids)}".encode(), digest_size=8).digest()
            seed = int.from_bytes(digest, "big") >> 1
            inputs["random_seed"] = np.asarray([seed], dtype=self.inputs["random_seed"].dtype)
        return inputs

    def take(self, event: TokenEvent) -> TokenEvent:
        """Record the event's token; after a move, its text and finish are decided here."""
        self.ids.append(event.token_id)
        g, n = self.generation, len(self.ids)
        delta, finish = finish_token(self._text, event.token_id, n=n, max_new_tokens=self.request.max_new_tokens,
                                     eos_token_id=g.eos_token_id, stop_token_ids=g.stop_token_ids,
                                     min_tokens=g.min_tokens)
        if finish is None and event.finish_reason is not None:
            delta += self._text.flush()
        if not self.moved:
            return event
        return replace(event, text=delta, finish_reason=finish or event.finish_reason)


def _failover_server_events(route: _Route, continuation: _Continuation,
                            run: Callable[[str, dict[str, np.ndarray]], Iterator[TokenEvent]]) -> Iterator[TokenEvent]:
    """Blocking: the events of a `generate` stream that is re-issued on another replica on failure.
    run(endpoint, inputs) -> that replica's events."""
    while True:
        endpoint = route.pick(_new_correlation_id())
        try:
            with closing(run(endpoint, continuation.next_inputs())) as events:  # type: ignore[type-var]
                for event in events:
                    event = route.tag(continuation.take(event))
                    yield event
                    if event.finish_reason is not None:
                        return
            return
        except GptpipeError as e:
            route.failed(e)


async def _async_failover_server_events(route: _Route, continuation: _Continuation,
                                        run: Callable[[str, dict[str, np.ndarray]], AsyncIterator[TokenEvent]]
                                        ) -> AsyncIterator[TokenEvent]:
    """asyncio: the same."""
    while True:
        endpoint = route.pick(_new_correlation_id())
        try:
            async with aclosing(run(endpoint, continuation.next_inputs())) as events:  # type: ignore[type-var]
                async for event in events:
                    event = route.tag(continuation.take(event))
                    yield event
                    if event.finish_reason is not None:
                        return
            return
        except GptpipeError as e:
            route.failed(e)
