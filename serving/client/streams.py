"""The iterators of text deltas that generate(..., stream=True) returns (blocking and asyncio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional

from serving.generation import GenerationResult, TokenEvent, collect


class _Deltas:
    """What both iterators keep: the events seen so far and, once exhausted, the result."""

    def __init__(self, events: Any, *, return_logprobs: bool) -> None:
        self._events = events
        self._seen: list[TokenEvent] = []
        self._return_logprobs = return_logprobs
        self.result: Optional[GenerationResult] = None

    def _delta(self, event: TokenEvent) -> str:
        """The event's text delta ("" while a character's bytes are incomplete)."""
        self._seen.append(event)
        return event.text

    def _exhausted(self) -> None:
        if self.result is None:
            self.result = collect(self._seen, return_logprobs=self._return_logprobs)


class TextStreamIterator(_Deltas):
    """Iterator of text deltas of one generation (``generate(..., stream=True)``).

    Closing it (``close()``, leaving a ``with`` block, or dropping it) stops the generation
    and frees the server's slot. Once exhausted, ``result`` holds the GenerationResult.
    """

    def __init__(self, events: Iterator[TokenEvent], *, return_logprobs: bool) -> None:
        super().__init__(events, return_logprobs=return_logprobs)

    def __iter__(self) -> TextStreamIterator:
        return self

    def __next__(self) -> str:
        for event in self._events:
            if self._delta(event):
                return event.text
        self._exhausted()
        raise StopIteration

    def events_so_far(self) -> list[TokenEvent]:
        return list(self._seen)

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextStreamIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextStreamIterator(_Deltas):
    """Async iterator of text deltas (``AsyncClient.generate(..., stream=True)``)."""

    def __init__(self, events: AsyncIterator[TokenEvent], *, return_logprobs: bool) -> None:
        super().__init__(events, return_logprobs=return_logprobs)

    def __aiter__(self) -> AsyncTextStreamIterator:
        return self

    async def __anext__(self) -> str:
        async for event in self._events:
            if self._delta(event):
                return event.text
        self._exhausted()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncTextStreamIterator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
