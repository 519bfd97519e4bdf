"""Shared fixtures: a tiny GPT with its own tokenizer, exported once per session, and one real
tritonserver serving it (tests/triton_fixtures.py starts servers and prints their log on failure)."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pydoc_data.topics
import pytest

pytest_plugins = ["tests.triton_fixtures"]

TINY_SEED = 1234


def train_tokenizer(vocab_size: int):
    """Byte-level BPE on the help text every CPython carries, plus some non-ASCII text so that
    multi-byte characters get tokens of their own and pieces of byte tokens. No downloads."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from serving.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(pydoc_data.topics.topics.values()) + ["héllo wörld café naïve 日本語 テキスト 🎉 ünïcödé"] * 50
    backend.train_from_iterator(texts, trainer)
    tokenizer = Tokenizer(backend)
    assert tokenizer.vocab_size <= vocab_size and tokenizer.eos_token_id == 0
    return tokenizer


def metric(server, name: str) -> float:
    """One of the gpt model's custom metrics, read from the server's metrics port."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model, tokenizer, onnx path): the tiny preset with seeded random weights, its static-cache
    fp32 graph (validation is tested in test_onnx_export.py)."""
    import torch

    from export.config import GPTConfig
    from export.model import GPT
    from export.onnx import export_onnx

    torch.manual_seed(TINY_SEED)
    config = GPTConfig.from_preset("tiny")
    model = GPT(config).eval()
    tokenizer = train_tokenizer(config.vocab_size)
    exported = export_onnx(model, tmp_path_factory.mktemp("tiny") / "model.onnx", validate=False)
    return model, tokenizer, exported.path


class Served:
    def __init__(self, model, tokenizer, repository: Path, server):
        self.model, self.tokenizer, self.repository, self.server = model, tokenizer, repository, server

    def reference(self, prompt: str, max_new_tokens: int) -> list[int]:
        from export.model import generate_greedy

        return generate_greedy(self.model, self.tokenizer.encode(prompt), max_new_tokens,
                               eos_token_id=self.model.config.eos_token_id)

    def active_sequences(self) -> float:
        return metric(self.server, "gptpipe_kv_active_sequences")


def _serve_tiny(tiny_export, tmp_path_factory, name: str, **options):
    from serving.repository import ServingOptions, write_repository
    from tests.triton_fixtures import start_server

    model, tokenizer, onnx_path = tiny_export
    repository = write_repository(tmp_path_factory.mktemp(name) / "repo", engine_file=onnx_path,
                                  tokenizer_json=tokenizer.to_str(), model_config=model.config.to_dict(),
                                  options=ServingOptions(max_sequences=8, **options))
    return Served(model, tokenizer, repository, start_server(repository))


@pytest.fixture(scope="session")
def served_session(tiny_export, tmp_path_factory):
    """One real tritonserver for the session, serving the tiny export (8 KV slots) with the plain
    request/response `gpt` (in-flight batching off): the tests that call `gpt` with
    tritonclient's infer() directly, and the HTTP client-side loop, need that flavour.

    With a 2 ms batching window: a tiny-model step takes well under a millisecond, so without
    one, concurrent clients' steps rarely meet in Triton's queue and the batching tests would
    depend on timing luck. (The default window is 0, measured best for real model sizes, where
    steps queue up behind a running engine call; see ServingOptions.)"""
    served = _serve_tiny(tiny_export, tmp_path_factory, "served", inflight_batching=False,
                         max_queue_delay_microseconds=2000)
    yield served
    served.server.stop()


@pytest.fixture(scope="session")
def inflight_session(tiny_export, tmp_path_factory):
    """A second real tritonserver: the tiny export with the default serving options, i.e. a
    decoupled `gpt` with in-flight batching (tests/test_inflight.py)."""
    served = _serve_tiny(tiny_export, tmp_path_factory, "inflight")
    yield served
    served.server.stop()


@pytest.fixture
def inflight(inflight_session, request):
    from tests.triton_fixtures import attach_server_log

    attach_server_log(request, inflight_session.server)
    return inflight_session


@pytest.fixture
def served(served_session, request):
    from tests.triton_fixtures import attach_server_log

    attach_server_log(request, served_session.server)
    return served_session
