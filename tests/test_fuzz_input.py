"""Bounded fuzzing (hypothesis) of the generate extension's JSON and the `gpt` model's gRPC inputs
(issue 14): every client mistake is a 4xx / INVALID_ARGUMENT naming the field, never a crash; the
server answers a normal request afterwards and no KV slot is left taken.

The one exception is Triton's own: a JSON value of the wrong type for a declared input is refused
by Triton's generate extension before the model runs, with HTTP 500 "Unable to parse ...";
those cases are counted apart (the model cannot see them; see tests/test_strict_input.py)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from serving import tensors  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.test_client_http_generate import post  # noqa: E402

HTTP_EXAMPLES = 200
GRPC_EXAMPLES = 100
FIELDS = [spec.name for spec in tensors.GENERATE_INPUTS]
_TRITON_TYPE_REFUSAL = ("Unable to parse", "attempt to access JSON", "failed to parse the request JSON")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8), st.lists(st.integers(-5, 600), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
good = {
    "text_input": st.text(min_size=1, max_size=20),
    "input_ids": st.lists(st.integers(0, 511), min_size=1, max_size=8),
    "max_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2),
    "top_k": st.integers(0, 600),
    "top_p": st.floats(0.01, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "random_seed": st.integers(0, 2**63 - 1),
    "stop_words": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "end_id": st.integers(-1, 511),
    "stream": st.booleans(),
    "return_log_probs": st.booleans(),
    # the names Triton's OpenAI frontend sends TensorRT-LLM models
    "seed": st.integers(0, 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "exclude_input_in_output": st.booleans(),
    # vLLM's extras
    "min_tokens": st.integers(0, 6),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
}
misspelled = st.sampled_from(FIELDS).map(lambda f: f[:-1] if len(f) > 4 else f + "s")


@st.composite
def generate_bodies(draw):
    body = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=5)):
        wrong = draw(st.integers(0, 11)) == 0  # mostly well-typed: the model's own checks get tried
        body[name] = draw(scalars if wrong else good[name])
    if draw(st.booleans()):
        body["text_input"] = draw(good["text_input"])
        body.pop("input_ids", None)
    body.setdefault("max_tokens", draw(good["max_tokens"]))
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.one_of(misspelled, st.text(min_size=1, max_size=6)))] = draw(scalars)
    return body


def _names_a_field(message: str, body: dict) -> bool:
    names = list(body) + ["prompt", "text_input", "input_ids", "max_tokens", "token ids"]
    return any(name in message for name in names)


def test_fuzz_generate_json(served, capsys):
    seen: collections.Counter = collections.Counter()

    @settings(max_examples=HTTP_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(generate_bodies())
    def one(body):
        path = "generate_stream" if body.get("stream") is True else "generate"
        status, text = post(served.server, path, body)
        if status == 200:  # served: every field known, max_tokens in range (nothing wrapped or ignored)
            assert set(body) <= set(FIELDS), body
            assert 1 <= body["max_tokens"] <= 127, body
            seen["200"] += 1
            return
        error = text.split("data:", 1)[-1] if path == "generate_stream" else text
        message = json.loads(error)["error"]
        if status == 500 and any(m in message for m in _TRITON_TYPE_REFUSAL):
            seen["500 Triton type refusal"] += 1
            return
        assert 400 <= status < 500 and _names_a_field(message, body), (status, message, body)
        seen[str(status)] += 1

    one()
    assert post(served.server, "generate", {"text_input": "hello", "max_tokens": 2})[0] == 200
    assert wait_for(lambda: served.active_sequences() == 0)
    with capsys.disabled():
        print(f"\ngenerate JSON fuzz: {sum(seen.values())} cases: {dict(seen)}")
    assert sum(seen.values()) >= HTTP_EXAMPLES // 2


@st.composite
def gpt_steps(draw):
    dtype = draw(st.sampled_from(["INT64"] * 6 + ["INT32", "FP32"]))
    shape = draw(st.sampled_from([[1, 1], [1, 3], [1, 5], [1, 0], [2, 2], [3]]))
    n = int(np.prod(shape))
    values = draw(st.lists(st.one_of(st.integers(0, 511), st.integers(-3, 600)), min_size=n, max_size=n))
    params = draw(st.dictionaries(st.one_of(misspelled, st.sampled_from([tensors.LEASE_PARAMETER])),
                                  st.booleans(), max_size=1)) if draw(st.integers(0, 4)) == 0 else {}
    start = draw(st.integers(0, 3)) > 0
    return dtype, shape, values, start, draw(st.booleans()), params


def test_fuzz_gpt_grpc_inputs(served, capsys):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    seen: collections.Counter = collections.Counter()
    np_types = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}

    @settings(max_examples=GRPC_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(gpt_steps(), st.integers(1, 2**63 - 1))
    def one(step, sequence_id):
        dtype, shape, values, start, end, params = step
        tensor = grpcclient.InferInput(tensors.INPUT_IDS, shape, dtype)
        tensor.set_data_from_numpy(np.asarray(values, dtype=np_types[dtype]).reshape(shape))
        try:
            client.infer(tensors.GPT_MODEL, [tensor], sequence_id=sequence_id, sequence_start=start,
                         sequence_end=end, parameters=params or None, client_timeout=30)
            seen["ok"] += 1
        except InferenceServerException as e:
            message, status = e.message() or "", str(e.status())
            assert "INVALID_ARG" in status or "400" in status or "busy" in message, (status, message, step)
            assert any(w in message for w in ("input_ids", "input", "sequence", "parameter", "START", "datatype",
                                              "shape", "field", "tensor")), (message, step)
            seen[status] += 1
        finally:  # free what a START took, whatever happened
            if start and not end:
                release = grpcclient.InferInput(tensors.INPUT_IDS, [1, 1], "INT64")
                release.set_data_from_numpy(np.zeros((1, 1), dtype=np.int64))
                try:
                    client.infer(tensors.GPT_MODEL, [release], sequence_id=sequence_id, sequence_end=True,
                                 client_timeout=30)
                except InferenceServerException:
                    pass

    try:
        one()
    finally:
        client.close()
    assert wait_for(lambda: served.active_sequences() == 0)
    status, _ = post(served.server, "generate", {"text_input": "hello", "max_tokens": 2})
    assert status == 200
    with capsys.disabled():
        print(f"\ngpt gRPC fuzz: {sum(seen.values())} cases: {dict(seen)}")
