"""`gptpipe bench --peers`: the CLI's refusals, a run without the peer venv (it says how to install
it and records the peer rows as skipped), the peer ratio rows from a real paired run against a real
tritonserver, and — where scripts/install_peers.sh has installed OpenVINO — OpenVINO GenAI paired
with the served tiny model end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from serving.bench import peers
from serving.bench.baselines import paired_run
from serving.bench.ort_loop import OrtLoop
from serving.bench.peer_bench import PEER_TARGETS, peer_ratios
from serving.bench.served import ServedGenerator, read_repository
from serving.bench.stats import random_prompts
from tests.bench_fixtures import bench_cli as cli, tiny_bench_repository
from tests.triton_fixtures import start_server

ROWS = [key for key, *_ in PEER_TARGETS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real tritonserver serving a tiny random model with 8 KV slots (8 streams fit)."""
    _, repository, checkpoint = tiny_bench_repository(tmp_path_factory.mktemp("peers"), max_sequences=8)
    server = start_server(repository)
    yield repository, checkpoint, server
    server.stop()


@pytest.mark.parametrize("args, message", [
    (["--peers", "vllm"], "'vllm': choose from openvino, llama.cpp"),
    (["--peers", "openvino,openvino"], "names a peer twice"),
    (["--peers", ","], "choose from openvino, llama.cpp"),
    (["--peers", "openvino", "--endpoint", "openai"], "drop --endpoint openai"),
    (["--peers", "openvino", "--scenario", "prefix"], "beside the levels scenario"),
])
def test_bad_peers_are_refused_before_anything_runs(args, message, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli(), ["bench", "--repository", str(tmp_path), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "--peers" in result.output and message in flat(result.output)
    assert not out.exists()


def flat(text: str) -> str:
    """The words of CLI output, without rich's box around errors."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _short_run(repository, server, out, *extra):
    return ["bench", "--url", server.grpc_url, "--repository", str(repository), "--concurrency", "1",
            "--requests", "2", "--prompt-tokens", "12", "--output-tokens", "6", "--no-baselines", "--out", str(out),
            *extra]


def test_without_the_peer_venv_the_run_says_how_to_install_and_skips_the_rows(tiny, tmp_path, monkeypatch):
    repository, _, server = tiny
    empty = tmp_path / "no-venv"
    empty.mkdir()
    monkeypatch.setenv("GPTPIPE_PEERS_VENV", str(empty))
    result = CliRunner().invoke(cli(), _short_run(repository, server, tmp_path / "out", "--peers", "openvino,llama.cpp"))
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert f"GPTPIPE_PEERS_VENV={empty} GPTPIPE_PEERS=openvino bash scripts/install_peers.sh" in text
    assert f"GPTPIPE_PEERS_VENV={empty} GPTPIPE_PEERS=llama.cpp bash scripts/install_peers.sh" in text
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["levels"] and report["settings"]["peers"] == ["openvino", "llama.cpp"]  # the served run ran
    assert set(report["peers"]) == {"openvino-fp32", "llama.cpp-fp32"}
    assert all("install_peers.sh" in e["skipped"] for e in report["peers"].values())
    ratios = report["ratios"]
    assert list(ratios) == ROWS
    assert all(r["pass"] is None and r["value"] is None and r["skipped"] for r in ratios.values())
    assert "openvino is not installed" in ratios["served_vs_openvino_fp32"]["skipped"]
    assert "no int8 server in this run" in ratios["served_vs_openvino_int8"]["skipped"]
    assert "--suite targets" in ratios["int4_greedy_agreement"]["skipped"]
    assert "Not measured: served_vs_openvino_fp32" in text and "Targets missed" not in text
    assert "SKIPPED: openvino is not installed" in (tmp_path / "out" / "bench.md").read_text()


def test_peer_rows_from_a_real_paired_run(tiny):
    """The rows are the medians of per-pair ratios: two real engines (the in-process ORT loop, as
    two stand-in peers under the peers' keys) each paired with real served requests."""
    repository, _, server = tiny
    served = read_repository(repository)
    prompts = random_prompts(3, 12, vocab_size=served.config["vocab_size"], seed=3)
    loop = OrtLoop(served.engine, threads=served.threads, max_length=served.config["n_positions"])
    entries = {}
    for key in ("openvino-fp32", "llama.cpp-fp32"):
        gen = ServedGenerator(server.grpc_url)
        try:
            entries[key] = paired_run(loop, prompts, output_tokens=8, note="ORT", label=key, served_generator=gen)
        finally:
            gen.close()
    entries["openvino-cb-fp32"] = {"ratio": 0.8, "ratios": [0.7, 0.9]}
    for entry in entries.values():
        if "paired_ratios" in entry:
            assert len(entry["paired_ratios"]) == 3 and entry["paired_ratio"] == np.median(entry["paired_ratios"])
            assert entry["greedy_agreement_with_served"] == 1.0  # same graph, same greedy tokens
            assert all(r > 0 for r in entry["paired_ttft_ratios"])
    rows = peer_ratios(entries, precisions=["fp32"], peers_asked=("openvino", "llama.cpp"))
    assert list(rows) == ROWS
    assert rows["served_vs_openvino_fp32"]["value"] == entries["openvino-fp32"]["paired_ratio"]
    assert rows["served_vs_llamacpp_fp32"]["value"] == entries["llama.cpp-fp32"]["paired_ratio"]
    assert rows["ttft_vs_best_peer"]["value"] == max(e["paired_ttft_ratio"] for k, e in entries.items()
                                                     if "paired_ttft_ratio" in e)
    assert rows["aggregate8_vs_openvino"] == {"value": 0.8, "target": ">= 1", "pass": False,
                                              "what": rows["aggregate8_vs_openvino"]["what"]}
    for row in ("served_vs_openvino_int8", "served_vs_llamacpp_int8", "served_vs_llamacpp_int4"):
        assert rows[row]["pass"] is None and "no int" in rows[row]["skipped"]
    # a peer not asked for says so
    only_ov = peer_ratios({"openvino-fp32": entries["openvino-fp32"]}, precisions=["fp32"], peers_asked=("openvino",))
    assert only_ov["served_vs_llamacpp_fp32"]["skipped"] == "llama.cpp was not asked for (--peers)"


def test_the_peer_rows_are_the_worst_precision_measured() -> None:
    """aggregate8_vs_openvino and ttft_vs_best_peer over several precisions: the worst of them.
    Both once read a better one (the first continuous-batching run measured; the TTFT of the
    peers with a decode row only, so OpenVINO int4's 2.2x faster prefill passed as 0.88)."""
    entries = {"openvino-fp32": {"paired_ratio": 0.86, "paired_ttft_ratio": 1.1},
               "openvino-cb-fp32": {"ratio": 0.76, "ratios": [0.75, 0.77]},
               "openvino-cb-int8": {"ratio": 0.65, "ratios": [0.68, 0.63]},
               "openvino-int4": {"paired_ratio": 0.9, "paired_ttft_ratio": 2.2},
               "llama.cpp-int4": {"paired_ratio": 0.7, "paired_ttft_ratio": 0.88}}
    rows = peer_ratios(entries, precisions=["fp32", "int8", "int4"], peers_asked=("openvino", "llama.cpp"))
    assert rows["aggregate8_vs_openvino"]["value"] == 0.65
    assert rows["ttft_vs_best_peer"]["value"] == 2.2 and rows["ttft_vs_best_peer"]["pass"] is False
    assert rows["served_vs_llamacpp_int4"]["value"] == 0.7


def test_each_peer_is_paired_with_prompts_the_server_has_not_seen(tiny, monkeypatch):
    """Two peers timed against one server: the second one's served requests must not repeat the
    first one's prompts (the server's prefix cache would answer their prefill: a TTFT ratio of a
    cache hit, 0.2 in a real run). The peers here are stand-ins (the in-process ORT loop, as in
    the test above; the peer venv is not part of `make test`); the server and its requests are real."""
    from serving.bench import peer_bench

    repository, _, server = tiny
    served = read_repository(repository)
    loop = OrtLoop(served.engine, threads=served.threads, max_length=served.config["n_positions"])

    class StandIn:
        info = {"llama_cpp": "stand-in"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        logits = staticmethod(loop.logits)

    monkeypatch.setattr(peers, "installed", lambda name, venv=None: True)
    monkeypatch.setattr(peers, "peer_generator", lambda worker: loop)
    monkeypatch.setattr(peer_bench, "_hf_folder", lambda source, folder: folder)
    monkeypatch.setattr(peer_bench, "_artefact", lambda *a, **k: "stand-in")
    monkeypatch.setattr(peer_bench, "_open", lambda *a, **k: StandIn())
    monkeypatch.setattr(peer_bench, "_aggregate_vs_cb", lambda *a, **k: {"skipped": "stand-in"})
    sent: list[tuple[int, ...]] = []

    class Recording:
        def __init__(self):
            self.generator = ServedGenerator(server.grpc_url)

        def __call__(self, prompt, max_tokens):
            sent.append(tuple(prompt))
            return self.generator(prompt, max_tokens)

        def close(self):
            self.generator.close()

    prompts = peer_bench.peer_prompts(3, 40, vocab_size=served.config["vocab_size"])  # 2 cacheable blocks each
    entries = peer_bench.measure_peers(served, ("openvino", "llama.cpp"), prompts=prompts, output_tokens=4,
                                       make_generator=Recording, source="stand-in")
    assert all("paired_ratio" in entries[k] for k in ("openvino-fp32", "llama.cpp-fp32")), entries
    assert len(sent) == 6 and len(set(sent)) == 6, "a peer's pairs repeated prompts the server had seen"


@pytest.mark.peers
def test_openvino_paired_with_the_served_model(tiny, tmp_path, monkeypatch):
    try:
        peers.peers_python(peer="openvino")
    except peers.PeersUnavailable as e:
        pytest.skip(str(e))
    repository, checkpoint, server = tiny
    monkeypatch.setenv("GPTPIPE_PEERS_WORK", str(tmp_path / "work"))  # the converted weights
    result = CliRunner().invoke(cli(), _short_run(repository, server, tmp_path / "out", "--peers", "openvino",
                                                  "--checkpoint", str(checkpoint)))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["errors"] == []
    entry = report["peers"]["openvino-fp32"]
    assert entry["check"]["passed"] and entry["check"]["argmax_equal"] == "2/2"
    assert entry["greedy_agreement_with_served"] == 1.0  # fp32, f32 compute: the served tokens
    cb = report["peers"]["openvino-cb-fp32"]
    assert len(cb["ratios"]) == 2 and all(r > 0 for r in cb["ratios"])
    ratios = report["ratios"]
    for row in ("served_vs_openvino_fp32", "ttft_vs_best_peer", "aggregate8_vs_openvino"):
        assert ratios[row]["value"] > 0 and ratios[row]["pass"] in (True, False), row
    assert "llama.cpp was not asked for" in ratios["served_vs_llamacpp_fp32"]["skipped"]
