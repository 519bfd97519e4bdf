"""export/onnx/pipeline.py (export_onnx): bad arguments are clear errors before any work, and a
graph that fails validation never reaches the target path."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.config import GPTConfig
from export.model import GPT
from export.onnx import TOLERANCES, Tolerance, ValidationError, export_onnx
from tests.onnx_export_fixtures import model  # noqa: F401 (fixture)


def test_failed_validation_leaves_no_graph_behind(model: GPT, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "gpt.onnx"
    target.write_bytes(b"the previous export")
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(max_abs_logits=0.0))  # nothing passes
    with pytest.raises(ValidationError, match=r"max \|Δlogits\| = .*, limit 0"):
        export_onnx(model, target, kv_cache="dynamic")
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt.onnx"], "staging files left behind"


def test_too_old_opset_is_a_clear_error(model: GPT, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"opset 13 is too old.*opset >= 18"):
        export_onnx(model, tmp_path / "gpt.onnx", opset=13)
    assert not (tmp_path / "gpt.onnx").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_cache="paged"), "kv_cache must be one of"),
    (dict(precision="int3"), "precision must be one of"),
])
def test_bad_arguments(model: GPT, tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "gpt.onnx", **kwargs)


def test_static_cache_needs_head_dim_multiple_of_8(tmp_path: Path) -> None:
    odd = GPT(GPTConfig(vocab_size=64, n_positions=16, n_layer=1, n_head=4, n_embd=36))
    with pytest.raises(ValueError, match=r"multiple of 8, got head_dim 9; use kv_cache='dynamic'"):
        export_onnx(odd, tmp_path / "gpt.onnx", kv_cache="static")
