"""serving/client/step.py's busy retry: a START refused with "server busy" waits for a slot, up to queue_timeout.

The retry wrappers are checked with plain step functions (the contract: only START is retried,
with a bounded wait, and the ServerBusyError comes through once the wait is over), then end to
end against a full KV pool of the real server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from serving import Client, ServerBusyError
from serving.client.step import _async_with_busy_retry, _with_busy_retry
from tests.conftest import wait_for
from tests.test_client import PROMPTS, client  # noqa: F401 - client: the fixture
from tests.test_client_http_generate import as_list, post


def busy_step(busy_calls: int, calls: list):
    """A step that refuses its first `busy_calls` STARTs with "server busy" (calls: (start, end) of
    every call: the client ENDs a refused START's sequence before it retries, so Triton's sequence
    batcher lets that id go)."""

    def step(tokens, *, start, end):
        calls.append((start, end))
        if not (end and not start) and sum(not (e and not st) for st, e in calls) <= busy_calls:  # an END is never refused
            raise ServerBusyError("server busy: 8 of 8 sequences active; retry later")
        return [len(tokens)]

    return step


def async_of(step):
    async def astep(tokens, *, start, end):
        return step(tokens, start=start, end=end)

    return astep


def test_busy_retry_retries_only_a_start_and_gives_up_after_queue_timeout():
    calls: list = []
    assert _with_busy_retry(busy_step(2, calls), 5.0)([1, 2, 3], start=True, end=False) == [3]
    assert calls == [(True, False), (False, True), (True, False), (False, True), (True, False)]
    calls.clear()
    retrying = _with_busy_retry(busy_step(10**6, calls), 0.3)
    with pytest.raises(ServerBusyError, match="^server busy"):
        retrying([1], start=False, end=False)  # not a START: refused at once
    assert calls == [(False, False)]
    t0 = time.monotonic()
    with pytest.raises(ServerBusyError, match="^server busy"):
        retrying([1], start=True, end=False)
    waited = time.monotonic() - t0
    assert 0.1 < waited < 0.3 + 0.5 and len(calls) > 3  # a bounded wait, backing off, never past the deadline
    step = busy_step(1, [])
    assert _with_busy_retry(step, 0) is step  # queue_timeout=0: no retry


def test_async_busy_retry_retries_only_a_start_and_gives_up_after_queue_timeout():
    calls: list = []
    retrying = _async_with_busy_retry(async_of(busy_step(2, calls)), 5.0)
    assert asyncio.run(retrying([1, 2], start=True, end=False)) == [2] and calls == [(True, False), (False, True), (True, False), (False, True), (True, False)]
    calls.clear()
    retrying = _async_with_busy_retry(async_of(busy_step(10**6, calls)), 0.3)
    with pytest.raises(ServerBusyError):
        asyncio.run(retrying([1], start=False, end=False))  # not a START: refused at once
    assert calls == [(False, False)]
    t0 = time.monotonic()
    with pytest.raises(ServerBusyError):
        asyncio.run(retrying([1], start=True, end=False))
    assert 0.1 < time.monotonic() - t0 < 0.3 + 0.5 and len(calls) > 3
    step = async_of(busy_step(1, []))
    assert _async_with_busy_retry(step, 0) is step


def test_a_full_pool_is_server_busy_and_generations_wait_for_a_slot(served, client):
    slots = json.loads((served.repository / "tokenizer" / "1" / "generation_config.json").read_text())["max_sequences"]
    holders = [client.generate(PROMPTS[0], max_new_tokens=100, temperature=1.0, seed=i, stream=True)
               for i in range(slots)]
    try:
        for stream in holders:
            next(stream)  # each holds a KV slot now
        assert served.active_sequences() == slots
        with Client(served.server.grpc_url, queue_timeout=0) as impatient:
            with pytest.raises(ServerBusyError, match=rf"^server busy: {slots} of {slots}"):
                impatient.generate(PROMPTS[1], max_new_tokens=4)
        # a client that may wait, and the generate model (it waits too), get the slot freed here
        threading.Timer(0.5, holders.pop().close).start()
        threading.Timer(1.0, holders.pop().close).start()
        with Client(served.server.grpc_url, queue_timeout=20) as patient:
            waited = patient.generate(PROMPTS[1], max_new_tokens=4, temperature=0)
        status, body = post(served.server, "generate", {"text_input": PROMPTS[1], "max_tokens": 4, "temperature": 0})
    finally:
        for stream in holders:
            stream.close()
    assert waited.token_ids == served.reference(PROMPTS[1], 4)
    assert status == 200 and as_list(json.loads(body)["output_ids"]) == waited.token_ids
    assert wait_for(lambda: served.active_sequences() == 0)
