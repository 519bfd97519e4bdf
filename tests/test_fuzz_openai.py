"""schemathesis against the OpenAI frontend's own /openapi.json (issue 14's fuzz pass): requests
generated from the declared request bodies (serving/openai/openapi.py), valid and invalid, against
a real uvicorn frontend in front of a real tritonserver. No answer may be a server error; every
4xx is OpenAI's error shape with a message; afterwards the frontend still answers a normal request
and no KV slot is left taken."""

from __future__ import annotations

import collections

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.conftest import metric, wait_for  # noqa: E402
from tests.openai_fixtures import MODEL, frontend  # noqa: E402,F401 - the fixture

EXAMPLES = 60  # per operation (7 operations); about 20 s on the build machine
SEEN: collections.Counter = collections.Counter()


def _check(case) -> None:
    if isinstance(case.body, dict) and SEEN[case.operation.label] % 4 != 3:
        case.body["model"] = MODEL  # mostly the served model: past the 404, into the fields' own checks
    response = case.call(timeout=60)
    SEEN[case.operation.label] += 1
    SEEN[response.status_code] += 1
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], error


def test_generated_requests_get_no_server_error(frontend):  # noqa: F811 - the fixture
    """Positive and negative cases of every operation, straight from hypothesis (schemathesis's
    pytest plugin does not run on pytest 9)."""
    schema = schemathesis.openapi.from_url(frontend.base_url + "/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:  # schema-valid bodies, then schema-violating ones
            run = given(operation.as_strategy(generation_mode=mode))(
                settings(max_examples=EXAMPLES // 2, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))(lambda case: _check(case)))
            try:
                run()
            except Unsatisfiable:  # nothing to violate: an operation without parameters or body
                assert mode is schemathesis.GenerationMode.NEGATIVE and not operation.body, operation.label


def test_the_frontend_still_serves_after_the_fuzzing(frontend, inflight_session):  # noqa: F811
    operations = {k: v for k, v in SEEN.items() if isinstance(k, str)}
    assert len(operations) == 7 and sum(operations.values()) >= 7 * 10, SEEN
    assert any(isinstance(k, int) and 400 <= k < 500 for k in SEEN), SEEN  # the invalid cases were tried
    assert SEEN[200] > 0, SEEN
    status, _, body = frontend.request("POST", "/v1/completions", {"model": MODEL, "prompt": "hello",
                                                                   "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body
    assert wait_for(lambda: metric(inflight_session.server, "gptpipe_kv_active_sequences") == 0, timeout=5)
    print("schemathesis cases by operation and status:", dict(SEEN))
