"""Graph rewrites after the export: ORT's transformer fusions (with the tanh-GELU -> FastGelu
rewrite they need), the fp16 conversion, int8 dynamic and int4 block-wise quantization of the
MatMul weights."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from export.config import GPTConfig
from export.onnx.export import quiet_toolchain
from export.onnx.graph import ExportError, external_data_path, save_model
from export.onnx.ops import MS_DOMAIN
from serving import tensors

if TYPE_CHECKING:
    from export.model import GPT

LM_HEAD_WEIGHT = "lm_head.weight"  # int8: the head's own (C, V) copy of the tied embedding


def fuse_transformer_ops(proto: onnx.ModelProto, config: GPTConfig) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ORT's transformer fusions (python, no ORT session): Add+LayerNormalization ->
    SkipLayerNormalization (bias folded in), tanh-GELU -> FastGelu (bias folded in).
    Attention fusion is off: attention already is GroupQueryAttention. Returns the fused graph and
    the fused op counts (the FastGelu of an opset >= 20 Gelu counts as fused by the rewrite)."""
    with quiet_toolchain():
        return _fuse(proto, config)


def tanh_gelu_to_fastgelu(proto: onnx.ModelProto) -> int:
    """ONNX `Gelu(approximate="tanh")` (what opset >= 20 exports) -> com.microsoft `FastGelu`.

    ORT's FusionBiasGelu reads every `Gelu` as the exact erf GELU and fuses it into `BiasGelu`
    (erf), silently changing GPT-2's tanh GELU (measured: |Δlogits| 1.1e-5 on the tiny model, 30x
    the fp32 noise). FastGelu is the same tanh formula, and its bias fusion is right."""
    count = 0
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx") and attrs.get("approximate") in (b"tanh", "tanh"):
            node.op_type, node.domain = "FastGelu", MS_DOMAIN
            del node.attribute[:]
            count += 1
    return count


def _fuse(proto: onnx.ModelProto, config: GPTConfig) -> tuple[onnx.ModelProto, dict[str, int]]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    tanh_gelu_to_fastgelu(proto)
    options = FusionOptions("gpt2")
    options.enable_attention = False
    options.enable_embed_layer_norm = False  # BERT's embedding pattern; GPT-2 has none
    optimizer = optimize_model(proto, model_type="gpt2", num_heads=config.n_head,
                               hidden_size=config.n_embd, optimization_options=options, opt_level=0)
    fused = {k: v for k, v in optimizer.get_fused_operator_statistics().items() if v}
    return optimizer.model, fused


# Ops kept in fp32 in the fp16 graph: LayerNorm statistics (a mean of squares overflows fp16 for
# activations above ~256) and what ORT's default block list keeps anyway.
FP16_OP_BLOCK_LIST = ("LayerNormalization", "SkipLayerNormalization")


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations and KV buffers; logits stay fp32 (a Cast at the end)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        proto, keep_io_types=[tensors.LOGITS],
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_OP_BLOCK_LIST))


def untie_lm_head(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give the LM head its own (C, V) weight: `Gemm(h, wte, transB=1)` -> `MatMul(h, wte^T)`.

    The tied embedding is also read by the token Gather, which dynamic quantization leaves in
    fp32; a separate transposed copy lets the biggest MatMul of the model be quantized."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(tensors.LOGITS)
    # fp32/int8 graphs end in the head itself; walk back through a trailing Cast if there is one
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise ExportError(f"cannot find the LM head (Gemm/MatMul producing {tensors.LOGITS!r})")
    inits = {i.name: i for i in graph.initializer}
    if node.op_type == "MatMul" and node.input[1] in inits:
        return proto  # already a MatMul with its own weight
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type != "Gemm" or attrs.get("transB") != 1 or attrs.get("transA", 0) != 0 or len(node.input) > 2 \
            or node.input[1] not in inits or attrs.get("alpha", 1.0) != 1.0:
        raise ExportError(f"unexpected LM head {node.op_type} {attrs} with inputs {list(node.input)}")
    weight = numpy_helper.to_array(inits[node.input[1]])  # (V, C)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), LM_HEAD_WEIGHT))
    matmul = onnx.helper.make_node("MatMul", [node.input[0], LM_HEAD_WEIGHT], list(node.output),
                                   name="lm_head")
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, matmul)
    return proto


# Per-tensor weight scales, full 8-bit range. Measured on this AVX2 (no VNNI) CPU, gpt2 shape,
# worst-position rel_logits: per-tensor 0.046, per-tensor + reduce_range 0.079, per-channel 0.069, per-channel +
# reduce_range 0.056; on tiny, per-channel without reduce_range was 10x worse (0.14) than
# per-tensor (0.018): u8s8 products saturating in the 16-bit VPMADDUBSW sums of MLAS's AVX2 kernel.
INT8_PER_CHANNEL = False
INT8_REDUCE_RANGE = False


