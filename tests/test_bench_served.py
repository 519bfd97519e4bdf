"""`gptpipe bench` end to end: the targets suite's refusals at the CLI, and real runs against a
real tritonserver serving a tiny model (two concurrency levels, all four baselines; the served
generator's tokens; the 8-vs-1 pairs). Speed is not checked here (scripts/bench_targets.sh runs
the targets suite)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from export.model import generate_greedy
from serving.bench.levels import aggregate_pairs
from serving.bench.report import ITL_PNG, THROUGHPUT_PNG
from serving.bench.served import MODES, ServedGenerator
from serving.bench.stats import random_prompts
from tests.bench_fixtures import bench_cli as cli, tiny_bench_repository
from tests.triton_fixtures import attach_server_log, start_server


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory, request):
    model, repository, checkpoint = tiny_bench_repository(tmp_path_factory.mktemp("bench"))
    server = start_server(repository)
    yield model, repository, checkpoint, server
    server.stop()


@pytest.mark.parametrize("args, hint, message", [
    (["--no-baselines"], "--no-baselines", "needs the baselines"),
    (["--concurrency", "1,4"], "--concurrency", "needs levels 1 and 8"),
    (["--url", "localhost:1"], "--url", "starts its own servers"),
    (["--checkpoint", "demo"], "--checkpoint", "exports its own models"),
])
def test_targets_suite_refuses_options_it_cannot_honour(args, hint, message, tmp_path):
    """Refused before any export or server start: nothing is written."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli(), ["bench", "--suite", "targets", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert hint in result.output and message in " ".join(result.output.split())
    assert not out.exists()


