"""Engine-side generation: the in-flight `gpt` runs a whole generation's loop itself.

A START+END request to the decoupled `gpt` with the request parameter
``tensors.GENERATE_PARAMETER`` (a JSON object: max_new_tokens and the sampling fields) is one
generation: the engine thread samples each next token from the logits it has just computed
(serving.generation's Generation, the loop every other path runs) and queues the next step
itself, answering one response per token (output_ids, FINAL on the last). No step waits for a
client's or a BLS caller's turn-round: as TensorRT-LLM's and vLLM's engines loop, not their
clients. The caller does text, stop strings and log-probs; it stops a generation early with a
START+END request whose parameter ``tensors.CANCEL_PARAMETER`` names the generation's
correlation id (the BLS of Triton 2.51 cannot cancel a request), or, over a gRPC stream, by
closing the stream (the engine's watcher sees the request cancelled).

Triton-free: serving/engine/step.py runs these; model_repository's gpt/1/model.py parses them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from serving.generation import Generation, make_sampling_params
from serving.errors import InvalidParameterError
from serving.request_rules import check_known_fields

from serving.engine.scheduler import StepRequest

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "presence_penalty",
                   "frequency_penalty")
GENERATE_FIELDS = ("max_new_tokens", *SAMPLING_FIELDS, "eos_token_id", "stop_token_ids", "min_tokens")


@dataclass(frozen=True)
class GenerateStep:
    """A generation's first step (its prompt, START) with the Generation that drives the rest."""

    step: StepRequest
    generation: Generation

    @property
    def sequence_id(self) -> int:
        return self.step.sequence_id

    start = True


@dataclass(frozen=True)
class CancelStep:
    """Stop the engine-side generation of correlation id ``target`` (answered with no outputs)."""

    sequence_id: int  # the cancel request's own id
    target: int
    start = False


@dataclass
class EngineGeneration:
    """A generation the engine is running: where its tokens go."""

    sequence_id: int
    generation: Generation
    request: Any
    sender: Any
    cancelled: bool = False
    sent_at: float = field(default_factory=time.perf_counter)


def generation_spec(generation: Generation) -> str:
    """The GENERATE_PARAMETER value that makes the engine run ``generation`` (its resolved seed
    included, so the engine samples what the caller's own loop would)."""
    p = generation.sampler.params
    spec = {name: getattr(p, name) for name in SAMPLING_FIELDS}
    eos = generation.eos_token_id
    spec.update(seed=int(generation.seed), max_new_tokens=int(generation.max_new_tokens),
                eos_token_id=None if eos is None else int(eos),
                stop_token_ids=[int(t) for t in generation.stop_token_ids], min_tokens=int(generation.min_tokens))
    return json.dumps(spec)


def parse_generation(text: Any, prompt_ids: list[int], *, n_positions: int, vocab_size: int) -> Generation:
    """The Generation a GENERATE_PARAMETER value asks for; InvalidParameterError naming the
    field for a bad one."""
    where = " of the gptpipe_generate parameter"
    try:
        spec = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError as e:
        raise InvalidParameterError(f"gptpipe_generate must be a JSON object: {e}") from None
    if not isinstance(spec, dict):
        raise InvalidParameterError(f"gptpipe_generate must be a JSON object, got {text!r:.80}")
    check_known_fields(spec, GENERATE_FIELDS, where=where)
    if "max_new_tokens" not in spec:
        raise InvalidParameterError(f"max_new_tokens is missing{where}")
    eos = spec.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab_size):
        raise InvalidParameterError(f"eos_token_id must be null or an int in [0, {vocab_size}), got {eos!r}")
    stop_ids = spec.get("stop_token_ids", [])
    if not isinstance(stop_ids, list):
        raise InvalidParameterError(f"stop_token_ids must be a list of token ids, got {stop_ids!r:.80}")
    params = make_sampling_params(**{k: spec[k] for k in SAMPLING_FIELDS if k in spec})
    return Generation(prompt_ids, max_new_tokens=spec["max_new_tokens"], params=params, n_positions=n_positions,
                      vocab_size=vocab_size, eos_token_id=eos, stop_token_ids=stop_ids,
                      min_tokens=spec.get("min_tokens", 0))


def first_step(sequence_id: int, generation: Generation) -> StepRequest:
    """The engine's first step of a generation: its prompt (END with it when one token is asked)."""
    import numpy as np

    first = generation.first_step()
    return StepRequest(sequence_id, np.asarray(first.tokens, dtype=np.int64), start=True, end=first.end)


def check_flags(start: bool, end: bool) -> Optional[str]:
    """Why a generation request's flags are wrong, or None: it is one whole sequence."""
    if start and end:
        return None
    return ("a gptpipe_generate request is a whole sequence: it needs both the START and END flags "
            f"(got START={int(start)}, END={int(end)})")
