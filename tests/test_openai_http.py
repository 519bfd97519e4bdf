"""The OpenAI frontend over raw HTTP: the error JSON and status of each kind of bad input, SSE
framing, the API key, a full KV pool (503 + Retry-After), and a client that disconnects mid-stream
(its KV slot is freed at once, its generation stopped)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from contextlib import ExitStack, closing

import pytest

from serving import Client
from serving.openai.protocol import ChatCompletionChunk
from tests.conftest import metric, wait_for
from tests.openai_fixtures import MODEL, Frontend, frontend  # noqa: F401 - the fixture

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]

# (path, body, status, param, code or None): every client mistake is a 4xx naming the field
BAD = [
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temprature": 0.5}, 400, "temprature", "unknown_parameter"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_token": 5}, 400, "max_token", "unknown_parameter"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": "abc"}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 8.7}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 4294967300}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop", None),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": []}, 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "x"}, 400, "model", "missing_required_parameter"),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "min_tokens": -1}, 400, "min_tokens", "invalid_value"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": 1, "echo": True}, 400, "echo", "unsupported_parameter"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stream_options": {"include_usge": True}}, 400,
     "stream_options.include_usge", "unknown_parameter"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type", "unsupported_parameter"),
    (CHAT, {"model": MODEL, "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", "unsupported_parameter"),
    (CHAT, {"model": MODEL, "messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    (CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 1000}, 400, "messages",
     "context_length_exceeded"),
    (CHAT, {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "invalid_value"),
    (CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, 400, "top_logprobs", None),
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": 3, "min_tokens": 4}, 400, "min_tokens", None),
]


def _assert_openai_error(status, body, expected_status, param=None, code=None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_in_openais_shape(frontend, path, body, status, param, code):  # noqa: F811
    got_status, _, got = frontend.request("POST", path, body)
    _assert_openai_error(got_status, got, status, param, code)


def test_error_messages_say_what_is_wrong(frontend):  # noqa: F811
    _, _, typo = frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": "x", "temprature": 0.5})
    assert "did you mean 'temperature'" in typo["error"]["message"]
    long_prompt = list(range(1, 101))
    _, _, too_long = frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": long_prompt, "max_tokens": 40})
    message = too_long["error"]["message"]
    assert "maximum context length is 128 tokens" in message and "100 in the prompt" in message and "140" in message


def test_bodies_that_are_not_requests(frontend):  # noqa: F811
    status, _, body = frontend.request("POST", COMPLETIONS, raw=b'{"model": "tiny", "prompt": ')
    _assert_openai_error(status, body, 400, code="invalid_json")
    status, _, body = frontend.request("POST", COMPLETIONS, raw=b'[1, 2]')
    _assert_openai_error(status, body, 400)
    status, _, body = frontend.request("POST", COMPLETIONS, raw=b"[" * 60000 + b"]" * 60000)
    _assert_openai_error(status, body, 400)
    deep = {"model": MODEL, "prompt": "x", "user": None}
    raw = json.dumps(deep).encode()[:-1] + b', "logit_bias": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"
    status, _, body = frontend.request("POST", COMPLETIONS, raw=raw)
    _assert_openai_error(status, body, 400)
    conn = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=30)
    conn.putrequest("POST", COMPLETIONS)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(5 << 20))  # answered before the body is sent
    conn.endheaders()
    response = conn.getresponse()
    _assert_openai_error(response.status, json.loads(response.read()), 413, code="request_too_large")
    conn.close()
    status, _, body = frontend.request("GET", "/v1/nothing-here")
    _assert_openai_error(status, body, 404)
    status, _, body = frontend.request("GET", COMPLETIONS)
    _assert_openai_error(status, body, 405)
    # and the server still answers
    status, _, body = frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def _sse_events(frontend, path, body):  # noqa: F811
    conn = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    text = response.read().decode()
    conn.close()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def test_sse_framing(frontend):  # noqa: F811
    chunks = _sse_events(frontend, CHAT, {"model": MODEL, "messages": USER, "max_tokens": 6, "stream": True, "n": 2,
                                          "seed": 1, "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    for c in chunks:  # the hand-formatted chunks are what the response model describes
        assert ChatCompletionChunk.model_validate(c).model_dump(exclude={"choices"}) == \
            {k: v for k, v in c.items() if k != "choices"}
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "role" in mine[0]["delta"] and all("role" not in c["delta"] for c in mine[1:])
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_an_error_after_the_stream_started_is_an_sse_event(frontend):  # noqa: F811
    from serving.openai.common import framed
    from serving.openai.errors import OpenAIError

    async def events():
        yield "data: {}\n\n"
        raise OpenAIError(503, "the Triton server is unavailable: gone", type="server_unavailable")

    async def collect():
        return [e async for e in framed(events())]

    out = asyncio.run(collect())
    assert out[0] == "data: {}\n\n" and out[-1] == "data: [DONE]\n\n"
    assert json.loads(out[1][6:])["error"]["type"] == "server_unavailable"


def test_health_metrics_version(frontend):  # noqa: F811
    status, _, body = frontend.request("GET", "/health")
    assert status == 200 and body["models"] == {"gpt": True, "generate": True, "tokenizer": True}
    frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 2})
    status, headers, text = frontend.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'gptpipe_openai_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("gptpipe_openai_time_to_first_token_seconds_count", "gptpipe_openai_e2e_request_latency_seconds_count",
                 "gptpipe_openai_completion_tokens_total", "gptpipe_openai_requests_in_flight"):
        assert name in text
    status, _, body = frontend.request("GET", "/version")
    assert status == 200 and "version" in body


def test_api_key(inflight_session):
    front = Frontend(inflight_session, api_key="s3cret")
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            status, _, got = front.request("POST", COMPLETIONS, body, headers=headers)
            _assert_openai_error(status, got, 401, code="invalid_api_key")
        status, _, got = front.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"})
        assert status == 401
        assert front.request("POST", COMPLETIONS, body)[0] == 200
        assert front.request("GET", "/health", headers={"Authorization": ""})[0] == 200
    finally:
        front.stop()


def test_a_full_kv_pool_is_503_with_retry_after(frontend):  # noqa: F811
    served = frontend.served
    with Client(served.server.grpc_url, queue_timeout=0) as client, ExitStack() as stack:
        for _ in range(int(client.generation_config.max_sequences)):  # hold every slot
            events = stack.enter_context(closing(client.events("Hello", max_new_tokens=50, temperature=0,
                                                               ignore_eos=True)))
            next(events)
        status, headers, body = frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 2})
        _assert_openai_error(status, body, 503, code="server_busy")
        assert headers["retry-after"] == "1"
    assert wait_for(lambda: served.active_sequences() == 0, timeout=5)
    assert frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 2})[0] == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(frontend):  # noqa: F811
    served = frontend.served
    steps_before = metric(served.server, "gptpipe_step_requests_total")
    conn = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=60)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 120, "stream": True, "ignore_eos": True, "temperature": 0}
    conn.request("POST", COMPLETIONS, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event's line
    conn.sock.shutdown(socket.SHUT_RDWR)  # gone, mid-stream (close() alone waits for response.fp)
    conn.close()
    assert wait_for(lambda: served.active_sequences() == 0, timeout=2)
    # (how many steps ran depends on how soon this process got to close the socket: on a loaded
    # machine the tiny model may have finished; the next test checks the stop itself)
    assert metric(served.server, "gptpipe_step_requests_total") - steps_before <= 120


def test_a_cancelled_generation_stops_and_sends_end(frontend):  # noqa: F811
    """What Starlette does when the HTTP client goes away: it cancels the task reading the
    tokens, and keeps cancelling it at every await. The generation stops at once."""
    from serving.openai.engine import Engine, Sampling

    served = frontend.served
    steps_before = metric(served.server, "gptpipe_step_requests_total")

    async def main():
        engine = Engine(served.server.grpc_url, queue_timeout=1.0)
        ids = served.tokenizer.encode("Hello")
        got = asyncio.Event()

        async def reader():
            async for _ in engine.generate(ids, Sampling(max_tokens=120, temperature=0, ignore_eos=True)):
                got.set()

        task = asyncio.ensure_future(reader())
        await asyncio.wait_for(got.wait(), 30)
        for _ in range(3):  # level-triggered, like an anyio cancel scope
            task.cancel()
            await asyncio.sleep(0)
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.5)  # the pump's END step
        await engine.close()

    asyncio.run(main())
    assert wait_for(lambda: served.active_sequences() == 0, timeout=2)
    steps = metric(served.server, "gptpipe_step_requests_total") - steps_before
    assert steps <= 4, f"{steps} steps ran for a generation of 120 tokens cancelled after the first"


def test_the_load_generator_pairs_the_frontend_with_the_direct_client(frontend):  # noqa: F811
    from serving.bench.openai_loadgen import compare

    (level,) = asyncio.run(compare(frontend.base_url, frontend.served.server.grpc_url, MODEL, concurrency=[2],
                                   requests_per_stream=1, max_tokens=8, prompt_tokens=4, rounds=1))
    (front,), (direct,) = level["openai"], level["grpc"]
    assert front["tokens"] == direct["tokens"] == 2 * 8  # every request made exactly max_tokens tokens
    assert level["ratio_median"] > 0 and front["ttft_ms"] > 0 and direct["itl_ms"] > 0


def test_a_huge_prompt_is_refused_by_its_size_before_tokenizing(frontend):  # noqa: F811
    import time

    start = time.perf_counter()
    status, _, body = frontend.request("POST", COMPLETIONS, {"model": MODEL, "prompt": "word " * 700_000,
                                                             "max_tokens": 4})
    _assert_openai_error(status, body, 400, "prompt", "context_length_exceeded")
    assert "at least" in body["error"]["message"] and time.perf_counter() - start < 5
