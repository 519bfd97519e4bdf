"""Training the demo GPT and scoring it: random windows of the train token stream from a seeded
generator, deterministic for a seed (fixed thread count, deterministic algorithms, seeded init
and batches); the step count is fixed, not a time budget, so the result does not depend on the
machine's speed. Held-out loss and the unigram baseline it is compared with."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from export.demo.recipe import DemoRecipe, lr_at
from export.model import GPT, KV, merge_heads, split_heads

log = logging.getLogger(__name__)

THREADS = 2  # CPU results depend on the thread count (reduction order): fixed for reproducibility
EVAL_BATCH_SIZE = 8


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
def reproducible(seed: int) -> Iterator[None]:
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
    with reproducible(recipe.seed):
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
