"""Client mistakes and server failures: checked arguments, clear errors naming the field, the URL or the limit."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from serving import (
    Client,
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    ServerBusyError,
    ServerUnavailableError,
)
from serving.client.errors import error_from_message
from tests.test_client import MODES, PROMPTS, client  # noqa: F401 - client: the fixture
from tests.triton_fixtures import attach_server_log, start_server


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=0), r"max_new_tokens must be (>= 1|in \[1, \d+\]).*, got 0"),
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


def shm_files_of(pgid: int) -> set[Path]:
    """The /dev/shm files the processes of a process group map (a server and its python-backend stubs)."""
    files = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if os.getpgid(int(maps.parent.name)) == pgid:
                files |= {Path(m[1]) for m in re.finditer(r" (/dev/shm/\S+)$", maps.read_text(), re.M)}
        except OSError:  # the process is gone meanwhile
            continue
    return files


def test_server_hanging_or_going_away_mid_generation_is_a_clear_error(served, request):
    private = start_server(served.repository)
    killed_shm: set[Path] = set()  # a SIGKILLed server leaves its python-backend regions: removed below
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
            killed_shm = shm_files_of(private.pid)
            os.killpg(private.pid, signal.SIGKILL)  # gone at once: the connection breaks
            assert_fails(streams, re.escape(private.grpc_url), within=5)
    finally:
        private.stop()
        for path in killed_shm:
            path.unlink(missing_ok=True)
