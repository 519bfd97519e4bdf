"""torch.export -> ONNX: the static-cache graph (ONNX Runtime serving) and the dynamic graph
(portable), as fp32 ModelProtos whose inputs and outputs are the tensor table's.

- `kv_cache="static"`: each layer's attention is the static-cache op (export/onnx/ops.py), which
  becomes ONNX Runtime's `com.microsoft::GroupQueryAttention` over preallocated (B, nh, MAX, hs)
  buffers that are both past input and present output; twice per layer, for the two groups of a
  mixed call (B rows of T tokens, and one prompt chunk), whose other ops run on the packed tokens.
- `kv_cache="dynamic"`: `GPT.forward(..., last_only=True)` as is — past ++ new by Concat,
  standard ONNX ops only.

Both return the last position's logits only: (B, V); static: (B + 1, V), the chunk's last.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import onnx
import torch
import torch.nn as nn

from export.config import GPTConfig
from export.model import GPT, KV
from export.onnx.graph import ExportError, graph_specs
from export.onnx.ops import CUSTOM_TRANSLATION_TABLE, mixed_cache_attend
from serving import tensors

# The torch.export-based exporter emits opset 18 (its torchlib); LayerNormalization needs 17.
MIN_OPSET = 18
DEFAULT_OPSET = 18


def check_opset(opset: int) -> None:
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ValueError(f"opset must be an int, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the torch.export-based exporter needs opset >= "
                         f"{MIN_OPSET} (LayerNormalization is opset 17, the exporter emits 18)")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset {opset} is newer than this onnx ({onnx.__version__}) knows: at most {newest}")


class StaticCacheGPT(nn.Module):
    """The ONNX Runtime serving graph: in-place static cache, two attention groups (B rows of T
    new tokens, and one prompt chunk of C tokens), each row's and the chunk's last logits.

    The embeddings, LayerNorms, projections, MLPs and the LM head run once over the packed
    B * T + C tokens (a decode step is bound by reading the weights: one pass for both groups);
    only attention is per group (export/onnx/ops.py: mixed_cache_attend)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Sequence[KV], chunk_input_ids: torch.Tensor, chunk_position_ids: torch.Tensor,
                chunk_attention_mask: torch.Tensor, chunk_past_key_values: Sequence[KV]
                ) -> tuple[torch.Tensor, list[KV], list[KV]]:
        B, T = input_ids.shape
        n_head = self.model.config.n_head
        ids = torch.cat([input_ids.reshape(1, B * T), chunk_input_ids], dim=1)  # (1, B*T + C)
        positions = torch.cat([position_ids.reshape(1, B * T), chunk_position_ids], dim=1)
        attends = [mixed_cache_attend(past, chunk_past, attention_mask, chunk_attention_mask, n_head, B, T)
                   for past, chunk_past in zip(past_key_values, chunk_past_key_values)]
        h, presents = self.model.hidden_states(ids, positions, attends)  # (1, B*T + C, E)
        last = torch.cat([h[0, :B * T].reshape(B, T, -1)[:, -1], h[0, -1:]])  # (B + 1, E)
        return self.model.lm_head(last), [p[0] for p in presents], [p[1] for p in presents]  # (B + 1, V)


class DynamicCacheGPT(nn.Module):
    """The portable graph: `GPT.forward` with past ++ new, last position's logits."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Sequence[KV]) -> tuple[torch.Tensor, list[KV]]:
        return self.model(input_ids, position_ids, attention_mask, past_key_values, last_only=True)


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
    if kv_cache == "dynamic":
        return (ids, positions, mask, past), dynamic_shapes
    # the prompt chunk: one row of C new tokens after a past, in a buffer of its own length
    C, CP, CS = 5, 6, config.n_positions - 1
    chunk_shape = (1, config.n_head, CS, config.head_dim)
    chunk_past = [(torch.zeros(chunk_shape), torch.zeros(chunk_shape)) for _ in range(config.n_layer)]
    chunk_seq = Dim(tensors.CHUNK_SEQ, min=1, max=config.n_positions)
    chunk_axis = Dim(tensors.CHUNK_MAX_SEQ, min=1, max=config.n_positions)
    dynamic_shapes.update({
        "chunk_input_ids": {1: chunk_seq},
        "chunk_position_ids": {1: chunk_seq},
        "chunk_attention_mask": {1: Dim(tensors.CHUNK_TOTAL, min=1, max=config.n_positions)},
        "chunk_past_key_values": [({2: chunk_axis}, {2: chunk_axis}) for _ in range(config.n_layer)],
    })
    chunk_ids = torch.zeros(1, C, dtype=torch.long)
    chunk_positions = (torch.arange(C) + CP)[None]
    chunk_mask = torch.ones(1, CP + C, dtype=torch.long)
    return (ids, positions, mask, past, chunk_ids, chunk_positions, chunk_mask, chunk_past), dynamic_shapes


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
                custom_translation_table=CUSTOM_TRANSLATION_TABLE if kv_cache == "static" else None,
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

