"""The PyTorch baselines of `gptpipe bench`: transformers' generate, this project's torch loop, torch's bandwidth.

serving.bench.baselines imports this lazily (serving never imports torch); of serving, this imports
only the bench's low, torch-free `serving.bench.stats`, so there is no import circle.

1. Hugging Face `transformers` `GPT2LMHeadModel.generate` (eager, its own KV cache), with the
   same weights written as a Hugging Face folder and read back with `from_pretrained`;
2. this project's PyTorch loop (`export.model`: prefill, then one token at a time with the
   explicit KV cache, as `generate_greedy` does);
3. torch's own read bandwidth (`torch.sum` over a 512 MiB buffer), next to numpy's.

Both generation baselines stamp the time of each new token, so they yield the same
`serving.bench.stats.RequestTiming` as the served paths and are summarised the same way.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from export.model import GPT
from serving.bench.stats import RequestTiming

logger = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """Intra-op threads, as the server's ONNX Runtime session gets them."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


class _TokenClock:
    """A transformers streamer that stamps each new token's arrival.

    `generate` calls put() once with the prompt, then once per new token (batch 1)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now)
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def write_hf_folder(source: str, folder: Path | str) -> Path:
    """The source's weights (and tokenizer, where it has one) as a Hugging Face folder, the input
    of the peer engines' converters; a folder already written from the same source is kept."""
    from export.load import save_model
    from export.sources import load_model

    folder = Path(folder)
    marker = folder / "gptpipe-source.txt"
    if (folder / "model.safetensors").is_file() and marker.is_file() and marker.read_text() == str(source):
        return folder
    model, tokenizer = load_model(source)
    save_model(model.float().eval(), tokenizer, folder)
    marker.write_text(str(source))
    return folder


def load_transformers_model(hf_dir: Path | str, *, threads: int) -> Any:
    """GPT2LMHeadModel from a Hugging Face folder, eval mode, eager attention, fp32."""
    from transformers import GPT2LMHeadModel

    set_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # Exactly max_new_tokens tokens, whatever the model says: no eos stop (a random model
    # may hit it), and no min-length processor in the loop either.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def transformers_generate(model: Any, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
    """One greedy `generate(use_cache=True)` call, timed token by token."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    clock = _TokenClock()
    sent = time.perf_counter()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
        use_cache=True, streamer=clock,
    )
    return RequestTiming(sent=sent, token_times=tuple(clock.times), prompt_tokens=len(prompt),
                         tokens=tuple(clock.tokens))


@torch.inference_mode()
def torch_loop_generate(model: GPT, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
    """`export.model.generate_greedy`'s loop (no eos stop), with a time stamp per token."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    times: list[float] = []
    tokens: list[int] = []
    sent = time.perf_counter()
    logits, past = model(ids, last_only=True)
    for _ in range(max_tokens):
        token = int(logits[0].argmax())
        times.append(time.perf_counter())
        tokens.append(token)
        if len(tokens) == max_tokens:
            break
        logits, past = model(torch.tensor([[token]]), past_key_values=past, last_only=True)
    return RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=len(prompt), tokens=tuple(tokens))


def torch_read_bandwidth(*, megabytes: int = 512, repeats: int = 5, threads: int = 1) -> float:
    """Bytes/s of `torch.sum` over a float32 buffer (best of `repeats`)."""
    set_threads(threads)
    buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


@contextmanager
def torch_models(source: str, *, threads: int) -> Iterator[tuple[GPT, Any]]:
    """(this project's GPT, transformers' GPT2LMHeadModel) with the same weights: `load_model`
    of the source, written with `save_model` as a Hugging Face folder, read back with
    `from_pretrained`. The folder is temporary."""
    from export.load import save_model
    from export.sources import load_model

    set_threads(threads)
    model, _ = load_model(source)
    model = model.float().eval()
    with tempfile.TemporaryDirectory(prefix="gptpipe-bench-hf-") as folder:
        save_model(model, None, folder)
        hf_model = load_transformers_model(folder, threads=threads)
    yield model, hf_model
