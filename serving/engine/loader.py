"""`load_runtime`: the runtime for an engine file, picked by its suffix (above both runtimes).

ONNX Runtime for `.onnx`; TensorRT (serving/engine/runtime_trt.py, GPU) for plans. Importing
this needs no GPU: tensorrt and cuda-python are imported when a TensorRT runtime is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from serving.engine.contract import TENSORRT_SUFFIXES, Runtime
from serving.engine.runtime import OrtRuntime
from serving.engine.runtime_trt import TrtRuntime


def load_runtime(path: str | os.PathLike, *, intra_op_threads: Optional[int] = None, spinning: bool = True,
                 stop_spinning_after_run: bool = False) -> Runtime:
    """The runtime for an engine file: `OrtRuntime` for `.onnx`, `TrtRuntime` for a TensorRT
    `.plan` / `.engine` (tensorrt and cuda-python, GPU-only, are imported only then). Both have
    the same `step()`, `new_pool()` and graph facts (n_layer, kv_dtype, vocab_size, ...).
    intra_op_threads, spinning and stop_spinning_after_run are ONNX Runtime's (host threads: see
    serving.engine.runtime.session_options)."""
    suffix = Path(path).suffix
    if suffix == ".onnx":
        return OrtRuntime(path, intra_op_threads=intra_op_threads, spinning=spinning,
                          stop_spinning_after_run=stop_spinning_after_run)
    if suffix in TENSORRT_SUFFIXES:
        return TrtRuntime(path, intra_op_threads=intra_op_threads)
    raise ValueError(f"engine file {path}: unknown suffix {suffix!r}; expected .onnx or one of {TENSORRT_SUFFIXES}")
