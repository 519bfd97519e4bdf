"""The one generation loop, shared by the client-side loop and the server-side `generate` model.

A generation is a sans-IO state machine (:class:`Generation`): it says which step to send
(the whole prompt with START, then one token at a time), takes the logits that come back,
samples with :mod:`serving.sampling`, detokenizes with :class:`serving.tokenizer.TextStream`
and decides when to stop. Two thin drivers run it: :func:`generate_tokens` (blocking
``step`` calls: the client over gRPC/HTTP, the `generate` model over BLS, tests in process)
and :func:`agenerate_tokens` (``await step(...)``: the asyncio client). Argument validation
lives here too, once, for the client, the `generate` model and the CLI.

The END of a sequence (what frees its KV slot on the server) is always sent:

* when the length limit is what ends the generation, END rides on the last step that is
  needed anyway (the one whose logits give the last token): no extra request;
* when eos or a stop string ends it, or an error, a KeyboardInterrupt or a closed stream
  iterator does, the driver sends one END step with the last token (a step the sequence
  still has room for) and ignores its answer. Triton's sequence batcher holds a slot per
  correlation id until END too, so END follows even a START the server refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import numpy as np

from serving.errors import (
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
)
from serving.request_rules import check_max_new_tokens, check_strings
from serving.sampling import Sampler, SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "GptpipeError", "InvalidParameterError", "PromptTooLongError", "ServerBusyError",
    "ServerUnavailableError", "ServerError",
    "FinishReason", "Step", "TokenEvent", "Timings", "GenerationResult", "Generation",
    "check_max_new_tokens", "check_prompt_ids", "check_stop", "check_min_tokens", "check_token_ids",
    "make_sampling_params", "finish_token", "MAX_TOP_LOGPROBS",
    "generate_tokens", "agenerate_tokens", "collect",
]

FinishReason = Literal["length", "stop", "eos"]
FINISH_REASONS: tuple[str, ...] = ("length", "stop", "eos")
# OpenAI's chat limit on top_logprobs (completions' logprobs stops at 5)
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------- validation


def check_prompt_ids(
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    n_positions: int,
    vocab_size: Optional[int] = None,
    field_name: str = "max_new_tokens",
) -> list[int]:
    """The prompt as a list of ints; raises unless it is non-empty, in the vocabulary and
    leaves room for max_new_tokens in the context. Nothing is truncated."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise InvalidParameterError("prompt is empty: it needs at least one token")
    if vocab_size is not None:
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise InvalidParameterError(
                f"prompt token ids must be in [0, {vocab_size}) (vocab size), got values in [{lo}, {hi}]")
    if len(ids) + max_new_tokens > n_positions:
        raise PromptTooLongError(
            f"prompt too long: {len(ids)} prompt tokens + {field_name}={max_new_tokens} = "
            f"{len(ids) + max_new_tokens} exceeds the context length n_positions={n_positions}")
    return ids


def check_stop(stop: str | Iterable[str] | None, *, field_name: str = "stop") -> tuple[str, ...]:
    """Stop strings as a tuple; one string is one stop string; each must be non-empty."""
    return check_strings(field_name, stop)


def check_token_ids(name: str, ids: Iterable[int], *, vocab_size: Optional[int]) -> tuple[int, ...]:
    """Token ids (stop_token_ids) as a sorted tuple, each an int in the vocabulary."""
    out = set()
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InvalidParameterError(f"{name} must be token ids (ints), got {t!r}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise InvalidParameterError(f"{name}: token ids must be in [0, {vocab_size}), got {t}")
        out.add(int(t))
    return tuple(sorted(out))


def check_min_tokens(min_tokens: Any, *, max_new_tokens: int, field_name: str = "max_new_tokens") -> int:
    """min_tokens: an int in [0, max_new_tokens]."""
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer)):
        raise InvalidParameterError(f"min_tokens must be an int, got {min_tokens!r}")
    if not 0 <= min_tokens <= max_new_tokens:
        raise InvalidParameterError(
            f"min_tokens must be in [0, {field_name}={max_new_tokens}], got {min_tokens}")
    return int(min_tokens)


