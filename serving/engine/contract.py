"""The `step()` contract every runtime keeps: the `Runtime` protocol (what the scheduler and the
`gpt` model use) and the argument checks `OrtRuntime` and the paged (TensorRT) runtime share.

Below both runtimes: numpy and the KV pool only. The contract itself (rows, ride-along dummy
rows, `step` never changing `pool.lengths`) is spelled out in serving/engine/runtime.py.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np

from serving import tensors
from serving.engine.kv_cache import KVPool

# TensorRT engine files, by suffix (the runtime loader, `serve --docker` and build-engine agree)
TENSORRT_SUFFIXES = (".plan", ".engine")


class GraphInfo(Protocol):
    """What a runtime (or the engine under it) knows about its graph."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    kv_dtype: np.dtype
    logits_dtype: np.dtype


class Runtime(GraphInfo, Protocol):
    """An engine behind one `step()`: `OrtRuntime` (.onnx) and `TrtRuntime` (.plan / .engine)."""

    kv_cache: tensors.KVCache

    def new_pool(self, *, max_sequences: int, max_length: int) -> KVPool: ...

    def step(self, input_ids: np.ndarray, *, pool: KVPool, slot_start: int,
             past_lengths: np.ndarray | Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray: ...


def check_tokens(input_ids: np.ndarray, vocab_size: int) -> tuple[int, int]:
    """(B, T) of a step's input_ids (B >= 1 rows of T >= 1 ids, each in [0, vocab_size))."""
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch >= 1, tokens >= 1), got shape {input_ids.shape}")
    B, T = input_ids.shape
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must be in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return B, T


def check_pool(pool: KVPool, *, n_layer: int, n_head: int, head_dim: int, kv_dtype: np.dtype, owner: str) -> None:
    """The pool is shaped and typed for this runtime's graph (`owner`: "graph" or "engine")."""
    if (pool.n_layer, pool.n_head, pool.head_dim) != (n_layer, n_head, head_dim):
        raise ValueError(
            f"pool shape (n_layer, n_head, head_dim) = {(pool.n_layer, pool.n_head, pool.head_dim)} "
            f"does not match the {owner}'s {(n_layer, n_head, head_dim)}")
    if pool.dtype != kv_dtype:
        raise ValueError(f"pool dtype {pool.dtype} does not match the {owner}'s KV dtype {kv_dtype}")


def check_rows(pool: KVPool, slot_start: int, past: np.ndarray, B: int) -> None:
    """Rows [slot_start, slot_start + B) lie in the pool, with one past length each."""
    if not isinstance(slot_start, (int, np.integer)) or slot_start < 0 or slot_start + B > pool.max_sequences:
        raise ValueError(f"slots [slot_start, slot_start + batch) = [{slot_start}, {slot_start} + {B}) "
                         f"must lie in [0, {pool.max_sequences})")
    if past.shape != (B,):
        raise ValueError(f"past_lengths must have shape (batch,) = ({B},), got {past.shape}")
