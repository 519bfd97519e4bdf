"""The blocking Client against a REAL tritonserver: parity with PyTorch, sampling, stop/eos/text, streams, the CLI.

One server per session serves the `tiny` model (random weights, seeded) exported to ONNX with
a byte-level BPE tokenizer trained here; the PyTorch model it came from is the reference.
The other tests of serving/client/ are in test_client_*.py (a file per module or stage):
errors and validation, the step (busy retry), the AsyncClient, and the HTTP generate extension.
"""

from __future__ import annotations

import json
from contextlib import closing

import pytest

from export.model import generate_greedy
from serving import Client
from tests.conftest import metric, wait_for

MODES = ["client", "server"]
PROMPTS = [
    "The quick brown fox",
    "In Python, a function is",
    "x",
    "Exceptions are raised when an error occurs in the middle of a long sentence about",
]


@pytest.fixture
def client(served):
    with Client(served.server.grpc_url) as c:
        yield c


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("mode", MODES)
def test_greedy_matches_pytorch_reference(served, client, mode):
    result = client.generate(PROMPTS[0], max_new_tokens=24, temperature=0, mode=mode)
    expected = served.reference(PROMPTS[0], 24)
    assert result.token_ids == expected
    assert result.finish_reason == ("eos" if expected[-1] == 0 else "length")
    assert result.text == served.tokenizer.decode([t for t in expected if t != 0])
    assert result.timings.ttft_s > 0 and len(result.timings.itl_s) == len(expected) - 1


@pytest.mark.parametrize("mode", MODES)
def test_batched_prompts_match_pytorch_reference(served, client, mode):
    results = client.generate(PROMPTS, max_new_tokens=16, temperature=0, mode=mode)
    assert [r.token_ids for r in results] == [served.reference(p, 16) for p in PROMPTS]


def test_http_protocol_client_loop_matches_reference(served):
    with Client(served.server.http_url, protocol="http") as client:
        results = client.generate(PROMPTS[:2], max_new_tokens=12, temperature=0)
        streamed = "".join(client.generate(PROMPTS[0], max_new_tokens=12, temperature=0, stream=True))
        # server mode over HTTP: the generate extension's generate_stream (SSE)
        server = client.generate(PROMPTS[:2], max_new_tokens=12, temperature=0, mode="server")
    assert [r.token_ids for r in results] == [served.reference(p, 12) for p in PROMPTS[:2]]
    assert [r.token_ids for r in server] == [r.token_ids for r in results]
    assert streamed == results[0].text == server[0].text


def test_sixteen_concurrent_generations_are_all_correct_and_batched(served, client):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(16)]
    results = client.generate(prompts, max_new_tokens=12, temperature=0)
    assert [r.token_ids for r in results] == [served.reference(p, 12) for p in prompts]
    # the sequence batcher handed the gpt model several sequences' steps at once
    assert metric(served.server, "gptpipe_max_rows_per_call") > 1
    assert wait_for(lambda: served.active_sequences() == 0)


# ------------------------------------------------------------------ sampling


def test_seeded_sampling_is_reproducible_and_identical_across_modes(client):
    kw = dict(max_new_tokens=32, temperature=0.9, top_k=100, top_p=0.95, repetition_penalty=1.2,
              return_logprobs=True)
    a = client.generate(PROMPTS[1], seed=2024, **kw)
    b = client.generate(PROMPTS[1], seed=2024, **kw)
    s = client.generate(PROMPTS[1], seed=2024, mode="server", **kw)
    other = client.generate(PROMPTS[1], seed=2025, **kw)
    assert a.token_ids == b.token_ids == s.token_ids
    assert a.text == s.text
    assert a.logprobs == pytest.approx(s.logprobs, abs=1e-5) and len(a.logprobs) == len(a.token_ids)
    assert other.token_ids != a.token_ids


# ------------------------------------------------------------------ stop, eos, text


