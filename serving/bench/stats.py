"""Measurement types and statistics of the benchmark: one request's timing, one level's numbers.

The low module of `serving.bench`: it imports nothing of the bench (nor torch), so the PyTorch
baselines (`export.baselines`) can build `RequestTiming`s without a circle.

Every path is measured the same way: a *generator* takes a prompt (token ids) and produces
`max_tokens` new tokens, stamping the wall-clock time (`time.perf_counter`) at which it sends
the request and at which each new token arrives (`RequestTiming`). From those stamps:

- TTFT: first token - sent (prefill + one round trip);
- ITL: the gaps between consecutive tokens (one decode step + one round trip each);
- tokens/s per stream: (n - 1) / (last - first) — the decode rate of one request, prefill
  excluded, so it is comparable with 1 / ITL and with the baselines' decode rates;
- aggregate tokens/s: all new tokens of a concurrency level / its wall time;
- requests/s: requests of a level / its wall time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class RequestTiming:
    """One request: when it was sent and when each new token arrived (perf_counter seconds)."""

    sent: float
    token_times: tuple[float, ...]
    prompt_tokens: int
    tokens: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def itls(self) -> np.ndarray:
        return np.diff(np.asarray(self.token_times, dtype=np.float64))

    @property
    def decode_tokens_per_s(self) -> float:
        """(n - 1) / (last - first): the decode rate, prefill excluded; nan for one token."""
        span = self.token_times[-1] - self.token_times[0]
        return (self.n_tokens - 1) / span if self.n_tokens > 1 and span > 0 else float("nan")

    @property
    def finished(self) -> float:
        return self.token_times[-1]


# prompt ids, max new tokens -> the request's timing
Generator = Callable[[Sequence[int], int], RequestTiming]


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """q-th percentile (linear interpolation), nan for no values."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


@dataclass(frozen=True)
class LevelStats:
    """The numbers of one concurrency level (or one baseline run, concurrency 1)."""

    concurrency: int
    requests: int
    prompt_tokens: int
    output_tokens: int  # new tokens per request asked for
    tokens: int  # new tokens received, all requests
    wall_s: float
    ttft_ms: dict[str, float]  # p50, p90, p99
    # the closed loop's start: the first `concurrency` requests (sent together, one per stream)
    # queue behind each other's prefills; the steady state is every later request
    ttft_start_ms: dict[str, float]  # p50, p90, max
    ttft_steady_ms: dict[str, float]  # p50, p90, p99 (nan without later requests)
    itl_ms: dict[str, float]  # p50, p99, mean
    tokens_per_s_per_stream: float  # mean over requests of (n - 1) / (last - first)
    aggregate_tokens_per_s: float  # tokens / wall
    requests_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def level_stats(timings: Sequence[RequestTiming], *, concurrency: int, output_tokens: int,
                wall_s: Optional[float] = None) -> LevelStats:
    """Summarise the requests of one level; wall defaults to first send .. last token."""
    if not timings:
        raise ValueError("timings: no requests to summarise")
    if any(t.n_tokens == 0 for t in timings):
        raise ValueError("timings: a request produced no tokens")
    if wall_s is None:
        wall_s = max(t.finished for t in timings) - min(t.sent for t in timings)
    ttft = [t.ttft * 1e3 for t in timings]
    by_send = sorted(timings, key=lambda t: t.sent)
    start = [t.ttft * 1e3 for t in by_send[:concurrency]]
    steady = [t.ttft * 1e3 for t in by_send[concurrency:]]
    itl = np.concatenate([t.itls for t in timings]) * 1e3
    rates = [r for r in (t.decode_tokens_per_s for t in timings) if math.isfinite(r)]
    n_tokens = sum(t.n_tokens for t in timings)
    return LevelStats(
        concurrency=concurrency,
        requests=len(timings),
        prompt_tokens=int(round(float(np.mean([t.prompt_tokens for t in timings])))),
        output_tokens=output_tokens,
        tokens=n_tokens,
        wall_s=wall_s,
        ttft_ms={"p50": percentile(ttft, 50), "p90": percentile(ttft, 90), "p99": percentile(ttft, 99)},
        ttft_start_ms={"p50": percentile(start, 50), "p90": percentile(start, 90), "max": max(start)},
        ttft_steady_ms={"p50": percentile(steady, 50), "p90": percentile(steady, 90), "p99": percentile(steady, 99)},
        itl_ms={"p50": percentile(itl, 50), "p99": percentile(itl, 99),
                "mean": float(itl.mean()) if itl.size else float("nan")},
        tokens_per_s_per_stream=float(np.mean(rates)) if rates else float("nan"),
        aggregate_tokens_per_s=n_tokens / wall_s if wall_s > 0 else float("nan"),
        requests_per_s=len(timings) / wall_s if wall_s > 0 else float("nan"),
    )


def random_prompts(n: int, length: int, *, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` random token ids in [1, vocab_size) (0 is often eos; random ids
    also make every request's work the same, whatever the tokenizer)."""
    if length < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {length}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab_size, size=length).tolist() for _ in range(n)]


def greedy_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> float:
    """Fraction of positions at which two greedy continuations of the same prompts agree,
    position by position (free-running: after a first divergence the contexts differ, so the
    later positions tend to disagree too — the strict reading of "agreement")."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("reference and candidate need the same, non-zero number of continuations")
    same = total = 0
    for a, b in zip(reference, candidate):
        n = min(len(a), len(b))
        same += sum(int(x == y) for x, y in zip(a[:n], b[:n]))
        total += max(len(a), len(b))
    return same / total if total else float("nan")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def judge(values: Mapping[str, Optional[float]], targets: Sequence[tuple[str, str, float, str]], *,
          skipped: Optional[Mapping[str, str]] = None) -> dict[str, dict[str, Any]]:
    """The `ratios` object of bench.json: value, target and pass/fail per target, in order.

    A row in `skipped` that has no value (not measured, for the reason given) gets pass None and
    its reason; any other value that could not be measured is None and fails (pass: false)."""
    skipped = skipped or {}
    out: dict[str, dict[str, Any]] = {}
    for key, op, target, doc in targets:
        value = values.get(key)
        row: dict[str, Any] = {"value": None, "target": f"{op} {target:g}", "pass": False, "what": doc}
        if value is not None and math.isfinite(value):
            row.update(value=value, **{"pass": value >= target if op == ">=" else value <= target})
        elif key in skipped:
            row.update(skipped=skipped[key], **{"pass": None})
        out[key] = row
    return out
