"""Token sampling: greedy, temperature, top-k, top-p, repetition/presence/frequency penalties; seeded.

numpy only, so the same code runs in the client and inside Triton python-backend
models, and a client-side and a server-side loop with the same seed pick the same
tokens. Generation is a chain of small pure steps (gpt-fast style)::

    logits ─ apply_repetition_penalty ─ apply_presence_frequency_penalties ─ logits_to_probs
           ─ inverse-CDF draw ─ token

Determinism contract (what keeps two samplers with the same seed in lockstep):

* all arithmetic after the model is float64, on the same float32/float16 logits;
* a sampled token (temperature > 0) consumes exactly ONE ``rng.random()`` draw, even
  when top-k/top-p leave a single candidate; a greedy token (temperature == 0)
  consumes none. The number of draws therefore depends only on the parameters,
  never on the logits;
* ties are broken by the lower token id everywhere (argmax, top-k, top-p), so the
  kept set never depends on sort stability or on how a partition happened to fall.

Speed (V = 50257, one core of the 2-core build machine): 0.35-0.6 ms per token for
greedy, full, top-k and LM-shaped top-p distributions, ~1 ms for top-p over a flat
distribution (nucleus of ~40k tokens); one float64 exp pass over V alone is ~0.26 ms.
No full-vocabulary sort and no per-token (V,) allocations in ``Sampler`` (see
``serving.sampling_filters``).

The modules, in the order a token flows through them:

* ``serving.sampling_params``: ``SamplingParams`` and the checks on every input;
* ``serving.sampling_penalties``: logits processors on the raw logits (repetition,
  presence and frequency penalties; new penalties go there and into ``Sampler.sample``);
* ``serving.sampling_filters``: temperature, top-k, top-p and the inverse-CDF draw;
* this module: ``Sampler`` (one seeded sequence) and ``greedy_token``.
"""
from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence

import numpy as np

from serving.sampling_filters import (
    Scratch,
    exp_flushed,
    filtered_probs,
    inverse_cdf,
    logits_to_probs,
    top_ids,
    work_array,
)
from serving.sampling_params import SamplingParams, check_logits, check_previous_ids, max_or_raise
from serving.sampling_penalties import (
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    penalise,
    penalise_additive,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SamplingParams",
    "Sampler",
    "greedy_token",
    "apply_repetition_penalty",
    "apply_presence_frequency_penalties",
    "logits_to_probs",
]


def greedy_token(logits: np.ndarray) -> int:
    """The greedy next token of logits (V,): the argmax, lowest id on ties; the same token,
    and the same errors (NaN, +inf, all -inf), as ``Sampler`` with temperature 0 and no
    repetition penalty. The `gpt` step model answers this to clients that ask only for it."""
    logits = check_logits(logits)
    max_or_raise(logits)
    return int(np.argmax(logits))  # float32 -> float64 keeps the order: same argmax


