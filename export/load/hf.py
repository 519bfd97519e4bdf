"""Hugging Face GPT-2 folders: read (config.json + safetensors, shards or pytorch_model.bin) and
write (`save_model`). HF GPT-2 uses Conv1D, whose weights are stored (in, out): they are
transposed for nn.Linear on the way in and back on the way out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from export.config import ACTIVATIONS, GPTConfig
from export.load.state import (
    CONV1D_WEIGHTS,
    CheckpointError,
    PathLike,
    build_model,
    default_eos,
    eos_of,
    expected_shapes,
    to_model_state,
    torch_load,
)
from export.model import GPT
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HF_ACTIVATIONS = tuple(ACTIVATIONS)  # the GELUs export/model.py implements


def load_hf_folder(folder: Path, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    own_tok = None if tok is not None else tokenizer_in(folder)
    where = str(folder / "config.json")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {where}: {e}") from None
    config = config_from_hf(hf, where=where, eos_fallback=eos_of(tok if tok is not None else own_tok))
    raw, weights_file = _read_hf_weights(folder)
    state = to_model_state(raw, config, conv1d=True, source=weights_file)
    log.info("read %d tensors from %s", len(raw), weights_file)
    return build_model(config, state), own_tok


def config_from_hf(hf: Mapping[str, Any], *, where: str, eos_fallback: Optional[int] = None) -> GPTConfig:
    """A GPTConfig from a GPT2Config dict, refusing options export/model.py does not implement."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; only gpt2 is")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise CheckpointError(f"{where}: missing GPT2Config keys {missing}")
    n_embd = hf["n_embd"]
    checks = [  # (key, value, supported?, what is supported)
        ("activation_function", hf.get("activation_function", "gelu_new"),
         lambda v: v in HF_ACTIVATIONS, f"one of {HF_ACTIVATIONS}"),
        ("n_inner", hf.get("n_inner"), lambda v: v is None or v == 4 * n_embd, f"null or 4 * n_embd = {4 * n_embd}"),
        ("scale_attn_weights", hf.get("scale_attn_weights", True), lambda v: v is True, "true"),
        ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False),
         lambda v: v is False, "false"),
        ("add_cross_attention", hf.get("add_cross_attention", False), lambda v: v is False, "false"),
    ]
    for key, value, supported, wanted in checks:
        if not supported(value):
            raise CheckpointError(f"{where}: {key}={value!r} is not supported by this GPT-2 (needs {wanted})")
    vocab_size = hf["vocab_size"]
    try:
        return GPTConfig(
            vocab_size=vocab_size,
            n_positions=hf.get("n_positions", hf.get("n_ctx")),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            bias=True,  # HF GPT-2 always has biases
            activation=hf.get("activation_function", "gelu_new"),
            bos_token_id=_token_id(hf.get("bos_token_id"), vocab_size, eos_fallback, "bos_token_id", where),
            eos_token_id=_token_id(hf.get("eos_token_id"), vocab_size, eos_fallback, "eos_token_id", where),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _token_id(value: Any, vocab_size: int, fallback: Optional[int], field: str, where: str) -> int:
    if isinstance(value, list):  # GPT2Config allows a list of eos ids; GPTConfig holds one
        if len(value) > 1:
            log.warning("%s: %s=%s is a list; using the first", where, field, value)
        value = value[0] if value else None
    if not isinstance(vocab_size, int):
        return 0  # GPTConfig rejects the vocab_size itself, with a clearer message
    if isinstance(value, int) and 0 <= value < vocab_size:
        return value
    if value is not None:
        log.warning("%s: %s=%r is outside the vocabulary (%d)", where, field, value, vocab_size)
    return default_eos(vocab_size, fallback, where=f"{where} ({field})")


def _read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    pt_bin = folder / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(single), str(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            raw: dict[str, torch.Tensor] = {}
            for shard in shards:
                raw.update(load_file(folder / shard))
            return raw, str(index)
        if pt_bin.is_file():
            return torch_load(pt_bin), str(pt_bin)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files: say which file
        raise CheckpointError(f"cannot read the weights in {str(folder)!r}: {type(e).__name__}: {e}") from None
    raise CheckpointError(
        f"folder {str(folder)!r} has config.json but no weights: expected model.safetensors "
        "(or model.safetensors.index.json with shards) or pytorch_model.bin"
    )


def tokenizer_in(folder: Path) -> Optional[Tokenizer]:
    """The tokenizer saved next to the weights: tokenizer.json, or vocab.json + merges.txt."""
    if (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        try:
            return Tokenizer.from_folder(folder)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the tokenizer in {str(folder)!r}: {e}") from None
    log.info("no tokenizer in %s (no tokenizer.json, no vocab.json + merges.txt)", folder)
    return None


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2 names and layout (Conv1D (in, out)); zero biases where the
    model has none (HF GPT-2 always has them, and a zero bias is no bias).

    lm_head.weight is left out, as in HF's own tied GPT-2 checkpoints: safetensors refuses
    tensors that share memory, and from_pretrained re-ties the head to wte."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out[name] = tensor.contiguous().clone()  # own storage: no views of the live model
    if not config.bias:
        dtype = model.transformer.wte.weight.dtype
        for name, shape in expected_shapes(GPTConfig(**{**config.to_dict(), "bias": True})).items():
            if name not in out:
                out[name] = torch.zeros(shape, dtype=dtype)
    return out


def hf_config(config: GPTConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A GPT2Config dict (the keys and defaults of the published gpt2 config.json)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,  # the old name, still read by some tools
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": config.activation,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_model(model: GPT, tokenizer: Optional[Tokenizer], folder: PathLike) -> Path:
    """Write `folder` in the Hugging Face GPT-2 layout; `load_model(folder)` and
    `GPT2LMHeadModel.from_pretrained(folder)` both read it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    dtype = model.transformer.wte.weight.dtype
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})  # transformers wants the format
    (folder / "config.json").write_text(json.dumps(hf_config(model.config, dtype=dtype), indent=2) + "\n")
    if tokenizer is not None:
        (folder / "tokenizer.json").write_text(tokenizer.to_str())
    log.info(
        "saved %d tensors (%s) to %s%s", len(state), str(dtype).removeprefix("torch."), folder,
        " with tokenizer.json" if tokenizer is not None else "",
    )
    return folder
