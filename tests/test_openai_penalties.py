"""Presence and frequency penalties (serving/sampling.py): OpenAI's formula, range checks, and
that a Generation applies them to generated ids only (the prompt is not penalised)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.generation import Generation, InvalidParameterError, make_sampling_params
from serving.sampling import Sampler, SamplingParams, apply_presence_frequency_penalties


def openai_reference(logits, output_ids, presence, frequency):
    # OpenAI's documented formula, written out per token:
    # mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    out = [float(x) for x in logits]
    for j in set(output_ids):
        c = output_ids.count(j)
        out[j] = out[j] - c * frequency - float(c > 0) * presence
    return out


def test_penalties_follow_openais_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    output = [3, 3, 7, 3, 11]
    got = apply_presence_frequency_penalties(logits, output, presence_penalty=0.5, frequency_penalty=-0.25)
    np.testing.assert_allclose(got, openai_reference(logits, output, 0.5, -0.25), rtol=0, atol=1e-6)
    assert np.array_equal(apply_presence_frequency_penalties(logits, []), logits.astype(np.float64))


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan"), True, "1"])
def test_penalties_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(InvalidParameterError, match=field):
        make_sampling_params(**{field: value})


def test_greedy_sampler_skips_the_prompt_and_counts_repeats():
    # token 1 leads; once generated twice it must lose to token 2 under frequency 1.0
    logits = np.array([0.0, 3.0, 2.5, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.3))
    prompt = [1, 1, 1, 1, 1]  # prompt repeats are not penalised
    assert sampler.sample(logits, prompt, n_prompt=5)[0] == 1
    assert sampler.sample(logits, prompt + [1], n_prompt=5)[0] == 1  # 3.0 - 0.3 > 2.5
    assert sampler.sample(logits, prompt + [1, 1], n_prompt=5)[0] == 2  # 3.0 - 0.6 < 2.5


def test_generation_with_presence_penalty_avoids_repeats():
    # a model that always prefers token 5, then 6, then 7: with presence 2.0 each greedy token is new
    logits = np.array([0, 0, 0, 0, 0, 5.0, 4.0, 3.5, 0], dtype=np.float32)
    plain = Generation([5, 5], max_new_tokens=3, params=make_sampling_params(temperature=0), n_positions=16)
    penalised = Generation([5, 5], max_new_tokens=3, params=make_sampling_params(temperature=0, presence_penalty=2.0),
                           n_positions=16)
    assert plain.argmax_only and not penalised.argmax_only  # the penalties need the logits

    def run(g):
        return [g.advance(logits, sent_at=0.0)[0].token_id for _ in range(3)]

    assert run(plain) == [5, 5, 5]
    assert run(penalised) == [5, 6, 7]
