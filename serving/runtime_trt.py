"""TensorRT runtime: the same `step()` as `OrtRuntime`, over a TensorRT engine of the
dynamic-cache graph, with the KV pool in device memory (numpy, tensorrt, cuda-python; never torch).

TensorRT runs the portable graph (`kv_cache="dynamic"`: past ++ new by Concat; TensorRT's ONNX
parser has no GroupQueryAttention). That graph takes a dense past `(B, nh, P, hs)` and returns a
dense present `(B, nh, P + T, hs)`; the pool keeps `(S, nh, MAX, hs)` per layer. A step:

1. **gather**: rows `[slot_start, slot_start + B)`, columns `[0, P)` of each pool buffer into a
   dense staging past: ONE strided 2-D copy per layer and key/value (B * nh rows of P * hs);
2. **run** the engine with an execution context of the optimisation profile that holds
   `(B, T, P)`; decode steps (T == 1) replay a CUDA graph captured per `(profile, B, P)`;
3. **scatter**: the T new positions of each present into pool column `C` of every row, again ONE
   2-D copy per layer and key/value.

One copy per layer for the whole batch is possible because the new keys of all rows go to the
same pool column `C`, not to each row's own length: a row's cache may have holes. GPT-2's keys
carry no position (positions are added to the input embedding), so attention only needs to know
WHICH columns are valid, not where: a per-slot column map (`logical position -> pool column`,
host side) gives the attention mask, holes masked out. `C` is the first column past every valid
column of the rows in the batch. When `C + T` would pass the pool's end, the rows are compacted
first (rare: it takes a batch mixing long and short sequences for a long time).

The engine's past length `P` is `C` rounded up to a bucket (default 64 positions), so decode
shapes repeat and their CUDA graphs are reused; columns `[C, P)` are masked.

The step logic runs on any `Ops` (memory + copies) and `Engine`: `TrtRuntime` is
`PagedStepRuntime(TrtEngine, CudaOps)`; the tests run the very same logic as
`PagedStepRuntime(OrtEngine, HostOps)` on CPU (ONNX Runtime executing the same dynamic graph,
numpy buffers with the same byte offsets and pitches as the CUDA copies) against PyTorch.

Contract (as `OrtRuntime.step`): every row of the range gets its token(s) at logical positions
`[past_lengths[b], + T)`; a row that is not really stepping rides along with a dummy token that
its own next real step overwrites; `step` never changes `pool.lengths`. Unlike the static ORT
graph, any (B, T) mix is allowed (prompts after a past in a batch too).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from serving import tensors
from serving.kv_cache import KVPool

logger = logging.getLogger(__name__)

# The TensorRT release gptpipe builds with and serves: the same in export/tensorrt.py (builder),
# export/data/tensorrt_onnx_ops.json (the parser's operator list), docker/Dockerfile.tensorrt
# (Triton 24.11, TensorRT 10.6) and scripts/gpu_check.sh. An engine only runs on the TensorRT
# version that built it (unless built version-compatible, and then only on later ones).
TENSORRT_VERSION = "10.6"
# pip names on PyPI. The `tensorrt-cu12` sdist only adds the `tensorrt` module (a re-export of
# `tensorrt_bindings`); its own install step asks pypi.nvidia.com, which
# NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 skips: the two wheels come from PyPI by name.
TENSORRT_PIP = ("tensorrt-cu12==10.6.0", "tensorrt-cu12-libs==10.6.0", "tensorrt-cu12-bindings==10.6.0")
CUDA_PYTHON_PIP = "cuda-python>=12.3,<13"

DEFAULT_PAST_BUCKET = 64  # engine past lengths are multiples of this: decode shapes repeat
MAX_CUDA_GRAPHS = 256  # captured decode graphs kept (LRU)


class TensorRTUnavailableError(ImportError):
    """`tensorrt` (or cuda-python) is not installed, or no GPU: the message says what to do."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or TensorRTUnavailableError naming what to install."""
    try:
        import tensorrt as trt  # the tensorrt-cu12 metapackage
    except ImportError:
        try:
            import tensorrt_bindings as trt  # the bindings wheel alone
        except ImportError as e:
            raise TensorRTUnavailableError(
                f"TensorRT is not installed: it needs an NVIDIA GPU and TensorRT {TENSORRT_VERSION} "
                f"(NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 pip install {' '.join(TENSORRT_PIP)})") from e
    if not str(trt.__version__).startswith(TENSORRT_VERSION + "."):
        logger.warning("TensorRT %s is installed; gptpipe pins %s (engines only load on the version "
                       "that built them)", trt.__version__, TENSORRT_VERSION)
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime API module (both of its import paths)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python 12.x
        except ImportError as e:
            raise TensorRTUnavailableError(
                f"cuda-python is not installed (pip install '{CUDA_PYTHON_PIP}'): the TensorRT "
                "runtime uses it for device memory, copies, streams and CUDA graphs") from e
    return cudart


