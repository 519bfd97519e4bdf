"""What every checkpoint format shares: the error type, checkpoint tensors -> our checked
state dict, the model built from it, and the tokenizer checks."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from export.config import PRESETS, GPTConfig
from export.model import GPT
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint source that cannot be loaded, with the reason and what is accepted."""


RANDOM_SUFFIX = "-random"
# HF GPT-2's Conv1D stores weights (in, out); nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers, not weights (HF GPT-2 `attn.bias`/`attn.masked_bias`, nanoGPT `attn.bias`)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
GPT2_EOT = 50256  # GPT-2's <|endoftext|>, also nanoGPT's (tiktoken gpt2)


def accepted_sources() -> str:
    presets = ", ".join(f"{name}{RANDOM_SUFFIX}" for name in PRESETS)
    return (
        "accepted sources: a Hugging Face GPT-2 folder (config.json + model.safetensors or "
        "pytorch_model.bin); a nanoGPT checkpoint file (ckpt.pt) or its out_dir; a Hugging Face "
        "hub id (e.g. 'gpt2', 'openai-community/gpt2'); 'demo'; or a preset with random weights: "
        f"{presets}"
    )


def default_eos(vocab_size: int, fallback: Optional[int], *, where: str) -> int:
    """The end-of-text id where a checkpoint names none: the tokenizer's, GPT-2's, or 0."""
    if fallback is not None and 0 <= fallback < vocab_size:
        return fallback
    if GPT2_EOT < vocab_size:
        return GPT2_EOT
    log.warning("%s: no end-of-text token known for vocab %d; using id 0 (pass a tokenizer)", where, vocab_size)
    return 0


def torch_load(path: Path) -> Any:
    # weights_only: unpickling arbitrary objects runs arbitrary code. nanoGPT's ckpt.pt (model_args,
    # model, optimizer, config, iter_num, best_val_loss) holds only tensors and plain containers.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle at all: garbage, truncated, another format
            reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.S)
            detail = reason.group(1) if reason else type(e).__name__
            raise CheckpointError(
                f"cannot read {str(path)!r}: not a torch.save checkpoint, or a damaged one ({detail})"
            ) from None
        raise CheckpointError(
            f"{str(path)!r} holds a {found.group(1)} object; torch.load(weights_only=True) unpickles "
            "only tensors and plain containers, and this loader will not run arbitrary unpickling "
            "code. nanoGPT's own ckpt.pt is plain data; re-save this one as such, e.g. "
            "torch.save({'model_args': dict(...), 'model': model.state_dict()}, path)."
        ) from None
    except Exception as e:
        raise CheckpointError(f"cannot read {str(path)!r} with torch.load: {type(e).__name__}: {e}") from None


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def canonical_name(key: str) -> str:
    """Our state-dict name for a checkpoint key (wrapper prefixes off, `transformer.` on)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    if key == "lm_head.weight" or key.startswith("transformer."):
        return key
    return "transformer." + key  # GPT2Model checkpoints (the hub's gpt2) have no prefix


def to_model_state(
    raw: Mapping[str, torch.Tensor], config: GPTConfig, *, conv1d: bool, source: str
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our state dict (fp32, nn.Linear layout), checked against config.

    conv1d: the checkpoint stores the four projection weights (in, out) (HF GPT-2)."""
    expected = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    lm_head: Optional[tuple[str, torch.Tensor]] = None
    for key, tensor in raw.items():
        name = canonical_name(key)
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight":
            lm_head = (key, tensor)
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        transpose = conv1d and name.endswith(CONV1D_WEIGHTS)
        want = expected[name][::-1] if transpose else expected[name]  # in the checkpoint's layout
        if tuple(tensor.shape) != want:
            raise CheckpointError(_shape_message(source, key, want, tuple(tensor.shape), config, transpose))
        tensor = tensor.t() if transpose else tensor
        state[name] = tensor.to(torch.float32).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {sorted(unexpected)}")
        raise CheckpointError(f"{source}: {'; '.join(parts)} (config: {_shape_summary(config)})")
    if lm_head is not None:
        _check_tied(lm_head, state["transformer.wte.weight"], source)
    return state


def _check_tied(lm_head: tuple[str, torch.Tensor], wte: torch.Tensor, source: str) -> None:
    key, tensor = lm_head
    if tuple(tensor.shape) != tuple(wte.shape):
        raise CheckpointError(
            f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(wte.shape)} (tied with wte)"
        )
    if not torch.equal(tensor.to(torch.float32), wte):
        raise CheckpointError(
            f"{source}: {key!r} differs from the token embedding; this GPT-2 ties the LM head to "
            "transformer.wte.weight and cannot hold a separate one"
        )


def _shape_summary(config: GPTConfig) -> str:
    return (
        f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
        f"vocab_size={config.vocab_size}, n_positions={config.n_positions}"
    )


def _shape_message(
    source: str, key: str, want: tuple[int, ...], got: tuple[int, ...], config: GPTConfig, transpose: bool
) -> str:
    layout = " (Conv1D layout: (in, out))" if transpose else ""
    return (
        f"{source}: tensor {key!r} has shape {got}, expected {want}{layout} for the config "
        f"({_shape_summary(config)})"
    )


def build_model(config: GPTConfig, state: Mapping[str, torch.Tensor]) -> GPT:
    """A GPT holding exactly `state` (already checked): built on the meta device, so the random
    init of a large model is skipped, then the tensors are assigned."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def tokenizer_arg(tokenizer: Union[PathLike, Tokenizer]) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = Path(tokenizer).expanduser()
    try:
        if path.is_dir():
            return Tokenizer.from_folder(path)
        if path.is_file():
            return Tokenizer.from_file(path)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer {str(path)!r}: {type(e).__name__}: {e}") from None
    raise CheckpointError(
        f"tokenizer {str(tokenizer)!r} is not an existing file or folder: pass a tokenizer.json "
        "or a folder with tokenizer.json or vocab.json + merges.txt"
    )


def eos_of(tok: Optional[Tokenizer]) -> Optional[int]:
    return None if tok is None else tok.eos_token_id


def check_tokenizer_fits(tok: Tokenizer, config: GPTConfig) -> None:
    """Every id the tokenizer can produce must have an embedding row (the model may have more)."""
    size = tok.vocab_size
    if size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}: "
            "they do not belong together"
        )
