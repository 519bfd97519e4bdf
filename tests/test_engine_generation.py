"""Engine-side generation (serving/engine/generations.py): the in-flight `gpt` runs a whole
generation's loop itself. In process through StepEngine.serve against PyTorch, and on a REAL
tritonserver: the `generate` model (server mode) makes one `gpt` request per generation, and
tritonclient calls `gpt` with the parameter directly."""

from __future__ import annotations

import json
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving import Client
from serving.engine.generations import CancelStep, GenerateStep, parse_generation
from serving.engine.scheduler import StepQueue, StepRequest
from serving.errors import InvalidParameterError
from serving.repository import ServingOptions, write_repository
from tests.conftest import metric, wait_for
from tests.test_engine_step import engine_for
from tests.test_inflight import PROMPTS


def _generation(prompt, **spec):
    return parse_generation(json.dumps({"max_new_tokens": 12, "temperature": 0, **spec}), prompt,
                            n_positions=128, vocab_size=512)


@pytest.fixture
def engine(tiny_export, tmp_path):
    model, _, onnx_path = tiny_export
    repository = write_repository(tmp_path / "repo", engine_file=onnx_path, tokenizer_json="{}",
                                  model_config=model.config.to_dict(), options=ServingOptions(max_sequences=3))
    engine, _ = engine_for(repository)
    engine.answer_token = lambda request, token, error: (request, token, error)
    q = StepQueue(wait_s=0.0)
    sent: list = []  # (sender, (request, token, error), final)
    thread = threading.Thread(target=engine.serve, args=(q,), daemon=True,
                              kwargs=dict(send=lambda s, r, final: sent.append((s, r, final)),
                                          failed=lambda request, e: (request, None, str(e))))
    thread.start()
    yield engine, q, sent
    q.close()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_the_engine_runs_a_greedy_generation_to_pytorchs_tokens_and_frees_its_slot(tiny_export, engine) -> None:
    from export.model import generate_greedy

    model = tiny_export[0]
    engine, q, sent = engine
    prompt = [5, 6, 7, 8]
    q.put(9, ("r", GenerateStep(StepRequest(9, np.array(prompt), start=True), _generation(prompt)), "s", False))
    assert wait_for(lambda: sent and sent[-1][2])
    assert [r[1] for _, r, _ in sent] == generate_greedy(model, prompt, 12, eos_token_id=None)
    assert [final for *_, final in sent] == [False] * 11 + [True]  # one response per token, FINAL on the last
    assert all(error is None for (_, _, error) in (r for _, r, _ in sent))
    assert wait_for(lambda: engine.scheduler.active == 0 and not engine.generations)


def test_a_cancel_stops_a_generation_and_a_client_step_of_it_is_refused(engine) -> None:
    engine, q, sent = engine
    g = _generation([1, 2, 3], max_new_tokens=120)
    with engine.lock:  # the engine takes all three before the generation's second step
        q.put(4, ("r", GenerateStep(StepRequest(4, np.array([1, 2, 3]), start=True), g), "gen", False))
        q.put(4, ("x", StepRequest(4, np.array([3])), "client", False))  # the sequence belongs to the engine
        q.put(77, ("c", CancelStep(77, target=4), "cancel", False))
    assert wait_for(lambda: any(s == "gen" and final for s, _, final in sent) and any(s == "client" for s, *_ in sent))
    refused = [r for s, r, _ in sent if s == "client"]
    assert refused and "generating in the engine" in refused[0][2]
    assert [r for s, r, final in sent if s == "cancel"] == [("c", None, None)]
    tokens = [r for s, r, _ in sent if s == "gen"]
    assert len(tokens) < 120 and tokens[-1] == ("r", None, None)  # stopped early, ended with no token
    assert wait_for(lambda: engine.scheduler.active == 0 and not engine.generations)


@pytest.mark.parametrize("spec, field", [
    ({"temperature": 0}, "max_new_tokens"),
    ({"max_new_tokens": 4, "temprature": 0}, "temprature"),
    ({"max_new_tokens": 4, "top_p": 2.0}, "top_p"),
    ({"max_new_tokens": 200}, "n_positions"),
    ({"max_new_tokens": 4, "eos_token_id": 512}, "eos_token_id"),
])
def test_a_bad_generation_spec_names_its_field(spec, field) -> None:
    with pytest.raises(InvalidParameterError, match=field):
        parse_generation(json.dumps(spec), [1, 2], n_positions=128, vocab_size=512)


# ---------------------------------------------------------------------------- a real server


def test_server_mode_makes_one_gpt_request_per_generation(inflight) -> None:
    """The `generate` model hands the loop to the engine: one `gpt` request for 20 tokens (it
    was 20, one per step), PyTorch's greedy tokens."""
    with Client(inflight.server.grpc_url) as client:
        before = metric(inflight.server, "gptpipe_step_requests_total")
        result = client.generate(PROMPTS[0], max_new_tokens=20, temperature=0, mode="server")
        assert result.token_ids == inflight.reference(PROMPTS[0], 20)
        assert metric(inflight.server, "gptpipe_step_requests_total") - before == 1


