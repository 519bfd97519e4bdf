"""PyTorch GPT -> ONNX: torch.export-based export with a KV cache, transformer fusions, fp16/int8,
and validation against PyTorch through the engine that serves it (serving/runtime.py).

Two graphs, one tensor table (serving/tensors.py names and shapes every input and output):

- `kv_cache="static"` (the ONNX Runtime serving graph): each layer's attention is ONNX Runtime's
  `com.microsoft::GroupQueryAttention` (export/ops.py) over preallocated (B, nh, MAX, hs) buffers
  that are both past input and present output; IO binding aliases them, so a decode step writes
  one position per layer in place instead of copying the cache. Plus ORT's transformer fusions
  (SkipLayerNormalization, FastGelu).
- `kv_cache="dynamic"` (portable: TensorRT and any runtime): `GPT.forward(..., last_only=True)` as
  is — past ++ new by Concat, standard ONNX ops only, no contrib fusions.

Both return the last position's logits only, (B, V), in float32 for every precision (the sampler
sees one dtype everywhere): fp32 is the reference; fp16 has fp16 weights, activations and KV
cache with LayerNorms in fp32; int8 quantizes the MatMul weights (the LM head through its own
transposed copy of the tied embedding) and keeps activations and KV in fp32.

Every export is validated (unless told not to) by `validate_onnx`; see its docstring for the checks
and the tolerances.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from export import ops
from export.config import GPTConfig
from export.model import GPT, KV, Attend
from serving import tensors
from serving.runtime import OrtRuntime

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
KV_CACHES: tuple[str, ...] = ("static", "dynamic")
# The torch.export-based exporter emits opset 18 (its torchlib); LayerNormalization needs 17.
MIN_OPSET = 18
DEFAULT_OPSET = 18
LOGITS_DTYPE = "float32"
LM_HEAD_WEIGHT = "lm_head.weight"  # int8: the head's own (C, V) copy of the tied embedding
_PROTOBUF_LIMIT = 2**31 - 2**26  # above this (~1.9 GB), weights go to a side file


class ExportError(RuntimeError):
    """The export itself failed (not a bad argument: those raise ValueError)."""


class ValidationError(AssertionError):
    """An exported graph disagrees with PyTorch beyond the tolerance of its precision."""

    def __init__(self, check: str, metric: str, value: float, limit: float, report: "ValidationReport"):
        self.check, self.metric, self.value, self.limit, self.report = check, metric, value, limit, report
        super().__init__(
            f"ONNX validation failed ({report.precision}, {report.kv_cache} cache): check {check!r}: "
            f"{metric} = {value:.6g}, limit {limit:.6g}")


def kv_dtype(precision: str) -> str:
    return "float16" if precision == "fp16" else "float32"


def graph_specs(config: GPTConfig, *, kv_cache: str, precision: str
                ) -> tuple[list[tensors.TensorSpec], list[tensors.TensorSpec]]:
    """The exported graph's inputs and outputs, from the tensor table."""
    c, kv = config, kv_dtype(precision)
    inputs = tensors.graph_inputs(c.n_layer, c.n_head, c.head_dim, kv_dtype=kv, kv_cache=kv_cache)
    outputs = tensors.graph_outputs(c.n_layer, c.n_head, c.head_dim, c.vocab_size, kv_dtype=kv,
                                    logits_dtype=LOGITS_DTYPE, kv_cache=kv_cache)
    return inputs, outputs


# ------------------------------------------------------------------ the exported modules


def static_cache_attend(past: KV, attention_mask: torch.Tensor, n_head: int) -> Attend:
    """Attention through the in-place static-cache op (GroupQueryAttention in ONNX)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, KV]:
        y, present_k, present_v = torch.ops.gptpipe.static_cache_attention(
            q, k, v, past[0], past[1], attention_mask, n_head)  # (B, T, C), (B, nh, MAX, hs) x 2
        return y, (present_k, present_v)

    return attend


class StaticCacheGPT(nn.Module):
    """The ONNX Runtime serving graph: in-place static cache, last position's logits."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Sequence[KV]) -> tuple[torch.Tensor, list[KV]]:
        n_head = self.model.config.n_head
        attends = [static_cache_attend(past, attention_mask, n_head) for past in past_key_values]
        h, presents = self.model.hidden_states(input_ids, position_ids, attends)  # (B, T, C)
        return self.model.lm_head(h[:, -1, :]), presents  # (B, V)


