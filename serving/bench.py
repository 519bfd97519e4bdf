"""LLM latency benchmark: time to first token, inter-token latency, tokens/s, requests/s.

Every path is measured the same way: a *generator* takes a prompt (token ids) and produces
`max_tokens` new tokens, stamping the wall-clock time (`time.perf_counter`) at which it sends
the request and at which each new token arrives (`RequestTiming`). From those stamps:

- TTFT: first token - sent (prefill + one round trip);
- ITL: the gaps between consecutive tokens (one decode step + one round trip each);
- tokens/s per stream: (n - 1) / (last - first) — the decode rate of one request, prefill
  excluded, so it is comparable with 1 / ITL and with the baselines' decode rates;
- aggregate tokens/s: all new tokens of a concurrency level / its wall time;
- requests/s: requests of a level / its wall time.

Served paths go through the real Triton server with `serving.client` (`client` mode: the
client-side loop over the stateful `gpt` model; `server` mode: the streaming `generate`
model). The in-process ONNX Runtime loop (`serving.runtime` + `serving.kv_cache`) and the
memory-bandwidth limit are here too; the PyTorch baselines live in `export.bench_baselines`,
imported only when asked for, because `serving` never imports torch.

`run_targets` (`gptpipe bench --suite targets`) measures the issue's target table end to end:
it exports the demo model and the gpt2-shape random model in fp32 and int8 with `export-model`
(child processes; gpt2-random has no tokenizer of its own, so it gets the demo's — the benchmark
sends token ids and never detokenizes), serves each gpt2 export with a real tritonserver
(start-to-ready, summed RSS of the server and its stubs sampled with psutil), runs the levels,
ITL at context ~100 and ~1000, perf_analyzer, the baselines, and the int8 greedy agreement.

int8 greedy agreement: on random weights the next-token distributions are near-flat (top-1
margins ~1e-3 logits), so any rounding flips the argmax and agreement says nothing about the
quantization. It is measured on the trained demo model: fixed prompts (`AGREEMENT_PROMPTS`),
32 greedy tokens each, int8 against fp32 position by position, free-running (the target's
number: strict, since after a first divergence the contexts differ) and teacher-forced (int8
reads fp32's tokens: the per-step agreement). The int8 *speed* is measured on the gpt2 shape.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Protocol

import numpy as np

logger = logging.getLogger(__name__)

Mode = Literal["client", "server"]
MODES: tuple[str, ...] = ("client", "server")

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
ITL_PNG = "itl_vs_concurrency.png"
THROUGHPUT_PNG = "tokens_per_s_vs_concurrency.png"

# ------------------------------------------------------------------ targets of the issue

# (key, comparison, target, what it is) in the order bench.json lists them
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("served_vs_transformers", ">=", 2.0, "served tokens/s / transformers eager generate tokens/s, batch 1"),
    ("served_vs_ort_inprocess", ">=", 0.85, "served tokens/s / in-process ONNX Runtime loop tokens/s"),
    ("served_vs_bandwidth_limit", ">=", 0.6, "served tokens/s / memory-bandwidth-limit tokens/s"),
    ("itl_ctx1000_vs_ctx100", "<=", 1.3, "served ITL at context ~1000 / at context ~100"),
    ("aggregate_8_vs_1", ">=", 4.0, "aggregate tokens/s, 8 concurrent streams / 1 stream"),
    ("int8_vs_fp32", ">=", 1.7, "int8 served tokens/s / fp32 served tokens/s (gpt2 shape)"),
    ("start_to_ready_s", "<=", 20.0, "server start to ready, seconds (gpt2 shape)"),
    ("rss_vs_weights_kv", "<=", 1.5, "server peak RSS (+ stubs) / (weight bytes + KV pool bytes)"),
    ("int8_greedy_agreement", ">=", 0.9, "greedy tokens int8 agrees with fp32 on the demo prompts (demo model)"),
)


def judge(ratios: Mapping[str, Optional[float]]) -> dict[str, dict[str, Any]]:
    """The `ratios` object of bench.json: value, target and pass/fail per target, in order.

    A value that could not be measured is None and fails (pass: false)."""
    out: dict[str, dict[str, Any]] = {}
    for key, op, target, doc in TARGETS:
        value = ratios.get(key)
        if value is None or not math.isfinite(value):
            ok = False
            value = None
        else:
            ok = value >= target if op == ">=" else value <= target
        out[key] = {"value": value, "target": f"{op} {target:g}", "pass": ok, "what": doc}
    return out


# ------------------------------------------------------------------ measurements


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


class Progress(Protocol):
    """What the benchmark reports while it runs (the CLI draws it with rich)."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        logger.info("%s (%d)", description, total)

    def advance(self, n: int = 1) -> None:
        pass


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


# ------------------------------------------------------------------ the server's batching, from its metrics

# Triton's own counters of the gpt model, and the ones its model.py exports
BATCHING_METRICS = ("nv_inference_count", "nv_inference_exec_count", "gptpipe_step_requests_total",
                    "gptpipe_runtime_calls_total", "gptpipe_batched_rows_total")


