"""`gptpipe bench`: the statistics, the report files, and one real run against a real
tritonserver serving a tiny model (two concurrency levels, all four baselines). Speed is not
checked here (scripts/bench_targets.sh runs the targets suite)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pydoc_data.topics
import pytest
import torch
import typer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from export.checkpoints import save_model
from export.config import GPTConfig
from export.model import GPT, generate_greedy
from export.onnx import export_onnx
from serving import bench
from serving.commands.bench import bench as bench_command
from serving.repository import ServingOptions, write_repository
from serving.tokenizer import Tokenizer
from tests.triton_fixtures import attach_server_log, start_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def timing(sent: float, gaps: list[float], first: float) -> bench.RequestTiming:
    times = [sent + first]
    for g in gaps:
        times.append(times[-1] + g)
    return bench.RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=8)


# ---------------------------------------------------------------- statistics, no server


def test_level_stats_from_known_timings():
    # two requests side by side: TTFT 0.1 and 0.3 s; 4 tokens 10 ms apart, 4 tokens 30 ms apart
    a = timing(0.0, [0.01] * 3, first=0.1)
    b = timing(0.0, [0.03] * 3, first=0.3)
    s = bench.level_stats([a, b], concurrency=2, output_tokens=4)
    assert s.requests == 2 and s.tokens == 8
    assert s.ttft_ms["p50"] == pytest.approx(200.0)
    assert s.ttft_ms["p99"] == pytest.approx(298.0)  # linear interpolation between 100 and 300
    assert s.itl_ms["p50"] == pytest.approx(20.0)  # three 10 ms and three 30 ms gaps
    assert s.itl_ms["p99"] == pytest.approx(30.0)
    assert s.tokens_per_s_per_stream == pytest.approx((100.0 + 100.0 / 3) / 2)
    assert s.wall_s == pytest.approx(0.39)  # first send .. last token of b
    assert s.aggregate_tokens_per_s == pytest.approx(8 / 0.39)
    assert s.requests_per_s == pytest.approx(2 / 0.39)


def test_level_stats_refuses_empty_input():
    with pytest.raises(ValueError, match="no requests"):
        bench.level_stats([], concurrency=1, output_tokens=4)
    with pytest.raises(ValueError, match="no tokens"):
        bench.level_stats([bench.RequestTiming(0.0, (), 8)], concurrency=1, output_tokens=4)


def test_paired_baseline_ratio_is_the_median_of_the_pairs():
    # baseline: 10 tokens/s decode in every request; served: 20, 30, 25 tokens/s
    base = [timing(float(i), [0.1] * 9, 0.05) for i in range(3)]
    served = [timing(float(i), [1 / r] * 9, 0.02) for i, r in enumerate((20.0, 30.0, 25.0))]
    entry = bench._baseline_entry(base, output_tokens=10, note="n", paired=served)
    assert entry["paired_ratios"] == pytest.approx([2.0, 3.0, 2.5])
    assert entry["paired_ratio"] == pytest.approx(2.5)
    assert entry["paired_served"]["tokens_per_s_per_stream"] == pytest.approx(25.0)
    assert "paired_ratio" not in bench._baseline_entry(base, output_tokens=10, note="n")


def test_weight_bytes_per_token_counts_what_a_decode_step_reads():
    # every parameter but the position table (one row read per step); the LM head is the tied wte
    for preset in ("tiny", "gpt2"):
        config = GPTConfig.from_preset(preset)
        with torch.device("meta"):
            model = GPT(config)
        expected = model.num_parameters() - model.transformer.wpe.weight.numel()
        assert bench.weight_bytes_per_token(config.to_dict()) == 4 * expected
    assert 490e6 < bench.weight_bytes_per_token(GPTConfig.from_preset("gpt2").to_dict()) < 500e6


def test_judge_keeps_the_order_and_fails_what_was_not_measured():
    values = {key: target for key, _, target, _ in bench.TARGETS}  # exactly on target: passes
    values["served_vs_transformers"] = 1.9
    values["start_to_ready_s"] = 25.0
    values["int8_greedy_agreement"] = None
    ratios = bench.judge(values)
    assert list(ratios) == [
        "served_vs_transformers", "served_vs_ort_inprocess", "served_vs_bandwidth_limit",
        "itl_ctx1000_vs_ctx100", "aggregate_8_vs_1", "int8_vs_fp32", "start_to_ready_s",
        "rss_vs_weights_kv", "int8_greedy_agreement",
    ]
    failed = {k for k, r in ratios.items() if not r["pass"]}
    assert failed == {"served_vs_transformers", "start_to_ready_s", "int8_greedy_agreement"}
    assert ratios["itl_ctx1000_vs_ctx100"]["target"] == "<= 1.3"
    assert ratios["int8_greedy_agreement"]["value"] is None


def test_greedy_agreement_is_position_by_position():
    assert bench.greedy_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert bench.greedy_agreement([[1, 2], [3, 4]], [[1, 2], [3]]) == 0.75  # a missing token disagrees
    with pytest.raises(ValueError):
        bench.greedy_agreement([[1]], [])


@pytest.mark.parametrize("kw, match", [
    (dict(mode="local"), "mode"),
    (dict(concurrency=()), "concurrency"),
    (dict(concurrency=(1, 1)), "repeated"),
    (dict(output_tokens=1), "output_tokens"),
    (dict(concurrency=(1, 8), requests=4), "requests"),
])
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        bench.BenchOptions(**kw)


def test_prompt_plus_output_past_the_context_is_refused():
    with pytest.raises(ValueError, match="n_positions=128"):
        bench.check_fits(prompt_tokens=100, output_tokens=29, n_positions=128)
    with pytest.raises(ValueError, match="max_sequences=8"):
        bench.check_fits(prompt_tokens=1, output_tokens=2, n_positions=128, concurrency=[16], max_sequences=8)


# ---------------------------------------------------------------- a real run


def small_tokenizer(vocab_size: int) -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(pydoc_data.topics.topics.values())[:40], trainer)
    return Tokenizer(backend)


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory, request):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    model = GPT(config).eval()
    root = tmp_path_factory.mktemp("bench")
    exported = export_onnx(model, root / "export" / "gpt.onnx", validate=False)
    repository = write_repository(root / "repo", engine_file=exported.path,
                                  tokenizer_json=small_tokenizer(config.vocab_size).to_str(),
                                  model_config=config.to_dict(), options=ServingOptions(max_sequences=4))
    checkpoint = save_model(model, None, root / "hf")  # the same weights, for the PyTorch baselines
    server = start_server(repository)
    yield model, repository, checkpoint, server
    server.stop()


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.callback()(lambda: None)  # keep `bench` a subcommand, as in `gptpipe bench`
    return app


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
    for png in (bench.ITL_PNG, bench.THROUGHPUT_PNG):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200


def test_served_tokens_are_the_pytorch_greedy_tokens(tiny_served, request):
    """The benchmark's own request path (ids in, fixed length, eos ignored) is correct."""
    model, _, _, server = tiny_served
    attach_server_log(request, server)
    prompt = bench.random_prompts(1, 9, vocab_size=model.config.vocab_size, seed=3)[0]
    for mode in bench.MODES:
        generate = bench.ServedGenerator(server.grpc_url, mode=mode)
        try:
            t = generate(prompt, 12)
        finally:
            generate.close()
        assert list(t.tokens) == generate_greedy(model, prompt, 12), mode
        assert t.n_tokens == 12 and math.isfinite(t.decode_tokens_per_s)


