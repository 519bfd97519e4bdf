"""Strict input (issue 14, findings 5 and 6): the same rules in the Python client, `generate` (HTTP
generate extension JSON and gRPC tensors) and `gpt`; a prompt too big to fit refused before tokenizing."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from serving.client import Client
from serving.generation import InvalidParameterError, PromptTooLongError
from serving.request_rules import check_bool, check_int, check_known_fields, check_prompt_bytes
from tests.test_client_http_generate import post, sse_events

HELLO = {"text_input": "hello", "max_tokens": 2, "temperature": 0}


# ---------------------------------------------------------------- the rules themselves


@pytest.mark.parametrize("value, match", [
    (4294967300, r"max_tokens must be in \[1, 127\].*got 4294967300$"),
    (10**12, r"got 1000000000000$"),
    (np.int64(2**40), r"got 1099511627776$"),
    (True, r"must be an integer, got True \(boolean\)"),
    (np.bool_(True), r"must be an integer"),
    (8.7, r"must be an integer, got 8.7 \(float\)"),
    (8.0, r"must be an integer"),
    ("abc", r"must be an integer, got 'abc' \(str\)"),
    (None, r"must be an integer, got None"),
])
def test_integers_are_checked_before_any_cast(value, match):
    with pytest.raises(InvalidParameterError, match=match):
        check_int("max_tokens", value, lo=1, hi=127)


def test_bools_and_unknown_fields():
    assert check_bool("stream", np.bool_(False)) is False
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidParameterError, match="stream must be a boolean"):
            check_bool("stream", bad)
    known = {"max_tokens", "temperature", "top_p"}
    with pytest.raises(InvalidParameterError, match="unknown field 'max_token': did you mean 'max_tokens'"):
        check_known_fields(["max_token"], known)
    with pytest.raises(InvalidParameterError, match="unknown field 'temprature': did you mean 'temperature'"):
        check_known_fields(["top_p", "temprature"], known)
    with pytest.raises(InvalidParameterError, match="unknown field 'zzz': valid fields: max_tokens, temperature"):
        check_known_fields(["zzz"], known)


def test_prompt_bytes_bound_is_exact_at_the_limit():
    check_prompt_bytes("a" * 120, n_positions=128, max_new_tokens=8, max_token_bytes=1)
    with pytest.raises(PromptTooLongError, match="121 UTF-8 bytes, more than the 120"):
        check_prompt_bytes("a" * 121, n_positions=128, max_new_tokens=8, max_token_bytes=1)
    with pytest.raises(PromptTooLongError):  # é is 2 bytes: 61 of them are 122 bytes
        check_prompt_bytes("é" * 61, n_positions=128, max_new_tokens=8, max_token_bytes=1)


def test_tokenizer_max_token_bytes_bounds_every_token(served):
    tok = served.tokenizer
    longest = max(len(tok.decode([i]).encode()) for i in range(tok.vocab_size))
    assert tok.max_token_bytes == longest >= 1


# ---------------------------------------------------------------- the Python client


@pytest.mark.parametrize("kw, match", [
    (dict(stop=5), r"stop must be a string or a list of strings, got 5 \(int\)"),
    (dict(stream="yes"), r"stream must be a boolean"),
    (dict(return_logprobs=1), r"return_logprobs must be a boolean"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer"),
    (dict(top_k=2.5), r"top_k must be an int"),
])
def test_client_type_errors_are_typed_before_any_network_call(kw, match):
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidParameterError, match=match):
        client.generate("hello", **kw)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_client_refuses_a_huge_max_new_tokens_naming_the_limit(served, mode):
    with Client(served.server.grpc_url) as client:
        for value in (4294967300, 10**12):
            with pytest.raises(InvalidParameterError, match=rf"max_new_tokens must be in \[1, 127\].*got {value}"):
                client.generate("hello", max_new_tokens=value, mode=mode)


# ---------------------------------------------------------------- generate: HTTP and gRPC


@pytest.mark.parametrize("extra, match", [
    ({"max_tokens": 4294967300}, r"max_tokens must be in \[1, 127\].*got 4294967300"),
    ({"max_tokens": 10**12}, r"max_tokens must be in \[1, 127\].*got 1000000000000"),
    ({"top_k": 2**40}, None),  # wide enough not to wrap: accepted as "keep 2**40 tokens" = all
    ({"end_id": 2**32}, r"end_id must be in \[-1, 511\].*got 4294967296"),
    ({"max_token": 3}, r"unknown field 'max_token' of the generate request: did you mean 'max_tokens'\?"),
    ({"temprature": 0.5}, r"unknown field 'temprature'.*did you mean 'temperature'\?"),
    ({"stream_": True}, r"did you mean 'stream'\?"),
    ({"sequence_id": 4}, r"unknown field 'sequence_id'"),
])
def test_http_generate_refuses_silently_wrong_input(served, extra, match):
    for path in ("generate", "generate_stream"):
        status, text = post(served.server, path, {**HELLO, **extra})
        if match is None:
            assert status == 200, text
            continue
        assert status == 400, (status, text)
        error = json.loads(text)["error"] if path == "generate" else sse_events(text)[0]["error"]
        assert re.search(match, error), text
    status, text = post(served.server, "generate", HELLO)
    assert status == 200, text


@pytest.mark.parametrize("field, value", [("max_tokens", "abc"), ("max_tokens", True), ("max_tokens", 8.7),
                                          ("stream", "yes"), ("temperature", "hot"), ("text_input", 5)])
def test_http_generate_type_errors_are_refused_by_triton_before_the_model(served, field, value):
    """What Triton 2.51 itself does: its generate extension converts JSON to the declared
    tensor type before the model runs, and refuses a value of the wrong type with HTTP 500 and
    a message that names no field. The model never sees the request; the server keeps serving."""
    status, text = post(served.server, "generate", {**HELLO, field: value})
    assert status == 500 and "Unable to parse" in json.loads(text)["error"], text
    assert post(served.server, "generate", HELLO)[0] == 200


def _grpc_generate(server, inputs: dict, parameters=None):
    import tritonclient.grpc as grpcclient

    from serving import tensors

    specs = {s.name: s for s in tensors.GENERATE_INPUTS}
    infer_inputs = []
    for name, value in inputs.items():
        spec = specs[name]
        array = np.asarray(value, dtype=np.object_ if spec.dtype == "bytes" else spec.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), spec.datatype)
        tensor.set_data_from_numpy(array)
        infer_inputs.append(tensor)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = []
    done = threading.Event()

    def callback(result, error):
        results.append(error or result)
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    try:
        client.start_stream(callback=callback)
        client.async_stream_infer("generate", infer_inputs, parameters=parameters, enable_empty_final_response=True)
        assert done.wait(30)
        client.stop_stream()
    finally:
        client.close()
    return results


def test_grpc_generate_refuses_wrapping_integers_and_unknown_parameters(served):
    from tritonclient.utils import InferenceServerException

    (error,) = _grpc_generate(served.server, {"text_input": [b"hello"], "max_tokens": [4294967300]})
    assert isinstance(error, InferenceServerException) and "max_tokens must be in [1, 127]" in str(error)
    (error,) = _grpc_generate(served.server, {"text_input": [b"hello"], "max_tokens": [2]},
                              parameters={"temprature": 0.5})
    assert "did you mean 'temperature'" in str(error)
    ok = _grpc_generate(served.server, {"text_input": [b"hello"], "max_tokens": [2], "temperature": [0.0]})
    assert not isinstance(ok[0], Exception)


# ---------------------------------------------------------------- finding 6: the prompt byte bound


def test_a_5mb_prompt_is_refused_at_once_and_does_not_stall_others(served):
    huge = "word " * 1_000_000  # 5 MB
    with Client(served.server.grpc_url) as client:
        client.generate("warm up", max_new_tokens=1)
        _ = client.tokenizer.max_token_bytes
        t0 = time.perf_counter()
        with pytest.raises(PromptTooLongError, match="refused before tokenizing"):
            client.generate(huge, max_new_tokens=4)
        assert time.perf_counter() - t0 < 1.0

    # the server side: the HTTP generate extension, while another request runs
    other: dict = {}

    def normal():
        t = time.perf_counter()
        other["status"] = post(served.server, "generate", HELLO)[0]
        other["s"] = time.perf_counter() - t

    t0 = time.perf_counter()
    thread = threading.Thread(target=normal)
    thread.start()
    status, text = post(served.server, "generate", {"text_input": huge, "max_tokens": 4})
    refused_s = time.perf_counter() - t0
    thread.join(30)
    assert status == 400 and "refused before tokenizing" in json.loads(text)["error"], text[:300]
    assert refused_s < 1.0, refused_s  # most of it is Triton parsing 5 MB of JSON
    assert other["status"] == 200 and other["s"] < 1.0, other
