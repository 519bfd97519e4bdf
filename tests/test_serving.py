"""The `gpt` step model on a real tritonserver: parity with PyTorch, batching, slot lifecycle,
busy pool, and bad requests (issue: serve on a real Triton Inference Server)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from export.model import generate_greedy
from serving import tensors
from serving.repository import RepositoryError, ServingOptions, parse_config, write_repository
from tests.conftest import metric, wait_for
from tests.triton_fixtures import attach_server_log, start_server


def step(client, sequence_id, tokens, *, start=False, end=False, dtype="INT64"):
    inp = grpcclient.InferInput(tensors.INPUT_IDS, [1, len(tokens)], dtype)
    inp.set_data_from_numpy(np.array([tokens], dtype=np.int64 if dtype == "INT64" else np.int32))
    result = client.infer(tensors.GPT_MODEL, [inp], sequence_id=sequence_id, sequence_start=start,
                          sequence_end=end)
    return result.as_numpy(tensors.LOGITS)[0]  # (V,)


def greedy_over_triton(client, sequence_id, prompt, n):
    out = []
    logits = step(client, sequence_id, prompt, start=True)
    for i in range(n):
        out.append(int(np.argmax(logits)))
        logits = step(client, sequence_id, [out[-1]], end=i == n - 1)
    return out


def test_server_ready_and_metadata(served):
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    assert client.is_server_ready()
    for model in (tensors.GPT_MODEL, tensors.GENERATE_MODEL, tensors.TOKENIZER_MODEL):
        assert client.is_model_ready(model)
    meta = client.get_model_metadata(tensors.GPT_MODEL, as_json=True)
    assert [i["name"] for i in meta["inputs"]] == [s.name for s in tensors.GPT_INPUTS]
    assert meta["inputs"][0]["datatype"] == "INT64"
    out = meta["outputs"][0]
    assert out["name"] == tensors.LOGITS and out["datatype"] == "FP32"
    assert out["shape"][-1] == str(served.model.config.vocab_size)
    config = client.get_model_config(tensors.GPT_MODEL).config
    assert config.sequence_batching.max_sequence_idle_microseconds > 0
    assert {c.name for c in config.sequence_batching.control_input} == {"START", "END", "CORRID"}
    gen = client.get_model_config(tensors.GENERATE_MODEL).config
    assert gen.model_transaction_policy.decoupled
    assert [i.name for i in gen.input] == [s.name for s in tensors.GENERATE_INPUTS]


def test_the_greedy_token_alone_or_with_the_logits(served):
    """output_ids is the argmax of the logits (the greedy next token): asked alone it spares the
    vocab_size floats; asked with nothing named, Triton returns every output."""
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    prompt = served.tokenizer.encode("The return statement")
    inp = grpcclient.InferInput(tensors.INPUT_IDS, [1, len(prompt)], "INT64")
    inp.set_data_from_numpy(np.array([prompt], dtype=np.int64))
    expected = generate_greedy(served.model, prompt, 1)[0]
    for i, outputs in enumerate(([tensors.OUTPUT_IDS], [tensors.LOGITS, tensors.OUTPUT_IDS], None)):
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(o) for o in outputs]
        result = client.infer(tensors.GPT_MODEL, [inp], outputs=requested, sequence_id=7000 + i,
                              sequence_start=True, sequence_end=True)
        names = {o.name for o in result.get_response().outputs}
        assert names == set(outputs or [tensors.LOGITS, tensors.OUTPUT_IDS])
        ids = result.as_numpy(tensors.OUTPUT_IDS)
        assert ids.shape == (1, 1) and ids.dtype == np.int64 and int(ids[0, 0]) == expected
        if tensors.LOGITS in names:
            assert int(np.argmax(result.as_numpy(tensors.LOGITS)[0])) == expected


def test_the_repository_flavours(tmp_path):
    """In-flight batching (default): a decoupled `gpt` with the wait budget as a parameter, and
    generation_config.json says so (the generate model and clients read it); off: plain."""
    for options, decoupled in ((ServingOptions(max_step_wait_microseconds=1234), True),
                               (ServingOptions(inflight_batching=False, prefix_cache=False,
                                               max_num_batched_tokens=0), False)):
        repo = write_repository(tmp_path / str(decoupled), engine_file=_engine_stub(tmp_path), tokenizer_json="{}",
                                model_config={"n_layer": 1, "n_head": 1, "n_embd": 4, "n_positions": 8,
                                              "vocab_size": 10, "eos_token_id": 0}, options=options)
        config = parse_config((repo / tensors.GPT_MODEL / "config.pbtxt").read_text())
        assert config.model_transaction_policy.decoupled == decoupled
        assert [o.name for o in config.output] == [tensors.LOGITS, tensors.OUTPUT_IDS]
        if decoupled:
            assert config.parameters["max_step_wait_microseconds"].string_value == "1234"
        assert config.parameters["intra_op_spinning"].string_value == "1"  # ORT's spinning workers, on by default
        # on by default: the prefix cache, and chunks of 64 prompt tokens
        assert config.parameters["prefix_cache"].string_value == ("1" if decoupled else "0")
        assert config.parameters["max_num_batched_tokens"].string_value == ("32" if decoupled else "0")
        generation_config = json.loads((repo / tensors.TOKENIZER_MODEL / "1" / "generation_config.json").read_text())
        assert generation_config["inflight_batching"] is decoupled
    with pytest.raises(RepositoryError, match="max_step_wait_microseconds must be >= 0"):
        ServingOptions(max_step_wait_microseconds=-1)
    with pytest.raises(RepositoryError, match="max_num_batched_tokens must be >= 0"):
        ServingOptions(max_num_batched_tokens=-1)


def _engine_stub(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a real graph: the repository layout does not read it")
    return path


def test_every_written_config_parses_with_triton_model_config(served):
    for model in (tensors.GPT_MODEL, tensors.GENERATE_MODEL, tensors.TOKENIZER_MODEL):
        config = parse_config((served.repository / model / "config.pbtxt").read_text())
        assert config.name == model and config.backend == "python"


def test_four_prompts_stepped_concurrently_match_pytorch_and_are_batched(served):
    prompts = [served.tokenizer.encode(p) for p in
               ("The return statement", "x", "A class definition defines a class object",
                "In the middle of a long and winding sentence about exceptions and")]
    n = 12
    expected = [generate_greedy(served.model, p, n) for p in prompts]
    calls_before = metric(served.server, "gptpipe_runtime_calls_total")
    batched_before = metric(served.server, "gptpipe_batched_rows_total")
    got: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(prompts))

    def run(i):
        client = grpcclient.InferenceServerClient(served.server.grpc_url)
        barrier.wait()
        got[i] = greedy_over_triton(client, 9000 + i, prompts[i], n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got[i] for i in range(len(prompts))] == expected
    steps = len(prompts) * (n + 1)
    calls = metric(served.server, "gptpipe_runtime_calls_total") - calls_before
    batched = metric(served.server, "gptpipe_batched_rows_total") - batched_before
    # batching: fewer engine calls than steps, and many rows ran in multi-row calls
    assert calls < steps and batched >= len(prompts) * n / 2, (calls, batched, steps)
    assert metric(served.server, "gptpipe_max_rows_per_call") >= 2


BAD_STEPS = [
    # (description, start, tokens, message)
    ("empty prompt", True, [], "input_ids is empty"),
    ("token out of range", True, [10**6], "input_ids must be in [0, 512)"),
    ("prompt past the context length", True, [1] * 129, "prompt too long: 129 tokens exceeds the context length n_positions=128"),
]


@pytest.mark.parametrize("what,start,tokens,message", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_bad_steps_get_clear_errors_and_the_server_keeps_serving(served, what, start, tokens, message):
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        step(client, 7100, tokens, start=start)
    assert message in e.value.message()
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert greedy_over_triton(client, 7101, [1, 2, 3], 2) == generate_greedy(served.model, [1, 2, 3], 2)


def test_step_without_start_and_unknown_sequence_are_refused(served):
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        step(client, 7200, [1])  # Triton itself: a sequence that never started
    # a sequence Triton knows but the engine does not (its slot was freed after a failed step)
    step(client, 7201, [1, 2], start=True)
    with pytest.raises(InferenceServerException, match="context length exceeded"):
        step(client, 7201, [1] * 127)
    with pytest.raises(InferenceServerException, match="unknown sequence id 7201: start it with the START flag"):
        step(client, 7201, [1], end=True)
    assert greedy_over_triton(client, 7202, [4, 5], 2) == generate_greedy(served.model, [4, 5], 2)


def test_wrong_dtype_is_refused_by_triton(served):
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    with pytest.raises(InferenceServerException, match="INT32.*INT64|INT64.*INT32|data-type"):
        step(client, 7300, [1, 2], start=True, dtype="INT32")
    assert greedy_over_triton(client, 7301, [1], 1) == generate_greedy(served.model, [1], 1)


@pytest.fixture(scope="module")
def small_pool(tiny_export, tmp_path_factory, request):
    """A private server with 2 slots and a 1.5 s idle timeout."""
    root = tmp_path_factory.mktemp("small_pool")
    model, tokenizer, onnx_path = tiny_export
    repo = write_repository(root / "repo", engine_file=onnx_path, tokenizer_json=tokenizer.to_str(),
                            model_config=model.config.to_dict(),
                            options=ServingOptions(max_sequences=2, max_sequence_idle_microseconds=1_500_000,
                                                   inflight_batching=False))
    server = start_server(repo)
    yield server
    server.stop()


def test_end_idle_timeout_and_full_pool(small_pool, request):
    attach_server_log(request, small_pool)
    client = grpcclient.InferenceServerClient(small_pool.grpc_url)
    active = lambda: metric(small_pool, "gptpipe_kv_active_sequences")  # noqa: E731
    step(client, 1, [1, 2], start=True)
    step(client, 2, [3], start=True)
    assert active() == 2 and metric(small_pool, "gptpipe_kv_free_slots") == 0
    with pytest.raises(InferenceServerException) as e:
        step(client, 3, [4], start=True)
    assert "server busy: 2 of 2 sequences active" in e.value.message()
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    step(client, 1, [5], end=True)  # END frees a slot ...
    assert active() == 1
    step(client, 4, [6], start=True)  # ... and the pool recovers
    assert active() == 2
    time.sleep(2.0)  # both sequences idle out
    step(client, 5, [7], start=True, end=True)  # the next request sweeps them
    assert wait_for(lambda: active() == 0)
    assert metric(small_pool, "gptpipe_idled_out_total") == 2
    with pytest.raises(InferenceServerException, match="START|unknown sequence"):
        step(client, 2, [8])  # an idled-out sequence is gone


def test_http_client_steps_too(served):
    client = httpclient.InferenceServerClient(served.server.http_url.removeprefix("http://"))
    inp = httpclient.InferInput(tensors.INPUT_IDS, [1, 3], "INT64")
    inp.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    out = client.infer(tensors.GPT_MODEL, [inp], sequence_id=7400, sequence_start=True, sequence_end=True)
    assert int(np.argmax(out.as_numpy(tensors.LOGITS)[0])) == generate_greedy(served.model, [1, 2, 3], 1)[0]
