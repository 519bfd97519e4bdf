"""The peer engines' driver (serving.bench.peers): JSON-lines framing, bounded reads, the missing-venv
message, and — where scripts/install_peers.sh has made the peer venv — the real worker
(scripts/peers/worker.py) on llama.cpp and OpenVINO conversions of a tiny random GPT-2, checked
against transformers' GPT2LMHeadModel on the same weights."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest

from serving.bench import peers
from serving.bench.peers import LineReader, PeerError, PeerResult, PeersUnavailable, PeerTimeout, PeerWorker, encode

# ----------------------------------------------------------------------------- no peer venv needed


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    reader_file, writer_file = os.fdopen(read_fd, "rb", buffering=0), os.fdopen(write_fd, "wb", buffering=0)
    yield LineReader(reader_file, max_bytes=1000), writer_file
    for f in (reader_file, writer_file):
        if not f.closed:
            f.close()


def test_encode_is_one_compact_line():
    line = encode({"prompt_ids": [1, 2], "text": "a\nb"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line == b'{"prompt_ids":[1,2],"text":"a\\nb"}\n'


def test_reader_splits_and_joins_lines(pipe):
    reader, writer = pipe
    writer.write(b'{"a": 1}\n{"b": ')
    assert reader.read(1.0) == {"a": 1}
    writer.write(b'2}\n')
    assert reader.read(1.0) == {"b": 2}
    writer.close()
    assert reader.read(1.0) is None  # end of stream


@pytest.mark.parametrize("data, match", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"a": 1', "ended inside a line"),
    (b"x" * 1500, "longer than 1000 bytes"),
])
def test_reader_refuses_broken_lines(pipe, data, match):
    reader, writer = pipe
    writer.write(data)
    writer.close()
    with pytest.raises(PeerError, match=match):
        reader.read(1.0)


def test_reader_read_is_bounded(pipe):
    reader, _writer = pipe  # the writer stays open and silent
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match="within 0.2 s"):
        reader.read(0.2)
    assert 0.15 < time.monotonic() - t0 < 2.0


def test_missing_venv_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTPIPE_PEERS_VENV", str(tmp_path / "nowhere"))
    assert peers.default_venv() == tmp_path / "nowhere"
    with pytest.raises(PeersUnavailable, match=r"GPTPIPE_PEERS_VENV=.*nowhere bash scripts/install_peers.sh"):
        peers.peers_python()
    # a venv whose install never finished (no stamp) is not taken either
    (tmp_path / "half" / "bin").mkdir(parents=True)
    (tmp_path / "half" / "bin" / "python").symlink_to("/bin/false")
    with pytest.raises(PeersUnavailable, match="install_peers.sh"):
        peers.peers_python(tmp_path / "half")
    with pytest.raises(PeersUnavailable, match="not installed"):
        PeerWorker("llama.cpp", tmp_path / "half" / "bin" / "python", venv=tmp_path / "half")
    # one peer installed (GPTPIPE_PEERS=openvino): the other is still missing, with its own command
    peers.stamp(tmp_path / "half", "openvino").write_text("key")
    assert peers.peers_python(tmp_path / "half", "openvino") == tmp_path / "half" / "bin" / "python"
    assert peers.peers_python(tmp_path / "half") == tmp_path / "half" / "bin" / "python"  # any peer
    with pytest.raises(PeersUnavailable, match=r"llama.cpp not installed.*GPTPIPE_PEERS=llama.cpp bash "
                                                r"scripts/install_peers.sh"):
        peers.peers_python(tmp_path / "half", "llama.cpp")
    with pytest.raises(PeersUnavailable, match="llama.cpp not installed"):
        PeerWorker("llama.cpp", tmp_path / "half" / "bin" / "python", venv=tmp_path / "half")


def test_worker_arguments_are_checked_before_starting(tmp_path):
    with pytest.raises(ValueError, match="engine must be one of llama.cpp, openvino, openvino-cb"):
        PeerWorker("vllm", tmp_path)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        PeerWorker("openvino", tmp_path, threads=0)
    with pytest.raises(FileNotFoundError, match="model: .*missing.gguf does not exist"):
        PeerWorker("llama.cpp", tmp_path / "missing.gguf")


def test_peer_result_timing():
    result = PeerResult.from_message({"id": 3, "token_ids": [5, 6, 7], "ttft_s": 0.1, "itl_s": [0.02, 0.03],
                                      "wall_s": 0.15, "engine_tpot_s": 0.025})
    assert result.token_ids == (5, 6, 7) and result.extra == {"engine_tpot_s": 0.025}
    assert result.decode_tokens_per_s == pytest.approx(2 / 0.05)
    assert result.token_times(10.0) == pytest.approx((10.1, 10.12, 10.15))
    with pytest.raises(PeerError, match="token_ids"):
        PeerResult.from_message({"ttft_s": 0.1})


def _convert_module():
    spec = importlib.util.spec_from_file_location("peers_convert", peers.SCRIPTS / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("vocab_size, eos_id", [(512, 0), (50257, 50256)])
def test_placeholder_tokenizer_has_the_models_vocabulary(vocab_size, eos_id):
    tok = _convert_module().placeholder_tokenizer(vocab_size, eos_id)
    assert tok.get_vocab_size() == vocab_size
    assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
    assert tok.token_to_id("<|endoftext|>") == eos_id
    text = "héllo wörld 🎉"
    assert tok.decode(tok.encode(text).ids) == text


# ----------------------------------------------------------------------------- the real peer venv

peer_venv = pytest.mark.peers


def _peer_python(peer: str):
    try:
        return peers.peers_python(peer=peer)
    except PeersUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def llama_python():
    return _peer_python("llama.cpp")


@pytest.fixture(scope="module")
def openvino_python():
    return _peer_python("openvino")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random GPT-2 as a Hugging Face folder (with a trained BPE tokenizer), and transformers'
    model read back from it: the reference."""
    import torch

    from export.baselines import load_transformers_model
    from export.load import save_model
    from export.config import GPTConfig
    from export.model import GPT
    from tests.conftest import train_tokenizer

    torch.manual_seed(7)
    config = GPTConfig.from_preset("tiny")
    folder = save_model(GPT(config).eval(), train_tokenizer(config.vocab_size), tmp_path_factory.mktemp("hf"))
    return folder, load_transformers_model(folder, threads=1)


