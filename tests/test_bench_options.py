"""`gptpipe bench`'s options (serving.bench.run): a bad option or a run that cannot fit the model
is refused before anything runs, naming the field and the limit."""

from __future__ import annotations

import pytest

from serving.bench.run import BenchOptions, check_fits


@pytest.mark.parametrize("kw, match", [
    (dict(mode="local"), "mode"),
    (dict(concurrency=()), "concurrency"),
    (dict(concurrency=(1, 1)), "repeated"),
    (dict(output_tokens=1), "output_tokens"),
    (dict(concurrency=(1, 8), requests=4), "requests"),
])
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        BenchOptions(**kw)


def test_prompt_plus_output_past_the_context_is_refused():
    with pytest.raises(ValueError, match="n_positions=128"):
        check_fits(prompt_tokens=100, output_tokens=29, n_positions=128)
    with pytest.raises(ValueError, match="max_sequences=8"):
        check_fits(prompt_tokens=1, output_tokens=2, n_positions=128, concurrency=[16], max_sequences=8)
