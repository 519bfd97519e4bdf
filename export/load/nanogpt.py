"""nanoGPT checkpoints: `ckpt.pt` with `model_args` + `model` (possibly with torch.compile's
`_orig_mod.` prefix), read with torch.load(weights_only=True)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from export.config import GPTConfig
from export.load.state import CheckpointError, build_model, default_eos, eos_of, to_model_state, torch_load
from export.model import GPT
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NANOGPT_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_nanogpt(path: Path, tok: Optional[Tokenizer]) -> GPT:
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a nanoGPT checkpoint: expected a dict with 'model_args' and "
            f"'model', got {keys}"
        )
    config = config_from_nanogpt(ckpt["model_args"], where=str(path), eos_fallback=eos_of(tok))
    state = to_model_state(ckpt["model"], config, conv1d=False, source=str(path))
    log.info("read %d tensors from %s (iter_num %s)", len(ckpt["model"]), path, ckpt.get("iter_num", "?"))
    return build_model(config, state)


def config_from_nanogpt(args: Mapping[str, Any], *, where: str, eos_fallback: Optional[int] = None) -> GPTConfig:
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise CheckpointError(f"{where}: model_args lacks {missing}")
    vocab_size = args["vocab_size"]
    try:
        eos = default_eos(vocab_size, eos_fallback, where=where) if isinstance(vocab_size, int) else 0
        return GPTConfig(
            vocab_size=vocab_size,
            n_positions=args["block_size"],
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            n_embd=args["n_embd"],
            bias=bool(args.get("bias", True)),
            activation="gelu",  # nanoGPT's MLP uses the exact (erf) GELU
            bos_token_id=eos,
            eos_token_id=eos,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
