"""The shared generation loop (serving/generation.py) against in-process step functions:
a scripted one-hot "model", a table-lookup numpy model and the PyTorch reference GPT."""

from __future__ import annotations

import asyncio
import pydoc_data.topics

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from export.config import GPTConfig
from export.model import GPT, generate_greedy
from serving.generation import (
    Generation,
    InvalidParameterError,
    PromptTooLongError,
    Step,
    agenerate_tokens,
    collect,
    generate_tokens,
    make_sampling_params,
)
from serving.sampling import Sampler, SamplingParams
from serving.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on the help text every CPython carries."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = list(pydoc_data.topics.topics.values())[:100]
    backend.train_from_iterator(text, trainer)
    return Tokenizer(backend)


class Recorder:
    """A step function that records what was sent; its logits come from ``model``."""

    def __init__(self, model, fail_at: int | None = None):
        self.model = model
        self.calls: list[tuple[tuple[int, ...], bool, bool]] = []
        self.fail_at = fail_at
        self.context: list[int] = []

    def __call__(self, tokens, *, start, end):
        self.calls.append((tuple(tokens), start, end))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise ConnectionError("server went away")
        self.context = list(tokens) if start else self.context + list(tokens)
        return self.model(self.context)


def scripted(tokens: list[int], vocab: int):
    """A model that emits ``tokens`` in order (one-hot logits), whatever the context."""
    def model(context):
        logits = np.full(vocab, -10.0, dtype=np.float32)
        logits[tokens[model.n % len(tokens)]] = 10.0
        model.n += 1
        return logits
    model.n = 0
    return model


