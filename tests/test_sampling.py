"""serving.sampling against straightforward references and Hugging Face's processors.

transformers + torch are test-only references here; serving/ itself never imports torch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from serving.sampling import Sampler, SamplingParams, apply_repetition_penalty, logits_to_probs

V = 50257  # GPT-2


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers.generation import logits_process

    return torch, logits_process


def _logits(seed: int, v: int = V, *, spread: float = 2.5, peaks: int = 0) -> np.ndarray:
    """float32 logits; ``peaks`` tokens pushed far up make it LM-like (a small nucleus)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(v) * spread
    if peaks:
        x[rng.choice(v, peaks, replace=False)] += 12 + rng.standard_normal(peaks)
    return x.astype(np.float32)


def _ref_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _ref_probs(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The definition, written out plainly: full stable sorts, Python loops."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))  # desc, lower id on ties
    keep = order[:top_k] if top_k else order
    p = _ref_softmax(x[keep])
    if top_p < 1.0:
        cum, n = 0.0, 0
        for n, q in enumerate(p, start=1):
            cum += q
            if cum >= top_p:
                break
        keep, p = keep[:n], p[:n] / p[:n].sum()
    out = np.zeros(len(x))
    out[keep] = p
    return out


def _ref_log_softmax(logits, token: int) -> float:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return float(x[token] - m - math.log(np.exp(x - m).sum()))


# -- SamplingParams ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0.*got -1.0"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(temperature="1"), "temperature must be a real number"),
        (dict(temperature=True), "temperature must be a real number"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.0), "top_k must be an int"),
        (dict(top_k=True), "top_k must be an int"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=float("nan")), "top_p must be finite"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=-1.2), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be finite"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
        (dict(seed=2**63), r"seed must be in \[0, 2\*\*63\)"),
        (dict(seed=1.0), "seed must be an int"),
        (dict(seed=False), "seed must be an int"),
    ],
)
def test_params_validation_names_field_and_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_accept_edges():
    SamplingParams(temperature=0, top_k=0, top_p=1, repetition_penalty=1e-3, seed=2**63 - 1)
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), seed=np.uint64(3))
    assert (type(p.temperature), type(p.top_k), type(p.seed)) == (float, int, int)
    assert (p.temperature, p.top_k, p.seed) == (0.5, 5, 3)
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
    with pytest.raises(Exception):  # frozen
        SamplingParams().temperature = 2.0  # type: ignore[misc]


# -- pure steps ----------------------------------------------------------------------


def test_repetition_penalty_matches_hf(hf):
    torch, lp = hf
    logits = np.array([2.0, -1.5, 0.0, 3.25, -0.5, 1.0, -4.0, 0.75], dtype=np.float32)
    previous = [0, 1, 1, 2, 6, 0, 7]  # repeats are penalised once
    for penalty in (1.3, 0.8, 1.0):
        ours = apply_repetition_penalty(logits, previous, penalty)
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty=penalty)(
            torch.tensor([previous]), torch.from_numpy(logits[None].copy())
        )[0].numpy()
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(  # hand-checked: + divided, - multiplied, untouched ids kept
        apply_repetition_penalty(logits, previous, 2.0),
        np.array([1.0, -3.0, 0.0, 3.25, -0.5, 1.0, -8.0, 0.375], dtype=np.float32),
    )
    assert apply_repetition_penalty(logits, [], 2.0) is not logits  # pure: a new array
    with pytest.raises(ValueError, match=r"previous_ids must be in \[0, 8\)"):
        apply_repetition_penalty(logits, [8], 1.2)
    with pytest.raises(ValueError, match=r"previous_ids must be in \[0, 8\)"):
        apply_repetition_penalty(logits, [-1], 1.2)
    with pytest.raises(ValueError, match="previous_ids must be a 1-D sequence of ints"):
        apply_repetition_penalty(logits, [1.0], 1.2)


