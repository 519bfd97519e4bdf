"""export/model.py: the KV cache, padding and greedy decoding against the full forward and
against `transformers`' GPT-2 on the same random weights; clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.sources import load_model
from export.config import GPTConfig
from export.model import GPT, check_inputs, generate_greedy

transformers = pytest.importorskip("transformers")

CONFIG = GPTConfig(vocab_size=300, n_positions=64, n_layer=3, n_head=2, n_embd=48, bos_token_id=0, eos_token_id=0)
TOL = 1e-5


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and logits far apart: with
    GPT-2's init (std 0.02, zero biases) a wrong mask or position barely moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 and "ln" in name and name.endswith("weight") else 0.1 * noise)


@pytest.fixture(scope="module")
def model() -> GPT:
    m = GPT(CONFIG).eval()
    randomize(m, seed=0)
    return m


def ids_of(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- KV cache


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(model: GPT) -> None:
    ids = ids_of(2, 20, seed=1)
    full, _ = model(ids)  # (B, T, V)
    logits, past = model(ids[:, :6])
    assert max_delta(logits, full[:, :6]) <= TOL
    for t in range(6, 20):
        step, past = model(ids[:, t:t + 1], past_key_values=past, last_only=True)  # (B, V)
        assert max_delta(step, full[:, t]) <= TOL, t
    assert past[0][0].shape == (2, CONFIG.n_head, 20, CONFIG.head_dim)
    assert full.std() > 0.3  # the logits carry signal


@torch.no_grad()
def test_zero_length_past_equals_no_past(model: GPT) -> None:
    ids = ids_of(3, 9, seed=2)
    plain, presents = model(ids)
    with_empty, presents_empty = model(ids, past_key_values=model.empty_past(3))
    assert max_delta(with_empty, plain) <= TOL
    for (k, v), (k0, v0) in zip(presents, presents_empty):
        assert k.shape == k0.shape == (3, CONFIG.n_head, 9, CONFIG.head_dim)
        assert max_delta(k, k0) <= TOL and max_delta(v, v0) <= TOL


ROWS = [ids_of(1, n, seed=10 + n)[0] for n in (7, 3, 12)]  # three prompts of different lengths


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in ROWS)
    ids = torch.zeros(len(ROWS), T, dtype=torch.long)  # pad id 0: a real token, so masking must work
    mask = torch.zeros(len(ROWS), T, dtype=torch.long)
    for i, r in enumerate(ROWS):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_batch_equals_rows_alone_including_decode(model: GPT, side: str) -> None:
    ids, mask = padded_batch(side)
    T = ids.shape[1]
    logits, past = model(ids, attention_mask=mask)
    alone = [model(r[None]) for r in ROWS]  # (logits (1, n, V), past)
    for i, r in enumerate(ROWS):
        real = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        assert max_delta(logits[i, real], alone[i][0][0]) <= TOL, (side, i)

    # decode: each row continues with its own greedy token; the padding stays masked
    nxt = torch.stack([alone[i][0][0, -1].argmax() for i in range(len(ROWS))])[:, None]  # (B, 1)
    row_past = [a[1] for a in alone]
    row_next = [nxt[i:i + 1] for i in range(len(ROWS))]
    for step in range(3):
        mask = torch.cat([mask, torch.ones(len(ROWS), 1, dtype=torch.long)], dim=1)  # (B, P+1)
        batch_step, past = model(nxt, attention_mask=mask, past_key_values=past, last_only=True)
        for i in range(len(ROWS)):
            ref, row_past[i] = model(row_next[i], past_key_values=row_past[i], last_only=True)
            assert max_delta(batch_step[i], ref[0]) <= TOL, (side, step, i)
            row_next[i] = ref.argmax(-1, keepdim=True)
        nxt = batch_step.argmax(-1, keepdim=True)
        assert torch.equal(nxt, torch.cat(row_next))


# ----------------------------------------------------------------------------- greedy vs transformers


def test_generate_greedy_equals_transformers_generate(tmp_path: Path) -> None:
    hf_config = transformers.GPT2Config(
        vocab_size=CONFIG.vocab_size, n_positions=CONFIG.n_positions, n_layer=CONFIG.n_layer,
        n_head=CONFIG.n_head, n_embd=CONFIG.n_embd, bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    randomize(hf, seed=5)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)

    prompt = ids_of(1, 8, seed=6)
    n_new = 40
    # no eos on either side, so both run the full length and the comparison is token for token
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:].tolist()
    got = generate_greedy(ours, prompt[0].tolist(), n_new, eos_token_id=None)
    assert got == ref
    assert len(got) == n_new and len(set(got)) > 5  # a sequence that could have diverged


def test_generate_greedy_stops_at_eos(model: GPT) -> None:
    prompt = ids_of(1, 5, seed=7)[0].tolist()
    free = generate_greedy(model, prompt, 10, eos_token_id=None)
    stop_at = free[3]
    stopped = generate_greedy(model, prompt, 10, eos_token_id=stop_at)
    assert stopped == free[: free.index(stop_at) + 1]


# ----------------------------------------------------------------------------- bad input


def test_check_inputs_rejects_bad_prompts() -> None:
    with pytest.raises(ValueError, match="the prompt is empty"):
        check_inputs(CONFIG, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="65 tokens.*exceeds the context length n_positions=64"):
        check_inputs(CONFIG, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="past 60 \\+ new 5"):
        check_inputs(CONFIG, torch.zeros(1, 5, dtype=torch.long), past_length=60)
    with pytest.raises(ValueError, match=r"must be in \[0, 300\), got values in \[0, 300\]"):
        check_inputs(CONFIG, torch.tensor([[0, 300]]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        check_inputs(CONFIG, torch.tensor([[2, -1]]))
    with pytest.raises(ValueError, match="must be 2-D"):
        check_inputs(CONFIG, torch.tensor([1, 2, 3]))
    check_inputs(CONFIG, torch.zeros(2, 64, dtype=torch.long))  # exactly the context: fine


def test_generate_greedy_rejects_bad_requests(model: GPT) -> None:
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_greedy(model, [], 5)
    with pytest.raises(ValueError, match=r"must be in \[0, 300\)"):
        generate_greedy(model, [1, 300], 5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_greedy(model, [1], 0)
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(5\) exceeds"):
        generate_greedy(model, [1] * 60, 5)


@torch.no_grad()
def test_forward_rejects_bad_masks_and_pasts(model: GPT) -> None:
    ids = ids_of(2, 4)
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* = \(2, 4\), got \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        model(ids, attention_mask=torch.ones(4, dtype=torch.long))
    _, past = model(ids)
    with pytest.raises(ValueError, match=r"= \(2, 5\), got \(2, 1\)"):  # the mask must cover the past
        model(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=past)
    with pytest.raises(ValueError, match="past_key_values has 2 layers, the model has 3"):
        model(ids[:, :1], past_key_values=past[:2])


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"n_embd \(50\) must be divisible by n_head \(4\)"):
        GPTConfig(n_embd=50, n_head=4)
    with pytest.raises(ValueError, match="unknown preset 'gpt3'; known presets: gpt2, gpt2-medium"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="GPTConfig.vocab_size must be a positive int, got 0"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="GPTConfig.n_layer must be a positive int, got True"):
        GPTConfig(n_layer=True)
    with pytest.raises(ValueError, match="layer_norm_epsilon must be > 0"):
        GPTConfig(layer_norm_epsilon=0.0)
    with pytest.raises(ValueError, match=r"unknown GPTConfig fields \['block_size'\]"):
        GPTConfig.from_dict({"block_size": 8})