class DynamicCacheGPT(nn.Module):
    """The portable graph: `GPT.forward` with past ++ new, last position's logits."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Sequence[KV]) -> tuple[torch.Tensor, list[KV]]:
        return self.model(input_ids, position_ids, attention_mask, past_key_values, last_only=True)


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class CheckResult:
    name: str
    positions: int  # logit vectors compared
    max_abs_logits: float  # max |onnx - torch| over all of them
    rel_logits: float  # rms(onnx - torch) / rms(torch - its mean), over all positions
    max_rel_logits: float  # the same ratio at the worst single position
    agreement: Optional[float]  # greedy top-1 agreement over the decisive positions
    decisive: int  # positions where the fp32 top-1 leads the top-2 by >= the margin
    detail: str = ""


@dataclass(frozen=True)
class _PositionStats:
    """Per-position statistics of one comparison, kept so that checks can be pooled."""

    sq_err: np.ndarray  # (N,) mean((onnx - torch)^2)
    var: np.ndarray  # (N,) var(torch)
    max_abs: np.ndarray  # (N,) max |onnx - torch|
    decisive: np.ndarray  # (N,) bool
    agree: np.ndarray  # (N,) bool

    @staticmethod
    def concat(stats: Sequence["_PositionStats"]) -> "_PositionStats":
        return _PositionStats(*(np.concatenate([getattr(s, f.name) for s in stats])
                                for f in dataclasses.fields(_PositionStats)))

    def result(self, name: str, detail: str = "") -> CheckResult:
        n = len(self.sq_err)
        rel = math.sqrt(self.sq_err.sum() / max(self.var.sum(), 1e-30))
        per_position = np.sqrt(self.sq_err / np.maximum(self.var, 1e-30))
        agreement = float(self.agree[self.decisive].mean()) if self.decisive.any() else None
        return CheckResult(name=name, positions=n, max_abs_logits=float(self.max_abs.max()), rel_logits=rel,
                           max_rel_logits=float(per_position.max()), agreement=agreement,
                           decisive=int(self.decisive.sum()), detail=detail)


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored
    ppl_torch: float
    ppl_onnx: float

    @property
    def rel_change(self) -> float:
        return abs(self.ppl_onnx - self.ppl_torch) / self.ppl_torch


@dataclass(frozen=True)
class Tolerance:
    max_abs_logits: Optional[float] = None  # every check
    max_rel_logits: Optional[float] = None  # all checks pooled: CheckResult.rel_logits
    min_agreement: Optional[float] = None  # all checks pooled, decisive positions only
    decisive_margin: float = 0.0  # logits
    max_rel_ppl: Optional[float] = None  # |Δppl| / ppl on the held-out text


# Per precision; see validate_onnx for the reasoning and the measurements behind the numbers.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_logits=1e-4, max_rel_ppl=1e-4),
    "fp16": Tolerance(max_rel_logits=0.01, min_agreement=0.99, decisive_margin=0.1, max_rel_ppl=0.01),
    "int8": Tolerance(max_rel_logits=0.10, min_agreement=0.97, decisive_margin=0.5, max_rel_ppl=0.05),
}


@dataclass(frozen=True)
class ValidationReport:
    precision: str
    kv_cache: str
    tolerance: Tolerance
    checks: tuple[CheckResult, ...]
    overall: CheckResult  # every position of every check
    perplexity: Optional[PerplexityResult] = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.perplexity is not None:
            out["perplexity"]["rel_change"] = self.perplexity.rel_change
        return out


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

    @property
    def paths(self) -> tuple[Path, ...]:
        """The model file and, for models over the protobuf limit, its weights file."""
        data = external_data_path(self.path)
        return (self.path, data) if data.exists() else (self.path,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "files": [p.name for p in self.paths], "precision": self.precision,
            "opset": self.opset, "kv_cache": self.kv_cache, "config": self.config,
            "inputs": [asdict(s) for s in self.inputs], "outputs": [asdict(s) for s in self.outputs],
            "fusions": self.fusions,
            "validation": self.validation.to_dict() if self.validation else None,
            "export_seconds": round(self.export_seconds, 2), "bytes": self.bytes,
        }


# ------------------------------------------------------------------ export


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
) -> ExportResult:
    """Export `model` to `path` and (by default) validate it against the model in PyTorch.

    optimize: ORT transformer fusions (static graph only; the dynamic graph stays standard ONNX).
    text_tokens: held-out text for the perplexity check (validate_onnx).
    Raises ValidationError (and leaves `path` as it was) when the graph fails validation."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
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
    inputs, outputs = graph_specs(config, kv_cache=kv_cache, precision=precision)

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
    fusions["op_counts_after"] = op_counts(proto)
    check_io(proto, inputs, outputs)
    _set_metadata(proto, config=config, kv_cache=kv_cache, precision=precision)

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
        for file in _files(staged):
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s", path)
    return ExportResult(
        path=path, precision=precision, opset=opset, kv_cache=kv_cache, config=config.to_dict(),
        inputs=tuple(inputs), outputs=tuple(outputs), fusions=fusions, validation=report,
        export_seconds=export_seconds, bytes=sum(p.stat().st_size for p in _files(path)))


