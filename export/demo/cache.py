"""The trained demo model, cached: `train_demo` trains it once per recipe, `load_demo` returns it.

The result is saved in the Hugging Face GPT-2 layout (export/load: model.safetensors,
config.json, tokenizer.json) plus demo.json (recipe and metrics) under `<cache>/demo-<key>/`,
key = hash of the recipe, the corpus and `CODE_VERSION`; `<cache>` is $GPTPIPE_CACHE, else
$XDG_CACHE_HOME/gptpipe, else ~/.cache/gptpipe. It is written to a temporary folder and renamed
into place, so a half-written cache is never read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from export.config import GPTConfig
from export.demo.corpus import corpus_hash, corpus_topics, join_topics, split_topics
from export.demo.recipe import CODE_VERSION, DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_STEPS, DemoRecipe
from export.demo.tokenizer import train_tokenizer
from export.demo.train import heldout_loss, reproducible, train_model, unigram_loss
from export.load import CheckpointError, load_checkpoint, save_model
from export.load.state import PathLike
from export.model import GPT
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    model: GPT
    tokenizer: Tokenizer
    heldout_loss: float  # nats/token on the held-out topics
    unigram_loss: float  # the baseline, same targets
    train_seconds: float  # model training wall time, when it was trained
    tokenizer_seconds: float
    losses: tuple[float, ...]  # training loss per step
    recipe: DemoRecipe
    folder: Path
    from_cache: bool

    @property
    def heldout_perplexity(self) -> float:
        return math.exp(self.heldout_loss)

    @property
    def unigram_perplexity(self) -> float:
        return math.exp(self.unigram_loss)


def default_cache_dir() -> Path:
    """$GPTPIPE_CACHE, else $XDG_CACHE_HOME/gptpipe, else ~/.cache/gptpipe."""
    if os.environ.get("GPTPIPE_CACHE"):
        return Path(os.environ["GPTPIPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gptpipe"


METRICS_FILE = "demo.json"


def train_demo(
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: bool = True,
    config: Optional[GPTConfig] = None,
    cache_dir: Optional[PathLike] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_size: Optional[int] = None,
    lr: float = DEFAULT_LR,
    warmup_steps: Optional[int] = None,
) -> DemoResult:
    """Train the demo model (tokenizer + GPT), or load it from the cache if this recipe was trained.

    config: the model shape (default: the `demo` preset); the tokenizer gets its vocab_size.
    block_size: the training window (default: config.n_positions). A shorter one is cheaper
    but leaves the position embeddings beyond it untrained.
    cache_dir: where demo-<key>/ goes (default: `default_cache_dir()`).
    """
    config = GPTConfig.from_preset("demo") if config is None else config
    recipe = DemoRecipe(
        config=config,
        steps=steps,
        batch_size=batch_size,
        block_size=block_size,
        lr=lr,
        warmup_steps=warmup_steps,
        seed=seed,
    )
    topics = corpus_topics()
    folder = Path(default_cache_dir() if cache_dir is None else cache_dir) / f"demo-{recipe.cache_key(corpus_hash(topics))}"
    if (folder / METRICS_FILE).is_file():
        return _load_cached(folder, recipe)

    train_keys, heldout_keys = split_topics(topics, heldout_fraction=recipe.heldout_fraction)
    train_text = join_topics([topics[k] for k in train_keys])
    heldout = join_topics([topics[k] for k in heldout_keys])
    log.info(
        "demo corpus: %d train topics (%d chars), %d held-out topics (%d chars)",
        len(train_keys), len(train_text), len(heldout_keys), len(heldout),
    )
    start = time.perf_counter()
    tokenizer = train_tokenizer(train_text, vocab_size=config.vocab_size)
    train_ids, heldout_ids = tokenizer.encode(train_text), tokenizer.encode(heldout)
    tokenizer_seconds = time.perf_counter() - start
    log.info(
        "tokenizer: %d tokens in %.2f s; train %d tokens, held-out %d tokens",
        tokenizer.vocab_size, tokenizer_seconds, len(train_ids), len(heldout_ids),
    )
    model, losses, train_seconds = train_model(train_ids, recipe, progress=progress)
    with reproducible(recipe.seed):
        loss = heldout_loss(model, heldout_ids)
    baseline = unigram_loss(train_ids, heldout_ids, vocab_size=config.vocab_size)
    log.info(
        "demo model: %.2fM parameters, %d steps in %.1f s; held-out loss %.3f (perplexity %.1f), "
        "unigram baseline %.3f (perplexity %.1f)",
        model.num_parameters() / 1e6, recipe.steps, train_seconds, loss, math.exp(loss),
        baseline, math.exp(baseline),
    )
    metrics = dict(
        heldout_loss=loss,
        unigram_loss=baseline,
        train_seconds=train_seconds,
        tokenizer_seconds=tokenizer_seconds,
        losses=losses,
        recipe=recipe.to_dict(),
        code_version=CODE_VERSION,
        train_topics=train_keys,
        heldout_topics=heldout_keys,
        torch_version=torch.__version__,
    )
    _save_atomically(model, tokenizer, metrics, folder)
    return DemoResult(
        model=model, tokenizer=tokenizer, heldout_loss=loss, unigram_loss=baseline,
        train_seconds=train_seconds, tokenizer_seconds=tokenizer_seconds, losses=tuple(losses),
        recipe=recipe, folder=folder, from_cache=False,
    )


def _save_atomically(model: GPT, tokenizer: Tokenizer, metrics: dict[str, Any], folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_model(model, tokenizer, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / METRICS_FILE).is_file():  # not a lost race with another process
                raise
            log.info("another process cached %s first; keeping its copy", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the demo model in %s", folder)


def _load_cached(folder: Path, recipe: DemoRecipe) -> DemoResult:
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
        model, tokenizer = load_checkpoint(folder)
        if tokenizer is None:
            raise CheckpointError("no tokenizer.json")
        result = DemoResult(
            model=model, tokenizer=tokenizer, heldout_loss=metrics["heldout_loss"],
            unigram_loss=metrics["unigram_loss"], train_seconds=metrics["train_seconds"],
            tokenizer_seconds=metrics["tokenizer_seconds"], losses=tuple(metrics["losses"]),
            recipe=recipe, folder=folder, from_cache=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as e:  # CheckpointError is a ValueError
        raise CheckpointError(
            f"the cached demo model in {folder} cannot be loaded ({type(e).__name__}: {e}); "
            "delete that folder to train it again"
        ) from e
    log.info(
        "loaded the cached demo model from %s (held-out loss %.3f, unigram baseline %.3f)",
        folder, result.heldout_loss, result.unigram_loss,
    )
    return result


def load_demo(*, progress: bool = True) -> tuple[GPT, Tokenizer]:
    """The demo model (eval mode) and its tokenizer: trained on first use (~2.5 minutes on
    2 CPU cores), then loaded from the cache."""
    result = train_demo(progress=progress)
    return result.model, result.tokenizer
