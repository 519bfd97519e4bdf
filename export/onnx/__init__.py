"""PyTorch GPT -> ONNX with a KV cache, in the order the stages run: export (torch.export, the
static-cache and dynamic graphs) -> optimise (fusions, fp16, int8, int4) -> validate (against PyTorch,
through the engine that serves it); `export_onnx` runs them all.

Two graphs, one tensor table (serving/tensors.py names and shapes every input and output):

- `kv_cache="static"` (the ONNX Runtime serving graph): each layer's attention is ONNX Runtime's
  `com.microsoft::GroupQueryAttention` (ops.py) over preallocated (B, nh, MAX, hs) buffers that
  are both past input and present output; IO binding aliases them, so a decode step writes one
  position per layer in place instead of copying the cache. Plus ORT's transformer fusions
  (SkipLayerNormalization, FastGelu).
- `kv_cache="dynamic"` (portable: TensorRT and any runtime): `GPT.forward(..., last_only=True)` as
  is — past ++ new by Concat, standard ONNX ops only, no contrib fusions.

Both return the last position's logits only, (B, V), in float32 for every precision (the sampler
sees one dtype everywhere): fp32 is the reference; fp16 has fp16 weights, activations and KV
cache with LayerNorms in fp32; int8 quantizes the MatMul weights (the LM head through its own
transposed copy of the tied embedding) and keeps activations and KV in fp32; int4 does the same
with ONNX Runtime's 4-bit block-wise `MatMulNBits` (blocks of 32, onnxruntime-genai's format).

Every export is validated (unless told not to) by `validate_onnx`; see its docstring for the checks
and the tolerances.

Modules: graph (what the stages share: precisions, the I/O table, the file on disk), ops (the
static-cache attention op), export, optimise, validate, pipeline (`export_onnx`, `ExportResult`).
"""

from export.onnx.export import DEFAULT_OPSET, check_opset
from export.onnx.graph import KV_CACHE_DTYPES, KV_CACHES, PRECISIONS, ExportError
from export.onnx.optimise import to_fp16, to_int4, to_int8
from export.onnx.pipeline import ExportResult, export_onnx
from export.onnx.validate import TOLERANCES, Tolerance, ValidationError, ValidationReport, validate_onnx

__all__ = [
    "DEFAULT_OPSET", "KV_CACHE_DTYPES", "KV_CACHES", "PRECISIONS", "TOLERANCES", "ExportError", "ExportResult", "Tolerance",
    "ValidationError", "ValidationReport", "check_opset", "export_onnx", "to_fp16", "to_int4", "to_int8", "validate_onnx",
]
