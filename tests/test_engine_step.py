"""serving/engine/step.py, the server's per-step hot path, without a server: the config a real
repository writes (parsed with Triton's schema, as Triton hands it to the model), one engine
call's steps through the real ONNX Runtime engine against PyTorch, the metrics it keeps, and the
in-flight loop over a StepQueue. (On a real tritonserver: tests/test_serving.py, test_inflight.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from serving.engine.scheduler import StepQueue, StepRequest
from serving.engine.step import EngineConfig, StepEngine, is_busy, parse_step
from serving.repository import ServingOptions, parse_config, write_repository
from tests.conftest import wait_for

TOL = 1e-4


class Recorded:
    """A metric sink: what the engine last set, or added up."""

    def __init__(self, kind: str) -> None:
        self.kind, self.value, self.calls = kind, 0.0, 0

    def set(self, value: float) -> None:
        assert self.kind == "gauge"
        self.value = value
        self.calls += 1

    def increment(self, value: float) -> None:
        assert self.kind == "counter" and value > 0
        self.value += value


@pytest.fixture(scope="module")
def repository(tiny_export, tmp_path_factory) -> Path:
    model, _, onnx_path = tiny_export
    return write_repository(tmp_path_factory.mktemp("step") / "repo", engine_file=onnx_path, tokenizer_json="{}",
                            model_config=model.config.to_dict(),
                            options=ServingOptions(max_sequences=3, max_step_wait_microseconds=1234,
                                                   max_sequence_idle_microseconds=2_500_000))


def triton_model_config(repository: Path) -> dict:
    """The gpt model's config.pbtxt as the JSON Triton passes to initialize()."""
    config = parse_config((repository / "gpt" / "config.pbtxt").read_text())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def engine_for(repository: Path, answer=None) -> tuple[StepEngine, dict[str, Recorded]]:
    metrics: dict[str, Recorded] = {}

    def make_metric(kind: str, name: str, doc: str) -> Recorded:
        assert doc and name not in metrics
        metrics[name] = Recorded(kind)
        return metrics[name]

    config = EngineConfig.from_triton(triton_model_config(repository), repository / "gpt" / "1")
    answer = answer or (lambda request, logits, error: (request, logits, error))
    return StepEngine(config, answer=answer, make_metric=make_metric), metrics


@torch.no_grad()
def last_logits(model, tokens: list[int]) -> np.ndarray:
    logits, _ = model(torch.tensor([tokens]), last_only=True)
    return logits[0].numpy()


def test_the_engine_config_is_what_the_repository_wrote(tiny_export, repository) -> None:
    model, _, onnx_path = tiny_export
    config = EngineConfig.from_triton(triton_model_config(repository), repository / "gpt" / "1")
    assert config.engine_path == repository / "gpt" / "1" / onnx_path.name and config.engine_path.is_file()
    assert config.model_config == json.loads(json.dumps(model.config.to_dict()))
    assert config.max_sequences == 3 and config.intra_op_threads is None and config.spinning is True
    assert config.idle_timeout_s == 2.5 and config.max_step_wait_s == pytest.approx(1234e-6)
    assert config.prefix_cache is True and config.max_num_batched_tokens == 32  # the defaults


def test_the_served_engine_spins_only_inside_a_step(repository) -> None:
    """ORT's workers spin during a step and stop when it returns (session.force_spinning_stop):
    between steps the cores are Triton's and the clients'."""
    engine, _ = engine_for(repository)
    options = engine.runtime.session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(Exception):  # spinning is on: ORT's default leaves allow_spinning unset
        options.get_session_config_entry("session.intra_op.allow_spinning")


def test_parse_step_takes_one_sequence_per_request() -> None:
    step = parse_step(np.array([[5, 6, 7]], dtype=np.int32), sequence_id=np.uint64(9), start=np.int32(1),
                      end=np.int32(0))
    assert isinstance(step, StepRequest) and (step.sequence_id, step.start, step.end) == (9, True, False)
    assert step.tokens.dtype == np.int64 and step.tokens.tolist() == [5, 6, 7]
    assert parse_step(np.zeros((2, 3), np.int64), sequence_id=1, start=True, end=False) == (
        "input_ids must have shape [1, tokens] (one sequence per request), got [2, 3]")
    assert is_busy("server busy: 3 of 3 sequences active") and not is_busy("prompt too long: ...")


