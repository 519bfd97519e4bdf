"""The TensorRT engine builder (GPU): builder + OnnxParser, one optimisation profile per phase,
precision flags, a timing cache, rich build progress, and the engine's summary written next to it.
The CPU checks (export/tensorrt/coverage.py) run first, before TensorRT is imported."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from export.tensorrt.coverage import check_onnx_for_tensorrt, graph_facts
from serving import tensors
from serving.engine.contract import TENSORRT_SUFFIXES
from serving.engine.gpu_libs import import_cudart, import_tensorrt
from serving.engine.profiles import Profile, check_profiles, default_profiles
from serving.repository import ServingOptions

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8")
QUANTIZED_PRECISIONS = ("fp8", "int8")
OPT_LEVELS = range(0, 6)  # TensorRT's builder optimisation levels; 3 is its default
DEFAULT_OPT_LEVEL = 3
DEFAULT_MAX_BATCH = ServingOptions().max_sequences  # the repository's default KV-pool slots


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine (its messages are included)."""



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
    """Build `out_path` (.plan) from the dynamic-cache ONNX at `onnx_path`; see export/tensorrt/__init__.py.

    profiles: default `default_profiles(n_positions, max_batch)`. timing_cache: a file read if it
    exists and written after the build (reuses kernel timings across builds on the same GPU).
    Raises UnsupportedGraphError / ValueError on CPU before TensorRT is touched,
    TensorRTUnavailableError without TensorRT, EngineBuildError when TensorRT fails."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if opt_level not in OPT_LEVELS:
        raise ValueError(f"opt_level must be in {OPT_LEVELS.start}..{OPT_LEVELS.stop - 1}, got {opt_level}")
    if out_path.suffix not in TENSORRT_SUFFIXES:
        raise ValueError(f"out_path must end in one of {TENSORRT_SUFFIXES}, got {out_path}")
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

