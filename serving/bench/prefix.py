"""The `prefix` scenario: requests that share a long system prompt (chat traffic), against the
server's prefix cache.

Paired, on one server: for each request i, a prompt of the same length the server has never
seen (`fresh system prompt + user_i`: nothing cached) and `shared system prompt + user_i` (its
system blocks cached by the warm-up request), in alternating order, so a drift of the machine's
speed cancels in the per-pair ratio of TTFT; `ttft_ratio` is their median. Then the fresh prompt
is sent again — now cached — and its greedy tokens must be the ones of its first, uncached run
(`greedy_identical`). Last, `concurrency` streams send shared-prompt requests at once (TTFT
percentiles). The server's prefix-cache counters are read around the scenario when its metrics
port is known.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from serving.bench.levels import run_level
from serving.bench.metrics import try_scrape
from serving.bench.progress import NoProgress, Progress
from serving.bench.stats import Generator, percentile, random_prompts

SYSTEM_TOKENS = 512
NEW_TOKENS = 16
OUTPUT_TOKENS = 8
REQUESTS = 6
PREFIX_METRICS = ("gptpipe_prefix_cache_queries_total", "gptpipe_prefix_cache_hits_total",
                  "gptpipe_prefix_cache_hit_tokens_total")


def prefix_scenario(generate: Generator, *, vocab_size: int, system_tokens: int = SYSTEM_TOKENS,
                    new_tokens: int = NEW_TOKENS, output_tokens: int = OUTPUT_TOKENS, requests: int = REQUESTS,
                    concurrency: int = 8, make_generator: Optional[Callable[[], Generator]] = None,
                    metrics_url: Optional[str] = None, seed: int = 0,
                    progress: Progress = NoProgress()) -> dict[str, Any]:
    """The scenario's numbers (see the module docstring); `make_generator` (one connection per
    stream) enables the concurrent part."""
    if requests < 1 or system_tokens < 1 or new_tokens < 1 or output_tokens < 1:
        raise ValueError("requests, system_tokens, new_tokens and output_tokens must be >= 1")
    system = random_prompts(1, system_tokens, vocab_size=vocab_size, seed=seed + 700)[0]
    users = random_prompts(requests + 1, new_tokens, vocab_size=vocab_size, seed=seed + 701)
    fresh = random_prompts(requests, system_tokens, vocab_size=vocab_size, seed=seed + 702)
    before = try_scrape(metrics_url, names=PREFIX_METRICS)
    progress.start(f"prefix: {requests} x ({system_tokens} shared + {new_tokens} new tokens)", 3 * requests + 1)
    generate(system + users[-1], output_tokens)  # the system prompt's blocks enter the cache
    progress.advance()
    cached_ms, uncached_ms, pairs, identical = [], [], [], []
    for i in range(requests):
        runs = {}
        order = ("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")
        for kind in order:
            prompt = (fresh[i] if kind == "uncached" else system) + users[i]
            runs[kind] = generate(prompt, output_tokens)
            progress.advance()
        again = generate(fresh[i] + users[i], output_tokens)  # the same prompt, cached this time
        progress.advance()
        identical.append(again.tokens == runs["uncached"].tokens)
        cached_ms.append(runs["cached"].ttft * 1e3)
        uncached_ms.append(runs["uncached"].ttft * 1e3)
        pairs.append(runs["cached"].ttft / runs["uncached"].ttft)
    out: dict[str, Any] = {
        "system_tokens": system_tokens, "new_tokens": new_tokens, "output_tokens": output_tokens,
        "requests": requests,
        "ttft_ms_cached": {"p50": percentile(cached_ms, 50), "values": cached_ms},
        "ttft_ms_uncached": {"p50": percentile(uncached_ms, 50), "values": uncached_ms},
        "paired_ratios": pairs, "ttft_ratio": float(np.median(pairs)),
        "greedy_identical": all(identical), "greedy_identical_runs": identical,
    }
    if make_generator is not None and concurrency > 1:
        out["concurrent"] = _concurrent(make_generator, system, users, concurrency=concurrency,
                                        output_tokens=output_tokens)
    after = try_scrape(metrics_url, names=PREFIX_METRICS)
    if before is not None and after is not None:
        out["server_prefix_cache"] = {k.removeprefix("gptpipe_prefix_cache_").removesuffix("_total"):
                                      after.get(k, 0.0) - before.get(k, 0.0) for k in PREFIX_METRICS}
    return out


def _concurrent(make_generator: Callable[[], Generator], system: list[int], users: list[list[int]], *,
                concurrency: int, output_tokens: int) -> dict[str, Any]:
    """`concurrency` streams, each one shared-prompt request, sent at once."""
    prompts = [system + users[i % len(users)][::-1] for i in range(concurrency)]  # new suffixes: no full hit
    stats, _ = run_level(make_generator, prompts, concurrency=concurrency, output_tokens=output_tokens)
    return {"concurrency": concurrency, "ttft_ms": stats.ttft_ms, "itl_ms": stats.itl_ms}
