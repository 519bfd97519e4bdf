"""Checkpoint loading and saving: Hugging Face folders, nanoGPT ckpt.pt, hub ids, `<preset>-random`.

`load_checkpoint(source)` reads every source but 'demo' (export/sources.py's `load_model` adds
it, above both this package and export/demo); `save_model` writes the Hugging Face layout
(model.safetensors with Conv1D (in, out) weights, config.json, tokenizer.json) that
`transformers.GPT2LMHeadModel.from_pretrained` reads.
"""

from export.load.checkpoint import load_checkpoint
from export.load.hf import config_from_hf, save_model, tokenizer_in
from export.load.hub import download, hub_offline, hub_reachable, looks_like_hub_id
from export.load.nanogpt import config_from_nanogpt
from export.load.state import CheckpointError, accepted_sources

__all__ = [
    "CheckpointError",
    "accepted_sources",
    "config_from_hf",
    "config_from_nanogpt",
    "download",
    "hub_offline",
    "hub_reachable",
    "load_checkpoint",
    "looks_like_hub_id",
    "save_model",
    "tokenizer_in",
]
