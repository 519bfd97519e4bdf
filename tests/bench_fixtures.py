"""A tiny model exported, written as a model repository and as a Hugging Face folder (the same
weights), for the benchmark tests that serve it with a real tritonserver; `gptpipe bench` for CliRunner."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from export.config import GPTConfig
from export.load import save_model
from export.model import GPT
from export.onnx import export_onnx
from serving.commands.bench import bench as bench_command
from serving.repository import ServingOptions, write_repository
from tests.conftest import train_tokenizer


def tiny_bench_repository(root: Path, *, max_sequences: int = 4, seed: int = 0) -> tuple[GPT, Path, Path]:
    """(the model, its model repository, its Hugging Face folder) under root."""
    torch.manual_seed(seed)
    config = GPTConfig.from_preset("tiny")
    model = GPT(config).eval()
    exported = export_onnx(model, root / "export" / "gpt.onnx", validate=False)
    repository = write_repository(root / "repo", engine_file=exported.path,
                                  tokenizer_json=train_tokenizer(config.vocab_size).to_str(),
                                  model_config=config.to_dict(),
                                  # prompts over 16 tokens are prefilled in chunks beside a decoding stream (both loops, real server)
                                  options=ServingOptions(max_sequences=max_sequences, max_num_batched_tokens=16))
    checkpoint = save_model(model, None, root / "hf")  # the same weights, for the baselines and peers
    return model, repository, checkpoint


def bench_cli() -> typer.Typer:
    """`gptpipe bench` alone, for typer's CliRunner."""
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.callback()(lambda: None)  # keep `bench` a subcommand, as in `gptpipe bench`
    return app
