"""Client: the blocking, thread-safe client (one prompt, several at once on threads, or a stream of text deltas)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Optional, Union

from serving import tensors
from serving.client.base import _TOKENIZER_FILES, _ClientBase
from serving.client.failover import Endpoints, _failover_server_events, _failover_step, _none_answered, _tagged
from serving.client.request import (
    DEFAULT_QUEUE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    Mode,
    Protocol_,
    _check_ids,
    _Request,
    _validate,
)
from serving.client.server_mode import _generate_inputs, _grpc_server_events, _http_server_events
from serving.client.step import _with_busy_retry
from serving.client.streams import TextStreamIterator
from serving.client.transport_grpc import _GrpcTransport
from serving.client.transport_http import _HttpTransport
from serving.generation import (
    Generation,
    GenerationResult,
    GptpipeError,
    InvalidParameterError,
    TokenEvent,
    collect,
    generate_tokens,
)


class Client(_ClientBase):
    """A blocking client; thread-safe. See the docstring of serving.client.

    url: "host:port" (default localhost:8001 for gRPC, localhost:8000 for HTTP), or several
    Triton replicas: a list, "a:8001,b:8001", or a name that resolves to several addresses (a
    headless Service; re-resolved): each sequence stays on one replica and moves to another,
    re-prefilled, if its replica fails (serving.client.failover); failover: None decides by the
    number of endpoints, True routes even one (a name that may resolve to more later);
    model: the step model; tokenizer: a local folder/file instead of the server's `tokenizer`
    model; timeout_s: the most one step (or, in server mode, one token) may take;
    queue_timeout: how long a START refused with "server busy" is retried (0: raise
    ServerBusyError at once); max_concurrency: prompts of one call generated at once (threads;
    never more than the server has sequence slots).
    """

    def __init__(self, url: Optional[Endpoints] = None, protocol: Protocol_ = "grpc", model: str = tensors.GPT_MODEL,
                 tokenizer: Union[str, Path, None] = None, *, generate_model: str = tensors.GENERATE_MODEL,
                 tokenizer_model: str = tensors.TOKENIZER_MODEL, timeout_s: float = DEFAULT_TIMEOUT_S,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S, max_concurrency: int = 16,
                 failover: Optional[bool] = None) -> None:
        if max_concurrency < 1:
            raise InvalidParameterError(f"max_concurrency must be >= 1, got {max_concurrency}")
        super().__init__(url, protocol, model, tokenizer, generate_model=generate_model,
                         tokenizer_model=tokenizer_model, timeout_s=timeout_s, queue_timeout=queue_timeout,
                         failover=failover)
        self.max_concurrency = max_concurrency

    def _new_transport(self, endpoint: str):
        transport = _GrpcTransport if self.protocol == "grpc" else _HttpTransport
        return transport(endpoint, self.model, self.timeout_s)

    def _ask(self, call):
        """call(transport) on the one URL, or on the first healthy replica that answers."""
        errors: list[str] = []
        for endpoint in self._replicas.setup_order():
            try:
                return call(self._replicas.transport(endpoint))
            except GptpipeError as e:
                self._replicas.not_answering(endpoint, errors, e)
        raise _none_answered(errors)

    def _setup(self) -> None:
        if self._is_set_up():
            return
        with self._setup_lock:
            if self._is_set_up():
                return
            tokenizer, config = self._local_tokenizer()
            files = None
            if tokenizer is None or config is None:
                files = self._ask(lambda t: t.infer_bytes(self.tokenizer_model, _TOKENIZER_FILES))
            self._keep(tokenizer, config, files)

    # -------------------------------------------------------------- public

    def generate(self, prompt: Union[str, list[str]], *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Union[str, Sequence[str]] = (), seed: Optional[int] = None, stream: bool = False,
                 mode: Mode = "client", return_logprobs: bool = False, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0):
        """Generate from one prompt (-> GenerationResult), several (-> list, run concurrently),
        or stream one (-> TextStreamIterator of text deltas). temperature=0 is greedy."""
        request = _validate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                            stream=stream, mode=mode, return_logprobs=return_logprobs,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        self._setup()
        generations = self._generations(request)
        if request.stream:
            return TextStreamIterator(self._events(generations[0], request),
                                      return_logprobs=request.return_logprobs)
        if request.single:
            return collect(self._events(generations[0], request), return_logprobs=request.return_logprobs)
        return self._run_many(generations, request)

    def events(self, prompt: Union[str, Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               stop: Union[str, Sequence[str]] = (), seed: Optional[int] = None, mode: Mode = "client",
               return_logprobs: bool = False, ignore_eos: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, min_tokens: int = 0,
               stop_token_ids: Sequence[int] = (), top_logprobs: int = 0) -> Iterator[TokenEvent]:
        """The TokenEvents of one generation (token id, text delta, logprob, latency_s), for
        callers that want more than text: e.g. a benchmark, with a prompt of token ids and
        ignore_eos=True for exactly max_new_tokens tokens. Close it to stop early.
        vLLM's extras: ``min_tokens`` (eos and ``stop_token_ids`` are banned, and stop strings
        not looked for, before that many tokens), ``stop_token_ids`` (end the generation,
        finish "stop"), ``top_logprobs`` (each event's ``top_logprobs``: mode="client" only)."""
        prompt_ids = None if isinstance(prompt, str) else _check_ids(prompt)
        request = _validate(prompt if prompt_ids is None else "<ids>", max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop, seed=seed, stream=True, mode=mode,
                            return_logprobs=return_logprobs, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty)
        self._setup()
        generation = self._generations(request, prompt_ids=prompt_ids, ignore_eos=ignore_eos,
                                       min_tokens=min_tokens, stop_token_ids=stop_token_ids,
                                       top_logprobs=top_logprobs)[0]
        return self._events(generation, request)

    def close(self) -> None:
        self._replicas.close_router()
        for transport in self._replicas.transports():
            transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _events(self, generation: Generation, request: _Request) -> Iterator[TokenEvent]:
        if request.mode == "server":
            inputs = _generate_inputs(generation, request)
            run = _grpc_server_events if self.protocol == "grpc" else _http_server_events
            if not self._replicas.routed:
                return run(self.url, self.generate_model, inputs, self.timeout_s)
            return _failover_server_events(self._route(), self._continuation(generation, request, inputs),
                                           lambda url, i: run(url, self.generate_model, i, self.timeout_s))
        if not self._replicas.routed:
            return generate_tokens(_with_busy_retry(self._client_step(generation), self.queue_timeout), generation)
        self._ask_step_model()
        route = self._route()
        step = _failover_step(route, generation, self._replica_sequence(generation, _with_busy_retry))
        return _tagged(generate_tokens(step, generation), route)

    def _ask_step_model(self) -> None:
        if self._step_model is None:
            self._step_model = self._ask(lambda t: t.step_model(self.model))

    def _client_step(self, generation: Generation):
        """The step function of one client-side generation on the one URL (the bench uses it)."""
        self._ask_step_model()
        return self._sequence(generation)

    def _run_many(self, generations: list[Generation], request: _Request) -> list[GenerationResult]:
        cancel = threading.Event()

        def run_one(generation: Generation) -> GenerationResult:
            with closing(self._events(generation, request)) as events:  # type: ignore[arg-type]
                seen = []
                for event in events:
                    seen.append(event)
                    if cancel.is_set():  # Ctrl-C in the caller: stop; closing sends END
                        raise KeyboardInterrupt
                return collect(seen, return_logprobs=request.return_logprobs)

        workers = min(self.max_concurrency, len(generations), self._slots())
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gptpipe-generate") as pool:
            futures = [pool.submit(run_one, g) for g in generations]
            try:
                concurrent.futures.wait(futures)
            except BaseException:
                cancel.set()
                for f in futures:
                    f.cancel()
                raise
        return [f.result() for f in futures]  # the first error, if any, is raised here

