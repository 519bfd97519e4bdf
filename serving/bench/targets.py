"""The targets suite (`gptpipe bench --suite targets`): the issue's target table, measured end to end.

`run_targets` exports the demo model and the gpt2-shape random model in fp32 and int8 with
`export-model` (child processes; gpt2-random has no tokenizer of its own, so it gets a numbered
one — the benchmark sends token ids and never detokenizes), serves each gpt2 export with a real
tritonserver (start-to-ready, summed RSS of the server and its stubs sampled with psutil), runs
the levels, ITL at context ~100 and ~1000, perf_analyzer, the baselines, and the int8 greedy
agreement; `judge` turns the ratios into pass/fail against `TARGETS`.

int8 greedy agreement: on random weights the next-token distributions are near-flat (top-1
margins ~1e-3 logits), so any rounding flips the argmax and agreement says nothing about the
quantization. It is measured on the trained demo model: fixed prompts (`AGREEMENT_PROMPTS`),
32 greedy tokens each, int8 against fp32 position by position, free-running (the target's
number: strict, since after a first divergence the contexts differ) and teacher-forced (int8
reads fp32's tokens: the per-step agreement). The int8 *speed* is measured on the gpt2 shape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serving.bench.baselines import measure_baselines
from serving.bench.exports import export_all
from serving.bench.levels import aggregate_pairs, bench_levels, context_itl, warm_up
from serving.bench.numbered_tokenizer import numbered_tokenizer_json
from serving.bench.ort_loop import AGREEMENT_NEW_TOKENS, OrtLoop, int8_agreement
from serving.bench.peer_bench import measure_peers, peer_prompts, peer_ratios
from serving.bench.perf_analyzer import run_perf_analyzer
from serving.bench.prefix import prefix_scenario
from serving.bench.probes import RssSampler, machine_info
from serving.bench.procs import project_root
from serving.bench.progress import NoProgress, Progress, timed
from serving.bench.report import finite_or_none, write_json
from serving.bench.run import BenchOptions, check_fits
from serving.bench.served import Mode, ServedGenerator, new_local_server, read_repository
from serving.bench.stats import judge as judge_rows, random_prompts, ratio

logger = logging.getLogger(__name__)


# (key, comparison, target, what it is) in the order bench.json lists them
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("served_vs_transformers", ">=", 2.0, "served tokens/s / transformers eager generate tokens/s, batch 1"),
    ("served_vs_ort_inprocess", ">=", 0.85, "served tokens/s / in-process ONNX Runtime loop tokens/s"),
    ("served_vs_bandwidth_limit", ">=", 0.6, "served tokens/s / memory-bandwidth-limit tokens/s"),
    ("itl_ctx1000_vs_ctx100", "<=", 1.3, "served ITL at context ~1000 / at context ~100"),
    ("aggregate_8_vs_1", ">=", 4.5, "aggregate tokens/s, 8 concurrent streams / 1 stream"),
    ("ttft_p90_8_vs_p50_1", "<=", 2.5, "TTFT p90 at 8 concurrent streams in the steady state (every request "
                                       "after each stream's first) / TTFT p50 at 1 stream"),
    ("itl_p99_vs_p50_8", "<=", 2.0, "ITL p99 / ITL p50, both at 8 concurrent streams"),
    ("ttft_cached_prefix_vs_uncached", "<=", 0.2, "TTFT, 512 cached prefix tokens + 16 new / the same length "
                                                   "uncached (paired)"),
    ("prefix_greedy_identical", ">=", 1.0, "1 when greedy tokens of a prompt served from the prefix cache are "
                                           "those of its uncached run"),
    ("int8_vs_fp32", ">=", 1.7, "int8 served tokens/s / fp32 served tokens/s (gpt2 shape)"),
    ("start_to_ready_s", "<=", 20.0, "server start to ready, seconds (gpt2 shape)"),
    ("rss_vs_weights_kv", "<=", 1.5, "server peak RSS (+ stubs) / (weight bytes + KV pool bytes)"),
    ("int8_greedy_agreement", ">=", 0.9, "greedy tokens int8 agrees with fp32 on the demo prompts (demo model)"),
)


def judge(ratios: Mapping[str, Optional[float]]) -> dict[str, dict[str, Any]]:
    """The `ratios` object of bench.json for TARGETS (see serving.bench.stats.judge)."""
    return judge_rows(ratios, TARGETS)


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


GPT2_MODELS = (("gpt2-fp32", "gpt2-random", "fp32"), ("gpt2-int8", "gpt2-random", "int8"))  # (name, source, precision)
DEMO_MODELS = (("demo-fp32", "demo", "fp32"), ("demo-int8", "demo", "int8"))
DEMO_INT4 = (("demo-int4", "demo", "int4"),)


PARTIAL_JSON = "bench.partial.json"


def run_targets(out_dir: Path | str, *, concurrency: Sequence[int] = (1, 2, 4, 8), requests: Optional[int] = None,
                mode: Mode = "client", prompt_tokens: int = 128, output_tokens: int = 128,
                progress: Progress = NoProgress(), perf_analyzer: bool = True,
                peers: Sequence[str] = ()) -> dict[str, Any]:
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
            "peers": list(peers),
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
    repos = export_all(GPT2_MODELS, out_dir, tokenizer=tokenizer, progress=progress, timings=timings, notes=notes)
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
        def prefix() -> dict[str, Any]:
            gen = ServedGenerator(url, mode=mode)
            try:
                return prefix_scenario(gen, vocab_size=vocab, progress=progress, metrics_url=server.metrics_url,
                                       make_generator=lambda: ServedGenerator(url, mode=mode),
                                       concurrency=max(options.concurrency))
            finally:
                gen.close()

        report["prefix"] = _attempt("prefix scenario", prefix, errors) or {}
        save_partial()
        if perf_analyzer:
            progress.start("perf_analyzer: gpt (sequences), generate (streaming)", 1)
            report["perf_analyzer"] = run_perf_analyzer(
                url, out_dir, script=project_root() / "scripts" / "perf_analyzer.sh",
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
        if peers:  # the peer engines on the fp32 weights, paired the same way
            report["peers"] = _attempt("peers fp32", lambda: measure_peers(
                fp32, peers, prompts=peer_prompts(3, prompt_tokens, vocab_size=vocab), output_tokens=output_tokens,
                source="gpt2-random",
                make_generator=lambda: ServedGenerator(url, mode=mode), progress=progress), errors) or {}
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
            if peers:
                report.setdefault("peers", {}).update(_attempt("peers int8", lambda: measure_peers(
                    int8, peers, prompts=peer_prompts(3, prompt_tokens, vocab_size=vocab), output_tokens=output_tokens,
                    source="gpt2-random",
                    make_generator=lambda: ServedGenerator(server.grpc_url, mode=mode), progress=progress),
                    errors) or {})
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

        repos.update(export_all(DEMO_MODELS, out_dir, tokenizer=None, progress=progress, timings=timings,
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

    def demo_int4_agreement() -> dict[str, Any]:
        from serving.tokenizer import Tokenizer

        repos.update(export_all(DEMO_INT4, out_dir, tokenizer=None, progress=progress, timings=timings, notes=notes))
        progress.start("int4 vs fp32 greedy agreement on the demo prompts (in-process engine)", 1)
        demo32, demo4 = read_repository(repos["demo-fp32"]), read_repository(repos["demo-int4"])
        tokenizer = Tokenizer.from_file(demo32.repository / "tokenizer" / "1" / "tokenizer.json")
        result = int8_agreement(demo32.engine, demo4.engine, [tokenizer.encode(p) for p in AGREEMENT_PROMPTS],
                                threads=demo32.threads, max_length=demo32.config["n_positions"])
        progress.advance()
        return result

    if "demo-fp32" in repos:
        report["int4"] = {"agreement": {"demo": _attempt("int4 agreement (demo)", demo_int4_agreement, errors) or {}}}
        save_partial()

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
        "served_vs_bandwidth_limit": ratio(served_paired_tps, baselines.get("bandwidth_limit", {}).get("tokens_per_s")),
        "itl_ctx1000_vs_ctx100": ctx["served"]["ratio_p50"],
        "aggregate_8_vs_1": report["aggregate_pairs"]["ratio"] if "aggregate_pairs" in report else
        ratio(eight["aggregate_tokens_per_s"] if eight else None, one["aggregate_tokens_per_s"] if one else None),
        "ttft_p90_8_vs_p50_1": ratio(eight["ttft_steady_ms"]["p90"] if eight else None,
                                     one["ttft_ms"]["p50"] if one else None),
        "itl_p99_vs_p50_8": ratio(eight["itl_ms"]["p99"] if eight else None, eight["itl_ms"]["p50"] if eight else None),
        "ttft_cached_prefix_vs_uncached": report["prefix"].get("ttft_ratio"),
        "prefix_greedy_identical": float(report["prefix"]["greedy_identical"]) if report["prefix"] else None,
        "int8_vs_fp32": ratio(int8_one.get("tokens_per_s_per_stream"), served_tps),
        "start_to_ready_s": start_to_ready,
        "rss_vs_weights_kv": ratio(float(peak_rss), float(fp32.weight_bytes + fp32.kv_pool_bytes)),
        "int8_greedy_agreement": agreement["demo"].get("free_running"),
    })
    if one and eight:  # the closed loop's start, and all requests together, beside the judged steady state
        report["ratios"]["ttft_p90_8_vs_p50_1"].update(
            start_value=ratio(eight["ttft_start_ms"]["p90"], one["ttft_ms"]["p50"]),
            all_requests_value=ratio(eight["ttft_ms"]["p90"], one["ttft_ms"]["p50"]))
    int4_free = report.get("int4", {}).get("agreement", {}).get("demo", {}).get("free_running")
    report["ratios"].update(peer_ratios(
        report.get("peers", {}), precisions=("fp32", "int8"), peers_asked=peers,
        extra={"int4_greedy_agreement": int4_free},
        extra_skipped={"int4_greedy_agreement": "the demo int4 export or its agreement run failed (see errors)",
                       "served_vs_llamacpp_int4": "the suite serves fp32 and int8 only; run gptpipe bench "
                       "--repository <an int4 export> --peers llama.cpp"}))
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
        "ttft_p90_8_vs_p50_1 and itl_p99_vs_p50_8 come from the levels (1 and 8 streams, client-side loop). "
        "The TTFT row is the steady state: each stream's first request is left out, because the closed loop "
        "sends all 8 at the same instant and the last of them waits for 7 whole prefills whatever the "
        "scheduler does (prefill is compute-bound); that start is in the row's start_value (and every "
        "request together in all_requests_value), unjudged.",
        "ttft_cached_prefix_vs_uncached: the prefix scenario (serving/bench/prefix.py), one stream: a 512-token "
        "system prompt + 16 new tokens, its system blocks cached, against a never-seen 528-token prompt, in "
        "alternating order; the median of the per-pair ratios. prefix_greedy_identical: each never-seen prompt "
        "sent again (now cached) gives the greedy tokens of its first run.",
        "int8_greedy_agreement: demo model (trained), free-running greedy continuations of "
        f"{len(AGREEMENT_PROMPTS)} fixed prompts, {AGREEMENT_NEW_TOKENS} new tokens each, position by position, "
        "in the serving engine in process (the served path gives the engine's tokens); the teacher-forced "
        "reading and the gpt2-random numbers are in int8.agreement (random weights: near-flat logits, so "
        "rounding flips the argmax and the number says little).",
        "rss_vs_weights_kv: peak of the summed RSS of tritonserver and its python-backend stubs (psutil, "
        "sampled every 50 ms from start through the fp32 benchmark) / (engine file bytes + the gpt model's "
        "full KV pool bytes); pages shared between processes count in each, so the sum errs high.",
        "the peer rows (served_vs_openvino_*, served_vs_llamacpp_*, ttft_vs_best_peer, aggregate8_vs_openvino; "
        "--peers, serving/bench/peer_bench.py): each peer on the gpt2-random weights converted for it, its logits "
        "checked against the served engine's first, then each of its requests right after a served request of "
        "the same prompt; medians of the per-pair ratios. int4_greedy_agreement: as int8's, demo int4 export.",
        "the load average at the start and at the end of the run is in machine: other work on the machine "
        "slows every path, and not all paths by the same factor, so the ratios are only as clean as the "
        "machine was quiet.",
    ]
    report["machine"]["load_average_at_end"] = machine_info().get("load_average")
    timings["suite_s"] = time.perf_counter() - suite_t0
    (out_dir / PARTIAL_JSON).unlink(missing_ok=True)
    return report


def _level(levels: Sequence[Mapping[str, Any]], c: int) -> Optional[Mapping[str, Any]]:
    return next((lv for lv in levels if lv["concurrency"] == c), None)


def _serve(repository: Path, out_dir: Path, label: str) -> Any:
    return new_local_server(repository, log_file=out_dir / f"tritonserver_{label}.log")


def _attempt(label: str, fn: Callable[[], Any], errors: list[str]) -> Any:
    """fn(), or None with the error recorded (and logged) when it fails."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others' numbers
        logger.exception("%s failed", label)
        errors.append(f"{label}: {type(e).__name__}: {e}")
        return None
