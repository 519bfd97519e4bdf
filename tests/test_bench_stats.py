"""`gptpipe bench`'s arithmetic, no server: level statistics (serving.bench.stats), the paired
baseline ratio (baselines), the bytes a decode step reads (probes), the targets' verdicts
(targets), greedy agreement, and the interleaved ITL-vs-context ratio (levels)."""

from __future__ import annotations

import math

import pytest
import torch

from export.config import GPTConfig
from export.model import GPT
from serving.bench.baselines import _baseline_entry
from serving.bench.levels import context_itl
from serving.bench.probes import weight_bytes_per_token
from serving.bench.stats import RequestTiming, greedy_agreement, level_stats
from serving.bench.targets import TARGETS, judge


def timing(sent: float, gaps: list[float], first: float) -> RequestTiming:
    times = [sent + first]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=8)


def test_level_stats_from_known_timings():
    # two requests side by side: TTFT 0.1 and 0.3 s; 4 tokens 10 ms apart, 4 tokens 30 ms apart
    a = timing(0.0, [0.01] * 3, first=0.1)
    b = timing(0.0, [0.03] * 3, first=0.3)
    s = level_stats([a, b], concurrency=2, output_tokens=4)
    assert s.requests == 2 and s.tokens == 8
    assert s.ttft_ms["p50"] == pytest.approx(200.0)
    assert s.ttft_ms["p99"] == pytest.approx(298.0)  # linear interpolation between 100 and 300
    assert s.itl_ms["p50"] == pytest.approx(20.0)  # three 10 ms and three 30 ms gaps
    assert s.itl_ms["p99"] == pytest.approx(30.0)
    assert s.tokens_per_s_per_stream == pytest.approx((100.0 + 100.0 / 3) / 2)
    assert s.wall_s == pytest.approx(0.39)  # first send .. last token of b
    assert s.aggregate_tokens_per_s == pytest.approx(8 / 0.39)
    assert s.requests_per_s == pytest.approx(2 / 0.39)


def test_level_stats_split_the_closed_loops_start_from_its_steady_state():
    # 2 streams: both first requests sent at t=0 (one waits for the other's prefill), then each
    # stream's next request when its last ended
    first = [timing(0.0, [0.01], first=0.1), timing(0.0, [0.01], first=0.5)]
    later = [timing(0.2, [0.01], first=0.12), timing(0.6, [0.01], first=0.14), timing(0.9, [0.01], first=0.16)]
    s = level_stats(later[:1] + first + later[1:], concurrency=2, output_tokens=2)  # completion order
    assert s.ttft_start_ms["p50"] == pytest.approx(300.0) and s.ttft_start_ms["max"] == pytest.approx(500.0)
    assert s.ttft_steady_ms["p50"] == pytest.approx(140.0) and s.ttft_steady_ms["p90"] == pytest.approx(156.0)
    assert s.ttft_ms["p90"] == pytest.approx(364.0)  # every request, as before
    alone = level_stats(first, concurrency=2, output_tokens=2)
    assert math.isnan(alone.ttft_steady_ms["p50"])


def test_level_stats_refuses_empty_input():
    with pytest.raises(ValueError, match="no requests"):
        level_stats([], concurrency=1, output_tokens=4)
    with pytest.raises(ValueError, match="no tokens"):
        level_stats([RequestTiming(0.0, (), 8)], concurrency=1, output_tokens=4)


def test_paired_baseline_ratio_is_the_median_of_the_pairs():
    # baseline: 10 tokens/s decode in every request; served: 20, 30, 25 tokens/s
    base = [timing(float(i), [0.1] * 9, 0.05) for i in range(3)]
    served = [timing(float(i), [1 / r] * 9, 0.02) for i, r in enumerate((20.0, 30.0, 25.0))]
    entry = _baseline_entry(base, output_tokens=10, note="n", paired=served)
    assert entry["paired_ratios"] == pytest.approx([2.0, 3.0, 2.5])
    assert entry["paired_ratio"] == pytest.approx(2.5)
    assert entry["paired_served"]["tokens_per_s_per_stream"] == pytest.approx(25.0)
    assert "paired_ratio" not in _baseline_entry(base, output_tokens=10, note="n")


def test_weight_bytes_per_token_counts_what_a_decode_step_reads():
    # every parameter but the position table (one row read per step); the LM head is the tied wte
    for preset in ("tiny", "gpt2"):
        config = GPTConfig.from_preset(preset)
        with torch.device("meta"):
            model = GPT(config)
        expected = model.num_parameters() - model.transformer.wpe.weight.numel()
        assert weight_bytes_per_token(config.to_dict()) == 4 * expected
    assert 490e6 < weight_bytes_per_token(GPTConfig.from_preset("gpt2").to_dict()) < 500e6


def test_judge_keeps_the_order_and_fails_what_was_not_measured():
    values = {key: target for key, _, target, _ in TARGETS}  # exactly on target: passes
    values["served_vs_transformers"] = 1.9
    values["start_to_ready_s"] = 25.0
    values["int8_greedy_agreement"] = None
    ratios = judge(values)
    assert list(ratios) == [
        "served_vs_transformers", "served_vs_ort_inprocess", "served_vs_bandwidth_limit",
        "itl_ctx1000_vs_ctx100", "aggregate_8_vs_1", "ttft_p90_8_vs_p50_1", "itl_p99_vs_p50_8",
        "ttft_cached_prefix_vs_uncached", "prefix_greedy_identical", "int8_vs_fp32", "start_to_ready_s",
        "rss_vs_weights_kv", "int8_greedy_agreement",
    ]
    failed = {k for k, r in ratios.items() if not r["pass"]}
    assert failed == {"served_vs_transformers", "start_to_ready_s", "int8_greedy_agreement"}
    assert ratios["itl_ctx1000_vs_ctx100"]["target"] == "<= 1.3"
    assert ratios["aggregate_8_vs_1"]["target"] == ">= 4.5" and ratios["ttft_cached_prefix_vs_uncached"]["target"] == "<= 0.2"
    assert not judge({**values, "prefix_greedy_identical": 0.0})["prefix_greedy_identical"]["pass"]
    assert ratios["int8_greedy_agreement"]["value"] is None


def test_greedy_agreement_is_position_by_position():
    assert greedy_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert greedy_agreement([[1, 2], [3, 4]], [[1, 2], [3]]) == 0.75  # a missing token disagrees
    with pytest.raises(ValueError):
        greedy_agreement([[1]], [])


def test_context_itl_interleaves_the_lengths_and_pairs_the_ratio():
    """A machine that slows down 5% per request, true ratio 1.2: the lengths take turns and the
    ratio is the median of the turns' ratios, 1.2 x 1.05 (one request's drift); measured one
    length after the other it would read 1.2 x 1.05^3 = 1.39."""
    calls: list[int] = []

    def generate(prompt, steps):
        itl = (0.010 if len(prompt) < 500 else 0.012) * 1.05 ** len(calls)
        calls.append(len(prompt))
        return RequestTiming(sent=0.0, token_times=tuple(1.0 + itl * i for i in range(steps)), prompt_tokens=len(prompt))

    out = context_itl(generate, vocab_size=100, prompt_lengths=(96, 996), steps=5, repeats=3)
    assert calls == [96, 996] * 3
    assert out["paired_ratios"] == pytest.approx([1.2 * 1.05] * 3)
    assert out["ratio_p50"] == pytest.approx(1.26) and out["96"]["steps"] == out["996"]["steps"] == 12
