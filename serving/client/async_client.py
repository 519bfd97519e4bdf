"""AsyncClient: the asyncio client (await one prompt, several run concurrently, or async-iterate text deltas)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Optional, Union

from serving import tensors
from serving.client.base import _TOKENIZER_FILES, _ClientBase
from serving.client.failover import (
    Endpoints,
    _async_failover_server_events,
    _async_failover_step,
    _atagged,
    _none_answered,
)
from serving.client.request import (
    DEFAULT_QUEUE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    Mode,
    Protocol_,
    _check_ids,
    _Request,
    _validate,
)
from serving.client.server_mode import _generate_inputs
from serving.client.step import _async_with_busy_retry
from serving.client.streams import AsyncTextStreamIterator
from serving.client.transport_async_grpc import _AsyncGrpcTransport
from serving.client.transport_async_http import _AsyncHttpTransport
from serving.generation import Generation, GenerationResult, GptpipeError, TokenEvent, agenerate_tokens, collect


class AsyncClient(_ClientBase):
    """The asyncio client. ``await client.generate(...)`` gives a GenerationResult (a list for
    several prompts, run concurrently); ``client.generate(..., stream=True)`` is an async
    iterator of text deltas. Arguments are validated when generate() is called. url and
    failover: one Triton or several replicas, as for :class:`serving.Client`."""

    def __init__(self, url: Optional[Endpoints] = None, protocol: Protocol_ = "grpc", model: str = tensors.GPT_MODEL,
                 tokenizer: Union[str, Path, None] = None, *, generate_model: str = tensors.GENERATE_MODEL,
                 tokenizer_model: str = tensors.TOKENIZER_MODEL, timeout_s: float = DEFAULT_TIMEOUT_S,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S, failover: Optional[bool] = None) -> None:
        super().__init__(url, protocol, model, tokenizer, generate_model=generate_model,
                         tokenizer_model=tokenizer_model, timeout_s=timeout_s, queue_timeout=queue_timeout,
                         failover=failover)
        self._async_setup_lock: Optional[asyncio.Lock] = None

    def _new_transport(self, endpoint: str):
        transport = _AsyncGrpcTransport if self.protocol == "grpc" else _AsyncHttpTransport
        return transport(endpoint, self.model, self.timeout_s)

    async def _ask(self, call):
        """await call(transport) on the one URL, or on the first healthy replica that answers."""
        errors: list[str] = []
        for endpoint in self._replicas.setup_order():
            try:
                return await call(self._replicas.transport(endpoint))
            except GptpipeError as e:
                self._replicas.not_answering(endpoint, errors, e)
        raise _none_answered(errors)

    def _setup(self) -> None:
        if self._tokenizer is None or self._config is None:
            raise GptpipeError("AsyncClient: await client.setup() (or a generate call) first")

    async def setup(self) -> None:
        """Fetch the tokenizer and generation config (generate() does it on first use)."""
        if self._is_set_up():
            return
        if self._async_setup_lock is None:
            self._async_setup_lock = asyncio.Lock()
        async with self._async_setup_lock:
            if self._is_set_up():
                return
            tokenizer, config = self._local_tokenizer()
            files = None
            if tokenizer is None or config is None:
                files = await self._ask(lambda t: t.infer_bytes(self.tokenizer_model, _TOKENIZER_FILES))
            self._keep(tokenizer, config, files)

    def generate(self, prompt: Union[str, list[str]], *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Union[str, Sequence[str]] = (), seed: Optional[int] = None, stream: bool = False,
                 mode: Mode = "client", return_logprobs: bool = False, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0):
        request = _validate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                            stream=stream, mode=mode, return_logprobs=return_logprobs,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        if request.stream:
            return AsyncTextStreamIterator(self._stream_events(request), return_logprobs=request.return_logprobs)
        return self._generate(request)

    async def events(self, prompt: Union[str, Sequence[int]], *, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, stop: Union[str, Sequence[str]] = (),
                     seed: Optional[int] = None, mode: Mode = "client", return_logprobs: bool = False,
                     ignore_eos: bool = False, presence_penalty: float = 0.0,
                     frequency_penalty: float = 0.0, min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                     top_logprobs: int = 0) -> AsyncIterator[TokenEvent]:
        """:meth:`Client.events` for asyncio: the TokenEvents of one generation (a text prompt
        or token ids). Arguments, the prompt's length included, are checked before it returns;
        ``aclose()`` the iterator to stop early (the sequence's END is sent)."""
        prompt_ids = None if isinstance(prompt, str) else _check_ids(prompt)
        request = _validate(prompt if prompt_ids is None else "<ids>", max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop, seed=seed, stream=True, mode=mode,
                            return_logprobs=return_logprobs, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty)
        await self.setup()
        generation = self._generations(request, prompt_ids=prompt_ids, ignore_eos=ignore_eos,
                                       min_tokens=min_tokens, stop_token_ids=stop_token_ids,
                                       top_logprobs=top_logprobs)[0]
        await self._check_step_model(request)
        return self._events(generation, request)

    async def _check_step_model(self, request: _Request) -> None:
        if request.mode == "client" and self._step_model is None:
            self._step_model = await self._ask(lambda t: t.step_model(self.model))

    async def _stream_events(self, request: _Request) -> AsyncIterator[TokenEvent]:
        await self.setup()
        generations = self._generations(request)
        await self._check_step_model(request)
        events = self._events(generations[0], request)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _generate(self, request: _Request):
        await self.setup()
        generations = self._generations(request)
        await self._check_step_model(request)

        async def run_one(generation: Generation) -> GenerationResult:
            events = self._events(generation, request)
            try:
                return collect([e async for e in events], return_logprobs=request.return_logprobs)
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        slots = asyncio.Semaphore(self._slots())

        async def limited(generation: Generation) -> GenerationResult:
            async with slots:
                return await run_one(generation)

        results = await asyncio.gather(*(limited(g) for g in generations))
        return results[0] if request.single else list(results)

    def _events(self, generation: Generation, request: _Request) -> AsyncIterator[TokenEvent]:
        if request.mode == "server":
            inputs = _generate_inputs(generation, request)
            if not self._replicas.routed:
                return self._transport.server_events(self.generate_model, inputs)
            return _async_failover_server_events(
                self._route(), self._continuation(generation, request, inputs),
                lambda url, i: self._replicas.transport(url).server_events(self.generate_model, i))
        if not self._replicas.routed:
            return agenerate_tokens(_async_with_busy_retry(self._sequence(generation), self.queue_timeout),
                                    generation)
        route = self._route()
        step = _async_failover_step(route, generation, self._replica_sequence(generation, _async_with_busy_retry))
        return _atagged(agenerate_tokens(step, generation), route)

    async def close(self) -> None:
        self._replicas.close_router()
        for transport in self._replicas.transports():
            await transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
