"""What the benchmark reports while it runs (`Progress`; the CLI draws it with rich), and `timed`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """What the benchmark reports while it runs (the CLI draws it with rich)."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        logger.info("%s (%d)", description, total)

    def advance(self, n: int = 1) -> None:
        pass


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """`with timed() as elapsed: ...; elapsed()` -> seconds since the block began."""
    t0 = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - t0
    end.append(time.perf_counter())
