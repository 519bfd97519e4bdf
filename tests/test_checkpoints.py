"""export/load and export/sources.py against real references: checkpoints written by `transformers`
(GPT2LMHeadModel on random weights), nanoGPT-format dicts, tokenizers trained with `tokenizers`."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.load import CheckpointError, hub_reachable, looks_like_hub_id, save_model
from export.sources import load_model
from export.config import PRESETS, GPTConfig
from export.model import GPT
from serving.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# one shape that is no preset (odd sizes catch transposes that happen to fit), one that is
SMALL = dict(n_layer=3, n_head=2, n_embd=48, vocab_size=300, n_positions=64)
TINY = {k: PRESETS["tiny"][k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")}
TOL = 1e-4  # fp32, two implementations of the same math


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every weight random and O(0.1-1), LayerNorm scales around 1, biases non-zero: the
    default init (zero biases, unit LN) would hide a bias or LN mapped to the wrong place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def hf_gpt2(shape: dict, seed: int = 0):
    config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, seed)
    return model


def our_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    model = GPT(config).eval()
    randomize(model, seed)
    return model


def save_legacy_bin(hf_model, folder: Path) -> None:
    """The old format transformers 5 no longer writes: pytorch_model.bin of a GPT2Model-style
    state dict (no `transformer.` prefix, as on the hub's gpt2) with the causal-mask buffers."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    n = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def hf_forward(hf_model, ids: torch.Tensor, cache=None):
    """logits, cache; transformers 5 calls the cache argument `cache` (4.x: past_key_values)."""
    out = hf_model(ids, cache=cache, use_cache=True)
    return out.logits, out.cache


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("shape", [SMALL, TINY], ids=["3L-2H-48d-v300", "tiny"])
@pytest.mark.parametrize("fmt", ["safetensors", "pytorch_model.bin"])
def test_hf_folder_logits_match_transformers(tmp_path: Path, shape: dict, fmt: str) -> None:
    hf = hf_gpt2(shape)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        save_legacy_bin(hf, tmp_path)
    model, tok = load_model(tmp_path)
    assert tok is None  # no tokenizer files in the folder
    assert not model.training and model.transformer.wte.weight.dtype == torch.float32
    assert model.config.n_embd == shape["n_embd"] and model.config.vocab_size == shape["vocab_size"]

    ids = torch.randint(0, shape["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    assert ref.std() > 0.3  # logits that carry signal, so the tolerance means something
    assert max_delta(ours, ref) <= TOL


@pytest.mark.parametrize("shape", [SMALL, TINY], ids=["3L-2H-48d-v300", "tiny"])
def test_kv_cache_decode_step_matches_transformers(tmp_path: Path, shape: dict) -> None:
    hf = hf_gpt2(shape, seed=3)
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, shape["vocab_size"], (2, 11), generator=g)
    nxt = torch.randint(0, shape["vocab_size"], (2, 1), generator=g)
    with torch.no_grad():
        _, cache = hf_forward(hf, prompt)
        ref_step, cache = hf_forward(hf, nxt, cache)
        _, past = model(prompt)
        step, presents = model(nxt, past_key_values=past)
    assert max_delta(step, ref_step) <= TOL
    # the cache itself has HF's layout (B, nh, S, hs) and contents: the serving graph's contract
    for i, (k, v) in enumerate(presents):
        assert k.shape == cache.layers[i].keys.shape == (2, shape["n_head"], 12, shape["n_embd"] // shape["n_head"])
        assert max_delta(k, cache.layers[i].keys) <= TOL
        assert max_delta(v, cache.layers[i].values) <= TOL


# ----------------------------------------------------------------------------- nanoGPT


def nanogpt_checkpoint(model: GPT) -> dict:
    """What nanoGPT's train.py saves for a torch.compile'd model: `_orig_mod.` keys, the tied
    lm_head, the causal-mask buffer (non-flash attention), optimizer state, plain-data config."""
    c = model.config
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.lm_head.weight"] = model.transformer.wte.weight  # tied: the same tensor
    for i in range(c.n_layer):
        mask = torch.tril(torch.ones(c.n_positions, c.n_positions)).view(1, 1, c.n_positions, c.n_positions)
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = mask
    shadow = copy.deepcopy(model)  # optimizer state like a real run's, without moving `model`
    optimizer = torch.optim.AdamW(shadow.parameters(), lr=1e-3)
    shadow.transformer.wte.weight.sum().backward()
    optimizer.step()
    return {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                           bias=c.bias, vocab_size=c.vocab_size, dropout=0.0),
        "iter_num": 5000,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3, "compile": True},
    }


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_round_trip(tmp_path: Path, bias: bool) -> None:
    model = our_gpt(GPTConfig(**SMALL, bias=bias, activation="gelu", bos_token_id=0, eos_token_id=0), seed=4)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, _ = model(ids)
    torch.save(nanogpt_checkpoint(model), tmp_path / "ckpt.pt")

    for source in (tmp_path / "ckpt.pt", tmp_path):  # the file, or nanoGPT's out_dir
        loaded, tok = load_model(source)
        assert tok is None  # nanoGPT keeps no tokenizer
        assert loaded.config.bias == bias and loaded.config.n_positions == SMALL["n_positions"]
        with torch.no_grad():
            assert torch.equal(loaded(ids)[0], expected)


def test_nanogpt_with_objects_other_than_plain_data_is_refused(tmp_path: Path) -> None:
    model = our_gpt(GPTConfig(**SMALL, bos_token_id=0, eos_token_id=0))
    ckpt = {"model": model.state_dict(), "model_args": dict(n_layer=3, n_head=2, n_embd=48, block_size=64,
                                                           bias=True, vocab_size=300),
            "config": GPTConfig(**SMALL)}  # a dataclass instance: needs full unpickling
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"holds a export.config.GPTConfig object; torch.load\(weights_only=True\)"):
        load_model(tmp_path / "ckpt.pt")