def to_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic quantization of every MatMul weight (LM head included): int8 weights, activations
    quantized per call; KV cache, LayerNorms and attention stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = untie_lm_head(proto)
    with tempfile.TemporaryDirectory(prefix="gptpipe-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        save_model(proto, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=INT8_PER_CHANNEL, reduce_range=INT8_REDUCE_RANGE,
                         use_external_data_format=external_data_path(src).exists(),
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst))



# int4: ONNX Runtime's MatMulNBits, the format onnxruntime-genai's model builder writes for CPU:
# 4-bit weights, blocks of 32 along the input dimension, one fp32 scale per block, symmetric.
INT4_BLOCK_SIZE = 32
INT4_SYMMETRIC = True
# accuracy_level 4: activations quantized to int8 per block inside the kernel (MLAS's int8 GEMM,
# VNNI/AMX where the CPU has them); 0 would compute in fp32 from dequantized weights.
INT4_ACCURACY_LEVEL = 4


def to_int4(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Block-wise 4-bit weight-only quantization of every MatMul weight (LM head included, through
    its own copy as in int8) into com.microsoft MatMulNBits; KV cache, LayerNorms, attention,
    embeddings stay fp32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = untie_lm_head(proto)
    with quiet_toolchain():
        quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=INT4_SYMMETRIC,
                                         accuracy_level=INT4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
        quantizer.process()
    out = quantizer.model.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise ExportError("int4 quantization left no MatMulNBits in the graph")
    return out


# int8 KV cache: ONNX Runtime's GroupQueryAttention stores keys and values as int8 with one static
# fp32 scale per (head, channel) (`PER_CHANNEL`, symmetric) and writes each step's new K/V through
# it; the scales come from the fp32 model's own keys and values on calibration tokens, times a
# headroom for values beyond what calibration saw (those saturate at +-127).
KV_INT8_HEADROOM = 1.25
KV_CALIBRATION_ROWS = 4
KV_CALIBRATION_LENGTH = 256


def kv_cache_scales(model: "GPT", text_tokens: Optional[Sequence[int]] = None) -> np.ndarray:
    """The (n_layer, 2, nh, hs) key and value scales: max |K| and |V| per layer, head and channel
    over seeded random prompts (and `text_tokens`, when given) in PyTorch fp32, x headroom / 127."""
    import torch

    c = model.config
    length = min(KV_CALIBRATION_LENGTH, c.n_positions)
    rng = np.random.default_rng(4321)
    batches = [rng.integers(0, c.vocab_size, size=(KV_CALIBRATION_ROWS, length))]
    if text_tokens is not None and len(text_tokens) >= 2:
        batches.append(np.asarray(list(text_tokens)[:length])[None])
    amax = []
    model = model.eval()
    with torch.inference_mode():
        for ids in batches:
            _, presents = model(torch.as_tensor(ids, dtype=torch.long))  # per layer (K, V): (B, nh, T, hs)
            amax.append(torch.stack([torch.stack(kv).abs().amax(dim=(1, 3)) for kv in presents]).numpy())
    return np.maximum(np.max(amax, axis=0) * KV_INT8_HEADROOM / 127.0, 1e-6).astype(np.float32)


def to_int8_kv_cache(proto: onnx.ModelProto, scales: np.ndarray) -> onnx.ModelProto:
    """Every GroupQueryAttention reads and writes an int8 cache: its past/present graph inputs and
    outputs become int8 and each node gets its layer's k_scale / v_scale (1, nh, 1, hs) from
    `scales` (n_layer, 2, nh, hs)."""
    graph = proto.graph
    n_layer, _, n_head, head_dim = scales.shape
    for layer in range(n_layer):
        for kind, s in zip(("key", "value"), scales[layer]):
            graph.initializer.append(numpy_helper.from_array(s.reshape(1, n_head, 1, head_dim),
                                                             f"kv_cache_scale.{layer}.{kind}"))
    layer_of = {prefix + tensors.past_key(l): l for l in range(n_layer) for prefix in ("", tensors.CHUNK_PREFIX)}
    seen = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = layer_of.get(node.input[3])
        if layer is None or len(node.input) != 7:
            raise ExportError(f"unexpected GroupQueryAttention {node.name!r} with inputs {list(node.input)}")
        # optional inputs 7-11 (rotary caches, position ids, bias, sink) stay empty; 12, 13 are the scales
        node.input.extend([""] * 5 + [f"kv_cache_scale.{layer}.key", f"kv_cache_scale.{layer}.value"])
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
        seen += 1
    if seen != 2 * n_layer:
        raise ExportError(f"found {seen} GroupQueryAttention nodes, expected {2 * n_layer} (two per layer)")
    kv_names = {prefix + name for pair in tensors.kv_pairs(n_layer) for name in pair
                for prefix in ("", tensors.CHUNK_PREFIX)}
    for value in list(graph.input) + list(graph.output):
        if value.name in kv_names:
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    return proto
