"""Logits processors: penalties on the raw logits from the ids seen so far (prompt + output).

The first step of the sampling chain (see ``serving.sampling``), before temperature,
top-k and top-p. ``Sampler.sample`` applies them in place on its float64 copy of the
logits (``penalise``); the ``apply_*`` functions are the pure, checked versions. A new
penalty (presence, frequency) is one more pair here, a field in ``SamplingParams`` and
one call in ``Sampler.sample``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.sampling_params import check_logits, check_penalty, check_previous_ids


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