def test_temperature_matches_reference_softmax():
    x = _logits(1, 1000)
    for t in (0.05, 0.5, 1.0, 2.0, 10.0):
        ref = _ref_softmax(x.astype(np.float64) / t)  # float64, as the module promises
        np.testing.assert_allclose(logits_to_probs(x, temperature=t), ref, rtol=1e-12, atol=1e-300)
    # a tiny temperature puts most logits below exp's range: still a clean distribution
    p = logits_to_probs(x, temperature=1e-4)
    assert p.sum() == pytest.approx(1.0) and p[np.argmax(x)] == pytest.approx(1.0)
    np.testing.assert_array_equal(logits_to_probs(x, temperature=0), np.eye(1000)[np.argmax(x)])


def test_top_k_top_p_exact_on_hand_made_example():
    p0 = np.array([0.05, 0.3, 0.1, 0.4, 0.15])  # ids by prob: 3, 1, 4, 2, 0
    x = np.log(p0).astype(np.float32)
    cases = [
        (dict(top_k=3), {3: 0.4 / 0.85, 1: 0.3 / 0.85, 4: 0.15 / 0.85}),
        (dict(top_p=0.65), {3: 0.4 / 0.7, 1: 0.3 / 0.7}),
        (dict(top_p=0.75), {3: 0.4 / 0.85, 1: 0.3 / 0.85, 4: 0.15 / 0.85}),
        (dict(top_p=0.3), {3: 1.0}),  # the top token alone already covers 0.3
        # top-p on the top-k renormalised distribution: 0.4/0.7 = 0.571 < 0.6
        (dict(top_k=2, top_p=0.6), {3: 0.4 / 0.7, 1: 0.3 / 0.7}),
        (dict(top_k=2, top_p=0.5), {3: 1.0}),
    ]
    for kwargs, expected in cases:
        want = np.zeros(5)
        want[list(expected)] = list(expected.values())
        got = logits_to_probs(x, temperature=1.0, **kwargs)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(kwargs))
        assert set(np.flatnonzero(got)) == set(expected), kwargs
        np.testing.assert_allclose(got, _ref_probs(x, temperature=1.0, **kwargs), rtol=1e-12)


def test_ties_go_to_the_lower_id():
    x = np.array([1.0, 3.0, 2.0, 3.0, 3.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(np.flatnonzero(logits_to_probs(x, top_k=2)), [1, 3])
    np.testing.assert_array_equal(np.flatnonzero(logits_to_probs(x, top_k=1)), [1])
    p = logits_to_probs(x, top_p=0.5)  # each 3.0 has ~0.3: two needed, lowest ids
    np.testing.assert_array_equal(np.flatnonzero(p), [1, 3])
    assert Sampler(SamplingParams(temperature=0)).sample(x)[0] == 1


@pytest.mark.parametrize(
    "v, spread, peaks, temperature, top_k, top_p",
    [
        (V, 2.5, 40, 1.0, 0, 0.9),  # LM-like: nucleus among the best 256
        (V, 1.0, 0, 1.0, 0, 0.9),  # flat: nucleus of ~40k tokens (bucketed path)
        (V, 1.0, 0, 0.7, 0, 0.3),
        (V, 3.0, 5, 1.3, 0, 0.999),
        (V, 1.0, 0, 0.8, 2000, 0.95),  # large k, then a large nucleus
        (V, 2.0, 10, 0.8, 50, 0.95),
        (V, 2.0, 0, 1.5, 40, 1.0),
        (3000, 1.0, 0, 1.0, 0, 0.5),
        (200, 1.0, 0, 1.0, 0, 0.5),
    ],
)
def test_filters_match_plain_reference_and_hf(hf, v, spread, peaks, temperature, top_k, top_p):
    torch, lp = hf
    x = _logits(v + peaks, v, spread=spread, peaks=peaks)
    got = logits_to_probs(x, temperature=temperature, top_k=top_k, top_p=top_p)
    ref = _ref_probs(x, temperature=temperature, top_k=top_k, top_p=top_p)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)

    scores = torch.from_numpy(x[None].astype(np.float64))
    scores = lp.TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    hf_probs = torch.softmax(scores, dim=-1)[0].numpy()
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(hf_probs))
    np.testing.assert_allclose(got, hf_probs, rtol=1e-9, atol=1e-300)