def check_opset(opset: int) -> None:
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ValueError(f"opset must be an int, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the torch.export-based exporter needs opset >= "
                         f"{MIN_OPSET} (LayerNormalization is opset 17, the exporter emits 18)")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset {opset} is newer than this onnx ({onnx.__version__}) knows: at most {newest}")


def _sample_inputs(config: GPTConfig, kv_cache: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs and their dynamic shapes. Every symbolic size gets a distinct example value
    (>= 2: torch.export specialises 0 and 1)."""
    from torch.export import Dim

    B, T, P = 2, 3, 4
    S = config.n_positions if kv_cache == "static" else P
    ids = torch.zeros(B, T, dtype=torch.long)
    positions = (torch.arange(T) + P).expand(B, T).contiguous()
    mask = torch.ones(B, P + T, dtype=torch.long)
    shape = (B, config.n_head, S, config.head_dim)
    past = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.n_layer)]
    batch = Dim(tensors.BATCH, min=1)
    seq = Dim(tensors.SEQ, min=1, max=config.n_positions)
    if kv_cache == "static":
        kv_axis = Dim(tensors.MAX_SEQ, min=2, max=config.n_positions)
        total: Any = Dim(tensors.TOTAL, min=1, max=config.n_positions)
    else:
        kv_axis = Dim(tensors.PAST, min=0, max=config.n_positions - 1)
        total = Dim.AUTO  # past + new: torch.export derives it; renamed after export
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past_key_values": [({0: batch, 2: kv_axis}, {0: batch, 2: kv_axis}) for _ in range(config.n_layer)],
    }
    return (ids, positions, mask, past), dynamic_shapes


def torch_export(model: GPT, *, kv_cache: str, opset: int) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) of the static or dynamic wrapper, as an fp32 ModelProto."""
    config = model.config
    wrapper = (StaticCacheGPT if kv_cache == "static" else DynamicCacheGPT)(model).eval()
    args, dynamic_shapes = _sample_inputs(config, kv_cache)
    inputs, outputs = graph_specs(config, kv_cache=kv_cache, precision="fp32")
    try:
        with torch.no_grad(), quiet_toolchain():
            program = torch.onnx.export(
                wrapper, args, None, dynamo=True,
                input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                dynamic_shapes=dynamic_shapes, opset_version=opset,
                custom_translation_table=ops.CUSTOM_TRANSLATION_TABLE if kv_cache == "static" else None,
                optimize=True, verbose=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for the {kv_cache}-cache graph: {e}") from e
    return program.model_proto


# INFO chatter of the ONNX toolchain (every constant folded, every initializer deduplicated)
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "fusion_base", "fusion_utils", "onnx_model", "onnx_model_bert",
                   "onnx_model_gpt2", "fusion_skiplayernorm", "fusion_fastgelu", "fusion_layernorm")


@contextmanager
def quiet_toolchain() -> Iterator[None]:
    """Our own progress logs stay; the toolchain's per-node INFO lines and its warnings about
    axis names we rename anyway (set_io_shapes) go."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r"torchvision is not installed")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def set_io_shapes(proto: onnx.ModelProto, inputs: Sequence[tensors.TensorSpec],
                  outputs: Sequence[tensors.TensorSpec]) -> None:
    """Name every graph input/output axis as the tensor table does (torch.export names its own
    symbols, e.g. `s53` or `s17 + s42`), and rename those symbols in the inner value_info too."""
    rename: dict[str, str] = {}
    for values, specs in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        by_name = {v.name: v for v in values}
        for spec in specs:
            value = by_name.get(spec.name)
            if value is None:
                raise ExportError(f"the exported graph has no {spec.name!r}; it has {sorted(by_name)}")
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(spec.shape):
                raise ExportError(f"{spec.name}: exported rank {len(dims)}, table rank {len(spec.shape)}")
            for dim, want in zip(dims, spec.shape):
                if isinstance(want, str):
                    if dim.HasField("dim_param") and dim.dim_param != want:
                        rename[dim.dim_param] = want
                    dim.dim_param = want
                else:
                    if dim.HasField("dim_value") and dim.dim_value != want:
                        raise ExportError(f"{spec.name}: exported size {dim.dim_value}, table size {want}")
                    dim.dim_value = want
    for value in proto.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def check_io(proto: onnx.ModelProto, inputs: Sequence[tensors.TensorSpec],
             outputs: Sequence[tensors.TensorSpec]) -> None:
    """The final graph's inputs and outputs are exactly the table's: names, order, dtypes, shapes."""
    for kind, values, specs in (("inputs", proto.graph.input, inputs), ("outputs", proto.graph.output, outputs)):
        got = [(v.name, _ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]
        want = [(s.name, s.dtype, tuple(s.shape)) for s in specs]
        if got != want:
            diff = next((g, w) for g, w in zip(got + [None] * len(want), want + [None] * len(got)) if g != w)
            raise ExportError(f"graph {kind} differ from the tensor table: got {diff[0]}, want {diff[1]}")


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def fuse_transformer_ops(proto: onnx.ModelProto, config: GPTConfig) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ORT's transformer fusions (python, no ORT session): Add+LayerNormalization ->
    SkipLayerNormalization (bias folded in), tanh-GELU -> FastGelu (bias folded in).
    Attention fusion is off: attention already is GroupQueryAttention. Returns the fused graph and
    the fused op counts (the FastGelu of an opset >= 20 Gelu counts as fused by the rewrite)."""
    with quiet_toolchain():
        return _fuse(proto, config)


def tanh_gelu_to_fastgelu(proto: onnx.ModelProto) -> int:
    """ONNX `Gelu(approximate="tanh")` (what opset >= 20 exports) -> com.microsoft `FastGelu`.

    ORT's FusionBiasGelu reads every `Gelu` as the exact erf GELU and fuses it into `BiasGelu`
    (erf), silently changing GPT-2's tanh GELU (measured: |Δlogits| 1.1e-5 on the tiny model, 30x
    the fp32 noise). FastGelu is the same tanh formula, and its bias fusion is right."""
    count = 0
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx") and attrs.get("approximate") in (b"tanh", "tanh"):
            node.op_type, node.domain = "FastGelu", ops.MS_DOMAIN
            del node.attribute[:]
            count += 1
    return count


def _fuse(proto: onnx.ModelProto, config: GPTConfig) -> tuple[onnx.ModelProto, dict[str, int]]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    tanh_gelu_to_fastgelu(proto)
    options = FusionOptions("gpt2")
    options.enable_attention = False
    options.enable_embed_layer_norm = False  # BERT's embedding pattern; GPT-2 has none
    optimizer = optimize_model(proto, model_type="gpt2", num_heads=config.n_head,
                               hidden_size=config.n_embd, optimization_options=options, opt_level=0)
    fused = {k: v for k, v in optimizer.get_fused_operator_statistics().items() if v}
    return optimizer.model, fused


# Ops kept in fp32 in the fp16 graph: LayerNorm statistics (a mean of squares overflows fp16 for
# activations above ~256) and what ORT's default block list keeps anyway.
FP16_OP_BLOCK_LIST = ("LayerNormalization", "SkipLayerNormalization")


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations and KV buffers; logits stay fp32 (a Cast at the end)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        proto, keep_io_types=[tensors.LOGITS],
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_OP_BLOCK_LIST))


