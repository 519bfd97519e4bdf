"""`load_checkpoint(source)`: a checkpoint folder or file, a hub id or `<preset>-random`, to the
model (eval mode, fp32) and its tokenizer. The 'demo' name is export/sources.py's, above this."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

from export.config import PRESETS, GPTConfig
from export.load.hf import load_hf_folder
from export.load.hub import download, looks_like_hub_id
from export.load.nanogpt import NANOGPT_SUFFIXES, load_nanogpt
from export.load.presets import random_model, random_preset
from export.load.state import (
    RANDOM_SUFFIX,
    CheckpointError,
    PathLike,
    accepted_sources,
    check_tokenizer_fits,
    tokenizer_arg,
)
from export.model import GPT
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# for `<preset>-random` without a tokenizer: one that fits the config, or None
PresetTokenizer = Callable[[GPTConfig], Optional[Tokenizer]]


def load_checkpoint(
    source: PathLike,
    *,
    tokenizer: Union[PathLike, Tokenizer, None] = None,
    preset_tokenizer: Optional[PresetTokenizer] = None,
) -> tuple[GPT, Optional[Tokenizer]]:
    """The model (eval mode, fp32) and its tokenizer (None where the source has none).

    tokenizer: a tokenizer.json file, a folder with tokenizer.json or vocab.json + merges.txt, or
    a Tokenizer; it replaces the source's own (nanoGPT checkpoints carry none).
    preset_tokenizer: gives `<preset>-random` a tokenizer when none is passed.
    """
    tok = tokenizer_arg(tokenizer) if tokenizer is not None else None
    name = str(source)
    path = Path(source).expanduser()
    preset = random_preset(name)
    if preset is not None:
        model = random_model(preset)
        own_tok = preset_tokenizer(model.config) if tok is None and preset_tokenizer is not None else None
    elif path.is_dir():
        model, own_tok = _load_dir(path, tok)
    elif path.is_file():
        model, own_tok = _load_file(path, tok)
    elif name.endswith(RANDOM_SUFFIX):
        preset = name[: -len(RANDOM_SUFFIX)]
        raise CheckpointError(
            f"unknown preset {preset!r} in {name!r}; presets: {', '.join(PRESETS)}. {accepted_sources()}"
        )
    elif looks_like_hub_id(name):
        model, own_tok = _load_dir(download(name), tok)
    else:
        raise CheckpointError(f"{name!r} is not an existing file or folder. {accepted_sources()}")
    return loaded(name, model, tok if tok is not None else own_tok)


def loaded(name: str, model: GPT, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    """The model in eval mode with its tokenizer, checked to fit together, and logged."""
    if tok is not None:
        check_tokenizer_fits(tok, model.config)
    model.eval()
    log.info(
        "loaded %s: %d layers, %d heads, n_embd %d, vocab %d, context %d, %.1fM parameters; tokenizer: %s",
        name, model.config.n_layer, model.config.n_head, model.config.n_embd,
        model.config.vocab_size, model.config.n_positions, model.num_parameters() / 1e6,
        "yes" if tok is not None else "none",
    )
    return model, tok


def _load_dir(folder: Path, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    if (folder / "config.json").is_file():
        return load_hf_folder(folder, tok)
    if (folder / "ckpt.pt").is_file():  # a nanoGPT out_dir
        return _load_file(folder / "ckpt.pt", tok)
    raise CheckpointError(
        f"folder {str(folder)!r} has neither config.json (Hugging Face) nor ckpt.pt (nanoGPT). "
        f"{accepted_sources()}"
    )


def _load_file(path: Path, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    if path.name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        raise CheckpointError(
            f"{str(path)!r} is part of a Hugging Face checkpoint: pass its folder {str(path.parent)!r}"
        )
    if not path.name.endswith(NANOGPT_SUFFIXES):
        raise CheckpointError(f"{str(path)!r} is not a checkpoint this loader reads. {accepted_sources()}")
    return load_nanogpt(path, tok), tok
