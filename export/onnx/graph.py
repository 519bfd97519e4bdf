"""What every ONNX stage shares: the precisions and cache kinds, the graph's inputs and outputs
from the tensor table, and the model file on disk (one file or a weights side file, metadata)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal, Optional, Sequence

import onnx

from export.config import GPTConfig
from serving import tensors

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
KV_CACHES: tuple[str, ...] = ("static", "dynamic")
# the KV cache's element type: "auto" is the precision's float type; "int8" stores keys and values
# as int8 with per-channel scales (ORT GroupQueryAttention's quantized cache, static cache only)
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "int8")
LOGITS_DTYPE = "float32"
_PROTOBUF_LIMIT = 2**31 - 2**26  # above this (~1.9 GB), weights go to a side file


class ExportError(RuntimeError):
    """The export itself failed (not a bad argument: those raise ValueError)."""


def kv_cache_dtype_problem(kv_cache_dtype: str, *, kv_cache: str, precision: str) -> Optional[str]:
    """Why `kv_cache_dtype` does not go with this cache kind and precision, or None."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        return f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
    if kv_cache_dtype == "int8" and (kv_cache != "static" or precision not in ("int8", "int4")):
        return (f"int8 needs the static cache and precision int8 or int4 (the quantized exports, whose "
                f"tolerances allow for its rounding); got the {kv_cache} cache and {precision}")
    return None


def kv_dtype(precision: str, kv_cache_dtype: str = "auto") -> str:
    if kv_cache_dtype == "int8":
        return "int8"
    return "float16" if precision == "fp16" else "float32"


def graph_specs(config: GPTConfig, *, kv_cache: str, precision: str, kv_cache_dtype: str = "auto"
                ) -> tuple[list[tensors.TensorSpec], list[tensors.TensorSpec]]:
    """The exported graph's inputs and outputs, from the tensor table."""
    c, kv = config, kv_dtype(precision, kv_cache_dtype)
    inputs = tensors.graph_inputs(c.n_layer, c.n_head, c.head_dim, kv_dtype=kv, kv_cache=kv_cache)
    outputs = tensors.graph_outputs(c.n_layer, c.n_head, c.head_dim, c.vocab_size, kv_dtype=kv,
                                    logits_dtype=LOGITS_DTYPE, kv_cache=kv_cache)
    return inputs, outputs


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8"}


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


def external_data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def model_files(path: Path) -> list[Path]:
    """The model file and, for models over the protobuf limit, its weights file."""
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


def set_metadata(proto: onnx.ModelProto, *, config: GPTConfig, kv_cache: str, precision: str,
                 kv_cache_dtype: str = "auto") -> None:
    """The metadata the engine reads back (serving/engine/runtime.py): config, cache kind, precision,
    the KV cache's element type."""
    meta = {"gptpipe.config": json.dumps(config.to_dict()), "gptpipe.kv_cache": kv_cache,
            "gptpipe.precision": precision, "gptpipe.kv_cache_dtype": kv_cache_dtype}
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
