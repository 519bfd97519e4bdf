"""Decoupled BLS calls from a python-backend stub, safe on Triton 2.51: finished iterators held until the stub lets go.

Why: in the python backend of Triton 2.51 (r24.10, what the nvidia-pytriton wheel ships) a
decoupled BLS call's ResponseIterator is referenced twice, by the model's Python object and by
the stub's ``response_iterator_map_``. The last response enqueues a cleanup message; the stub's
single stub-to-parent utility thread then erases the map entry *without holding the GIL*. When
the model has already dropped its iterator, that erase is the last reference: the iterator, its
responses and their numpy arrays are freed without the GIL, which corrupts CPython's heap while
other threads run Python ("Segmentation fault" or "malloc(): unaligned fastbin chunk detected"
in the stub, the model then dead). The busier that utility thread (every ``is_cancelled()`` is a
round trip through it), the likelier. Fixed upstream in python_backend #390 (25.01): PbTensor's
destructor takes the GIL.

The workaround: :meth:`RetiredIterators.hold` keeps each finished iterator referenced. The
utility thread serves its queue in order, so once an ``is_cancelled()`` that was queued after an
iterator's cleanup has come back (answered False: a True is cached in the stub and makes no round
trip) the stub has erased its entry, and the iterator can be dropped here, under the GIL. The
reproduction (tests/test_stub_bls.py, 16 threads of decoupled BLS calls): without the hold the
stub died (7) or hung (1) in 8 of 8 runs of up to 64,000 calls; with it, in none of 8.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Iterable, Iterator


class RetiredIterators:
    """Finished decoupled-BLS response iterators, each held until a later cancellation round
    trip proves the stub has erased its own reference (then it is dropped here, with the GIL)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: deque[tuple[int, Any]] = deque()
        self._seq = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def hold(self, iterator: Any) -> None:
        """Keep ``iterator`` (fully consumed: its cleanup is queued in the stub) referenced."""
        with self._lock:
            self._seq += 1
            self._held.append((self._seq, iterator))

    def mark(self) -> int:
        """The newest held iterator; call it before a round trip through the stub's utility thread."""
        with self._lock:
            return self._seq

    def release_through(self, mark: int) -> int:
        """Drop the iterators held up to ``mark`` (a round trip queued after their cleanups came
        back); returns how many."""
        with self._lock:
            n = 0
            while self._held and self._held[0][0] <= mark:
                self._held.popleft()
                n += 1
        return n

    def is_cancelled(self, check: Callable[[], bool]) -> bool:
        """``check()`` (a response sender's or request's ``is_cancelled``) as a fence: False came
        through the stub's utility thread, so what was held before the call can go."""
        mark = self.mark()
        cancelled = bool(check())
        if not cancelled:
            self.release_through(mark)
        return cancelled

    def exec_decoupled(self, request: Any) -> Iterable[Any]:
        """``request.exec(decoupled=True)``'s responses, as a list; the iterator is held."""
        iterator = request.exec(decoupled=True)
        responses = list(iterator)
        self.hold(iterator)
        return responses

    def stream_decoupled(self, request: Any) -> Iterator[Any]:
        """``request.exec(decoupled=True)``'s responses as they come (a streaming generation);
        the iterator is held once the loop leaves it."""
        iterator = request.exec(decoupled=True)
        try:
            yield from iterator
        finally:
            self.hold(iterator)
