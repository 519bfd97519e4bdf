"""On CPU, before any GPU: can TensorRT's ONNX parser (the pinned release) import this graph?
Every node an ONNX-standard op it supports, with a supported data type and opset (the operator
list: export/data/tensorrt_onnx_ops.json); and what the exported graph says about itself."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import onnx

logger = logging.getLogger(__name__)

OPS_FILE = Path(__file__).parent.parent / "data" / "tensorrt_onnx_ops.json"
GQA = "GroupQueryAttention"


class UnsupportedGraphError(ValueError):
    """The ONNX graph has something TensorRT's ONNX parser (pinned version) cannot import."""

    def __init__(self, report: "CompatibilityReport") -> None:
        self.report = report
        lines = "\n".join(f"  - {p.message}" for p in report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        super().__init__(f"{report.model}: {len(report.problems)} problem(s) for TensorRT {report.tensorrt_version}'s "
                         f"ONNX parser (operator list: {report.source_url}):\n{lines}{more}")



# ---------------------------------------------------------------------------- the operator list


@dataclass(frozen=True)
class OperatorSupport:
    supported: bool
    types: tuple[str, ...]
    restrictions: str = ""


@dataclass(frozen=True)
class SupportedOps:
    tensorrt_version: str
    source: Mapping[str, str]
    opset_min: int
    opset_max: int
    data_types: tuple[str, ...]
    operators: Mapping[str, OperatorSupport]


@functools.lru_cache(maxsize=4)
def load_supported_ops(path: Path = OPS_FILE) -> SupportedOps:
    data = json.loads(Path(path).read_text())
    return SupportedOps(
        tensorrt_version=data["tensorrt_version"], source=data["source"], opset_min=int(data["opset_min"]),
        opset_max=int(data["opset_max"]), data_types=tuple(data["data_types"]),
        operators={name: OperatorSupport(bool(op["supported"]), tuple(op["types"]), op.get("restrictions", ""))
                   for name, op in data["operators"].items()})


# ONNX element type -> the names operators.md uses
_TRT_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT4: "INT4",
}
_IO_TYPES = ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8")
# Which inputs carry the data type the "Supported Types" column is about (indices, shapes, axes and
# conditions are other operands). Everything else: input 0.
_DATA_INPUTS = {"Where": (1, 2)}


@dataclass(frozen=True)
class GraphProblem:
    kind: str  # "domain" | "operator" | "dtype" | "restriction" | "opset" | "io"
    op_type: str
    node: str
    message: str


