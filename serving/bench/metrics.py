"""The server's batching, from its metrics: Triton's counters of the gpt model, scraped around a level."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from serving.bench.stats import ratio

logger = logging.getLogger(__name__)


# Triton's own counters of the gpt model, and the ones its model.py exports
BATCHING_METRICS = ("nv_inference_count", "nv_inference_exec_count", "gptpipe_step_requests_total",
                    "gptpipe_runtime_calls_total", "gptpipe_batched_rows_total")


def scrape_metrics(metrics_url: str, *, model: str = "gpt",
                   names: Sequence[str] = BATCHING_METRICS) -> dict[str, float]:
    """The metrics `names` (default BATCHING_METRICS) of `model` from Triton's Prometheus endpoint."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(metrics_url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, brace, rest = line.partition("{")
        if brace and name in names and f'model="{model}"' in rest:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def batching_summary(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What the server did with a level's step requests: how many Triton handed to one
    execute() and how many rows one ONNX Runtime call ran, on average."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in BATCHING_METRICS}
    return {
        "step_requests": int(d["nv_inference_count"]),
        "triton_executions": int(d["nv_inference_exec_count"]),
        "requests_per_execution": ratio(d["nv_inference_count"], d["nv_inference_exec_count"]),
        "runtime_calls": int(d["gptpipe_runtime_calls_total"]),
        "steps_per_runtime_call": ratio(d["gptpipe_step_requests_total"], d["gptpipe_runtime_calls_total"]),
        "rows_in_batched_calls": int(d["gptpipe_batched_rows_total"]),
    }


def try_scrape(metrics_url: Optional[str], *, names: Sequence[str] = BATCHING_METRICS) -> Optional[dict[str, float]]:
    if metrics_url is None:
        return None
    try:
        return scrape_metrics(metrics_url, names=names)
    except OSError as e:  # the numbers are extra; the benchmark goes on without them
        logger.warning("could not read the server's metrics at %s: %s", metrics_url, e)
        return None