def test_one_engine_call_answers_every_request_in_order_and_counts(tiny_export, repository) -> None:
    model = tiny_export[0]
    engine, m = engine_for(repository)
    assert m["gptpipe_kv_free_slots"].value == 3 and m["gptpipe_runtime_calls_total"].value == 0
    prompts = {1: [1, 2, 3, 4], 2: [7, 8]}
    steps = [StepRequest(1, np.array(prompts[1]), start=True), "input_ids must have shape [1, tokens]",
             StepRequest(2, np.array(prompts[2]), start=True)]
    responses = engine.run(["r1", "bad", "r2"], steps)
    assert [r[0] for r in responses] == ["r1", "bad", "r2"]
    assert responses[1] == ("bad", None, "input_ids must have shape [1, tokens]")
    for (_, logits, error), sid in ((responses[0], 1), (responses[2], 2)):
        assert error is None
        np.testing.assert_allclose(logits, last_logits(model, prompts[sid]), atol=TOL, rtol=0)
    assert m["gptpipe_runtime_calls_total"].value == 2  # two prompts: one call each
    assert m["gptpipe_kv_active_sequences"].value == 2 and m["gptpipe_kv_free_slots"].value == 1

    tokens = {sid: int(last_logits(model, p).argmax()) for sid, p in prompts.items()}
    responses = engine.run(["d1", "d2"], [StepRequest(sid, np.array([t])) for sid, t in tokens.items()])
    for (_, logits, error), sid in zip(responses, prompts):
        assert error is None
        np.testing.assert_allclose(logits, last_logits(model, prompts[sid] + [tokens[sid]]), atol=TOL, rtol=0)
    assert m["gptpipe_runtime_calls_total"].value == 3  # both decode steps in ONE call
    assert m["gptpipe_batched_rows_total"].value == 2 and m["gptpipe_max_rows_per_call"].value == 2
    assert m["gptpipe_step_requests_total"].value == 5

    starts = [StepRequest(sid, np.array([1]), start=True) for sid in (3, 4)]
    _, (_, _, busy) = engine.run(["s3", "s4"], starts)
    assert busy.startswith("server busy: 3 of 3") and is_busy(busy)
    assert m["gptpipe_busy_rejections_total"].value == 1 and m["gptpipe_kv_free_slots"].value == 0
    engine.run(["e1", "e2", "e3"], [StepRequest(sid, np.array([1]), end=True) for sid in (1, 2, 3)])
    assert m["gptpipe_kv_active_sequences"].value == 0 and m["gptpipe_kv_free_slots"].value == 3


def test_steady_decoding_sets_no_gauge_that_did_not_change(tiny_export, repository) -> None:
    """Each metric update is an IPC round trip from the stub to tritonserver: the per-call update
    sets a gauge only when its value moved (10 decode calls of one sequence: no gauge set again)."""
    model = tiny_export[0]
    engine, m = engine_for(repository)
    prompt = [3, 1, 4, 1, 5]
    (_, logits, error), = engine.run(["p"], [StepRequest(7, np.array(prompt), start=True)])
    assert error is None
    gauges = {name: r for name, r in m.items() if r.kind == "gauge"}
    before = {name: r.calls for name, r in gauges.items()}
    tokens = list(prompt)
    for _ in range(10):
        tokens.append(int(logits.argmax()))
        (_, logits, error), = engine.run(["d"], [StepRequest(7, np.array(tokens[-1:]))])
        assert error is None
    np.testing.assert_allclose(logits, last_logits(model, tokens), atol=TOL, rtol=0)
    assert {name: r.calls for name, r in gauges.items()} == before
    assert m["gptpipe_kv_active_sequences"].value == 1 and m["gptpipe_runtime_calls_total"].value == 11
    engine.run(["e"], [StepRequest(7, np.array([1]), end=True)])
    assert m["gptpipe_kv_active_sequences"].value == 0 and gauges["gptpipe_kv_active_sequences"].calls > before[
        "gptpipe_kv_active_sequences"]


def test_the_inflight_loop_sends_every_response_and_survives_failures(repository) -> None:
    def answer(request, logits, error):
        if request == "explode":
            raise RuntimeError("boom")
        return (request, error)

    engine, _ = engine_for(repository, answer=answer)
    queue = StepQueue(wait_s=0.0)
    sent: dict[str, list] = {}

    def send(sender, response, final):
        assert final  # no step asked for a lease
        if sender == "gone":
            raise ConnectionError("the client went away")
        sent.setdefault(sender, []).append(response)

    def failed(request, error):
        return (request, f"gpt step failed: {error}")

    # one batch, queued before the loop starts: answering it raises, and one sender is gone
    queue.put(6, ("explode", StepRequest(6, np.array([3]), start=True), "sender x", False))
    queue.put(None, ("b", "input_ids must have shape [1, tokens]", "gone", False))
    thread = threading.Thread(target=engine.serve, args=(queue,), kwargs=dict(send=send, failed=failed))
    thread.start()
    try:
        assert wait_for(lambda: "sender x" in sent)
        assert sent == {"sender x": [("explode", "gpt step failed: boom")]}  # every request told; "gone" logged
        queue.put(5, ("a", StepRequest(5, np.array([1, 2]), start=True), "sender a", False))  # the loop keeps serving
        assert wait_for(lambda: "sender a" in sent)
        assert sent["sender a"] == [("a", None)]
    finally:
        queue.close()
        thread.join(timeout=30)
    assert not thread.is_alive(), "serve() returns once the queue is closed"