def reference(hf_model, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """transformers: the logits after the prompt, and n greedy tokens (no eos stop)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        logits = hf_model(ids).logits[0, -1].numpy()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False)
    return logits, out[0, len(prompt):].tolist()


PROMPTS = ([5, 17, 300, 42, 9, 11, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 5)


@peer_venv
def test_llama_cpp_matches_transformers(llama_python, tiny_hf, tmp_path):
    folder, hf_model = tiny_hf
    records = peers.convert("gguf", folder, tmp_path, types=("f32", "q8_0"))
    assert {(r["type"], Path(r["path"]).name) for r in records} == {("f32", "f32.gguf"), ("q8_0", "q8_0.gguf")}
    with PeerWorker("llama.cpp", tmp_path / "f32.gguf", threads=1, n_ctx=128) as worker:
        assert worker.info["n_vocab"] == 512 and worker.info["threads"] == 1
        for prompt in PROMPTS:
            logits, tokens = reference(hf_model, prompt, 16)
            np.testing.assert_allclose(worker.logits(prompt), logits, atol=1e-3)
            result = worker.generate(prompt, 16)
            assert list(result.token_ids) == tokens
            assert len(result.itl_s) == 15 and result.ttft_s > 0 and result.decode_tokens_per_s > 0
        # a refused request is an error answer; the worker goes on serving
        with pytest.raises(PeerError, match=r"max_new_tokens \(200\) exceeds the context 128"):
            worker.generate(PROMPTS[0], 200)
        with pytest.raises(PeerError, match="prompt_ids must be a non-empty list"):
            worker.request({"op": "generate", "prompt_ids": [], "max_new_tokens": 1})
        assert list(worker.generate(PROMPTS[0], 4).token_ids) == reference(hf_model, PROMPTS[0], 4)[1]
        process = worker.process
    assert process.returncode == 0  # quit cleanly
    with PeerWorker("llama.cpp", tmp_path / "q8_0.gguf", threads=1, n_ctx=128) as worker:
        logits, _ = reference(hf_model, PROMPTS[1], 1)
        assert np.abs(worker.logits(PROMPTS[1]) - logits).max() < 0.05  # 8-bit weights, random model


@peer_venv
def test_worker_timeout_kills_it_and_load_failures_are_reported(llama_python, tiny_hf, tmp_path):
    folder, _ = tiny_hf
    peers.convert("gguf", folder, tmp_path, types=("f32",))
    worker = PeerWorker("llama.cpp", tmp_path / "f32.gguf", threads=1, n_ctx=128, timeout_s=1e-4)
    try:
        with pytest.raises(PeerTimeout, match="within 0.0001 s"):
            worker.generate(PROMPTS[1], 60)
        assert worker.process.poll() is not None  # killed: its protocol state is unknown
        with pytest.raises(PeerError, match="not running"):
            worker.generate(PROMPTS[0], 1)
    finally:
        worker.close()
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(PeerError, match="could not load"):
        PeerWorker("llama.cpp", not_gguf, threads=1)


@peer_venv
def test_openvino_matches_transformers(openvino_python, tiny_hf, tmp_path):
    folder, hf_model = tiny_hf
    peers.convert("openvino", folder, tmp_path, types=("fp32",))
    with PeerWorker("openvino", tmp_path / "fp32", threads=1) as worker:
        for prompt in PROMPTS:
            logits, tokens = reference(hf_model, prompt, 16)
            np.testing.assert_allclose(worker.logits(prompt), logits, atol=1e-3)
            assert list(worker.generate(prompt, 16).token_ids) == tokens
    with PeerWorker("openvino-cb", tmp_path / "fp32", threads=1) as worker:
        results, wall_s = worker.batch(list(PROMPTS), 16)
        assert [list(r.token_ids) for r in results] == [reference(hf_model, p, 16)[1] for p in PROMPTS]
        assert wall_s > 0
        with pytest.raises(PeerError, match="op 'generate' is not served"):
            worker.generate(PROMPTS[0], 4)
