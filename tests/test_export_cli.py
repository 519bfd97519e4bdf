"""`export-model` end to end: a transformers-saved GPT-2 in, a validated Triton repository out;
manifest hashes; atomic replacement; bad input (issue: export-model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from export.cli import app
from serving.repository import parse_config, validate_repository, verify_manifest
from serving.engine.runtime import OrtRuntime
from tests.conftest import train_tokenizer

runner = CliRunner()
SHAPE = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=128)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random GPT-2 saved by transformers itself (the independent reference), with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE, bos_token_id=0, eos_token_id=0)).eval()
    folder = tmp_path_factory.mktemp("hf") / "gpt2-small-random"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(train_tokenizer(SHAPE["vocab_size"]).to_str())
    return model, folder


@pytest.fixture(scope="module")
def exported(hf_checkpoint, tmp_path_factory):
    _, folder = hf_checkpoint
    out = tmp_path_factory.mktemp("out") / "repo"
    result = runner.invoke(app, ["--model", str(folder), "--precision", "fp32", "--output", str(out),
                                 "--max-batch-size", "4", "--no-prefix-cache", "--max-num-batched-tokens", "48",
                                 "--no-intra-op-spinning"])
    assert result.exit_code == 0, result.output
    return out, result.output


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.cli", *args], capture_output=True, text=True, timeout=600)


def test_transformers_checkpoint_end_to_end(hf_checkpoint, exported):
    model, _ = hf_checkpoint
    repo, output = exported
    assert "validate against PyTorch" in output and "max |Δlogits|" in output
    configs = validate_repository(repo)
    assert configs["gpt"].max_batch_size == 4
    params = {k: v.string_value for k, v in configs["gpt"].parameters.items()}
    # the flags, written
    assert (params["prefix_cache"], params["max_num_batched_tokens"], params["intra_op_spinning"]) == ("0", "48", "0")
    # the served graph, run by the serving engine, equals transformers' own logits
    runtime = OrtRuntime(repo / "gpt" / "1" / "model.onnx")
    pool = runtime.new_pool(max_sequences=1, max_length=SHAPE["n_positions"])
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()  # (T, V)
    got = runtime.step(ids[:, :12].numpy(), pool=pool, slot_start=0, past_lengths=np.array([0]))
    rows = [got[0].copy()]  # the engine reuses its logits buffer
    for t in range(12, 20):  # then one token at a time through the in-place cache
        rows.append(runtime.step(ids[:, t:t + 1].numpy(), pool=pool, slot_start=0,
                                 past_lengths=np.array([t]))[0].copy())
    assert np.abs(np.stack(rows) - expected[11:]).max() <= 1e-4


def test_manifest_hashes_match_the_files(exported):
    repo, _ = exported
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 18
    assert manifest["validation"]["overall"]["max_abs_logits"] <= 1e-4
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert [t["name"] for t in manifest["tensors"]["inputs"]][:3] == ["input_ids", "position_ids", "attention_mask"]
    assert "gpt/1/model.onnx" in manifest["artifacts"] and "tokenizer/1/tokenizer.json" in manifest["artifacts"]
    assert verify_manifest(repo) == []
    for model in ("gpt", "generate", "tokenizer"):
        parse_config((repo / model / "config.pbtxt").read_text())


def test_existing_export_is_replaced_only_with_force(hf_checkpoint, exported):
    _, folder = hf_checkpoint
    repo, _ = exported
    result = runner.invoke(app, ["--model", str(folder), "--precision", "fp32", "--output", str(repo)])
    assert result.exit_code == 1 and "already holds an export; pass --force" in result.output


def test_interrupted_export_leaves_the_previous_repository_intact(hf_checkpoint, exported, tmp_path):
    _, folder = hf_checkpoint
    repo, _ = exported
    before = (repo / "manifest.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "export.cli", "--model", str(folder), "--precision", "int8",
                             "--output", str(repo), "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = list(repo.parent.glob(f".{repo.name}.tmp-*"))
    deadline = time.monotonic() + 300
    while not staging and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        staging = list(repo.parent.glob(f".{repo.name}.tmp-*"))
    assert staging, "the export never started writing"
    proc.send_signal(signal.SIGKILL)  # the hardest interruption: no cleanup runs
    proc.wait()
    assert (repo / "manifest.json").read_bytes() == before and verify_manifest(repo) == []
    validate_repository(repo)


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp8"], "--precision must be one of fp32, fp16, int8, int4"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--max-step-wait-us", "-1"], "--max-step-wait-us must be >= 0"),
    (["--max-num-batched-tokens", "-1"], "--max-num-batched-tokens must be >= 0"),
    (["--opset", "11"], "opset 11 is too old"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype must be one of auto, int8"),
    (["--precision", "fp32", "--kv-cache-dtype", "int8"],
     "--kv-cache-dtype int8 needs the static cache and precision int8 or int4"),
    (["--model", "no-such-model"], "--model no-such-model"),
    (["--model", "tiny-random"], "has no tokenizer; pass --tokenizer"),
])
def test_bad_input_gets_a_clear_message(args, message, tmp_path):
    result = runner.invoke(app, ["--output", str(tmp_path / "repo"), *args])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "repo").exists()


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["--model", "tiny-random", "--output", str(tmp_path / "file")])
    assert result.exit_code == 1 and "is a file" in result.output


def test_validation_failure_fails_the_export(hf_checkpoint, tmp_path, monkeypatch):
    """A graph that computes something else (here: the PyTorch reference is perturbed after the
    export) fails validation with the check, the value and the limit, and writes nothing."""
    import export.onnx as onnx_mod

    _, folder = hf_checkpoint
    real_validate = onnx_mod.validate_onnx

    def validate_against_another_model(path, model, **kw):
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
        return real_validate(path, model, **kw)

    monkeypatch.setattr(onnx_mod, "validate_onnx", validate_against_another_model)
    out = tmp_path / "repo"
    result = runner.invoke(app, ["--model", str(folder), "--precision", "fp32", "--output", str(out)])
    assert result.exit_code == 1
    assert "max_abs_logits" in result.output or "limit" in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob(".repo.tmp-*"))


@pytest.mark.parametrize("precision,kv_cache_dtype,quantized_op", [("int4", "auto", "MatMulNBits"),
                                                                    ("int8", "int8", "MatMulInteger")])
def test_quantized_repository_is_served_by_triton_with_the_engine_tokens(hf_checkpoint, tmp_path, triton_server_factory,
                                                                         precision, kv_cache_dtype, quantized_op):
    """`--precision int4`, and `--precision int8 --kv-cache-dtype int8`, end to end: the export
    validates (the precision's tolerances), the manifest says what was exported, the graph has the
    quantized ops (and an int8 cache), and a real tritonserver serves the repository: its greedy
    tokens (server-side loop and client loop) are the engine's own, run in this process."""
    from serving import Client
    from serving.bench.ort_loop import OrtLoop
    from serving.engine.runtime import OrtRuntime

    _, folder = hf_checkpoint
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["--model", str(folder), "--precision", precision, "--kv-cache-dtype", kv_cache_dtype,
                                 "--output", str(repo), "--max-batch-size", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["precision"] == precision and verify_manifest(repo) == []
    assert manifest["kv_cache_dtype"] == kv_cache_dtype
    assert manifest["fusions"]["op_counts_after"][quantized_op] == 4 * SHAPE["n_layer"] + 1
    assert OrtRuntime(repo / "gpt" / "1" / "model.onnx").kv_dtype == (np.int8 if kv_cache_dtype == "int8" else np.float32)
    engine = repo / "gpt" / "1" / "model.onnx"
    prompt = np.random.default_rng(11).integers(0, SHAPE["vocab_size"], 9).tolist()
    expected = list(OrtLoop(engine, threads=1).generate(prompt, 12).tokens)
    server = triton_server_factory(repo)
    with Client(server.grpc_url) as client:
        for mode in ("server", "client"):
            events = client.events(prompt, max_new_tokens=12, temperature=0, mode=mode, ignore_eos=True)
            assert [e.token_id for e in events] == expected, mode