def test_the_inflight_loop_answers_decode_steps_between_the_chunks_of_a_long_prompt(tiny_export, tmp_path) -> None:
    """max_num_batched_tokens=16: a 60-token prompt takes 4 iterations; a decoding stream is
    answered in each of them, the prompt after its last chunk, with PyTorch's logits. The second
    prompt with the same start reuses its blocks (the prefix cache's metrics count it)."""
    model, _, onnx_path = tiny_export
    repository = write_repository(tmp_path / "repo", engine_file=onnx_path, tokenizer_json="{}",
                                  model_config=model.config.to_dict(),
                                  options=ServingOptions(max_sequences=3, max_num_batched_tokens=16,
                                                         max_step_wait_microseconds=1_000_000))
    engine, m = engine_for(repository)
    queue = StepQueue(wait_s=1.0)  # each iteration waits for the decoding stream: one step per chunk
    sent: list = []
    long = np.random.default_rng(0).integers(1, 500, 60).tolist()
    history = [5, 6, 7]
    queue.put(1, ("p1", StepRequest(1, np.array(history), start=True), "s1", False))
    thread = threading.Thread(target=engine.serve, args=(queue,),
                              kwargs=dict(send=lambda sender, r, final: sent.append(r), failed=lambda r, e: (r, None, e)))
    thread.start()
    try:
        assert wait_for(lambda: len(sent) == 1)
        history.append(int(sent[0][1].argmax()))
        queue.put(2, ("long", StepRequest(2, np.array(long), start=True), "s2", False))
        decoded = 0
        # (the engine waits for sequence 1, answered last, to send its step)
        while not any(r[0] == "long" for r in sent):
            queue.put(1, ("d1", StepRequest(1, np.array(history[-1:])), "s1", False))
            assert wait_for(lambda: sum(r[0] == "d1" for r in sent) > decoded)
            decoded += 1
            (_, logits, error) = [r for r in sent if r[0] == "d1"][-1]
            assert error is None
            np.testing.assert_allclose(logits, last_logits(model, history), atol=TOL, rtol=0)
            history.append(int(logits.argmax()))
        assert decoded == 4  # the stream stepped with each chunk: 16 + 16 + 16 + 12 tokens
        (_, logits, error) = next(r for r in sent if r[0] == "long")
        np.testing.assert_allclose(logits, last_logits(model, long), atol=TOL, rtol=0)
        assert m["gptpipe_prefill_chunks_total"].value == 3
        queue.put(3, ("again", StepRequest(3, np.array(long[:40] + [9]), start=True), "s3", False))
        assert wait_for(lambda: any(r[0] == "again" for r in sent))
        (_, logits, error) = next(r for r in sent if r[0] == "again")
        np.testing.assert_allclose(logits, last_logits(model, long[:40] + [9]), atol=TOL, rtol=0)
        assert m["gptpipe_prefix_cache_queries_total"].value == 3 and m["gptpipe_prefix_cache_hits_total"].value == 1
        assert m["gptpipe_prefix_cache_hit_tokens_total"].value == 32  # two blocks of 16
    finally:
        queue.close()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_lease_is_held_until_the_next_step_and_a_cancelled_one_frees_the_slot(repository) -> None:
    from serving.engine.leases import Leases

    class Sender:
        def __init__(self, name):
            self.name, self.cancelled, self.completed = name, False, False

    engine, _ = engine_for(repository, answer=lambda request, logits, error: (request, error))
    clock = [0.0]
    engine.leases = Leases(complete=lambda s: setattr(s, "completed", True), cancelled=lambda s: s.cancelled,
                           hold_s=5.0, clock=lambda: clock[0])
    queue = StepQueue(wait_s=0.0)
    finals: list = []
    thread = threading.Thread(target=engine.serve, args=(queue,),
                              kwargs=dict(send=lambda sender, response, final: finals.append((sender.name, final)),
                                          failed=lambda request, error: (request, str(error))))
    thread.start()
    try:
        first, second = Sender("start"), Sender("step")
        queue.put(7, ("a", StepRequest(7, np.array([1, 2]), start=True), first, True))
        assert wait_for(lambda: len(finals) == 1) and finals[0] == ("start", False) and not first.completed
        queue.put(7, ("b", StepRequest(7, np.array([3])), second, True))
        assert wait_for(lambda: len(finals) == 2) and first.completed and not second.completed
        assert engine.scheduler.active == 1
        second.cancelled = True  # the client's stream died
        with engine.lock:
            assert engine.leases.sweep(engine.scheduler) == [7]
        assert engine.scheduler.active == 0 and second.completed and len(engine.leases) == 0
        # a lease held past hold_s is ended (shutdown waits for open requests), the slot kept
        third = Sender("other")
        queue.put(8, ("c", StepRequest(8, np.array([1]), start=True), third, True))
        assert wait_for(lambda: len(finals) == 3)
        clock[0] += 6.0
        with engine.lock:
            assert engine.leases.sweep(engine.scheduler) == []
        assert third.completed and engine.scheduler.active == 1
    finally:
        queue.close()
        thread.join(timeout=30)
