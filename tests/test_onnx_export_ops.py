"""export/onnx/ops.py: the static-cache attention op's PyTorch reference, through the exported
wrapper (export/onnx/export.py StaticCacheGPT), is GPT.forward."""

from __future__ import annotations

import torch

from export.model import GPT
from export.onnx.export import StaticCacheGPT
from tests.onnx_export_fixtures import TOL, model  # noqa: F401 (fixture)


@torch.no_grad()
def test_static_wrapper_equals_forward_in_pytorch(model: GPT) -> None:
    """The static-cache op's reference implementation, through GPT.hidden_states, is GPT.forward:
    a prompt, then a batched step of rows with different past lengths."""
    c = model.config
    wrapper = StaticCacheGPT(model)
    max_len = 32
    buffers = [(torch.zeros(2, c.n_head, max_len, c.head_dim), torch.zeros(2, c.n_head, max_len, c.head_dim))
               for _ in range(c.n_layer)]
    prompts = [torch.randint(0, c.vocab_size, (1, n)) for n in (5, 9)]
    refs = []
    for row, prompt in enumerate(prompts):
        T = prompt.shape[1]
        row_past = [(k[row:row + 1], v[row:row + 1]) for k, v in buffers]
        logits, presents = wrapper(prompt, torch.arange(T)[None], torch.ones(1, T, dtype=torch.long), row_past)
        for (k, v), (pk, pv) in zip(buffers, presents):
            k[row:row + 1], v[row:row + 1] = pk, pv
        ref, ref_past = model(prompt, last_only=True)
        torch.testing.assert_close(logits, ref, atol=TOL, rtol=0)
        refs.append(ref_past)
    tokens = torch.tensor([[3], [7]])
    lengths = torch.tensor([5, 9])
    mask = (torch.arange(10)[None] < (lengths + 1)[:, None]).long()
    logits, _ = wrapper(tokens, lengths[:, None], mask, buffers)
    for row in range(2):
        ref, _ = model(tokens[row:row + 1], past_key_values=refs[row], last_only=True)
        torch.testing.assert_close(logits[row:row + 1], ref, atol=TOL, rtol=0)
