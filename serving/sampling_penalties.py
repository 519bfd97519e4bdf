"""Logits processors: penalties on the raw logits from the ids seen so far (prompt + output;
presence and frequency: output only).

The first step of the sampling chain (see ``serving.sampling``), before temperature,
top-k and top-p. ``Sampler.sample`` applies them in place on its float64 copy of the
logits (``penalise``); the ``apply_*`` functions are the pure, checked versions. A new
penalty (presence, frequency) is one more pair here, a field in ``SamplingParams`` and
one call in ``Sampler.sample``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.sampling_params import check_additive_penalty, check_logits, check_penalty, check_previous_ids


def penalise(x: np.ndarray, ids: np.ndarray, penalty: float) -> None:
    """In place: CTRL/HF penalty on the distinct ``ids`` of x."""
    if penalty == 1.0 or ids.size == 0:
        return
    ids = np.unique(ids)
    seen = x[ids]  # (n,)
    x[ids] = np.where(seen < 0, seen * penalty, seen / penalty)


def apply_repetition_penalty(
    logits: np.ndarray, previous_ids: Sequence[int] | np.ndarray, penalty: float
) -> np.ndarray:
    """CTRL / Hugging Face repetition penalty; returns a new array, same dtype.

    For every distinct id in ``previous_ids`` (prompt + generated so far): a positive
    logit is divided by ``penalty``, a negative one multiplied (so penalty > 1 always
    makes the token less likely). Each id is penalised once, however often it repeats.
    """
    logits = check_logits(logits)
    penalty = check_penalty(penalty)
    ids = check_previous_ids(previous_ids, logits.shape[0])
    out = logits.copy()
    penalise(out, ids, penalty)
    return out


def penalise_additive(x: np.ndarray, output_ids: np.ndarray, presence: float, frequency: float) -> None:
    """In place: OpenAI's presence and frequency penalties for the ids in ``output_ids``."""
    if (presence == 0.0 and frequency == 0.0) or output_ids.size == 0:
        return
    ids, counts = np.unique(output_ids, return_counts=True)  # (n,), (n,)
    x[ids] -= presence + frequency * counts


def apply_presence_frequency_penalties(
    logits: np.ndarray, output_ids: Sequence[int] | np.ndarray, *, presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> np.ndarray:
    """OpenAI's presence / frequency penalties (a logits processor); returns a new float64 array.

    ``output_ids`` are the tokens generated so far (the prompt is not penalised, as in OpenAI
    and vLLM): every id seen c > 0 times gets ``presence_penalty + frequency_penalty * c``
    subtracted from its logit. Positive values discourage repeats, negative ones encourage them.
    """
    logits = check_logits(logits)
    presence = check_additive_penalty("presence_penalty", presence_penalty)
    frequency = check_additive_penalty("frequency_penalty", frequency_penalty)
    ids = check_previous_ids(output_ids, logits.shape[0])
    out = logits.astype(np.float64)
    penalise_additive(out, ids, presence, frequency)
    return out
