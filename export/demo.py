"""The demo model: a small GPT trained offline, in about two minutes on two CPU cores.

Corpus: the English help topics of `pydoc_data.topics` (~465 KB, in every CPython), so the
main job needs no download. The held-out split is whole topics: the topics first in the
order of sha256(topic key) until they hold at least `HELDOUT_FRACTION` of the characters
(~5 %). Ordering by a hash of the key, not by position in the sorted key list, keeps a
topic on the same side of the split in every CPython version, whatever topics it adds.

Tokenizer: a byte-level BPE (GPT-2's scheme) trained with `tokenizers` on the train split,
`<|endoftext|>` as special token id 0. Topics are joined with `<|endoftext|>`.

Model: the `demo` preset of export/config.py, trained with AdamW and a cosine learning rate
with linear warmup, on random windows of the train token stream drawn from a seeded
generator. Training is deterministic for a seed (fixed thread count, deterministic
algorithms, seeded init and batches); the step count is fixed, not a time budget, so the
result does not depend on the machine's speed.

Cache: the result is saved in the Hugging Face GPT-2 layout (export/checkpoints.py:
model.safetensors, config.json, tokenizer.json) plus demo.json (recipe and metrics) under
`<cache>/demo-<key>/`, key = hash of the recipe, the corpus and `CODE_VERSION`; `<cache>` is
$GPTPIPE_CACHE, else $XDG_CACHE_HOME/gptpipe, else ~/.cache/gptpipe. It is written to a
temporary folder and renamed into place, so a half-written cache is never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import decoders, models, pre_tokenizers, trainers

from export.checkpoints import CheckpointError, load_model, save_model
from export.config import GPTConfig
from export.model import GPT, KV, merge_heads, split_heads
from serving.tokenizer import EOS_TOKEN, Tokenizer

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Bump when a change to this file changes what training produces: it is part of the cache key.
CODE_VERSION = 2
HELDOUT_FRACTION = 0.05  # of the corpus characters, as whole topics
THREADS = 2  # CPU results depend on the thread count (reduction order): fixed for reproducibility

# The default recipe, tuned for the best held-out loss in ~2.5 minutes on 2 CPU cores.
DEFAULT_STEPS = 850  # 150-160 s on 2 idle cores (measured: ~0.18 s per step)
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 3e-3
MIN_LR_RATIO = 0.1  # the cosine decays to lr * MIN_LR_RATIO
WEIGHT_DECAY = 0.1  # on matrices only (nanoGPT): not on biases, LayerNorm or positions
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
EVAL_BATCH_SIZE = 8


# ----------------------------------------------------------------------------- corpus


def corpus_topics() -> dict[str, str]:
    """The help topics of this CPython: topic key -> English text, paragraphs unwrapped."""
    from pydoc_data.topics import topics

    return {key: unwrap(text) for key, text in topics.items()}


_RULE = re.compile(r"[*=~^-]+")  # a heading's underline


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of prose paragraphs; keep indented blocks (code, grammar)
    line by line. A small model trained on hard-wrapped text spends its capacity guessing
    where a 70-column line breaks, and its greedy output falls into loops of newlines."""
    paragraphs = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if any(line.startswith(" ") or _RULE.fullmatch(line) for line in lines) or not para.strip():
            paragraphs.append(para.strip("\n"))
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(p for p in paragraphs if p)


def split_topics(topics: dict[str, str], *, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train keys, held-out keys), each sorted; disjoint, together all keys.

    Held out: the keys first in sha256 order until they hold >= heldout_fraction of the characters.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(topics) < 2:
        raise ValueError(f"the corpus needs at least 2 topics to split, got {len(topics)}")
    total = sum(len(text) for text in topics.values())
    heldout: list[str] = []
    size = 0
    for key in sorted(topics, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest()):
        if size >= heldout_fraction * total or len(heldout) == len(topics) - 1:
            break
        heldout.append(key)
        size += len(topics[key])
    held = set(heldout)
    return sorted(k for k in topics if k not in held), sorted(heldout)


def join_topics(texts: Sequence[str]) -> str:
    """Topics separated by <|endoftext|>, as GPT-2 separates documents."""
    return EOS_TOKEN.join(texts)


def demo_texts() -> tuple[str, str]:
    """(train text, held-out text): topics in sorted key order, joined with <|endoftext|>."""
    topics = corpus_topics()
    train_keys, heldout_keys = split_topics(topics)
    return join_topics([topics[k] for k in train_keys]), join_topics([topics[k] for k in heldout_keys])