def untie_lm_head(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give the LM head its own (C, V) weight: `Gemm(h, wte, transB=1)` -> `MatMul(h, wte^T)`.

    The tied embedding is also read by the token Gather, which dynamic quantization leaves in
    fp32; a separate transposed copy lets the biggest MatMul of the model be quantized."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(tensors.LOGITS)
    # fp32/int8 graphs end in the head itself; walk back through a trailing Cast if there is one
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise ExportError(f"cannot find the LM head (Gemm/MatMul producing {tensors.LOGITS!r})")
    inits = {i.name: i for i in graph.initializer}
    if node.op_type == "MatMul" and node.input[1] in inits:
        return proto  # already a MatMul with its own weight
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type != "Gemm" or attrs.get("transB") != 1 or attrs.get("transA", 0) != 0 or len(node.input) > 2 \
            or node.input[1] not in inits or attrs.get("alpha", 1.0) != 1.0:
        raise ExportError(f"unexpected LM head {node.op_type} {attrs} with inputs {list(node.input)}")
    weight = numpy_helper.to_array(inits[node.input[1]])  # (V, C)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), LM_HEAD_WEIGHT))
    matmul = onnx.helper.make_node("MatMul", [node.input[0], LM_HEAD_WEIGHT], list(node.output),
                                   name="lm_head")
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, matmul)
    return proto


# Per-tensor weight scales, full 8-bit range. Measured on this AVX2 (no VNNI) CPU, gpt2 shape,
# worst-position rel_logits: per-tensor 0.046, per-tensor + reduce_range 0.079, per-channel 0.069, per-channel +
# reduce_range 0.056; on tiny, per-channel without reduce_range was 10x worse (0.14) than
# per-tensor (0.018): u8s8 products saturating in the 16-bit VPMADDUBSW sums of MLAS's AVX2 kernel.
INT8_PER_CHANNEL = False
INT8_REDUCE_RANGE = False


