"""In-flight batching (the default repository flavour) against a REAL tritonserver.

`gpt` is a decoupled model with its own batching thread; the client steps it over gRPC
streams. The plain flavour's tests (test_client.py, test_serving.py) run on another server of
the same tiny export; the PyTorch model is the reference for both.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import closing, contextmanager

import numpy as np
import pytest

from serving import AsyncClient, Client, GptpipeError, InvalidParameterError, ServerBusyError
from serving.client.request import _new_correlation_id
from tests.conftest import metric, wait_for
from tests.test_client import PROMPTS as CLIENT_PROMPTS

PROMPTS = [*CLIENT_PROMPTS, "def main():", "A list is"]


@pytest.fixture
def client(inflight):
    with Client(inflight.server.grpc_url) as c:
        yield c


def test_the_step_model_is_decoupled_and_the_client_streams_its_steps(inflight, client):
    client.generate(PROMPTS[0], max_new_tokens=2, temperature=0)
    assert client._step_model.decoupled and "output_ids" in client._step_model.outputs


@pytest.mark.parametrize("mode", ["client", "server"])
def test_greedy_matches_pytorch_reference(inflight, client, mode):
    for prompt in PROMPTS[:3]:
        result = client.generate(prompt, max_new_tokens=20, temperature=0, mode=mode)
        assert result.token_ids == inflight.reference(prompt, 20)


def test_sampling_and_logprobs_match_the_plain_flavour(inflight, served, client):
    """The logits path over the stream (sampling, repetition penalty, log-probs): the same
    seeded draws as the request/response `gpt` of the plain server give."""
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=20, repetition_penalty=1.3, seed=7, return_logprobs=True)
    with Client(served.server.grpc_url) as plain:
        expected = plain.generate(PROMPTS[1], **kw)
    got = client.generate(PROMPTS[1], **kw)
    assert got.token_ids == expected.token_ids
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=1e-5, atol=1e-6)


def test_concurrent_streams_step_together_in_one_engine_call(inflight, client):
    """N client-side streams started together run their decode steps in shared engine calls:
    the batching thread waits for every sequence of its previous call (the plain flavour
    settles into groups that take turns)."""
    n, tokens = len(PROMPTS), 24
    counters = ("gptpipe_batched_rows_total", "gptpipe_step_requests_total", "gptpipe_runtime_calls_total")
    before = {k: metric(inflight.server, k) for k in counters}
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(n)
    ids = [client.tokenizer.encode(p) for p in PROMPTS]

    def run(i: int) -> None:
        barrier.wait()
        with closing(client.events(ids[i], max_new_tokens=tokens, temperature=0, ignore_eos=True)) as events:
            results[i] = [e.token_id for e in events]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from export.model import generate_greedy

    for i in range(n):
        assert results[i] == generate_greedy(inflight.model, ids[i], tokens)
    batched = metric(inflight.server, "gptpipe_batched_rows_total") - before["gptpipe_batched_rows_total"]
    requests = metric(inflight.server, "gptpipe_step_requests_total") - before["gptpipe_step_requests_total"]
    calls = metric(inflight.server, "gptpipe_runtime_calls_total") - before["gptpipe_runtime_calls_total"]
    decode_steps = n * (tokens - 1)
    assert requests == n * tokens  # START (prompt) + tokens - 1 decode steps, END on the last
    # the prompts run one per call; the decode calls average at least n/2 rows
    assert calls <= n + 2 * (tokens - 1), f"{calls:.0f} engine calls for {n} prompts and {decode_steps} decode steps"
    assert batched >= 0.75 * decode_steps, f"only {batched:.0f} of {decode_steps} decode steps ran batched"


def test_async_client_streams_its_steps(inflight):
    async def main():
        async with AsyncClient(inflight.server.grpc_url) as c:
            one = await c.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
            many = await c.generate(PROMPTS[:4], max_new_tokens=12, temperature=0)
            sampled = await c.generate(PROMPTS[1], max_new_tokens=12, temperature=0.9, seed=3)
            early = c.generate(PROMPTS[0], max_new_tokens=100, temperature=0, stream=True)
            await early.__anext__()
            await early.aclose()
            return one, many, sampled

    one, many, sampled = asyncio.run(main())
    assert one.token_ids == inflight.reference(PROMPTS[0], 12)
    assert [r.token_ids for r in many] == [inflight.reference(p, 12) for p in PROMPTS[:4]]
    with Client(inflight.server.grpc_url) as c:
        assert c.generate(PROMPTS[1], max_new_tokens=12, temperature=0.9, seed=3).token_ids == sampled.token_ids
    assert wait_for(lambda: inflight.active_sequences() == 0), "the closed stream kept its KV slot"


def test_http_client_loop_is_refused_with_the_way_out_and_server_mode_works(inflight):
    with Client(inflight.server.http_url, protocol="http") as c:
        with pytest.raises(InvalidParameterError, match=r"protocol='grpc'.*mode='server'.*--no-inflight-batching"):
            c.generate(PROMPTS[0], max_new_tokens=4, temperature=0)
        served = c.generate(PROMPTS[0], max_new_tokens=8, temperature=0, mode="server")
    assert served.token_ids == inflight.reference(PROMPTS[0], 8)


def test_a_bad_step_gets_its_error_on_the_stream_and_the_server_keeps_serving(inflight, client):
    client.generate(PROMPTS[0], max_new_tokens=1)  # the step model's description, fetched once
    vocab = inflight.model.config.vocab_size
    step = client._transport.sequence(_new_correlation_id(), stream=True)
    with pytest.raises(GptpipeError, match=rf"input_ids must be in \[0, {vocab}\)"):
        step([1, vocab + 5], start=True, end=False)
    with pytest.raises(GptpipeError, match="unknown sequence id"):
        step([1], start=False, end=True)  # the refused START left no sequence behind
    assert client.generate(PROMPTS[2], max_new_tokens=6, temperature=0).token_ids == inflight.reference(PROMPTS[2], 6)
    assert wait_for(lambda: inflight.active_sequences() == 0)


@contextmanager
def full_pool(inflight, client, slots=8):
    """Every KV slot held by a client-side stream that has its first token; closed on exit."""
    holders = [client.generate(PROMPTS[0], max_new_tokens=100, temperature=1.0, seed=i, stream=True)
               for i in range(slots)]
    try:
        for stream in holders:
            next(stream)
        assert inflight.active_sequences() == slots
        yield holders
    finally:
        for stream in holders:
            stream.close()


def test_a_full_pool_is_server_busy_over_the_stream(inflight, client):
    slots = 8
    with full_pool(inflight, client, slots) as holders:
        with Client(inflight.server.grpc_url, queue_timeout=0) as impatient:
            with pytest.raises(ServerBusyError, match=rf"^server busy: {slots} of {slots}"):
                impatient.generate(PROMPTS[1], max_new_tokens=4)
        threading.Timer(0.5, holders.pop().close).start()
        with Client(inflight.server.grpc_url, queue_timeout=20) as patient:
            waited = patient.generate(PROMPTS[1], max_new_tokens=4, temperature=0)
    assert waited.token_ids == inflight.reference(PROMPTS[1], 4)
    assert wait_for(lambda: inflight.active_sequences() == 0)


def test_a_full_pool_makes_the_generate_model_wait_for_a_slot(inflight, client):
    """The server-side loop retries a START that `gpt` refused as busy (the engine's own loop:
    one request per try, backing off) until a slot frees, then gives PyTorch's tokens."""
    with full_pool(inflight, client) as holders:
        before = metric(inflight.server, "gptpipe_busy_rejections_total")
        threading.Timer(1.0, holders.pop().close).start()
        waited = client.generate(PROMPTS[1], max_new_tokens=4, temperature=0, mode="server")
        assert metric(inflight.server, "gptpipe_busy_rejections_total") > before  # refused first, then it waited
    assert waited.token_ids == inflight.reference(PROMPTS[1], 4)
    assert wait_for(lambda: inflight.active_sequences() == 0)
