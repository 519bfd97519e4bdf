"""The soak suite (serving/bench/soak.py) for 60 s against a real `gptpipe serve` of the tiny export:
its report's checks must all pass (greedy tokens, KV slots back to 0, RSS, descriptors, errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_soak_60s(tiny_export, tmp_path):
    from serving.repository import ServingOptions, write_repository

    model, tokenizer, onnx_path = tiny_export
    # 16 slots for 8 streams + killed children; a 5 s idle timeout frees a killed client's slot
    # (until dead-client reaping lands, that is the only way a SIGKILLed client-side stream ends).
    repository = write_repository(tmp_path / "repo", engine_file=onnx_path, tokenizer_json=tokenizer.to_str(),
                                  model_config=model.config.to_dict(),
                                  options=ServingOptions(max_sequences=16, max_sequence_idle_microseconds=5_000_000))
    out = tmp_path / "soak"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # 8 streams, not 16: the build machine's 2 cores are shared by the server, the stubs and the clients.
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--repository", str(repository),
                           "--out", str(out), "--streams", "8", "--duration", "60", "--max-new-tokens", "24"],
                          capture_output=True, text=True, timeout=200, env=env)
    assert (out / "soak.json").exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((out / "soak.json").read_text())
    failed = {k: v for k, v in report["checks"].items() if isinstance(v, dict) and v.get("pass") is not True
              and "pass" in v}
    log = (out / "serve.log").read_text(errors="replace").splitlines()
    assert proc.returncode == 0 and report["verdict"] == "pass", (failed, "\n".join(log[-60:]), proc.stderr[-3000:])
    assert report["checks"]["greedy_tokens_match"]["checked"] >= 20
    kinds = set(report["by_kind"])
    assert {"grpc-client", "grpc-server", "http-sse"} <= kinds
    assert report["checks"]["outcomes"].get("cancelled by us", 0) >= 1
    assert (out / "soak.png").stat().st_size > 10_000


def test_rss_check_compares_sparse_samples_of_the_last_server_process():
    """A loaded machine samples every few seconds, not every second: the check compares the first and
    last samples by count. A restart starts a new baseline: the longest-lived process is judged;
    too few samples is "not judged" (with the pid and span in the reason), which counts as a failure."""
    from serving.bench.soak_report import passed, rss_check
    from serving.bench.soak_server import Sample

    sparse = [Sample(t=float(t), triton_pid=1, rss_mib=100.0 + t / 100, fds=50, kv_active=0) for t in range(0, 61, 4)]
    result = rss_check(sparse, warmup_s=12, load_end=60)
    assert result["pass"] is True and result["baseline_mib"] < result["final_mib"] < 101, result
    grown = sparse[:-5] + [Sample(t=s.t, triton_pid=1, rss_mib=120.0, fds=50, kv_active=0) for s in sparse[-5:]]
    assert rss_check(grown, warmup_s=12, load_end=60)["pass"] is False
    # restarted at 24 s (a fault run): the longer-lived second process is judged, its warm-up a third of its time
    restarted = sparse[:6] + [Sample(t=float(t), triton_pid=2, rss_mib=90.0, fds=40, kv_active=0)
                              for t in range(26, 61, 2)]
    result = rss_check(restarted, warmup_s=24, load_end=60)
    assert result["pass"] is True and result["baseline_mib"] == 90.0, result
    short = sparse[:3] + [Sample(t=float(t), triton_pid=2, rss_mib=90.0, fds=40, kv_active=0) for t in (50, 54, 58)]
    result = rss_check(short, warmup_s=12, load_end=60)
    assert result["pass"] is None and "samples of pid" in result["reason"], result
    assert not passed({"rss_growth": result})
