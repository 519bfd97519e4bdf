"""The client library and the `generate` model against a REAL tritonserver.

One server per session serves the `tiny` model (random weights, seeded) exported to ONNX with
a byte-level BPE tokenizer trained here; the PyTorch model it came from is the reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from contextlib import closing

import pytest

from export.model import generate_greedy
from serving import (
    AsyncClient,
    Client,
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    ServerBusyError,
    ServerUnavailableError,
)
from serving.client import error_from_message
from tests.conftest import metric, wait_for
from tests.triton_fixtures import attach_server_log, start_server

MODES = ["client", "server"]
PROMPTS = [
    "The quick brown fox",
    "In Python, a function is",
    "x",
    "Exceptions are raised when an error occurs in the middle of a long sentence about",
]


@pytest.fixture
def client(served):
    with Client(served.server.grpc_url) as c:
        yield c


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("mode", MODES)
def test_greedy_matches_pytorch_reference(served, client, mode):
    result = client.generate(PROMPTS[0], max_new_tokens=24, temperature=0, mode=mode)
    expected = served.reference(PROMPTS[0], 24)
    assert result.token_ids == expected
    assert result.finish_reason == ("eos" if expected[-1] == 0 else "length")
    assert result.text == served.tokenizer.decode([t for t in expected if t != 0])
    assert result.timings.ttft_s > 0 and len(result.timings.itl_s) == len(expected) - 1


@pytest.mark.parametrize("mode", MODES)
def test_batched_prompts_match_pytorch_reference(served, client, mode):
    results = client.generate(PROMPTS, max_new_tokens=16, temperature=0, mode=mode)
    assert [r.token_ids for r in results] == [served.reference(p, 16) for p in PROMPTS]


def test_http_protocol_client_loop_matches_reference(served):
    with Client(served.server.http_url, protocol="http") as client:
        results = client.generate(PROMPTS[:2], max_new_tokens=12, temperature=0)
        streamed = "".join(client.generate(PROMPTS[0], max_new_tokens=12, temperature=0, stream=True))
        # server mode over HTTP: the generate extension's generate_stream (SSE)
        server = client.generate(PROMPTS[:2], max_new_tokens=12, temperature=0, mode="server")
    assert [r.token_ids for r in results] == [served.reference(p, 12) for p in PROMPTS[:2]]
    assert [r.token_ids for r in server] == [r.token_ids for r in results]
    assert streamed == results[0].text == server[0].text


def test_sixteen_concurrent_generations_are_all_correct_and_batched(served, client):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(16)]
    results = client.generate(prompts, max_new_tokens=12, temperature=0)
    assert [r.token_ids for r in results] == [served.reference(p, 12) for p in prompts]
    # the sequence batcher handed the gpt model several sequences' steps at once
    assert metric(served.server, "gptpipe_max_rows_per_call") > 1
    assert wait_for(lambda: served.active_sequences() == 0)


# ------------------------------------------------------------------ sampling


def test_seeded_sampling_is_reproducible_and_identical_across_modes(client):
    kw = dict(max_new_tokens=32, temperature=0.9, top_k=100, top_p=0.95, repetition_penalty=1.2,
              return_logprobs=True)
    a = client.generate(PROMPTS[1], seed=2024, **kw)
    b = client.generate(PROMPTS[1], seed=2024, **kw)
    s = client.generate(PROMPTS[1], seed=2024, mode="server", **kw)
    other = client.generate(PROMPTS[1], seed=2025, **kw)
    assert a.token_ids == b.token_ids == s.token_ids
    assert a.text == s.text
    assert a.logprobs == pytest.approx(s.logprobs, abs=1e-5) and len(a.logprobs) == len(a.token_ids)
    assert other.token_ids != a.token_ids


# ------------------------------------------------------------------ stop, eos, text


@pytest.mark.parametrize("mode", MODES)
def test_stop_string_across_tokens_is_cut(served, client, mode):
    ids = served.reference(PROMPTS[3], 30)
    ids = ids[: ids.index(0)] if 0 in ids else ids
    pieces = [served.tokenizer.decode([t]) for t in ids]
    # a stop string made of the end of one token and the start of the next one
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = served.tokenizer.decode(ids)
    result = client.generate(PROMPTS[3], max_new_tokens=30, temperature=0, stop=["never-there", stop], mode=mode)
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert stop not in result.text
    assert result.token_ids == ids[: len(result.token_ids)] and len(result.token_ids) <= k + 2
    assert wait_for(lambda: served.active_sequences() == 0)


@pytest.mark.parametrize("mode", MODES)
def test_eos_ends_generation(served, tmp_path, mode):
    ids = served.reference(PROMPTS[2], 20)
    eos = ids[5]  # make the 6th greedy token "eos" through a local generation config
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(served.tokenizer.to_str())
    config = json.loads((served.repository / "tokenizer" / "1" / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    with Client(served.server.grpc_url, tokenizer=folder) as client:
        result = client.generate(PROMPTS[2], max_new_tokens=20, temperature=0, mode=mode)
        # token ids in, eos ignored: exactly max_new_tokens tokens (what a benchmark wants)
        with closing(client.events(served.tokenizer.encode(PROMPTS[2]), max_new_tokens=20, temperature=0,
                                   mode=mode, ignore_eos=True)) as events:
            all_ids = [e.token_id for e in events]
    expected = ids[: ids.index(eos) + 1]
    assert result.token_ids == expected and result.finish_reason == "eos"
    assert result.text == served.tokenizer.decode(expected[:-1])
    assert all_ids == generate_greedy(served.model, served.tokenizer.encode(PROMPTS[2]), 20)


@pytest.mark.parametrize("mode", MODES)
def test_streaming_never_splits_utf8_characters(served, client, mode):
    tok = served.tokenizer
    split_chars = 0
    for seed in range(6):
        with client.generate("日本語 café 🎉", max_new_tokens=24, temperature=3.0, seed=seed, stream=True,
                             mode=mode) as stream:
            deltas = list(stream)
        ids = stream.result.token_ids
        full = tok.decode([t for t in ids if t != 0])
        assert "".join(deltas) == stream.result.text == full
        # count characters of more than one byte whose bytes came in different tokens
        if any("\ufffd" in tok.decode([t]) for t in ids) and any(ord(c) > 127 and c != "\ufffd" for c in full):
            split_chars += 1
    assert split_chars > 0, "no multi-byte character spanned tokens: the test proved nothing"


# ------------------------------------------------------------------ cancel and free slots


@pytest.mark.parametrize("mode", MODES)
def test_closing_a_stream_early_frees_the_server_slot(served, client, mode):
    assert wait_for(lambda: served.active_sequences() == 0)
    stream = client.generate(PROMPTS[0], max_new_tokens=100, temperature=0.8, seed=1, stream=True, mode=mode)
    deltas = [next(stream) for _ in range(3)]
    assert served.active_sequences() == 1
    stream.close()
    assert wait_for(lambda: served.active_sequences() == 0), "the sequence kept its KV slot"
    assert len("".join(deltas)) > 0


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


def test_async_client(served):
    async def main():
        async with AsyncClient(served.server.grpc_url) as client:
            one = await client.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
            many = await client.generate(PROMPTS, max_new_tokens=12, temperature=0)
            server = await client.generate(PROMPTS[1], max_new_tokens=12, temperature=0, mode="server")
            deltas = [d async for d in client.generate(PROMPTS[0], max_new_tokens=12, temperature=0, stream=True)]
            early = client.generate(PROMPTS[0], max_new_tokens=100, temperature=0, stream=True)
            await early.__anext__()
            await early.aclose()
            return one, many, server, deltas

    one, many, server, deltas = asyncio.run(main())
    assert one.token_ids == served.reference(PROMPTS[0], 12)
    assert [r.token_ids for r in many] == [served.reference(p, 12) for p in PROMPTS]
    assert server.token_ids == served.reference(PROMPTS[1], 12)
    assert "".join(deltas) == one.text
    assert wait_for(lambda: served.active_sequences() == 0)


# ------------------------------------------------------------------ validation and errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=0), r"max_new_tokens must be an int >= 1, got 0"),
        (dict(temperature=-1.0), r"temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.2), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), r"top_k must be >= 0"),
        (dict(repetition_penalty=0), r"repetition_penalty must be > 0"),
        (dict(seed=2**64), r"seed must be in \[0, 2\*\*63\)"),
        (dict(stop=[""]), r"stop\[0\] must be a non-empty string"),
        (dict(mode="both"), r"mode must be 'client' or 'server'"),
        (dict(prompt=""), r"prompt is empty"),
        (dict(prompt=["a", 3]), r"prompt\[1\] must be a string"),
        (dict(prompt=["a", "b"], stream=True), r"stream=True takes one prompt"),
    ],
)
def test_bad_arguments_fail_before_any_network_call(kw, match):
    # nothing listens on port 1: reaching the network would raise ServerUnavailableError
    kw = {"prompt": "hello", **kw}
    with Client("127.0.0.1:1") as client:
        with pytest.raises(InvalidParameterError, match=match):
            client.generate(kw.pop("prompt"), **kw)


def test_unreachable_server_error_names_the_url():
    for protocol in ("grpc", "http"):
        with Client("127.0.0.1:1", protocol=protocol) as client:
            with pytest.raises(ServerUnavailableError, match=r"127\.0\.0\.1:1"):
                client.generate("hello", max_new_tokens=2)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_past_the_context_is_refused(client, mode):
    with pytest.raises(PromptTooLongError, match=r"exceeds the context length n_positions=128"):
        client.generate("word " * 200, max_new_tokens=4, mode=mode)
    with pytest.raises(PromptTooLongError, match=r"max_new_tokens=120"):
        client.generate(PROMPTS[3], max_new_tokens=120, mode=mode)


def test_server_messages_become_gptpipe_exceptions():
    busy = error_from_message("server busy: 8 of 8 sequences active; retry later")
    assert isinstance(busy, ServerBusyError) and str(busy).startswith("server busy")
    assert isinstance(error_from_message("prompt too long: 200 tokens"), PromptTooLongError)
    assert isinstance(error_from_message("invalid parameter: top_p must be in (0, 1]"), InvalidParameterError)
    other = error_from_message("engine error: boom")
    assert isinstance(other, GptpipeError) and "boom" in str(other)


def test_server_hanging_or_going_away_mid_generation_is_a_clear_error(served, request):
    private = start_server(served.repository)
    attach_server_log(request, private)

    def open_streams(client):
        streams = [client.generate(PROMPTS[0], max_new_tokens=100, temperature=1.0, seed=3, stream=True, mode=mode)
                   for mode in MODES]
        for stream in streams:
            next(stream)
        return streams

    def assert_fails(streams, match, within):
        for stream in streams:
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailableError, match=match):
                list(stream)  # drain: the error must surface, not a hang
            assert time.monotonic() - t0 < within

    try:
        with Client(private.grpc_url, timeout_s=2) as client:
            streams = open_streams(client)
            os.kill(private.pid, signal.SIGSTOP)  # hung (its stubs run on): only timeouts end the wait
            try:
                # the 2 s step timeout + as much for the END attempt: not an endless wait
                assert_fails(streams, r"no answer from the Triton server at .* within 2", within=8)
            finally:
                os.kill(private.pid, signal.SIGCONT)
            streams = open_streams(client)
            os.killpg(private.pid, signal.SIGKILL)  # gone at once: the connection breaks
            assert_fails(streams, re.escape(private.grpc_url), within=5)
    finally:
        private.stop()


# ------------------------------------------------------------------ HTTP generate extension


def post(server, path: str, body: str | dict, timeout: float = 30):
    data = body if isinstance(body, str) else json.dumps(body)
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/generate/{path}", data=data.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def as_list(value) -> list:
    """Triton's generate extension writes a one-element output as a bare value."""
    return value if isinstance(value, list) else [value]