def test_context_itl_interleaves_the_lengths_and_pairs_the_ratio():
    """A machine that slows down 5% per request, true ratio 1.2: the lengths take turns and the
    ratio is the median of the turns' ratios, 1.2 x 1.05 (one request's drift); measured one
    length after the other it would read 1.2 x 1.05^3 = 1.39."""
    from serving.bench import RequestTiming, context_itl

    calls: list[int] = []

    def generate(prompt, steps):
        itl = (0.010 if len(prompt) < 500 else 0.012) * 1.05 ** len(calls)
        calls.append(len(prompt))
        return RequestTiming(sent=0.0, token_times=tuple(1.0 + itl * i for i in range(steps)), prompt_tokens=len(prompt))

    out = context_itl(generate, vocab_size=100, prompt_lengths=(96, 996), steps=5, repeats=3)
    assert calls == [96, 996] * 3
    assert out["paired_ratios"] == pytest.approx([1.2 * 1.05] * 3)
    assert out["ratio_p50"] == pytest.approx(1.26) and out["96"]["steps"] == out["996"]["steps"] == 12


def test_aggregate_pairs_runs_adjacent_levels_on_a_real_server(inflight):
    """The 8-vs-1 ratio from neighbouring runs (1, 8, 1 streams after the levels' 8): against
    the tiny model on the in-flight server, so the numbers are real, not judged."""
    from serving.bench import aggregate_pairs

    out = aggregate_pairs(inflight.server.grpc_url, mode="client", last_eight={"aggregate_tokens_per_s": 100.0},
                          prompt_tokens=8, output_tokens=6, requests_for=lambda c: c,
                          vocab_size=inflight.model.config.vocab_size)
    levels, one_a, eight, one_b = out["aggregate_tokens_per_s"]
    assert out["order"] == ["8 (levels)", "1", "8", "1"] and levels == 100.0
    assert min(one_a, eight, one_b) > 0
    assert out["ratios"] == pytest.approx([100.0 / one_a, eight / one_a, eight / one_b])
    assert out["ratio"] == pytest.approx(float(np.median(out["ratios"])))
