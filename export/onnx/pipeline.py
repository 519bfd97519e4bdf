"""The public entry: `export_onnx` runs export -> optimise -> validate and writes the graph into
place only once it passed; `ExportResult` says what was written."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from export.model import GPT
from export.onnx.export import DEFAULT_OPSET, check_opset, set_io_shapes, torch_export
from export.onnx.graph import (KV_CACHES, PRECISIONS, check_io, external_data_path, graph_specs,
                               kv_cache_dtype_problem, model_files, op_counts, save_model, set_metadata)
from export.onnx.optimise import (fuse_transformer_ops, kv_cache_scales, to_fp16, to_int4, to_int8,
                                  to_int8_kv_cache)
from export.onnx.validate import ValidationReport, validate_onnx
from serving import tensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    precision: str
    opset: int
    kv_cache: str
    config: dict[str, Any]
    inputs: tuple[tensors.TensorSpec, ...]
    outputs: tuple[tensors.TensorSpec, ...]
    fusions: dict[str, Any] = field(default_factory=dict)
    validation: Optional[ValidationReport] = None
    export_seconds: float = 0.0
    bytes: int = 0
    kv_cache_dtype: str = "auto"

    @property
    def paths(self) -> tuple[Path, ...]:
        """The model file and, for models over the protobuf limit, its weights file."""
        return tuple(model_files(self.path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "files": [p.name for p in self.paths], "precision": self.precision,
            "opset": self.opset, "kv_cache": self.kv_cache, "kv_cache_dtype": self.kv_cache_dtype, "config": self.config,
            "inputs": [asdict(s) for s in self.inputs], "outputs": [asdict(s) for s in self.outputs],
            "fusions": self.fusions,
            "validation": self.validation.to_dict() if self.validation else None,
            "export_seconds": round(self.export_seconds, 2), "bytes": self.bytes,
        }


def export_onnx(
    model: GPT,
    path: str | Path,
    *,
    kv_cache: str = "static",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    validate: bool = True,
    text_tokens: Optional[Sequence[int]] = None,
    kv_cache_dtype: str = "auto",
) -> ExportResult:
    """Export `model` to `path` and (by default) validate it against the model in PyTorch.

    optimize: ORT transformer fusions (static graph only; the dynamic graph stays standard ONNX).
    text_tokens: held-out text for the perplexity check (validate_onnx), and for the int8 KV
    cache's calibration.
    kv_cache_dtype: "auto" (the precision's float type) or "int8" (static cache, int8 and int4
    precisions: the quantized exports, whose tolerances allow for its rounding).
    Raises ValidationError (and leaves `path` as it was) when the graph fails validation."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    problem = kv_cache_dtype_problem(kv_cache_dtype, kv_cache=kv_cache, precision=precision)
    if problem:
        raise ValueError(f"kv_cache_dtype {problem}")
    check_opset(opset)
    if not isinstance(model, GPT):
        raise ValueError(f"model must be an export.model.GPT, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    if kv_cache == "static" and config.head_dim % 8:
        raise ValueError(f"the static cache (GroupQueryAttention) needs head_dim (n_embd / n_head) a "
                         f"multiple of 8, got head_dim {config.head_dim}; use kv_cache='dynamic'")
    inputs, outputs = graph_specs(config, kv_cache=kv_cache, precision=precision, kv_cache_dtype=kv_cache_dtype)

    t0 = time.perf_counter()
    logger.info("exporting %s (%d layers, %s params) to ONNX: %s cache, %s, opset %d",
                path.name, config.n_layer, f"{model.num_parameters():,}", kv_cache, precision, opset)
    proto = torch_export(model, kv_cache=kv_cache, opset=opset)
    set_io_shapes(proto, *graph_specs(config, kv_cache=kv_cache, precision="fp32"))
    fusions: dict[str, Any] = {"op_counts_before": op_counts(proto)}
    if optimize and kv_cache == "static":
        logger.info("fusing transformer ops (ORT optimizer)")
        proto, fusions["fused"] = fuse_transformer_ops(proto, config)
    if precision == "fp16":
        logger.info("converting to fp16 (LayerNorms and logits stay fp32)")
        proto = to_fp16(proto)
    elif precision == "int8":
        logger.info("quantizing MatMul weights to int8 (dynamic quantization)")
        proto = to_int8(proto)
    elif precision == "int4":
        logger.info("quantizing MatMul weights to int4 (MatMulNBits, blocks of 32)")
        proto = to_int4(proto)
    if kv_cache_dtype == "int8":
        logger.info("int8 KV cache: calibrating per-channel scales in PyTorch")
        proto = to_int8_kv_cache(proto, kv_cache_scales(model, text_tokens))
    fusions["op_counts_after"] = op_counts(proto)
    check_io(proto, inputs, outputs)
    set_metadata(proto, config=config, kv_cache=kv_cache, precision=precision, kv_cache_dtype=kv_cache_dtype)

    # written and validated in a staging folder beside `path`, then moved into place: `path` only
    # ever holds a graph that passed (or was not asked to pass) validation
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        staged = staging / path.name
        save_model(proto, staged)
        del proto
        export_seconds = time.perf_counter() - t0
        logger.info("exported %s in %.1f s", path.name, export_seconds)
        report = validate_onnx(staged, model, precision=precision, text_tokens=text_tokens) if validate else None
        if external_data_path(path).exists():
            external_data_path(path).unlink()  # a side file of an earlier, larger export
        for file in model_files(staged):
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s", path)
    return ExportResult(
        path=path, precision=precision, opset=opset, kv_cache=kv_cache, config=config.to_dict(),
        inputs=tuple(inputs), outputs=tuple(outputs), fusions=fusions, validation=report,
        export_seconds=export_seconds, bytes=sum(p.stat().st_size for p in model_files(path)),
        kv_cache_dtype=kv_cache_dtype)

