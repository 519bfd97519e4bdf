"""The baselines of a run, batch 1 on the served weights: bandwidth limit, in-process ORT, PyTorch.

The PyTorch ones live in `export.baselines`, imported only here and only when a run asks for
them: serving never imports torch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from serving.bench.ort_loop import OrtLoop
from serving.bench.probes import bandwidth_limit, measure_read_bandwidth
from serving.bench.progress import NoProgress, Progress
from serving.bench.served import ServedModel
from serving.bench.stats import Generator, RequestTiming, greedy_agreement, level_stats

logger = logging.getLogger(__name__)


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
        ttft_pairs = [s.ttft / b.ttft for s, b in zip(paired, timings)]
        entry["paired_ttft_ratios"] = ttft_pairs  # served TTFT / baseline TTFT, same prompt
        entry["paired_ttft_ratio"] = float(np.median(ttft_pairs))
        if all(s.tokens for s in paired):
            entry["greedy_agreement_with_served"] = greedy_agreement([s.tokens for s in paired],
                                                                     [b.tokens for b in timings])
    return entry


def paired_run(generate: Generator, prompts: Sequence[Sequence[int]], *, output_tokens: int, note: str,
               label: str, served_generator: Optional[Generator] = None,
               reference: Optional[Sequence[RequestTiming]] = None,
               progress: Progress = NoProgress()) -> dict[str, Any]:
    """One baseline's entry: a warm-up, then per prompt a served request (when served_generator
    is given) right before the baseline's request of the same prompt."""
    progress.start(f"baseline: {label}" + (" (paired with served requests)" if served_generator else ""),
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
    return _baseline_entry(timings, output_tokens=output_tokens, note=note, reference=reference, paired=paired)


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
        from export.baselines import torch_read_bandwidth

        torch_bw = torch_read_bandwidth(threads=threads)
        if torch_bw > best:
            best, method = torch_bw, f"torch.sum over 512 MiB float32, {threads} thread(s), best of 5"
    except ImportError as e:  # no torch: numpy's number stands
        logger.warning("torch read bandwidth skipped: %s", e)
    limit = bandwidth_limit(served.config, bandwidth_b_s=best, method=method)
    out["bandwidth_limit"] = {**limit.to_dict(), "numpy_gb_s": numpy_bw / 1e9}
    progress.advance()

    def run(key: str, generate: Generator, note: str) -> None:
        out[key] = paired_run(generate, prompts, output_tokens=output_tokens, note=note, label=key,
                              served_generator=served_generator, reference=reference, progress=progress)

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
        from export import baselines as torch_baselines
    except ImportError as e:
        out["torch_loop"] = out["transformers"] = {"error": f"PyTorch baselines need torch: {e}"}
        return out
    try:
        with torch_baselines.torch_models(str(source), threads=threads) as (model, hf_model):
            run("torch_loop", lambda p, n: torch_baselines.torch_loop_generate(model, p, n),
                f"export.model.GPT from {source}, {threads} thread(s)")
            run("transformers", lambda p, n: torch_baselines.transformers_generate(hf_model, p, n),
                f"GPT2LMHeadModel.from_pretrained (save_model of {source}), eager, {threads} thread(s)")
    except Exception as e:  # noqa: BLE001
        logger.exception("PyTorch baselines failed")
        for key in ("torch_loop", "transformers"):
            out.setdefault(key, {"error": f"{type(e).__name__}: {e}"})
    return out
