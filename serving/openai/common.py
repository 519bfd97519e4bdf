"""What the completions and chat handlers share: sampling settings from a request, running n
choices (gathered, or merged as they stream), usage, and server-sent-event framing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from serving.openai.engine import Engine, Sampling, Token, merge
from serving.openai.errors import OpenAIError, bad_request, not_supported
from serving.openai.metrics import Metrics
from serving.openai.protocol import MAX_STOP, _Sampling

DONE_EVENT = "data: [DONE]\n\n"


def sampling_of(req: _Sampling, *, max_tokens: int, logprobs: bool, top_logprobs: int = 0,
                max_tokens_field: str = "max_tokens") -> Sampling:
    """Sampling for a validated request; 400 for what this server does not do."""
    if req.logit_bias:
        raise not_supported("logit_bias")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens must be <= {max_tokens_field} ({max_tokens}), got {req.min_tokens}",
                          "min_tokens")
    stop = req.stop
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop: at most {MAX_STOP} stop sequences, got {len(stops)}", "stop")
    for i, s in enumerate(stops):
        if not s:
            raise bad_request(f"stop[{i}] is empty: a stop sequence needs at least one character", "stop")
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=stops,
        stop_token_ids=frozenset(req.stop_token_ids or ()),
        seed=req.seed,
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        fields=tuple(type(req).model_fields),
    )


@dataclass
class Choice:
    """One finished choice."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: Optional[str] = None


class Timer:
    """TTFT of a request: the first token of any of its choices."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.start, self.seen = metrics, time.perf_counter(), False

    def token(self) -> None:
        if not self.seen:
            self.seen = True
            self.metrics.first_token(time.perf_counter() - self.start)


async def run_choices(engine: Engine, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int,
                      timer: Timer) -> list[Choice]:
    """Every choice of a non-streamed request (prompt i's choice j at index i * n + j), run
    concurrently; the first error cancels the rest."""
    async def one(ids: Sequence[int], j: int) -> Choice:
        choice = Choice()
        async for token in engine.generate(ids, sampling, seed_offset=j):
            timer.token()
            choice.tokens.append(token)
            choice.text += token.text
            choice.finish_reason = token.finish_reason or choice.finish_reason
        return choice

    tasks = [asyncio.ensure_future(one(ids, j)) for ids in prompts for j in range(n)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def stream_choices(engine: Engine, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int
                         ) -> AsyncIterator[tuple[int, Token]]:
    """(choice index, token) of every choice as they come (one choice: no merging queue)."""
    if len(prompts) * n == 1:
        async for token in engine.generate(prompts[0], sampling):
            yield 0, token
        return
    async for item in merge([engine.generate(ids, sampling, seed_offset=j) for ids in prompts for j in range(n)]):
        yield item


class ChunkWriter:
    """SSE chunks of one stream, formatted by hand: per token only the choice is serialised
    (a pydantic model per token cost a measurable share of the frontend's time per token).
    The output is the same JSON the response models give."""

    def __init__(self, head: dict[str, Any], include_usage: bool) -> None:
        self.head = "data: " + json.dumps(head)[:-1] + ', "choices": ['
        self.tail = "]" + (', "usage": null' if include_usage else "") + ', "system_fingerprint": null}\n\n'

    def __call__(self, choice: dict[str, Any]) -> str:
        return self.head + json.dumps(choice) + self.tail


def sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def framed(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE body: the events, an error event if one comes up mid-stream, then [DONE]."""
    try:
        async for event in events:
            yield event
    except OpenAIError as e:
        yield e.sse()
    yield DONE_EVENT


async def first_or_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Start ``events`` before the HTTP status is sent, so that an error found before the first
    token (busy, prompt too long, bad token id) is a plain JSON error with its status."""
    iterator = events.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[str]:
        if first is not None:
            yield first
        async for event in iterator:
            yield event

    return rest()