# ---------------------------------------------------------------------------- optimisation profiles


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one symbolic axis in an optimisation profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        for field in ("min", "opt", "max"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AxisRange.{field} must be an int >= 0, got {value!r}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"AxisRange needs min <= opt <= max, got {self.min} / {self.opt} / {self.max}")

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile over the graph's three symbolic sizes: batch rows,
    new tokens (sequence_length) and cached tokens (past_sequence_length)."""

    name: str
    batch: AxisRange
    seq: AxisRange
    past: AxisRange

    def __post_init__(self) -> None:
        if self.batch.min < 1 or self.seq.min < 1:
            raise ValueError(f"profile {self.name!r}: batch and seq minima must be >= 1, got "
                             f"batch {self.batch.min}, seq {self.seq.min}")

    def accepts(self, batch: int, seq: int, past: int) -> bool:
        return batch in self.batch and seq in self.seq and past in self.past

    def shapes(self, n_layer: int, n_head: int, head_dim: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every graph input, by the tensor table's names."""
        def at(k: str) -> tuple[tuple[int, ...], ...]:
            out = []
            for b, t, p in ((self.batch.min, self.seq.min, self.past.min),
                            (self.batch.opt, self.seq.opt, self.past.opt),
                            (self.batch.max, self.seq.max, self.past.max)):
                out.append({"ids": (b, t), "mask": (b, p + t), "kv": (b, n_head, p, head_dim)}[k])
            return tuple(out)

        shapes = {tensors.INPUT_IDS: at("ids"), tensors.POSITION_IDS: at("ids"),
                  tensors.ATTENTION_MASK: at("mask")}
        for i in range(n_layer):
            shapes[tensors.past_key(i)] = at("kv")
            shapes[tensors.past_value(i)] = at("kv")
        return shapes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        return cls(name=str(data["name"]), batch=AxisRange(**data["batch"]), seq=AxisRange(**data["seq"]),
                   past=AxisRange(**data["past"]))


