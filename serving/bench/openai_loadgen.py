"""A load generator for the OpenAI endpoint, paired with the direct gRPC client on the same load.

``compare(...)`` runs, for each concurrency, the same requests (token-id prompts, greedy,
``ignore_eos`` so every request makes exactly ``max_tokens`` tokens) through the frontend's
streamed /v1/completions and through :class:`serving.AsyncClient` straight to Triton,
alternating the two in rounds so that both see the same machine load, and reports tokens/s,
TTFT and ITL of each and the ratio frontend ÷ direct. For ``gptpipe bench --endpoint openai``
(to be wired in there) and by hand::

    python -m serving.bench.openai_loadgen --openai http://127.0.0.1:9000 --grpc localhost:8001 \\
        --model demo --concurrency 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional
from urllib.parse import urlsplit

from serving import AsyncClient


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    total_s: float
    tokens: int

    @property
    def itl_s(self) -> float:
        return (self.total_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else float("nan")


@dataclass(frozen=True)
class Level:
    endpoint: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float  # medians
    itl_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def openai_stream(base_url: str, body: dict, *, api_key: Optional[str] = None,
                        timeout_s: float = 120.0) -> RequestTiming:
    """One streamed /v1/completions request over a plain asyncio socket (no client library
    between the measurement and the wire); the token count is the final usage chunk's."""
    url = urlsplit(base_url)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port or 80), timeout_s)
    try:
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                      f"{auth}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout_s)
        if b" 200 " not in status:
            rest = await asyncio.wait_for(reader.read(), timeout_s)
            raise RuntimeError(f"{status.decode().strip()}: {rest.decode(errors='replace')[-500:]}")
        first = last = None
        tokens = 0
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout_s)
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if event.get("usage") and not event.get("choices"):
                tokens = event["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
    finally:
        writer.close()
    if first is None or last is None:
        raise RuntimeError("the stream ended without a token")
    return RequestTiming(first - start, last - start, tokens)


async def grpc_stream(client: AsyncClient, prompt_ids: Sequence[int], max_tokens: int) -> RequestTiming:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    events = await client.events(list(prompt_ids), max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
    async for _ in events:
        now = time.perf_counter()
        first = first if first is not None else now
        last, tokens = now, tokens + 1
    assert first is not None and last is not None
    return RequestTiming(first - start, last - start, tokens)


async def _level(endpoint: str, one: Callable[[], Awaitable[RequestTiming]], concurrency: int,
                 requests: int) -> Level:
    todo = list(range(requests))
    timings: list[RequestTiming] = []

    async def worker() -> None:
        while todo:
            todo.pop()
            timings.append(await one())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return Level(endpoint, concurrency, requests, sum(t.tokens for t in timings), seconds,
                 statistics.median(t.ttft_s for t in timings) * 1e3,
                 statistics.median(t.itl_s for t in timings if t.tokens > 1) * 1e3)


async def compare(openai_url: str, grpc_url: str, model: str, *, concurrency: Sequence[int] = (1, 8),
                  requests_per_stream: int = 4, max_tokens: int = 64, prompt_tokens: int = 32, rounds: int = 3,
                  api_key: Optional[str] = None) -> list[dict]:
    """Paired rounds per concurrency: frontend, direct, frontend, direct, ... (see the module doc)."""
    async with AsyncClient(grpc_url) as client:
        await client.setup()
        prompt = [1 + (i * 7) % (client.generation_config.vocab_size - 1) for i in range(prompt_tokens)]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        await openai_stream(openai_url, body, api_key=api_key)  # warm-up, both ways
        await grpc_stream(client, prompt, max_tokens)
        out = []
        for c in concurrency:
            n = c * requests_per_stream
            pairs = []
            for _ in range(rounds):
                front = await _level("openai", lambda: openai_stream(openai_url, body, api_key=api_key), c, n)
                direct = await _level("grpc", lambda: grpc_stream(client, prompt, max_tokens), c, n)
                pairs.append((front, direct))
            ratios = [f.tokens_per_s / d.tokens_per_s for f, d in pairs]
            out.append({
                "concurrency": c, "requests": n, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
                "ratio_median": statistics.median(ratios), "ratios": ratios,
                "openai": [asdict(f) | {"tokens_per_s": f.tokens_per_s} for f, _ in pairs],
                "grpc": [asdict(d) | {"tokens_per_s": d.tokens_per_s} for _, d in pairs],
            })
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description="frontend tokens/s ÷ direct gRPC client tokens/s, paired")
    parser.add_argument("--openai", default="http://127.0.0.1:9000")
    parser.add_argument("--grpc", default="localhost:8001")
    parser.add_argument("--model", default="gptpipe")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    result = asyncio.run(compare(args.openai, args.grpc, args.model, concurrency=args.concurrency,
                                 requests_per_stream=args.requests_per_stream, max_tokens=args.max_tokens,
                                 prompt_tokens=args.prompt_tokens, rounds=args.rounds, api_key=args.api_key))
    for level in result:
        f = statistics.median(x["tokens_per_s"] for x in level["openai"])
        d = statistics.median(x["tokens_per_s"] for x in level["grpc"])
        print(f"concurrency {level['concurrency']}: openai {f:.1f} tok/s, grpc {d:.1f} tok/s, "
              f"ratio {level['ratio_median']:.3f} (rounds {', '.join(f'{r:.3f}' for r in level['ratios'])})")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
