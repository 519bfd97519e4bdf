"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty; seeded.

numpy only, so the same code runs in the client and inside Triton python-backend
models, and a client-side and a server-side loop with the same seed pick the same
tokens. Generation is a chain of small pure steps (gpt-fast style)::

    logits ─ apply_repetition_penalty ─ logits_to_probs ─ inverse-CDF draw ─ token

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
No full-vocabulary sort (see ``_top_m_indices``, ``_nucleus``, ``_inverse_cdf``) and
no per-token (V,) allocations in ``Sampler`` (see ``_Scratch``).
"""
from __future__ import annotations

import logging
import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "SamplingParams",
    "Sampler",
    "greedy_token",
    "apply_repetition_penalty",
    "logits_to_probs",
]

_SEED_LIMIT = 2**63

# Top-p first looks for the nucleus among this many best tokens: LM distributions
# usually put top_p of their mass in a few hundred tokens...
_NUCLEUS_FIRST_GUESS = 256
# ... and otherwise buckets all tokens by log-prob, so that only one bucket is sorted
_NUCLEUS_BUCKETS = 4096
# top-m selection takes its threshold from every 16th value (see _top_m_indices)
_SELECT_STRIDE = 16
# exp(x) for x < -708 is subnormal; see _exp
_FTZ_BELOW = -708.0
# inverse CDF over more than 16 blocks of this size sums blocks first (see _inverse_cdf)
_CDF_BLOCK = 256


def _is_real(value: object) -> bool:
    # bool is an int subclass; True as a temperature is a bug, not a 1.0
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_real(name: str, value: object) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults: plain sampling from the model distribution.

    temperature: 0 means greedy (argmax; as in OpenAI/vLLM), otherwise logits / T.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus sampling; keep the smallest set with cumulative prob >= top_p (1 = off).
    repetition_penalty: CTRL/HF penalty on every id seen in prompt + output (1 = off).
    seed: PCG64 seed in [0, 2**63); None draws a fresh one (see ``Sampler.seed``).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()
        # store plain Python numbers (numpy scalars pass validation, but not json.dumps)
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float),
                           ("repetition_penalty", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    def validate(self) -> None:
        """Raise ValueError naming the field and its limit for any bad value."""
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        top_p = _check_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        penalty = _check_real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
            if not 0 <= self.seed < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------------
# Work arrays
# ---------------------------------------------------------------------------


class _Scratch:
    """Reusable (V,)-sized work arrays, one set per Sampler.

    A fresh 400 KB float64 temporary per operation is returned to the OS by glibc when
    freed and page-faulted back in on the next token: measured here, those faults cost
    more than the arithmetic itself. The pure functions pass ``None`` and allocate.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: type = np.float64) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.shape[0] < n or a.dtype != dtype:
            a = self._arrays[name] = np.empty(n, dtype=dtype)
        return a[:n]


def _empty(ws: _Scratch | None, name: str, n: int, dtype: type = np.float64) -> np.ndarray:
    return np.empty(n, dtype=dtype) if ws is None else ws.get(name, n, dtype)


# ---------------------------------------------------------------------------
# Pure steps
# ---------------------------------------------------------------------------


def _check_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (V,), got shape {logits.shape}")
    if logits.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got dtype {logits.dtype}")
    return logits


