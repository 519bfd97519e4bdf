"""serving/engine/prefix_cache.py and the scheduler's chunked prefill, on the real ONNX Runtime
engine (the tiny static-cache export) against PyTorch: a cached prefix gives the logits of a
fresh prefill, greedy tokens are the same with the cache on and off, cached slots are evicted
(least recently used first) rather than making a START busy, and a long prompt is prefilled in
chunks while other sequences keep decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.engine.prefix_cache import PrefixCache
from serving.engine.runtime import OrtRuntime
from serving.engine.scheduler import Scheduler, StepRequest

TOL = 1e-4
BLOCK = 8


class Calls:
    """The real runtime, recording the (rows, tokens, slot_start, past lengths) of each call, and
    for a mixed call also (chunk tokens, chunk slot, chunk past)."""

    def __init__(self, runtime: OrtRuntime) -> None:
        self.runtime, self.calls = runtime, []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def step(self, input_ids, *, pool, slot_start, past_lengths, out=None):
        self.calls.append((*input_ids.shape, slot_start, list(np.asarray(past_lengths))))
        return self.runtime.step(input_ids, pool=pool, slot_start=slot_start, past_lengths=past_lengths, out=out)

    def step_mixed(self, input_ids, *, pool, slot_start, past_lengths, chunk_ids, chunk_slot, chunk_past):
        self.calls.append((*input_ids.shape, slot_start, list(np.asarray(past_lengths)),
                           (len(chunk_ids), chunk_slot, chunk_past)))
        return self.runtime.step_mixed(input_ids, pool=pool, slot_start=slot_start, past_lengths=past_lengths,
                                       chunk_ids=chunk_ids, chunk_slot=chunk_slot, chunk_past=chunk_past)


@pytest.fixture(scope="module")
def runtime(tiny_export) -> OrtRuntime:
    return OrtRuntime(tiny_export[2], intra_op_threads=1)


def scheduler_for(runtime: OrtRuntime, *, slots: int = 3, cache: bool = True, budget: int = 0) -> Scheduler:
    pool = runtime.new_pool(max_sequences=slots, max_length=runtime.n_positions)
    return Scheduler(Calls(runtime), pool, vocab_size=runtime.vocab_size, max_num_batched_tokens=budget,
                     prefix_cache=PrefixCache(pool, block_size=BLOCK) if cache else None)


@torch.no_grad()
def reference(model, tokens: list[int]) -> np.ndarray:
    logits, _ = model(torch.tensor([tokens]), last_only=True)
    return logits[0].numpy()


def prompt(seed: int, n: int, vocab: int = 512) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, n).tolist()


def generate(scheduler: Scheduler, sid: int, tokens: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy: the prompt, then `steps` decode steps, then END; the tokens and every logits."""
    (r,) = scheduler.step([StepRequest(sid, np.array(tokens), start=True)])
    assert r.error is None, r.error
    out, logits = [], [r.logits]
    for i in range(steps):
        out.append(int(logits[-1].argmax()))
        (r,) = scheduler.step([StepRequest(sid, np.array(out[-1:]), end=i == steps - 1)])
        assert r.error is None, r.error
        logits.append(r.logits)
    return out, logits