@pytest.mark.parametrize("mode", MODES)
def test_stop_string_across_tokens_is_cut(served, client, mode):
    ids = served.reference(PROMPTS[3], 30)
    ids = ids[: ids.index(0)] if 0 in ids else ids
    pieces = [served.tokenizer.decode([t]) for t in ids]
    # a stop string made of the end of one token and the start of the next one
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = served.tokenizer.decode(ids)
    result = client.generate(PROMPTS[3], max_new_tokens=30, temperature=0, stop=["never-there", stop], mode=mode)
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert stop not in result.text
    assert result.token_ids == ids[: len(result.token_ids)] and len(result.token_ids) <= k + 2
    assert wait_for(lambda: served.active_sequences() == 0)


@pytest.mark.parametrize("mode", MODES)
def test_eos_ends_generation(served, tmp_path, mode):
    ids = served.reference(PROMPTS[2], 20)
    eos = ids[5]  # make the 6th greedy token "eos" through a local generation config
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(served.tokenizer.to_str())
    config = json.loads((served.repository / "tokenizer" / "1" / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    with Client(served.server.grpc_url, tokenizer=folder) as client:
        result = client.generate(PROMPTS[2], max_new_tokens=20, temperature=0, mode=mode)
        # token ids in, eos ignored: exactly max_new_tokens tokens (what a benchmark wants)
        with closing(client.events(served.tokenizer.encode(PROMPTS[2]), max_new_tokens=20, temperature=0,
                                   mode=mode, ignore_eos=True)) as events:
            all_ids = [e.token_id for e in events]
    expected = ids[: ids.index(eos) + 1]
    assert result.token_ids == expected and result.finish_reason == "eos"
    assert result.text == served.tokenizer.decode(expected[:-1])
    assert all_ids == generate_greedy(served.model, served.tokenizer.encode(PROMPTS[2]), 20)


@pytest.mark.parametrize("mode", MODES)
def test_streaming_never_splits_utf8_characters(served, client, mode):
    tok = served.tokenizer
    split_chars = 0
    for seed in range(6):
        with client.generate("日本語 café 🎉", max_new_tokens=24, temperature=3.0, seed=seed, stream=True,
                             mode=mode) as stream:
            deltas = list(stream)
        ids = stream.result.token_ids
        full = tok.decode([t for t in ids if t != 0])
        assert "".join(deltas) == stream.result.text == full
        # count characters of more than one byte whose bytes came in different tokens
        if any("\ufffd" in tok.decode([t]) for t in ids) and any(ord(c) > 127 and c != "\ufffd" for c in full):
            split_chars += 1
    assert split_chars > 0, "no multi-byte character spanned tokens: the test proved nothing"


# ------------------------------------------------------------------ streams


@pytest.mark.parametrize("mode", MODES)
def test_closing_a_stream_early_frees_the_server_slot(served, client, mode):
    assert wait_for(lambda: served.active_sequences() == 0)
    stream = client.generate(PROMPTS[0], max_new_tokens=100, temperature=0.8, seed=1, stream=True, mode=mode)
    deltas = [next(stream) for _ in range(3)]
    assert served.active_sequences() == 1
    stream.close()
    assert wait_for(lambda: served.active_sequences() == 0), "the sequence kept its KV slot"
    assert len("".join(deltas)) > 0


# ------------------------------------------------------------------ CLI


def test_cli_generate(served):
    import typer
    from typer.testing import CliRunner

    from serving.commands.generate import generate

    app = typer.Typer()  # the command as serving/cli.py registers it, without the other commands
    app.command("generate")(generate)
    app.command("version")(lambda: None)  # two commands: `generate` stays a subcommand
    runner = CliRunner()
    url = served.server.grpc_url
    result = runner.invoke(app, ["generate", PROMPTS[0], "--url", url, "--max-new-tokens", "8",
                                 "--temperature", "0", "--json", "--mode", "server"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == served.reference(PROMPTS[0], 8)
    assert len(out["timings"]["itl_s"]) == len(out["token_ids"]) - 1
    streamed = runner.invoke(app, ["generate", PROMPTS[0], "--url", url, "--max-new-tokens", "8", "--temperature", "0"])
    assert streamed.exit_code == 0 and streamed.stdout.startswith(out["text"])
    bad = runner.invoke(app, ["generate", PROMPTS[0], "--url", url, "--top-p", "0"])
    assert bad.exit_code != 0 and "top_p must be in (0, 1]" in bad.output
