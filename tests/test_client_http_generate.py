"""The `generate` model through Triton's HTTP generate extension (raw HTTP: what server mode over HTTP reads)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from tests.conftest import wait_for
from tests.test_client import PROMPTS


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
        ({"text_input": "hello", "max_tokens": 0}, r"max_tokens must be in \[1, 127\].*, got 0"),
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
