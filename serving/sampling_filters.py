"""Temperature, top-k, top-p and the inverse-CDF draw: pure numpy steps on float64 logits.

Deterministic (ties go to the lower id) and without a full-vocabulary sort: see the
determinism contract in ``serving.sampling``. ``Scratch`` holds the (V,) work arrays a
``Sampler`` reuses from token to token; the pure functions pass ``None`` and allocate.
"""
from __future__ import annotations

import numpy as np

from serving.sampling_params import SamplingParams, check_logits, max_or_raise

# Top-p first looks for the nucleus among this many best tokens: LM distributions
# usually put top_p of their mass in a few hundred tokens...
_NUCLEUS_FIRST_GUESS = 256
# ... and otherwise buckets all tokens by log-prob, so that only one bucket is sorted
_NUCLEUS_BUCKETS = 4096
# top-m selection takes its threshold from every 16th value (see _top_m_indices)
_SELECT_STRIDE = 16
# exp(x) for x < -708 is subnormal; see exp_flushed
_FTZ_BELOW = -708.0
# inverse CDF over more than 16 blocks of this size sums blocks first (see inverse_cdf)
_CDF_BLOCK = 256


class Scratch:
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


def work_array(ws: Scratch | None, name: str, n: int, dtype: type = np.float64) -> np.ndarray:
    return np.empty(n, dtype=dtype) if ws is None else ws.get(name, n, dtype)


def _top_m_indices(x: np.ndarray, m: int, ws: Scratch | None = None) -> np.ndarray:
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
        tmp = work_array(ws, "partition", n, x.dtype)
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


def top_ids(x: np.ndarray, m: int, ws: Scratch | None = None) -> np.ndarray:
    """Ids of the m largest values of x (V,), largest first; ties go to the lower id."""
    idx = _top_m_indices(x, min(m, x.shape[0]), ws)  # ascending ids
    return idx[np.argsort(-x[idx], kind="stable")]


def exp_flushed(z: np.ndarray, ws: Scratch | None = None, name: str = "exp") -> np.ndarray:
    """exp of z <= 0; results that would be subnormal (< 2.2e-308) are flushed to 0.

    Tiny temperatures push logits far below -708, where libm's exp takes a slow
    subnormal path (~5x); a 1e-308 probability changes nothing.
    """
    out = work_array(ws, name, z.shape[0])
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
    p: np.ndarray, logp: np.ndarray, top_p: float, ws: Scratch | None = None
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
    f = work_array(ws, "bucket_f", n)
    np.subtract(np.maximum(logp, lo, out=f) if clip else logp, lo, out=f)  # (n,) >= 0
    np.multiply(f, nb / (hi - lo), out=f)
    bucket = work_array(ws, "bucket", n, np.intp)  # intp: what bincount wants, no copy
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


def filtered_probs(
    z: np.ndarray, *, temperature: float, top_k: int, top_p: float, ws: Scratch | None = None
) -> tuple[np.ndarray | None, np.ndarray, float | None]:
    """Temperature, then top-k, then top-p on shifted logits z (V,) float64, max(z) == 0.

    Returns (ids ascending, or None for all V, masked ones at p == 0; their probs,
    float64, summing to 1; sum(exp(z / T)) over all V when it was computed, else None).
    Sparse after top-k on purpose: the sampler then only touches k values, not V.
    """
    n = z.shape[0]
    # max(z) == 0, so a tiny temperature cannot overflow to +inf (0 / T == 0)
    x = np.divide(z, temperature, out=work_array(ws, "scaled", n)) if temperature != 1.0 else z
    ids: np.ndarray | None = None
    if 0 < top_k < n:
        ids = _top_m_indices(x, top_k, ws)  # (k,)
        x = x[ids]
        x -= x.max()  # a copy: fine to shift
    e = exp_flushed(x, ws)
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
    x = check_logits(logits).astype(np.float64)
    m = max_or_raise(x)
    probs = np.zeros(x.shape[0], dtype=np.float64)
    if temperature == 0:
        probs[int(np.argmax(x))] = 1.0
        return probs
    x -= m
    ids, p, _ = filtered_probs(x, temperature=temperature, top_k=top_k, top_p=top_p)
    if ids is None:
        return p
    probs[ids] = p
    return probs


def inverse_cdf(p: np.ndarray, u: float) -> int:
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
