"""What a generate() call asks for, checked before any network call: arguments, defaults, the model's config."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np

from serving.generation import (
    InvalidParameterError,
    check_max_new_tokens,
    check_stop,
    make_sampling_params,
)
from serving.request_rules import check_bool
from serving.sampling import SamplingParams

Protocol_ = Literal["grpc", "http"]
Mode = Literal["client", "server"]
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 60.0
# How long a START refused with "server busy" (every KV slot taken) is retried by default.
DEFAULT_QUEUE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class GenerationConfig:
    """What a client needs to know of the model besides the tokenizer."""

    n_positions: int
    vocab_size: int
    eos_token_id: Optional[int] = None
    max_sequences: Optional[int] = None  # the server's KV-pool slots: sequences served at once

    @classmethod
    def from_json(cls, text: str) -> GenerationConfig:
        d = json.loads(text)
        slots = d.get("max_sequences")
        return cls(n_positions=int(d["n_positions"]), vocab_size=int(d["vocab_size"]),
                   eos_token_id=d.get("eos_token_id"), max_sequences=int(slots) if slots else None)


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")


def _check_protocol(protocol: str) -> str:
    if protocol not in ("grpc", "http"):
        raise InvalidParameterError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return protocol


def _check_ids(prompt: Any) -> list[int]:
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise InvalidParameterError(f"prompt must be a string or a sequence of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    for i, t in enumerate(ids):
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise InvalidParameterError(f"prompt[{i}] must be a token id (int), got {t!r}")
    return [int(t) for t in ids]


def _new_correlation_id() -> int:
    # random 63 bits: unique across threads and processes without coordination; never 0
    # (0 means "not a sequence" to Triton) and positive as an int64 protobuf parameter
    return secrets.randbits(63) or 1


@dataclass(frozen=True)
class _Request:
    """A validated generate() call."""

    prompts: tuple[str, ...]
    single: bool
    max_new_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    mode: Mode
    return_logprobs: bool


def _validate(prompt: Any, *, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
              repetition_penalty: Any, stop: Any, seed: Any, stream: Any, mode: Any,
              return_logprobs: Any, presence_penalty: Any = 0.0, frequency_penalty: Any = 0.0) -> _Request:
    """Every check that needs no server: runs before any network call."""
    single = isinstance(prompt, str)
    prompts = (prompt,) if single else tuple(prompt) if isinstance(prompt, (list, tuple)) else None
    if prompts is None:
        raise InvalidParameterError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise InvalidParameterError("prompt is an empty list: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidParameterError(f"prompt[{i}] must be a string, got {type(p).__name__}")
        if not p:
            raise InvalidParameterError("prompt is empty: it needs at least one token" +
                                        ("" if single else f" (prompt[{i}])"))
    if mode not in ("client", "server"):
        raise InvalidParameterError(f"mode must be 'client' or 'server', got {mode!r}")
    stream = check_bool("stream", stream)
    return_logprobs = check_bool("return_logprobs", return_logprobs)
    if stream and not single:
        raise InvalidParameterError("stream=True takes one prompt (a string), not a list")
    return _Request(
        prompts=prompts,
        single=single,
        max_new_tokens=check_max_new_tokens(max_new_tokens),
        params=make_sampling_params(temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seed=seed,
                                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty),
        stop=check_stop(stop),
        stream=stream,
        mode=mode,
        return_logprobs=return_logprobs,
    )