def scrape_metrics(metrics_url: str, *, model: str = "gpt") -> dict[str, float]:
    """The BATCHING_METRICS of `model` from Triton's Prometheus endpoint."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(metrics_url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, brace, rest = line.partition("{")
        if brace and name in BATCHING_METRICS and f'model="{model}"' in rest:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def batching_summary(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What the server did with a level's step requests: how many Triton handed to one
    execute() and how many rows one ONNX Runtime call ran, on average."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in BATCHING_METRICS}
    return {
        "step_requests": int(d["nv_inference_count"]),
        "triton_executions": int(d["nv_inference_exec_count"]),
        "requests_per_execution": _ratio(d["nv_inference_count"], d["nv_inference_exec_count"]),
        "runtime_calls": int(d["gptpipe_runtime_calls_total"]),
        "steps_per_runtime_call": _ratio(d["gptpipe_step_requests_total"], d["gptpipe_runtime_calls_total"]),
        "rows_in_batched_calls": int(d["gptpipe_batched_rows_total"]),
    }


# ------------------------------------------------------------------ the memory-bandwidth limit


@dataclass(frozen=True)
class BandwidthLimit:
    bandwidth_gb_s: float  # read bandwidth measured on the spot (best of a few)
    method: str
    weight_bytes: int  # bytes of weights one decode step reads
    tokens_per_s: float  # bandwidth / weight bytes: batch-1 decode cannot be faster

    @property
    def itl_ms(self) -> float:
        return 1e3 / self.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "itl_ms": self.itl_ms}


def measure_read_bandwidth(*, megabytes: int = 512, repeats: int = 5, threads: int = 1) -> float:
    """Bytes/s of reading a `megabytes` buffer (np.sum over float32, best of `repeats`).

    With threads > 1 the buffer is summed in that many chunks at once (numpy's reductions
    release the GIL)."""
    if megabytes < 1 or repeats < 1 or threads < 1:
        raise ValueError("megabytes, repeats and threads must be >= 1")
    buf = np.ones(megabytes * 2**20 // 4, dtype=np.float32)  # touched, so no page faults inside the timing
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            if threads == 1:
                buf.sum()
            else:
                list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def weight_bytes_per_token(config: Mapping[str, Any], *, bytes_per_param: float = 4.0) -> int:
    """Weight bytes one decode step of GPT-2 reads: every layer's weights and the tied LM head
    (the whole token-embedding matrix); the embedding lookups read one row each (ignored)."""
    V, C, L = int(config["vocab_size"]), int(config["n_embd"]), int(config["n_layer"])
    bias = bool(config.get("bias", True))
    per_layer = 12 * C * C + (13 * C if bias else 2 * C)  # qkv 3C², proj C², fc 4C², proj 4C²; biases + 2 LN
    params = L * per_layer + V * C + (2 * C if bias else C)  # + LM head (tied wte) + ln_f
    return int(params * bytes_per_param)


def bandwidth_limit(config: Mapping[str, Any], *, threads: int = 1, bandwidth_b_s: Optional[float] = None,
                    method: str = "") -> BandwidthLimit:
    """Tokens/s a batch-1 fp32 decode could reach if it only streamed its weights once."""
    if bandwidth_b_s is None:
        bandwidth_b_s = measure_read_bandwidth(threads=threads)
        method = f"numpy float32 sum over 512 MiB, {threads} thread(s), best of 5"
    wb = weight_bytes_per_token(config)
    return BandwidthLimit(bandwidth_gb_s=bandwidth_b_s / 1e9, method=method, weight_bytes=wb,
                          tokens_per_s=bandwidth_b_s / wb)


# ------------------------------------------------------------------ process memory


@dataclass
class RssSampler:
    """Samples the summed RSS of a process and all its descendants (tritonserver and its
    python-backend stubs) in a background thread; `peak_bytes` is the largest sum seen."""

    pid: int
    interval_s: float = 0.05
    peak_bytes: int = 0
    peak_by_process: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total, parts = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = f"{p.pid}:{p.name()}"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            parts[name] = rss
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_by_process = total, parts
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> RssSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak_bytes


# ------------------------------------------------------------------ machine info


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus_logical": os.cpu_count(),
        "cpus_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """`with timed() as elapsed: ...; elapsed()` -> seconds since the block began."""
    t0 = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - t0
    end.append(time.perf_counter())


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(data: Any) -> Any:
    """A copy with nan/inf replaced by None, so bench.json is strict JSON."""
    if isinstance(data, Mapping):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    if isinstance(data, (float, np.floating)):
        return float(data) if math.isfinite(data) else None
    return data


# ------------------------------------------------------------------ the report: bench.md and plots

BASELINE_LABELS = {
    "transformers": "transformers GPT2LMHeadModel.generate (PyTorch eager, KV cache)",
    "torch_loop": "gptpipe PyTorch loop (export.model)",
    "ort_inprocess": "in-process ONNX Runtime loop (serving.runtime, no Triton)",
    "bandwidth_limit": "memory-bandwidth limit (weight bytes per token / read bandwidth)",
}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _levels_table(levels: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["concurrency", "requests", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "ITL p50 ms",
              "ITL p99 ms", "tok/s per stream", "aggregate tok/s", "req/s"]
    rows = [[
        str(lv["concurrency"]), str(lv["requests"]), _fmt(lv["ttft_ms"]["p50"]), _fmt(lv["ttft_ms"]["p90"]),
        _fmt(lv["ttft_ms"]["p99"]), _fmt(lv["itl_ms"]["p50"], 2), _fmt(lv["itl_ms"]["p99"], 2),
        _fmt(lv["tokens_per_s_per_stream"]), _fmt(lv["aggregate_tokens_per_s"]), _fmt(lv["requests_per_s"], 2),
    ] for lv in levels]
    return _table(header, rows)


def render_markdown(report: Mapping[str, Any]) -> str:
    """bench.md: the settings, one row per concurrency level, the baselines, the ratios."""
    s = report["settings"]
    out = [f"# gptpipe bench — {s.get('model', '?')}", ""]
    out.append(
        f"{s['mode']}-side loop over {s.get('protocol', 'gRPC')} at `{s.get('url')}`; prompt {s['prompt_tokens']} "
        f"tokens, {s['output_tokens']} new tokens, greedy; {s.get('threads', '?')} intra-op thread(s); "
        f"created {report.get('created', '?')}.")
    out.append("")
    out.append("Tokens/s per stream is the decode rate (n−1)/(last−first token), prefill excluded; "
               "aggregate tokens/s is all new tokens of a level / its wall time.")
    out += ["", "## Served", ""] + _levels_table(report["levels"])
    extra_sections = [(k, v) for k, v in report.get("served_extra", {}).items()]
    for title, levels in extra_sections:
        out += ["", f"### {title}", ""] + _levels_table(levels)
    baselines = report.get("baselines") or {}
    if baselines:
        out += ["", "## Baselines (same weights, same thread count, batch 1)", ""]
        rows = []
        for key, b in baselines.items():
            if key == "bandwidth_limit":
                rows.append([BASELINE_LABELS[key], _fmt(b["tokens_per_s"]), _fmt(b["itl_ms"], 2), "–", "–",
                             f"{b['bandwidth_gb_s']:.1f} GB/s ({b['method']}), {b['weight_bytes'] / 1e6:.0f} MB weights"])
            elif "error" in b:
                rows.append([BASELINE_LABELS.get(key, key), "–", "–", "–", "–", f"failed: {b['error']}"])
            else:
                st = b["stats"]
                paired = _fmt(b.get("paired_ratio"), 2)
                rows.append([BASELINE_LABELS.get(key, key), _fmt(st["tokens_per_s_per_stream"]),
                             _fmt(st["itl_ms"]["p50"], 2), _fmt(st["ttft_ms"]["p50"]), paired, b.get("note", "")])
        out += _table(["baseline", "tok/s", "ITL p50 ms", "TTFT p50 ms", "served ÷ baseline (paired)", "note"], rows)
    if report.get("batching"):
        out += ["", "### What the server batched (from its metrics)", ""]
        rows = [[c, str(b["step_requests"]), str(b["triton_executions"]), _fmt(b["requests_per_execution"], 2),
                 str(b["runtime_calls"]), _fmt(b["steps_per_runtime_call"], 2)] for c, b in report["batching"].items()]
        out += _table(["concurrency", "step requests", "Triton executions", "requests/execution",
                       "ORT calls", "steps/ORT call"], rows)
    for title, key in (("8 streams vs 1, adjacent runs", "aggregate_pairs"), ("Context length", "context_itl"),
                       ("Server", "server"), ("int8", "int8")):
        if report.get(key):
            out += ["", f"## {title}", "", "```json", json.dumps(finite_or_none(report[key]), indent=2), "```"]
    ratios = report.get("ratios")
    if ratios:
        out += ["", "## Targets", ""]
        rows = [[k, _fmt(r["value"], 3), r["target"], "PASS" if r["pass"] else "FAIL", r["what"]] for k, r in ratios.items()]
        out += _table(["ratio", "value", "target", "result", "what"], rows)
    if report.get("perf_analyzer"):
        out += ["", "## perf_analyzer", ""]
        for name, pa in report["perf_analyzer"].items():
            out.append(f"- {name}: {pa.get('status')} — {pa.get('summary', '')} ({pa.get('log', '')})")
    if report.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report.get("errors"):
        out += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(out) + "\n"


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _baseline_rates(report: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """baseline key -> (tokens/s, ITL p50 ms) for the plots."""
    out = {}
    for key, b in (report.get("baselines") or {}).items():
        if key == "bandwidth_limit":
            out[key] = (_num(b["tokens_per_s"]), _num(b["itl_ms"]))
        elif "stats" in b:
            out[key] = (_num(b["stats"]["tokens_per_s_per_stream"]), _num(b["stats"]["itl_ms"]["p50"]))
    return out


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """ITL and aggregate tokens/s against concurrency, baselines and the limit drawn in."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe from threads
    import matplotlib.pyplot as plt

    levels = report["levels"]
    conc = [lv["concurrency"] for lv in levels]
    baselines = _baseline_rates(report)
    styles = {"transformers": ("tab:red", "--"), "torch_loop": ("tab:orange", "--"),
              "ort_inprocess": ("tab:green", "--"), "bandwidth_limit": ("black", ":")}
    paths: list[Path] = []

    def finish(fig: Any, ax: Any, *, ylabel: str, title: str, name: str) -> None:
        """The axes both plots share (log-2 concurrency, log y), then save and close."""
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(f"{title} — {report['settings'].get('model', '')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(conc, [_num(lv["itl_ms"]["p50"]) for lv in levels], "o-", color="tab:blue", label="served ITL p50")
    ax.plot(conc, [_num(lv["itl_ms"]["p99"]) for lv in levels], "s--", color="tab:blue", alpha=0.5, label="served ITL p99")
    for key, (_, itl) in baselines.items():
        color, ls = styles.get(key, ("gray", "--"))
        label = "bandwidth floor (batch 1)" if key == "bandwidth_limit" else f"{key} (batch 1)"
        ax.axhline(itl, color=color, linestyle=ls, label=label)
    # log y: the tiny model's limit and its served ITL are orders of magnitude apart
    finish(fig, ax, ylabel="inter-token latency (ms, log scale)", title="ITL vs concurrency", name=ITL_PNG)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(conc, [_num(lv["aggregate_tokens_per_s"]) for lv in levels], "o-", color="tab:blue", label="served aggregate")
    ax.plot(conc, [_num(lv["tokens_per_s_per_stream"]) for lv in levels], "s--", color="tab:blue", alpha=0.5,
            label="served per stream")
    for key, (rate, _) in baselines.items():
        color, ls = styles.get(key, ("gray", "--"))
        if key == "bandwidth_limit":
            ax.axhline(rate, color=color, linestyle=ls, label="bandwidth limit (batch 1)")
            # a batched step reads the weights once for all its rows
            ax.plot(conc, [rate * c for c in conc], color=color, linestyle="-.", alpha=0.5,
                    label="bandwidth limit × streams")
        else:
            ax.axhline(rate, color=color, linestyle=ls, label=f"{key} (batch 1)")
    finish(fig, ax, ylabel="output tokens/s (log scale)", title="Tokens/s vs concurrency", name=THROUGHPUT_PNG)
    return paths


def write_report(report: Mapping[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """bench.json, bench.md and the PNG plots into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = finite_or_none(report)
    paths = {"json": write_json(out_dir / BENCH_JSON, clean)}
    paths["md"] = out_dir / BENCH_MD
    paths["md"].write_text(render_markdown(clean))
    if clean["levels"]:
        itl, tps = write_plots(clean, out_dir)
        paths["itl_png"], paths["tokens_png"] = itl, tps
    logger.info("bench report written to %s", out_dir)
    return paths


# ------------------------------------------------------------------ the in-process ONNX Runtime loop


def engine_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The GPTConfig dict an exported graph carries in its metadata ({} if none)."""
    text = metadata.get("gptpipe.config")
    return json.loads(text) if text else {}


class OrtLoop:
    """Baseline 3: greedy decoding with the exported graph in this process, no Triton — the same
    engine the `gpt` model runs (`serving.runtime.OrtRuntime.step` over a one-slot
    `serving.kv_cache.KVPool`), minus the server, the client and the network."""

    def __init__(self, engine: Path | str, *, threads: int, max_length: Optional[int] = None) -> None:
        from serving.runtime import OrtRuntime  # onnxruntime: only when this baseline runs

        self.runtime = OrtRuntime(engine, intra_op_threads=threads)
        length = max_length or engine_config(self.runtime.metadata).get("n_positions", 0)
        if length < 1:
            raise ValueError(f"max_length: {engine} does not say its context length; pass max_length")
        self.pool = self.runtime.new_pool(max_sequences=1, max_length=length)

    def __call__(self, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        return self.generate(prompt, max_tokens)

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        if len(prompt) + max_tokens > self.pool.max_length:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context "
                             f"length {self.pool.max_length}")
        step = self.runtime.step
        times: list[float] = []
        tokens: list[int] = []
        sent = time.perf_counter()
        logits = step(np.asarray([prompt], dtype=np.int64), pool=self.pool, slot_start=0,
                      past_lengths=np.zeros(1, dtype=np.int64))
        past = len(prompt)
        while True:
            token = int(np.argmax(logits[0]))
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == max_tokens:
                break
            logits = step(np.array([[token]], dtype=np.int64), pool=self.pool, slot_start=0,
                          past_lengths=np.array([past], dtype=np.int64))
            past += 1
        return RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=len(prompt), tokens=tuple(tokens))


    def forced_argmax(self, prompt: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """This engine's greedy choice at each position of `prompt` + `tokens`, reading `tokens`
        (teacher forcing): choice i is made after tokens[:i]."""
        if len(prompt) + len(tokens) > self.pool.max_length:
            raise ValueError(f"prompt + tokens ({len(prompt)} + {len(tokens)}) exceeds the context "
                             f"length {self.pool.max_length}")
        logits = self.runtime.step(np.asarray([prompt], dtype=np.int64), pool=self.pool, slot_start=0,
                                   past_lengths=np.zeros(1, dtype=np.int64))
        choices = [int(np.argmax(logits[0]))]
        for i, token in enumerate(tokens[:-1]):
            logits = self.runtime.step(np.array([[token]], dtype=np.int64), pool=self.pool, slot_start=0,
                                       past_lengths=np.array([len(prompt) + i], dtype=np.int64))
            choices.append(int(np.argmax(logits[0])))
        return choices


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


# ------------------------------------------------------------------ served requests (serving.client)


class ServedGenerator:
    """One connection to the server (one `serving.client.Client`), generating from token ids:
    exactly `max_tokens` new tokens, greedy, eos ignored, each token stamped on arrival.

    mode "client": the client-side loop (`serving.generation.generate_tokens` over the client's
    gRPC step transport into the stateful `gpt` model); mode "server": the streaming `generate`
    model over a gRPC stream, with end_id = -1.

    The public `Client.generate` takes text and stops at eos; a benchmark needs fixed-length
    prompts of token ids and a fixed number of new tokens whatever the model says, so this
    drives the client's own transports (its private helpers) with the ids directly.
    """

    def __init__(self, url: str, *, mode: Mode = "client", timeout_s: float = 120.0) -> None:
        from serving.client import Client

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.client = Client(url, protocol="grpc", timeout_s=timeout_s)
        self.config = self.client.generation_config  # asks the server's tokenizer model

    def __call__(self, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        times: list[float] = []
        tokens: list[int] = []
        events = self._events(prompt, max_tokens)
        sent = time.perf_counter()  # the generators send their first request on the first next()
        try:
            for event in events:
                times.append(time.perf_counter())
                tokens.append(int(event.token_id))
        finally:
            events.close()
        if len(tokens) != max_tokens:
            raise RuntimeError(f"the server returned {len(tokens)} tokens, {max_tokens} were asked for")
        return RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=len(prompt), tokens=tuple(tokens))

    def _events(self, prompt: Sequence[int], max_tokens: int) -> Any:
        from serving.client import _generate_inputs, _grpc_server_events, _validate
        from serving.generation import Generation, generate_tokens, make_sampling_params

        generation = Generation(
            list(prompt), max_new_tokens=max_tokens, params=make_sampling_params(temperature=0.0, seed=0),
            n_positions=self.config.n_positions, vocab_size=self.config.vocab_size, eos_token_id=None)
        if self.mode == "client":
            return generate_tokens(self.client._client_step(generation), generation)
        request = _validate("-", max_new_tokens=max_tokens, temperature=0.0, top_k=0, top_p=1.0,
                            repetition_penalty=1.0, stop=(), seed=0, stream=True, mode="server",
                            return_logprobs=False)
        inputs = _generate_inputs(generation, request)
        inputs["end_id"] = np.asarray([-1], dtype=np.int32)  # never stop early
        return _grpc_server_events(self.client.url, self.client.generate_model, inputs, self.client.timeout_s)

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------ the repository being served


@dataclass(frozen=True)
class ServedModel:
    """What the benchmark needs to know of a model repository."""

    repository: Path
    config: dict[str, Any]  # the GPTConfig as a dict
    engine: Path  # gpt/1/<engine file>
    max_sequences: int
    threads: int  # the gpt model's ONNX Runtime intra-op threads (0 in the config: physical cores)
    manifest: dict[str, Any] = field(default_factory=dict)
    inflight_batching: bool = False  # `gpt` is decoupled: steps go over gRPC streams

    @property
    def name(self) -> str:
        return str(self.manifest.get("source") or self.manifest.get("model") or self.repository.name)

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision") or "?")

    @property
    def weight_bytes(self) -> int:
        """Bytes of the engine file(s): the graph and its external weights, if any."""
        files = [p for p in self.engine.parent.iterdir() if p.is_file() and p.name.startswith(self.engine.name)]
        return sum(p.stat().st_size for p in files)

    @property
    def kv_pool_bytes(self) -> int:
        """The gpt model's preallocated KV pool at full size (fp32 for fp32 and int8 graphs)."""
        c = self.config
        itemsize = 2 if self.precision == "fp16" else 4
        return 2 * c["n_layer"] * self.max_sequences * c["n_positions"] * c["n_embd"] * itemsize


def read_repository(repository: Path | str) -> ServedModel:
    """The served model's config, engine and deploy-time values, from its config.pbtxt."""
    from serving import tensors
    from serving.repository import validate_repository
    from serving.runtime import physical_cores

    repository = Path(repository)
    configs = validate_repository(repository)
    params = {k: v.string_value for k, v in configs[tensors.GPT_MODEL].parameters.items()}
    threads = int(params.get("intra_op_threads") or 0) or physical_cores()
    manifest: dict[str, Any] = {}
    for candidate in (repository / "manifest.json", repository.parent / "manifest.json"):
        if candidate.is_file():
            manifest = json.loads(candidate.read_text())
            break
    return ServedModel(
        repository=repository,
        config=json.loads(params["model_config"]),
        engine=repository / tensors.GPT_MODEL / "1" / params["engine_file"],
        max_sequences=int(params["max_sequences"]),
        threads=threads,
        manifest=manifest,
        inflight_batching=configs[tensors.GPT_MODEL].model_transaction_policy.decoupled,
    )


# ------------------------------------------------------------------ one benchmark run


@dataclass(frozen=True)
class BenchOptions:
    """`gptpipe bench` without a suite: served levels against one server, then the baselines."""

    url: Optional[str] = None  # gRPC host:port; None: start a local server on `repository`
    repository: Path = Path("model_repository")
    mode: Mode = "client"
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    prompt_tokens: int = 128
    output_tokens: int = 128
    requests: Optional[int] = None  # per level; None: max(4, 2 x concurrency)
    baselines: bool = True
    baseline_requests: int = 3
    checkpoint: Optional[str] = None  # weights for the PyTorch baselines; None: the manifest's source
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.concurrency or any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency must be a non-empty list of ints >= 1, got {self.concurrency!r}")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise ValueError(f"concurrency has repeated levels: {self.concurrency!r}")
        for name in ("prompt_tokens", "output_tokens", "baseline_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_tokens < 2:
            raise ValueError(f"output_tokens must be >= 2 (ITL needs two tokens), got {self.output_tokens}")
        if self.requests is not None and self.requests < max(self.concurrency):
            raise ValueError(f"requests ({self.requests}) must be >= the largest concurrency "
                             f"({max(self.concurrency)}): every stream needs a request")

    def requests_for(self, concurrency: int) -> int:
        return self.requests or max(4, 2 * concurrency)


def check_fits(*, prompt_tokens: int, output_tokens: int, n_positions: int, concurrency: Sequence[int] = (),
               max_sequences: Optional[int] = None) -> None:
    """Errors naming the field and the limit, before anything runs."""
    if prompt_tokens + output_tokens > n_positions:
        raise ValueError(f"prompt_tokens + output_tokens = {prompt_tokens} + {output_tokens} exceeds the "
                         f"model's context length n_positions={n_positions}")
    if max_sequences is not None and concurrency and max(concurrency) > max_sequences:
        raise ValueError(f"concurrency {max(concurrency)} exceeds the server's max_sequences={max_sequences} "
                         "(KV-pool slots); the extra streams would be refused as busy")


def new_local_server(repository: Path, *, log_file: Optional[Path] = None) -> Any:
    """A TritonServer on free localhost ports, not started yet."""
    from serving.server import TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    return TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log_file)


@contextmanager
def local_server(repository: Path, *, log_file: Optional[Path] = None) -> Iterator[Any]:
    """A TritonServer on free ports, started and ready; stopped on exit."""
    server = new_local_server(repository, log_file=log_file)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


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
        before = _try_scrape(metrics_url)
        stats, timings = run_level(lambda: ServedGenerator(url, mode=mode), prompts, concurrency=c,
                                   output_tokens=output_tokens, progress=progress,
                                   description=f"{label}: {c} stream(s)")
        after = _try_scrape(metrics_url)
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


def _try_scrape(metrics_url: Optional[str]) -> Optional[dict[str, float]]:
    if metrics_url is None:
        return None
    try:
        return scrape_metrics(metrics_url)
    except OSError as e:  # the numbers are extra; the benchmark goes on without them
        logger.warning("could not read the server's metrics at %s: %s", metrics_url, e)
        return None


def _baseline_entry(timings: Sequence[RequestTiming], *, output_tokens: int, note: str,
                    reference: Optional[Sequence[RequestTiming]] = None,
                    paired: Optional[Sequence[RequestTiming]] = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"stats": level_stats(timings, concurrency=1, output_tokens=output_tokens).to_dict(),
                             "note": note}
    if reference:
        same = sum(int(a.tokens == b.tokens) for a, b in zip(timings, reference))
        entry["greedy_tokens_equal_served"] = f"{same}/{min(len(timings), len(reference))}"
    if paired:
        # served request i ran just before baseline request i, same prompt: the machine's drift
        # over minutes cancels in each pair's ratio
        pairs = [s.decode_tokens_per_s / b.decode_tokens_per_s for s, b in zip(paired, timings)]
        entry["paired_served"] = level_stats(paired, concurrency=1, output_tokens=output_tokens).to_dict()
        entry["paired_ratios"] = pairs
        entry["paired_ratio"] = float(np.median(pairs))
    return entry


def measure_baselines(served: ServedModel, *, prompts: Sequence[Sequence[int]], output_tokens: int,
                      checkpoint: Optional[str] = None, progress: Progress = NoProgress(),
                      reference: Optional[Sequence[RequestTiming]] = None,
                      served_generator: Optional[Generator] = None) -> dict[str, Any]:
    """The four baselines on the served model's weights and thread count, batch 1.

    served_generator: the running server; each baseline request is then paired with a served
    request of the same prompt run just before it (the entry's `paired_ratio`, served / baseline
    tokens/s, median over the pairs). The server is idle while a baseline runs.

    A baseline that fails is recorded with its error; the others still run."""
    threads = served.threads
    out: dict[str, Any] = {}

    progress.start("baseline: memory bandwidth", 1)
    numpy_bw = measure_read_bandwidth(threads=threads)
    best, method = numpy_bw, f"numpy float32 sum over 512 MiB, {threads} thread(s), best of 5"
    try:
        from export.bench_baselines import torch_read_bandwidth

        torch_bw = torch_read_bandwidth(threads=threads)
        if torch_bw > best:
            best, method = torch_bw, f"torch.sum over 512 MiB float32, {threads} thread(s), best of 5"
    except ImportError as e:  # no torch: numpy's number stands
        logger.warning("torch read bandwidth skipped: %s", e)
    limit = bandwidth_limit(served.config, bandwidth_b_s=best, method=method)
    out["bandwidth_limit"] = {**limit.to_dict(), "numpy_gb_s": numpy_bw / 1e9}
    progress.advance()

    def run(key: str, generate: Generator, note: str) -> None:
        progress.start(f"baseline: {key}" + (" (paired with served requests)" if served_generator else ""),
                       len(prompts) + 1)
        generate(prompts[0][: min(len(prompts[0]), 16)], 4)  # warm-up, not measured
        progress.advance()
        timings: list[RequestTiming] = []
        paired: list[RequestTiming] = []
        for p in prompts:
            if served_generator is not None:
                paired.append(served_generator(p, output_tokens))
            timings.append(generate(p, output_tokens))
            progress.advance()
        out[key] = _baseline_entry(timings, output_tokens=output_tokens, note=note, reference=reference,
                                   paired=paired)

    try:
        loop = OrtLoop(served.engine, threads=threads, max_length=served.config["n_positions"])
        run("ort_inprocess", loop, f"{served.engine.name}, {threads} intra-op thread(s)")
        del loop
    except Exception as e:  # noqa: BLE001 - a baseline's failure is reported, not fatal
        logger.exception("in-process ONNX Runtime baseline failed")
        out["ort_inprocess"] = {"error": f"{type(e).__name__}: {e}"}

    source = checkpoint or served.manifest.get("source")
    if not source:
        msg = "no checkpoint: the repository has no manifest naming its source; pass --checkpoint"
        out["torch_loop"] = out["transformers"] = {"error": msg}
        return out
    try:
        from export import bench_baselines
    except ImportError as e:
        out["torch_loop"] = out["transformers"] = {"error": f"PyTorch baselines need torch: {e}"}
        return out
    try:
        with bench_baselines.torch_models(str(source), threads=threads) as (model, hf_model):
            run("torch_loop", lambda p, n: bench_baselines.torch_loop_generate(model, p, n),
                f"export.model.GPT from {source}, {threads} thread(s)")
            run("transformers", lambda p, n: bench_baselines.transformers_generate(hf_model, p, n),
                f"GPT2LMHeadModel.from_pretrained (save_model of {source}), eager, {threads} thread(s)")
    except Exception as e:  # noqa: BLE001
        logger.exception("PyTorch baselines failed")
        for key in ("torch_loop", "transformers"):
            out.setdefault(key, {"error": f"{type(e).__name__}: {e}"})
    return out


def run_bench(options: BenchOptions, *, progress: Progress = NoProgress()) -> dict[str, Any]:
    """Served levels (and the baselines) -> the report dict that write_report writes."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    served = read_repository(options.repository) if (options.url is None or options.baselines) else None
    if served is not None:
        check_fits(prompt_tokens=options.prompt_tokens, output_tokens=options.output_tokens,
                   n_positions=served.config["n_positions"], concurrency=options.concurrency,
                   max_sequences=served.max_sequences)
    errors: list[str] = []
    with (local_server(served.repository) if options.url is None else _no_server(options.url)) as server:
        url = server.grpc_url
        probe = ServedGenerator(url, mode=options.mode)
        config = probe.config
        probe.close()
        check_fits(prompt_tokens=options.prompt_tokens, output_tokens=options.output_tokens,
                   n_positions=config.n_positions)
        progress.start("warm-up", 1)
        warm_up(url, mode=options.mode, prompt_tokens=options.prompt_tokens, concurrency=min(options.concurrency))
        progress.advance()
        batching: dict[str, Any] = {}
        levels = bench_levels(url, mode=options.mode, concurrency=sorted(options.concurrency),
                              prompt_tokens=options.prompt_tokens, output_tokens=options.output_tokens,
                              requests_for=options.requests_for, vocab_size=config.vocab_size,
                              seed=options.seed, progress=progress,
                              metrics_url=getattr(server, "metrics_url", None), batching=batching)
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
        },
        "levels": [s.to_dict() for s, _ in levels],
        "batching": batching,
        "baselines": {},
        "errors": errors,
    }
    if options.baselines and served is not None:
        # the first requests of level 1, so the baselines' greedy tokens can be compared with the served ones
        prompts = random_prompts(options.requests_for(1), options.prompt_tokens, vocab_size=config.vocab_size,
                                 seed=options.seed + 1)[: options.baseline_requests]
        first = next((t for s, t in levels if s.concurrency == 1), None)
        # one stream takes the prompts in order, so level 1's timings are in prompt order
        reference = sorted(first, key=lambda t: t.sent)[: len(prompts)] if first else None
        report["baselines"] = measure_baselines(served, prompts=prompts, output_tokens=options.output_tokens,
                                                checkpoint=options.checkpoint, progress=progress,
                                                reference=reference)
        errors += [f"baseline {k}: {v['error']}" for k, v in report["baselines"].items() if "error" in v]
    return report


@dataclass(frozen=True)
class _RemoteServer:
    grpc_url: str
    metrics_url: Optional[str] = None  # unknown for a server given by --url


@contextmanager
def _no_server(url: str) -> Iterator[_RemoteServer]:
    yield _RemoteServer(url)


# ------------------------------------------------------------------ the targets suite

# the demo prompts of the int8 agreement check: the kind of text the demo model learnt
# (Python's help topics), none of it a verbatim topic opening
AGREEMENT_PROMPTS: tuple[str, ...] = (
    "The for statement is used to iterate over",
    "A function definition defines",
    "Exceptions are raised when",
    "The import statement",
    "Strings are immutable sequences of",
    "A class definition is an executable statement that",
    "The while statement is used for repeated execution as long as",
    "Dictionaries map keys to",
)
AGREEMENT_NEW_TOKENS = 32
CONTEXT_PROMPTS = (96, 996)  # decode at context ~100 and ~1000 (gpt2: n_positions 1024)
CONTEXT_STEPS = 17  # new tokens: 16 inter-token latencies per request
CONTEXT_REPEATS = 3
GPT2_MODELS = (("gpt2-fp32", "gpt2-random", "fp32"), ("gpt2-int8", "gpt2-random", "int8"))  # (name, source, precision)
DEMO_MODELS = (("demo-fp32", "demo", "fp32"), ("demo-int8", "demo", "int8"))
PERF_ANALYZER_TIMEOUT_S = 240


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


def run_perf_analyzer(url: str, out_dir: Path, *, script: Path, n_positions: int, vocab_size: int,
                      inflight_batching: bool = False) -> dict[str, Any]:
    """perf_analyzer on the stateful `gpt` model (sequences; over gRPC streams when it is
    decoupled, i.e. in-flight batching) and the streaming `generate` model.

    Its output goes to out_dir/perf_analyzer_<model>.{log,csv}; a failure is reported, not raised."""
    import subprocess

    results: dict[str, Any] = {}
    if not script.is_file():
        return {"skipped": {"status": "skipped", "summary": f"{script} does not exist"}}
    prompt = [int(x) for x in random_prompts(1, 16, vocab_size=vocab_size, seed=7)[0]]
    data = out_dir / "perf_analyzer_generate_input.json"
    data.write_text(json.dumps({"data": [{
        "input_ids": {"content": prompt, "shape": [len(prompt)]},
        "max_tokens": [16], "end_id": [-1], "temperature": [0.0], "stream": [True],
    }]}))
    # loose stability: on a shared 2-core machine consecutive windows differ by tens of percent
    common = ["-u", url, "-i", "grpc", "--measurement-interval", "4000", "--stability-percentage", "100",
              "--max-trials", "5"]
    runs = {
        # each sequence: a one-token prompt (zeros), then steps, 16 requests per sequence
        "gpt": ["-m", "gpt", "--sequence-length", "16", "--sequence-id-range", "1:1000000",
                "--input-data", "zero", "--shape", "input_ids:1", "--concurrency-range", "1:4:3",
                *(["--streaming"] if inflight_batching else [])],
        "generate": ["-m", "generate", "--streaming", "--input-data", str(data), "--concurrency-range", "1:2"],
    }
    for model, args in runs.items():
        log = out_dir / f"perf_analyzer_{model}.log"
        csv = out_dir / f"perf_analyzer_{model}.csv"
        cmd = [str(script), "run", *args, *common, "-f", str(csv)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PERF_ANALYZER_TIMEOUT_S)
            log.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
            ok = proc.returncode == 0
            lines = [ln.strip() for ln in proc.stdout.splitlines() if "Concurrency:" in ln and "throughput" in ln]
            results[model] = {"status": "ok" if ok else f"failed (exit {proc.returncode})",
                              "summary": "; ".join(lines) if ok else _tail(proc.stdout + proc.stderr, 3),
                              "log": log.name, "csv": csv.name if csv.exists() else None}
        except (OSError, subprocess.TimeoutExpired) as e:
            log.write_text("$ " + " ".join(cmd) + f"\n{type(e).__name__}: {e}\n")
            results[model] = {"status": "failed", "summary": f"{type(e).__name__}: {e}", "log": log.name}
    return results


def _tail(text: str, lines: int) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def int8_agreement(fp32_engine: Path, int8_engine: Path, prompts: Sequence[Sequence[int]], *, threads: int,
                   max_length: int, new_tokens: int = AGREEMENT_NEW_TOKENS) -> dict[str, Any]:
    """Greedy agreement of int8 with fp32 in the serving engine (in process), two readings:
    free-running (each continues its own tokens) and teacher-forced (int8 reads fp32's tokens)."""
    ref_loop = OrtLoop(fp32_engine, threads=threads, max_length=max_length)
    ref = [list(ref_loop(p, new_tokens).tokens) for p in prompts]
    del ref_loop
    loop = OrtLoop(int8_engine, threads=threads, max_length=max_length)
    free = [list(loop(p, new_tokens).tokens) for p in prompts]
    forced = [loop.forced_argmax(p, r) for p, r in zip(prompts, ref)]
    return {
        "free_running": greedy_agreement(ref, free),
        "teacher_forced": greedy_agreement(ref, forced),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "first_divergence": [next((i for i, (a, b) in enumerate(zip(r, f)) if a != b), None) for r, f in zip(ref, free)],
    }


def export_repository(source: str, *, precision: str, out: Path, tokenizer: Optional[Path] = None,
                      log: Optional[Path] = None, max_batch_size: int = 8) -> tuple[Path, bool]:
    """`export-model --model SOURCE --precision P --output OUT` in a child process (its memory
    — a 124M model, its graph, the validation — goes back when it exits); the output goes to
    `log`. An export already in OUT from the same source and precision is reused.
    Returns (repository, reused)."""
    import subprocess
    import sys

    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        served_tokenizer = out / "tokenizer" / "1" / "tokenizer.json"
        same_tokenizer = tokenizer is None or (
            served_tokenizer.is_file() and served_tokenizer.read_bytes() == Path(tokenizer).read_bytes())
        if m.get("source") == source and m.get("precision") == precision and same_tokenizer:
            logger.info("reusing the export in %s (%s, %s)", out, source, precision)
            return out, True
    cmd = [sys.executable, "-m", "export.cli", "--model", source, "--precision", precision, "--output", str(out),
           "--max-batch-size", str(max_batch_size), "--force"]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_project_root())
    if log is not None:
        log.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"export-model --model {source} --precision {precision} failed (exit "
                           f"{proc.returncode}): {_tail(proc.stdout + proc.stderr, 5)}")
    return out, False


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def numbered_tokenizer_json(vocab_size: int, *, eos_token_id: int) -> str:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids, for a random-weight export that
    has no tokenizer of its own (gpt2-random): ids 0-255 are the bytes, `eos_token_id` is
    <|endoftext|>, every other id decodes to " t<id>". Encoding never produces the numbered
    ids (no merges), decoding any id works — what the benchmark (token ids in, and in server
    mode ids detokenized by the `generate` model) needs."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from serving.tokenizer import EOS_TOKEN

    if not 257 <= vocab_size or not 256 <= eos_token_id < vocab_size:
        raise ValueError(f"vocab_size must be >= 257 and eos_token_id in [256, vocab_size), got "
                         f"{vocab_size} and {eos_token_id}")
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    for i in range(256, vocab_size):
        token = EOS_TOKEN if i == eos_token_id else "".join(chars[b] for b in f" t{i}".encode())
        vocab[token] = i
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    return backend.to_str()


def _export_all(models: Sequence[tuple[str, str, str]], out_dir: Path, *, tokenizer: Optional[Path],
                progress: Progress, timings: dict[str, float], notes: list[str]) -> dict[str, Path]:
    repos = {}
    for name, source, precision in models:
        progress.start(f"export-model --model {source} --precision {precision}", 1)
        with timed() as elapsed:
            repos[name], reused = export_repository(source, precision=precision, out=out_dir / "repos" / name,
                                                    tokenizer=tokenizer, log=out_dir / f"export_{name}.log")
        timings[f"export_{name}_s"] = elapsed()
        if reused:
            notes.append(f"export {name} reused from an earlier run ({out_dir / 'repos' / name})")
        progress.advance()
    return repos


def _level(levels: Sequence[Mapping[str, Any]], c: int) -> Optional[Mapping[str, Any]]:
    return next((lv for lv in levels if lv["concurrency"] == c), None)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def _serve(repository: Path, out_dir: Path, label: str) -> Any:
    return new_local_server(repository, log_file=out_dir / f"tritonserver_{label}.log")


PARTIAL_JSON = "bench.partial.json"


def run_targets(out_dir: Path | str, *, concurrency: Sequence[int] = (1, 2, 4, 8), requests: Optional[int] = None,
                mode: Mode = "client", prompt_tokens: int = 128, output_tokens: int = 128,
                progress: Progress = NoProgress(), perf_analyzer: bool = True) -> dict[str, Any]:
    """Everything the targets table needs, end to end (see the issue): exports, servers,
    served levels, ITL vs context, int8, baselines, start-to-ready, peak RSS, perf_analyzer.

    The report grows phase by phase and is saved to out_dir/bench.partial.json after each, so
    an interrupted run keeps what it measured."""
    options = BenchOptions(mode=mode, concurrency=tuple(sorted(concurrency)), prompt_tokens=prompt_tokens,
                           output_tokens=output_tokens, requests=requests)
    if 1 not in options.concurrency or 8 not in options.concurrency:
        raise ValueError(f"concurrency must include 1 and 8 for the targets, got {options.concurrency}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite_t0 = time.perf_counter()
    errors: list[str] = []
    notes: list[str] = []
    timings: dict[str, float] = {}
    report: dict[str, Any] = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(), "load_average_at_start": machine_info().get("load_average")},
        "settings": {
            "suite": "targets", "url": "local tritonserver (started by the suite)", "protocol": "gRPC",
            "mode": mode, "model": "gpt2-random (gpt2 124M shape, random weights)", "precision": "fp32",
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "concurrency": list(options.concurrency),
            "requests": {str(c): options.requests_for(c) for c in options.concurrency},
        },
        "levels": [],
        "timings_s": timings,
        "notes": notes,
        "errors": errors,
    }

    def save_partial() -> None:
        timings["suite_s"] = time.perf_counter() - suite_t0
        write_json(out_dir / PARTIAL_JSON, finite_or_none(report))

    # 1. the gpt2-shape models, with export-model (the demo ones come last: training the demo
    #    model, when it is not cached yet, is the longest single step)
    tokenizer = out_dir / "gpt2_random_tokenizer.json"
    tokenizer.write_text(numbered_tokenizer_json(50257, eos_token_id=50256))  # gpt2's vocab and eos
    repos = _export_all(GPT2_MODELS, out_dir, tokenizer=tokenizer, progress=progress, timings=timings, notes=notes)
    fp32, int8 = read_repository(repos["gpt2-fp32"]), read_repository(repos["gpt2-int8"])
    check_fits(prompt_tokens=prompt_tokens, output_tokens=output_tokens, n_positions=fp32.config["n_positions"],
               concurrency=options.concurrency, max_sequences=fp32.max_sequences)
    vocab = fp32.config["vocab_size"]
    report["settings"].update(repository=str(fp32.repository), threads=fp32.threads)
    save_partial()

    # 2. fp32 on the server: start-to-ready, levels, ITL vs context, perf_analyzer; RSS all along
    server = _serve(fp32.repository, out_dir, "gpt2-fp32")
    progress.start("tritonserver gpt2 fp32: start to ready", 1)
    batching: dict[str, Any] = {}
    ctx: dict[str, Any] = {}
    report.update(batching=batching, context_itl=ctx)
    t0 = time.perf_counter()
    server.start()
    sampler = RssSampler(server.pid).start()
    try:
        server.wait_ready()
        start_to_ready = time.perf_counter() - t0
        report["server"] = {"start_to_ready_s": start_to_ready}
        progress.advance()
        url = server.grpc_url
        progress.start("warm-up", 1)
        warm_up(url, mode=mode, prompt_tokens=prompt_tokens, concurrency=1)
        progress.advance()
        levels = bench_levels(url, mode=mode, concurrency=options.concurrency, prompt_tokens=prompt_tokens,
                              output_tokens=output_tokens, requests_for=options.requests_for, vocab_size=vocab,
                              progress=progress, label="served fp32", metrics_url=server.metrics_url,
                              batching=batching)
        report["levels"] = [st.to_dict() for st, _ in levels]
        save_partial()
        if 1 in options.concurrency and 8 in options.concurrency:
            report["aggregate_pairs"] = aggregate_pairs(
                url, mode=mode, last_eight=_level(report["levels"], 8), prompt_tokens=prompt_tokens,
                output_tokens=output_tokens, requests_for=options.requests_for, vocab_size=vocab, progress=progress)
            save_partial()
        gen = ServedGenerator(url, mode=mode)
        try:
            ctx["served"] = context_itl(gen, vocab_size=vocab, progress=progress, label="served fp32")
        finally:
            gen.close()
        save_partial()
        if perf_analyzer:
            progress.start("perf_analyzer: gpt (sequences), generate (streaming)", 1)
            report["perf_analyzer"] = run_perf_analyzer(
                url, out_dir, script=_project_root() / "scripts" / "perf_analyzer.sh",
                n_positions=fp32.config["n_positions"], vocab_size=vocab, inflight_batching=fp32.inflight_batching)
            progress.advance()
        # baselines on the fp32 weights, each request paired with a served one (the server is
        # idle while a baseline runs, and vice versa)
        level1 = next(t for st, t in levels if st.concurrency == 1)
        baseline_prompts = random_prompts(options.requests_for(1), prompt_tokens, vocab_size=vocab, seed=1)[:3]
        reference = sorted(level1, key=lambda t: t.sent)[: len(baseline_prompts)]  # the same prompts, in order
        gen = ServedGenerator(url, mode=mode)
        try:
            report["baselines"] = baselines = measure_baselines(
                fp32, prompts=baseline_prompts, output_tokens=output_tokens, checkpoint="gpt2-random",
                progress=progress, reference=reference, served_generator=gen)
        finally:
            gen.close()
        errors += [f"baseline {k}: {v['error']}" for k, v in baselines.items() if "error" in v]
        save_partial()
    finally:
        peak_rss = sampler.stop()
        server.stop()
    report["server"].update({
        "peak_rss_bytes": peak_rss,
        "peak_rss_by_process": sampler.peak_by_process,
        "rss_samples": sampler.samples,
        "weight_bytes": fp32.weight_bytes,
        "kv_pool_bytes": fp32.kv_pool_bytes,
        "max_sequences": fp32.max_sequences,
        "threads": fp32.threads,
    })
    save_partial()

    # 3. int8 on the server, batch 1 (from here on, a failing part is recorded and the rest runs)
    def int8_served() -> dict[str, Any]:
        server = _serve(int8.repository, out_dir, "gpt2-int8")
        progress.start("tritonserver gpt2 int8: start to ready", 1)
        with timed() as elapsed:
            server.start()
            try:
                server.wait_ready()
            except BaseException:
                server.stop()
                raise
        report["server"]["int8_start_to_ready_s"] = elapsed()
        progress.advance()
        try:
            warm_up(server.grpc_url, mode=mode, prompt_tokens=prompt_tokens)
            (stats, _), = bench_levels(server.grpc_url, mode=mode, concurrency=[1], prompt_tokens=prompt_tokens,
                                       output_tokens=output_tokens, requests_for=options.requests_for,
                                       vocab_size=vocab, progress=progress, label="served int8")
        finally:
            server.stop()
        return stats.to_dict()

    int8_one = _attempt("int8 served", int8_served, errors) or {}
    report["int8"] = {"served_c1": int8_one}
    if int8_one:
        report["served_extra"] = {"int8 (gpt2 shape), served": [int8_one]}
    save_partial()

    # 4. ITL against context in process (no server running)
    def ort_context() -> dict[str, Any]:
        loop = OrtLoop(fp32.engine, threads=fp32.threads, max_length=fp32.config["n_positions"])
        return context_itl(loop, vocab_size=vocab, progress=progress, label="in-process ORT")

    ctx["ort_inprocess"] = _attempt("in-process ORT ITL vs context", ort_context, errors)
    save_partial()

    # 5. int8 greedy agreement: the demo model (trained) is the real check; gpt2-random for the record
    agreement: dict[str, Any] = {}
    report["int8"]["agreement"] = agreement
    agreement["gpt2-random"] = _attempt("int8 agreement (gpt2-random)", lambda: int8_agreement(
        fp32.engine, int8.engine, random_prompts(4, 32, vocab_size=vocab, seed=99), threads=fp32.threads,
        max_length=fp32.config["n_positions"]), errors)
    save_partial()

    def demo_agreement() -> dict[str, Any]:
        from serving.tokenizer import Tokenizer

        repos.update(_export_all(DEMO_MODELS, out_dir, tokenizer=None, progress=progress, timings=timings,
                                 notes=notes))
        progress.start("int8 vs fp32 greedy agreement on the demo prompts (in-process engine)", 1)
        demo32, demo8 = read_repository(repos["demo-fp32"]), read_repository(repos["demo-int8"])
        tokenizer = Tokenizer.from_file(demo32.repository / "tokenizer" / "1" / "tokenizer.json")
        prompts = [tokenizer.encode(p) for p in AGREEMENT_PROMPTS]
        result = int8_agreement(demo32.engine, demo8.engine, prompts, threads=demo32.threads,
                                max_length=demo32.config["n_positions"])
        progress.advance()
        return result

    agreement["demo"] = _attempt("int8 agreement (demo)", demo_agreement, errors) or {}

    # 6. the ratios
    lv = report["levels"]
    one, eight = _level(lv, 1), _level(lv, 8)
    served_tps = one["tokens_per_s_per_stream"] if one else None

    def paired(key: str) -> Optional[float]:
        return baselines.get(key, {}).get("paired_ratio")

    # the served rate next to the bandwidth limit: every served request of the paired phase
    paired_served = [r for k in ("ort_inprocess", "torch_loop", "transformers")
                     if (r := baselines.get(k, {}).get("paired_served", {}).get("tokens_per_s_per_stream"))]
    served_paired_tps = float(np.median(paired_served)) if paired_served else served_tps

    report["ratios"] = judge({
        "served_vs_transformers": paired("transformers"),
        "served_vs_ort_inprocess": paired("ort_inprocess"),
        "served_vs_bandwidth_limit": _ratio(served_paired_tps, baselines.get("bandwidth_limit", {}).get("tokens_per_s")),
        "itl_ctx1000_vs_ctx100": ctx["served"]["ratio_p50"],
        "aggregate_8_vs_1": report["aggregate_pairs"]["ratio"] if "aggregate_pairs" in report else
        _ratio(eight["aggregate_tokens_per_s"] if eight else None, one["aggregate_tokens_per_s"] if one else None),
        "int8_vs_fp32": _ratio(int8_one.get("tokens_per_s_per_stream"), served_tps),
        "start_to_ready_s": start_to_ready,
        "rss_vs_weights_kv": _ratio(float(peak_rss), float(fp32.weight_bytes + fp32.kv_pool_bytes)),
        "int8_greedy_agreement": agreement["demo"].get("free_running"),
    })
    notes += [
        "served tokens/s = the decode rate of one stream, (n-1)/(last-first token), at concurrency 1; the "
        "baselines are measured the same way on the same prompts (batch 1, same intra-op thread count). "
        "served_vs_transformers and served_vs_ort_inprocess are paired: each baseline request ran right after a "
        "served request of the same prompt (the server up and idle), and the ratio is the median of the "
        "per-pair ratios, so a slow drift of the machine's speed cancels; served_vs_bandwidth_limit uses the "
        "median served rate of those pairs.",
        "itl_ctx1000_vs_ctx100: the two prompt lengths take turns (short, long, ...; 3 turns, 16 ITLs each); the "
        "ratio is the median of the turns' ratios of p50 ITL.",
        "aggregate_8_vs_1: aggregate tokens/s = all new tokens of a run (prefills included) / its wall time; the "
        "ratio is the median of three ratios of adjacent runs (aggregate_pairs: the levels' 8-stream run, then "
        "1, 8 and 1 streams on the same prompts).",
        "int8_greedy_agreement: demo model (trained), free-running greedy continuations of "
        f"{len(AGREEMENT_PROMPTS)} fixed prompts, {AGREEMENT_NEW_TOKENS} new tokens each, position by position, "
        "in the serving engine in process (the served path gives the engine's tokens); the teacher-forced "
        "reading and the gpt2-random numbers are in int8.agreement (random weights: near-flat logits, so "
        "rounding flips the argmax and the number says little).",
        "rss_vs_weights_kv: peak of the summed RSS of tritonserver and its python-backend stubs (psutil, "
        "sampled every 50 ms from start through the fp32 benchmark) / (engine file bytes + the gpt model's "
        "full KV pool bytes); pages shared between processes count in each, so the sum errs high.",
        "the load average at the start and at the end of the run is in machine: other work on the machine "
        "slows every path, and not all paths by the same factor, so the ratios are only as clean as the "
        "machine was quiet.",
    ]
    report["machine"]["load_average_at_end"] = machine_info().get("load_average")
    timings["suite_s"] = time.perf_counter() - suite_t0
    (out_dir / PARTIAL_JSON).unlink(missing_ok=True)
    return report


def _attempt(label: str, fn: Callable[[], Any], errors: list[str]) -> Any:
    """fn(), or None with the error recorded (and logged) when it fails."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others' numbers
        logger.exception("%s failed", label)
        errors.append(f"{label}: {type(e).__name__}: {e}")
        return None


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent
