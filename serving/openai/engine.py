"""The frontend's one way to Triton: an AsyncClient, one generation per choice, errors mapped.

Every request is checked here before anything reaches Triton (prompt ids, context length);
every generation's events are read through ``generate``, which closes the client's iterator
on every way out, also when the HTTP client went away (the task is cancelled), so the
sequence's END is sent and its KV slot freed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from serving import AsyncClient, GptpipeError
from serving.openai.errors import OpenAIError, context_length_exceeded, from_client_error

logger = logging.getLogger(__name__)

Loop = Literal["client", "server"]
FINISH = {"length": "length", "stop": "stop", "eos": "stop"}  # gptpipe -> OpenAI


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings, in the client's terms."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (implies logprobs)
    min_tokens: int = 0
    ignore_eos: bool = False
    fields: Sequence[str] = field(default=(), compare=False)  # the request's field names, for errors


@dataclass
class Token:
    """One generated token as the handlers see it."""

    token_id: int
    text: str
    logprob: Optional[float]
    finish_reason: Optional[str]  # OpenAI's: "stop" | "length" | None
    latency_s: float
    top_logprobs: Optional[list[tuple[str, float]]] = None  # (token text, logprob), most likely first


class Engine:
    """Owns the AsyncClient (created in the serving event loop) and the model facts."""

    def __init__(self, url: str, *, loop: Loop = "client", queue_timeout: float = 30.0,
                 timeout_s: float = 60.0) -> None:
        self.url, self.loop, self.queue_timeout, self.timeout_s = url, loop, queue_timeout, timeout_s
        self._client: Optional[AsyncClient] = None
        self._max_token_bytes: Optional[int] = None

    async def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(self.url, timeout_s=self.timeout_s, queue_timeout=self.queue_timeout)
        try:
            await self._client.setup()
        except GptpipeError as e:
            raise from_client_error(e) from None
        except Exception as e:  # noqa: BLE001 - grpc errors before any generation: unreachable
            raise OpenAIError(503, f"the Triton server at {self.url} is unavailable: {e}",
                              type="server_unavailable", code="backend_unavailable",
                              headers={"Retry-After": "1"}) from None
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def encode(self, text: str, *, param: str, max_tokens: int, max_tokens_field: str = "max_tokens"
                     ) -> list[int]:
        """Token ids of ``text``, in a worker thread (a long prompt must not stall the event
        loop). A text with more UTF-8 bytes than the context's tokens can hold (a token has at
        most ``max_token_bytes`` bytes) is refused at once, without tokenizing it."""
        client = await self.client()
        limit = client.generation_config.n_positions
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > limit * await self.max_token_bytes():
            least = -(-size // await self.max_token_bytes())
            raise context_length_exceeded(prompt_tokens=least, max_tokens=max_tokens, limit=limit, param=param,
                                          max_tokens_field=max_tokens_field, at_least=True)
        return await asyncio.to_thread(client.tokenizer.encode, text)

    async def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token of the vocabulary decodes to (computed once)."""
        if self._max_token_bytes is None:
            tokenizer = (await self.client()).tokenizer
            self._max_token_bytes = await asyncio.to_thread(
                lambda: max(len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)))
        return max(1, self._max_token_bytes)

    async def decode(self, ids: Sequence[int]) -> str:
        return (await self.client()).tokenizer.decode(list(ids))

    async def eos_token(self) -> str:
        client = await self.client()
        eos = client.generation_config.eos_token_id
        return "" if eos is None else client.tokenizer.decode([eos])

    async def context_length(self) -> int:
        return (await self.client()).generation_config.n_positions

    async def check_prompt(self, ids: Sequence[int], sampling: Sampling, *, param: str,
                           max_tokens_field: str = "max_tokens") -> None:
        client = await self.client()
        config = client.generation_config
        if not ids:
            raise OpenAIError(400, f"{param} is empty: it needs at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise OpenAIError(400, f"{param}: token ids must be in [0, {config.vocab_size}), got {bad[0]}",
                              param=param)
        if len(ids) + sampling.max_tokens > config.n_positions:
            raise context_length_exceeded(prompt_tokens=len(ids), max_tokens=sampling.max_tokens,
                                          limit=config.n_positions, param=param,
                                          max_tokens_field=max_tokens_field)
        for t in sampling.stop_token_ids:
            if not 0 <= t < config.vocab_size:
                raise OpenAIError(400, f"stop_token_ids: token ids must be in [0, {config.vocab_size}), got {t}",
                                  param="stop_token_ids")

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling, *, seed_offset: int = 0,
                       ) -> AsyncIterator[Token]:
        """The tokens of one choice. Raises OpenAIError.

        The client's iterator runs in a task of its own: when this generator is cancelled (the
        HTTP client went away; Starlette cancels the response's task group, and keeps
        cancelling at every await), that task is told to stop: it lets the step in flight
        answer, then closes the iterator, whose END step (on the same stream) frees the KV
        slot. (Cancelling the step in flight instead made the END race it on a new stream,
        and the slot could stay taken until the idle timeout.)

        min_tokens and stop_token_ids run in the generation loop (either one). A request with
        top_logprobs runs on the client-side loop even when this frontend drives the
        server-side one: the `generate` model streams only the chosen tokens' log-probs, and
        the alternatives need the logits, which the client-side loop has at every step."""
        client = await self.client()
        seed = None if sampling.seed is None else sampling.seed + seed_offset
        mode: Loop = "client" if sampling.top_logprobs else self.loop
        try:
            events = await client.events(
                list(prompt_ids), max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                stop=sampling.stop, seed=seed, mode=mode, return_logprobs=sampling.logprobs,
                ignore_eos=sampling.ignore_eos, presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty, min_tokens=sampling.min_tokens,
                stop_token_ids=sorted(sampling.stop_token_ids), top_logprobs=sampling.top_logprobs)
        except GptpipeError as e:
            raise from_client_error(e, fields=sampling.fields) from None
        queue: asyncio.Queue = asyncio.Queue()
        stop = asyncio.Event()
        pump = _background(_pump(events, queue, stop))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, GptpipeError):
                    raise from_client_error(item, fields=sampling.fields)
                if isinstance(item, BaseException):
                    raise item
                finish = FINISH.get(item.finish_reason) if item.finish_reason else None
                top = None if item.top_logprobs is None else \
                    [(client.tokenizer.decode([i]), lp) for i, lp in item.top_logprobs]
                yield Token(item.token_id, item.text, item.logprob, finish, item.latency_s, top)
        finally:
            stop.set()  # the pump closes the client's iterator after the step in flight


_DONE = object()
_TASKS: set[asyncio.Task] = set()  # running pumps (asyncio keeps only weak references)


def _background(coro: Any) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task


async def _pump(events: AsyncIterator[Any], queue: asyncio.Queue, stop: asyncio.Event,
                timeout_s: float = 120.0) -> None:
    try:
        async for event in events:
            if stop.is_set():
                break  # the reader is gone
            queue.put_nowait(event)
        else:
            queue.put_nowait(_DONE)
    except BaseException as e:  # noqa: BLE001 - handed to the reader
        queue.put_nowait(e)
    finally:
        # END (or nothing, when the generation finished); bounded, like every wait
        await asyncio.wait_for(events.aclose(), timeout_s)  # type: ignore[attr-defined]


async def merge(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as items arrive; the first error is raised
    and the other streams are cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, _DONE))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, e))

    tasks = [_background(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def until_disconnected(request: Any, coro: Any, *, poll_s: float = 0.25) -> Any:
    """Await ``coro``; cancel it if the HTTP client disconnects first (a non-streamed request:
    its generations stop and free their slots)."""
    task = _background(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise OpenAIError(499, "the client closed the connection", type="client_closed")
