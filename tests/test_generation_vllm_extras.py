"""vLLM's extras in the shared generation loop: min_tokens (eos and stop_token_ids banned, stop
strings not looked for before it), stop_token_ids, and top-N log-probs, each against a
reference written out here (log-softmax in float64, vLLM's stop-string rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.generation import Generation, InvalidParameterError, collect, generate_tokens
from serving.sampling import Sampler, SamplingParams
from serving.tokenizer import TextStream
from tests.test_generation import GREEDY, Recorder, scripted, table_model, tokenizer  # noqa: F401 - fixture


def log_softmax(logits) -> list[float]:
    x = [float(v) for v in logits]
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
                                    SamplingParams(temperature=1.0, seed=2),
                                    SamplingParams(temperature=0, repetition_penalty=1.3)])
def test_top_logprobs_are_the_raw_log_softmax_and_hold_the_chosen_token(params):
    rng = np.random.default_rng(0)
    sampler = Sampler(params)
    for _ in range(5):
        logits = (rng.normal(size=300) * 4).astype(np.float32)
        logits[7] = logits[9] = logits.max() + 1.0  # a tie at the top: the lower id first
        token, logprob = sampler.sample(logits, [7, 7, 3])
        top = sampler.top_logprobs(5)
        ref = log_softmax(logits)
        order = sorted(range(len(ref)), key=lambda i: (-ref[i], i))[:5]
        assert [i for i, _ in top] == order
        assert [lp for _, lp in top] == pytest.approx([ref[i] for i in order], abs=1e-12)
        assert logprob == pytest.approx(ref[token], abs=1e-12)
        if token in dict(top):
            assert dict(top)[token] == logprob  # the same arithmetic: equal, not close


def test_banned_ids_are_never_picked_and_keep_their_raw_logprob():
    logits = np.array([5.0, 4.0, 1.0, 0.5], dtype=np.float32)
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy.sample(logits, banned=(0,))[0] == 1
    assert greedy.top_logprobs(1) == [(0, pytest.approx(log_softmax(logits)[0], abs=1e-12))]  # raw distribution
    sampled = Sampler(SamplingParams(temperature=1.5, seed=3))
    assert {sampled.sample(logits, banned=(0, 1))[0] for _ in range(200)} == {2, 3}
    with pytest.raises(ValueError, match="banned"):
        greedy.sample(logits, banned=(0, 1, 2, 3))


def test_min_tokens_bans_eos_and_stop_token_ids_until_then():
    eos, stop_id, vocab = 0, 5, 16
    model = scripted([3, eos, stop_id, 4, 6, 7, 8, 9], vocab)  # wants to end at token 2

    def run(**kw):
        model.n = 0
        g = Generation([1], max_new_tokens=8, params=GREEDY, n_positions=64, eos_token_id=eos, **kw)
        return collect(generate_tokens(Recorder(model), g)), g

    plain, g = run()
    assert plain.token_ids == [3, eos] and plain.finish_reason == "eos" and g.argmax_only
    by_id, _ = run(stop_token_ids=[stop_id])
    assert by_id.token_ids == [3, eos] and by_id.finish_reason == "eos"
    held, g = run(min_tokens=4, stop_token_ids=[stop_id])
    assert not g.argmax_only  # the ban needs the logits
    # eos and 5 were the one-hot choice at steps 2 and 3: banned, the next best (id 1, lowest tie) comes
    assert held.token_ids[:4] == [3, 1, 1, 4] and len(held.token_ids) >= 4
    assert eos not in held.token_ids[:4] and stop_id not in held.token_ids[:4]
    ended, _ = run(min_tokens=1, stop_token_ids=[stop_id, 4])
    assert ended.token_ids == [3, eos]  # past min_tokens eos ends it as before


def test_stop_token_ids_end_with_stop_and_show_no_text(tokenizer):  # noqa: F811
    ids = tokenizer.encode("return the value")
    g = Generation([ids[0]], max_new_tokens=10, params=GREEDY, n_positions=64, tokenizer=tokenizer,
                   stop_token_ids=[ids[2]])
    result = collect(generate_tokens(Recorder(scripted(ids, tokenizer.vocab_size)), g))
    assert result.token_ids == ids[:3] and result.finish_reason == "stop"
    assert result.text == tokenizer.decode(ids[:2])


def vllm_stop(pieces: list[str], stop: str, min_tokens: int) -> tuple[str, bool]:
    """vLLM v1's detokenizer rule, written out: a token's text is searched only once more than
    min_tokens tokens exist; a match must end in the new text (it may start before it)."""
    text, checked = "", 0
    for n, piece in enumerate(pieces, 1):
        text += piece
        if n <= min_tokens:
            checked = len(text)
            continue
        i = text.find(stop, max(0, checked - len(stop) + 1))
        if i >= 0:
            return text[:i], True
        checked = len(text)
    return text, False


@pytest.mark.parametrize("min_tokens", [0, 1, 2, 3, 4, 6])
@pytest.mark.parametrize("stop", ["e", "an", "value"])
def test_stop_strings_are_looked_for_only_after_min_tokens(tokenizer, min_tokens, stop):  # noqa: F811
    ids = tokenizer.encode("the value of an expression is the value")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)  # ASCII: one piece per token
    expected, stopped = vllm_stop(pieces, stop, min_tokens)
    g = Generation([ids[0]], max_new_tokens=len(ids), params=GREEDY, n_positions=128, tokenizer=tokenizer,
                   stop=stop, min_tokens=min_tokens)
    result = collect(generate_tokens(Recorder(scripted(ids, tokenizer.vocab_size)), g))
    assert result.text == expected
    assert result.finish_reason == ("stop" if stopped else "length")


def test_text_stream_quiet_text_can_start_a_stop_string(tokenizer):  # noqa: F811
    stream = TextStream(tokenizer, ["ab", "xaby"])
    ids = [tokenizer.token_to_id(c) for c in "xab"]
    out = "".join(stream.push(i, find_stops=False)[0] for i in ids)  # "ab" is quiet text
    assert not stream.stopped
    delta, stopped = stream.push(tokenizer.token_to_id("y"))
    assert stopped and out + delta == ""  # "xaby" ends in searched text: found from its start


def test_checks_name_the_field_and_the_limit():
    kw = dict(max_new_tokens=4, params=GREEDY, n_positions=64, vocab_size=16)
    with pytest.raises(InvalidParameterError, match=r"min_tokens must be in \[0, max_new_tokens=4\], got 5"):
        Generation([1], min_tokens=5, **kw)
    with pytest.raises(InvalidParameterError, match=r"stop_token_ids: token ids must be in \[0, 16\), got 16"):
        Generation([1], stop_token_ids=[16], **kw)
    with pytest.raises(InvalidParameterError, match=r"top_logprobs must be an int in \[0, 20\]"):
        Generation([1], top_logprobs=21, **kw)
    assert Generation([1], top_logprobs=3, **kw).return_logprobs  # alternatives imply log-probs


def test_generation_events_carry_top_logprobs():
    model = table_model(vocab=64)
    g = Generation([1, 2], max_new_tokens=4, params=GREEDY, n_positions=64, top_logprobs=3)
    context = [1, 2]
    for event in generate_tokens(Recorder(model), g):
        ref = log_softmax(model(context))
        order = sorted(range(64), key=lambda i: (-ref[i], i))[:3]
        assert [i for i, _ in event.top_logprobs] == order and event.token_id == order[0]
        assert event.top_logprobs[0][1] == event.logprob
        assert [lp for _, lp in event.top_logprobs] == pytest.approx([ref[i] for i in order], abs=1e-9)
        context.append(event.token_id)
