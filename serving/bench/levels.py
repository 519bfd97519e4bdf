"""Closed-loop concurrency levels against a server, the 8-vs-1 pairs of adjacent runs, ITL vs context.

A level is N concurrent streams, each with its own generator (its own connection), taking
prompts from one queue until it is empty."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from serving.bench.metrics import batching_summary, try_scrape
from serving.bench.progress import NoProgress, Progress
from serving.bench.served import Mode, ServedGenerator
from serving.bench.stats import Generator, LevelStats, RequestTiming, level_stats, percentile, random_prompts

logger = logging.getLogger(__name__)


CONTEXT_PROMPTS = (96, 996)  # decode at context ~100 and ~1000 (gpt2: n_positions 1024)
CONTEXT_STEPS = 17  # new tokens: 16 inter-token latencies per request
CONTEXT_REPEATS = 3


def run_level(make_generator: Callable[[], Generator], prompts: Sequence[Sequence[int]], *,
              concurrency: int, output_tokens: int, progress: Progress = NoProgress(),
              description: str = "") -> tuple[LevelStats, list[RequestTiming]]:
    """Closed loop: `concurrency` workers, each with its own generator (its own connection),
    take the prompts from one queue until it is empty."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not prompts:
        raise ValueError("prompts: need at least one request")
    work: queue.SimpleQueue[Sequence[int]] = queue.SimpleQueue()
    for p in prompts:
        work.put(p)
    # connections are made before the clock starts
    generators = [make_generator() for _ in range(concurrency)]
    timings: list[RequestTiming] = []
    lock = threading.Lock()
    progress.start(description or f"concurrency {concurrency}", len(prompts))

    def worker(generate: Generator) -> None:
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            timing = generate(prompt, output_tokens)
            with lock:
                timings.append(timing)
            progress.advance()

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as pool:
        for f in [pool.submit(worker, g) for g in generators]:
            f.result()  # re-raises a worker's error
    wall = time.perf_counter() - start
    _close_all(generators)
    return level_stats(timings, concurrency=concurrency, output_tokens=output_tokens, wall_s=wall), timings


def _close_all(generators: Sequence[Any]) -> None:
    for g in generators:
        close = getattr(g, "close", None)
        if callable(close):
            close()


def warm_up(url: str, *, mode: Mode, prompt_tokens: int, concurrency: int = 1) -> None:
    """A few short requests at the prompt length, so first-call costs (session arenas, kernel
    choice, gRPC channel set-up) are not measured."""
    generators = [ServedGenerator(url, mode=mode) for _ in range(concurrency)]
    try:
        vocab = generators[0].config.vocab_size
        prompts = random_prompts(concurrency, prompt_tokens, vocab_size=vocab, seed=10_000)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(lambda gp: gp[0](gp[1], 4), zip(generators, prompts)))
    finally:
        _close_all(generators)


def bench_levels(url: str, *, mode: Mode, concurrency: Sequence[int], prompt_tokens: int, output_tokens: int,
                 requests_for: Callable[[int], int], vocab_size: int, seed: int = 0,
                 progress: Progress = NoProgress(), label: str = "served", metrics_url: Optional[str] = None,
                 batching: Optional[dict[str, Any]] = None) -> list[tuple[LevelStats, list[RequestTiming]]]:
    """One closed-loop level per concurrency; level c uses prompts seeded with seed + c.

    With metrics_url, `batching[str(c)]` gets what the server's batching did in level c."""
    out = []
    for c in concurrency:
        prompts = random_prompts(requests_for(c), prompt_tokens, vocab_size=vocab_size, seed=seed + c)
        before = try_scrape(metrics_url)
        stats, timings = run_level(lambda: ServedGenerator(url, mode=mode), prompts, concurrency=c,
                                   output_tokens=output_tokens, progress=progress,
                                   description=f"{label}: {c} stream(s)")
        after = try_scrape(metrics_url)
        if batching is not None and before is not None and after is not None:
            batching[str(c)] = batching_summary(before, after)
        logger.info("%s c=%d: ITL p50 %.2f ms, %.1f tok/s per stream, %.1f tok/s aggregate", label, c,
                    stats.itl_ms["p50"], stats.tokens_per_s_per_stream, stats.aggregate_tokens_per_s)
        out.append((stats, timings))
    return out


def aggregate_pairs(url: str, *, mode: Mode, last_eight: Mapping[str, Any], prompt_tokens: int, output_tokens: int,
                    requests_for: Callable[[int], int], vocab_size: int,
                    progress: Progress = NoProgress()) -> dict[str, Any]:
    """8 streams ÷ 1 stream, aggregate tokens/s, from adjacent runs: right after the levels'
    8-stream run (`last_eight`), 1, 8 and 1 streams again on the same prompts, giving three
    ratios of neighbours; the median is the one reported. The levels run 2 and 4 streams between
    1 and 8, minutes apart, and the machine's speed drifts by tens of percent in that time."""
    runs = bench_levels(url, mode=mode, concurrency=(1, 8, 1), prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                        requests_for=requests_for, vocab_size=vocab_size, progress=progress, label="pairs")
    one_a, eight, one_b = (st.aggregate_tokens_per_s for st, _ in runs)
    ratios = [last_eight["aggregate_tokens_per_s"] / one_a, eight / one_a, eight / one_b]
    return {"order": ["8 (levels)", "1", "8", "1"],
            "aggregate_tokens_per_s": [last_eight["aggregate_tokens_per_s"], one_a, eight, one_b],
            "ratios": ratios, "ratio": float(np.median(ratios))}


def context_itl(generate: Generator, *, vocab_size: int, prompt_lengths: Sequence[int] = CONTEXT_PROMPTS,
                steps: int = CONTEXT_STEPS, repeats: int = CONTEXT_REPEATS,
                progress: Progress = NoProgress(), label: str = "served") -> dict[str, Any]:
    """ITL p50/mean of decode steps right after prompts of each length (batch 1).

    The lengths take turns (short, long, short, long, ...), and ratio_p50 is the median of the
    per-turn ratios of the longest to the shortest: the machine's speed drifts by tens of
    percent within minutes here, and a ratio of two runs minutes apart measured that drift."""
    progress.start(f"{label}: ITL vs context {'/'.join(map(str, prompt_lengths))}", len(prompt_lengths) * repeats)
    prompts = {n: random_prompts(repeats, n, vocab_size=vocab_size, seed=500 + n) for n in prompt_lengths}
    timings: dict[int, list[RequestTiming]] = {n: [] for n in prompt_lengths}
    for r in range(repeats):
        for n in prompt_lengths:
            timings[n].append(generate(prompts[n][r], steps))
            progress.advance()
    out: dict[str, Any] = {}
    for n in prompt_lengths:
        itl = np.concatenate([t.itls for t in timings[n]]) * 1e3
        out[str(n)] = {"context": n + steps // 2, "itl_ms_p50": percentile(itl, 50), "itl_ms_mean": float(itl.mean()),
                       "itl_ms_p99": percentile(itl, 99), "steps": int(itl.size)}
    lo, hi = min(prompt_lengths), max(prompt_lengths)
    pairs = [float(np.median(b.itls) / np.median(a.itls)) for a, b in zip(timings[lo], timings[hi])]
    out["paired_ratios"] = pairs
    out["ratio_p50"] = float(np.median(pairs))
    return out