@dataclass(frozen=True)
class CompatibilityReport:
    model: str
    tensorrt_version: str
    source_url: str
    op_counts: Mapping[str, int]
    problems: tuple[GraphProblem, ...]
    unchecked_types: int = 0  # nodes whose data type shape inference could not tell

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        if self.problems:
            raise UnsupportedGraphError(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    # types and attributes are all the checks need: leave external weights on disk
    return onnx.load(str(path), load_external_data=False), path.name


def _value_types(proto: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as e:  # a graph ONNX cannot infer still gets its declared types checked
        logger.warning("ONNX shape inference failed (%s); checking declared types only", e)
        inferred = proto
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return {k: v for k, v in types.items() if v}


def check_onnx_for_tensorrt(model: onnx.ModelProto | str | Path, *,
                            ops: Optional[SupportedOps] = None) -> CompatibilityReport:
    """Every node an ONNX-standard op that TensorRT's ONNX parser supports (pinned version), with a
    data type it lists for that op; the opset in its range; graph I/O types it can bind; and the
    restrictions that matter for gptpipe's graphs (Squeeze/Unsqueeze axes constant, LayerNormalization
    with one output). Returns a report; `report.raise_if_problems()` raises UnsupportedGraphError."""
    ops = ops or load_supported_ops()
    proto, name = _load(model)
    graph = proto.graph
    types = _value_types(proto)
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    problems: list[GraphProblem] = []
    counts: dict[str, int] = {}
    unchecked = 0

    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not ops.opset_min <= opset.version <= ops.opset_max:
            problems.append(GraphProblem("opset", "", "", f"opset {opset.version} is outside TensorRT "
                                         f"{ops.tensorrt_version}'s range {ops.opset_min}..{ops.opset_max}"))
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            t = _TRT_TYPE_NAMES.get(value.type.tensor_type.elem_type, str(value.type.tensor_type.elem_type))
            if t not in _IO_TYPES:
                problems.append(GraphProblem("io", "", value.name, f"graph {kind} {value.name!r} has type {t}; "
                                             f"TensorRT binds {', '.join(_IO_TYPES)}"))

    for node in graph.node:
        domain = node.domain or "ai.onnx"
        key = node.op_type if domain == "ai.onnx" else f"{domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
        label = node.name or f"{node.op_type} -> {node.output[0] if node.output else '?'}"
        if domain != "ai.onnx":
            hint = (" (the static-cache graph: ONNX Runtime's in-place attention; TensorRT builds from "
                    "export_onnx(..., kv_cache='dynamic'))" if node.op_type == GQA else "")
            problems.append(GraphProblem("domain", key, label, f"{key} (node {label!r}) is not an ONNX-standard "
                                         f"operator: TensorRT's ONNX parser has no importer for it{hint}"))
            continue
        support = ops.operators.get(node.op_type)
        if support is None or not support.supported:
            state = "not in" if support is None else "marked unsupported in"
            problems.append(GraphProblem("operator", node.op_type, label, f"{node.op_type} (node {label!r}) is "
                                         f"{state} TensorRT {ops.tensorrt_version}'s operator list"))
            continue
        positions = _DATA_INPUTS.get(node.op_type, (0,))
        data = [node.input[i] for i in positions if i < len(node.input) and node.input[i]]
        if node.op_type == "Cast" and node.output:
            data.append(node.output[0])
        for tensor in data:
            if tensor not in types:
                unchecked += 1
                continue
            t = _TRT_TYPE_NAMES.get(types[tensor], onnx.TensorProto.DataType.Name(types[tensor]))
            if support.types and t not in support.types:
                problems.append(GraphProblem("dtype", node.op_type, label, f"{node.op_type} (node {label!r}) on "
                                             f"{t} ({tensor!r}); TensorRT {ops.tensorrt_version} supports "
                                             f"{', '.join(support.types)}"))
        if node.op_type in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] \
                and node.input[1] not in constants:
            problems.append(GraphProblem("restriction", node.op_type, label, f"{node.op_type} (node {label!r}): "
                                         f"axes {node.input[1]!r} must be a constant ({support.restrictions})"))
        if node.op_type == "LayerNormalization" and any(o and o in consumed for o in node.output[1:]):
            problems.append(GraphProblem("restriction", node.op_type, label, f"LayerNormalization (node {label!r}): "
                                         f"{support.restrictions}"))
    return CompatibilityReport(model=name, tensorrt_version=ops.tensorrt_version,
                               source_url=ops.source.get("url", ""), op_counts=dict(sorted(counts.items())),
                               problems=tuple(problems), unchecked_types=unchecked)



# ---------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class GraphFacts:
    """What the exported ONNX says about itself (export/onnx.py writes the metadata)."""

    config: Mapping[str, Any]
    kv_cache: str
    precision: str
    has_qdq: bool

    @property
    def n_layer(self) -> int:
        return int(self.config["n_layer"])

    @property
    def n_head(self) -> int:
        return int(self.config["n_head"])

    @property
    def head_dim(self) -> int:
        return int(self.config["n_embd"]) // int(self.config["n_head"])

    @property
    def n_positions(self) -> int:
        return int(self.config["n_positions"])


def graph_facts(model: onnx.ModelProto | str | Path) -> GraphFacts:
    proto, name = _load(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "gptpipe.config" not in meta:
        raise ValueError(f"{name} has no gptpipe metadata (gptpipe.config): export it with export-model")
    ops = {n.op_type for n in proto.graph.node}
    return GraphFacts(config=json.loads(meta["gptpipe.config"]), kv_cache=meta.get("gptpipe.kv_cache", "?"),
                      precision=meta.get("gptpipe.precision", "?"),
                      has_qdq={"QuantizeLinear", "DequantizeLinear"} <= ops)