def test_a_cached_prefix_gives_the_logits_of_a_fresh_prefill(tiny_export, runtime) -> None:
    model = tiny_export[0]
    system = prompt(1, 3 * BLOCK + 5)  # 3 whole blocks and a bit
    s = scheduler_for(runtime)
    cache = s.prefix_cache
    first, _ = generate(s, 1, system + [7, 8], 4)
    assert cache.stats.hits == 0 and cache.cached_slots == (0,)  # the finished slot keeps its blocks

    s.runtime.calls.clear()
    user = system + [9, 10, 11]
    (r,) = s.step([StepRequest(2, np.array(user), start=True)])
    np.testing.assert_allclose(r.logits, reference(model, user), atol=TOL, rtol=0)
    # 3 blocks (24 tokens) copied into a free slot; only the other 6 prompt tokens computed
    assert s.runtime.calls == [(1, len(user) - 3 * BLOCK, 1, [3 * BLOCK])]
    assert (cache.stats.hits, cache.stats.hit_tokens) == (1, 3 * BLOCK)
    assert cache.cached_slots == (0,)  # the source slot stays cached
    tokens = [int(r.logits.argmax())]
    for _ in range(3):  # and decoding after it follows PyTorch
        (r,) = s.step([StepRequest(2, np.array(tokens[-1:]))])
        np.testing.assert_allclose(r.logits, reference(model, user + tokens), atol=TOL, rtol=0)
        tokens.append(int(r.logits.argmax()))

    # a prompt that is exactly the cached tokens still computes its last token (its logits)
    s.runtime.calls.clear()
    exact = system[:2 * BLOCK + 1]
    (r,) = s.step([StepRequest(3, np.array(exact), start=True)])
    np.testing.assert_allclose(r.logits, reference(model, exact), atol=TOL, rtol=0)
    assert s.runtime.calls[-1][1] == 1 and cache.stats.hit_tokens == 5 * BLOCK


def test_greedy_tokens_are_the_same_with_the_cache_on_and_off(runtime) -> None:
    system = prompt(2, 40)
    runs = {}
    for cache in (True, False):
        s = scheduler_for(runtime, cache=cache)
        runs[cache] = [generate(s, sid, system + prompt(10 + sid, 3), 12)[0] for sid in range(4)]
        if cache:
            assert s.prefix_cache.stats.hits == 3 and s.prefix_cache.stats.hit_tokens == 3 * 40 // BLOCK * BLOCK
    assert runs[True] == runs[False]


def test_cached_slots_are_evicted_least_recently_used_first_and_never_make_a_start_busy(tiny_export, runtime) -> None:
    model = tiny_export[0]
    s = scheduler_for(runtime, slots=2)
    cache = s.prefix_cache
    a, b, c = prompt(3, 20), prompt(4, 20), prompt(5, 20)
    generate(s, 1, a, 1)
    generate(s, 2, b, 1)
    assert cache.cached_slots == (0, 1) and s.free_slots == 2  # both cached, both free for a START
    s.step([StepRequest(3, np.array(a + [1]), start=True)])  # a's blocks: a hit, and a's slot is used again
    assert cache.stats.hits == 1 and cache.cached_slots == (1,)  # taken over: no free slot was left
    (r,) = s.step([StepRequest(4, np.array(c), start=True)])  # b's slot is evicted, not busy
    assert r.error is None and cache.cached_slots == () and cache.stats.evictions == 1
    (r,) = s.step([StepRequest(5, np.array(c), start=True)])  # now every slot runs a sequence
    assert r.error.startswith("server busy: 2 of 2") and cache.stats.queries == 4  # a refused START: no query
    s.step([StepRequest(3, np.array([1]), end=True)])
    (r,) = s.step([StepRequest(6, np.array(b + [2]), start=True)])  # b was evicted: computed afresh
    np.testing.assert_allclose(r.logits, reference(model, b + [2]), atol=TOL, rtol=0)
    assert cache.stats.hits == 1 and s.runtime.calls[-1][:2] == (1, len(b) + 1)
    assert cache.stats.evictions == 2  # a's slot (ended again) made room


def test_a_running_sequence_shares_its_prompt_and_a_failed_one_does_not(tiny_export, runtime) -> None:
    model = tiny_export[0]
    s = scheduler_for(runtime)
    system = prompt(6, 2 * BLOCK)
    s.step([StepRequest(1, np.array(system + [3]), start=True)])  # running: its prompt blocks are indexed
    (r,) = s.step([StepRequest(2, np.array(system + [4, 5]), start=True)])
    np.testing.assert_allclose(r.logits, reference(model, system + [4, 5]), atol=TOL, rtol=0)
    assert s.prefix_cache.stats.hit_tokens == 2 * BLOCK
    (r,) = s.step([StepRequest(1, np.array([model.config.vocab_size]))])  # out of range: sequence 1 fails
    assert r.error is not None
    s.step([StepRequest(2, np.array([1]), end=True)])  # sequence 2 ends: its copy stays cached
    assert s.prefix_cache.cached_slots == (1,)


