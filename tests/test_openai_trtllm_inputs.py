"""The `generate` model takes the inputs Triton's own OpenAI frontend sends TensorRT-LLM models
(names and dtypes as that frontend sends them) and answers text_output + token counts.

One deviation: `max_tokens` is INT64 here, not TensorRT-LLM's INT32. Triton's HTTP generate
extension casts a JSON number to the declared type before the model sees it, and an INT32 input
wraps silently (`max_tokens: 4294967300` arrived as 4, issue 14); INT64 keeps the value, so the
model can refuse it. A client that sends INT32 gets Triton's datatype error naming the input."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = "The quick brown fox"


def _infer(served, values: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in values.items():
        dtype = "BYTES" if value.dtype == np.object_ else np_to_triton_dtype(value.dtype)
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    try:  # decoupled: responses come over a stream
        import queue

        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("generate", inputs, enable_empty_final_response=True)
        responses = []
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                raise error
            if result.get_response().parameters["triton_final_response"].bool_param and \
                    result.as_numpy("text_output") is None:
                break
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
        return responses
    finally:
        client.close()


def _trtllm_request(**overrides):
    values = {
        "text_input": np.array([PROMPT.encode()], dtype=np.object_),
        "stream": np.array([False]),
        "max_tokens": np.array([6], dtype=np.int64),
        "stop_words": np.array([b"zzzz-never"], dtype=np.object_),
        "temperature": np.array([0.0], dtype=np.float32),
        "top_p": np.array([1.0], dtype=np.float32),
        "seed": np.array([7], dtype=np.uint64),
        "frequency_penalty": np.array([0.0], dtype=np.float32),
        "presence_penalty": np.array([0.0], dtype=np.float32),
        "exclude_input_in_output": np.array([True]),
    }
    values.update(overrides)
    return values


def test_trtllm_names_and_dtypes_give_the_reference_text(served):
    expected_ids = served.reference(PROMPT, 6)
    expected = served.tokenizer.decode(expected_ids)
    (response,) = _infer(served, _trtllm_request())
    assert response.as_numpy("text_output")[0].decode() == expected
    assert response.as_numpy("num_input_tokens").tolist() == [len(served.tokenizer.encode(PROMPT))]
    assert response.as_numpy("num_output_tokens").tolist() == [6]


def test_trtllm_stream_and_include_input(served):
    expected = served.tokenizer.decode(served.reference(PROMPT, 6))
    responses = _infer(served, _trtllm_request(stream=np.array([True]), exclude_input_in_output=np.array([False])))
    texts = [r.as_numpy("text_output")[0].decode() for r in responses]
    assert "".join(texts) == PROMPT + expected and texts[0].startswith(PROMPT)
    assert [int(r.as_numpy("num_output_tokens")[0]) for r in responses] == list(range(1, 7))


def test_trtllm_penalty_is_checked_and_applied(served):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="presence_penalty must be in"):
        _infer(served, _trtllm_request(presence_penalty=np.array([3.0], dtype=np.float32)))
    plain = _infer(served, _trtllm_request(max_tokens=np.array([12], dtype=np.int64)))[0]
    penalised = _infer(served, _trtllm_request(max_tokens=np.array([12], dtype=np.int64),
                                               frequency_penalty=np.array([2.0], dtype=np.float32)))[0]
    ids = penalised.as_numpy("output_ids").tolist()
    assert plain.as_numpy("output_ids").tolist() != ids  # greedy on a tiny model repeats; 2.0 breaks it