def heldout_text() -> str:
    """The held-out text, never trained on (tokenizer or model): for perplexity checks."""
    return demo_texts()[1]


def corpus_hash(topics: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(topics):
        for part in (key, topics[key]):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no ambiguous joins
    return h.hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_text: str, *, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with <|endoftext|> as id 0, trained on train_text (deterministic)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown text
        show_progress=False,
    )
    # the special token is matched before pre-tokenization, so no merge crosses a topic boundary
    backend.train_from_iterator(train_text.split(EOS_TOKEN), trainer=trainer)
    tok = Tokenizer(backend)
    if tok.eos_token_id != 0:
        raise RuntimeError(f"{EOS_TOKEN} got id {tok.eos_token_id}, expected 0")
    if tok.vocab_size < vocab_size:
        log.warning("the corpus yields only %d BPE tokens of the %d asked for", tok.vocab_size, vocab_size)
    return tok


@functools.lru_cache(maxsize=4)
def _demo_tokenizer(vocab_size: int, corpus: str) -> Tokenizer:
    del corpus  # only part of the lru_cache key: a different corpus is a different tokenizer
    return train_tokenizer(demo_texts()[0], vocab_size=vocab_size)


def load_demo_tokenizer(*, vocab_size: Optional[int] = None) -> Tokenizer:
    """The demo tokenizer (what `load_demo` returns with the model), without the model.

    Training it takes well under a second and is deterministic, so it is not cached on disk."""
    vocab_size = GPTConfig.from_preset("demo").vocab_size if vocab_size is None else vocab_size
    return _demo_tokenizer(vocab_size, corpus_hash(corpus_topics()))


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the trained weights (with the corpus and CODE_VERSION)."""

    config: GPTConfig
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    block_size: Optional[int] = None  # the training window; None: config.n_positions
    lr: float = DEFAULT_LR
    warmup_steps: Optional[int] = None  # None: 5 % of the steps
    min_lr_ratio: float = MIN_LR_RATIO
    weight_decay: float = WEIGHT_DECAY
    betas: tuple[float, float] = BETAS
    grad_clip: float = GRAD_CLIP
    seed: int = 0
    heldout_fraction: float = HELDOUT_FRACTION

    def __post_init__(self) -> None:
        c = self.config
        # frozen: defaults that depend on other fields are filled in here, once
        if self.block_size is None:
            object.__setattr__(self, "block_size", c.n_positions)
        if self.warmup_steps is None and isinstance(self.steps, int):
            object.__setattr__(self, "warmup_steps", max(1, self.steps // 20))
        for field in ("steps", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if not isinstance(self.block_size, int) or not 2 <= self.block_size <= c.n_positions:
            raise ValueError(
                f"block_size must be an int in [2, n_positions={c.n_positions}], got {self.block_size!r}"
            )
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if c.eos_token_id != 0:
            raise ValueError(f"the demo tokenizer's {EOS_TOKEN} is id 0; config.eos_token_id is {c.eos_token_id}")
        if c.vocab_size < 257:
            raise ValueError(f"config.vocab_size must be >= 257 for a byte-level BPE, got {c.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "config": self.config.to_dict(), "betas": list(self.betas)}

    def cache_key(self, corpus_sha256: str) -> str:
        payload = json.dumps(
            {"code_version": CODE_VERSION, "recipe": self.to_dict(), "corpus": corpus_sha256}, sort_keys=True
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def lr_at(step: int, recipe: DemoRecipe) -> float:
    """Linear warmup to recipe.lr, then a cosine down to lr * min_lr_ratio at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - 1 - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    min_lr = recipe.lr * recipe.min_lr_ratio
    return min_lr + 0.5 * (recipe.lr - min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- losses


def unigram_loss(train_ids: Sequence[int], heldout_ids: Sequence[int], *, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of a unigram model: train-split token frequencies
    with add-one smoothing. Scored on heldout_ids[1:], the same targets as `heldout_loss`."""
    if len(heldout_ids) < 2:
        raise ValueError(f"heldout_ids needs at least 2 tokens, got {len(heldout_ids)}")
    counts = torch.bincount(torch.as_tensor(train_ids, dtype=torch.long), minlength=vocab_size)
    if counts.numel() > vocab_size:
        raise ValueError(f"train_ids has ids >= vocab_size={vocab_size}")
    logp = torch.log((counts.double() + 1) / (counts.sum() + vocab_size))  # (V,)
    targets = torch.as_tensor(heldout_ids[1:], dtype=torch.long)
    return float(-logp[targets].mean())


@torch.no_grad()
def heldout_loss(model: GPT, ids: Sequence[int], *, block_size: Optional[int] = None) -> float:
    """Mean cross-entropy (nats/token) of ids[1:] given the preceding tokens, in consecutive
    windows of block_size (each target scored once, with the context since its window began)."""
    T = model.config.n_positions if block_size is None else block_size
    if len(ids) < 2:
        raise ValueError(f"ids needs at least 2 tokens, got {len(ids)}")
    data = torch.as_tensor(ids, dtype=torch.long)
    windows = [data[i : i + T + 1] for i in range(0, len(data) - 1, T)]  # overlap 1: x and its targets
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(windows), EVAL_BATCH_SIZE):
        for w in _same_length_groups(windows[b : b + EVAL_BATCH_SIZE]):
            batch = torch.stack(w)  # (B, T+1)
            logits, _ = model(batch[:, :-1])  # (B, T, V): the reference forward, as served
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def _same_length_groups(windows: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The last window is shorter: it goes alone."""
    full = [w for w in windows if len(w) == len(windows[0])]
    yield full
    rest = windows[len(full) :]
    if rest:
        yield rest


# ----------------------------------------------------------------------------- training


def causal_attend(n_head: int):
    """Training attention: plain causal SDPA (no padding, no cache) — the fused kernel,
    the same math as the model's masked reference path."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, KV]:
        q, k, v = (split_heads(t, n_head) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return merge_heads(y), (k, v)

    return attend


def training_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    B, T = x.shape
    position_ids = torch.arange(T).expand(B, T)  # (B, T)
    attends = [causal_attend(model.config.n_head)] * model.config.n_layer
    h, _ = model.hidden_states(x, position_ids, attends)  # (B, T, C)
    logits = model.lm_head(h)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def make_optimizer(model: GPT, recipe: DemoRecipe) -> torch.optim.AdamW:
    # weight decay on the matrices only (Linear weights, token embedding), as nanoGPT;
    # positions, biases and LayerNorm are not decayed
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wpe" not in n)]
    groups = [dict(params=decay, weight_decay=recipe.weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)


@contextlib.contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Fixed threads, deterministic algorithms, seeded global RNG; all restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]training the demo model"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def train_model(
    train_ids: Sequence[int], recipe: DemoRecipe, *, progress: bool = True
) -> tuple[GPT, list[float], float]:
    """(model, training loss per step, seconds): the GPT of recipe.config trained on random
    windows of train_ids."""
    T, B = recipe.block_size, recipe.batch_size
    data = torch.as_tensor(train_ids, dtype=torch.long)
    if len(data) < T + 2:
        raise ValueError(f"the train split has {len(data)} tokens, block_size={T} needs at least {T + 2}")
    losses: list[float] = []
    with _reproducible(recipe.seed):
        model = GPT(recipe.config).train()
        optimizer = make_optimizer(model, recipe)
        batches = torch.Generator().manual_seed(recipe.seed)  # its own stream: batches do not depend on init
        offsets = torch.arange(T + 1)  # (T+1,)
        start = time.perf_counter()
        smoothed = float("nan")
        with _progress_bar(progress) as bar:
            task = bar.add_task("train", total=recipe.steps, loss=float("nan"), tps=0.0)
            for step in range(recipe.steps):
                starts = torch.randint(0, len(data) - T, (B,), generator=batches)  # (B,)
                window = data[starts[:, None] + offsets]  # (B, T+1)
                loss = training_loss(model, window[:, :-1], window[:, 1:])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, recipe)
                optimizer.step()
                losses.append(loss.item())
                smoothed = losses[-1] if step == 0 else 0.9 * smoothed + 0.1 * losses[-1]
                elapsed = time.perf_counter() - start
                bar.update(task, advance=1, loss=smoothed, tps=(step + 1) * B * T / elapsed)
                if (step + 1) % max(1, recipe.steps // 10) == 0:
                    log.debug("step %d/%d loss %.4f lr %.2e", step + 1, recipe.steps, smoothed, lr_at(step, recipe))
        seconds = time.perf_counter() - start
    model.eval()
    return model, losses, seconds


# ----------------------------------------------------------------------------- cache + API


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
    with _reproducible(recipe.seed):
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
        model, tokenizer = load_model(folder)
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
