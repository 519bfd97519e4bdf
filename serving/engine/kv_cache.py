"""The preallocated KV pool: one key and one value buffer per layer, (max_sequences, nh, max_length,
hs) each, allocated once; a sequence owns one slot (a row) from start to end. The element type is
the graph's: float32, float16, or int8 for an export with `--kv-cache-dtype int8` (the graph holds
the per-channel scales and quantizes each step's new keys and values itself).

The static-cache ONNX graph updates these buffers in place: the runtime binds a contiguous slot
range `keys[l][s:s+B]` (a view, rows are the leading axis) as both the past input and the present
output, and GroupQueryAttention writes each row's new keys and values at its next positions. No
step copies a cache, and no step allocates one. (gpt-fast's KVCache, with slots for sequences.)

`lengths[slot]` is the number of valid positions of a slot; the caller (the scheduler) advances it
after a step, the runtime never does. Positions at and beyond `lengths[slot]` hold garbage (stale
tokens of a freed sequence, dummy tokens of a ride-along row) that is never attended to.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class PoolFullError(RuntimeError):
    """Every slot of the pool holds a sequence."""


class KVPool:
    def __init__(self, *, n_layer: int, n_head: int, head_dim: int, max_sequences: int,
                 max_length: int, dtype: str | np.dtype = "float32") -> None:
        for name, value in (("n_layer", n_layer), ("n_head", n_head), ("head_dim", head_dim),
                            ("max_sequences", max_sequences), ("max_length", max_length)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVPool.{name} must be a positive int, got {value!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype("float32"), np.dtype("float16"), np.dtype("int8")):
            raise ValueError(f"KVPool.dtype must be float32, float16 or int8 (the quantized cache), got {self.dtype}")
        self.n_layer, self.n_head, self.head_dim = int(n_layer), int(n_head), int(head_dim)
        self.max_sequences, self.max_length = int(max_sequences), int(max_length)
        shape = (self.max_sequences, self.n_head, self.max_length, self.head_dim)
        # np.zeros maps zeroed pages lazily: a large pool costs memory only as slots fill up
        self.keys = [np.zeros(shape, self.dtype) for _ in range(self.n_layer)]  # (S, nh, MAX, hs)
        self.values = [np.zeros(shape, self.dtype) for _ in range(self.n_layer)]
        self.lengths = np.zeros(self.max_sequences, dtype=np.int64)  # valid positions per slot
        self._in_use = np.zeros(self.max_sequences, dtype=bool)
        logger.info("KV pool: %d sequences x %d positions, %d layers, %.1f MiB",
                    self.max_sequences, self.max_length, self.n_layer, self.nbytes / 2**20)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of each layer's key (and value) buffer: (max_sequences, nh, max_length, hs)."""
        return (self.max_sequences, self.n_head, self.max_length, self.head_dim)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    @property
    def active(self) -> tuple[int, ...]:
        """The slots that hold a sequence, ascending."""
        return tuple(int(s) for s in np.flatnonzero(self._in_use))

    @property
    def free_slots(self) -> tuple[int, ...]:
        """The slots that are free, ascending."""
        return tuple(int(s) for s in np.flatnonzero(~self._in_use))

    def allocate(self) -> int:
        """Take the lowest free slot (low slots keep decode batches' slot ranges short); its
        length starts at 0."""
        free = np.flatnonzero(~self._in_use)
        if len(free) == 0:
            raise PoolFullError(
                f"KV pool full: {self.max_sequences} of {self.max_sequences} sequences active")
        slot = int(free[0])
        self._in_use[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back. Its buffers are not cleared: nothing reads past `lengths`."""
        self._check_slot(slot)
        if not self._in_use[slot]:
            raise ValueError(f"slot {slot} is not in use")
        self._in_use[slot] = False
        self.lengths[slot] = 0

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.max_sequences:
            raise ValueError(f"slot must be an int in [0, {self.max_sequences}), got {slot!r}")

    def __repr__(self) -> str:
        return (f"KVPool({len(self.active)} of {self.max_sequences} sequences active, "
                f"max_length={self.max_length}, n_layer={self.n_layer}, dtype={self.dtype})")
