"""export/onnx/validate.py: the validation fails on a wrong graph with a clear message, and passes
the right one."""

from __future__ import annotations

import copy

import pytest
import torch

from export.model import GPT
from export.onnx import ExportResult, ValidationError, export_onnx, validate_onnx
from tests.onnx_export_fixtures import TOL, model  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def static_fp32(model: GPT, tmp_path_factory) -> ExportResult:
    """The static fp32 graph, not validated on export: the tests here run the validation."""
    return export_onnx(model, tmp_path_factory.mktemp("static") / "gpt.onnx", validate=False)


def test_validation_fails_on_a_wrong_graph(static_fp32: ExportResult, model: GPT) -> None:
    """The exported graph against a model with one weight changed after export."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_fc.weight[3, 5] += 0.5
    with pytest.raises(ValidationError, match=r"check 'prefill\+decode': max \|Δlogits\| = .* limit 0.0001") as e:
        validate_onnx(static_fp32.path, changed, precision="fp32")
    assert e.value.value > TOL and e.value.limit == TOL and e.value.check == "prefill+decode"
    # the unchanged model still validates: the failure was the weight, nothing else
    validate_onnx(static_fp32.path, model, precision="fp32")