def test_only_positions_a_dummy_row_cannot_overwrite_are_cached(runtime) -> None:
    s = scheduler_for(runtime, slots=2)
    full = prompt(7, runtime.n_positions)
    s.step([StepRequest(1, np.array(full), start=True, end=True)])
    hashes = s.prefix_cache._hashes[0]
    assert len(hashes) == (runtime.n_positions - 1) // BLOCK  # the last block holds the last position


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(tiny_export, runtime) -> None:
    model = tiny_export[0]
    s = scheduler_for(runtime, cache=False, budget=16)
    short = prompt(8, 5)
    (r,) = s.step([StepRequest(1, np.array(short), start=True)])
    history = short + [int(r.logits.argmax())]
    long = prompt(9, 50)
    s.runtime.calls.clear()
    done = s.advance([StepRequest(2, np.array(long), start=True), StepRequest(1, np.array(history[-1:]))],
                     ["long", "decode"])
    assert [tag for tag, _ in done] == ["decode"] and s.prefilling == 1  # the prompt has chunks left
    assert s.runtime.calls == [(1, 1, 0, [5], (16, 1, 0))]  # ONE call: the decode step and a 16-token chunk
    steps = 0
    while s.prefilling:
        np.testing.assert_allclose(done[0][1].logits, reference(model, history), atol=TOL, rtol=0)
        history.append(int(done[0][1].logits.argmax()))
        done = s.advance([StepRequest(1, np.array(history[-1:]))], ["decode"])
        steps += 1
        if s.prefilling:
            assert [tag for tag, _ in done] == ["decode"]
    assert steps == 3 and [tag for tag, _ in done] == ["decode", "long"]  # 16 + 16 + 16 + 2
    assert s.runtime.calls[-1] == (1, 1, 0, [len(short) + 3], (2, 1, 48)) and s.stats.prefill_chunks == 3
    assert s.stats.mixed_calls == 4 and s.stats.runtime_calls == 1 + 4
    np.testing.assert_allclose(done[1][1].logits, reference(model, long), atol=TOL, rtol=0)
    # step() (the plain model) runs every chunk before it answers
    (r,) = s.step([StepRequest(3, np.array(long[:40]), start=True)])
    np.testing.assert_allclose(r.logits, reference(model, long[:40]), atol=TOL, rtol=0)


def test_chunks_after_a_cached_prefix_and_a_restart_while_prefilling(tiny_export, runtime) -> None:
    model = tiny_export[0]
    s = scheduler_for(runtime, budget=BLOCK)
    system = prompt(10, 4 * BLOCK)
    generate(s, 1, system, 1)
    user = system + prompt(11, 20)
    (r,) = s.step([StepRequest(2, np.array(user), start=True)])
    np.testing.assert_allclose(r.logits, reference(model, user), atol=TOL, rtol=0)
    assert s.prefix_cache.stats.hit_tokens == 4 * BLOCK
    done = s.advance([StepRequest(3, np.array(prompt(12, 30)), start=True)], ["old"])
    assert done == [] and s.prefilling == 1
    done = s.advance([StepRequest(3, np.array([5, 6]), start=True)], ["new"])
    assert [tag for tag, _ in done] == ["old", "new"] and "restarted" in done[0][1].error
    np.testing.assert_allclose(done[1][1].logits, reference(model, [5, 6]), atol=TOL, rtol=0)
    # a step sent before the prompt was answered fails the sequence: both steps are answered
    assert s.advance([StepRequest(4, np.array(prompt(13, 30)), start=True)], ["p4"]) == [] and s.prefilling
    done = s.advance([StepRequest(4, np.array([1]))], ["early"])
    assert [tag for tag, _ in done] == ["early", "p4"] and "before its prompt was answered" in done[0][1].error
    assert "ended before its prompt was computed" in done[1][1].error and not s.prefilling and 4 not in s.sequence_ids()
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 0"):
        Scheduler(runtime, s.pool, vocab_size=runtime.vocab_size, max_num_batched_tokens=-1)
