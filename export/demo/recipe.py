"""The demo training recipe: the `demo` preset trained with AdamW and a cosine learning rate with
linear warmup; `DemoRecipe` holds everything that determines the weights and keys the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from export.config import GPTConfig
from export.demo.corpus import HELDOUT_FRACTION
from serving.tokenizer import EOS_TOKEN

# Bump when a change to this file changes what training produces: it is part of the cache key.
CODE_VERSION = 2

# The default recipe, tuned for the best held-out loss in ~2.5 minutes on 2 CPU cores.
DEFAULT_STEPS = 850  # 150-160 s on 2 idle cores (measured: ~0.18 s per step)
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 3e-3
MIN_LR_RATIO = 0.1  # the cosine decays to lr * MIN_LR_RATIO
WEIGHT_DECAY = 0.1  # on matrices only (nanoGPT): not on biases, LayerNorm or positions
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0


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
