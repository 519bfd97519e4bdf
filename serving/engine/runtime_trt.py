"""TensorRT runtime: `TrtRuntime` = `PagedStepRuntime(TrtEngine, CudaOps)`, the same `step()` as
`OrtRuntime` over a TensorRT engine of the dynamic-cache graph, the KV pool in device memory
(numpy, tensorrt, cuda-python; never torch). `TrtEngine`: a deserialized plan, one execution
context per optimisation profile, CUDA graphs for decode steps. GPU only; importable without one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from serving import tensors
from serving.engine.gpu_libs import import_tensorrt
from serving.engine.memory import CudaOps, DeviceBuffer
from serving.engine.paged import DEFAULT_PAST_BUCKET, PagedStepRuntime
from serving.engine.profiles import AxisRange, Profile

logger = logging.getLogger(__name__)

MAX_CUDA_GRAPHS = 256  # captured decode graphs kept (LRU)


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
