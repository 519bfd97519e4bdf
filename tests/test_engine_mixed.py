"""Mixed calls (issue 15): decode rows and a prompt chunk of another sequence in ONE engine call
(`OrtRuntime.step_mixed`, the static graph's two attention groups over the same pool), on the real
tiny static-cache export against PyTorch: every row's logits, the KV written in place (the same as
a fresh prefill's, the pool's buffers never moved), and the scheduler's greedy tokens for
concurrent generations equal to each one's alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.model import generate_greedy
from serving.engine.runtime import OrtRuntime
from serving.engine.scheduler import Scheduler, StepRequest

TOL = 1e-4


@pytest.fixture(scope="module")
def runtime(tiny_export) -> OrtRuntime:
    return OrtRuntime(tiny_export[2], intra_op_threads=1)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, n).tolist()


@torch.no_grad()
def reference(model, ids: list[int]):
    """PyTorch's last logits (V,) and presents of `ids` from an empty past."""
    logits, presents = model(torch.tensor([ids]), last_only=True)
    return logits[0].numpy(), presents


def assert_kv(pool, slot: int, presents, n: int) -> None:
    for layer, (k, v) in enumerate(presents):
        np.testing.assert_allclose(pool.keys[layer][slot, :, :n], k[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(pool.values[layer][slot, :, :n], v[0].numpy(), atol=1e-5, rtol=0)


def test_a_mixed_call_gives_every_row_pytorchs_logits_and_writes_the_kv_in_place(tiny_export, runtime) -> None:
    """Slots 0, 1, 3 decode at past lengths 5, 17, 9; slot 2 prefills a 40-token prompt in chunks
    of 16, 16, 8, each chunk in the same call as a decode step of the others. Slot 2 lies inside
    the decode rows' range, so it rides along as a dummy row (written beyond its chunk)."""
    model = tiny_export[0]
    pool = runtime.new_pool(max_sequences=4, max_length=runtime.n_positions)
    pointers = [a.ctypes.data for a in pool.keys + pool.values]
    histories = {0: tokens(1, 5), 1: tokens(2, 17), 3: tokens(3, 9)}
    for slot, ids in histories.items():
        runtime.step(np.array([ids]), pool=pool, slot_start=slot, past_lengths=[0])
        pool.lengths[slot] = len(ids)
    prompt = tokens(4, 40)
    done = 0
    for size in (16, 16, 8):
        new = {slot: int(np.random.default_rng(slot + done).integers(1, 512)) for slot in histories}
        ids = np.array([[new.get(s, 0)] for s in range(4)])
        past = [int(pool.lengths[s]) if s in histories else done + size for s in range(4)]
        logits = runtime.step_mixed(ids, pool=pool, slot_start=0, past_lengths=past,
                                    chunk_ids=np.array(prompt[done:done + size]), chunk_slot=2,
                                    chunk_past=done).copy()
        assert logits.shape == (5, runtime.vocab_size)
        done += size
        for slot in histories:
            histories[slot].append(new[slot])
            pool.lengths[slot] += 1
            want, presents = reference(model, histories[slot])
            np.testing.assert_allclose(logits[slot], want, atol=TOL, rtol=0)
            assert_kv(pool, slot, presents, len(histories[slot]))
        want, presents = reference(model, prompt[:done])
        np.testing.assert_allclose(logits[4], want, atol=TOL, rtol=0)  # the chunk's last token
        assert_kv(pool, 2, presents, done)
    # the chunked KV equals a fresh prefill's of the whole prompt, in another pool
    fresh = runtime.new_pool(max_sequences=1, max_length=runtime.n_positions)
    runtime.step(np.array([prompt]), pool=fresh, slot_start=0, past_lengths=[0])
    for layer in range(runtime.n_layer):
        np.testing.assert_allclose(pool.keys[layer][2, :, :40], fresh.keys[layer][0, :, :40], atol=1e-5, rtol=0)
        np.testing.assert_allclose(pool.values[layer][2, :, :40], fresh.values[layer][0, :, :40], atol=1e-5, rtol=0)
    assert [a.ctypes.data for a in pool.keys + pool.values] == pointers, "no step reallocates the cache"


def test_a_call_without_a_chunk_leaves_the_pool_beyond_its_rows_alone(runtime) -> None:
    """`step` runs the chunk group's dummy token into the runtime's scratch row, not the pool."""
    pool = runtime.new_pool(max_sequences=3, max_length=32)
    runtime.step(np.array([[1], [2]]), pool=pool, slot_start=1, past_lengths=[0, 4])
    assert not pool.keys[0][0].any() and pool.keys[0][1, :, 0].any() and pool.keys[0][2, :, 4].any()
    assert not pool.keys[0][1, :, 1:].any() and not pool.keys[0][2, :, :4].any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(past_lengths=[3, 5], chunk_slot=1, chunk_past=2), r"rides along among the rows: its row must write "
                                                            r"beyond the chunk \(past_lengths >= 6\), got 5"),
    (dict(past_lengths=[3, 0], chunk_slot=2, chunk_past=13), r"chunk_past \+ chunk tokens must be in \[4, 16\]"),
    (dict(past_lengths=[3, 0], chunk_slot=3, chunk_past=0), r"chunk_slot must lie in \[0, 3\), got 3"),
])
def test_step_mixed_rejects_bad_calls(runtime, kwargs, message) -> None:
    pool = runtime.new_pool(max_sequences=3, max_length=16)
    with pytest.raises(ValueError, match=message):
        runtime.step_mixed(np.array([[1], [2]]), pool=pool, slot_start=0, chunk_ids=np.array([1, 2, 3, 4]), **kwargs)


