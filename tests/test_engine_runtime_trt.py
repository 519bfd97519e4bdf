"""The TensorRT runtime (serving/engine/): profiles' past bucketing, the paged step logic through
ONNX Runtime against PyTorch on CPU (paged.py, host_engine.py, memory.py), load_runtime's
choice by suffix (loader.py) and, marked `gpu`, TrtRuntime on a real TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.model import GPT
from export.tensorrt.build import build_engine
from serving.engine.gpu_libs import TensorRTUnavailableError
from serving.engine.host_engine import OrtEngine
from serving.engine.kv_cache import KVPool
from serving.engine.loader import load_runtime
from serving.engine.memory import HostOps
from serving.engine.paged import PagedStepRuntime, attention_mask, compaction_order, write_column
from serving.engine.profiles import AxisRange, Profile, bucket_past, default_profiles
from serving.engine.runtime import OrtRuntime
from serving.engine.scheduler import Scheduler, StepRequest
from tests.trt_graphs import HAS_TENSORRT, TINY, graphs, model  # noqa: F401 - fixtures


# ---------------------------------------------------------------------------- profiles


def test_past_bucketing_stays_in_the_profile() -> None:
    decode = default_profiles(n_positions=128, max_batch=4)[0]
    assert bucket_past(0, profile=decode, limit=127, bucket=64) == 0
    assert bucket_past(1, profile=decode, limit=127, bucket=64) == 64
    assert bucket_past(100, profile=decode, limit=127, bucket=64) == 127  # capped: past + 1 <= max_length
    with pytest.raises(ValueError, match="does not fit"):
        bucket_past(120, profile=Profile("p", AxisRange(1, 1, 1), AxisRange(1, 1, 1), AxisRange(0, 0, 64)),
                    limit=127, bucket=64)


# ---------------------------------------------------------------------------- the paged step logic


def test_column_map_helpers() -> None:
    columns = np.array([[0, 1, 5, 6, 9, 9], [0, 1, 2, 3, 4, 5]])
    past = np.array([3, 2])
    assert write_column(columns, past) == 6  # row 0's valid columns are 0, 1, 5
    mask = attention_mask(columns, past, P=8, T=2)
    assert mask.tolist() == [[1, 1, 0, 0, 0, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]]
    assert compaction_order(columns, past).tolist() == [[0, 1, 5, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


_REFERENCE: dict[tuple[int, ...], np.ndarray] = {}


@torch.no_grad()
def _reference(model: GPT, tokens: list[int]) -> np.ndarray:
    """PyTorch's last-position logits for the whole token history (no cache: the plain reference)."""
    key = (id(model), *tokens)
    if key not in _REFERENCE:
        logits, _ = model(torch.tensor([tokens]), last_only=True)
        _REFERENCE[key] = logits[0].numpy()
    return _REFERENCE[key]


def test_paged_runtime_matches_pytorch_through_the_scheduler(model: GPT, graphs: dict[str, Path]) -> None:
    """The TensorRT runtime's step logic (gather, holes, one write column, compaction), with ONNX
    Runtime executing the same dynamic graph and numpy buffers copied with the CUDA copies'
    offsets and pitches, against PyTorch token by token."""
    engine = OrtEngine(graphs["dynamic"], profiles=default_profiles(n_positions=TINY.n_positions, max_batch=4))
    runtime = PagedStepRuntime(engine, HostOps(), past_bucket=16)
    pool = runtime.new_pool(max_sequences=3, max_length=48)
    scheduler = Scheduler(runtime, pool, vocab_size=TINY.vocab_size)
    rng = np.random.default_rng(0)
    history = {1: rng.integers(0, TINY.vocab_size, 30).tolist(), 2: rng.integers(0, TINY.vocab_size, 3).tolist(),
               3: rng.integers(0, TINY.vocab_size, 7).tolist()}
    worst = 0.0

    def run(requests: list[StepRequest]) -> None:
        nonlocal worst
        for request, result in zip(requests, scheduler.step(requests)):
            assert result.error is None, result.error
            if not request.end:
                worst = max(worst, float(np.abs(result.logits - _reference(model, history[request.sequence_id])).max()))

    def decode(ids: list[int]) -> None:
        requests = []
        for sid in ids:
            token = int(_reference(model, history[sid]).argmax())
            history[sid].append(token)
            requests.append(StepRequest(sid, np.array([token])))
        run(requests)

    run([StepRequest(sid, np.array(tokens), start=True) for sid, tokens in history.items()])
    for step in range(16):  # all three, then the long one pauses every other step (a dummy row)
        decode([1, 2, 3] if step % 2 else [2, 3])
    run([StepRequest(1, np.array([0]), end=True)])
    history[4] = rng.integers(0, TINY.vocab_size, 5).tolist()
    run([StepRequest(4, np.array(history[4]), start=True)])
    for _ in range(6):  # slot 1 has holes up to the old long row's columns: forces compaction
        decode([4, 2, 3])
    continuation = rng.integers(0, TINY.vocab_size, 3).tolist()
    history[2] += continuation
    run([StepRequest(2, np.array(continuation))])  # a prompt after a past, as one row

    state = runtime._pools[pool]
    assert state.compactions >= 1
    assert worst < 1e-4, worst  # fp32: the same function, summed in another order
    assert {p for p, _ in engine.calls} == {0, 1}  # decode and prefill profiles both used
    assert all(B <= 4 for _, (B, _) in engine.calls)


