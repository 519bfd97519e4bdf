"""The OpenAI frontend through the official `openai` package (sync and async clients), against a
real uvicorn process and a real tritonserver; greedy text is checked against PyTorch."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.openai_fixtures import MODEL, frontend  # noqa: F401 - the fixture

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(frontend):  # noqa: F811
    with openai.OpenAI(base_url=frontend.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _reference_text(frontend, prompt_ids, n):  # noqa: F811
    from export.model import generate_greedy

    served = frontend.served
    ids = generate_greedy(served.model, list(prompt_ids), n, eos_token_id=served.model.config.eos_token_id)
    eos = served.model.config.eos_token_id
    return served.tokenizer.decode([t for t in ids if t != eos]), ids


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_greedy_matches_pytorch(client, frontend):  # noqa: F811
    ids = frontend.served.tokenizer.encode(PROMPT)
    text, ref = _reference_text(frontend, ids, 12)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == ("stop" if len(ref) < 12 else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref)
    assert out.usage.total_tokens == len(ids) + len(ref)
    # token ids as the prompt give the same text
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text


def test_chat_greedy_matches_pytorch_on_the_rendered_template(client, frontend):  # noqa: F811
    from serving.openai.chat_template import DEFAULT_CHAT_TEMPLATE, render

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    prompt = render(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    ids = frontend.served.tokenizer.encode(prompt)
    text, ref = _reference_text(frontend, ids, 10)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Say hi"}]
    out2 = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=10, max_tokens=3,
                                          temperature=0)
    assert out2.choices[0].message.content == text  # max_completion_tokens wins over max_tokens


def test_streams_join_to_the_unstreamed_text_for_the_same_seed(client):
    args = dict(model=MODEL, max_tokens=20, temperature=0.9, seed=42)
    whole = client.completions.create(prompt=PROMPT, **args)
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **args))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]

    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(messages=messages, **args)
    stream = list(client.chat.completions.create(messages=messages, stream=True, **args))
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert stream[-1].choices[0].delta.content is None  # the finish chunk has no content
    assert all(c.usage is None for c in stream)  # no include_usage: no usage chunk


def test_n2_seeded_is_reproducible_and_indexed(client):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2)
    a, b = client.completions.create(**args), client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # two independent draws
    two = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text != two.choices[2].text == two.choices[3].text


def test_stop_strings_and_truthful_finish_reason(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert base.choices[0].finish_reason == "length"
    stop = text[5:8]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "zzzq"])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == out.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_async_client_concurrent_streams(frontend):  # noqa: F811
    async def main():
        async with openai.AsyncOpenAI(base_url=frontend.base_url + "/v1", api_key="x", max_retries=0) as c:
            async def one(seed):
                stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=8, temperature=1.0, seed=seed, stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

            whole = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=8, temperature=1.0, seed=3)
            texts = await asyncio.gather(*(one(s) for s in (3, 3, 4, 5)))
            assert texts[0] == texts[1] == whole.choices[0].message.content

    asyncio.run(main())


def test_echo_penalties_and_stop_token_ids(client, frontend):  # noqa: F811
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    plain = client.completions.create(**args, extra_body={"ignore_eos": True})
    echoed = client.completions.create(**args, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    penalised = client.completions.create(**args, frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert penalised.choices[0].text != plain.choices[0].text  # greedy on the tiny model repeats itself
    ids = frontend.served.tokenizer.encode(PROMPT)
    _, ref = _reference_text(frontend, ids, 12)
    stop_id = ref[2]
    cut = client.completions.create(**args, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == ref.index(stop_id) + 1
    assert cut.choices[0].text == frontend.served.tokenizer.decode(ref[: ref.index(stop_id)])
