"""The tiny model and its real ONNX exports for the TensorRT tests, export side
(tests/test_tensorrt.py) and runtime side (tests/test_engine_runtime_trt.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from export.config import GPTConfig
from export.model import GPT
from export.onnx import export_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None or importlib.util.find_spec("tensorrt_bindings") is not None
TINY = GPTConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.fixture(scope="module")
def graphs(model: GPT, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real exports of the tiny model: dynamic (what TensorRT builds from) and static."""
    out = tmp_path_factory.mktemp("trt")
    # optimize=False: the static graph's GroupQueryAttention is there without ORT's other fusions
    return {kv: export_onnx(model, out / f"{kv}.onnx", kv_cache=kv, validate=False, optimize=False).path
            for kv in ("dynamic", "static")}