def default_profiles(*, n_positions: int, max_batch: int) -> tuple[Profile, ...]:
    """Two profiles: `decode` (T == 1, up to max_batch rows, any past) and `prefill` (prompts of
    2..n_positions tokens, also after a past). TensorRT picks kernels for each profile's opt
    shape: full decode batches at half the context, one 128-token prompt."""
    if n_positions < 2:
        raise ValueError(f"n_positions must be >= 2 for a decode and a prefill profile, got {n_positions}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    decode = Profile("decode", batch=AxisRange(1, max_batch, max_batch), seq=AxisRange(1, 1, 1),
                     past=AxisRange(0, n_positions // 2, n_positions - 1))
    prefill = Profile("prefill", batch=AxisRange(1, 1, max_batch),
                      seq=AxisRange(2, min(128, n_positions), n_positions),
                      past=AxisRange(0, 0, n_positions - 2))
    return decode, prefill


def check_profiles(profiles: Sequence[Profile], *, n_positions: int, max_sequences: int,
                   max_length: int) -> None:
    """The profiles cover every call the scheduler makes for a pool of `max_sequences` slots x
    `max_length` positions (config.pbtxt's max_batch_size, the model's n_positions); ValueError
    naming the field and the limit otherwise."""
    if not profiles:
        raise ValueError("at least one optimisation profile is needed")
    if max_length > n_positions:
        raise ValueError(f"KV pool max_length {max_length} exceeds the model's n_positions {n_positions}")
    # decode: a batch of up to max_sequences rows, one token, past up to max_length - 1
    if not any(1 in p.seq and p.batch.min <= 1 and p.batch.max >= max_sequences and p.past.min == 0
               and p.past.max >= max_length - 1 for p in profiles):
        best = max((p.batch.max for p in profiles if 1 in p.seq), default=0)
        raise ValueError(
            f"no optimisation profile takes decode steps of up to max_sequences={max_sequences} rows "
            f"(config.pbtxt max_batch_size) x 1 token with past 0..{max_length - 1}; the largest decode "
            f"batch of the profiles is {best}: rebuild the engine with --max-batch {max_sequences}")
    # prompts: one row of up to max_length tokens on an empty past, 2+ tokens after a past
    if not any(p.batch.min <= 1 and p.seq.max >= max_length and p.past.min == 0 for p in profiles):
        raise ValueError(f"no optimisation profile takes a prompt of max_length={max_length} tokens "
                         f"(seq max >= {max_length} with past 0)")
    if not any(p.batch.min <= 1 and p.seq.min <= 2 <= p.seq.max and p.past.max >= max_length - 2
               for p in profiles):
        raise ValueError(f"no optimisation profile takes a 2-token step after a past of "
                         f"{max_length - 2} (past max >= {max_length - 2})")


def bucket_past(columns: int, *, profile: Profile, limit: int, bucket: int) -> int:
    """The engine past length for `columns` used pool columns: rounded up to a multiple of
    `bucket`, within the profile and at most `limit` (max_length - T)."""
    want = -(-columns // bucket) * bucket if bucket > 1 else columns
    P = max(columns, min(want, limit, profile.past.max), profile.past.min)
    if P not in profile.past or P > limit:
        raise ValueError(f"past length {columns} does not fit profile {profile.name!r} "
                         f"(past {profile.past.min}..{profile.past.max}, at most {limit} here)")
    return P


# ---------------------------------------------------------------------------- the column map


def write_column(columns: np.ndarray, past: np.ndarray) -> int:
    """The first pool column after every valid column of these rows. columns (B, MAX): pool
    column of each logical position; past (B,): valid positions per row."""
    B, MAX = columns.shape
    valid = np.arange(MAX)[None, :] < past[:, None]  # (B, MAX)
    extent = np.where(valid, columns + 1, 0)
    return int(extent.max()) if B and MAX else 0


def attention_mask(columns: np.ndarray, past: np.ndarray, P: int, T: int) -> np.ndarray:
    """(B, P + T) int64: 1 at each row's valid pool columns (< P) and at the T new positions."""
    B, MAX = columns.shape
    mask = np.zeros((B, P + T), dtype=np.int64)
    b, i = np.nonzero(np.arange(MAX)[None, :] < past[:, None])
    mask[b, columns[b, i]] = 1
    mask[:, P:] = 1
    return mask


def compaction_order(columns: np.ndarray, past: np.ndarray) -> np.ndarray:
    """(B, MAX): new column j of row b takes old column order[b, j] — logical order, valid first."""
    B, MAX = columns.shape
    j = np.arange(MAX)[None, :]
    return np.where(j < past[:, None], columns, j).astype(np.int64)


# ---------------------------------------------------------------------------- memory and copies


def check_copy2d(dst_size: int, dst_offset: int, dst_pitch: int, src_size: int, src_offset: int,
                 src_pitch: int, width: int, height: int) -> None:
    """Bounds of a strided copy (cudaMemcpy2D semantics, bytes): refuse rather than scribble."""
    if width > dst_pitch or width > src_pitch or min(dst_offset, src_offset, width, height) < 0:
        raise ValueError(f"bad 2-D copy: width {width}, pitches {dst_pitch}/{src_pitch}, "
                         f"offsets {dst_offset}/{src_offset}")
    if height and width:
        for name, size, offset, pitch in (("destination", dst_size, dst_offset, dst_pitch),
                                          ("source", src_size, src_offset, src_pitch)):
            end = offset + (height - 1) * pitch + width
            if end > size:
                raise ValueError(f"2-D copy runs past the {name} buffer: ends at byte {end}, size {size}")


class Ops(Protocol):
    def alloc(self, nbytes: int) -> Any: ...
    def nbytes(self, buffer: Any) -> int: ...
    def copy2d(self, dst: Any, dst_offset: int, dst_pitch: int, src: Any, src_offset: int,
               src_pitch: int, width: int, height: int) -> None: ...
    def upload(self, dst: Any, array: np.ndarray, offset: int = 0) -> None: ...
    def download(self, src: Any, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray: ...
    def synchronize(self) -> None: ...


class HostOps:
    """Buffers are flat uint8 numpy arrays; copies are strided numpy assignments with the same
    offsets and pitches a cudaMemcpy2D gets (what the CPU tests run)."""

    def alloc(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, dtype=np.uint8)

    @staticmethod
    def wrap(array: np.ndarray) -> np.ndarray:
        """A flat byte view of a C-contiguous array (shares its memory)."""
        if not array.flags.c_contiguous:
            raise ValueError("HostOps.wrap needs a C-contiguous array")
        return array.reshape(-1).view(np.uint8)

    def nbytes(self, buffer: np.ndarray) -> int:
        return int(buffer.nbytes)

    def copy2d(self, dst: np.ndarray, dst_offset: int, dst_pitch: int, src: np.ndarray, src_offset: int,
               src_pitch: int, width: int, height: int) -> None:
        check_copy2d(dst.nbytes, dst_offset, dst_pitch, src.nbytes, src_offset, src_pitch, width, height)
        if not (width and height):
            return
        strided = np.lib.stride_tricks.as_strided
        d = strided(dst[dst_offset:], shape=(height, width), strides=(dst_pitch, 1))
        s = strided(src[src_offset:], shape=(height, width), strides=(src_pitch, 1))
        d[...] = s

    def view(self, buffer: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        return buffer[offset:offset + n].view(dtype).reshape(shape)

    def upload(self, dst: np.ndarray, array: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        dst[offset:offset + data.nbytes] = data

    def download(self, src: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return self.view(src, dtype, shape, offset).copy()

    def synchronize(self) -> None:
        pass


@dataclass(frozen=True)
class DeviceBuffer:
    ptr: int
    nbytes: int


class CudaOps:
    """Device memory and copies on one CUDA stream (cuda-python). GPU only."""

    def __init__(self, device: int = 0) -> None:
        self.cudart = import_cudart()
        self._check(self.cudart.cudaSetDevice(device))
        self.stream = self._check(self.cudart.cudaStreamCreate())
        self.device = device
        self._buffers: list[DeviceBuffer] = []
        self._keepalive: list[np.ndarray] = []  # host sources of async copies, until the next sync
        kinds = self.cudart.cudaMemcpyKind
        self._h2d, self._d2h, self._d2d = (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost,
                                           kinds.cudaMemcpyDeviceToDevice)

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = int(self._check(self.cudart.cudaMalloc(max(int(nbytes), 1))))
        self._check(self.cudart.cudaMemset(ptr, 0, max(int(nbytes), 1)))
        buffer = DeviceBuffer(ptr, int(nbytes))
        self._buffers.append(buffer)
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        self._check(self.cudart.cudaFree(buffer.ptr))
        self._buffers.remove(buffer)

    def nbytes(self, buffer: DeviceBuffer) -> int:
        return buffer.nbytes

    def copy2d(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int,
               src_pitch: int, width: int, height: int) -> None:
        check_copy2d(dst.nbytes, dst_offset, dst_pitch, src.nbytes, src_offset, src_pitch, width, height)
        if width and height:
            self._check(self.cudart.cudaMemcpy2DAsync(dst.ptr + dst_offset, dst_pitch, src.ptr + src_offset,
                                                      src_pitch, width, height, self._d2d, self.stream))

    def upload(self, dst: DeviceBuffer, array: np.ndarray, offset: int = 0) -> None:
        array = np.ascontiguousarray(array)
        if offset + array.nbytes > dst.nbytes:
            raise ValueError(f"upload of {array.nbytes} bytes at {offset} overruns a {dst.nbytes}-byte buffer")
        self._keepalive.append(array)
        self._check(self.cudart.cudaMemcpyAsync(dst.ptr + offset, array.ctypes.data, array.nbytes,
                                                self._h2d, self.stream))

    def download(self, src: DeviceBuffer, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if offset + out.nbytes > src.nbytes:
            raise ValueError(f"download of {out.nbytes} bytes at {offset} overruns a {src.nbytes}-byte buffer")
        self._check(self.cudart.cudaMemcpyAsync(out.ctypes.data, src.ptr + offset, out.nbytes,
                                                self._d2h, self.stream))
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))
        self._keepalive.clear()

    def close(self) -> None:
        self.synchronize()
        for buffer in list(self._buffers):
            self.free(buffer)
        self._check(self.cudart.cudaStreamDestroy(self.stream))

    # CUDA graphs: capture what is enqueued on the stream, replay it later
    def begin_capture(self) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.cudart.cudaStreamBeginCapture(self.stream, mode))

    def end_capture(self) -> Any:
        graph = self._check(self.cudart.cudaStreamEndCapture(self.stream))
        try:
            return self._check(self.cudart.cudaGraphInstantiate(graph, 0))
        finally:
            self._check(self.cudart.cudaGraphDestroy(graph))

    def abort_capture(self) -> None:
        result = self.cudart.cudaStreamEndCapture(self.stream)  # ends a broken capture; errors expected
        if isinstance(result, tuple) and len(result) > 1 and result[1]:
            self.cudart.cudaGraphDestroy(result[1])

    def launch(self, graph_exec: Any) -> None:
        self._check(self.cudart.cudaGraphLaunch(graph_exec, self.stream))

    def destroy_graph(self, graph_exec: Any) -> None:
        self._check(self.cudart.cudaGraphExecDestroy(graph_exec))


# ---------------------------------------------------------------------------- engines


class Engine(Protocol):
    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    kv_dtype: np.dtype
    logits_dtype: np.dtype
    profiles: tuple[Profile, ...]

    def execute(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]],
                buffers: Mapping[str, Any], *, graph_key: Optional[tuple] = None) -> None: ...


class OrtEngine:
    """The dynamic ONNX graph in ONNX Runtime over HostOps buffers: the CPU stand-in for a
    TensorRT engine that lets the tests run PagedStepRuntime without a GPU."""

    def __init__(self, onnx_path: str | Path, *, profiles: Optional[Sequence[Profile]] = None,
                 ops: Optional[HostOps] = None, intra_op_threads: Optional[int] = None) -> None:
        from serving.runtime import OrtRuntime

        self.ort = OrtRuntime(onnx_path, intra_op_threads=intra_op_threads)
        if self.ort.kv_cache != "dynamic":
            raise ValueError(f"{onnx_path}: the paged runtime runs the dynamic-cache graph, this one has "
                             f"a {self.ort.kv_cache} cache")
        self.ops = ops or HostOps()
        self.n_layer, self.n_head, self.head_dim = self.ort.n_layer, self.ort.n_head, self.ort.head_dim
        self.vocab_size, self.kv_dtype, self.logits_dtype = self.ort.vocab_size, self.ort.kv_dtype, self.ort.logits_dtype
        n = 1 << 20  # no profiles in ONNX Runtime: one that takes everything unless told otherwise
        self.profiles = tuple(profiles) if profiles else (
            Profile("any", AxisRange(1, 1, n), AxisRange(1, 1, n), AxisRange(0, 0, n)),)
        self.calls: list[tuple[int, tuple[int, ...]]] = []  # (profile, input_ids shape) per call

    def dtype(self, name: str) -> np.dtype:
        if name in (tensors.INPUT_IDS, tensors.POSITION_IDS, tensors.ATTENTION_MASK):
            return np.dtype("int64")
        return self.logits_dtype if name == tensors.LOGITS else self.kv_dtype

    def execute(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]],
                buffers: Mapping[str, Any], *, graph_key: Optional[tuple] = None) -> None:
        profile = self.profiles[profile_index]
        B, T = shapes[tensors.INPUT_IDS]
        P = shapes[tensors.past_key(0)][2]
        if not profile.accepts(B, T, P):
            raise ValueError(f"shapes B={B} T={T} P={P} are outside profile {profile.name!r}")
        self.calls.append((profile_index, (B, T)))
        feeds = {name: self.ops.view(buffers[name], self.dtype(name), shape) for name, shape in shapes.items()}
        out = self.ort.run(feeds)
        for name, value in out.items():
            self.ops.view(buffers[name], value.dtype, value.shape)[...] = value


class TrtEngine:
    """A deserialized TensorRT engine: one execution context per optimisation profile, tensor
    addresses in CudaOps buffers, CUDA graphs for decode steps. GPU only."""

    def __init__(self, plan_path: str | Path, *, ops: CudaOps, cuda_graphs: bool = True) -> None:
        trt = self.trt = import_tensorrt()
        self.ops = ops
        path = Path(plan_path)
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.trt_logger)
        # version-compatible plans carry a lean runtime that must be allowed to load
        self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT {trt.__version__} could not deserialize {path} (built by another "
                               f"TensorRT version or for another GPU? see the log above)")
        self._read_io()
        self.contexts = []
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, ops.stream_handle)
            self.contexts.append(context)
        ops.synchronize()
        self.cuda_graphs = cuda_graphs
        self._graphs: OrderedDict[tuple, Any] = OrderedDict()
        self._bound: dict[int, dict[str, int]] = {}
        logger.info("TensorRT engine %s: %d layers, kv %s, %d profiles %s", path.name, self.n_layer,
                    self.kv_dtype, len(self.profiles), [p.name for p in self.profiles])

    def _read_io(self) -> None:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.io_dtypes = {}
        for n in names:
            dtype = trt.nptype(engine.get_tensor_dtype(n))  # None for bf16/fp8: not an IO type we build
            if dtype is None:
                raise ValueError(f"engine tensor {n!r} has type {engine.get_tensor_dtype(n)}, which numpy "
                                 "cannot hold; gptpipe engines keep I/O in int64 / fp32 / fp16")
            self.io_dtypes[n] = np.dtype(dtype)
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = [n for n in (tensors.INPUT_IDS, tensors.POSITION_IDS, tensors.ATTENTION_MASK,
                               tensors.past_key(0), tensors.LOGITS) if n not in names]
        if missing:
            raise ValueError(f"not a gptpipe engine: missing tensors {missing}; it has {names}")
        self.n_layer = sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
        _, n_head, _, head_dim = engine.get_tensor_shape(tensors.past_key(0))
        self.n_head, self.head_dim = int(n_head), int(head_dim)
        self.vocab_size = int(engine.get_tensor_shape(tensors.LOGITS)[-1])
        self.kv_dtype = self.io_dtypes[tensors.past_key(0)]
        self.logits_dtype = self.io_dtypes[tensors.LOGITS]
        profiles = []
        for i in range(engine.num_optimization_profiles):
            ids = engine.get_tensor_profile_shape(tensors.INPUT_IDS, i)  # [min, opt, max] dims
            kv = engine.get_tensor_profile_shape(tensors.past_key(0), i)
            profiles.append(Profile(f"profile{i}", batch=AxisRange(*(int(d[0]) for d in ids)),
                                    seq=AxisRange(*(int(d[1]) for d in ids)),
                                    past=AxisRange(*(int(d[2]) for d in kv))))
        self.profiles = tuple(profiles)

    def dtype(self, name: str) -> np.dtype:
        return self.io_dtypes[name]

    def execute(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]],
                buffers: Mapping[str, DeviceBuffer], *, graph_key: Optional[tuple] = None) -> None:
        context = self.contexts[profile_index]
        bound = self._bound.setdefault(profile_index, {})
        for name, buffer in buffers.items():  # addresses are fixed: set once per context
            if bound.get(name) != buffer.ptr:
                context.set_tensor_address(name, buffer.ptr)
                bound[name] = buffer.ptr
        for name, shape in shapes.items():
            if name in self.inputs:
                context.set_input_shape(name, tuple(int(d) for d in shape))
        key = None if graph_key is None or not self.cuda_graphs else (profile_index, *graph_key)
        if key is not None and key in self._graphs:
            self._graphs.move_to_end(key)
            self.ops.launch(self._graphs[key])
            return
        if not context.execute_async_v3(self.ops.stream_handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for shapes {dict(shapes)}")
        if key is not None:
            self._capture(context, key)

    def forget_buffers(self) -> None:
        """The runtime reallocated its IO buffers: bound addresses and captured graphs are stale."""
        for graph in self._graphs.values():
            self.ops.destroy_graph(graph)
        self._graphs.clear()
        self._bound.clear()

    def _capture(self, context: Any, key: tuple) -> None:
        """Capture the enqueue just made (TensorRT wants one plain enqueue after a shape change
        first). An engine TensorRT cannot capture keeps running without graphs."""
        ops = self.ops
        try:
            ops.begin_capture()
            if not context.execute_async_v3(ops.stream_handle):
                raise RuntimeError("execute_async_v3 failed during capture")
            graph_exec = ops.end_capture()
        except Exception as e:
            ops.abort_capture()
            self.cuda_graphs = False
            logger.warning("CUDA graph capture failed (%s); decode steps run without CUDA graphs", e)
            return
        self._graphs[key] = graph_exec
        if len(self._graphs) > MAX_CUDA_GRAPHS:
            _, old = self._graphs.popitem(last=False)
            ops.destroy_graph(old)


# ---------------------------------------------------------------------------- the step runtime


class _PoolState:
    """What the runtime keeps per KV pool: device buffers and the column map."""

    def __init__(self, pool: KVPool, keys: list[Any], values: list[Any]) -> None:
        self.keys, self.values = keys, values
        self.columns = np.zeros((pool.max_sequences, pool.max_length), dtype=np.int64)
        self.columns[:] = np.arange(pool.max_length)[None, :]
        self.compactions = 0


class PagedStepRuntime:
    """`step()` over an Engine and Ops (see the module docstring)."""

    kv_cache: tensors.KVCache = "dynamic"

    def __init__(self, engine: Engine, ops: Ops, *, past_bucket: int = DEFAULT_PAST_BUCKET) -> None:
        if past_bucket < 1:
            raise ValueError(f"past_bucket must be >= 1, got {past_bucket}")
        self.engine, self.ops, self.past_bucket = engine, ops, past_bucket
        self.n_layer, self.n_head, self.head_dim = engine.n_layer, engine.n_head, engine.head_dim
        self.vocab_size, self.kv_dtype, self.logits_dtype = engine.vocab_size, np.dtype(engine.kv_dtype), np.dtype(engine.logits_dtype)
        self.max_batch = max(p.batch.max for p in engine.profiles)
        self._pools: weakref.WeakKeyDictionary[KVPool, _PoolState] = weakref.WeakKeyDictionary()
        self._io: dict[str, Any] = {}
        self._io_capacity = (0, 0)  # (rows, max_length) the IO buffers hold
        self._lock = threading.Lock()  # one step at a time: shared staging buffers

    def new_pool(self, *, max_sequences: int, max_length: int) -> KVPool:
        pool = KVPool(n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                      max_sequences=max_sequences, max_length=max_length, dtype=self.kv_dtype)
        self._state(pool)
        return pool

    # ------------------------------------------------------------------ buffers

    def _state(self, pool: KVPool) -> _PoolState:
        state = self._pools.get(pool)
        if state is None:
            if (pool.n_layer, pool.n_head, pool.head_dim) != (self.n_layer, self.n_head, self.head_dim):
                raise ValueError(f"pool shape (n_layer, n_head, head_dim) = {(pool.n_layer, pool.n_head, pool.head_dim)} "
                                 f"does not match the engine's {(self.n_layer, self.n_head, self.head_dim)}")
            if pool.dtype != self.kv_dtype:
                raise ValueError(f"pool dtype {pool.dtype} does not match the engine's KV dtype {self.kv_dtype}")
            if isinstance(self.ops, HostOps):  # the pool's own arrays are the storage
                keys = [HostOps.wrap(a) for a in pool.keys]
                values = [HostOps.wrap(a) for a in pool.values]
            else:
                nbytes = pool.keys[0].nbytes  # (S, nh, MAX, hs); the host arrays stay untouched
                keys = [self.ops.alloc(nbytes) for _ in range(pool.n_layer)]
                values = [self.ops.alloc(nbytes) for _ in range(pool.n_layer)]
            state = self._pools[pool] = _PoolState(pool, keys, values)
            logger.info("KV pool on %s: %d slots x %d positions", type(self.ops).__name__,
                        pool.max_sequences, pool.max_length)
        return state

    def _io_buffers(self, rows: int, max_length: int) -> dict[str, Any]:
        """Engine input/output buffers for up to `rows` x `max_length` (allocated once, at the
        largest batch the profiles take, so their addresses never change: CUDA graphs keep them)."""
        if rows <= self._io_capacity[0] and max_length <= self._io_capacity[1]:
            return self._io
        rows, max_length = max(rows, self.max_batch, self._io_capacity[0]), max(max_length, self._io_capacity[1])
        kv = rows * self.n_head * max_length * self.head_dim * self.kv_dtype.itemsize
        io = {tensors.INPUT_IDS: self.ops.alloc(rows * max_length * 8),
              tensors.POSITION_IDS: self.ops.alloc(rows * max_length * 8),
              tensors.ATTENTION_MASK: self.ops.alloc(rows * max_length * 8),
              tensors.LOGITS: self.ops.alloc(rows * self.vocab_size * self.logits_dtype.itemsize)}
        for i in range(self.n_layer):
            for name in (tensors.past_key(i), tensors.past_value(i), tensors.present_key(i), tensors.present_value(i)):
                io[name] = self.ops.alloc(kv)
        free = getattr(self.ops, "free", None)
        if free is not None:
            for buffer in self._io.values():
                free(buffer)
        forget = getattr(self.engine, "forget_buffers", None)  # TrtEngine: stale addresses and graphs
        if forget is not None:
            forget()
        self._io, self._io_capacity = io, (rows, max_length)
        return io

    # ------------------------------------------------------------------ step

    def step(self, input_ids: np.ndarray, *, pool: KVPool, slot_start: int,
             past_lengths: np.ndarray | Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
        """Run T new tokens for rows [slot_start, slot_start + B) of `pool`. input_ids (B, T);
        past_lengths (B,). Returns the last position's logits (B, V) (`out` when given)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        past = np.ascontiguousarray(past_lengths, dtype=np.int64)
        B, T = self._check_step(input_ids, pool, slot_start, past)
        with self._lock:
            state = self._state(pool)
            rows = state.columns[slot_start:slot_start + B]  # (B, MAX) view
            C = write_column(rows, past)
            if C + T > pool.max_length:
                self._compact(pool, state, slot_start, past)
                C = write_column(rows, past)
            index, profile = self._profile(B, T, C, pool.max_length)
            P = bucket_past(C, profile=profile, limit=pool.max_length - T, bucket=self.past_bucket)
            logits = self._run(state, pool, slot_start, input_ids, past, rows, C, P, index)
            rows[np.arange(B)[:, None], past[:, None] + np.arange(T)[None, :]] = C + np.arange(T)[None, :]
        if out is not None:
            if out.shape != (B, self.vocab_size) or out.dtype != self.logits_dtype:
                raise ValueError(f"out must be a {self.logits_dtype} array of shape ({B}, {self.vocab_size}), "
                                 f"got {out.dtype} {out.shape}")
            out[...] = logits
            return out
        return logits

    def _profile(self, B: int, T: int, C: int, max_length: int) -> tuple[int, Profile]:
        for index, profile in enumerate(self.engine.profiles):
            if B in profile.batch and T in profile.seq and profile.past.min <= C <= profile.past.max:
                return index, profile
        ranges = ", ".join(f"{p.name}: batch {p.batch.min}..{p.batch.max} seq {p.seq.min}..{p.seq.max} "
                           f"past {p.past.min}..{p.past.max}" for p in self.engine.profiles)
        raise ValueError(f"no optimisation profile takes {B} rows x {T} tokens after {C} cached "
                         f"positions; the engine's profiles: {ranges}")

    def _run(self, state: _PoolState, pool: KVPool, slot_start: int, input_ids: np.ndarray,
             past: np.ndarray, rows: np.ndarray, C: int, P: int, profile_index: int) -> np.ndarray:
        ops = self.ops
        B, T = input_ids.shape
        MAX = pool.max_length
        io = self._io_buffers(B, MAX)
        ops.upload(io[tensors.INPUT_IDS], input_ids)
        ops.upload(io[tensors.POSITION_IDS], past[:, None] + np.arange(T)[None, :])  # (B, T)
        ops.upload(io[tensors.ATTENTION_MASK], attention_mask(rows, past, P, T))  # (B, P + T)
        pos = self.head_dim * self.kv_dtype.itemsize  # bytes of one position of one head
        slot = self.n_head * MAX * pos  # bytes of one slot of one layer
        for layer in range(self.n_layer):
            for pool_buffer, name in ((state.keys[layer], tensors.past_key(layer)),
                                      (state.values[layer], tensors.past_value(layer))):
                # pool[slot_start:+B, :, :P, :] -> dense (B, nh, P, hs)
                ops.copy2d(io[name], 0, P * pos, pool_buffer, slot_start * slot, MAX * pos, P * pos, B * self.n_head)
        shapes = {tensors.INPUT_IDS: (B, T), tensors.POSITION_IDS: (B, T), tensors.ATTENTION_MASK: (B, P + T)}
        for i in range(self.n_layer):
            shapes[tensors.past_key(i)] = shapes[tensors.past_value(i)] = (B, self.n_head, P, self.head_dim)
        self.engine.execute(profile_index, shapes, io, graph_key=(B, P) if T == 1 else None)
        for layer in range(self.n_layer):
            for pool_buffer, name in ((state.keys[layer], tensors.present_key(layer)),
                                      (state.values[layer], tensors.present_value(layer))):
                # present[:, :, P:P+T, :] -> pool[slot_start:+B, :, C:C+T, :]
                ops.copy2d(pool_buffer, slot_start * slot + C * pos, MAX * pos, io[name], P * pos,
                           (P + T) * pos, T * pos, B * self.n_head)
        return ops.download(io[tensors.LOGITS], self.logits_dtype, (B, self.vocab_size))

    def _compact(self, pool: KVPool, state: _PoolState, slot_start: int, past: np.ndarray) -> None:
        """Move each row's valid columns to the front, in logical order (through the host: rare)."""
        B, MAX = len(past), pool.max_length
        rows = state.columns[slot_start:slot_start + B]
        order = compaction_order(rows, past)  # (B, MAX)
        shape = (B, self.n_head, MAX, self.head_dim)
        offset = slot_start * self.n_head * MAX * self.head_dim * self.kv_dtype.itemsize
        for buffer in (*state.keys, *state.values):
            data = self.ops.download(buffer, self.kv_dtype, shape, offset)
            data = np.take_along_axis(data, order[:, None, :, None], axis=2)
            self.ops.upload(buffer, data, offset)
        self.ops.synchronize()
        rows[:] = np.arange(MAX)[None, :]
        state.compactions += 1
        logger.info("compacted KV slots [%d, %d)", slot_start, slot_start + B)

    def _check_step(self, input_ids: np.ndarray, pool: KVPool, slot_start: int, past: np.ndarray) -> tuple[int, int]:
        if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch >= 1, tokens >= 1), got shape {input_ids.shape}")
        B, T = input_ids.shape
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        if not isinstance(slot_start, (int, np.integer)) or slot_start < 0 or slot_start + B > pool.max_sequences:
            raise ValueError(f"slots [slot_start, slot_start + batch) = [{slot_start}, {slot_start} + {B}) "
                             f"must lie in [0, {pool.max_sequences})")
        if past.shape != (B,):
            raise ValueError(f"past_lengths must have shape (batch,) = ({B},), got {past.shape}")
        if past.min() < 0 or int(past.max()) + T > pool.max_length:
            raise ValueError(f"past_lengths + new tokens must be in [{T}, {pool.max_length}] "
                             f"(the pool's max_length), got past_lengths {past.tolist()} + {T}")
        if B > self.max_batch:
            raise ValueError(f"batch of {B} rows exceeds the engine's largest profile batch {self.max_batch}")
        return B, T


class TrtRuntime(PagedStepRuntime):
    """`load_runtime("gpt.plan")`: a TensorRT engine on GPU `device`, KV pool in device memory.

    intra_op_threads is accepted (load_runtime passes it to every runtime) and not used."""

    def __init__(self, plan_path: str | Path, *, device: int = 0, cuda_graphs: bool = True,
                 past_bucket: int = DEFAULT_PAST_BUCKET, intra_op_threads: Optional[int] = None) -> None:
        path = Path(plan_path)
        if not path.is_file():
            raise FileNotFoundError(f"no TensorRT engine at {path}")
        self.path = path
        ops = CudaOps(device)
        super().__init__(TrtEngine(path, ops=ops, cuda_graphs=cuda_graphs), ops, past_bucket=past_bucket)
        self.metadata: dict[str, str] = {}
        self.providers = [f"TensorRT {self.engine.trt.__version__}"]
