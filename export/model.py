"""GPT-2 in PyTorch with the KV cache as explicit inputs and outputs.

Pre-LayerNorm blocks, learned positions, tanh-GELU, tied LM head, scaled_dot_product_attention.
Module names follow Hugging Face / nanoGPT (`transformer.h.{i}.attn.c_attn`, ...) so checkpoints
map one to one.

The attention of each layer is a pluggable `Attend` callable: `forward` uses the dynamic cache
(past and new keys concatenated: the PyTorch reference, and the portable graph for TensorRT);
the ONNX Runtime serving graph plugs in an in-place static cache instead (export/onnx/).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from export.config import ACTIVATIONS, GPTConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, nh, S, hs)
# attend(q, k, v) with q, k, v (B, T, C) -> (y (B, T, C), present (key, value))
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, KV]]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, attend: Attend) -> tuple[torch.Tensor, KV]:
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
        y, present = attend(q, k, v)  # (B, T, C)
        return self.c_proj(y), present


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate=ACTIVATIONS[config.activation])
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attend: Attend) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), attend)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)


def dynamic_cache_attend(past: Optional[KV], key_valid: torch.Tensor, n_head: int) -> Attend:
    """Attention over `past` concatenated with the new keys (the reference semantics).

    key_valid: (B, P+T) bool, False at padding. Query i (absolute position P+i) sees key j when
    the key is valid and j <= P+i. A query always sees its own key, so padding queries never
    have an empty softmax (their outputs are ignored; real queries are unaffected).
    """

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, KV]:
        q, k, v = (split_heads(t, n_head) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        T, S = q.shape[2], k.shape[2]
        P = S - T
        qpos = torch.arange(T, device=q.device).unsqueeze(1) + P  # (T, 1)
        kpos = torch.arange(S, device=q.device).unsqueeze(0)  # (1, S)
        allowed = (kpos <= qpos) & key_valid[:, None, None, :]  # (B, 1, T, S)
        allowed = allowed | (kpos == qpos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, nh, T, hs)
        return merge_heads(y), (k, v)

    return attend


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_past(self, batch_size: int, *, dtype: torch.dtype = torch.float32) -> list[KV]:
        """A zero-length past: (B, nh, 0, hs) per layer."""
        c = self.config
        shape = (batch_size, c.n_head, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.n_layer)]

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attends: Sequence[Attend]
    ) -> tuple[torch.Tensor, list[KV]]:
        """The transformer body with the given per-layer attention: (B, T, C) and the presents."""
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        presents = []
        for block, attend in zip(self.transformer.h, attends):
            x, present = block(x, attend)
            presents.append(present)
        return self.transformer.ln_f(x), presents

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.transformer.wte.weight)  # tied with the token embedding

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Sequence[KV]] = None,
        *,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """input_ids (B, T); attention_mask (B, P+T), 1 for real tokens, 0 for padding;
        past_key_values: per layer (key, value), each (B, nh, P, hs), P may be 0.
        Returns logits (B, T, V) — (B, V) for the last position with last_only — and the
        presents, (B, nh, P+T, hs) per layer."""
        c = self.config
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_key_values is not None and len(past_key_values) != c.n_layer:
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has {c.n_layer}")
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        elif attention_mask.shape != (B, P + T):
            raise ValueError(
                f"attention_mask must have shape (batch, past + new) = ({B}, {P + T}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            # positions count real tokens only, so a left-padded row gets the positions it has alone
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, T)
        key_valid = attention_mask.bool()
        past = past_key_values if past_key_values is not None else [None] * c.n_layer
        attends = [dynamic_cache_attend(p, key_valid, c.n_head) for p in past]
        h, presents = self.hidden_states(input_ids, position_ids, attends)
        if last_only:
            h = h[:, -1, :]  # (B, C): a decode step needs no seq x vocab logits
        return self.lm_head(h), presents


def check_inputs(config: GPTConfig, input_ids: torch.Tensor, past_length: int = 0) -> None:
    """Clear errors for bad prompts before they reach an embedding lookup."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: input_ids needs at least one token")
    total = past_length + input_ids.shape[1]
    if total > config.n_positions:
        raise ValueError(
            f"prompt too long: {total} tokens (past {past_length} + new {input_ids.shape[1]}) "
            f"exceeds the context length n_positions={config.n_positions}"
        )
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"input_ids must be in [0, {config.vocab_size}), got values in [{lo}, {hi}]")


@torch.no_grad()
def generate_greedy(model: GPT, input_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None) -> list[int]:
    """The PyTorch reference loop: prefill, then one token at a time with the KV cache."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = torch.tensor([input_ids], dtype=torch.long)
    check_inputs(model.config, ids)
    room = model.config.n_positions - len(input_ids)
    if max_new_tokens > room:
        raise ValueError(
            f"prompt ({len(input_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the context length n_positions={model.config.n_positions}"
        )
    logits, past = model(ids, last_only=True)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        if token == eos_token_id or len(out) == max_new_tokens:
            break
        logits, past = model(torch.tensor([[token]]), past_key_values=past, last_only=True)
    return out
