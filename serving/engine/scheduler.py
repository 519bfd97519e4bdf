"""Batches the steps of many sequences into one runtime call.

Each sequence (a Triton correlation id) owns one slot of the KV pool from START to END. A call
of `Scheduler.step` gets the requests Triton's sequence batcher handed to one `execute()`:
- prompts (more than one new token) run one per runtime call (the static-cache graph takes rows
  with the same number of new tokens);
- single-token steps run together in ONE call over the contiguous slot range they span. Slots in
  that range that are not stepping ride along as dummy rows: their dummy token is written at
  their next position, which their own next real step overwrites, and their length is not
  advanced. Decode is memory-bound, so a few extra rows cost little next to a second call.
A slot is freed on END, when the sequence idles out, and when its request fails.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from serving.engine.contract import Runtime
from serving.engine.kv_cache import KVPool, PoolFullError

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
    sequences_started: int = 0
    sequences_ended: int = 0
    sequences_idled_out: int = 0
    sequences_failed: int = 0
    busy_rejections: int = 0


@dataclass
class _Sequence:
    slot: int
    last_used: float


@dataclass
class Scheduler:
    runtime: Runtime
    pool: KVPool
    vocab_size: int
    idle_timeout_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    _sequences: dict[int, _Sequence] = field(default_factory=dict)

    @property
    def active(self) -> int:
        return len(self._sequences)

    def sequence_ids(self) -> set[int]:
        """The sequences holding a slot."""
        return set(self._sequences)

    @property
    def free_slots(self) -> int:
        return self.pool.max_sequences - len(self._sequences)

    def step(self, requests: Sequence[StepRequest]) -> list[StepResult]:
        """Run one batch of requests; results are in request order."""
        self._free_idle()
        results = [StepResult() for _ in requests]
        decode: list[tuple[int, _Sequence, int]] = []  # (request index, sequence, token)
        prefill: list[tuple[int, _Sequence]] = []
        seen: set[int] = set()
        for i, req in enumerate(requests):
            if req.sequence_id in seen:
                # Triton never batches two steps of one sequence; if it did, order would matter
                results[i].error = f"sequence {req.sequence_id} has two steps in one batch"
                continue
            seen.add(req.sequence_id)
            try:
                seq = self._admit(req)
            except StepError as e:
                results[i].error = str(e)
                continue
            if len(req.tokens) == 1:
                decode.append((i, seq, int(req.tokens[0])))
            else:
                prefill.append((i, seq))
        for i, seq in prefill:
            self._run([(i, seq, requests[i].tokens)], results)
        if decode:
            self._run([(i, seq, np.array([tok], dtype=np.int64)) for i, seq, tok in decode], results)
        for i, req in enumerate(requests):
            if req.end or results[i].error is not None:
                self._release(req.sequence_id, failed=results[i].error is not None and not req.end)
        return results

    # ------------------------------------------------------------------ helpers

    def _admit(self, req: StepRequest) -> _Sequence:
        """Validate a request and find (or, at START, allocate) its slot."""
        tokens = req.tokens
        if tokens.ndim != 1 or len(tokens) == 0:
            raise StepError("input_ids is empty: a step needs at least one token")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise StepError(f"input_ids must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        if req.start:
            if req.sequence_id in self._sequences:  # a restarted sequence begins again
                self._release(req.sequence_id, failed=False)
            if len(tokens) > self.pool.max_length:
                raise StepError(
                    f"prompt too long: {len(tokens)} tokens exceeds the context length "
                    f"n_positions={self.pool.max_length}")
            try:
                slot = self.pool.allocate()
            except PoolFullError:
                self.stats.busy_rejections += 1
                raise StepError(
                    f"{BUSY_PREFIX}: {self.pool.max_sequences} of {self.pool.max_sequences} "
                    "sequences active; retry later or send END for finished sequences") from None
            self.pool.lengths[slot] = 0
            seq = self._sequences[req.sequence_id] = _Sequence(slot, self.clock())
            self.stats.sequences_started += 1
            return seq
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
        return seq

    def _run(self, rows: list[tuple[int, _Sequence, np.ndarray]], results: list[StepResult]) -> None:
        """One runtime call over the contiguous slot range of `rows` (all with T new tokens)."""
        slots = [seq.slot for _, seq, _ in rows]
        lo, hi = min(slots), max(slots)
        T = len(rows[0][2])
        input_ids = np.zeros((hi - lo + 1, T), dtype=np.int64)  # dummies: token 0
        # a dummy writes at its next position; clamp so a full sequence's dummy stays in bounds
        past = np.minimum(self.pool.lengths[lo:hi + 1], self.pool.max_length - T).astype(np.int64)
        for _, seq, tokens in rows:
            input_ids[seq.slot - lo] = tokens
        try:
            logits = self.runtime.step(input_ids, pool=self.pool, slot_start=lo, past_lengths=past)
        except Exception as e:  # the engine failed: these rows' sequences are gone
            logger.exception("runtime step failed for slots %s", slots)
            for i, _, _ in rows:
                results[i].error = f"engine error: {e}"
            return
        now = self.clock()
        self.stats.runtime_calls += 1
        self.stats.max_rows_in_call = max(self.stats.max_rows_in_call, len(rows))
        if len(rows) > 1:
            self.stats.batched_calls += 1
            self.stats.batched_rows += len(rows)
        for i, seq, tokens in rows:
            self.pool.lengths[seq.slot] += len(tokens)
            seq.last_used = now
            results[i].logits = logits[seq.slot - lo].copy()  # the runtime reuses its buffer

    def _release(self, sequence_id: int, *, failed: bool) -> None:
        seq = self._sequences.pop(sequence_id, None)
        if seq is None:
            return
        self.pool.free(seq.slot)
        if failed:
            self.stats.sequences_failed += 1
        else:
            self.stats.sequences_ended += 1

    def _free_idle(self) -> None:
        cutoff = self.clock() - self.idle_timeout_s
        for sid in [sid for sid, s in self._sequences.items() if s.last_used < cutoff]:
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

    def put(self, sequence_id: Optional[int], item: object) -> None:
        self._queue.put((sequence_id, item))

    def close(self) -> None:
        """gather() returns what is queued, then an empty batch."""
        self._queue.put(None)

    def gather(self, cohort: set[int]) -> tuple[list, set[int]]:
        """The next batch's items and their sequence ids; blocks for the first item. An empty
        batch: the queue was closed."""
        first = self._queue.get()
        if first is None:
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
                self._queue.put(None)  # closed: the next gather() returns nothing
                break
            items.append(entry[1])
            ids.add(entry[0])
        ids.discard(None)
        return items, ids
