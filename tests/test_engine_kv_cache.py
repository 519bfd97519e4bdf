"""serving/engine/kv_cache.py: the KV pool's slots and its memory, allocated once."""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine.kv_cache import KVPool, PoolFullError


def small_pool(**overrides) -> KVPool:
    kwargs = dict(n_layer=2, n_head=4, head_dim=16, max_sequences=3, max_length=32, dtype="float32")
    return KVPool(**{**kwargs, **overrides})


def test_pool_allocates_lowest_free_slot_and_reports_full() -> None:
    pool = small_pool()
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.active == (0, 1, 2) and pool.free_slots == ()
    with pytest.raises(PoolFullError, match="3 of 3 sequences active"):
        pool.allocate()
    pool.lengths[1] = 7
    pool.free(1)
    assert pool.lengths[1] == 0 and pool.free_slots == (1,) and pool.active == (0, 2)
    assert pool.allocate() == 1
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 3\), got 3"):
        pool.free(3)
    pool.free(2)
    with pytest.raises(ValueError, match="slot 2 is not in use"):
        pool.free(2)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_pool_memory_is_allocated_once(dtype) -> None:
    pool = small_pool(dtype=dtype)
    assert pool.shape == (3, 4, 32, 16)
    assert all(k.shape == pool.shape and k.dtype == np.dtype(dtype) and k.flags.c_contiguous for k in pool.keys + pool.values)
    assert pool.nbytes == 2 * 2 * 3 * 4 * 32 * 16 * np.dtype(dtype).itemsize
    pointers = [a.ctypes.data for a in pool.keys + pool.values]
    for _ in range(3):
        pool.free(pool.allocate())
    assert [a.ctypes.data for a in pool.keys + pool.values] == pointers


@pytest.mark.parametrize("field, value", [("max_sequences", 0), ("max_length", -1), ("n_layer", 1.5),
                                          ("dtype", "int16")])
def test_pool_rejects_bad_sizes(field, value) -> None:
    with pytest.raises(ValueError, match=field if field != "dtype" else "dtype"):
        small_pool(**{field: value})
