"""The report of a run: bench.json (strict JSON), bench.md (markdown tables) and the PNG plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
ITL_PNG = "itl_vs_concurrency.png"
THROUGHPUT_PNG = "tokens_per_s_vs_concurrency.png"


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


BASELINE_LABELS = {
    "transformers": "transformers GPT2LMHeadModel.generate (PyTorch eager, KV cache)",
    "torch_loop": "gptpipe PyTorch loop (export.model)",
    "ort_inprocess": "in-process ONNX Runtime loop (serving.engine.runtime, no Triton)",
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
    header = ["concurrency", "requests", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "TTFT p90 ms, start",
              "TTFT p90 ms, steady", "ITL p50 ms", "ITL p99 ms", "tok/s per stream", "aggregate tok/s", "req/s"]
    rows = [[
        str(lv["concurrency"]), str(lv["requests"]), _fmt(lv["ttft_ms"]["p50"]), _fmt(lv["ttft_ms"]["p90"]),
        _fmt(lv["ttft_ms"]["p99"]), _fmt(lv.get("ttft_start_ms", {}).get("p90")),
        _fmt(lv.get("ttft_steady_ms", {}).get("p90")), _fmt(lv["itl_ms"]["p50"], 2), _fmt(lv["itl_ms"]["p99"], 2),
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
               "aggregate tokens/s is all new tokens of a level / its wall time. TTFT at the start: each "
               "stream's first request (all sent together, queued behind each other's prefills); steady: "
               "every later request.")
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
    if report.get("peers"):
        out += ["", "## Peer engines (same weights, same thread count, paired with served requests)", ""]
        rows = []
        for key, b in report["peers"].items():
            if "skipped" in b or "error" in b:
                rows.append([key, "–", "–", "–", "–", "–", ("skipped: " + b["skipped"]) if "skipped" in b
                             else f"failed: {b['error']}"])
            elif "stats" in b:
                st = b["stats"]
                rows.append([key, _fmt(st["tokens_per_s_per_stream"]), _fmt(st["itl_ms"]["p50"], 2),
                             _fmt(st["ttft_ms"]["p50"]), _fmt(b.get("paired_ratio"), 2),
                             _fmt(b.get("paired_ttft_ratio"), 2), b.get("note", "")])
            else:  # continuous batching, 8 streams
                rows.append([key, _fmt(float(np.median(b["peer_aggregate_tokens_per_s"]))) + " aggregate", "–", "–",
                             _fmt(b["ratio"], 2), "–", b.get("note", "")])
        out += _table(["peer", "tok/s", "ITL p50 ms", "TTFT p50 ms", "served ÷ peer tok/s", "served ÷ peer TTFT",
                       "note"], rows)
    if report.get("batching"):
        out += ["", "### What the server batched (from its metrics)", ""]
        rows = [[c, str(b["step_requests"]), str(b["triton_executions"]), _fmt(b["requests_per_execution"], 2),
                 str(b["runtime_calls"]), _fmt(b["steps_per_runtime_call"], 2)] for c, b in report["batching"].items()]
        out += _table(["concurrency", "step requests", "Triton executions", "requests/execution",
                       "ORT calls", "steps/ORT call"], rows)
    for title, key in (("8 streams vs 1, adjacent runs", "aggregate_pairs"), ("Context length", "context_itl"),
                       ("Prefix cache (shared system prompt)", "prefix"),
                       ("Server", "server"), ("int8", "int8"),
                       ("OpenAI frontend vs direct gRPC client, paired rounds", "openai"),
                       ("aiperf against the frontend, beside gptpipe bench", "aiperf")):
        if report.get(key):
            out += ["", f"## {title}", "", "```json", json.dumps(finite_or_none(report[key]), indent=2), "```"]
    ratios = report.get("ratios")
    if ratios:
        out += ["", "## Targets", ""]
        rows = [[k, _fmt(r["value"], 3), r["target"], _verdict(r), r["what"]] for k, r in ratios.items()]
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


def _verdict(row: Mapping[str, Any]) -> str:
    if row["pass"] is None:
        return f"SKIPPED: {row.get('skipped', '')}"
    return "PASS" if row["pass"] else "FAIL"


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