def make_sampling_params(
    *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    repetition_penalty: float = 1.0, seed: Optional[int] = None,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
) -> SamplingParams:
    """SamplingParams, with its ValueError turned into InvalidParameterError."""
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    except ValueError as e:
        raise InvalidParameterError(str(e)) from None


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Step:
    """One request to the step model: tokens to append, and the sequence flags."""

    tokens: tuple[int, ...]
    start: bool = False
    end: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``text`` is the text it makes visible (may be "" while a UTF-8
    character or a possible stop string is incomplete; the last event carries the rest).
    ``latency_s``: seconds from sending the step to this token being sampled (for the first
    token: from sending START), not counting time the consumer held the stream.
    ``endpoint``: the replica that served the token (set by a client given several endpoints);
    ``failovers``: how many times the generation moved to another replica up to this token.
    ``top_logprobs``: the most likely tokens of the same distribution, when asked for."""

    token_id: int
    text: str
    logprob: Optional[float] = None
    finish_reason: Optional[FinishReason] = None
    latency_s: float = 0.0
    endpoint: Optional[str] = None
    failovers: int = 0
    top_logprobs: Optional[tuple[tuple[int, float], ...]] = None  # (id, logprob), most likely first


@dataclass(frozen=True)
class Timings:
    ttft_s: float  # time to first token
    itl_s: tuple[float, ...] = ()  # inter-token latencies, one per token after the first
    failovers: int = 0  # times the generation moved to another replica (re-prefilled there)
    endpoints: tuple[str, ...] = ()  # the replicas that served its tokens, in order (several endpoints only)

    @property
    def total_s(self) -> float:
        return self.ttft_s + sum(self.itl_s)


@dataclass(frozen=True)
class GenerationResult:
    """text: the generated text (stop string and eos cut); token_ids: every generated id,
    including the eos or the tokens that completed a stop string."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: Optional[list[float]] = None
    timings: Timings = field(default_factory=lambda: Timings(0.0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"]["itl_s"] = list(self.timings.itl_s)
        d["timings"]["endpoints"] = list(self.timings.endpoints)
        return d


def collect(events: Iterable[TokenEvent], *, return_logprobs: bool = False) -> GenerationResult:
    """Drain a stream of events into one GenerationResult."""
    text, ids, logprobs, latencies, endpoints = [], [], [], [], []
    finish: Optional[FinishReason] = None
    failovers = 0
    for event in events:
        text.append(event.text)
        ids.append(event.token_id)
        latencies.append(event.latency_s)
        if event.logprob is not None:
            logprobs.append(event.logprob)
        finish = event.finish_reason or finish
        failovers = max(failovers, event.failovers)
        if event.endpoint is not None and event.endpoint not in endpoints[-1:]:
            endpoints.append(event.endpoint)
    if finish is None:
        raise GptpipeError("the generation ended without a finish reason (stream cut short?)")
    timings = Timings(latencies[0] if latencies else 0.0, tuple(latencies[1:]), failovers, tuple(endpoints))
    return GenerationResult("".join(text), ids, finish, logprobs if return_logprobs else None, timings)


# ---------------------------------------------------------------------------- the loop


def finish_token(text: Any, token: int, *, n: int, max_new_tokens: int, eos_token_id: Optional[int],
                 stop_token_ids: Sequence[int] = (), min_tokens: int = 0) -> tuple[str, Optional[FinishReason]]:
    """(text the token makes visible, the finish it causes) for the n-th generated token;
    text: the generation's TextStream, or None. eos and stop_token_ids end it (their own
    text is not shown; they cannot come before min_tokens: they are banned until then);
    stop strings are looked for only from token min_tokens + 1 on (vLLM's rule)."""
    if token == eos_token_id or token in stop_token_ids:
        return (text.flush() if text else ""), "eos" if token == eos_token_id else "stop"
    find = n > min_tokens
    delta, stopped = text.push(token, find_stops=find) if text else ("", False)
    if stopped:
        return delta, "stop"
    if n == max_new_tokens:
        return delta + (text.flush(find_stops=find) if text else ""), "length"
    return delta, None


class Generation:
    """The sans-IO state of one generation. ``first_step()``, then ``advance(logits)`` with
    each step's logits until it returns no next step. Raises InvalidParameterError at
    construction for bad arguments (before anything is sent)."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams,
        n_positions: int,
        eos_token_id: Optional[int] = None,
        stop: str | Iterable[str] | None = (),
        tokenizer: Any = None,
        return_logprobs: bool = False,
        vocab_size: Optional[int] = None,
        max_new_tokens_field: str = "max_new_tokens",
        min_tokens: int = 0,
        stop_token_ids: Iterable[int] = (),
        top_logprobs: int = 0,
    ) -> None:
        self.max_new_tokens = check_max_new_tokens(max_new_tokens, n_positions=n_positions,
                                                   field_name=max_new_tokens_field)
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.vocab_size
        self.vocab_size = vocab_size
        self.prompt_ids = check_prompt_ids(prompt_ids, max_new_tokens=self.max_new_tokens,
                                           n_positions=n_positions, vocab_size=vocab_size,
                                           field_name=max_new_tokens_field)
        self.stop = check_stop(stop)
        if self.stop and tokenizer is None:
            raise InvalidParameterError("stop strings need a tokenizer to find them in the text")
        params.validate()
        self.eos_token_id = eos_token_id
        self.min_tokens = check_min_tokens(min_tokens, max_new_tokens=self.max_new_tokens,
                                           field_name=max_new_tokens_field)
        self.stop_token_ids = check_token_ids("stop_token_ids", stop_token_ids, vocab_size=vocab_size)
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer)) \
                or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameterError(f"top_logprobs must be an int in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}")
        self.top_logprobs = int(top_logprobs)
        self.return_logprobs = bool(return_logprobs or self.top_logprobs)
        # vLLM's min_tokens: eos and the stop token ids cannot be picked before min_tokens tokens
        ends = set(self.stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self._banned = tuple(sorted(ends)) if self.min_tokens else ()
        self.sampler = Sampler(params)
        self._text = None
        if tokenizer is not None:
            from serving.tokenizer import TextStream  # tokenizers is heavy; only when text is wanted

            self._text = TextStream(tokenizer, self.stop, prompt_ids=self.prompt_ids)
        self._history = np.array(self.prompt_ids + [0] * self.max_new_tokens, dtype=np.int64)
        self.generated: list[int] = []
        self.finish_reason: Optional[FinishReason] = None

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def argmax_only(self) -> bool:
        """True when the next token is the argmax of the logits and nothing else of them is used
        (greedy, no penalty, no log-probs, no ids banned by min_tokens). A step may then answer
        the token id alone (the `gpt` model's output_ids, 8 bytes) instead of vocab_size floats
        of logits."""
        p = self.sampler.params
        return p.greedy and not p.penalised and not self.return_logprobs and not self._banned

    @property
    def last_token(self) -> int:
        """The newest token the sequence knows of: what an END-only step sends."""
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    def first_step(self) -> Step:
        # with max_new_tokens == 1 the prompt's logits give the only token: END right away
        return Step(tuple(self.prompt_ids), start=True, end=self.max_new_tokens == 1)

    def release_step(self) -> Step:
        """END for a sequence that ended early: the last sampled token fits in the context
        (prompt + generated <= prompt + max_new_tokens <= n_positions)."""
        return Step((self.last_token,), end=True)

    def advance(self, output: np.ndarray, *, sent_at: float) -> tuple[TokenEvent, Optional[Step]]:
        """Take the step's output: its logits (V,) or (1, V), sampled here; or, for an
        ``argmax_only`` generation, the greedy token id the step model chose (an integer
        array of one element), which is the token the sampler would pick from the logits."""
        if self.finish_reason is not None:
            raise RuntimeError("advance() after the generation finished")
        n_prompt, n = len(self.prompt_ids), len(self.generated)
        output = np.asarray(output)
        top = None
        if output.dtype.kind in "iu":
            token, logprob = self._server_token(output), None
        else:
            token, logprob = self.sampler.sample(output.reshape(-1), self._history[: n_prompt + n], n_prompt=n_prompt,
                                                 logprob=self.return_logprobs,
                                                 banned=self._banned if n < self.min_tokens else ())
            if self.top_logprobs:
                top = tuple(self.sampler.top_logprobs(self.top_logprobs))
        return self._accept(token, logprob, top, sent_at=sent_at)

    def accept(self, token: int, *, sent_at: float) -> tuple[TokenEvent, Optional[Step]]:
        """Take a token sampled elsewhere with this generation's settings (the engine-side loop
        of serving/engine/generations.py): the text, stop strings and finish of ``advance``."""
        if self.finish_reason is not None:
            raise RuntimeError("accept() after the generation finished")
        token = int(token)
        if token < 0 or (self.vocab_size is not None and token >= self.vocab_size):
            raise ValueError(f"the engine answered token id {token}, outside the vocabulary [0, {self.vocab_size})")
        return self._accept(token, None, None, sent_at=sent_at)

    def _accept(self, token: int, logprob: Optional[float], top: Any, *, sent_at: float
                ) -> tuple[TokenEvent, Optional[Step]]:
        n_prompt, n = len(self.prompt_ids), len(self.generated)
        self.generated.append(token)
        self._history[n_prompt + n] = token
        n += 1
        delta, finish = finish_token(self._text, token, n=n, max_new_tokens=self.max_new_tokens,
                                     eos_token_id=self.eos_token_id, stop_token_ids=self.stop_token_ids,
                                     min_tokens=self.min_tokens)
        self.finish_reason = finish
        event = TokenEvent(token, delta, logprob if self.return_logprobs else None, finish,
                           time.perf_counter() - sent_at, top_logprobs=top)
        if finish is not None:
            return event, None
        # the step whose logits give the last token also ends the sequence
        return event, Step((token,), end=n + 1 == self.max_new_tokens)

    def _server_token(self, output: np.ndarray) -> int:
        if not self.argmax_only:
            raise ValueError("the step answered a token id, but this generation samples from the logits")
        if output.size != 1:
            raise ValueError(f"the step answered {output.size} token ids, expected 1")
        token = int(output.reshape(-1)[0])
        if token < 0 or (self.vocab_size is not None and token >= self.vocab_size):
            raise ValueError(f"the step answered token id {token}, outside the vocabulary [0, {self.vocab_size})")
        return token


# step(tokens: Sequence[int], *, start: bool, end: bool) -> logits, or the greedy token id (argmax_only)
StepFn = Callable[..., np.ndarray]
AsyncStepFn = Callable[..., Awaitable[np.ndarray]]


def generate_tokens(step: StepFn, generation: Generation) -> Iterator[TokenEvent]:
    """Run a generation with a blocking ``step(tokens, start=, end=) -> logits``.

    END is sent on every way out (see the module docstring); an END-only step's result
    and errors are ignored (logged): the first error is the one the caller sees.
    """
    pending: Optional[Step] = generation.first_step()
    end_sent = False
    try:
        while pending is not None:
            sent_at = time.perf_counter()
            end_sent = end_sent or pending.end  # once sent with END, the server frees the slot
            logits = step(pending.tokens, start=pending.start, end=pending.end)
            event, pending = generation.advance(logits, sent_at=sent_at)
            yield event
    finally:
        if not end_sent:
            release = generation.release_step()
            try:
                step(release.tokens, start=False, end=True)
            except BaseException as e:  # noqa: BLE001 - cleanup must not mask the real error
                logger.debug("END step for a finished sequence failed (ignored): %s", e)


async def agenerate_tokens(step: AsyncStepFn, generation: Generation) -> AsyncIterator[TokenEvent]:
    """:func:`generate_tokens` with an awaitable ``step``."""
    pending: Optional[Step] = generation.first_step()
    end_sent = False
    try:
        while pending is not None:
            sent_at = time.perf_counter()
            end_sent = end_sent or pending.end
            logits = await step(pending.tokens, start=pending.start, end=pending.end)
            event, pending = generation.advance(logits, sent_at=sent_at)
            yield event
    finally:
        if not end_sent:
            release = generation.release_step()
            try:
                await step(release.tokens, start=False, end=True)
            except BaseException as e:  # noqa: BLE001
                logger.debug("END step for a finished sequence failed (ignored): %s", e)