def test_nanogpt_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ckpt.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "ckpt.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="'model_args' and 'model'.*state_dict"):
        load_model(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- save_model


@pytest.mark.parametrize("bias", [True, False])
def test_save_model_round_trip_and_transformers_reads_it(tmp_path: Path, bias: bool) -> None:
    model = our_gpt(GPTConfig(**SMALL, bias=bias, bos_token_id=0, eos_token_id=0), seed=6)
    save_model(model, None, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    # Conv1D layout (in, out) under HF names
    assert load_file(tmp_path / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"].shape == (48, 192)

    ids = torch.randint(0, SMALL["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, _ = model(ids)
        loaded, _ = load_model(tmp_path)
        assert torch.equal(loaded(ids)[0], expected)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # re-tied
        assert max_delta(hf(ids).logits, expected) <= TOL


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def trained_tokenizer() -> tokenizers.Tokenizer:
    """A tiny GPT-2-style byte-level BPE trained here on the help text every CPython ships."""
    from pydoc_data.topics import topics
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = "\n".join(topics.values())[:200_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    assert tok.get_vocab_size() == 300
    return tok


SAMPLE = "The with statement wraps a block; exceptions propagate.\n  for x in range(10): pass  ✓"


def test_tokenizer_from_tokenizer_json(tmp_path: Path, trained_tokenizer) -> None:
    hf_gpt2(SMALL).save_pretrained(tmp_path)
    trained_tokenizer.save(str(tmp_path / "tokenizer.json"))
    model, tok = load_model(tmp_path)
    assert tok is not None and tok.vocab_size == 300 and tok.eos_token_id == 0
    ids = tok.encode(SAMPLE)
    assert ids == trained_tokenizer.encode(SAMPLE).ids and tok.decode(ids) == SAMPLE
    assert model.config.vocab_size == 300


def test_tokenizer_from_vocab_and_merges(tmp_path: Path, trained_tokenizer) -> None:
    hf_gpt2(SMALL).save_pretrained(tmp_path)
    trained_tokenizer.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 repos ship
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    _, tok = load_model(tmp_path)
    assert tok is not None
    assert tok.encode(SAMPLE) == trained_tokenizer.encode(SAMPLE).ids
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_tokenizer_argument_and_save_model_writes_it(tmp_path: Path, trained_tokenizer) -> None:
    trained_tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = our_gpt(GPTConfig(**SMALL, bos_token_id=0, eos_token_id=0))
    torch.save(nanogpt_checkpoint(model), tmp_path / "ckpt.pt")
    loaded, tok = load_model(tmp_path / "ckpt.pt", tokenizer=tmp_path / "tokenizer.json")
    assert tok is not None and tok.encode(SAMPLE) == trained_tokenizer.encode(SAMPLE).ids
    instance = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert load_model(tmp_path / "ckpt.pt", tokenizer=instance)[1] is instance
    with pytest.raises(CheckpointError, match="tokenizer 'nope.json' is not an existing file or folder"):
        load_model(tmp_path / "ckpt.pt", tokenizer="nope.json")

    save_model(loaded, tok, tmp_path / "hf")
    _, tok2 = load_model(tmp_path / "hf")
    assert tok2 is not None and tok2.to_str() == tok.to_str()

    small = our_gpt(GPTConfig(**{**SMALL, "vocab_size": 256}, bos_token_id=0, eos_token_id=0))
    save_model(small, tok, tmp_path / "small")
    with pytest.raises(CheckpointError, match="tokenizer has 300 tokens but the model's vocab_size is 256"):
        load_model(tmp_path / "small")


# ----------------------------------------------------------------------------- presets


def test_random_preset_is_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, tok = load_model("tiny-random")
    b, _ = load_model("tiny-random")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert tok is None  # tiny's vocab (512) is not the demo tokenizer's (4096)
    assert a.config == GPTConfig.from_preset("tiny")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_demo_random_comes_with_the_demo_tokenizer() -> None:
    model, tok = load_model("demo-random")
    assert model.config == GPTConfig.from_preset("demo")
    assert tok is not None and tok.eos_token_id == 0 and tok.vocab_size <= model.config.vocab_size
    ids = tok.encode(SAMPLE)
    with torch.no_grad():
        assert model(torch.tensor([ids]))[0].shape == (1, len(ids), model.config.vocab_size)


def test_gpt2_random_has_the_124m_shape() -> None:
    model, tok = load_model("gpt2-random")
    assert model.config == GPTConfig.from_preset("gpt2") and tok is None
    assert model.num_parameters() == 124_439_808  # GPT-2 small, tied head counted once


# ----------------------------------------------------------------------------- errors


def test_unknown_preset_lists_what_is_accepted() -> None:
    with pytest.raises(CheckpointError) as err:
        load_model("gpt5-random")
    message = str(err.value)
    assert "unknown preset 'gpt5'" in message
    for accepted in ("config.json", "ckpt.pt", "hub id", "'demo'", "gpt2-random", "tiny-random"):
        assert accepted in message


@pytest.mark.parametrize("source", ["./no/such/folder", "no/such/ckpt.pt", "a/b/c", "/abs/missing"])
def test_missing_path_is_not_taken_for_a_hub_id(source: str) -> None:
    with pytest.raises(CheckpointError, match="is not an existing file or folder.*config.json.*ckpt.pt"):
        load_model(source)


@pytest.mark.parametrize(
    "name, hub", [("gpt2", True), ("openai-community/gpt2", True), ("distilgpt2", True),
                  ("./gpt2", False), ("out/ckpt.pt", False), ("a/b/c", False), ("/x/y", False),
                  ("model.safetensors", False), ("a..b", False)],
)
def test_looks_like_hub_id(name: str, hub: bool) -> None:
    assert looks_like_hub_id(name) is hub


def test_folder_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither config.json.*nor ckpt.pt"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config(**SMALL).to_dict()))
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors"):
        load_model(tmp_path)


def _hf_folder_with(tmp_path: Path, edit) -> Path:
    hf_gpt2(SMALL).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    def shrink(state):
        state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(48, 100)

    with pytest.raises(CheckpointError) as err:
        load_model(_hf_folder_with(tmp_path, shrink))
    message = str(err.value)
    assert "'transformer.h.1.mlp.c_fc.weight' has shape (48, 100), expected (48, 192)" in message
    assert "n_embd=48" in message


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    def edit(state):
        del state["transformer.h.2.ln_2.bias"]
        state["transformer.h.0.attn.q_proj.weight"] = torch.zeros(48, 48)

    with pytest.raises(CheckpointError, match=r"missing tensors \['transformer.h.2.ln_2.bias'\]; "
                                              r"unexpected tensors \['transformer.h.0.attn.q_proj.weight'\]"):
        load_model(_hf_folder_with(tmp_path, edit))


def test_untied_lm_head_is_refused(tmp_path: Path) -> None:
    def untie(state):
        state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0

    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from the token embedding"):
        load_model(_hf_folder_with(tmp_path, untie))


def test_config_the_model_cannot_run_is_refused(tmp_path: Path) -> None:
    hf_gpt2(SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in [
        ("activation_function", "relu", "activation_function='relu' is not supported"),
        ("n_inner", 100, "n_inner=100 is not supported"),
        ("n_head", 5, r"n_embd \(48\) must be divisible by n_head \(5\)"),
        ("model_type", "llama", "model_type 'llama' is not supported"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path)


def test_hub_id_offline_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="offline mode.*Pass a local folder"):
        load_model("gptpipe-tests/no-such-model")
    with pytest.raises(CheckpointError, match="'tiny-random' gives its shape with random weights"):
        load_model("tiny")  # a preset name alone is a hub id; the message points at the preset
    assert time.monotonic() - start < 10


def test_unreachable_hub_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    assert hub_reachable("http://127.0.0.1:9", timeout_s=2) is False
    with pytest.raises(CheckpointError, match="cannot be reached.*Pass a local folder"):
        load_model("gptpipe-tests/no-such-model")
    assert time.monotonic() - start < 10
