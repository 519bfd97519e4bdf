"""POST /v1/chat/completions: messages -> the chat template -> one generation per choice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Optional

from serving.openai.chat_template import TemplateError, render
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
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    TokenLogprob,
    Usage,
    new_id,
    now,
)

ROLES = ("system", "developer", "user", "assistant")
MESSAGE_FIELDS = ("role", "content", "name")


def messages_of(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the template sees them ({"role", "content": str}); 400 for what is not text."""
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        extra = sorted(set(m.model_extra or {}) - set(MESSAGE_FIELDS))
        if extra:
            raise not_supported(f"{where}.{extra[0]}")
        if m.role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {m.role!r}"
                              + (" (tool messages are not supported)" if m.role in ("tool", "function") else ""),
                              f"{where}.role")
        if m.content is None:
            raise bad_request(f"{where}.content is required", f"{where}.content")
        if isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for j, part in enumerate(m.content):
                kind = part.get("type")
                if kind != "text":
                    raise not_supported(f"{where}.content[{j}].type", f"{kind!r} (only 'text' parts)")
                if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}}",
                                      f"{where}.content[{j}]")
                parts.append(part["text"])
            text = "".join(parts)
        name = (m.model_extra or {}).get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request(f"{where}.name must be a string", f"{where}.name")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text,
                    **({"name": name} if name is not None else {})})
    return out


def _check_unsupported(req: ChatCompletionRequest) -> None:
    for name in ("tools", "functions", "function_call", "parallel_tool_calls"):
        if getattr(req, name):
            raise not_supported(name)
    if req.tool_choice not in (None, "none"):
        raise not_supported("tool_choice")
    fmt = req.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise not_supported("response_format", f"of type {fmt.get('type')!r} (only 'text')")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")


def _token_logprobs(tokens: list[Token]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[TokenLogprob(token=t.text, logprob=t.logprob if t.logprob is not None else 0.0,
                                                bytes=list(t.text.encode("utf-8")),
                                                top_logprobs=_alternatives(t)) for t in tokens])


def _alternatives(token: Token) -> list[dict[str, Any]]:
    """OpenAI's top_logprobs entries of one token: the N most likely, most likely first."""
    return [{"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            for text, logprob in token.top_logprobs or ()]


async def create_chat_completion(req: ChatCompletionRequest, engine: Engine, metrics: Metrics, model: str,
                                 template: str):
    _check_unsupported(req)
    messages = messages_of(req)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = await engine.context_length()
    try:
        text = render(template, messages, add_generation_prompt=req.add_generation_prompt,
                      bos_token="", eos_token=await engine.eos_token())
    except TemplateError as e:
        raise bad_request(str(e), "messages") from None
    asked = req.max_completion_tokens or req.max_tokens
    ids = await engine.encode(text, param="messages", max_tokens=asked or 1, max_tokens_field=field)
    # no max_tokens: as much as the context leaves (OpenAI's default for chat)
    max_tokens = asked or max(1, limit - len(ids))
    sampling = sampling_of(req, max_tokens=max_tokens, logprobs=req.logprobs,
                           top_logprobs=req.top_logprobs or 0, max_tokens_field=field)
    await engine.check_prompt(ids, sampling, param="messages", max_tokens_field=field)
    timer = Timer(metrics)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return framed(await first_or_error(_stream(req, engine, ids, sampling, timer, metrics, model, include_usage)))
    choices: list[Choice] = await run_choices(engine, [ids], sampling, req.n, timer)
    completion_tokens = sum(len(c.tokens) for c in choices)
    metrics.tokens(len(ids), completion_tokens)
    return ChatCompletionResponse(
        id=new_id("chatcmpl"), created=now(), model=model,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                            logprobs=_token_logprobs(c.tokens) if req.logprobs else None)
                 for i, c in enumerate(choices)],
        usage=Usage.of(len(ids), completion_tokens))


def _stream(req: ChatCompletionRequest, engine: Engine, ids: list[int], sampling: Any, timer: Timer,
            metrics: Metrics, model: str, include_usage: bool) -> AsyncIterator[str]:
    rid, created = new_id("chatcmpl"), now()

    write = ChunkWriter({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model},
                        include_usage)

    def chunk(index: int, delta: dict[str, str], finish: Optional[str] = None,
              logprobs: Optional[ChoiceLogprobs] = None) -> str:
        # the finish chunk's delta is {}
        return write({"index": index, "delta": delta, "logprobs": logprobs.model_dump() if logprobs else None,
                      "finish_reason": finish})

    async def events() -> AsyncIterator[str]:
        started: set[int] = set()
        completion_tokens = 0
        async for index, token in stream_choices(engine, [ids], sampling, req.n):
            timer.token()
            completion_tokens += 1
            logprobs = _token_logprobs([token]) if req.logprobs else None
            if index not in started:  # the role, only in a choice's first delta
                started.add(index)
                yield chunk(index, {"role": "assistant", "content": token.text}, logprobs=logprobs)
            elif token.text or logprobs is not None:
                yield chunk(index, {"content": token.text}, logprobs=logprobs)
            if token.finish_reason:
                yield chunk(index, {}, token.finish_reason)
        metrics.tokens(len(ids), completion_tokens)
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": Usage.of(len(ids), completion_tokens).model_dump(),
                       "system_fingerprint": None})

    return events()