def test_nucleus_with_many_ties_matches_reference():
    # logits rounded to a coarse grid: thousands of exact ties around the cut
    x = np.round(_logits(7, V, spread=1.0) * 4) / 4
    for top_p in (0.37, 0.8, 0.95):
        got = logits_to_probs(x, top_p=top_p)
        ref = _ref_probs(x, temperature=1.0, top_p=top_p)
        np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(ref))


@pytest.mark.parametrize("case", ["strided_peaks", "coarse_ties", "mostly_masked"])
def test_top_k_selection_matches_reference_on_awkward_layouts(case):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(V)
    if case == "strided_peaks":  # the 1-in-16 sample sees only the peaks: exact fallback
        x[::16] += 10
    elif case == "coarse_ties":  # many exact ties at the k-th value
        x = np.round(x * 2) / 2
    else:  # all but 300 tokens masked out
        x[rng.permutation(V)[300:]] = -np.inf
    for k in (1, 50, 256, 1000):
        got = logits_to_probs(x, top_k=k)
        ref = _ref_probs(x, temperature=1.0, top_k=k)
        np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(ref), err_msg=f"k={k}")
        np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_bad_logits_are_rejected():
    s = Sampler(SamplingParams(seed=0))
    for bad, msg in [
        (np.array([0.0, np.nan]), "NaN"),
        (np.array([0.0, np.inf]), r"\+inf"),
        (np.array([-np.inf, -np.inf]), "all -inf"),
        (np.zeros((2, 3)), "1-D"),
        (np.zeros(0), "1-D"),
        (np.arange(3), "floating point"),
    ]:
        with pytest.raises(ValueError, match=msg):
            s.sample(bad)
        with pytest.raises(ValueError, match=msg):
            logits_to_probs(bad, temperature=0.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        logits_to_probs(np.zeros(3), top_p=0.0)


# -- Sampler -------------------------------------------------------------------------


def test_greedy_is_argmax_and_draws_nothing():
    params = SamplingParams(temperature=0, seed=11)
    s = Sampler(params)
    fresh = np.random.Generator(np.random.PCG64(11)).bit_generator.state
    for i in range(20):
        x = _logits(i, 5000)
        token, logprob = s.sample(x)
        assert token == int(np.argmax(x))
        assert logprob == pytest.approx(_ref_log_softmax(x, token), abs=1e-12)
    assert s.num_draws == 0 and s.rng.bit_generator.state == fresh


def test_greedy_with_penalty_is_argmax_of_penalised_and_logprob_is_raw(hf):
    torch, lp = hf
    x = _logits(3, 2000)
    top = [int(i) for i in np.argsort(-x)[:3]]
    token, logprob = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5)).sample(x, top)
    penalise = lp.RepetitionPenaltyLogitsProcessor(1.5)
    ref = penalise(torch.tensor([top]), torch.from_numpy(x[None].copy()))
    assert token == int(ref.argmax()) and token not in top
    assert logprob == pytest.approx(_ref_log_softmax(x, token), abs=1e-12)  # raw logits


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=5),
        SamplingParams(temperature=0.7, top_k=50, seed=6),
        SamplingParams(temperature=1.2, top_p=0.9, seed=7),
        SamplingParams(temperature=0.9, top_k=100, top_p=0.8, repetition_penalty=1.3, seed=8),
        SamplingParams(top_k=1, seed=9),  # one candidate: still exactly one draw
    ],
)
def test_one_draw_per_token_by_inverse_cdf(params):
    """Each token = inverse CDF of logits_to_probs at the sampler's next rng.random()."""
    s = Sampler(params)
    ref_rng = np.random.Generator(np.random.PCG64(params.seed))
    previous: list[int] = []
    for step in range(12):
        x = _logits(100 + step, V, spread=1.5 if step % 2 else 2.5, peaks=0 if step % 3 else 30)
        token, logprob = s.sample(x, previous)
        pen = apply_repetition_penalty(x.astype(np.float64), previous, params.repetition_penalty)
        probs = logits_to_probs(
            pen, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
        )
        u = ref_rng.random()
        cdf = np.cumsum(probs)
        assert token == int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        assert probs[token] > 0
        assert logprob == pytest.approx(_ref_log_softmax(x, token), abs=1e-9)
        assert s.rng.bit_generator.state == ref_rng.bit_generator.state
        previous.append(token)
    assert s.num_draws == 12


