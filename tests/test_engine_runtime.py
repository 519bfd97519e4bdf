"""serving/engine/runtime.py: the ONNX Runtime engine's in-place step on a real exported
static-cache graph (tiny preset, random weights), and the engine package's imports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import onnx as eo
from export.config import GPTConfig
from export.model import GPT
from serving import tensors
from serving.engine.kv_cache import KVPool
from serving.engine.runtime import OrtRuntime, physical_cores, session_options

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


def test_serving_never_imports_torch() -> None:
    import subprocess

    # every engine module, the GPU-only ones too: they import without tensorrt, cuda-python or a GPU
    modules = sorted(p.stem for p in (ROOT / "serving" / "engine").glob("*.py") if p.stem != "__init__")
    assert {"runtime", "kv_cache", "runtime_trt", "memory", "step", "loader"} <= set(modules)
    code = f"import sys, {', '.join('serving.engine.' + m for m in modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def static_path(model: GPT, tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "gpt.onnx"
    eo.export_onnx(model, path, kv_cache="static", precision="fp32")  # validated on export
    return path


@pytest.fixture(scope="module")
def runtime(static_path) -> OrtRuntime:
    return OrtRuntime(static_path, intra_op_threads=1)


def test_runtime_reads_the_graph(runtime: OrtRuntime, model: GPT) -> None:
    c = model.config
    assert runtime.kv_cache == "static"
    assert (runtime.n_layer, runtime.n_head, runtime.head_dim, runtime.vocab_size) == (
        c.n_layer, c.n_head, c.head_dim, c.vocab_size)
    assert runtime.kv_dtype == np.float32 and runtime.logits_dtype == np.float32
    assert runtime.providers[-1] == "CPUExecutionProvider"
    assert runtime.metadata["gptpipe.kv_cache"] == "static"
    assert session_options().intra_op_num_threads == physical_cores()
    spin = "session.intra_op.allow_spinning"
    assert session_options(spinning=False).get_session_config_entry(spin) == "0"
    with pytest.raises(Exception):  # ORT's default (spinning) leaves the entry unset
        session_options().get_session_config_entry(spin)
    assert session_options(stop_spinning_after_run=True).get_session_config_entry("session.force_spinning_stop") == "1"


def test_step_updates_the_pool_in_place(runtime: OrtRuntime, model: GPT) -> None:
    """No reallocation, no change of lengths, new keys exactly at [past, past + T) of the row."""
    c = model.config
    pool = runtime.new_pool(max_sequences=3, max_length=c.n_positions)
    pointers = [a.ctypes.data for a in pool.keys + pool.values]
    slot = pool.allocate()
    prompt = np.array([[1, 2, 3, 4, 5]])
    logits = runtime.step(prompt, pool=pool, slot_start=slot, past_lengths=[0])
    assert logits.shape == (1, c.vocab_size) and logits.dtype == np.float32
    assert pool.lengths.tolist() == [0, 0, 0], "step must leave the lengths to the caller"
    with torch.no_grad():
        ref, past = model(torch.from_numpy(prompt), last_only=True)
    np.testing.assert_allclose(logits, ref.numpy(), atol=TOL, rtol=0)
    for layer in range(c.n_layer):
        np.testing.assert_allclose(pool.keys[layer][slot, :, :5], past[layer][0][0].numpy(), atol=1e-5)
        np.testing.assert_allclose(pool.values[layer][slot, :, :5], past[layer][1][0].numpy(), atol=1e-5)
        assert not pool.keys[layer][slot, :, 5:].any() and not pool.keys[layer][1:].any()
    runtime.step(np.array([[6]]), pool=pool, slot_start=slot, past_lengths=[5])
    assert pool.keys[0][slot, :, 5].any() and not pool.keys[0][slot, :, 6:].any()
    assert [a.ctypes.data for a in pool.keys + pool.values] == pointers


def test_step_logits_buffer_and_out(runtime: OrtRuntime, model: GPT) -> None:
    pool = runtime.new_pool(max_sequences=2, max_length=16)
    first = runtime.step(np.array([[1], [2]]), pool=pool, slot_start=0, past_lengths=[0, 0])
    kept = first.copy()
    second = runtime.step(np.array([[3], [4]]), pool=pool, slot_start=0, past_lengths=[0, 0])
    assert np.shares_memory(first, second), "the logits buffer is reused, not reallocated"
    assert not np.allclose(kept, second)
    out = np.empty((2, model.config.vocab_size), np.float32)
    got = runtime.step(np.array([[1], [2]]), pool=pool, slot_start=0, past_lengths=[0, 0], out=out)
    assert got is out
    np.testing.assert_array_equal(out, kept)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=np.array([[1]]), slot_start=2, past_lengths=[0]), r"must lie in \[0, 2\)"),
    (dict(input_ids=np.array([[1, 2]]), slot_start=0, past_lengths=[15]), r"past_lengths \+ new tokens"),
    (dict(input_ids=np.array([[1], [2]]), slot_start=0, past_lengths=[0]), r"shape \(batch,\) = \(2,\)"),
    (dict(input_ids=np.array([[1, 2], [3, 4]]), slot_start=0, past_lengths=[3, 0]), "all past lengths 0"),
    (dict(input_ids=np.array([[512]]), slot_start=0, past_lengths=[0]), r"input_ids must be in \[0, 512\)"),
    (dict(input_ids=np.zeros((1, 0), np.int64), slot_start=0, past_lengths=[0]), "input_ids must be"),
])
def test_step_rejects_bad_calls(runtime: OrtRuntime, kwargs, message) -> None:
    pool = runtime.new_pool(max_sequences=2, max_length=16)
    ids = kwargs.pop("input_ids")
    with pytest.raises(ValueError, match=message):
        runtime.step(ids, pool=pool, **kwargs)


def test_step_rejects_a_pool_of_another_dtype(runtime: OrtRuntime, model: GPT) -> None:
    c = model.config
    pool = KVPool(n_layer=c.n_layer, n_head=c.n_head, head_dim=c.head_dim, max_sequences=1,
                  max_length=8, dtype="float16")
    with pytest.raises(ValueError, match="pool dtype float16 does not match the graph's KV dtype float32"):
        runtime.step(np.array([[1]]), pool=pool, slot_start=0, past_lengths=[0])


def test_positions_stay_inside_the_context_length(runtime: OrtRuntime, model: GPT) -> None:
    c = model.config
    with pytest.raises(ValueError, match=r"max_length 129 exceeds the model's context length n_positions=128"):
        runtime.new_pool(max_sequences=1, max_length=c.n_positions + 1)
    big = KVPool(n_layer=c.n_layer, n_head=c.n_head, head_dim=c.head_dim, max_sequences=1,
                 max_length=2 * c.n_positions)
    with pytest.raises(ValueError, match=r"must be in \[1, 128\]"):
        runtime.step(np.array([[1]]), pool=big, slot_start=0, past_lengths=[c.n_positions])


def test_run_takes_feeds_by_name(runtime: OrtRuntime, model: GPT) -> None:
    c = model.config
    shape = (1, c.n_head, 8, c.head_dim)
    feeds = {tensors.INPUT_IDS: np.array([[1, 2]]), tensors.POSITION_IDS: np.array([[0, 1]]),
             tensors.ATTENTION_MASK: np.ones((1, 2), np.int64)}
    feeds |= {n: np.zeros(shape, np.float32) for i in range(c.n_layer)
              for n in (tensors.past_key(i), tensors.past_value(i))}
    # the static graph's second group (the prompt chunk of a mixed call): one token, one position
    chunk_shape = (1, c.n_head, 1, c.head_dim)
    feeds |= {tensors.chunk(tensors.INPUT_IDS): np.array([[3]]), tensors.chunk(tensors.POSITION_IDS): np.array([[0]]),
              tensors.chunk(tensors.ATTENTION_MASK): np.ones((1, 1), np.int64)}
    feeds |= {tensors.chunk(n): np.zeros(chunk_shape, np.float32) for i in range(c.n_layer)
              for n in (tensors.past_key(i), tensors.past_value(i))}
    out = runtime.run(feeds)
    assert out[tensors.LOGITS].shape == (2, c.vocab_size) and out[tensors.present_key(0)].shape == shape
    assert out[tensors.chunk(tensors.present_key(0))].shape == chunk_shape
    with pytest.raises(ValueError, match="unknown inputs"):
        runtime.run({"tokens": np.array([[1]])})
