"""One benchmark run (`gptpipe bench` without a suite): options, checks, served levels, baselines."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serving.bench.baselines import measure_baselines
from serving.bench.peer_bench import PEERS, measure_peers, peer_prompts, peer_ratios, served_precision
from serving.bench.levels import bench_levels, warm_up
from serving.bench.probes import machine_info
from serving.bench.progress import NoProgress, Progress
from serving.bench.served import MODES, Mode, ServedGenerator, local_server, read_repository
from serving.bench.prefix import NEW_TOKENS, prefix_scenario
from serving.bench.stats import random_prompts

SCENARIOS: tuple[str, ...] = ("levels", "prefix")


@dataclass(frozen=True)
class BenchOptions:
    """`gptpipe bench` without a suite: served levels against one server, then the baselines."""

    url: Optional[str] = None  # gRPC host:port; None: start a local server on `repository`
    repository: Path = Path("model_repository")
    mode: Mode = "client"
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    prompt_tokens: int = 128
    output_tokens: int = 128
    requests: Optional[int] = None  # per level; None: max(4, 3 x concurrency)
    baselines: bool = True
    baseline_requests: int = 3
    checkpoint: Optional[str] = None  # weights for the PyTorch baselines; None: the manifest's source
    seed: int = 0
    # levels: closed-loop concurrency levels; prefix: requests sharing a system prompt of
    # prompt_tokens tokens (+ 16 new ones each) against the prefix cache (serving/bench/prefix.py)
    scenario: str = "levels"
    peers: tuple[str, ...] = ()  # peer engines paired with served requests (serving/bench/peer_bench.py)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if not self.concurrency or any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency must be a non-empty list of ints >= 1, got {self.concurrency!r}")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise ValueError(f"concurrency has repeated levels: {self.concurrency!r}")
        for name in ("prompt_tokens", "output_tokens", "baseline_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_tokens < 2:
            raise ValueError(f"output_tokens must be >= 2 (ITL needs two tokens), got {self.output_tokens}")
        bad_peers = [p for p in self.peers if p not in PEERS]
        if bad_peers:
            raise ValueError(f"peers: {', '.join(bad_peers)} unknown; choose from {', '.join(PEERS)}")
        if self.peers and self.scenario != "levels":
            raise ValueError("peers are timed beside the levels scenario only")
        if self.requests is not None and self.requests < max(self.concurrency):
            raise ValueError(f"requests ({self.requests}) must be >= the largest concurrency "
                             f"({max(self.concurrency)}): every stream needs a request")

    def requests_for(self, concurrency: int) -> int:
        return self.requests or max(4, 3 * concurrency)


def check_fits(*, prompt_tokens: int, output_tokens: int, n_positions: int, concurrency: Sequence[int] = (),
               max_sequences: Optional[int] = None) -> None:
    """Errors naming the field and the limit, before anything runs."""
    if prompt_tokens + output_tokens > n_positions:
        raise ValueError(f"prompt_tokens + output_tokens = {prompt_tokens} + {output_tokens} exceeds the "
                         f"model's context length n_positions={n_positions}")
    if max_sequences is not None and concurrency and max(concurrency) > max_sequences:
        raise ValueError(f"concurrency {max(concurrency)} exceeds the server's max_sequences={max_sequences} "
                         "(KV-pool slots); the extra streams would be refused as busy")


def run_bench(options: BenchOptions, *, progress: Progress = NoProgress()) -> dict[str, Any]:
    """Served levels (and the baselines) -> the report dict that write_report writes."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    prefix = options.scenario == "prefix"
    # the prefix scenario's prompts: the shared system prompt and 16 new tokens
    prompt_tokens = options.prompt_tokens + (NEW_TOKENS if prefix else 0)
    served = read_repository(options.repository) if (options.url is None or options.baselines or options.peers) \
        else None
    if served is not None:
        check_fits(prompt_tokens=prompt_tokens, output_tokens=options.output_tokens,
                   n_positions=served.config["n_positions"], concurrency=options.concurrency,
                   max_sequences=served.max_sequences)
    errors: list[str] = []
    with (local_server(served.repository) if options.url is None else _no_server(options.url)) as server:
        url = server.grpc_url
        probe = ServedGenerator(url, mode=options.mode)
        config = probe.config
        probe.close()
        check_fits(prompt_tokens=prompt_tokens, output_tokens=options.output_tokens,
                   n_positions=config.n_positions)
        progress.start("warm-up", 1)
        warm_up(url, mode=options.mode, prompt_tokens=options.prompt_tokens, concurrency=min(options.concurrency))
        progress.advance()
        batching: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if prefix:
            generator = ServedGenerator(url, mode=options.mode)
            try:
                extra["prefix"] = prefix_scenario(
                    generator, vocab_size=config.vocab_size, system_tokens=options.prompt_tokens,
                    output_tokens=options.output_tokens, requests=options.requests or 6, seed=options.seed,
                    concurrency=max(options.concurrency), progress=progress,
                    make_generator=lambda: ServedGenerator(url, mode=options.mode),
                    metrics_url=getattr(server, "metrics_url", None))
            finally:
                generator.close()
        levels = [] if prefix else bench_levels(url, mode=options.mode, concurrency=sorted(options.concurrency),
                              prompt_tokens=options.prompt_tokens, output_tokens=options.output_tokens,
                              requests_for=options.requests_for, vocab_size=config.vocab_size,
                              seed=options.seed, progress=progress,
                              metrics_url=getattr(server, "metrics_url", None), batching=batching)
        if options.peers and served is not None:
            # with the server up and idle: each peer request right after a served one of the same prompt
            prompts = peer_prompts(options.baseline_requests, options.prompt_tokens, vocab_size=config.vocab_size)
            extra["peers"] = measure_peers(served, options.peers, prompts=prompts,
                                           output_tokens=options.output_tokens, source=options.checkpoint,
                                           make_generator=lambda: ServedGenerator(url, mode=options.mode),
                                           progress=progress)
            extra["ratios"] = peer_ratios(extra["peers"], precisions=[served_precision(served)],
                                          peers_asked=options.peers)
            errors += [f"peer {k}: {v['error']}" for k, v in extra["peers"].items() if "error" in v]
    threads = served.threads if served else None
    report: dict[str, Any] = {
        "format": 1,
        "created": created,
        "machine": machine_info(),
        "settings": {
            "url": options.url or f"local server on {options.repository}",
            "protocol": "gRPC",
            "mode": options.mode,
            "model": served.name if served else "?",
            "repository": str(options.repository),
            "precision": served.precision if served else "?",
            "prompt_tokens": options.prompt_tokens,
            "output_tokens": options.output_tokens,
            "concurrency": sorted(options.concurrency),
            "requests": {str(c): options.requests_for(c) for c in sorted(options.concurrency)},
            "threads": threads,
            "seed": options.seed,
            "scenario": options.scenario,
            "peers": list(options.peers),
        },
        "levels": [s.to_dict() for s, _ in levels],
        "batching": batching,
        "baselines": {},
        "errors": errors,
        **extra,
    }
    if options.baselines and served is not None and not prefix:
        # the first requests of level 1, so the baselines' greedy tokens can be compared with the served ones
        prompts = _baseline_prompts(options, config.vocab_size)
        first = next((t for s, t in levels if s.concurrency == 1), None)
        # one stream takes the prompts in order, so level 1's timings are in prompt order
        reference = sorted(first, key=lambda t: t.sent)[: len(prompts)] if first else None
        report["baselines"] = measure_baselines(served, prompts=prompts, output_tokens=options.output_tokens,
                                                checkpoint=options.checkpoint, progress=progress,
                                                reference=reference)
        errors += [f"baseline {k}: {v['error']}" for k, v in report["baselines"].items() if "error" in v]
    return report


def _baseline_prompts(options: BenchOptions, vocab_size: int) -> list[list[int]]:
    """The first prompts of level 1 (so the baselines' greedy tokens compare with the served ones)."""
    return random_prompts(options.requests_for(1), options.prompt_tokens, vocab_size=vocab_size,
                          seed=options.seed + 1)[: options.baseline_requests]


@dataclass(frozen=True)
class _RemoteServer:
    grpc_url: str
    metrics_url: Optional[str] = None  # unknown for a server given by --url


@contextmanager
def _no_server(url: str) -> Iterator[_RemoteServer]:
    yield _RemoteServer(url)