class Sampler:
    """Picks tokens for ONE sequence with its own seeded PCG64 generator.

    ``sample`` returns ``(token_id, logprob)``. ``logprob`` is the log-softmax of the
    RAW model logits (before repetition penalty, temperature, top-k, top-p) at the
    chosen token, in float64 then converted to a Python float. Reason: it is the
    model's own belief, comparable across requests with different sampling settings
    (what OpenAI's ``logprobs`` and vLLM's default ``raw_logprobs`` report); the
    processed distribution can always be recomputed with ``logits_to_probs``.

    ``top_logprobs(n)`` after a ``sample`` gives the n most likely tokens of that same raw
    distribution (OpenAI's ``top_logprobs``), computed with the same float64 arithmetic, so
    the chosen token's entry there equals the ``logprob`` that ``sample`` returned.

    Not thread-safe: one Sampler per sequence, used by one thread at a time.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        if self.params.seed is None:
            # resolve to a concrete seed so any run can be replayed from the logs
            self.seed = secrets.randbits(63)
            logger.debug("sampler seed drawn: %d", self.seed)
        else:
            self.seed = self.params.seed
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.num_draws = 0  # rng.random() calls so far; lockstep check for callers
        self._ws = Scratch()
        self._last: tuple[int, float, float] | None = None  # (V, max, log of sum of exp) of the last sample

    def sample(
        self, logits: np.ndarray, previous_ids: Sequence[int] | np.ndarray = (), *, logprob: bool = True,
        n_prompt: int = 0, banned: Sequence[int] = (),
    ) -> tuple[int, float]:
        """Next token from logits (V,); previous_ids = prompt + generated ids so far, of which
        the first ``n_prompt`` are the prompt (presence/frequency penalties skip those).

        logprob=False skips the token's log-probability (NaN instead): a full pass over the
        vocabulary per token that a caller who does not report it need not pay (0.5 ms at 50257).
        The token, and the random draws, are the same either way.

        banned: ids that cannot be picked (their logits are -inf for the pick; vLLM's min_tokens
        processor, which runs before the penalties). The log-prob stays the raw model's."""
        logits = check_logits(logits)
        params, ws, n = self.params, self._ws, logits.shape[0]
        raw = work_array(ws, "raw", n)  # (V,) float64 copy of the model's logits
        np.copyto(raw, logits)
        m = max_or_raise(raw)
        self._last = None
        penalised = params.penalised
        if penalised or len(banned):
            x = work_array(ws, "penalised", n)
            np.copyto(x, raw)
            if len(banned):
                x[np.asarray(banned, dtype=np.int64)] = -np.inf
                if not x.max() > -np.inf:
                    raise ValueError("every token with a finite logit is banned: nothing to pick")
            if penalised:
                history = check_previous_ids(previous_ids, n)
                penalise(x, history, params.repetition_penalty)
                penalise_additive(x, history[n_prompt:], params.presence_penalty, params.frequency_penalty)
        else:
            x = raw
        total_raw = None  # sum(exp(raw - m)), when a step below computes it anyway
        if params.greedy:
            token = int(np.argmax(x))  # first max: lowest id on ties; no draw
        else:
            # shift in place: unpenalised, raw becomes raw - m (logprob below allows it)
            z = np.subtract(x, m if x is raw else float(x.max()), out=x)
            ids, p, total = filtered_probs(
                z, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, ws=ws
            )
            if x is raw and params.temperature == 1.0:
                total_raw = total
            u = float(self.rng.random())  # the one draw for this token
            self.num_draws += 1
            i = inverse_cdf(p, u)
            token = i if ids is None else int(ids[i])
            if x is raw:
                m = 0.0  # raw now holds raw - m
        if not logprob:
            return token, math.nan
        if total_raw is None:
            total_raw = float(exp_flushed(np.subtract(raw, m, out=work_array(ws, "lse", n)), ws, "lse").sum())
        self._last = (n, m, math.log(total_raw))
        return token, float(raw[token] - m - self._last[2])

    def top_logprobs(self, k: int) -> list[tuple[int, float]]:
        """The k most likely tokens of the last ``sample``'s raw distribution, most likely
        first (ties: the lower id), with their log-probs. Needs that sample's logprob."""
        if self._last is None:
            raise RuntimeError("top_logprobs() needs a sample(..., logprob=True) first")
        n, m, log_total = self._last
        raw = work_array(self._ws, "raw", n)  # still the last sample's (shifted or not: m says)
        ids = top_ids(raw, k, self._ws)
        values = raw[ids] - m - log_total  # the same float64 steps as sample's logprob
        return [(int(i), float(v)) for i, v in zip(ids, values)]

    def sample_batch(
        self, logits: np.ndarray, previous_ids: Sequence[Sequence[int] | np.ndarray]
    ) -> list[tuple[int, float]]:
        """Rows of logits (B, V) in order with THIS sampler's generator (one draw per row).

        Independent sequences that must replay exactly need one Sampler each.
        """
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D (B, V), got shape {logits.shape}")
        if len(previous_ids) != logits.shape[0]:
            raise ValueError(
                f"previous_ids must have one entry per row: {logits.shape[0]} rows, "
                f"got {len(previous_ids)}"
            )
        return [self.sample(row, prev) for row, prev in zip(logits, previous_ids)]