def test_server_mode_samples_what_the_client_side_loop_samples(inflight) -> None:
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2,
              presence_penalty=0.3, seed=11)
    with Client(inflight.server.grpc_url) as client:
        assert client.generate(PROMPTS[1], mode="server", **kw).token_ids == \
            client.generate(PROMPTS[1], mode="client", **kw).token_ids


def test_a_stop_string_stops_the_engine(inflight) -> None:
    """The stop string is found in the `generate` model's text; its cancel ends the engine's
    loop long before max_new_tokens and frees the slot."""
    with Client(inflight.server.grpc_url) as client:
        full = client.generate(PROMPTS[2], max_new_tokens=40, temperature=0, mode="client")
        stop = full.text[4:8]
        assert stop.strip()
        before = metric(inflight.server, "gptpipe_runtime_calls_total")
        result = client.generate(PROMPTS[2], max_new_tokens=110, temperature=0, stop=stop, mode="server")
        assert result.finish_reason == "stop" and result.text == full.text[:full.text.find(stop)]
        assert wait_for(lambda: inflight.active_sequences() == 0)
        assert metric(inflight.server, "gptpipe_runtime_calls_total") - before < 100


def _direct(inflight, parameters, *, start=True, end=True, ids=(1, 2, 3)):
    """Responses of one `gpt` request over tritonclient's gRPC stream: (output_ids or None, error)."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(inflight.server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        x = grpcclient.InferInput("input_ids", [1, len(ids)], "INT64")
        x.set_data_from_numpy(np.array([ids], dtype=np.int64))
        client.async_stream_infer("gpt", [x], outputs=[grpcclient.InferRequestedOutput("output_ids")],
                                  sequence_id=int(np.random.default_rng().integers(1, 2**62)), sequence_start=start,
                                  sequence_end=end, parameters=parameters, enable_empty_final_response=True)
        out = []
        while True:
            result, error = got.get(timeout=30)
            if error is not None:
                return out, str(error)
            ids_out = result.as_numpy("output_ids")
            if ids_out is not None:
                out.append(int(ids_out[0, 0]))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out, None
    finally:
        client.stop_stream()
        client.close()


def test_tritonclient_can_run_a_generation_in_gpt_directly(inflight) -> None:
    prompt = inflight.tokenizer.encode(PROMPTS[0])
    spec = json.dumps({"max_new_tokens": 10, "temperature": 0, "eos_token_id": None})
    tokens, error = _direct(inflight, {"gptpipe_generate": spec}, ids=prompt)
    assert error is None and tokens == inflight.reference(PROMPTS[0], 10)[:10]


@pytest.mark.parametrize("parameters, kw, message", [
    ({"gptpipe_generate": json.dumps({"max_new_tokens": 4})}, dict(end=False), "START and END"),
    ({"gptpipe_generate": json.dumps({"max_new_tokens": 4, "top_k": -1})}, {}, "top_k"),
    ({"gptpipe_generate": "{not json"}, {}, "JSON object"),
    ({"gptpipe_cancel": "seven"}, {}, "gptpipe_cancel"),
])
def test_a_bad_direct_generation_is_refused_naming_its_field(inflight, parameters, kw, message) -> None:
    tokens, error = _direct(inflight, parameters, **kw)
    assert tokens == [] and error is not None and message in error
    assert "invalid parameter" in error or "must" in error
    assert wait_for(lambda: inflight.active_sequences() == 0)  # the server keeps serving, nothing held


def test_the_benchs_engine_mode_gets_pytorchs_tokens_and_a_closed_stream_stops_the_engine(inflight) -> None:
    """`gptpipe bench --mode engine`: tritonclient straight into the engine's loop. Leaving the
    stream early cancels the request; the engine's watcher (every 0.25 s) stops the generation and
    frees its slot, and the server keeps serving. (The tiny model's 86 steps take less than one
    watcher period, so how early it stops is not asserted here; the stop-string test above counts.)"""
    from export.model import generate_greedy
    from serving.bench.served import ServedGenerator

    prompt = inflight.tokenizer.encode(PROMPTS[3])
    generator = ServedGenerator(inflight.server.grpc_url, mode="engine")
    try:
        timing = generator(prompt, 16)
        assert list(timing.tokens) == generate_greedy(inflight.model, prompt, 16, eos_token_id=None)
        events = generator._events(prompt, 128 - len(prompt))
        next(events)
        events.close()  # the caller goes away after one token
        assert wait_for(lambda: inflight.active_sequences() == 0)
        assert list(generator(prompt, 16).tokens) == list(timing.tokens)
    finally:
        generator.close()