def test_same_seed_lockstep_different_seed_differs():
    params = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1234)
    client, server = Sampler(params), Sampler(SamplingParams(**{**params.__dict__}))
    greedy = Sampler(SamplingParams(temperature=0, seed=1234))
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1235))
    ids_c: list[int] = []
    ids_s: list[int] = []
    ids_o: list[int] = []
    for step in range(60):
        x = _logits(step, 1000, spread=1.0)
        # calls interleaved with other samplers (one of them greedy): no shared state
        tc = client.sample(x, ids_c)
        greedy.sample(x)
        to = other.sample(x, ids_o)
        ts = server.sample(x, ids_s)
        assert tc == ts
        ids_c.append(tc[0])
        ids_s.append(ts[0])
        ids_o.append(to[0])
    assert ids_c == ids_s and ids_o != ids_c
    assert greedy.num_draws == 0 and client.num_draws == server.num_draws == 60


def test_top_k_1_and_tiny_top_p_equal_greedy():
    greedy = Sampler(SamplingParams(temperature=0))
    k1 = Sampler(SamplingParams(temperature=0.8, top_k=1, seed=1))
    p0 = Sampler(SamplingParams(temperature=1.5, top_p=1e-9, seed=2))
    for i in range(30):
        x = _logits(i, V if i % 5 == 0 else 300)
        if i % 4 == 0:
            x[[7, 9]] = x.max() + 1  # a tie at the top: lowest id, as argmax
        g = greedy.sample(x)
        assert k1.sample(x) == g and p0.sample(x) == g


def test_sampling_frequencies_follow_probs():
    x = np.array([2.0, 1.0, 0.5, -np.inf, 1.5, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.9, top_k=4, seed=42)
    s = Sampler(params)
    n = 20000
    counts = np.bincount([s.sample(x)[0] for _ in range(n)], minlength=6)
    probs = logits_to_probs(x, temperature=0.9, top_k=4)
    assert counts[3] == 0 and counts[5] == 0  # -inf and the one cut by top-k: never
    np.testing.assert_allclose(counts / n, probs, atol=0.012)


def test_sample_batch_equals_rows_in_order():
    x = np.stack([_logits(i, 500) for i in range(4)])
    prev = [[1, 2], [], [3], [4, 4]]
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=3)
    a, b = Sampler(params), Sampler(params)
    assert a.sample_batch(x, prev) == [b.sample(row, p) for row, p in zip(x, prev)]
    with pytest.raises(ValueError, match="one entry per row"):
        a.sample_batch(x, prev[:3])


@pytest.mark.parametrize("params", [
    dict(temperature=0), dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=0.8, top_k=20, seed=3), dict(temperature=1.0, top_p=0.9, seed=4),
])
def test_skipping_the_logprob_changes_neither_tokens_nor_draws(params):
    with_lp, without = Sampler(SamplingParams(**params)), Sampler(SamplingParams(**params))
    prev = [3, 7, 7]
    for i in range(20):
        x = _logits(i, 300)
        token, lp = with_lp.sample(x, prev)
        token2, lp2 = without.sample(x, prev, logprob=False)
        assert token2 == token and math.isfinite(lp) and math.isnan(lp2)
        prev.append(token)
    assert without.num_draws == with_lp.num_draws


def test_unseeded_sampler_records_its_seed():
    s = Sampler(SamplingParams())
    assert 0 <= s.seed < 2**63
    x = _logits(0, 300)
    replay = Sampler(SamplingParams(seed=s.seed))
    assert [s.sample(x) for _ in range(5)] == [replay.sample(x) for _ in range(5)]


def test_serving_modules_do_not_import_torch():
    # a fresh interpreter: this test process has torch loaded for the HF references
    import subprocess
    import sys

    code = "import sys, serving.sampling, serving.tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
