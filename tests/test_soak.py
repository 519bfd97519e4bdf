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
    assert proc.returncode == 0 and report["verdict"] == "pass", (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["checks"]["greedy_tokens_match"]["checked"] >= 20
    kinds = set(report["by_kind"])
    assert {"grpc-client", "grpc-server", "http-sse"} <= kinds
    assert report["checks"]["outcomes"].get("cancelled by us", 0) >= 1
    assert (out / "soak.png").stat().st_size > 10_000
