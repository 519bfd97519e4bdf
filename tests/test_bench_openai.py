"""`gptpipe bench --endpoint openai` end to end on the tiny model: a real tritonserver, a real
`gptpipe openai` process started by the bench, paired rounds of the frontend and the direct
client; bench.json carries the openai_vs_grpc_c<N> rows. aiperf is left out (its venv is pointed
at a missing folder), so this stays fast; speed is not judged here."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.triton_fixtures import attach_server_log


def test_bench_endpoint_openai_writes_paired_ratio_rows(inflight_session, tmp_path, request, monkeypatch):
    attach_server_log(request, inflight_session.server)
    out = tmp_path / "out"
    env_cmd = [sys.executable, "-m", "serving.cli", "bench", "--endpoint", "openai",
               "--url", inflight_session.server.grpc_url, "--repository", str(inflight_session.repository),
               "--concurrency", "1,2", "--prompt-tokens", "4", "--output-tokens", "8", "--out", str(out)]
    monkeypatch.setenv("AIPERF_VENV", str(tmp_path / "no-aiperf"))
    done = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "bench.json").read_text())
    assert set(report["ratios"]) == {"openai_vs_grpc_c1", "openai_vs_grpc_c2"}
    for level in report["openai"]:
        assert len(level["ratios"]) == 3
        # every request of both paths made exactly output_tokens tokens
        assert all(r["tokens"] == r["requests"] * 8 for r in level["openai"] + level["grpc"])
        assert all(r["ttft_ms"] > 0 and r["itl_ms"] > 0 for r in level["openai"] + level["grpc"])
    row = report["ratios"]["openai_vs_grpc_c2"]
    assert row["value"] > 0 and row["target"] == ">= 0.9" and row["pass"] == (row["value"] >= 0.9)
    assert report["aiperf"] == {} and not report["errors"]
    assert "openai_vs_grpc_c1" in (out / "bench.md").read_text()
    assert (out / "openai-frontend.log").is_file()


def test_bench_endpoint_is_checked(tmp_path):
    done = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "--endpoint", "http", "--url", "x:1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--endpoint" in done.stderr and "grpc or openai" in done.stderr