def test_paged_runtime_rejects_bad_steps(graphs: dict[str, Path]) -> None:
    runtime = PagedStepRuntime(OrtEngine(graphs["dynamic"], profiles=default_profiles(n_positions=128, max_batch=2)),
                               HostOps())
    pool = runtime.new_pool(max_sequences=4, max_length=16)
    with pytest.raises(ValueError, match="past_lengths \\+ new tokens"):
        runtime.step(np.zeros((1, 2)), pool=pool, slot_start=0, past_lengths=[15])
    with pytest.raises(ValueError, match="largest profile batch 2"):
        runtime.step(np.zeros((3, 1)), pool=pool, slot_start=0, past_lengths=[0, 0, 0])
    with pytest.raises(ValueError, match="input_ids must be in"):
        runtime.step(np.full((1, 1), TINY.vocab_size), pool=pool, slot_start=0, past_lengths=[0])
    wrong = KVPool(n_layer=1, n_head=TINY.n_head, head_dim=TINY.head_dim, max_sequences=1, max_length=8)
    with pytest.raises(ValueError, match="does not match the engine"):
        runtime.step(np.zeros((1, 1)), pool=wrong, slot_start=0, past_lengths=[0])


def test_host_copy2d_refuses_out_of_bounds() -> None:
    ops = HostOps()
    src, dst = ops.alloc(64), ops.alloc(64)
    with pytest.raises(ValueError, match="past the destination"):
        ops.copy2d(dst, 40, 16, src, 0, 16, 16, 2)
    with pytest.raises(ValueError, match="bad 2-D copy"):
        ops.copy2d(dst, 0, 8, src, 0, 16, 16, 2)


# ---------------------------------------------------------------------------- loading


def test_load_runtime_dispatches_by_suffix(graphs: dict[str, Path], tmp_path: Path) -> None:
    assert isinstance(load_runtime(graphs["dynamic"]), OrtRuntime)
    with pytest.raises(ValueError, match="unknown suffix"):
        load_runtime(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="no TensorRT engine"):
        load_runtime(tmp_path / "missing.plan")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_load_runtime_says_what_to_install(tmp_path: Path) -> None:
    plan = tmp_path / "gpt.plan"
    plan.write_bytes(b"not an engine")
    with pytest.raises(TensorRTUnavailableError, match="tensorrt-cu12==10.6.0|cuda-python"):
        load_runtime(plan)


# ---------------------------------------------------------------------------- GPU (TensorRT)


@pytest.mark.gpu
def test_tensorrt_engine_matches_pytorch(model: GPT, graphs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from serving.engine.runtime_trt import TrtRuntime

    plan = tmp_path / "tiny.plan"
    summary = build_engine(graphs["dynamic"], plan, precision="fp32", max_batch=4, progress=False)
    assert summary.layers > 0 and plan.stat().st_size == summary.bytes
    runtime = TrtRuntime(plan)
    pool = runtime.new_pool(max_sequences=4, max_length=TINY.n_positions)
    scheduler = Scheduler(runtime, pool, vocab_size=TINY.vocab_size)
    rng = np.random.default_rng(1)
    history = {sid: rng.integers(0, TINY.vocab_size, n).tolist() for sid, n in ((1, 5), (2, 11), (3, 2))}
    results = scheduler.step([StepRequest(s, np.array(t), start=True) for s, t in history.items()])
    for _ in range(12):
        requests = []
        for sid, result in zip(history, results):
            assert result.error is None, result.error
            assert np.abs(result.logits - _reference(model, history[sid])).max() < 1e-3  # TF32 off: fp32 math
            token = int(_reference(model, history[sid]).argmax())
            history[sid].append(token)
            requests.append(StepRequest(sid, np.array([token])))
        results = scheduler.step(requests)
