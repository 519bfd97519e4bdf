"""GPTConfig: one frozen config, passed explicitly, with named presets (nanoGPT / gpt-fast style)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


# name (as Hugging Face's activation_function) -> torch's GELU approximation
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length (block_size in nanoGPT)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_epsilon: float = 1e-5
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm; nanoGPT can drop them
    activation: str = "gelu_new"  # GPT-2's tanh GELU; "gelu" is the exact one nanoGPT trains with
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for field in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{field} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known: {sorted(names)}")
        return cls(**data)


# Named presets as overrides of the defaults. The four GPT-2 sizes are the published ones.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # tests: small enough that every path runs in well under a second
    "tiny": dict(vocab_size=512, n_positions=128, n_layer=2, n_head=4, n_embd=64,
                 bos_token_id=0, eos_token_id=0),
    # the demo model trained offline by export/demo/ (its tokenizer has 4096 tokens, id 0 is eos)
    "demo": dict(vocab_size=4096, n_positions=256, n_layer=4, n_head=4, n_embd=128,
                 bos_token_id=0, eos_token_id=0),
}
