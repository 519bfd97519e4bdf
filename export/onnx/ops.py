"""The static-cache attention op: a torch custom op that exports to ONNX Runtime's
`com.microsoft::GroupQueryAttention` with a shared past/present buffer.

`gptpipe::static_cache_attention(q, k, v, past_k, past_v, attention_mask, num_heads)`:
- q, k, v (B, T, C): this step's projections; past_k, past_v (B, nh, MAX, hs): each row's cache,
  valid in its first `past_len[b]` positions (right padding);
- attention_mask (B, total): row b has `past_len[b] + T` ones first, then zeros (total is the
  batch's largest `past_len + T`);
- returns y (B, T, C) and present_k, present_v (B, nh, MAX, hs): the buffers with the new keys
  and values written at positions [past_len[b], past_len[b] + T) of each row.

The PyTorch implementation is the reference (it clones the buffers: it is for tests, not speed).
The ONNX translation is one GroupQueryAttention node per layer; `seqlens_k = sum(mask) - 1` and
`total_sequence_length = mask.shape[1]` are computed from the mask inside the graph, as
onnxruntime-genai does, so the graph keeps the tensor table's input names. At run time the
engine binds the same memory as past input and present output; GQA (CPU and CUDA) detects the
shared buffer by pointer equality and writes the new K/V in place, so no step copies the cache.

The contract every call must meet (GQA's, checked on ORT 1.32's CPU kernel): all rows have the
same number T of real new tokens (no padding among them) and either T == 1 (batched decode, any
past lengths), or every past length is 0 (first prompt), or B == 1 (a prompt after a past).
So a mixed call (decode rows and a prompt chunk after a past) takes two nodes per layer, one per
group (`mixed_cache_attend`), each over its own view of the same pool.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from export.model import KV, Attend, merge_heads, split_heads

OP_NAME = "gptpipe::static_cache_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def static_cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    attention_mask: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, _ = q.shape
    max_len = past_k.shape[2]
    q, k, v = (split_heads(t, num_heads) for t in (q, k, v))  # (B, nh, T, hs)
    present_k, present_v = past_k.clone(), past_v.clone()  # (B, nh, MAX, hs)
    totals = attention_mask.sum(dim=1).tolist()  # past_len + T per row
    ys = []
    for b, total in enumerate(totals):
        past = int(total) - T
        if past < 0 or total > max_len:
            raise ValueError(
                f"static_cache_attention: row {b} has {int(total)} ones in attention_mask; "
                f"it needs past + {T} new tokens, at most the buffer length {max_len}"
            )
        present_k[b, :, past:total] = k[b]
        present_v[b, :, past:total] = v[b]
        qpos = torch.arange(T, device=q.device).unsqueeze(1) + past  # (T, 1)
        kpos = torch.arange(total, device=q.device).unsqueeze(0)  # (1, total)
        y = F.scaled_dot_product_attention(
            q[b : b + 1], present_k[b : b + 1, :, :total], present_v[b : b + 1, :, :total],
            attn_mask=kpos <= qpos,
        )  # (1, nh, T, hs)
        ys.append(y)
    return merge_heads(torch.cat(ys)), present_k, present_v


@static_cache_attention.register_fake
def _static_cache_attention_fake(q, k, v, past_k, past_v, attention_mask, num_heads):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)



def mixed_cache_attend(past: KV, chunk_past: KV, attention_mask: torch.Tensor, chunk_mask: torch.Tensor,
                       n_head: int, rows: int, tokens: int) -> Attend:
    """The attention of a mixed call: q, k, v (1, rows * tokens + C, E) hold the packed tokens of
    `rows` rows of `tokens` new tokens each, then one prompt chunk of C tokens. Each group goes
    through its own static-cache op (GroupQueryAttention refuses several rows of many tokens
    after a past in one node) over its own past; the outputs are packed again. The present is
    the pair (rows' present, chunk's present)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, KV]:
        n = rows * tokens
        E = q.shape[2]
        group = [t[:, :n].reshape(rows, tokens, E) for t in (q, k, v)]  # (B, T, E) each
        chunk = [t[:, n:] for t in (q, k, v)]  # (1, C, E) each
        y, pk, pv = torch.ops.gptpipe.static_cache_attention(*group, past[0], past[1], attention_mask, n_head)
        yc, ck, cv = torch.ops.gptpipe.static_cache_attention(*chunk, chunk_past[0], chunk_past[1], chunk_mask, n_head)
        return torch.cat([y.reshape(1, n, E), yc], dim=1), ((pk, pv), (ck, cv))  # type: ignore[return-value]

    return attend


# ------------------------------------------------------------------ ONNX translation

MS_DOMAIN = "com.microsoft"
_msft = onnxscript.values.Opset(MS_DOMAIN, 1)
_FP = OpSchema.FormalParameter
# onnx knows no com.microsoft schemas; the tracer needs one for the inputs, outputs and attributes
# this project uses (the full op has more optional inputs: rotary caches, bias, sinks, ...).
_GQA_SCHEMA = OpSchema(
    "GroupQueryAttention",
    MS_DOMAIN,
    1,
    inputs=[
        _FP("query", "T"), _FP("key", "T"), _FP("value", "T"),
        _FP("past_key", "T"), _FP("past_value", "T"),
        _FP("seqlens_k", "M"), _FP("total_sequence_length", "M"),
    ],
    outputs=[_FP("output", "T"), _FP("present_key", "T"), _FP("present_value", "T")],
    type_constraints=[
        ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
        ("M", ["tensor(int32)"], "lengths"),
    ],
    attributes=[
        OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
        OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
    ],
)
_GroupQueryAttention = onnxscript.values.Op(_msft, "GroupQueryAttention", _GQA_SCHEMA)


def static_cache_attention_onnx(q, k, v, past_k, past_v, attention_mask, num_heads: int):
    """The ONNX translation: one GroupQueryAttention node (no rotary: GPT-2 has learned positions).

    The mask-derived lengths appear once per layer here; the exporter's optimiser merges the
    identical subgraphs into one."""
    ones_per_row = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # (B,)
    seqlens_k = op.Cast(op.Sub(ones_per_row, op.Constant(value_int=1)), to=onnx.TensorProto.INT32)
    total = op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0)  # scalar
    total = op.Cast(total, to=onnx.TensorProto.INT32)
    y, present_k, present_v = _GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens_k, total,
        num_heads=num_heads, kv_num_heads=num_heads, _outputs=3,
    )
    return y, present_k, present_v


CUSTOM_TRANSLATION_TABLE = {torch.ops.gptpipe.static_cache_attention.default: static_cache_attention_onnx}
