"""What Client and AsyncClient share: their settings, the tokenizer and config, and a generate() call's generations."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from serving import tensors
from serving.client.failover import Endpoints, _Continuation, _Replicas, _Route
from serving.client.request import DEFAULT_URLS, GenerationConfig, _check_protocol, _Request
from serving.client.step import _sequence_step, _StepModel
from serving.generation import Generation, InvalidParameterError
from serving.request_rules import check_max_new_tokens, check_prompt_bytes
from serving.tokenizer import Tokenizer

# what the server's `tokenizer` model sends: tokenizer.json and generation_config.json
_TOKENIZER_FILES = tuple(o.name for o in tensors.TOKENIZER_OUTPUTS)


class _ClientBase:
    _transport: Any  # one URL: its transport (one of the transport_*.py classes); several: None

    def __init__(self, url: Optional[Endpoints], protocol: str, model: str, tokenizer: Union[str, Path, None], *,
                 generate_model: str, tokenizer_model: str, timeout_s: float, queue_timeout: float,
                 failover: Optional[bool] = None) -> None:
        self.protocol = _check_protocol(protocol)
        self.model = model
        self.generate_model = generate_model
        self.tokenizer_model = tokenizer_model
        if not timeout_s > 0:
            raise InvalidParameterError(f"timeout_s must be > 0, got {timeout_s}")
        if not queue_timeout >= 0:
            raise InvalidParameterError(f"queue_timeout must be >= 0, got {queue_timeout}")
        self.timeout_s = float(timeout_s)
        self.queue_timeout = float(queue_timeout)
        self._tokenizer_path = Path(tokenizer) if tokenizer is not None else None
        self._tokenizer: Optional[Tokenizer] = None
        self._config: Optional[GenerationConfig] = None
        self._setup_lock = threading.Lock()
        self._step_model: Optional[_StepModel] = None  # the server's `gpt`: asked once, on first use
        try:
            self._replicas = _Replicas(url, DEFAULT_URLS[protocol], protocol, self._new_transport,
                                       models=[model], failover=failover)
        except ValueError as e:
            raise InvalidParameterError(str(e)) from None
        self.url = self._replicas.url  # the one "host:port", or the endpoints joined by ","
        self._transport = None if self._replicas.routed else self._replicas.single()

    def _new_transport(self, endpoint: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def endpoints(self) -> list[str]:
        """The Triton endpoints this client knows (resolved), healthy or not."""
        router = self._replicas.router
        return router.endpoints() if router is not None else [self.url]

    def _is_set_up(self) -> bool:
        return self._tokenizer is not None and self._config is not None

    def _local_tokenizer(self) -> tuple[Optional[Tokenizer], Optional[GenerationConfig]]:
        path = self._tokenizer_path
        if path is None:
            return None, None
        folder = path if path.is_dir() else path.parent
        tokenizer = Tokenizer.from_file(path) if path.is_file() else Tokenizer.from_folder(path)
        config_file = folder / "generation_config.json"
        config = GenerationConfig.from_json(config_file.read_text()) if config_file.is_file() else None
        return tokenizer, config

    def _keep(self, tokenizer: Optional[Tokenizer], config: Optional[GenerationConfig],
              files: Optional[dict[str, bytes]]) -> None:
        """Keep the local tokenizer and config, what is missing taken from the server's
        `tokenizer` model (files: its outputs, fetched only when something is missing)."""
        if files is not None:
            if tokenizer is None:
                tokenizer = Tokenizer.from_str(files["tokenizer_json"].decode("utf-8"),
                                               source=f"{self.url} model {self.tokenizer_model}")
            config = config or GenerationConfig.from_json(files["generation_config"].decode("utf-8"))
        self._tokenizer, self._config = tokenizer, config

    def _generations(self, request: _Request, *, prompt_ids: Optional[list[int]] = None,
                     ignore_eos: bool = False, min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                     top_logprobs: int = 0) -> list[Generation]:
        """Tokenize and validate every prompt (prompt length against the context).
        prompt_ids: token ids given instead of the (single) text prompt."""
        assert self._tokenizer is not None and self._config is not None
        check_max_new_tokens(request.max_new_tokens, n_positions=self._config.n_positions)
        out = []
        for i, prompt in enumerate(request.prompts):
            try:
                if prompt_ids is None:  # a prompt that cannot fit is refused before tokenizing
                    check_prompt_bytes(prompt, n_positions=self._config.n_positions,
                                       max_new_tokens=request.max_new_tokens,
                                       max_token_bytes=self._tokenizer.max_token_bytes)
                ids = prompt_ids if prompt_ids is not None else self._tokenizer.encode(prompt)
                out.append(Generation(
                    ids, max_new_tokens=request.max_new_tokens, params=request.params,
                    n_positions=self._config.n_positions, vocab_size=self._config.vocab_size,
                    eos_token_id=None if ignore_eos else self._config.eos_token_id, stop=request.stop,
                    tokenizer=self._tokenizer, return_logprobs=request.return_logprobs,
                    min_tokens=min_tokens, stop_token_ids=stop_token_ids, top_logprobs=top_logprobs))
            except InvalidParameterError as e:
                if request.single:
                    raise
                raise type(e)(f"prompt[{i}]: {e}") from None
        return out

    def _sequence(self, generation: Generation):
        """The step function of one client-side generation (see serving.client.step)."""
        assert self._step_model is not None
        return _sequence_step(self._transport, self._step_model, generation)

    def _route(self) -> _Route:
        assert self._replicas.router is not None
        return _Route(self._replicas.router)

    def _replica_sequence(self, generation: Generation, busy_retry):
        """new_step(endpoint, correlation_id) for serving.client.failover: a new sequence of
        ``generation`` on that replica, its START retried while the replica is busy."""
        assert self._step_model is not None
        model = self._step_model

        def new_step(endpoint: str, correlation_id: int):
            step = _sequence_step(self._replicas.transport(endpoint), model, generation, correlation_id)
            return busy_retry(step, self.queue_timeout)

        return new_step

    def _continuation(self, generation: Generation, request: _Request, inputs) -> _Continuation:
        return _Continuation(generation, request, inputs, self._tokenizer)

    def _slots(self) -> int:
        """Sequences one call runs at once: more than the servers' slots would only be refused."""
        slots = self._config.max_sequences if self._config is not None else None
        return slots * len(self.endpoints) if slots else 1 << 30

    @property
    def tokenizer(self) -> Tokenizer:
        self._setup()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def generation_config(self) -> GenerationConfig:
        self._setup()
        assert self._config is not None
        return self._config

    def _setup(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError
