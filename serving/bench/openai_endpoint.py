"""`gptpipe bench --endpoint openai`: the OpenAI frontend as a measured path beside the direct client.

A `gptpipe openai` process (its own process, so the load generator's direct-client rounds do not
share its interpreter) in front of the server; `openai_loadgen.compare` runs paired rounds,
frontend then direct gRPC client, per concurrency level; each level gives a ratio row
`openai_vs_grpc_c<N>` (frontend tokens/s ÷ direct, target >= 0.9). When aiperf's venv exists
(`scripts/aiperf.sh`), aiperf profiles the same frontend at the same concurrency and token
counts, and its TTFT, ITL and output tokens/s are set beside the load generator's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from serving.bench.openai_loadgen import compare
from serving.bench.probes import machine_info
from serving.bench.progress import NoProgress, Progress
from serving.bench.run import BenchOptions, _no_server
from serving.bench.served import local_server, read_repository

logger = logging.getLogger(__name__)

TARGET = 0.9
READY_TIMEOUT_S = 60.0
AIPERF_TIMEOUT_S = 600.0
ROOT = Path(__file__).resolve().parents[2]
AIPERF_SCRIPT = ROOT / "scripts" / "aiperf.sh"
AIPERF_VENV = Path(os.environ.get("AIPERF_VENV", ROOT / ".venv-aiperf"))


@contextmanager
def frontend_process(grpc_url: str, model: str, *, log_file: Path) -> Iterator[str]:
    """`gptpipe openai` on a free port in front of grpc_url; yields its base URL once /health is 200."""
    from serving.server import free_ports

    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "GPTPIPE_API_KEY"}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "openai", "--url", grpc_url, "--port", str(port),
                                 "--served-model-name", model], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the OpenAI frontend exited with {proc.returncode}: {log_file.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the OpenAI frontend was not ready in {READY_TIMEOUT_S:.0f} s (log: {log_file})")
                time.sleep(0.1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def ratio_rows(levels: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """bench.json's `ratios` rows: openai_vs_grpc_c<N> per level, judged against TARGET."""
    return {f"openai_vs_grpc_c{lv['concurrency']}": {
        "value": lv["ratio_median"], "target": f">= {TARGET:g}", "pass": lv["ratio_median"] >= TARGET,
        "what": f"frontend streamed /v1/completions tokens/s ÷ direct AsyncClient tokens/s at concurrency "
                f"{lv['concurrency']} (median of {len(lv['ratios'])} paired rounds)"} for lv in levels}


def _metric(data: dict[str, Any], name: str) -> Optional[float]:
    entry = data.get(name)
    if isinstance(entry, dict):
        value = entry.get("p50", entry.get("avg"))
        return float(value) if value is not None else None
    return None


def read_aiperf(artifact_dir: Path) -> dict[str, Optional[float]]:
    """TTFT p50 (ms), ITL p50 (ms) and output tokens/s from aiperf's profile_export_aiperf.json."""
    found = sorted(artifact_dir.rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {artifact_dir}")
    data = json.loads(found[-1].read_text())
    return {"ttft_ms": _metric(data, "time_to_first_token"), "itl_ms": _metric(data, "inter_token_latency"),
            "output_tokens_per_s": (data.get("output_token_throughput") or {}).get("avg")}


def run_aiperf(base_url: str, model: str, tokenizer: Path, *, concurrency: int, requests: int, prompt_tokens: int,
               output_tokens: int, out_dir: Path) -> dict[str, Any]:
    """One `scripts/aiperf.sh` level; its numbers and the command that ran."""
    command = ["bash", str(AIPERF_SCRIPT), "--url", base_url, "--model", model, "--tokenizer", str(tokenizer),
               "--concurrency", str(concurrency), "--requests", str(requests), "--input-tokens", str(prompt_tokens),
               "--output-tokens", str(output_tokens)]
    env = {**os.environ, "OUT": str(out_dir), "AIPERF_VENV": str(AIPERF_VENV)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=AIPERF_TIMEOUT_S, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"aiperf exited with {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {"command": " ".join(command), **read_aiperf(out_dir / f"concurrency-{concurrency}")}


def _agreement(aiperf: dict[str, Any], level: dict[str, Any]) -> dict[str, Any]:
    """aiperf ÷ gptpipe bench (the frontend rounds' medians) per metric."""
    ours = {"ttft_ms": statistics.median(x["ttft_ms"] for x in level["openai"]),
            "itl_ms": statistics.median(x["itl_ms"] for x in level["openai"]),
            "output_tokens_per_s": statistics.median(x["tokens_per_s"] for x in level["openai"])}
    ratios = {k: (aiperf[k] / v if aiperf.get(k) and v else None) for k, v in ours.items()}
    return {"gptpipe_bench": ours, "aiperf_over_gptpipe": ratios,
            "within_10pct": {k: (r is not None and abs(r - 1) <= 0.1) for k, r in ratios.items()}}


def run_openai_bench(options: BenchOptions, *, out_dir: Path, rounds: int = 3, requests_per_stream: int = 3,
                     aiperf: Optional[bool] = None, progress: Progress = NoProgress()) -> dict[str, Any]:
    """The report dict for `gptpipe bench --endpoint openai` (levels empty; `openai`, `ratios`, `aiperf`)."""
    from serving.openai.background import served_model_name

    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    served = read_repository(options.repository) if options.url is None else None
    model = served_model_name(options.repository if options.repository.is_dir() else None)
    use_aiperf = (AIPERF_VENV / "bin" / "aiperf").is_file() if aiperf is None else aiperf
    tokenizer = options.repository / "tokenizer" / "1"
    errors: list[str] = []
    aiperf_rows: dict[str, Any] = {}
    levels = sorted(options.concurrency)
    triton = local_server(served.repository) if served else _no_server(options.url)
    with triton as server, frontend_process(server.grpc_url, model, log_file=out_dir / "openai-frontend.log") as base:
        progress.start("openai vs grpc (paired rounds)", len(levels))
        paired = []
        for c in levels:
            paired += asyncio.run(compare(base, server.grpc_url, model, concurrency=[c], rounds=rounds,
                                          requests_per_stream=requests_per_stream, max_tokens=options.output_tokens,
                                          prompt_tokens=options.prompt_tokens))
            progress.advance()
        if use_aiperf:
            progress.start("aiperf", len(levels))
            for level in paired:
                c = level["concurrency"]
                try:
                    row = run_aiperf(base, model, tokenizer, concurrency=c, requests=c * requests_per_stream,
                                     prompt_tokens=options.prompt_tokens, output_tokens=options.output_tokens,
                                     out_dir=out_dir / "aiperf")
                    aiperf_rows[str(c)] = row | _agreement(row, level)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    errors.append(f"aiperf at concurrency {c}: {e}")
                progress.advance()
    return {
        "format": 1, "created": created, "machine": machine_info(),
        "settings": {"url": options.url or f"local server on {options.repository}", "protocol": "OpenAI HTTP (SSE)",
                     "endpoint": "openai", "mode": "client", "model": model, "repository": str(options.repository),
                     "prompt_tokens": options.prompt_tokens, "output_tokens": options.output_tokens,
                     "concurrency": levels, "rounds": rounds, "requests_per_stream": requests_per_stream},
        "levels": [], "openai": paired, "ratios": ratio_rows(paired), "aiperf": aiperf_rows,
        "notes": ["openai_vs_grpc: each round runs the frontend's streamed /v1/completions then the direct "
                  "AsyncClient on the same requests (token-id prompts, greedy, ignore_eos); the ratio is the "
                  "median of the rounds' ratios, so slow drift of the machine's load cancels.",
                  "aiperf sends chat messages (the frontend renders the template and tokenizes), the load "
                  "generator token ids: TTFT is not like for like; ITL and output tokens/s are."],
        "errors": errors,
    }
