"""`load_model(source)`: every model source by name, above export/load and export/demo.

It accepts:
- a Hugging Face GPT-2 folder: config.json + model.safetensors (or shards, or pytorch_model.bin);
- a Hugging Face hub id (`gpt2`, `openai-community/gpt2`), downloaded with huggingface_hub;
- a nanoGPT `ckpt.pt` (`model_args` + `model`, possibly with torch.compile's `_orig_mod.` prefix);
- `demo`: the demo model of export/demo (trained on first use, then cached);
- `<preset>-random`: a preset's shape with seeded random weights (benchmarks without downloads).
"""

from __future__ import annotations

from typing import Optional, Union

from export.config import PRESETS, GPTConfig
from export.demo import load_demo, load_demo_tokenizer
from export.load import load_checkpoint
from export.load.checkpoint import loaded
from export.load.state import PathLike, tokenizer_arg
from export.model import GPT
from serving.tokenizer import Tokenizer


def load_model(
    source: PathLike, *, tokenizer: Union[PathLike, Tokenizer, None] = None
) -> tuple[GPT, Optional[Tokenizer]]:
    """The model (eval mode, fp32) and its tokenizer (None where the source has none).

    tokenizer: a tokenizer.json file, a folder with tokenizer.json or vocab.json + merges.txt, or
    a Tokenizer; it replaces the source's own (nanoGPT checkpoints carry none).
    """
    if str(source) != "demo":
        return load_checkpoint(source, tokenizer=tokenizer, preset_tokenizer=_demo_tokenizer_if_fits)
    tok = tokenizer_arg(tokenizer) if tokenizer is not None else None
    model, own_tok = load_demo()
    return loaded("demo", model.float(), tok if tok is not None else own_tok)


def _demo_tokenizer_if_fits(config: GPTConfig) -> Optional[Tokenizer]:
    """Random weights still want a tokenizer to turn text into ids: the demo's, where it fits."""
    if config.vocab_size != PRESETS["demo"]["vocab_size"]:
        return None
    return load_demo_tokenizer()