def _check_previous_ids(previous_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
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


def greedy_token(logits: np.ndarray) -> int:
    """The greedy next token of logits (V,): the argmax, lowest id on ties; the same token,
    and the same errors (NaN, +inf, all -inf), as ``Sampler`` with temperature 0 and no
    repetition penalty. The `gpt` step model answers this to clients that ask only for it."""
    logits = _check_logits(logits)
    _max_or_raise(logits)
    return int(np.argmax(logits))  # float32 -> float64 keeps the order: same argmax


def _check_penalty(penalty: float) -> float:
    penalty = _check_real("repetition_penalty", penalty)
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
    return penalty


def _max_or_raise(logits: np.ndarray) -> float:
    # one pass: np.max propagates NaN, and also tells +inf / all -inf apart
    m = float(logits.max())
    if math.isnan(m):
        raise ValueError("logits contain NaN")
    if m == math.inf:
        raise ValueError("logits contain +inf")
    if m == -math.inf:
        raise ValueError("logits are all -inf: no token can be chosen")
    return m


def _penalise(x: np.ndarray, ids: np.ndarray, penalty: float) -> None:
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
    logits = _check_logits(logits)
    penalty = _check_penalty(penalty)
    ids = _check_previous_ids(previous_ids, logits.shape[0])
    out = logits.copy()
    _penalise(out, ids, penalty)
    return out


def _top_m_indices(x: np.ndarray, m: int, ws: _Scratch | None = None) -> np.ndarray:
    """Indices of the m largest values, ascending; ties at the cut go to the lower ids.

    argpartition alone picks an arbitrary subset of tied values; this is O(V) too but
    deterministic, so top-k = 1 is exactly argmax and client/server agree.
    """
    n = x.shape[0]
    cand: np.ndarray | None = None
    if m * _SELECT_STRIDE < n:
        # numpy's introselect takes 0.1-0.8 ms on 50257 values depending on the data;
        # a threshold from every 16th value usually leaves ~2m candidates to select from
        sample = x[::_SELECT_STRIDE]
        r = min(sample.shape[0], 2 * (m // _SELECT_STRIDE) + 8)
        threshold = np.partition(sample, sample.shape[0] - r)[sample.shape[0] - r]
        cand = np.flatnonzero(x >= threshold)  # (c,) holds the top m if c >= m
        if cand.shape[0] < m:  # an unlucky sample: select over everything
            cand = None
    if cand is None:
        vals = x
        tmp = _empty(ws, "partition", n, x.dtype)
        np.copyto(tmp, x)
        tmp.partition(n - m)  # in place: no (V,) copy or index array
        kth = tmp[n - m]
    else:
        vals = x[cand]  # (c,)
        kth = np.partition(vals, vals.shape[0] - m)[vals.shape[0] - m]
    above = np.flatnonzero(vals > kth)
    tied = np.flatnonzero(vals == kth)[: m - above.shape[0]]  # vals are in id order
    idx = np.sort(np.concatenate([above, tied]))
    return idx if cand is None else cand[idx]


def _exp(z: np.ndarray, ws: _Scratch | None = None, name: str = "exp") -> np.ndarray:
    """exp of z <= 0; results that would be subnormal (< 2.2e-308) are flushed to 0.

    Tiny temperatures push logits far below -708, where libm's exp takes a slow
    subnormal path (~5x); a 1e-308 probability changes nothing.
    """
    out = _empty(ws, name, z.shape[0])
    if z.min() < _FTZ_BELOW:
        np.copyto(out, z)
        out[out < _FTZ_BELOW] = -np.inf
        z = out
    return np.exp(z, out=out)


def _cut(p: np.ndarray, members: np.ndarray, base: float, top_p: float) -> tuple[np.ndarray, float]:
    """Walk ``members`` by prob descending (ties: lower position first) from mass ``base``.

    Returns (positions kept in walk order, mass reached). Stops at the first position
    where the running mass >= top_p, inclusive; keeps all members if it never gets there.
    """
    order = members[np.argsort(-p[members], kind="stable")]
    cdf = np.cumsum(p[order])
    if base:
        cdf += base
    cut = min(int(np.searchsorted(cdf, top_p, side="left")) + 1, order.shape[0])
    return order[:cut], float(cdf[cut - 1])


def _nucleus(
    p: np.ndarray, logp: np.ndarray, top_p: float, ws: _Scratch | None = None
) -> np.ndarray:
    """Mask (n,) bool of the smallest set whose cumulative prob >= top_p.

    p: probabilities; logp: any increasing function of p (the scaled logits), used to
    bucket. Tokens are taken by prob descending, ties by position; the top one always.
    Sorting all V tokens (~7 ms for 50257 without AVX-512) is avoided:
      1. the best 256 tokens are sorted; LM distributions usually have their nucleus
         there;
      2. otherwise tokens are bucketed by logp (O(V)), bucket masses summed from the
         top, and only the bucket where the mass crosses top_p is sorted.
    Sums are float64; the set equals a full sort's up to rounding at the exact boundary.
    """
    n = p.shape[0]
    keep = np.zeros(n, dtype=bool)
    if n <= _NUCLEUS_FIRST_GUESS:
        keep[_cut(p, np.arange(n), 0.0, top_p)[0]] = True
        return keep
    kept, mass = _cut(p, _top_m_indices(p, _NUCLEUS_FIRST_GUESS, ws), 0.0, top_p)
    if mass >= top_p:
        keep[kept] = True
        return keep

    hi, lo_all = float(logp.max()), float(logp.min())
    # masked tokens (p == 0, logp == -inf) go to the bottom bucket
    lo = lo_all if lo_all > -np.inf else float(logp[p > 0].min())
    if lo == hi:  # all remaining tokens equally likely: ties -> lowest positions first
        keep[_cut(p, np.arange(n), 0.0, top_p)[0]] = True
        return keep
    lo = max(lo, hi + _FTZ_BELOW)  # everything lower has p == 0: bottom bucket
    clip = lo_all < lo
    nb = _NUCLEUS_BUCKETS
    f = _empty(ws, "bucket_f", n)
    np.subtract(np.maximum(logp, lo, out=f) if clip else logp, lo, out=f)  # (n,) >= 0
    np.multiply(f, nb / (hi - lo), out=f)
    bucket = _empty(ws, "bucket", n, np.intp)  # intp: what bincount wants, no copy
    np.copyto(bucket, f, casting="unsafe")  # floor, as f >= 0
    np.minimum(bucket, nb - 1, out=bucket)
    from_top = np.cumsum(np.bincount(bucket, weights=p, minlength=nb)[::-1])  # (nb,)
    # first bucket (from the top) whose inclusion reaches top_p
    b = nb - 1 - min(int(np.searchsorted(from_top, top_p, side="left")), nb - 1)
    np.greater(bucket, b, out=keep)  # all buckets above b are in the nucleus
    mass = float(from_top[nb - 2 - b]) if b < nb - 1 else 0.0
    while b >= 0:  # normally one pass; more only if rounding left us just short
        members = np.flatnonzero(bucket == b)
        if members.shape[0]:
            kept, mass = _cut(p, members, mass, top_p)
            keep[kept] = True
            if mass >= top_p:
                break
        b -= 1
    return keep


def _filtered_probs(
    z: np.ndarray, *, temperature: float, top_k: int, top_p: float, ws: _Scratch | None = None
) -> tuple[np.ndarray | None, np.ndarray, float | None]:
    """Temperature, then top-k, then top-p on shifted logits z (V,) float64, max(z) == 0.

    Returns (ids ascending, or None for all V, masked ones at p == 0; their probs,
    float64, summing to 1; sum(exp(z / T)) over all V when it was computed, else None).
    Sparse after top-k on purpose: the sampler then only touches k values, not V.
    """
    n = z.shape[0]
    # max(z) == 0, so a tiny temperature cannot overflow to +inf (0 / T == 0)
    x = np.divide(z, temperature, out=_empty(ws, "scaled", n)) if temperature != 1.0 else z
    ids: np.ndarray | None = None
    if 0 < top_k < n:
        ids = _top_m_indices(x, top_k, ws)  # (k,)
        x = x[ids]
        x -= x.max()  # a copy: fine to shift
    e = _exp(x, ws)
    total = float(e.sum())
    total_all = total if ids is None else None
    p = np.divide(e, total, out=e)
    if top_p < 1.0:
        keep = _nucleus(p, x, top_p, ws)  # (n,) bool
        if ids is None:  # stay dense (V,): zeros need no index arrays, and cost nothing later
            np.multiply(p, keep, out=p)
        else:
            ids, p = ids[keep], p[keep]
        p /= p.sum()
    return ids, p, total_all


def logits_to_probs(
    logits: np.ndarray, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """Next-token distribution (V,) float64: temperature, then top-k, then top-p.

    top-p is applied to the distribution renormalised after top-k (HF warper order).
    temperature == 0 gives the one-hot of the argmax (lowest id on ties), i.e. greedy.
    Masked tokens get exactly 0.
    """
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # validates
    x = _check_logits(logits).astype(np.float64)
    m = _max_or_raise(x)
    probs = np.zeros(x.shape[0], dtype=np.float64)
    if temperature == 0:
        probs[int(np.argmax(x))] = 1.0
        return probs
    x -= m
    ids, p, _ = _filtered_probs(x, temperature=temperature, top_k=top_k, top_p=top_p)
    if ids is None:
        return p
    probs[ids] = p
    return probs


def _inverse_cdf(p: np.ndarray, u: float) -> int:
    """Position i with cdf[i-1] <= u*total < cdf[i]: zero-probability entries never win.

    Above a few thousand entries, cumsum (sequential, ~0.2 ms for 50257) is done on
    block sums first and then inside one block only.
    """
    n = p.shape[0]
    if n > _CDF_BLOCK * 16:
        starts = np.arange(0, n, _CDF_BLOCK)
        block_cdf = np.cumsum(np.add.reduceat(p, starts))  # (n_blocks,)
        target = u * block_cdf[-1]
        b = min(int(np.searchsorted(block_cdf, target, side="right")), starts.shape[0] - 1)
        offset = int(starts[b])
        cdf = np.cumsum(p[offset : offset + _CDF_BLOCK])
        if b:
            cdf += block_cdf[b - 1]
        i = int(np.searchsorted(cdf, target, side="right"))
        if i < cdf.shape[0] and p[offset + i] > 0:
            return offset + i
        # rounding put the target past this block's last positive entry: plain path
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= n or p[i] == 0:  # u*total rounded up to total: last token that can win
        i = int(np.flatnonzero(p)[-1])
    return i


class Sampler:
    """Picks tokens for ONE sequence with its own seeded PCG64 generator.

    ``sample`` returns ``(token_id, logprob)``. ``logprob`` is the log-softmax of the
    RAW model logits (before repetition penalty, temperature, top-k, top-p) at the
    chosen token, in float64 then converted to a Python float. Reason: it is the
    model's own belief, comparable across requests with different sampling settings
    (what OpenAI's ``logprobs`` and vLLM's default ``raw_logprobs`` report); the
    processed distribution can always be recomputed with ``logits_to_probs``.

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
        self._ws = _Scratch()

    def sample(
        self, logits: np.ndarray, previous_ids: Sequence[int] | np.ndarray = (), *, logprob: bool = True
    ) -> tuple[int, float]:
        """Next token from logits (V,); previous_ids = prompt + generated ids so far.

        logprob=False skips the token's log-probability (NaN instead): a full pass over the
        vocabulary per token that a caller who does not report it need not pay (0.5 ms at 50257).
        The token, and the random draws, are the same either way."""
        logits = _check_logits(logits)
        params, ws, n = self.params, self._ws, logits.shape[0]
        raw = _empty(ws, "raw", n)  # (V,) float64 copy of the model's logits
        np.copyto(raw, logits)
        m = _max_or_raise(raw)
        penalised = params.repetition_penalty != 1.0
        if penalised:
            x = _empty(ws, "penalised", n)
            np.copyto(x, raw)
            _penalise(x, _check_previous_ids(previous_ids, n), params.repetition_penalty)
        else:
            x = raw
        total_raw = None  # sum(exp(raw - m)), when a step below computes it anyway
        if params.greedy:
            token = int(np.argmax(x))  # first max: lowest id on ties; no draw
        else:
            # shift in place: unpenalised, raw becomes raw - m (logprob below allows it)
            z = np.subtract(x, m if x is raw else float(x.max()), out=x)
            ids, p, total = _filtered_probs(
                z, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, ws=ws
            )
            if not penalised and params.temperature == 1.0:
                total_raw = total
            u = float(self.rng.random())  # the one draw for this token
            self.num_draws += 1
            i = _inverse_cdf(p, u)
            token = i if ids is None else int(ids[i])
            if x is raw:
                m = 0.0  # raw now holds raw - m
        if not logprob:
            return token, math.nan
        if total_raw is None:
            total_raw = float(_exp(np.subtract(raw, m, out=_empty(ws, "lse", n)), ws, "lse").sum())
        return token, float(raw[token] - m - math.log(total_raw))

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
