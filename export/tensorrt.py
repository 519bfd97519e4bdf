"""ONNX -> TensorRT engine (needs an NVIDIA GPU and TensorRT), and the checks that run on CPU.

TensorRT builds from the portable graph, `export_onnx(..., kv_cache="dynamic")`: standard ONNX
ops, past ++ new by Concat. (The static-cache graph uses ONNX Runtime's
com.microsoft::GroupQueryAttention, which TensorRT's ONNX parser has no importer for.)

On CPU, before any GPU is involved (and in CI):
- `check_onnx_for_tensorrt`: every node is an ONNX-standard op that TensorRT's ONNX parser
  supports, with a supported data type and opset, for the pinned TensorRT release
  (export/data/tensorrt_onnx_ops.json: onnx-tensorrt's docs/operators.md of that release);
- `serving.runtime_trt.check_profiles`: the optimisation profiles cover the KV pool and
  config.pbtxt's max_batch_size.

On a GPU, `build_engine`: builder + OnnxParser; one optimisation profile per phase (decode:
T == 1 up to max_batch rows; prefill: prompts), precision flags, a timing cache, the builder
optimisation level, optionally a version-compatible engine; progress through an
IProgressMonitor that drives a rich progress bar; a summary from the engine inspector.

Precisions: fp32, fp16 and bf16 build from the fp32 (or fp16) ONNX with TensorRT's precision
flags; the KV cache I/O is fp16 for every precision but fp32 (half the pool), logits stay fp32
(the tensor table). In fp16, TensorRT's LayerNorm layers are asked to stay fp32 (GPT-2's
activations overflow fp16 in the mean of squares). int8 and fp8 need an explicitly quantized
graph (QuantizeLinear/DequantizeLinear, e.g. from NVIDIA ModelOpt): TensorRT 10 has no implicit
int8 for graphs without them, and gptpipe's own int8 ONNX (ONNX Runtime's dynamic quantization,
DynamicQuantizeLinear + MatMulInteger) is not parseable by TensorRT at all.
"""

from __future__ import annotations

import functools
import json
import logging
import string
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence

import onnx
import typer

from serving import tensors
from serving.repository import ServingOptions, io_section, parse_config
from serving.runtime_trt import (
    TENSORRT_PIP,
    TENSORRT_VERSION,
    AxisRange,
    Profile,
    TensorRTUnavailableError,
    check_profiles,
    default_profiles,
    import_tensorrt,
)

logger = logging.getLogger(__name__)

OPS_FILE = Path(__file__).parent / "data" / "tensorrt_onnx_ops.json"
NATIVE_TEMPLATE = Path(__file__).parent.parent / "serving" / "templates" / "gpt_trt" / "config.pbtxt"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8")
QUANTIZED_PRECISIONS = ("fp8", "int8")
OPT_LEVELS = range(0, 6)  # TensorRT's builder optimisation levels; 3 is its default
DEFAULT_OPT_LEVEL = 3
DEFAULT_MAX_BATCH = ServingOptions().max_sequences  # the repository's default KV-pool slots
ENGINE_SUFFIXES = (".plan", ".engine")
GQA = "GroupQueryAttention"


