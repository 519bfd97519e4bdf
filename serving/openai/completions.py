"""POST /v1/completions: prompts (text, texts, token ids, lists of ids) -> text_completion(s)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Optional

from serving.openai.common import (
    Choice,
    ChunkWriter,
    Timer,
    first_or_error,
    framed,
    run_choices,
    sampling_of,
    sse,
    stream_choices,
)
from serving.openai.engine import Engine, Token
from serving.openai.errors import bad_request, not_supported
from serving.openai.metrics import Metrics
from serving.openai.protocol import (
    MAX_PROMPTS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def prompts_of(prompt: Any) -> list[Any]:
    """The prompts of a request: each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                          f"lists of token ids (non-empty), got {type(prompt).__name__}", "prompt")
    if all(_is_id(x) for x in prompt):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}", "prompt")
    for i, p in enumerate(prompt):
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(x) for x in p))
        if not ok:
            raise bad_request(f"prompt[{i}] must be a string or a non-empty list of token ids", "prompt")
    return list(prompt)


async def create_completion(req: CompletionRequest, engine: Engine, metrics: Metrics, model: str):
    """A CompletionResponse, or (streaming) an async iterator of SSE strings."""
    if req.suffix:
        raise not_supported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise not_supported("best_of", "(other than n)")
    if req.echo and req.logprobs is not None:
        raise not_supported("echo", "with logprobs (prompt log-probs)")
    sampling = sampling_of(req, max_tokens=req.max_tokens or 16, logprobs=req.logprobs is not None,
                           top_logprobs=req.logprobs or 0)
    texts = prompts_of(req.prompt)
    prompts = [await engine.encode(p, param="prompt", max_tokens=sampling.max_tokens) if isinstance(p, str) else p
               for p in texts]
    for ids in prompts:
        await engine.check_prompt(ids, sampling, param="prompt")
    echoes = [(p if isinstance(p, str) else await engine.decode(p)) if req.echo else "" for p in texts]
    timer = Timer(metrics)
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _stream(req, engine, prompts, sampling, echoes, timer, metrics, model, prompt_tokens, include_usage)
        return framed(await first_or_error(events))
    choices = await run_choices(engine, prompts, sampling, req.n, timer)
    completion_tokens = sum(len(c.tokens) for c in choices)
    metrics.tokens(prompt_tokens, completion_tokens)
    return CompletionResponse(
        id=new_id("cmpl"), created=now(), model=model,
        choices=[_choice(i, c, echoes[i // req.n], req.logprobs is not None) for i, c in enumerate(choices)],
        usage=Usage.of(prompt_tokens, completion_tokens))


def _logprobs(tokens: Sequence[Token], offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs. top_logprobs (logprobs > 0): per token a {text: logprob} dict
    of the most likely tokens; two ids that decode to the same text keep the likelier one
    (as vLLM's dict does), so a dict may hold fewer than N entries."""
    out = CompletionLogprobs(top_logprobs=[] if tokens and tokens[0].top_logprobs is not None else None)
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        out.text_offset.append(offset)
        offset += len(t.text)
        if out.top_logprobs is not None:
            top: dict[str, float] = {}
            for text, logprob in t.top_logprobs or ():
                top.setdefault(text, logprob)
            out.top_logprobs.append(top)
    return out


def _choice(index: int, choice: Choice, echo: str, logprobs: bool) -> CompletionChoice:
    return CompletionChoice(index=index, text=echo + choice.text,
                            logprobs=_logprobs(choice.tokens, len(echo)) if logprobs else None,
                            finish_reason=choice.finish_reason)


def _stream(req: CompletionRequest, engine: Engine, prompts: list[list[int]], sampling: Any,
                  echoes: list[str], timer: Timer, metrics: Metrics, model: str, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    rid, created = new_id("cmpl"), now()
    offsets = [len(echoes[i // req.n]) for i in range(len(prompts) * req.n)]
    started: set[int] = set()
    completion_tokens = 0

    write = ChunkWriter({"id": rid, "object": "text_completion", "created": created, "model": model}, include_usage)

    def chunk(index: int, text: str, finish: Optional[str], logprobs: Optional[CompletionLogprobs] = None) -> str:
        return write({"index": index, "text": text, "logprobs": logprobs.model_dump() if logprobs else None,
                      "finish_reason": finish})

    async def events() -> AsyncIterator[str]:
        nonlocal completion_tokens
        async for index, token in stream_choices(engine, prompts, sampling, req.n):
            timer.token()
            completion_tokens += 1
            text = token.text
            if index not in started:
                started.add(index)
                text = echoes[index // req.n] + text
            logprobs = _logprobs([token], offsets[index]) if sampling.logprobs else None
            offsets[index] += len(token.text)
            if text or logprobs is not None:
                yield chunk(index, text, None, logprobs)
            if token.finish_reason:
                yield chunk(index, "", token.finish_reason)
        metrics.tokens(prompt_tokens, completion_tokens)
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": Usage.of(prompt_tokens, completion_tokens).model_dump(),
                       "system_fingerprint": None})

    return events()
