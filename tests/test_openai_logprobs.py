"""Top-N log-probs and vLLM's min_tokens through the official `openai` package, against a real
uvicorn frontend and a real tritonserver, on both generation loops; the values are checked
against the log-softmax of the PyTorch model's logits for the same prefix."""

from __future__ import annotations

import math

import openai
import pytest

from tests.openai_fixtures import MODEL, Frontend, frontend  # noqa: F401 - the fixture

PROMPT = "The quick brown fox"
TOL = 1e-3  # ONNX Runtime fp32 vs PyTorch, in log-prob


@pytest.fixture(scope="module")
def server_loop(inflight_session):
    """A second frontend, driving the server-side `generate` loop."""
    front = Frontend(inflight_session, extra=("--loop", "server"))
    yield front
    front.stop()


def _client(front):
    return openai.OpenAI(base_url=front.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(frontend):  # noqa: F811
    with _client(frontend) as c:
        yield c


def reference(served, prompt_ids, n, *, min_tokens=0, banned=(), top=3):
    """PyTorch: greedy ids (banned ids at -inf for the first min_tokens picks, as vLLM's
    min_tokens does) and, per step, the top-`top` (id, log-softmax of the raw logits)."""
    import torch

    ids, steps = list(prompt_ids), []
    eos = served.model.config.eos_token_id
    with torch.no_grad():
        for i in range(n):
            logits = served.model(torch.tensor([ids]), last_only=True)[0][0].double()  # (V,)
            logprobs = torch.log_softmax(logits, dim=-1)
            pick = logits.clone()
            if i < min_tokens:
                pick[list(banned)] = -math.inf
            token = int(pick.argmax())
            best = torch.topk(logprobs, top)
            steps.append((token, float(logprobs[token]), list(zip(best.indices.tolist(), best.values.tolist()))))
            ids.append(token)
            if i >= min_tokens and token in banned:
                break
    assert eos is not None
    return steps


def _check_completion_logprobs(lp, steps, tokenizer):
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(steps)
    for (token, logprob, top), chosen, alternatives in zip(steps, lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(logprob, abs=TOL)
        expected: dict[str, float] = {}
        for i, value in top:
            expected.setdefault(tokenizer.decode([i]), value)
        assert set(alternatives) == set(expected) and len(alternatives) == len(expected)
        for text, value in expected.items():
            assert alternatives[text] == pytest.approx(value, abs=TOL)
        # greedy: the chosen token is the most likely one, with the very same log-prob
        assert max(alternatives.values()) == chosen


@pytest.mark.parametrize("loop", ["client", "server"])
def test_completions_logprobs_3_match_pytorch(client, server_loop, frontend, loop):  # noqa: F811
    served = frontend.served
    ids = served.tokenizer.encode(PROMPT)
    steps = reference(served, ids, 6, banned=(served.model.config.eos_token_id,))
    with (_client(server_loop) if loop == "server" else _client(frontend)) as c:
        out = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    _check_completion_logprobs(lp, steps[: out.usage.completion_tokens], served.tokenizer)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_top_logprobs_3_match_pytorch(client, frontend):  # noqa: F811
    from serving.openai.chat_template import DEFAULT_CHAT_TEMPLATE, render

    served = frontend.served
    messages = [{"role": "user", "content": "Say hi"}]
    ids = served.tokenizer.encode(render(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True))
    steps = reference(served, ids, 5)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry, (token, logprob, top) in zip(content, steps):
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(logprob, abs=TOL)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen one is the first
        for alt, (i, value) in zip(entry.top_logprobs, top):
            assert alt.token == served.tokenizer.decode([i]) and alt.logprob == pytest.approx(value, abs=TOL)
            assert alt.bytes == list(alt.token.encode("utf-8"))
        assert [a.logprob for a in entry.top_logprobs] == sorted((a.logprob for a in entry.top_logprobs),
                                                                 reverse=True)


def test_streams_carry_the_same_logprobs(client):
    args = dict(model=MODEL, max_tokens=8, temperature=0.8, seed=11)
    whole = client.completions.create(prompt=PROMPT, logprobs=3, **args).choices[0].logprobs
    chunks = [c for c in client.completions.create(prompt=PROMPT, logprobs=3, stream=True, **args) if c.choices]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == whole.tokens
    assert [x for s in streamed for x in s.token_logprobs] == whole.token_logprobs
    assert [x for s in streamed for x in s.top_logprobs] == whole.top_logprobs
    assert [x for s in streamed for x in s.text_offset] == whole.text_offset

    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=4, **args)
    stream = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=4, stream=True, **args)
    got = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in got] == [e.model_dump() for e in chat.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 4 for e in got)


@pytest.mark.parametrize("loop", ["client", "server"])
def test_min_tokens_holds_off_stop_token_ids_and_eos(frontend, server_loop, loop):  # noqa: F811
    served = frontend.served
    ids = served.tokenizer.encode(PROMPT)
    eos = served.model.config.eos_token_id
    plain = reference(served, ids, 12)
    stop_id = plain[0][0]  # greedy would stop at its first token
    early = 1
    assert stop_id != eos
    with (_client(server_loop) if loop == "server" else _client(frontend)) as c:
        args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
        short = c.completions.create(**args, extra_body={"stop_token_ids": [stop_id]})
        assert short.usage.completion_tokens == early and short.choices[0].finish_reason == "stop"
        held = c.completions.create(**args, extra_body={"stop_token_ids": [stop_id], "min_tokens": 5})
        streamed = list(c.completions.create(**args, stream=True,
                                             extra_body={"stop_token_ids": [stop_id], "min_tokens": 5}))
    steps = reference(served, ids, 12, min_tokens=5, banned=(stop_id, eos))
    n = held.usage.completion_tokens
    assert n >= 5 and n == len(steps)
    ended_by = steps[-1][0]
    finish = "stop" if ended_by in (stop_id, eos) else "length"
    assert held.choices[0].finish_reason == finish and (finish == "stop" or n == 12)
    shown = [t for t, _, _ in steps if t not in (stop_id, eos)]
    assert held.choices[0].text == served.tokenizer.decode(shown)
    assert held.choices[0].logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in steps], abs=TOL)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == held.choices[0].text
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices and ch.choices[0].finish_reason] == [finish]


def test_min_tokens_and_top_n_limits_are_400s_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"min_tokens": 5})
    assert e.value.param == "min_tokens" and "max_tokens (4)" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=6)
    assert e.value.param == "logprobs" and "5" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=21)
    assert e.value.param == "top_logprobs" and "20" in str(e.value)