class UnsupportedGraphError(ValueError):
    """The ONNX graph has something TensorRT's ONNX parser (pinned version) cannot import."""

    def __init__(self, report: "CompatibilityReport") -> None:
        self.report = report
        lines = "\n".join(f"  - {p.message}" for p in report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        super().__init__(f"{report.model}: {len(report.problems)} problem(s) for TensorRT {report.tensorrt_version}'s "
                         f"ONNX parser (operator list: {report.source_url}):\n{lines}{more}")


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine (its messages are included)."""


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


# ---------------------------------------------------------------------------- model facts, profiles


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


SHAPE_AXES = ("batch", "seq", "past")


def parse_shape_spec(text: Optional[str], *, flag: str) -> dict[str, int]:
    """`batch=1,seq=1,past=0` -> {"batch": 1, "seq": 1, "past": 0}; any subset of the axes."""
    if not text:
        return {}
    out: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in SHAPE_AXES:
            raise ValueError(f"{flag}: {part.strip()!r} is not AXIS=N with AXIS one of {', '.join(SHAPE_AXES)}")
        if key in out:
            raise ValueError(f"{flag}: {key} given twice")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{flag}: {key}={value!r} is not an integer") from None
        if out[key] < 0:
            raise ValueError(f"{flag}: {key}={out[key]} must be >= 0")
    return out


def profiles_from_flags(*, n_positions: int, max_batch: int, min_shapes: Optional[str] = None,
                        opt_shapes: Optional[str] = None, max_shapes: Optional[str] = None) -> tuple[Profile, ...]:
    """No flags: the two default profiles (decode, prefill). Any flag: ONE profile, the given
    values over these defaults — min batch 1, seq 1, past 0; opt batch max_batch, seq 1, past
    n_positions // 2; max batch max_batch, seq n_positions, past n_positions - 1."""
    lo = parse_shape_spec(min_shapes, flag="--min-shapes")
    opt = parse_shape_spec(opt_shapes, flag="--opt-shapes")
    hi = parse_shape_spec(max_shapes, flag="--max-shapes")
    if not (lo or opt or hi):
        return default_profiles(n_positions=n_positions, max_batch=max_batch)
    lo = {"batch": 1, "seq": 1, "past": 0, **lo}
    opt = {"batch": max_batch, "seq": 1, "past": n_positions // 2, **opt}
    hi = {"batch": max_batch, "seq": n_positions, "past": n_positions - 1, **hi}
    ranges = {}
    for axis in SHAPE_AXES:
        try:
            ranges[axis] = AxisRange(lo[axis], opt[axis], hi[axis])
        except ValueError:
            raise ValueError(f"{axis}: --min-shapes/--opt-shapes/--max-shapes give {lo[axis]} / {opt[axis]} / "
                             f"{hi[axis]}; need min <= opt <= max") from None
    return (Profile("custom", **ranges),)


# ---------------------------------------------------------------------------- progress


class BuildProgress:
    """TensorRT's build phases as rich progress tasks (nested phases indented). TensorRT calls
    from several threads, hence the lock. `cancel()` makes the next step_complete stop the build."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self._tasks: dict[str, Any] = {}
        self._depth: dict[str, int] = {}
        self._lock = threading.Lock()
        self.cancelled = False
        self.phases_seen: list[str] = []

    def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
        with self._lock:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self.phases_seen.append(phase_name)
            self._tasks[phase_name] = self.progress.add_task("  " * depth + phase_name, total=max(num_steps, 1))

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            task = self._tasks.get(phase_name)
            if task is not None:
                self.progress.update(task, completed=step + 1)
            return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            task = self._tasks.pop(phase_name, None)
            self._depth.pop(phase_name, None)
            if task is not None:
                self.progress.remove_task(task)

    def cancel(self) -> None:
        self.cancelled = True


def _progress_monitor(trt: Any, tracker: BuildProgress) -> Any:
    """An IProgressMonitor (defined here: the base class only exists with tensorrt imported)."""

    class RichProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):  # noqa: ANN001
            tracker.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):  # noqa: ANN001
            return tracker.step_complete(phase_name, step)

        def phase_finish(self, phase_name):  # noqa: ANN001
            tracker.phase_finish(phase_name)

    return RichProgressMonitor()


def _trt_logger(trt: Any) -> Any:
    """A TensorRT logger into `logging` that keeps errors for the exception message."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: ANN001
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                logger.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return Logger()


# ---------------------------------------------------------------------------- build


@dataclass(frozen=True)
class EngineSummary:
    path: str
    bytes: int
    precision: str
    tensorrt_version: str
    device: str
    layers: int
    layer_precisions: Mapping[str, int]  # layers by the data type of their first output
    profiles: tuple[Profile, ...]
    io: tuple[Mapping[str, Any], ...]  # name, mode, dtype, shape (-1: dynamic)
    opt_level: int
    version_compatible: bool
    timing_cache: Optional[str]
    build_seconds: float
    config: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["profiles"] = [p.to_dict() for p in self.profiles]
        return out


def engine_metadata_path(engine_path: Path) -> Path:
    """The JSON written next to an engine: its summary, profiles and the model config."""
    return Path(engine_path).with_name(Path(engine_path).name + ".json")


def layer_precision(layer: Mapping[str, Any]) -> str:
    """The data type of a layer's first output, from the inspector's JSON (DETAILED verbosity),
    e.g. "Format/Datatype": "Row major linear FP16 format"."""
    outputs = layer.get("Outputs") or []
    text = str(outputs[0].get("Format/Datatype", "")) if outputs and isinstance(outputs[0], Mapping) else ""
    low = text.lower()
    for needle, name in (("bf16", "bf16"), ("fp16", "fp16"), ("half", "fp16"), ("fp8", "fp8"), ("int8", "int8"),
                         ("int64", "int64"), ("int32", "int32"), ("bool", "bool"), ("fp32", "fp32"), ("float", "fp32")):
        if needle in low:
            return name
    return "unknown"


def summarize_layers(info: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    layers = info.get("Layers") or []
    counts: dict[str, int] = {}
    for layer in layers:
        key = layer_precision(layer) if isinstance(layer, Mapping) else "unknown"
        counts[key] = counts.get(key, 0) + 1
    return len(layers), dict(sorted(counts.items()))


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    precision: str = "fp16",
    profiles: Optional[Sequence[Profile]] = None,
    opt_level: int = DEFAULT_OPT_LEVEL,
    version_compatible: bool = False,
    timing_cache: Optional[str | Path] = None,
    progress: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_gib: Optional[float] = None,
) -> EngineSummary:
    """Build `out_path` (.plan) from the dynamic-cache ONNX at `onnx_path`; see the module docstring.

    profiles: default `default_profiles(n_positions, max_batch)`. timing_cache: a file read if it
    exists and written after the build (reuses kernel timings across builds on the same GPU).
    Raises UnsupportedGraphError / ValueError on CPU before TensorRT is touched,
    TensorRTUnavailableError without TensorRT, EngineBuildError when TensorRT fails."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if opt_level not in OPT_LEVELS:
        raise ValueError(f"opt_level must be in {OPT_LEVELS.start}..{OPT_LEVELS.stop - 1}, got {opt_level}")
    if out_path.suffix not in ENGINE_SUFFIXES:
        raise ValueError(f"out_path must end in one of {ENGINE_SUFFIXES}, got {out_path}")
    facts = graph_facts(onnx_path)
    report = check_onnx_for_tensorrt(onnx_path)
    report.raise_if_problems()
    if precision in QUANTIZED_PRECISIONS and not facts.has_qdq:
        raise ValueError(f"precision {precision} needs an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear "
                         f"nodes, e.g. from NVIDIA ModelOpt); {onnx_path.name} has none. TensorRT 10 builds "
                         "fp32/fp16/bf16 from gptpipe's float exports")
    profiles = tuple(profiles or default_profiles(n_positions=facts.n_positions, max_batch=max_batch))
    trt = import_tensorrt()

    t0 = time.perf_counter()
    trt_logger = _trt_logger(trt)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    logger.info("parsing %s with TensorRT %s's ONNX parser", onnx_path, trt.__version__)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors or trt_logger.errors))

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer types in the inspector
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    _set_precision(trt, network, config, precision, n_layer=facts.n_layer)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes(facts.n_layer, facts.n_head, facts.head_dim).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = _build(trt, builder, network, config, progress=progress)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {out_path.name}:\n  " + "\n  ".join(trt_logger.errors))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0
    summary = _summarize(trt, trt_logger, serialized, out_path, precision=precision, profiles=profiles,
                         opt_level=opt_level, version_compatible=version_compatible,
                         timing_cache=str(cache_path) if cache_path else None, seconds=seconds,
                         config=facts.config)
    engine_metadata_path(out_path).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    logger.info("wrote %s (%.1f MiB) in %.0f s", out_path, summary.bytes / 2**20, seconds)
    return summary


def kv_io_dtype(precision: str) -> str:
    """The KV cache I/O type of an engine built at `precision` (numpy name)."""
    return "float32" if precision == "fp32" else "float16"


def _set_precision(trt: Any, network: Any, config: Any, precision: str, *, n_layer: int) -> None:
    flags = {"fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}.get(precision, [])
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # the reference precision means fp32 math
    kv = trt.float32 if kv_io_dtype(precision) == "float32" else trt.float16
    kv_names = {n for pair in tensors.kv_pairs(n_layer) for n in pair}
    for tensor in [network.get_input(i) for i in range(network.num_inputs)] + \
                  [network.get_output(i) for i in range(network.num_outputs)]:
        if tensor.name in kv_names:
            tensor.dtype = kv  # network I/O types are ours to choose; the pool holds this type
        elif tensor.name == tensors.LOGITS:
            tensor.dtype = trt.float32
    if precision == "fp16":
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)


def _build(trt: Any, builder: Any, network: Any, config: Any, *, progress: bool) -> Any:
    if not progress:
        return builder.build_serialized_network(network, config)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        tracker = BuildProgress(bar)
        config.progress_monitor = _progress_monitor(trt, tracker)
        overall = bar.add_task("building TensorRT engine", total=None)
        try:
            return builder.build_serialized_network(network, config)
        finally:
            bar.remove_task(overall)


def _summarize(trt: Any, trt_logger: Any, serialized: Any, out_path: Path, *, precision: str,
               profiles: Sequence[Profile], opt_level: int, version_compatible: bool,
               timing_cache: Optional[str], seconds: float, config: Mapping[str, Any]) -> EngineSummary:
    runtime = trt.Runtime(trt_logger)
    runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers, by_type = summarize_layers(info)
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({"name": name, "mode": engine.get_tensor_mode(name).name,
                   "dtype": engine.get_tensor_dtype(name).name, "shape": list(engine.get_tensor_shape(name))})
    return EngineSummary(path=str(out_path), bytes=out_path.stat().st_size, precision=precision,
                         tensorrt_version=trt.__version__, device=_device_name(), layers=layers,
                         layer_precisions=by_type, profiles=tuple(profiles), io=tuple(io), opt_level=opt_level,
                         version_compatible=version_compatible, timing_cache=timing_cache,
                         build_seconds=round(seconds, 1), config=dict(config))


def _device_name() -> str:
    try:
        from serving.runtime_trt import import_cudart

        cudart = import_cudart()
        err, props = cudart.cudaGetDeviceProperties(0)
        name = props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except Exception:  # the summary is still useful without the device name
        return "unknown"


def read_engine_metadata(engine_path: str | Path) -> dict[str, Any]:
    path = engine_metadata_path(Path(engine_path))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (build_engine writes it next to the engine)")
    return json.loads(path.read_text())


def check_engine_for_repository(engine_path: str | Path, *, options: ServingOptions) -> None:
    """On CPU: the engine's recorded profiles cover the repository's KV pool (max_sequences
    slots x n_positions) and config.pbtxt's max_batch_size."""
    meta = read_engine_metadata(engine_path)
    n_positions = int(meta["config"]["n_positions"])
    check_profiles([Profile.from_dict(p) for p in meta["profiles"]], n_positions=n_positions,
                   max_sequences=options.max_sequences, max_length=n_positions)


# ---------------------------------------------------------------------------- the native flavour


def render_native_config(*, model_config: Mapping[str, Any], kv_dtype: str,
                         options: ServingOptions = ServingOptions(), engine_file: str = "model.plan") -> str:
    """config.pbtxt of `gpt` served by Triton's TensorRT backend (platform tensorrt_plan), the KV
    cache as Triton implicit state (sequence-batcher `state`: past_key_values.* in, present.* out).
    The client sends the graph's own inputs (input_ids, position_ids, attention_mask); see
    serving/templates/gpt_trt/config.pbtxt for what this flavour does not do."""
    c = model_config
    n_layer, n_head = int(c["n_layer"]), int(c["n_head"])
    head_dim = int(c["n_embd"]) // n_head
    sizes = {tensors.VOCAB: int(c["vocab_size"])}
    graph_in = tensors.graph_inputs(n_layer, n_head, head_dim, kv_dtype=kv_dtype, kv_cache="dynamic")
    graph_out = tensors.graph_outputs(n_layer, n_head, head_dim, int(c["vocab_size"]), kv_dtype=kv_dtype,
                                      logits_dtype="float32", kv_cache="dynamic")
    kv_names = {n for pair in tensors.kv_pairs(n_layer) for n in pair}
    # config.pbtxt dims leave out the batch axis (max_batch_size > 0 adds it)
    inputs = [tensors.TensorSpec(s.name, s.dtype, s.shape[1:]) for s in graph_in if s.name not in kv_names]
    outputs = [tensors.TensorSpec(s.name, s.dtype, s.shape[1:]) for s in graph_out if s.name not in kv_names]
    by_name = {s.name: s for s in graph_in + graph_out}
    states = []
    for past, present in tensors.kv_pairs(n_layer):
        spec = by_name[past]
        dims = ", ".join(str(d) for d in spec.dims())  # (-1, nh, -1, hs) -> leave out the batch
        dims = dims.split(", ", 1)[1]
        empty = ", ".join(str(d) for d in (n_head, 0, head_dim))
        states.append(f'    {{ input_name: "{past}" output_name: "{present}" data_type: {spec.config_data_type} '
                      f'dims: [ {dims} ] initial_state {{ data_type: {spec.config_data_type} dims: [ {empty} ] '
                      f'zero_data: true name: "empty past" }} }}')
    template = string.Template(NATIVE_TEMPLATE.read_text())
    text = template.safe_substitute(
        inputs=io_section("input", inputs, sizes), outputs=io_section("output", outputs, sizes),
        states="  state [\n" + ",\n".join(states) + "\n  ]", max_sequences=options.max_sequences,
        max_candidate_sequences=options.max_sequences,
        max_sequence_idle_microseconds=options.max_sequence_idle_microseconds,
        max_queue_delay_microseconds=options.max_queue_delay_microseconds, engine_file=engine_file)
    parse_config(text)  # Triton's own schema
    return text


# ---------------------------------------------------------------------------- CLI


def _console():
    from rich.console import Console

    return Console()


def print_summary(summary: EngineSummary) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"TensorRT engine {Path(summary.path).name}", show_header=False)
    table.add_row("size", f"{summary.bytes / 2**20:.1f} MiB")
    table.add_row("TensorRT / GPU", f"{summary.tensorrt_version} / {summary.device}")
    table.add_row("precision", f"{summary.precision} (opt level {summary.opt_level}"
                  f"{', version-compatible' if summary.version_compatible else ''})")
    table.add_row("layers", f"{summary.layers}: " + ", ".join(f"{k} {v}" for k, v in summary.layer_precisions.items()))
    for p in summary.profiles:
        table.add_row(f"profile {p.name}", f"batch {p.batch.min}/{p.batch.opt}/{p.batch.max}  "
                      f"seq {p.seq.min}/{p.seq.opt}/{p.seq.max}  past {p.past.min}/{p.past.opt}/{p.past.max}")
    table.add_row("build", f"{summary.build_seconds:.0f} s" + (f", timing cache {summary.timing_cache}"
                                                                if summary.timing_cache else ""))
    console.print(table)


OnnxArg = Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                          help="The dynamic-cache ONNX (export-model ... --kv-cache dynamic).")]
OutOption = Annotated[Optional[Path], typer.Option("--out", "-o", help="Engine file (.plan); default: next to the ONNX.")]
PrecisionOption = Annotated[str, typer.Option("--precision", help=f"One of {', '.join(PRECISIONS)} "
                                              "(fp8/int8 need a Q/DQ-quantized ONNX).")]