def table_model(vocab: int = 64, seed: int = 0):
    """logits depend on the last token and the position: deterministic, non-trivial."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(vocab, vocab)).astype(np.float32) * 3
    pos = rng.normal(size=(512, vocab)).astype(np.float32)
    return lambda context: table[context[-1]] + pos[len(context)]


def run(model, prompt, **kw):
    kw.setdefault("params", GREEDY)
    kw.setdefault("n_positions", 128)
    kw.setdefault("max_new_tokens", 8)
    step = Recorder(model)
    result = collect(generate_tokens(step, Generation(prompt, **kw)), return_logprobs=kw.get("return_logprobs", False))
    return result, step


def test_greedy_matches_a_direct_argmax_loop_and_end_rides_on_the_last_step():
    model = table_model()
    result, step = run(model, [1, 2, 3], max_new_tokens=6)
    context, expected = [1, 2, 3], []
    for _ in range(6):
        expected.append(int(np.argmax(model(context))))
        context.append(expected[-1])
    assert result.token_ids == expected
    assert result.finish_reason == "length"
    # START with the prompt, then one token per step; the 5th token step carries END and
    # nothing is sent after the last token (its logits are never needed)
    assert step.calls[0] == ((1, 2, 3), True, False)
    assert [c[0] for c in step.calls[1:]] == [(t,) for t in expected[:5]]
    assert [c[2] for c in step.calls] == [False] * 5 + [True]
    assert len(result.timings.itl_s) == 5 and result.timings.ttft_s > 0


def test_one_new_token_sends_start_and_end_together():
    result, step = run(table_model(), [5], max_new_tokens=1)
    assert len(result.token_ids) == 1 and result.finish_reason == "length"
    assert step.calls == [((5,), True, True)]


def test_eos_stops_and_sends_one_end_step():
    result, step = run(scripted([7, 8, 0, 9], 16), [1], max_new_tokens=10, eos_token_id=0)
    assert result.token_ids == [7, 8, 0]
    assert result.finish_reason == "eos"
    # START, 7, 8 (logits give eos), then END carrying the eos token
    assert step.calls == [((1,), True, False), ((7,), False, False), ((8,), False, False), ((0,), False, True)]


def test_pytorch_reference_parity():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    model = GPT(config).eval()

    class TorchStep:
        def __call__(self, tokens, *, start, end):
            with torch.no_grad():
                ids = torch.tensor([list(tokens)])
                logits, self.past = model(ids, past_key_values=None if start else self.past, last_only=True)
            return logits[0].numpy()

    prompt = [3, 14, 15, 92, 65]
    expected = generate_greedy(model, prompt, 20)
    events = generate_tokens(TorchStep(), Generation(prompt, max_new_tokens=20, params=GREEDY,
                                                     n_positions=config.n_positions))
    assert [e.token_id for e in events] == expected


def test_seeded_sampling_is_one_draw_per_token_and_reproducible():
    model = table_model()
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=1234)
    a, _ = run(model, [4, 5], params=params, max_new_tokens=30, return_logprobs=True)
    b, _ = run(model, [4, 5], params=params, max_new_tokens=30, return_logprobs=True)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    # the same Sampler driven by hand, with prompt + generated ids as the penalty history
    sampler, context = Sampler(params), [4, 5]
    for _ in range(30):
        token, logprob = sampler.sample(model(context), context)
        context.append(token)
    assert a.token_ids == context[2:]
    assert sampler.num_draws == 30
    c, _ = run(model, [4, 5], params=SamplingParams(temperature=0.8, seed=99), max_new_tokens=30)
    assert c.token_ids != a.token_ids


def test_async_driver_gives_the_same_events():
    model = table_model()
    params = SamplingParams(temperature=1.0, seed=7)

    async def main():
        calls = []

        async def step(tokens, *, start, end):
            calls.append((tuple(tokens), start, end))
            main.context = list(tokens) if start else main.context + list(tokens)
            return model(main.context)

        gen = Generation([9], max_new_tokens=12, params=params, n_positions=64)
        return [e.token_id async for e in agenerate_tokens(step, gen)], calls

    ids, calls = asyncio.run(main())
    sync, step = run(model, [9], params=params, max_new_tokens=12)
    assert ids == sync.token_ids and calls == step.calls


def test_stop_string_split_across_tokens_is_cut(tokenizer):
    text = "The list of items; STOP right there and more"
    ids = tokenizer.encode(text)
    stop_at = text.index("STOP")
    # the stop string must really span tokens for this test to mean anything
    pieces = [tokenizer.decode([i]) for i in ids]
    assert not any("STOP" in p for p in pieces)
    result, step = run(scripted(ids, tokenizer.vocab_size), [ids[0]], max_new_tokens=len(ids),
                       tokenizer=tokenizer, stop=["STOP", "zzz"])
    assert result.text == text[:stop_at]
    assert result.finish_reason == "stop"
    # generation stopped at the token that completed "STOP", and that sequence got an END
    assert tokenizer.decode(result.token_ids).startswith(text[: stop_at + 4])
    assert len(result.token_ids) < len(ids)
    assert step.calls[-1][2] is True and step.calls[-1][0] == (result.token_ids[-1],)


def test_multibyte_text_streams_without_broken_characters(tokenizer):
    text = " héllo wörld 日本語 🎉🚀 ünïcödé"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    step = Recorder(scripted(ids + [0], tokenizer.vocab_size))
    gen = Generation([1], max_new_tokens=len(ids) + 1, params=GREEDY, n_positions=128,
                     tokenizer=tokenizer, eos_token_id=0)
    deltas = [e.text for e in generate_tokens(step, gen)]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert gen.finish_reason == "eos"


def test_closing_the_stream_early_sends_end():
    step = Recorder(table_model())
    events = generate_tokens(step, Generation([1, 2], max_new_tokens=20, params=GREEDY, n_positions=64))
    first = [next(events) for _ in range(3)]
    events.close()
    assert step.calls[-1] == ((first[-1].token_id,), False, True)
    assert sum(c[2] for c in step.calls) == 1


def test_an_error_mid_generation_still_sends_end_and_propagates():
    step = Recorder(table_model(), fail_at=3)
    with pytest.raises(ConnectionError, match="went away"):
        collect(generate_tokens(step, Generation([1, 2], max_new_tokens=20, params=GREEDY, n_positions=64)))
    assert len(step.calls) == 4 and step.calls[-1][2] is True


def test_a_refused_start_is_still_ended():
    # Triton's sequence batcher keeps a slot for a correlation id until END, even when the
    # model refused the START (e.g. "server busy"): END must follow.
    step = Recorder(table_model(), fail_at=1)
    with pytest.raises(ConnectionError):
        list(generate_tokens(step, Generation([1, 2], max_new_tokens=5, params=GREEDY, n_positions=64)))
    assert step.calls == [((1, 2), True, False), ((2,), False, True)]


def test_keyboard_interrupt_in_the_consumer_sends_end():
    step = Recorder(table_model())
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(generate_tokens(step, Generation([1], max_new_tokens=20, params=GREEDY, n_positions=64))):
            if i == 2:
                raise KeyboardInterrupt
    assert step.calls[-1][2] is True


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(max_new_tokens=0), InvalidParameterError, r"max_new_tokens must be (>= 1|in \[1, \d+\]).*, got 0"),
        (dict(max_new_tokens=2.0), InvalidParameterError, r"max_new_tokens must be an integer, got 2.0 \(float\)"),
        (dict(prompt=[]), InvalidParameterError, r"prompt is empty"),
        (dict(prompt=[1] * 120, max_new_tokens=9), PromptTooLongError,
         r"120 prompt tokens \+ max_new_tokens=9 = 129 exceeds the context length n_positions=128"),
        (dict(prompt=[1, 64]), InvalidParameterError, r"\[0, 64\).*\[1, 64\]"),
        (dict(stop=["a", ""]), InvalidParameterError, r"stop\[1\] must be a non-empty string"),
        (dict(stop=["a"]), InvalidParameterError, r"stop strings need a tokenizer"),
    ],
)
def test_bad_arguments_are_refused_before_any_step(kw, error, match):
    kw = {"prompt": [1, 2], "max_new_tokens": 4, **kw}
    with pytest.raises(error, match=match):
        Generation(kw.pop("prompt"), params=GREEDY, n_positions=128, vocab_size=64, **kw)


def test_prompt_that_exactly_fills_the_context_is_allowed():
    result, step = run(table_model(), [1] * 120, max_new_tokens=8, n_positions=128)
    assert len(result.token_ids) == 8


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.5), r"temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k must be >= 0"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_sampling_params_errors_are_invalid_parameter_errors(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        make_sampling_params(**kw)


# ------------------------------------------------------------------ the greedy token from the server


@pytest.mark.parametrize("kw,argmax_only", [
    (dict(params=GREEDY), True),
    (dict(params=SamplingParams(temperature=0, repetition_penalty=1.2)), False),  # needs the logits
    (dict(params=GREEDY, return_logprobs=True), False),
    (dict(params=SamplingParams(temperature=0.7, seed=1)), False),
])
def test_argmax_only_when_the_logits_give_nothing_but_the_argmax(kw, argmax_only):
    assert Generation([1], max_new_tokens=2, n_positions=16, **kw).argmax_only is argmax_only


def test_a_generation_takes_the_servers_greedy_token_like_its_own_argmax():
    """A step that answers the greedy id (the `gpt` model's output_ids) gives the same events
    as one that answers the logits, with no random draw."""
    from serving.sampling import greedy_token

    model = table_model()
    by_logits, _ = run(model, [1, 2, 3], max_new_tokens=6)
    generation = Generation([1, 2, 3], max_new_tokens=6, params=GREEDY, n_positions=128, vocab_size=64)
    ids = Recorder(lambda context: np.array([greedy_token(model(context))], dtype=np.int64))
    by_ids = collect(generate_tokens(ids, generation))
    assert by_ids.token_ids == by_logits.token_ids and by_ids.finish_reason == by_logits.finish_reason
    assert generation.sampler.num_draws == 0


def test_a_token_id_answer_is_checked():
    def advance(generation, output):
        return generation.advance(np.asarray(output, dtype=np.int64), sent_at=0.0)

    sampled = Generation([1], max_new_tokens=4, params=SamplingParams(temperature=1.0, seed=0), n_positions=16)
    with pytest.raises(ValueError, match="samples from the logits"):
        advance(sampled, [3])
    greedy = Generation([1], max_new_tokens=4, params=GREEDY, n_positions=16, vocab_size=10)
    with pytest.raises(ValueError, match="2 token ids, expected 1"):
        advance(greedy, [3, 4])
    with pytest.raises(ValueError, match=r"token id 10, outside the vocabulary \[0, 10\)"):
        advance(greedy, [10])
    event, following = advance(greedy, [[7]])
    assert event.token_id == 7 and following == Step((7,))


def test_greedy_token_is_the_samplers_greedy_choice_with_its_errors():
    from serving.sampling import greedy_token

    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=500).astype(np.float32)
        logits[rng.integers(0, 500, 3)] = logits.max()  # ties: the lowest id wins in both
        assert greedy_token(logits) == Sampler(GREEDY).sample(logits)[0]
    for bad, match in ((np.array([0.0, np.nan], np.float32), "NaN"),
                       (np.array([0.0, np.inf], np.float32), r"\+inf"),
                       (np.full(3, -np.inf, np.float32), "all -inf")):
        with pytest.raises(ValueError, match=match):
            greedy_token(bad)