def test_concurrent_generations_with_mixed_calls_give_the_tokens_of_each_alone(tiny_export, runtime) -> None:
    """Greedy, through the scheduler (chunks of 16): prompts arrive while others decode, so their
    chunks ride in mixed calls; every generation's tokens equal PyTorch's for it alone."""
    model = tiny_export[0]
    pool = runtime.new_pool(max_sequences=4, max_length=runtime.n_positions)
    s = Scheduler(runtime, pool, vocab_size=runtime.vocab_size, max_num_batched_tokens=16)
    prompts = {1: tokens(11, 7), 2: tokens(12, 45), 3: tokens(13, 30), 4: tokens(14, 3)}
    arrive = {1: 0, 2: 2, 3: 3, 4: 9}  # the iteration each prompt arrives in
    steps = 12
    out: dict[int, list[int]] = {sid: [] for sid in prompts}
    waiting: set[int] = set()  # prompts sent, not answered yet
    for it in range(60):
        requests = [StepRequest(sid, np.array(p), start=True) for sid, p in prompts.items() if arrive[sid] == it]
        waiting |= {r.sequence_id for r in requests}
        requests += [StepRequest(sid, np.array(o[-1:]), end=len(o) == steps) for sid, o in out.items()
                     if o and sid not in waiting and len(o) < steps + 1 and sid in s.sequence_ids()]
        for sid, result in s.advance(requests, [r.sequence_id for r in requests]):
            assert result.error is None, result.error
            waiting.discard(sid)
            if len(out[sid]) <= steps:
                out[sid].append(int(result.logits.argmax()))
        if all(len(o) == steps + 1 for o in out.values()):
            break
    for sid, prompt in prompts.items():
        assert out[sid] == generate_greedy(model, prompt, steps + 1), sid
    assert s.stats.mixed_calls >= 5 and s.stats.prefill_chunks >= 4
    assert pool.active == ()


def test_with_nobody_decoding_the_oldest_prompt_runs_whole_and_beside_a_decoding_stream_in_chunks(tiny_export, runtime) -> None:
    """Chunks (here 16 tokens) protect decoding streams' inter-token latency. Two 60-token prompts
    reach an idle engine together: the first runs whole in the first iteration (one call, its TTFT
    is one prefill); the second then shares the engine with a decoding sequence and goes in chunks
    of 16 (4 iterations), even in iterations where that sequence sent no step. Both get PyTorch's
    logits."""
    model = tiny_export[0]
    pool = runtime.new_pool(max_sequences=3, max_length=runtime.n_positions)
    s = Scheduler(runtime, pool, vocab_size=runtime.vocab_size, max_num_batched_tokens=16)
    first, second = tokens(21, 60), tokens(22, 60)
    done = s.advance([StepRequest(1, np.array(first), start=True), StepRequest(2, np.array(second), start=True)], [1, 2])
    assert [tag for tag, _ in done] == [1] and s.stats.runtime_calls == 1 and s.stats.prefill_chunks == 0
    np.testing.assert_allclose(done[0][1].logits, reference(model, first)[0], atol=TOL, rtol=0)
    iterations = 1
    while not done or done[0][0] != 2:
        done = s.advance([], [])
        iterations += 1
        assert iterations <= 10
    assert iterations == 5 and s.stats.prefill_chunks == 3  # 16 + 16 + 16 + 12, one chunk per iteration
    np.testing.assert_allclose(done[0][1].logits, reference(model, second)[0], atol=TOL, rtol=0)
    assert s.release(1) and s.release(2)
    calls = s.stats.runtime_calls
    done = s.advance([StepRequest(3, np.array(second[:50]), start=True)], [3])  # an idle engine again
    assert [tag for tag, _ in done] == [3] and s.stats.runtime_calls == calls + 1
    np.testing.assert_allclose(done[0][1].logits, reference(model, second[:50])[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_a_mixed_call_through_the_optimised_graphs_stays_within_their_tolerance(tiny_export, precision, tmp_path) -> None:
    """fp16, int8 and int4 go through the same two-group graph (the optimise passes apply to it):
    a mixed call's rows and chunk against PyTorch, within the precision's validation limit."""
    from export.onnx import export_onnx
    from export.onnx.validate import TOLERANCES

    model = tiny_export[0]
    rt = OrtRuntime(export_onnx(model, tmp_path / "gpt.onnx", precision=precision, validate=False).path,
                    intra_op_threads=1)
    pool = rt.new_pool(max_sequences=3, max_length=rt.n_positions)
    rows, prompt = [tokens(21, 6), tokens(22, 11)], tokens(23, 30)
    for slot, ids in enumerate(rows):
        rt.step(np.array([ids[:-1]]), pool=pool, slot_start=slot, past_lengths=[0])
    rt.step(np.array([prompt[:12]]), pool=pool, slot_start=2, past_lengths=[0])
    got = rt.step_mixed(np.array([[ids[-1]] for ids in rows]), pool=pool, slot_start=0,
                        past_lengths=[len(ids) - 1 for ids in rows], chunk_ids=np.array(prompt[12:]), chunk_slot=2,
                        chunk_past=12).astype(np.float64)
    want = np.stack([reference(model, ids)[0] for ids in rows + [prompt]]).astype(np.float64)
    rel = np.sqrt(((got - want) ** 2).mean(axis=1) / want.var(axis=1))
    assert rel.max() <= TOLERANCES[precision].max_rel_logits, rel