def to_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic quantization of every MatMul weight (LM head included): int8 weights, activations
    quantized per call; KV cache, LayerNorms and attention stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = untie_lm_head(proto)
    with tempfile.TemporaryDirectory(prefix="gptpipe-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        save_model(proto, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=INT8_PER_CHANNEL, reduce_range=INT8_REDUCE_RANGE,
                         use_external_data_format=external_data_path(src).exists(),
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst))


def external_data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def _files(path: Path) -> list[Path]:
    data = external_data_path(path)
    return [path, data] if data.exists() else [path]


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """One file, or for models over the protobuf limit the weights in `<name>.onnx.data` beside it."""
    data = external_data_path(path)
    if data.exists():
        data.unlink()  # a stale side file of an earlier, larger model
    inline = sum(len(t.raw_data) for t in proto.graph.initializer)
    if inline > _PROTOBUF_LIMIT or not _all_data_inline(proto):
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _all_data_inline(proto: onnx.ModelProto) -> bool:
    return all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _set_metadata(proto: onnx.ModelProto, *, config: GPTConfig, kv_cache: str, precision: str) -> None:
    meta = {"gptpipe.config": json.dumps(config.to_dict()), "gptpipe.kv_cache": kv_cache,
            "gptpipe.precision": precision}
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


# ------------------------------------------------------------------ validation

DECODE_STEPS = 16
PPL_ROWS = 4
MAX_PPL_TOKENS = 512


def default_prompts(config: GPTConfig) -> list[list[int]]:
    """Two fixed prompts of different lengths (seeded, any vocabulary)."""
    rng = np.random.default_rng(1234)
    lengths = [min(n, config.n_positions - DECODE_STEPS - 1) for n in (7, 12)]
    return [rng.integers(0, config.vocab_size, size=max(1, n)).tolist() for n in lengths]


