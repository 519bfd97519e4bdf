"""The paged step runtime: `OrtRuntime`'s `step()` over any `Engine` of the dynamic-cache graph
and any `Ops` (memory + copies); the TensorRT runtime is this with a TensorRT engine and CUDA.

TensorRT runs the portable graph (`kv_cache="dynamic"`: past ++ new by Concat; TensorRT's ONNX
parser has no GroupQueryAttention). That graph takes a dense past `(B, nh, P, hs)` and returns a
dense present `(B, nh, P + T, hs)`; the pool keeps `(S, nh, MAX, hs)` per layer. A step:

1. **gather**: rows `[slot_start, slot_start + B)`, columns `[0, P)` of each pool buffer into a
   dense staging past: ONE strided 2-D copy per layer and key/value (B * nh rows of P * hs);
2. **run** the engine with an execution context of the optimisation profile that holds
   `(B, T, P)`; decode steps (T == 1) replay a CUDA graph captured per `(profile, B, P)`;
3. **scatter**: the T new positions of each present into pool column `C` of every row, again ONE
   2-D copy per layer and key/value.

One copy per layer for the whole batch is possible because the new keys of all rows go to the
same pool column `C`, not to each row's own length: a row's cache may have holes. GPT-2's keys
carry no position (positions are added to the input embedding), so attention only needs to know
WHICH columns are valid, not where: a per-slot column map (`logical position -> pool column`,
host side) gives the attention mask, holes masked out. `C` is the first column past every valid
column of the rows in the batch. When `C + T` would pass the pool's end, the rows are compacted
first (rare: it takes a batch mixing long and short sequences for a long time).

The engine's past length `P` is `C` rounded up to a bucket (default 64 positions), so decode
shapes repeat and their CUDA graphs are reused; columns `[C, P)` are masked.

The step logic runs on any `Ops` (memory + copies) and `Engine`: `TrtRuntime` is
`PagedStepRuntime(TrtEngine, CudaOps)`; the tests run the very same logic as
`PagedStepRuntime(OrtEngine, HostOps)` on CPU (ONNX Runtime executing the same dynamic graph,
numpy buffers with the same byte offsets and pitches as the CUDA copies) against PyTorch.

Contract (as `OrtRuntime.step`): every row of the range gets its token(s) at logical positions
`[past_lengths[b], + T)`; a row that is not really stepping rides along with a dummy token that
its own next real step overwrites; `step` never changes `pool.lengths`. Unlike the static ORT
graph, any (B, T) mix is allowed (prompts after a past in a batch too).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from serving import tensors
from serving.engine.contract import GraphInfo, check_pool, check_rows, check_tokens
from serving.engine.kv_cache import KVPool
from serving.engine.memory import HostOps, Ops
from serving.engine.profiles import Profile, bucket_past

logger = logging.getLogger(__name__)

DEFAULT_PAST_BUCKET = 64  # engine past lengths are multiples of this: decode shapes repeat


# ---------------------------------------------------------------------------- the column map


def write_column(columns: np.ndarray, past: np.ndarray) -> int:
    """The first pool column after every valid column of these rows. columns (B, MAX): pool
    column of each logical position; past (B,): valid positions per row."""
    B, MAX = columns.shape
    valid = np.arange(MAX)[None, :] < past[:, None]  # (B, MAX)
    extent = np.where(valid, columns + 1, 0)
    return int(extent.max()) if B and MAX else 0


def attention_mask(columns: np.ndarray, past: np.ndarray, P: int, T: int) -> np.ndarray:
    """(B, P + T) int64: 1 at each row's valid pool columns (< P) and at the T new positions."""
    B, MAX = columns.shape
    mask = np.zeros((B, P + T), dtype=np.int64)
    b, i = np.nonzero(np.arange(MAX)[None, :] < past[:, None])
    mask[b, columns[b, i]] = 1
    mask[:, P:] = 1
    return mask


def compaction_order(columns: np.ndarray, past: np.ndarray) -> np.ndarray:
    """(B, MAX): new column j of row b takes old column order[b, j] — logical order, valid first."""
    B, MAX = columns.shape
    j = np.arange(MAX)[None, :]
    return np.where(j < past[:, None], columns, j).astype(np.int64)


# ---------------------------------------------------------------------------- the step runtime


class Engine(GraphInfo, Protocol):
    """What the paged runtime runs: TrtEngine on a GPU, OrtEngine (host_engine.py) on CPU."""

    profiles: tuple[Profile, ...]

    def execute(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]],
                buffers: Mapping[str, Any], *, graph_key: Optional[tuple] = None) -> None: ...



class _PoolState:
    """What the runtime keeps per KV pool: device buffers and the column map."""

    def __init__(self, pool: KVPool, keys: list[Any], values: list[Any]) -> None:
        self.keys, self.values = keys, values
        self.columns = np.zeros((pool.max_sequences, pool.max_length), dtype=np.int64)
        self.columns[:] = np.arange(pool.max_length)[None, :]
        self.compactions = 0