MinShapesOption = Annotated[Optional[str], typer.Option("--min-shapes", help="One custom profile: minima, e.g. batch=1,seq=1,past=0.")]
OptShapesOption = Annotated[Optional[str], typer.Option("--opt-shapes", help="One custom profile: the shapes TensorRT tunes for.")]
MaxShapesOption = Annotated[Optional[str], typer.Option("--max-shapes", help="One custom profile: maxima, e.g. batch=16,seq=1024,past=1023.")]
MaxBatchOption = Annotated[int, typer.Option("--max-batch", min=1, help="Largest batch of the default profiles "
                                             "(>= the repository's max sequences).")]
OptLevelOption = Annotated[int, typer.Option("--opt-level", min=0, max=5, help="Builder optimisation level 0-5 "
                                             "(higher: slower build, maybe a faster engine).")]
VersionCompatibleOption = Annotated[bool, typer.Option("--version-compatible", help="An engine later TensorRT versions "
                                                       "can run (lean runtime inside; python-backend flavour).")]
TimingCacheOption = Annotated[Optional[Path], typer.Option("--timing-cache", help="Timing cache file: read if present, "
                                                           "written after the build.")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar during the build.")]
CheckOnlyOption = Annotated[bool, typer.Option("--check-only", help="Only the CPU checks (ops, dtypes, profiles): "
                                               "no GPU or TensorRT needed.")]


def build_engine_command(
    onnx_path: OnnxArg,
    out: OutOption = None,
    precision: PrecisionOption = "fp16",
    min_shapes: MinShapesOption = None,
    opt_shapes: OptShapesOption = None,
    max_shapes: MaxShapesOption = None,
    max_batch: MaxBatchOption = DEFAULT_MAX_BATCH,
    opt_level: OptLevelOption = DEFAULT_OPT_LEVEL,
    version_compatible: VersionCompatibleOption = False,
    timing_cache: TimingCacheOption = None,
    progress: ProgressOption = True,
    check_only: CheckOnlyOption = False,
) -> None:
    """Build a TensorRT engine from a dynamic-cache ONNX export (needs a GPU; --check-only runs the CPU checks).

    Example: gptpipe build-engine out/gpt_dynamic.onnx --out out/gpt.plan --precision fp16 --max-batch 16

    Example: gptpipe build-engine out/gpt_dynamic.onnx --check-only
    """
    try:
        facts = graph_facts(onnx_path)
        profiles = profiles_from_flags(n_positions=facts.n_positions, max_batch=max_batch, min_shapes=min_shapes,
                                       opt_shapes=opt_shapes, max_shapes=max_shapes)
        report = check_onnx_for_tensorrt(onnx_path)
        report.raise_if_problems()
        if precision not in PRECISIONS:
            raise typer.BadParameter(f"must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                                     param_hint="--precision")
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, typer.BadParameter):
            raise
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"{onnx_path.name}: {sum(report.op_counts.values())} nodes of {len(report.op_counts)} op types, all "
               f"supported by TensorRT {report.tensorrt_version}'s ONNX parser")
    for p in profiles:
        typer.echo(f"  profile {p.name}: batch {p.batch.min}/{p.batch.opt}/{p.batch.max}, seq "
                   f"{p.seq.min}/{p.seq.opt}/{p.seq.max}, past {p.past.min}/{p.past.opt}/{p.past.max}")
    if check_only:
        return
    out = out or onnx_path.with_suffix(".plan")
    try:
        summary = build_engine(onnx_path, out, precision=precision, profiles=profiles, opt_level=opt_level,
                               version_compatible=version_compatible, timing_cache=timing_cache,
                               progress=progress, max_batch=max_batch)
    except TensorRTUnavailableError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from e
    except (ValueError, EngineBuildError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    print_summary(summary)
