"""export/onnx/optimise.py through export_onnx, against PyTorch: the tanh GELU kept through the
fusions at opset 21, the fp16 graph, the int8 and int4 graphs (their LM heads quantized too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.model import GPT
from export.onnx import TOLERANCES, ValidationError, export_onnx, validate_onnx
from export.onnx.optimise import INT4_BLOCK_SIZE, LM_HEAD_WEIGHT
from serving.engine.runtime import OrtRuntime
from tests.onnx_export_fixtures import graph, model, randomize_aux, text_tokens  # noqa: F401 (fixtures)


def test_static_export_at_opset_21_keeps_the_tanh_gelu(model: GPT, tmp_path: Path) -> None:
    """Opset >= 20 exports GELU as `Gelu(approximate="tanh")`, which ORT's bias-GELU fusion
    would turn into the erf GELU (BiasGelu): |Δlogits| ~1e-5 here — inside the 1e-4 limit, so
    this test asserts the graph and the fp32 noise level (~4e-7) instead."""
    result = export_onnx(model, tmp_path / "gpt.onnx", opset=21)
    ops = result.fusions["op_counts_after"]
    assert "BiasGelu" not in ops and "Gelu" not in ops and ops["FastGelu"] == model.config.n_layer
    assert {p.domain or "ai.onnx": p.version for p in onnx.load(str(result.path)).opset_import}["ai.onnx"] == 21
    assert result.validation.overall.max_abs_logits < 2e-6


# ------------------------------------------------------------------ precisions


def test_fp16_static_export_validates(model: GPT, text_tokens, tmp_path: Path) -> None:
    result = export_onnx(model, tmp_path / "gpt.onnx", precision="fp16", text_tokens=text_tokens)
    rt = OrtRuntime(result.path)
    assert rt.kv_dtype == np.float16 and rt.logits_dtype == np.float32
    report = result.validation
    assert report.overall.rel_logits <= TOLERANCES["fp16"].max_rel_logits
    assert report.overall.agreement >= TOLERANCES["fp16"].min_agreement
    assert report.perplexity.rel_change <= TOLERANCES["fp16"].max_rel_ppl
    ops = {n.op_type for n in graph(result).node}
    assert "GroupQueryAttention" in ops
    # the weights are stored in fp16: half the fp32 bytes (the whole file's size also counts the
    # graph's nodes, a large share for the tiny model, larger since mixed calls' second group)
    weights = [onnx.numpy_helper.to_array(t) for t in graph(result).initializer]
    float_bytes = sum(w.nbytes for w in weights if w.dtype.kind == "f")
    assert float_bytes < 0.55 * sum(p.numel() * 4 for p in model.parameters()), float_bytes
    # a graph of another model fails the fp16 checks: they are not vacuous on random weights
    other = randomize_aux(GPT(model.config), seed=2).eval()
    with pytest.raises(ValidationError, match=r"check 'all checks \(\d+ positions\)': rms\(Δlogits\)"):
        validate_onnx(result.path, other, precision="fp16")


def test_int8_static_export_validates_and_quantizes_the_lm_head(model: GPT, text_tokens, tmp_path: Path) -> None:
    result = export_onnx(model, tmp_path / "gpt.onnx", precision="int8", text_tokens=text_tokens)
    rt = OrtRuntime(result.path)
    assert rt.kv_dtype == np.float32 and rt.logits_dtype == np.float32
    g = graph(result)
    ops = [n.op_type for n in g.node]
    assert "MatMul" not in ops and "Gemm" not in ops, "a float MatMul was left unquantized"
    assert ops.count("MatMulInteger") == 4 * model.config.n_layer + 1  # c_attn, c_proj, c_fc, c_proj; head
    inits = {i.name: i for i in g.initializer}
    head = [n for n in g.node if n.op_type == "MatMulInteger" and n.input[1].startswith(LM_HEAD_WEIGHT)]
    assert len(head) == 1 and inits[head[0].input[1]].data_type == onnx.TensorProto.INT8
    report = result.validation
    assert report.overall.rel_logits <= TOLERANCES["int8"].max_rel_logits
    assert report.perplexity.rel_change <= TOLERANCES["int8"].max_rel_ppl


def test_int4_static_export_validates_and_quantizes_every_matmul_blockwise(model: GPT, text_tokens,
                                                                          tmp_path: Path) -> None:
    result = export_onnx(model, tmp_path / "gpt.onnx", precision="int4", text_tokens=text_tokens)
    rt = OrtRuntime(result.path)
    assert rt.kv_dtype == np.float32 and rt.logits_dtype == np.float32
    g = graph(result)
    ops = [n.op_type for n in g.node]
    assert "MatMul" not in ops and "Gemm" not in ops and "MatMulInteger" not in ops
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * model.config.n_layer + 1  # c_attn, c_proj, c_fc, c_proj; head
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"]) == (4, INT4_BLOCK_SIZE)
    head = [n for n in nbits if n.input[1].startswith(LM_HEAD_WEIGHT)]
    assert len(head) == 1 and {a.name: a.i for a in head[0].attribute}["N"] == model.config.vocab_size
    inits = {i.name: i for i in g.initializer}
    assert inits[head[0].input[1]].data_type == onnx.TensorProto.UINT8  # two 4-bit weights a byte
    report = result.validation
    assert report.overall.rel_logits <= TOLERANCES["int4"].max_rel_logits
    assert report.perplexity.rel_change <= TOLERANCES["int4"].max_rel_ppl
    # int4 is coarser than int8, but not random: a graph of another model fails its checks
    other = randomize_aux(GPT(model.config), seed=2).eval()
    with pytest.raises(ValidationError, match=r"check 'all checks \(\d+ positions\)': rms\(Δlogits\)"):
        validate_onnx(result.path, other, precision="int4")


# ------------------------------------------------------------------ int8 KV cache


# rms(dequantized cache - PyTorch's K/V) / rms(PyTorch's), measured on the tiny model: 0.014-0.016
# (int8) and 0.082-0.103 (int4, mostly its weights' own rounding)
KV_REL_LIMIT = {"int8": 0.05, "int4": 0.3}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_kv_cache_export_validates_and_stores_pytorchs_keys_in_int8(model: GPT, text_tokens, tmp_path: Path,
                                                                         precision: str) -> None:
    import torch

    result = export_onnx(model, tmp_path / "gpt.onnx", precision=precision, text_tokens=text_tokens,
                         kv_cache_dtype="int8")
    assert result.kv_cache_dtype == "int8"
    rt = OrtRuntime(result.path)
    assert rt.kv_dtype == np.int8 and rt.logits_dtype == np.float32
    assert rt.metadata["gptpipe.kv_cache_dtype"] == "int8"
    gqa = [n for n in graph(result).node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 * model.config.n_layer
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["k_quant_type"], attrs["v_quant_type"], attrs["kv_cache_bit_width"]) == (b"PER_CHANNEL", b"PER_CHANNEL", 8)
    tol = TOLERANCES[precision]
    report = result.validation
    assert report.overall.rel_logits <= tol.max_rel_logits
    assert report.overall.agreement is None or report.overall.agreement >= tol.min_agreement
    assert report.perplexity.rel_change <= tol.max_rel_ppl
    # the pool holds PyTorch's keys and values through the graph's scales: dequantized, they are
    # within the rounding of the weights (int8, int4) and of the cache's own int8 steps
    pool = rt.new_pool(max_sequences=2, max_length=64)
    float_pool = np.zeros(pool.shape, np.float32).nbytes * 2 * pool.n_layer
    assert pool.nbytes * 4 == float_pool
    prompt = np.asarray(text_tokens[:20])[None]
    rt.step(prompt, pool=pool, slot_start=1, past_lengths=[0])
    with torch.inference_mode():
        _, presents = model.eval()(torch.as_tensor(prompt))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph(result).initializer}
    for layer, (k, v) in enumerate(presents):
        for kind, ref, got in (("key", k, pool.keys[layer]), ("value", v, pool.values[layer])):
            scale = inits[f"kv_cache_scale.{layer}.{kind}"]  # (1, nh, 1, hs)
            ref = ref.numpy()
            dequantized = got[1:2, :, :20].astype(np.float32) * scale
            rel = float(np.sqrt(np.mean((dequantized - ref) ** 2) / np.mean(ref ** 2)))
            assert rel < KV_REL_LIMIT[precision], (layer, kind, rel)
            assert np.abs(got[1:2, :, :20]).max() > 40  # the scales use the int8 range
            assert not got[0].any()  # the other slot was not touched


@pytest.mark.parametrize("kwargs,message", [
    (dict(precision="fp32", kv_cache_dtype="int8"), "int8 needs the static cache and precision int8 or int4"),
    (dict(precision="int8", kv_cache="dynamic", kv_cache_dtype="int8"), "got the dynamic cache and int8"),
    (dict(precision="int8", kv_cache_dtype="fp8"), "kv_cache_dtype must be one of auto, int8"),
])
def test_int8_kv_cache_is_refused_where_it_does_not_apply(model: GPT, tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "gpt.onnx", **kwargs)
    assert not (tmp_path / "gpt.onnx").exists()
