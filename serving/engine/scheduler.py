"""Batches the steps of many sequences into runtime calls.

Each sequence (a Triton correlation id) owns one slot of the KV pool from START to END. One
iteration (`Scheduler.advance`) takes the requests of one `execute()` / one in-flight batch:
- single-token steps run together in ONE call over the contiguous slot range they span. Slots in
  that range that are not stepping ride along as dummy rows: their dummy token is written at
  their next position, which their own next real step overwrites, and their length is not
  advanced. Decode is memory-bound, so a few extra rows cost little next to a second call.
- prompts (more than one new token) run one per runtime call (the static-cache graph takes
  several rows of many tokens only when none has a past). With `max_num_batched_tokens` set, a
  prompt is prefilled in chunks of at most that many tokens, one iteration's worth at a time,
  and the prompt's step is answered after its last chunk. When no sequence is decoding (every
  slot holder waits for its prompt: an idle server, or a burst of newcomers), the oldest prompt
  runs whole in one call: chunks only protect decoding streams. `step` runs iterations until
  every request is answered (the plain `gpt` model).
- mixed calls (issue 15): an iteration's first prompt chunk runs in the SAME runtime call as its
  decode steps (`runtime.step_mixed`: the graph's second attention group), so decoding streams
  step with every chunk at the cost of one call. Further chunks that the budget allows run in
  calls of their own; a runtime without `step_mixed` (TensorRT) runs the two calls.
- with a prefix cache (serving/engine/prefix_cache.py), a prompt that starts with cached blocks
  gets their KV copied into its slot and prefills only the rest.
A slot is freed on END, when the sequence idles out, and when its request fails; with a prefix
cache, a slot that ended normally keeps its blocks until a new sequence needs the slot.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from serving.engine.contract import Runtime
from serving.engine.kv_cache import KVPool, PoolFullError
from serving.engine.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

BUSY_PREFIX = "server busy"  # a START refused because the pool is full: retryable (Triton UNAVAILABLE)


class StepError(ValueError):
    """A request the engine refuses; the message goes back to the client as is."""


@dataclass(frozen=True)
class StepRequest:
    sequence_id: int
    tokens: np.ndarray  # (T,) int64
    start: bool = False
    end: bool = False


@dataclass
class StepResult:
    logits: Optional[np.ndarray] = None  # (V,) float32
    error: Optional[str] = None


@dataclass
class SchedulerStats:
    runtime_calls: int = 0
    batched_rows: int = 0  # real rows run in multi-row decode calls
    batched_calls: int = 0  # decode calls with more than one real row
    max_rows_in_call: int = 0
    prefill_chunks: int = 0  # prompt calls that left part of their prompt for a later iteration
    mixed_calls: int = 0  # calls that ran decode rows and a prompt chunk together
    sequences_started: int = 0
    sequences_ended: int = 0
    sequences_idled_out: int = 0
    sequences_failed: int = 0
    busy_rejections: int = 0


@dataclass
class _Sequence:
    slot: int
    last_used: float
    logits: Optional[np.ndarray] = None  # the last call's, until its step is answered


@dataclass
class _Prefill:
    """A prompt step still being computed: `tokens[done:]` are left."""

    tag: Any
    sequence_id: int
    seq: _Sequence
    tokens: np.ndarray
    end: bool
    done: int = 0


@dataclass
class Scheduler:
    runtime: Runtime
    pool: KVPool
    vocab_size: int
    idle_timeout_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    # prompt tokens per runtime call; 0: a whole prompt in one call
    max_num_batched_tokens: int = 0
    prefix_cache: Optional[PrefixCache] = None
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    _sequences: dict[int, _Sequence] = field(default_factory=dict)
    _prefills: deque = field(default_factory=deque)  # of _Prefill, first come first served
    _dropped: list = field(default_factory=list)  # (tag, result) of prompts whose sequence went away

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 0:
            raise ValueError(f"max_num_batched_tokens must be >= 0, got {self.max_num_batched_tokens}")
        if self.prefix_cache is not None and self.prefix_cache.pool is not self.pool:
            raise ValueError("the prefix cache must index the scheduler's own pool")

    @property
    def active(self) -> int:
        return len(self._sequences)

    def sequence_ids(self) -> set[int]:
        """The sequences holding a slot."""
        return set(self._sequences)

    @property
    def free_slots(self) -> int:
        """Slots a new sequence can have now (cached prefixes are evicted for it)."""
        return self.pool.max_sequences - len(self._sequences)

    @property
    def prefilling(self) -> int:
        """Prompt steps with chunks left: `advance([])` makes progress on them."""
        return len(self._prefills)

    def step(self, requests: Sequence[StepRequest]) -> list[StepResult]:
        """Run one batch of requests to the end (every chunk of every prompt); results in
        request order. Prompts left over from `advance` calls run too, their results dropped."""
        results: list[Optional[StepResult]] = [None] * len(requests)
        done = self.advance(requests, range(len(requests)))
        while self._prefills:
            done += self.advance([], [])
        for tag, result in done:
            if isinstance(tag, int) and 0 <= tag < len(requests) and results[tag] is None:
                results[tag] = result
        return [r if r is not None else StepResult(error="engine error: the step was dropped") for r in results]

    def advance(self, requests: Sequence[StepRequest], tags: Sequence[Any]) -> list[tuple[Any, StepResult]]:
        """One iteration: admit `requests`, run the decode steps in one call and prompt chunks
        up to the token budget (older prompts first). Returns (tag, result) for every step that
        finished: the decode steps, refused requests, and prompts whose last chunk ran (of this
        batch or earlier ones)."""
        self._free_idle()
        done: list[tuple[Any, StepResult]] = []
        decode: list[tuple[Any, StepRequest, _Sequence, np.ndarray]] = []
        seen: set[int] = set()
        for tag, req in zip(tags, requests):
            if req.sequence_id in seen:
                # Triton never batches two steps of one sequence; if it did, order would matter
                done.append((tag, StepResult(error=f"sequence {req.sequence_id} has two steps in one batch")))
                continue
            seen.add(req.sequence_id)
            try:
                seq, tokens = self._admit(req, done)
            except StepError as e:
                done.append((tag, StepResult(error=str(e))))
                self._release(req.sequence_id, failed=not req.end)  # a failed step ends its sequence
                continue
            if len(tokens) == 1:
                decode.append((tag, req, seq, tokens))
            else:
                self._prefills.append(_Prefill(tag, req.sequence_id, seq, tokens, req.end))
        self._run_prefills(done, decode)
        done += self._dropped
        self._dropped = []
        return done

    def release(self, sequence_id: int) -> bool:
        """Free a sequence's slot now (its client went away); False if it held none."""
        if sequence_id not in self._sequences:
            return False
        self._release(sequence_id, failed=True)
        return True

    def finish(self, sequence_id: int) -> bool:
        """End a sequence that finished without an END step (an engine-side generation that
        stopped early): as END would, its blocks stay cached; False if it held no slot."""
        if sequence_id not in self._sequences:
            return False
        self._release(sequence_id, failed=False)
        return True

    def free_idle(self) -> None:
        """Free the sequences idle past the timeout (also done at every step)."""
        self._free_idle()

    # ------------------------------------------------------------------ helpers

    def _admit(self, req: StepRequest, done: list) -> tuple[_Sequence, np.ndarray]:
        """Validate a request and find (or, at START, allocate) its slot; the tokens left to
        compute (a prompt's tail after a cached prefix)."""
        tokens = req.tokens
        if tokens.ndim != 1 or len(tokens) == 0:
            raise StepError("input_ids is empty: a step needs at least one token")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise StepError(f"input_ids must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        pending = next((p for p in self._prefills if p.sequence_id == req.sequence_id), None)
        if req.start:
            if pending is not None:  # restarted while its prompt was computed: that step is void
                self._prefills.remove(pending)
                done.append((pending.tag, StepResult(error=f"sequence {req.sequence_id} was restarted")))
            if req.sequence_id in self._sequences:  # a restarted sequence begins again
                self._release(req.sequence_id, failed=False)
            if len(tokens) > self.pool.max_length:
                raise StepError(
                    f"prompt too long: {len(tokens)} tokens exceeds the context length "
                    f"n_positions={self.pool.max_length}")
            return self._start(req)
        if pending is not None:
            raise StepError(f"sequence {req.sequence_id} sent a step before its prompt was answered")
        seq = self._sequences.get(req.sequence_id)
        if seq is None:
            raise StepError(
                f"unknown sequence id {req.sequence_id}: start it with the START flag (it may have "
                f"ended, failed, or idled out after {self.idle_timeout_s:g} s)")
        past = int(self.pool.lengths[seq.slot])
        if past + len(tokens) > self.pool.max_length:
            raise StepError(
                f"context length exceeded: {past} cached + {len(tokens)} new tokens > "
                f"n_positions={self.pool.max_length}")
        return seq, tokens

    def _start(self, req: StepRequest) -> tuple[_Sequence, np.ndarray]:
        """A slot for a new sequence, with the KV of its prompt's longest cached prefix."""
        cache = self.prefix_cache
        match = cache.match(req.tokens) if cache is not None else None
        try:
            slot = self.pool.allocate()
        except PoolFullError:
            slot = None
            if cache is not None:
                if match is not None and match.cached:
                    slot = match.slot  # no free slot: take the cached prefix's own slot over
                elif cache.evict() is not None:
                    slot = self.pool.allocate()
            if slot is None:
                self.stats.busy_rejections += 1
                raise StepError(
                    f"{BUSY_PREFIX}: {self.pool.max_sequences} of {self.pool.max_sequences} "
                    "sequences active; retry later or send END for finished sequences") from None
        self.pool.lengths[slot] = 0
        if cache is not None:
            cache.assign(slot, len(req.tokens), match)
        reused = match.tokens if match is not None else 0
        seq = self._sequences[req.sequence_id] = _Sequence(slot, self.clock())
        self.stats.sequences_started += 1
        return seq, req.tokens[reused:]

    def _run_prefills(self, done: list, decode: list) -> None:
        """The decode steps with the first prompt chunk in ONE call (a mixed call), then more
        prompt chunks, oldest prompt first, up to the token budget of one iteration."""
        budget = self.max_num_batched_tokens or None
        if budget is not None and not decode and self._prefills and len(self._prefills) == len(self._sequences):
            # nobody is decoding (every sequence holding a slot waits for its prompt): there is no
            # stream's inter-token latency to protect, so the oldest prompt runs whole, its TTFT one call
            budget = max(budget, len(self._prefills[0].tokens) - self._prefills[0].done)
        while decode or (self._prefills and (budget is None or budget > 0)):
            p = self._prefills[0] if self._prefills and (budget is None or budget > 0) else None
            chunk = None
            if p is not None:
                n = len(p.tokens) - p.done if budget is None else min(budget, len(p.tokens) - p.done)
                chunk = (p.seq, p.tokens[p.done:p.done + n])
            error, chunk_error = self._run([(seq, tokens) for _, _, seq, tokens in decode], chunk)
            for tag, req, seq, _ in decode:
                done.append((tag, self._result(seq, error)))
                if req.end or error is not None:
                    self._release(req.sequence_id, failed=error is not None and not req.end)
            decode = []
            if p is None:
                return
            p.done += n
            if budget is not None:
                budget -= n
            if chunk_error is None and p.done < len(p.tokens):
                self.stats.prefill_chunks += 1
                continue  # the next chunk, in this iteration if the budget allows
            self._prefills.popleft()
            done.append((p.tag, self._result(p.seq, chunk_error)))
            if p.end or chunk_error is not None:
                self._release(p.sequence_id, failed=chunk_error is not None and not p.end)

    def _run(self, rows: list[tuple[_Sequence, np.ndarray]], chunk: Optional[tuple[_Sequence, np.ndarray]] = None
             ) -> tuple[Optional[str], Optional[str]]:
        """One runtime call over the contiguous slot range of `rows` (all with T new tokens) and,
        with the runtime's `step_mixed`, the prompt `chunk` of another sequence in the same call;
        each row's (and the chunk's) logits are kept on its sequence. The errors of the rows and
        of the chunk, when the engine failed."""
        if not rows:
            if chunk is None:
                return None, None
            error = self._call([chunk], None)  # a chunk alone is one row
            return error, error
        if chunk is not None and not self._can_mix(rows, chunk):
            return self._call(rows, None), self._call([chunk], None)
        error = self._call(rows, chunk)
        return error, error

    def _can_mix(self, rows: list[tuple[_Sequence, np.ndarray]], chunk: tuple[_Sequence, np.ndarray]) -> bool:
        """The runtime has `step_mixed` and, when the chunk's slot rides along among the rows,
        its dummy token fits beyond the chunk (the contract of `step_mixed`)."""
        if not hasattr(self.runtime, "step_mixed") or any(len(t) != 1 for _, t in rows):
            return False
        slots = [seq.slot for seq, _ in rows]
        slot = chunk[0].slot
        inside = min(slots) <= slot <= max(slots)
        return not inside or int(self.pool.lengths[slot]) + len(chunk[1]) + 1 <= self.pool.max_length

    def _call(self, rows: list[tuple[_Sequence, np.ndarray]], chunk: Optional[tuple[_Sequence, np.ndarray]]
              ) -> Optional[str]:
        slots = [seq.slot for seq, _ in rows]
        lo, hi = min(slots), max(slots)
        T = len(rows[0][1])
        input_ids = np.zeros((hi - lo + 1, T), dtype=np.int64)  # dummies: token 0
        # a dummy writes at its next position; clamp so a full sequence's dummy stays in bounds
        past = np.minimum(self.pool.lengths[lo:hi + 1], self.pool.max_length - T).astype(np.int64)
        for seq, tokens in rows:
            input_ids[seq.slot - lo] = tokens
        try:
            if chunk is None:
                logits = self.runtime.step(input_ids, pool=self.pool, slot_start=lo, past_lengths=past)
            else:
                seq, tokens = chunk
                chunk_past = int(self.pool.lengths[seq.slot])
                if lo <= seq.slot <= hi:  # the chunk's slot rides along: its dummy goes beyond the chunk
                    past[seq.slot - lo] = chunk_past + len(tokens)
                logits = self.runtime.step_mixed(input_ids, pool=self.pool, slot_start=lo, past_lengths=past,
                                                 chunk_ids=tokens, chunk_slot=seq.slot, chunk_past=chunk_past)
        except Exception as e:  # the engine failed: these rows' sequences are gone
            logger.exception("runtime step failed for slots %s%s", slots,
                             "" if chunk is None else f" and the chunk of slot {chunk[0].slot}")
            return f"engine error: {e}"
        now = self.clock()
        self.stats.runtime_calls += 1
        self.stats.max_rows_in_call = max(self.stats.max_rows_in_call, len(rows))
        if len(rows) > 1:
            self.stats.batched_calls += 1
            self.stats.batched_rows += len(rows)
        done = [(seq, tokens, seq.slot - lo) for seq, tokens in rows]
        if chunk is not None:
            self.stats.mixed_calls += 1
            done.append((chunk[0], chunk[1], hi - lo + 1))  # the chunk's logits follow the rows'
        for seq, tokens, row in done:
            start = int(self.pool.lengths[seq.slot])
            self.pool.lengths[seq.slot] = start + len(tokens)
            seq.last_used = now
            seq.logits = logits[row].copy()  # the runtime reuses its buffer
            if self.prefix_cache is not None:
                self.prefix_cache.record(seq.slot, start, tokens)
                if len(tokens) > 1:  # a prompt's blocks: other prompts may share them now
                    self.prefix_cache.publish(seq.slot, start + len(tokens))
        return None

    @staticmethod
    def _result(seq: _Sequence, error: Optional[str]) -> StepResult:
        if error is not None:
            return StepResult(error=error)
        logits, seq.logits = seq.logits, None
        return StepResult(logits=logits)

    def _release(self, sequence_id: int, *, failed: bool) -> None:
        seq = self._sequences.pop(sequence_id, None)
        if seq is None:
            return
        for p in [p for p in self._prefills if p.sequence_id == sequence_id]:
            self._prefills.remove(p)  # its slot is gone: the prompt's own step fails with it
            self._dropped.append((p.tag, StepResult(error=f"sequence {sequence_id} ended before its prompt was computed")))
        if self.prefix_cache is not None and not failed:
            self.prefix_cache.retire(seq.slot, int(self.pool.lengths[seq.slot]))
        else:
            if self.prefix_cache is not None:
                self.prefix_cache.forget(seq.slot)
            self.pool.free(seq.slot)
        if failed:
            self.stats.sequences_failed += 1
        else:
            self.stats.sequences_ended += 1

    def _free_idle(self) -> None:
        cutoff = self.clock() - self.idle_timeout_s
        pending = {p.sequence_id for p in self._prefills}
        for sid in [sid for sid, s in self._sequences.items() if s.last_used < cutoff and sid not in pending]:
            logger.info("sequence %d idled out; freeing slot %d", sid, self._sequences[sid].slot)
            self._release(sid, failed=False)
            self.stats.sequences_ended -= 1
            self.stats.sequences_idled_out += 1


class StepQueue:
    """The queue of the in-flight batcher (the decoupled `gpt`): `execute` puts each step with
    its sequence id; the engine thread takes the next batch with :meth:`gather`.

    gather(cohort) takes what is queued and then waits, at most ``wait_s`` from the batch's
    first step, for the sequences of `cohort` (those of the previous engine call that are still
    active) that have not sent their next step yet. Concurrent streams therefore step together
    in one engine call; a stream that does not come back in time (its client is busy elsewhere)
    only drops out of the next cohort.
    """

    def __init__(self, wait_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.wait_s = wait_s
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False

    @property
    def closed(self) -> bool:
        """gather() has met the end of the queue: nothing more will come."""
        return self._closed

    def put(self, sequence_id: Optional[int], item: object) -> None:
        self._queue.put((sequence_id, item))

    def close(self) -> None:
        """gather() returns what is queued, then an empty batch."""
        self._queue.put(None)

    def gather(self, cohort: set[int], *, block: bool = True) -> tuple[list, set[int]]:
        """The next batch's items and their sequence ids; blocks for the first item (with
        block=False, the engine has work of its own: it waits only for the cohort, up to
        ``wait_s``, and may return an empty batch). An empty batch with `closed` set: the queue
        was closed."""
        if self._closed:
            return [], set()
        items: list = []
        ids: set = set()
        if block:
            first = self._queue.get()
            if first is None:
                self._closed = True
                return [], set()
            items, ids = [first[1]], {first[0]}
        deadline = self._clock() + self.wait_s
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - self._clock()
                if remaining <= 0 or not (cohort - ids):
                    break
                try:
                    entry = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if entry is None:
                self._closed = True  # the next gather() returns nothing
                break
            items.append(entry[1])
            ids.add(entry[0])
        ids.discard(None)
        return items, ids
