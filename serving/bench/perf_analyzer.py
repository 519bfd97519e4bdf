"""perf_analyzer (Triton's load generator) on the gpt and generate models of a running server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serving.bench.procs import tail
from serving.bench.stats import random_prompts


PERF_ANALYZER_TIMEOUT_S = 240


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
                              "summary": "; ".join(lines) if ok else tail(proc.stdout + proc.stderr, 3),
                              "log": log.name, "csv": csv.name if csv.exists() else None}
        except (OSError, subprocess.TimeoutExpired) as e:
            log.write_text("$ " + " ".join(cmd) + f"\n{type(e).__name__}: {e}\n")
            results[model] = {"status": "failed", "summary": f"{type(e).__name__}: {e}", "log": log.name}
    return results