class PagedStepRuntime:
    """`step()` over an Engine and Ops (see the module docstring)."""

    kv_cache: tensors.KVCache = "dynamic"

    def __init__(self, engine: Engine, ops: Ops, *, past_bucket: int = DEFAULT_PAST_BUCKET) -> None:
        if past_bucket < 1:
            raise ValueError(f"past_bucket must be >= 1, got {past_bucket}")
        self.engine, self.ops, self.past_bucket = engine, ops, past_bucket
        self.n_layer, self.n_head, self.head_dim = engine.n_layer, engine.n_head, engine.head_dim
        self.vocab_size, self.kv_dtype, self.logits_dtype = engine.vocab_size, np.dtype(engine.kv_dtype), np.dtype(engine.logits_dtype)
        self.max_batch = max(p.batch.max for p in engine.profiles)
        self._pools: weakref.WeakKeyDictionary[KVPool, _PoolState] = weakref.WeakKeyDictionary()
        self._io: dict[str, Any] = {}
        self._io_capacity = (0, 0)  # (rows, max_length) the IO buffers hold
        self._lock = threading.Lock()  # one step at a time: shared staging buffers

    def new_pool(self, *, max_sequences: int, max_length: int) -> KVPool:
        pool = KVPool(n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                      max_sequences=max_sequences, max_length=max_length, dtype=self.kv_dtype)
        self._state(pool)
        return pool

    # ------------------------------------------------------------------ buffers

    def _state(self, pool: KVPool) -> _PoolState:
        state = self._pools.get(pool)
        if state is None:
            check_pool(pool, n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                       kv_dtype=self.kv_dtype, owner="engine")
            if isinstance(self.ops, HostOps):  # the pool's own arrays are the storage
                keys = [HostOps.wrap(a) for a in pool.keys]
                values = [HostOps.wrap(a) for a in pool.values]
            else:
                nbytes = pool.keys[0].nbytes  # (S, nh, MAX, hs); the host arrays stay untouched
                keys = [self.ops.alloc(nbytes) for _ in range(pool.n_layer)]
                values = [self.ops.alloc(nbytes) for _ in range(pool.n_layer)]
            state = self._pools[pool] = _PoolState(pool, keys, values)
            logger.info("KV pool on %s: %d slots x %d positions", type(self.ops).__name__,
                        pool.max_sequences, pool.max_length)
        return state

    def _io_buffers(self, rows: int, max_length: int) -> dict[str, Any]:
        """Engine input/output buffers for up to `rows` x `max_length` (allocated once, at the
        largest batch the profiles take, so their addresses never change: CUDA graphs keep them)."""
        if rows <= self._io_capacity[0] and max_length <= self._io_capacity[1]:
            return self._io
        rows, max_length = max(rows, self.max_batch, self._io_capacity[0]), max(max_length, self._io_capacity[1])
        kv = rows * self.n_head * max_length * self.head_dim * self.kv_dtype.itemsize
        io = {tensors.INPUT_IDS: self.ops.alloc(rows * max_length * 8),
              tensors.POSITION_IDS: self.ops.alloc(rows * max_length * 8),
              tensors.ATTENTION_MASK: self.ops.alloc(rows * max_length * 8),
              tensors.LOGITS: self.ops.alloc(rows * self.vocab_size * self.logits_dtype.itemsize)}
        for i in range(self.n_layer):
            for name in (tensors.past_key(i), tensors.past_value(i), tensors.present_key(i), tensors.present_value(i)):
                io[name] = self.ops.alloc(kv)
        free = getattr(self.ops, "free", None)
        if free is not None:
            for buffer in self._io.values():
                free(buffer)
        forget = getattr(self.engine, "forget_buffers", None)  # TrtEngine: stale addresses and graphs
        if forget is not None:
            forget()
        self._io, self._io_capacity = io, (rows, max_length)
        return io

    # ------------------------------------------------------------------ step

    def step(self, input_ids: np.ndarray, *, pool: KVPool, slot_start: int,
             past_lengths: np.ndarray | Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
        """Run T new tokens for rows [slot_start, slot_start + B) of `pool`. input_ids (B, T);
        past_lengths (B,). Returns the last position's logits (B, V) (`out` when given)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        past = np.ascontiguousarray(past_lengths, dtype=np.int64)
        B, T = self._check_step(input_ids, pool, slot_start, past)
        with self._lock:
            state = self._state(pool)
            rows = state.columns[slot_start:slot_start + B]  # (B, MAX) view
            C = write_column(rows, past)
            if C + T > pool.max_length:
                self._compact(pool, state, slot_start, past)
                C = write_column(rows, past)
            index, profile = self._profile(B, T, C, pool.max_length)
            P = bucket_past(C, profile=profile, limit=pool.max_length - T, bucket=self.past_bucket)
            logits = self._run(state, pool, slot_start, input_ids, past, rows, C, P, index)
            rows[np.arange(B)[:, None], past[:, None] + np.arange(T)[None, :]] = C + np.arange(T)[None, :]
        if out is not None:
            if out.shape != (B, self.vocab_size) or out.dtype != self.logits_dtype:
                raise ValueError(f"out must be a {self.logits_dtype} array of shape ({B}, {self.vocab_size}), "
                                 f"got {out.dtype} {out.shape}")
            out[...] = logits
            return out
        return logits

    def _profile(self, B: int, T: int, C: int, max_length: int) -> tuple[int, Profile]:
        for index, profile in enumerate(self.engine.profiles):
            if B in profile.batch and T in profile.seq and profile.past.min <= C <= profile.past.max:
                return index, profile
        ranges = ", ".join(f"{p.name}: batch {p.batch.min}..{p.batch.max} seq {p.seq.min}..{p.seq.max} "
                           f"past {p.past.min}..{p.past.max}" for p in self.engine.profiles)
        raise ValueError(f"no optimisation profile takes {B} rows x {T} tokens after {C} cached "
                         f"positions; the engine's profiles: {ranges}")

    def _run(self, state: _PoolState, pool: KVPool, slot_start: int, input_ids: np.ndarray,
             past: np.ndarray, rows: np.ndarray, C: int, P: int, profile_index: int) -> np.ndarray:
        ops = self.ops
        B, T = input_ids.shape
        MAX = pool.max_length
        io = self._io_buffers(B, MAX)
        ops.upload(io[tensors.INPUT_IDS], input_ids)
        ops.upload(io[tensors.POSITION_IDS], past[:, None] + np.arange(T)[None, :])  # (B, T)
        ops.upload(io[tensors.ATTENTION_MASK], attention_mask(rows, past, P, T))  # (B, P + T)
        pos = self.head_dim * self.kv_dtype.itemsize  # bytes of one position of one head
        slot = self.n_head * MAX * pos  # bytes of one slot of one layer
        for layer in range(self.n_layer):
            for pool_buffer, name in ((state.keys[layer], tensors.past_key(layer)),
                                      (state.values[layer], tensors.past_value(layer))):
                # pool[slot_start:+B, :, :P, :] -> dense (B, nh, P, hs)
                ops.copy2d(io[name], 0, P * pos, pool_buffer, slot_start * slot, MAX * pos, P * pos, B * self.n_head)
        shapes = {tensors.INPUT_IDS: (B, T), tensors.POSITION_IDS: (B, T), tensors.ATTENTION_MASK: (B, P + T)}
        for i in range(self.n_layer):
            shapes[tensors.past_key(i)] = shapes[tensors.past_value(i)] = (B, self.n_head, P, self.head_dim)
        self.engine.execute(profile_index, shapes, io, graph_key=(B, P) if T == 1 else None)
        for layer in range(self.n_layer):
            for pool_buffer, name in ((state.keys[layer], tensors.present_key(layer)),
                                      (state.values[layer], tensors.present_value(layer))):
                # present[:, :, P:P+T, :] -> pool[slot_start:+B, :, C:C+T, :]
                ops.copy2d(pool_buffer, slot_start * slot + C * pos, MAX * pos, io[name], P * pos,
                           (P + T) * pos, T * pos, B * self.n_head)
        return ops.download(io[tensors.LOGITS], self.logits_dtype, (B, self.vocab_size))

    def _compact(self, pool: KVPool, state: _PoolState, slot_start: int, past: np.ndarray) -> None:
        """Move each row's valid columns to the front, in logical order (through the host: rare)."""
        B, MAX = len(past), pool.max_length
        rows = state.columns[slot_start:slot_start + B]
        order = compaction_order(rows, past)  # (B, MAX)
        shape = (B, self.n_head, MAX, self.head_dim)
        offset = slot_start * self.n_head * MAX * self.head_dim * self.kv_dtype.itemsize
        for buffer in (*state.keys, *state.values):
            data = self.ops.download(buffer, self.kv_dtype, shape, offset)
            data = np.take_along_axis(data, order[:, None, :, None], axis=2)
            self.ops.upload(buffer, data, offset)
        self.ops.synchronize()
        rows[:] = np.arange(MAX)[None, :]
        state.compactions += 1
        logger.info("compacted KV slots [%d, %d)", slot_start, slot_start + B)

    def _check_step(self, input_ids: np.ndarray, pool: KVPool, slot_start: int, past: np.ndarray) -> tuple[int, int]:
        B, T = check_tokens(input_ids, self.vocab_size)
        check_rows(pool, slot_start, past, B)
        if past.min() < 0 or int(past.max()) + T > pool.max_length:
            raise ValueError(f"past_lengths + new tokens must be in [{T}, {pool.max_length}] "
                             f"(the pool's max_length), got past_lengths {past.tolist()} + {T}")
        if B > self.max_batch:
            raise ValueError(f"batch of {B} rows exceeds the engine's largest profile batch {self.max_batch}")
        return B, T
