"""`OrtEngine`: the dynamic ONNX graph in ONNX Runtime over `HostOps` buffers, the CPU stand-in
for a TensorRT engine that lets the tests run `PagedStepRuntime` without a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from serving import tensors
from serving.engine.memory import HostOps
from serving.engine.profiles import AxisRange, Profile
from serving.engine.runtime import OrtRuntime


class OrtEngine:
    """The dynamic ONNX graph in ONNX Runtime over HostOps buffers: the CPU stand-in for a
    TensorRT engine that lets the tests run PagedStepRuntime without a GPU."""

    def __init__(self, onnx_path: str | Path, *, profiles: Optional[Sequence[Profile]] = None,
                 ops: Optional[HostOps] = None, intra_op_threads: Optional[int] = None) -> None:
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