def test_http_generate_extension(served):
    expected = served.reference(PROMPTS[0], 16)
    status, body = post(served.server, "generate", {"text_input": PROMPTS[0], "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    assert as_list(out["output_ids"]) == expected
    assert out["text_output"] == served.tokenizer.decode([t for t in expected if t != 0])
    assert out["finish_reason"] in ("length", "eos")

    status, body = post(served.server, "generate_stream",
                        {"text_input": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stream": True,
                         "return_log_probs": True})
    assert status == 200, body
    events = sse_events(body)
    assert len(events) == len(expected)
    assert [as_list(e["output_ids"]) for e in events] == [[t] for t in expected]
    assert "".join(e["text_output"] for e in events) == out["text_output"]
    assert events[-1]["finish_reason"] == out["finish_reason"] and events[0]["finish_reason"] == ""
    assert all(len(as_list(e["output_log_probs"])) == 1 for e in events)

    # input_ids and stop_words as JSON arrays
    ids = served.tokenizer.encode(PROMPTS[0])
    status, body = post(served.server, "generate", {"input_ids": ids, "max_tokens": 16, "temperature": 0,
                                                    "stop_words": ["never", "there"]})
    assert status == 200 and as_list(json.loads(body)["output_ids"]) == expected


def test_http_malformed_json_gets_a_clear_error_and_the_server_keeps_serving(served):
    status, body = post(served.server, "generate", '{"text_input": "hello", "max_tokens": ')
    assert status >= 400 and "JSON" in json.loads(body)["error"]
    status, body = post(served.server, "generate", {"text_input": "hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and len(as_list(json.loads(body)["output_ids"])) >= 1


@pytest.mark.parametrize(
    "body, match",
    [
        ({"text_input": "hello", "max_tokens": 0}, r"max_tokens must be an int >= 1, got 0"),
        ({"text_input": "hello", "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"text_input": "hello", "top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
        ({"text_input": "hello", "temperature": -0.5}, r"temperature must be >= 0"),
        ({"text_input": "", "max_tokens": 4}, r"prompt is empty"),
        ({"text_input": "word " * 200, "max_tokens": 4}, r"prompt too long: .* n_positions=128"),
        ({"max_tokens": 4}, r"needs text_input .* or input_ids"),
        ({"input_ids": [1, 100000], "max_tokens": 4}, r"token ids must be in \[0, 512\)"),
        ({"text_input": "hello", "stop_words": [""]}, r"stop_words\[0\] must be a non-empty string"),
    ],
)
def test_bad_generate_requests_get_clear_errors_and_the_server_keeps_serving(served, body, match):
    for path in ("generate", "generate_stream"):
        status, text = post(served.server, path, body)
        error = json.loads(text)["error"] if path == "generate" else json.dumps(sse_events(text) or json.loads(text))
        assert re.search(match, error), error
    status, text = post(served.server, "generate", {"text_input": "hello", "max_tokens": 2, "temperature": 0})
    assert status == 200, text
    assert wait_for(lambda: served.active_sequences() == 0)


# ------------------------------------------------------------------ CLI


def test_cli_generate(served):
    import typer
    from typer.testing import CliRunner

    from serving.commands.generate import generate

    app = typer.Typer()  # the command as serving/cli.py registers it, without the other commands
    app.command("generate")(generate)
    app.command("version")(lambda: None)  # two commands: `generate` stays a subcommand
    runner = CliRunner()
    url = served.server.grpc_url
    result = runner.invoke(app, ["generate", PROMPTS[0], "--url", url, "--max-new-tokens", "8",
                                 "--temperature", "0", "--json", "--mode", "server"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == served.reference(PROMPTS[0], 8)
    assert len(out["timings"]["itl_s"]) == len(out["token_ids"]) - 1
    streamed = runner.invoke(app, ["generate", PROMPTS[0], "--url", url, "--max-new-tokens", "8", "--temperature", "0"])
    assert streamed.exit_code == 0 and streamed.stdout.startswith(out["text"])
    bad = runner.invoke(app, ["generate", PROMPTS[0], "--url", url, "--top-p", "0"])
    assert bad.exit_code != 0 and "top_p must be in (0, 1]" in bad.output