def validate_onnx(
    onnx_path: str | Path,
    model: GPT,
    *,
    precision: str,
    text_tokens: Optional[Sequence[int]] = None,
    prompts: Optional[Sequence[Sequence[int]]] = None,
    tolerance: Optional[Tolerance] = None,
    intra_op_threads: Optional[int] = None,
) -> ValidationReport:
    """Run the ONNX graph in ONNX Runtime through serving.runtime.OrtRuntime (the serving engine)
    against `model` in PyTorch fp32; raise ValidationError naming the check, value and limit.

    Checks (tokens are teacher-forced: both sides read the PyTorch greedy continuation, so one
    early disagreement does not make every later position differ):
    - "prefill+decode": each prompt, then DECODE_STEPS single-token steps;
    - "empty past": static: a prompt prefilled into a slot that still holds another sequence's
      stale keys; dynamic: a prompt run with an explicit (B, nh, 0, hs) past;
    - "batched lengths": static: rows of different lengths, in a pool slot range with a free slot
      riding along as a dummy row, decoded together in single batched calls (as the scheduler
      does); dynamic: a left-padded batch with attention_mask, prefill and decode;
    - "perplexity" (with text_tokens): the first MAX_PPL_TOKENS tokens of the held-out text, cut
      into PPL_ROWS segments scored token by token (batched decode) in ONNX and in one forward
      in PyTorch; also adds its positions to the logit statistics.

    Tolerances (TOLERANCES). fp32 is checked per check; fp16/int8 on all positions pooled, since
    a check of 5-30 positions makes a poor statistic.
    - fp32: max |Δlogits| <= 1e-4, hard: the graph computes the same function (measured ~4e-7).
    - fp16 and int8 compare distributions, not bits. Random-weight models have near-flat output
      distributions (top-1 margins ~1e-3): any rounding flips the argmax legitimately there, and
      perplexity sits near the vocabulary size whatever the graph does, so neither greedy
      agreement over every position nor perplexity alone tells a broken graph from a good one.
      Hence three checks, all of which a broken graph (relative error ~1) fails:
      * rel_logits = rms(Δlogits) / rms(logits - their mean): scale-free, as meaningful for
        random weights as for trained ones. Measured: fp16 3e-4 (tiny, trained on text), 6e-4
        (tiny, random), 1.1e-3 (gpt2 shape, random); int8 0.014, 0.015, 0.040. Limits: fp16 0.01,
        int8 0.10 (~2.5x the worst measured; the tiny model's 64-wide dot products are the
        hardest case for per-tensor activation quantization, GPT-2's 768 wide ones average out).
      * greedy agreement at the decisive positions, where fp32's top-1 leads by >= 0.1 logits
        (fp16) or 0.5 (int8, whose logit errors reach ~0.4 on the trained tiny model): there a
        correct graph has no excuse to pick another token. Measured 1.000 everywhere; limits
        0.99 and 0.97.
      * |Δppl| / ppl on the held-out text: measured fp16 <= 5e-5, int8 2e-4 (trained tiny) and
        2.5e-3 (gpt2 shape); limits 1% and 5% (the usual budget for int8 GPT-2-class models).
    """
    onnx_path = Path(onnx_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tol = tolerance or TOLERANCES[precision]
    t0 = time.perf_counter()
    runtime = OrtRuntime(onnx_path, intra_op_threads=intra_op_threads)
    exported_as = runtime.metadata.get("gptpipe.precision", precision)
    if exported_as != precision:
        raise ValueError(f"{onnx_path.name} was exported as {exported_as}; validating it as {precision} "
                         "would apply the wrong tolerances")
    config = model.config
    if (runtime.n_layer, runtime.vocab_size) != (config.n_layer, config.vocab_size):
        raise ValueError(f"{onnx_path.name} has {runtime.n_layer} layers and vocab {runtime.vocab_size}; "
                         f"the model has {config.n_layer} and {config.vocab_size}")
    model = model.eval()
    prompts = [list(p) for p in (prompts or default_prompts(config))]
    run = _StaticRun(runtime, config) if runtime.kv_cache == "static" else _DynamicRun(runtime, config)
    logger.info("validating %s (%s cache, %s) against PyTorch", onnx_path.name, runtime.kv_cache, precision)

    stats = {
        "prefill+decode": _position_stats(*run.prefill_decode(model, prompts), tol),
        "empty past": _position_stats(*run.empty_past(model, prompts), tol),
        "batched lengths": _position_stats(*run.batched_lengths(model, prompts), tol),
    }
    perplexity = None
    if text_tokens is not None:
        ref, got, perplexity = run.perplexity(model, text_tokens)
        stats["perplexity"] = _position_stats(ref, got, tol)
    checks = tuple(s.result(name) for name, s in stats.items())
    overall = _PositionStats.concat(list(stats.values())).result("all checks")
    report = ValidationReport(precision=precision, kv_cache=runtime.kv_cache, tolerance=tol,
                              checks=checks, overall=overall, perplexity=perplexity,
                              seconds=time.perf_counter() - t0)
    for check in checks + (overall,):
        logger.info("  %-16s %4d positions  max|Δ| %.3g  rel %.3g (worst %.3g)  agreement %s (%d decisive)",
                    check.name, check.positions, check.max_abs_logits, check.rel_logits, check.max_rel_logits,
                    "n/a" if check.agreement is None else f"{check.agreement:.4f}", check.decisive)
    if perplexity is not None:
        logger.info("  perplexity torch %.4f onnx %.4f (Δ %.3g)", perplexity.ppl_torch,
                    perplexity.ppl_onnx, perplexity.rel_change)
    _enforce(report)
    return report


def _enforce(report: ValidationReport) -> None:
    tol, overall = report.tolerance, report.overall
    if tol.max_abs_logits is not None:
        for check in report.checks:
            if not check.max_abs_logits <= tol.max_abs_logits:
                raise ValidationError(check.name, "max |Δlogits|", check.max_abs_logits, tol.max_abs_logits, report)
    name = f"{overall.name} ({overall.positions} positions)"
    if tol.max_rel_logits is not None and not overall.rel_logits <= tol.max_rel_logits:
        raise ValidationError(name, "rms(Δlogits)/rms(logits - mean)", overall.rel_logits, tol.max_rel_logits,
                              report)
    if tol.min_agreement is not None and overall.agreement is not None and not overall.agreement >= tol.min_agreement:
        raise ValidationError(name, f"greedy agreement on {overall.decisive} decisive positions",
                              overall.agreement, tol.min_agreement, report)
    ppl = report.perplexity
    if ppl is not None and tol.max_rel_ppl is not None and not ppl.rel_change <= tol.max_rel_ppl:
        raise ValidationError("perplexity", "|Δppl|/ppl", ppl.rel_change, tol.max_rel_ppl, report)


def _position_stats(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> _PositionStats:
    """ref, got: (N, V) logits of the same N positions."""
    if ref.shape != got.shape:
        raise ValueError(f"reference logits {ref.shape} vs onnx {got.shape}")
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = np.where(np.isfinite(got), got - ref, np.inf)  # a NaN must fail every check
    top2 = np.sort(ref, axis=1)[:, -2:]
    return _PositionStats(sq_err=(diff**2).mean(axis=1), var=ref.var(axis=1), max_abs=np.abs(diff).max(axis=1),
                          decisive=(top2[:, 1] - top2[:, 0]) >= tol.decisive_margin,
                          agree=ref.argmax(axis=1) == got.argmax(axis=1))


@torch.no_grad()
def _torch_teacher_forced(model: GPT, prompt: Sequence[int], steps: int) -> tuple[list[int], np.ndarray]:
    """PyTorch greedy continuation of `prompt`: the fed tokens (steps of them) and the logits
    after the prompt and after each fed token, (steps + 1, V)."""
    logits, past = model(torch.tensor([list(prompt)]), last_only=True)
    fed, out = [], [logits[0]]
    for _ in range(steps):
        token = int(logits[0].argmax())
        fed.append(token)
        logits, past = model(torch.tensor([[token]]), past_key_values=past, last_only=True)
        out.append(logits[0])
    return fed, torch.stack(out).numpy()


def _segments(config: GPTConfig, tokens: Sequence[int]) -> np.ndarray:
    """(rows, L) equal segments of the held-out text for the perplexity check."""
    tokens = np.asarray(tokens, dtype=np.int64)[:MAX_PPL_TOKENS]
    if tokens.ndim != 1 or len(tokens) < 2 * PPL_ROWS:
        raise ValueError(f"text_tokens needs at least {2 * PPL_ROWS} tokens, got {len(tokens)}")
    if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise ValueError(f"text_tokens must be in [0, {config.vocab_size})")
    length = min(len(tokens) // PPL_ROWS, config.n_positions)
    return tokens[: PPL_ROWS * length].reshape(PPL_ROWS, length)


@torch.no_grad()
def _torch_segment_logits(model: GPT, segments: np.ndarray) -> np.ndarray:
    logits, _ = model(torch.from_numpy(segments))  # (R, L, V)
    return logits[:, :-1].numpy()  # the logits that predict tokens 1..L-1


def _ppl(logits: np.ndarray, segments: np.ndarray) -> float:
    """exp(mean NLL) of segments[:, 1:] under logits (R, L-1, V)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, segments[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


class _StaticRun:
    """The validation scenarios through OrtRuntime.step and a KVPool (the serving path)."""

    def __init__(self, runtime: OrtRuntime, config: GPTConfig) -> None:
        self.rt, self.config = runtime, config

    def _pool(self, sequences: int):
        return self.rt.new_pool(max_sequences=sequences, max_length=self.config.n_positions)

    def _step(self, pool, tokens: np.ndarray, slot: int, past: Sequence[int]) -> np.ndarray:
        return self.rt.step(tokens, pool=pool, slot_start=slot, past_lengths=np.asarray(past)).copy()

    def _sequence(self, pool, slot: int, prompt: list[int], fed: list[int]) -> np.ndarray:
        out = [self._step(pool, np.array([prompt]), slot, [0])[0]]
        for i, token in enumerate(fed):
            out.append(self._step(pool, np.array([[token]]), slot, [len(prompt) + i])[0])
        return np.stack(out)

    def prefill_decode(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        pool = self._pool(len(prompts))
        refs, gots = [], []
        for slot, prompt in enumerate(prompts):
            fed, ref = _torch_teacher_forced(model, prompt, DECODE_STEPS)
            refs.append(ref)
            gots.append(self._sequence(pool, slot, prompt, fed))
        return np.concatenate(refs), np.concatenate(gots)

    def empty_past(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # slot 0 first holds the longer prompt's sequence; it is freed and reused for the shorter
        # one, whose prefill must ignore the stale keys beyond its length
        pool = self._pool(1)
        long, short = max(prompts, key=len), min(prompts, key=len)
        if len(short) == len(long):
            short = long[: max(1, len(long) // 2)]
        fed, _ = _torch_teacher_forced(model, long, 4)
        slot = pool.allocate()
        self._sequence(pool, slot, long, fed)
        pool.free(slot)
        slot = pool.allocate()
        fed, ref = _torch_teacher_forced(model, short, 4)
        return ref, self._sequence(pool, slot, short, fed)

    def batched_lengths(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # slots 0, 2, 3 hold prompts of different lengths; slot 1 is free and rides along
        rows = {0: prompts[0], 2: prompts[-1], 3: prompts[0][: max(1, len(prompts[0]) // 2)]}
        pool = self._pool(4)
        for slot in range(4):
            pool.allocate()
        pool.free(1)
        steps = 4
        fed = {}
        refs = {}
        for slot, prompt in rows.items():
            fed[slot], refs[slot] = _torch_teacher_forced(model, prompt, steps)
            self._step(pool, np.array([prompt]), slot, [0])  # prefill alone, as the scheduler does
        gots: dict[int, list[np.ndarray]] = {slot: [] for slot in rows}
        for i in range(steps):
            tokens = np.array([[fed[s][i] if s in rows else 0] for s in range(4)])
            past = [len(rows[s]) + i if s in rows else 0 for s in range(4)]
            logits = self._step(pool, tokens, 0, past)
            for slot in rows:
                gots[slot].append(logits[slot])
        ref = np.concatenate([refs[s][1:] for s in rows])
        got = np.concatenate([np.stack(gots[s]) for s in rows])
        return ref, got

    def perplexity(self, model: GPT, text_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, PerplexityResult]:
        segments = _segments(self.config, text_tokens)
        rows, length = segments.shape
        pool = self._pool(rows)
        got = np.stack([self._step(pool, segments[:, t : t + 1], 0, [t] * rows)
                        for t in range(length - 1)], axis=1)  # (R, L-1, V)
        ref = _torch_segment_logits(model, segments)
        ppl = PerplexityResult(tokens=rows * (length - 1), ppl_torch=_ppl(ref, segments), ppl_onnx=_ppl(got, segments))
        return ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), ppl


class _DynamicRun:
    """The validation scenarios through OrtRuntime.run with past ++ new."""

    def __init__(self, runtime: OrtRuntime, config: GPTConfig) -> None:
        self.rt, self.config = runtime, config

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {tensors.INPUT_IDS: ids.astype(np.int64), tensors.POSITION_IDS: positions.astype(np.int64),
                 tensors.ATTENTION_MASK: mask.astype(np.int64), **past}
        out = self.rt.run(feeds)
        present = {}
        for i in range(self.rt.n_layer):
            present[tensors.past_key(i)] = out[tensors.present_key(i)]
            present[tensors.past_value(i)] = out[tensors.present_value(i)]
        return out[tensors.LOGITS], present

    def _sequence(self, prompt: list[int], fed: list[int]) -> np.ndarray:
        ids = np.array([prompt])
        mask = np.ones_like(ids)
        logits, past = self._run(ids, mask, np.arange(len(prompt))[None], self.rt.empty_past(1))
        out = [logits[0]]
        for token in fed:
            n = mask.shape[1]
            mask = np.ones((1, n + 1), dtype=np.int64)
            logits, past = self._run(np.array([[token]]), mask, np.array([[n]]), past)
            out.append(logits[0])
        return np.stack(out)

    def prefill_decode(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        refs, gots = [], []
        for prompt in prompts:
            fed, ref = _torch_teacher_forced(model, prompt, DECODE_STEPS)
            refs.append(ref)
            gots.append(self._sequence(prompt, fed))
        return np.concatenate(refs), np.concatenate(gots)

    def empty_past(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # a batch of two rows through an explicit zero-length past (prefill_decode has B=1)
        prompt = prompts[0]
        ids = np.array([prompt, prompt[::-1]])
        logits, _ = self._run(ids, np.ones_like(ids), np.tile(np.arange(ids.shape[1]), (2, 1)),
                              self.rt.empty_past(2))
        with torch.no_grad():
            ref, _ = model(torch.from_numpy(ids), past_key_values=model.empty_past(2), last_only=True)
        return ref.numpy(), logits

    def batched_lengths(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # left padding: row b is (pad ... pad, prompt_b); positions count real tokens only
        rows = [prompts[0], prompts[-1], prompts[0][: max(1, len(prompts[0]) // 2)]]
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, prompt in enumerate(rows):
            ids[b, width - len(prompt):] = prompt
            mask[b, width - len(prompt):] = 1
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
        steps = 4
        fed, refs = zip(*(_torch_teacher_forced(model, p, steps) for p in rows))
        logits, past = self._run(ids, mask, positions, self.rt.empty_past(len(rows)))
        got = [logits]
        next_pos = positions[:, -1] + 1
        for i in range(steps):
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            tokens = np.array([[f[i]] for f in fed])
            logits, past = self._run(tokens, mask, next_pos[:, None] + i, past)
            got.append(logits)
        got_arr = np.stack(got, axis=1)  # (R, steps + 1, V)
        return np.concatenate(refs), got_arr.reshape(-1, got_arr.shape[-1])

    def perplexity(self, model: GPT, text_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, PerplexityResult]:
        segments = _segments(self.config, text_tokens)
        rows, length = segments.shape
        past = self.rt.empty_past(rows)
        got = []
        for t in range(length - 1):
            logits, past = self._run(segments[:, t : t + 1], np.ones((rows, t + 1)), np.full((rows, 1), t), past)
            got.append(logits)
        got_arr = np.stack(got, axis=1)
        ref = _torch_segment_logits(model, segments)
        ppl = PerplexityResult(tokens=rows * (length - 1), ppl_torch=_ppl(ref, segments), ppl_onnx=_ppl(got_arr, segments))
        return ref.reshape(-1, ref.shape[-1]), got_arr.reshape(-1, got_arr.shape[-1]), ppl
