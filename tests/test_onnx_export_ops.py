"""export/onnx/ops.py: the static-cache attention op's PyTorch reference, through the exported
wrapper (export/onnx/export.py StaticCacheGPT), is GPT.forward."""

from __future__ import annotations

import torch

from export.model import GPT
from export.onnx.export import StaticCacheGPT
from tests.onnx_export_fixtures import TOL, model  # noqa: F401 (fixture)


def no_chunk(c) -> tuple:
    """The chunk group's dummy: one token into a one-position buffer of its own."""
    scratch = [(torch.zeros(1, c.n_head, 1, c.head_dim), torch.zeros(1, c.n_head, 1, c.head_dim))
               for _ in range(c.n_layer)]
    return torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), scratch


@torch.no_grad()
def test_static_wrapper_equals_forward_in_pytorch(model: GPT) -> None:
    """The static-cache op's reference implementation, through GPT.hidden_states, is GPT.forward:
    a prompt, then a batched step of rows with different past lengths together with a prompt
    chunk of a third row after its past (the mixed call's two groups)."""
    c = model.config
    wrapper = StaticCacheGPT(model)
    max_len = 32
    buffers = [(torch.zeros(3, c.n_head, max_len, c.head_dim), torch.zeros(3, c.n_head, max_len, c.head_dim))
               for _ in range(c.n_layer)]
    prompts = [torch.randint(0, c.vocab_size, (1, n)) for n in (5, 9, 4)]
    refs = []
    for row, prompt in enumerate(prompts):
        T = prompt.shape[1]
        row_past = [(k[row:row + 1], v[row:row + 1]) for k, v in buffers]
        logits, presents, _ = wrapper(prompt, torch.arange(T)[None], torch.ones(1, T, dtype=torch.long), row_past,
                                      *no_chunk(c))
        for (k, v), (pk, pv) in zip(buffers, presents):
            k[row:row + 1], v[row:row + 1] = pk, pv
        ref, ref_past = model(prompt, last_only=True)
        torch.testing.assert_close(logits[:1], ref, atol=TOL, rtol=0)
        refs.append(ref_past)
    tokens = torch.tensor([[3], [7]])
    lengths = torch.tensor([5, 9])
    mask = (torch.arange(10)[None] < (lengths + 1)[:, None]).long()
    chunk = torch.randint(0, c.vocab_size, (1, 6))
    chunk_past = [(k[2:3], v[2:3]) for k, v in buffers]
    logits, _, chunk_presents = wrapper(tokens[:, :], lengths[:, None], mask, [(k[:2], v[:2]) for k, v in buffers],
                                        chunk, torch.arange(4, 10)[None], torch.ones(1, 10, dtype=torch.long),
                                        chunk_past)
    assert logits.shape == (3, c.vocab_size)
    for row in range(2):
        ref, _ = model(tokens[row:row + 1], past_key_values=refs[row], last_only=True)
        torch.testing.assert_close(logits[row:row + 1], ref, atol=TOL, rtol=0)
    ref, ref_past = model(torch.cat([prompts[2], chunk], dim=1), last_only=True)
    torch.testing.assert_close(logits[2:], ref, atol=TOL, rtol=0)
    for (k, v), (rk, rv) in zip(chunk_presents, ref_past):
        torch.testing.assert_close(k[:, :, :10], rk, atol=1e-5, rtol=0)
        torch.testing.assert_close(v[:, :, :10], rv, atol=1e-5, rtol=0)