def test_bench_against_a_real_server_writes_a_wellformed_report(tiny_served, tmp_path, request):
    model, repository, checkpoint, server = tiny_served
    attach_server_log(request, server)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli(), [
        "bench", "--url", server.grpc_url, "--repository", str(repository), "--checkpoint", str(checkpoint),
        "--concurrency", "1,2", "--prompt-tokens", "12", "--output-tokens", "10", "--requests", "4",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)

    report = json.loads((out / "bench.json").read_text())  # strict JSON: no NaN
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["requests"] == 4 and lv["tokens"] == 4 * 10
        assert 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p90"] <= lv["ttft_ms"]["p99"]
        assert 0 < lv["itl_ms"]["p50"] <= lv["itl_ms"]["p99"]
        assert lv["tokens_per_s_per_stream"] > 0 and lv["aggregate_tokens_per_s"] > 0 and lv["requests_per_s"] > 0
    base = report["baselines"]
    assert set(base) == {"bandwidth_limit", "ort_inprocess", "torch_loop", "transformers"}, report["errors"]
    assert base["bandwidth_limit"]["bandwidth_gb_s"] > 0.1
    for key in ("ort_inprocess", "torch_loop", "transformers"):
        assert base[key]["stats"]["tokens_per_s_per_stream"] > 0, key
        # greedy on the same weights and prompts: every path gives the served tokens
        assert base[key]["greedy_tokens_equal_served"] == "3/3", key
    assert report["errors"] == []

    md = (out / "bench.md").read_text()
    served = md.split("## Served\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in served.splitlines() if line.startswith("| ") and not line.startswith("| concurrency")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]  # one row per level
    assert "transformers GPT2LMHeadModel.generate" in md
    for png in (ITL_PNG, THROUGHPUT_PNG):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200


def test_served_tokens_are_the_pytorch_greedy_tokens(tiny_served, request):
    """The benchmark's own request path (ids in, fixed length, eos ignored) is correct."""
    model, _, _, server = tiny_served
    attach_server_log(request, server)
    prompt = random_prompts(1, 9, vocab_size=model.config.vocab_size, seed=3)[0]
    for mode in MODES:
        generate = ServedGenerator(server.grpc_url, mode=mode)
        try:
            t = generate(prompt, 12)
        finally:
            generate.close()
        assert list(t.tokens) == generate_greedy(model, prompt, 12), mode
        assert t.n_tokens == 12 and math.isfinite(t.decode_tokens_per_s)


def test_aggregate_pairs_runs_adjacent_levels_on_a_real_server(inflight):
    """The 8-vs-1 ratio from neighbouring runs (1, 8, 1 streams after the levels' 8): against
    the tiny model on the in-flight server, so the numbers are real, not judged."""
    out = aggregate_pairs(inflight.server.grpc_url, mode="client", last_eight={"aggregate_tokens_per_s": 100.0},
                          prompt_tokens=8, output_tokens=6, requests_for=lambda c: c,
                          vocab_size=inflight.model.config.vocab_size)
    levels, one_a, eight, one_b = out["aggregate_tokens_per_s"]
    assert out["order"] == ["8 (levels)", "1", "8", "1"] and levels == 100.0
    assert min(one_a, eight, one_b) > 0
    assert out["ratios"] == pytest.approx([100.0 / one_a, eight / one_a, eight / one_b])
    assert out["ratio"] == pytest.approx(float(np.median(out["ratios"])))


def test_prompts_served_from_the_prefix_cache_give_the_pytorch_greedy_tokens(tiny_served, request):
    """Both loops (client-side over `gpt`, server-side `generate`): a prompt whose first blocks
    the server has cached (an earlier prompt with the same 48-token start) gives PyTorch's
    greedy tokens, and the server's counters say its KV came from the cache."""
    from tests.conftest import metric, wait_for

    model, _, _, server = tiny_served
    attach_server_log(request, server)
    vocab = model.config.vocab_size
    assert wait_for(lambda: metric(server, "gptpipe_kv_active_sequences") == 0, timeout=10)
    chunks = metric(server, "gptpipe_prefill_chunks_total")
    for i, mode in enumerate(MODES):
        system = random_prompts(1, 48, vocab_size=vocab, seed=40 + i)[0]
        first, second = (system + u for u in random_prompts(2, 5, vocab_size=vocab, seed=50 + i))
        hits = metric(server, "gptpipe_prefix_cache_hit_tokens_total")
        generate = ServedGenerator(server.grpc_url, mode=mode)
        try:
            generate(first, 4)
            t = generate(second, 12)
        finally:
            generate.close()
        assert list(t.tokens) == generate_greedy(model, second, 12), mode
        assert metric(server, "gptpipe_prefix_cache_hit_tokens_total") - hits >= 48, mode  # 3 blocks of 16
    # alone on the server, each prompt ran whole: chunks (16 tokens here) only go beside a decoding stream
    assert metric(server, "gptpipe_prefill_chunks_total") == chunks


def test_the_prefix_scenario_on_a_real_server(tiny_served, tmp_path, request):
    """`gptpipe bench --scenario prefix`: paired TTFTs, greedy tokens identical with the cache,
    the server's prefix-cache counters (through prefix_scenario with the metrics port)."""
    from serving.bench.prefix import prefix_scenario

    model, repository, _, server = tiny_served
    attach_server_log(request, server)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli(), [
        "bench", "--url", server.grpc_url, "--repository", str(repository), "--no-baselines",
        "--scenario", "prefix", "--concurrency", "1,2", "--prompt-tokens", "64", "--output-tokens", "4",
        "--requests", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "bench.json").read_text())
    p = report["prefix"]
    assert report["levels"] == [] and report["settings"]["scenario"] == "prefix"
    assert p["greedy_identical"] is True and len(p["paired_ratios"]) == 2 and p["ttft_ratio"] > 0
    assert p["concurrent"]["concurrency"] == 2 and "Prefix cache" in (out / "bench.md").read_text()

    generate = ServedGenerator(server.grpc_url)
    try:
        p = prefix_scenario(generate, vocab_size=model.config.vocab_size, system_tokens=64, output_tokens=3,
                            requests=2, metrics_url=server.metrics_url, seed=5)
    finally:
        generate.close()
    counted = p["server_prefix_cache"]
    # warm-up + 3 per request; hits: the shared prompt twice, each fresh prompt when sent again
    assert counted["queries"] == 7 and counted["hits"] == 4 and counted["hit_tokens"] == 4 * 64
