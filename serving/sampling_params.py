"""Sampling inputs, validated: SamplingParams and the checks on logits and previous ids.

Every error is a ValueError naming the field and its limit. numpy only (see
``serving.sampling`` for how the sampling modules fit together).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_SEED_LIMIT = 2**63
# OpenAI's range for presence_penalty and frequency_penalty
_ADDITIVE_PENALTY_LIMIT = 2.0


def _is_real(value: object) -> bool:
    # bool is an int subclass; True as a temperature is a bug, not a 1.0
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_real(name: str, value: object) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_penalty(penalty: float) -> float:
    penalty = check_real("repetition_penalty", penalty)
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
    return penalty


def check_additive_penalty(name: str, value: object) -> float:
    value = check_real(name, value)
    if not -_ADDITIVE_PENALTY_LIMIT <= value <= _ADDITIVE_PENALTY_LIMIT:
        raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults: plain sampling from the model distribution.

    temperature: 0 means greedy (argmax; as in OpenAI/vLLM), otherwise logits / T.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus sampling; keep the smallest set with cumulative prob >= top_p (1 = off).
    repetition_penalty: CTRL/HF penalty on every id seen in prompt + output (1 = off).
    seed: PCG64 seed in [0, 2**63); None draws a fresh one (see ``Sampler.seed``).
    presence_penalty, frequency_penalty: OpenAI's additive penalties in [-2, 2] (0 = off) on
    the ids generated so far (not the prompt): logit -= presence * [count > 0] + frequency * count.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        self.validate()
        # store plain Python numbers (numpy scalars pass validation, but not json.dumps)
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float),
                           ("repetition_penalty", float), ("presence_penalty", float),
                           ("frequency_penalty", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    def validate(self) -> None:
        """Raise ValueError naming the field and its limit for any bad value."""
        temperature = check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        top_p = check_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        check_penalty(self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            check_additive_penalty(name, getattr(self, name))
        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
            if not 0 <= self.seed < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """True when a penalty changes the logits (the token depends on the history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def check_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (V,), got shape {logits.shape}")
    if logits.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got dtype {logits.dtype}")
    return logits


def check_previous_ids(previous_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(previous_ids)
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"previous_ids must be a 1-D sequence of ints, got dtype {ids.dtype} shape {ids.shape}"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"previous_ids must be in [0, {vocab_size}) (vocab size), got {bad}")
    return ids.astype(np.int64, copy=False)


def max_or_raise(logits: np.ndarray) -> float:
    # one pass: np.max propagates NaN, and also tells +inf / all -inf apart
    m = float(logits.max())
    if math.isnan(m):
        raise ValueError("logits contain NaN")
    if m == math.inf:
        raise ValueError("logits contain +inf")
    if m == -math.inf:
        raise ValueError("logits are all -inf: no token can be chosen")
    return m
