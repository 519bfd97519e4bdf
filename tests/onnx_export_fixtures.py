"""What the export/onnx tests share: the tiny model with non-trivial biases and LayerNorms, a
held-out text, the fp32 tolerance and helpers to read an exported graph.

The test modules import the fixtures by name (`from tests.onnx_export_fixtures import model, ...`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.config import GPTConfig
from export.model import GPT
from export.onnx import ExportResult
from export.onnx.validate import DECODE_STEPS

TOL = 1e-4  # fp32: the same function, two implementations


def randomize_aux(model: GPT, seed: int) -> GPT:
    """Non-zero biases and non-unit LayerNorms: the default init (zero bias, unit LN) would let a
    fusion that drops or misplaces a bias pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif ".ln_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return randomize_aux(GPT(GPTConfig.from_preset("tiny")), seed=1).eval()


@pytest.fixture(scope="module")
def text_tokens(model: GPT) -> list[int]:
    return np.random.default_rng(5).integers(0, model.config.vocab_size, 64).tolist()


def assert_fp32_checks(result: ExportResult) -> None:
    report = result.validation
    assert report is not None and report.precision == "fp32"
    names = [c.name for c in report.checks]
    assert names == ["prefill+decode", "empty past", "batched lengths", "perplexity"]
    for check in report.checks:
        assert check.positions > 0
        assert check.max_abs_logits <= TOL, check
    # prefill + 16 decode steps for each of the two default prompts
    assert report.checks[0].positions == 2 * (DECODE_STEPS + 1)
    assert report.perplexity.rel_change < 1e-5


def graph(result: ExportResult) -> onnx.GraphProto:
    return onnx.load(str(result.path)).graph
