"""The demo tokenizer: a byte-level BPE (GPT-2's scheme) trained with `tokenizers` on the train
split, `<|endoftext|>` as special token id 0; deterministic, so it is not cached on disk."""

from __future__ import annotations

import functools
import logging
from typing import Optional

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from export.config import GPTConfig
from export.demo.corpus import corpus_hash, corpus_topics, demo_texts
from serving.tokenizer import EOS_TOKEN, Tokenizer

log = logging.getLogger(__name__)


def train_tokenizer(train_text: str, *, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with <|endoftext|> as id 0, trained on train_text (deterministic)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown text
        show_progress=False,
    )
    # the special token is matched before pre-tokenization, so no merge crosses a topic boundary
    backend.train_from_iterator(train_text.split(EOS_TOKEN), trainer=trainer)
    tok = Tokenizer(backend)
    if tok.eos_token_id != 0:
        raise RuntimeError(f"{EOS_TOKEN} got id {tok.eos_token_id}, expected 0")
    if tok.vocab_size < vocab_size:
        log.warning("the corpus yields only %d BPE tokens of the %d asked for", tok.vocab_size, vocab_size)
    return tok


@functools.lru_cache(maxsize=4)
def _demo_tokenizer(vocab_size: int, corpus: str) -> Tokenizer:
    del corpus  # only part of the lru_cache key: a different corpus is a different tokenizer
    return train_tokenizer(demo_texts()[0], vocab_size=vocab_size)


def load_demo_tokenizer(*, vocab_size: Optional[int] = None) -> Tokenizer:
    """The demo tokenizer (what `load_demo` returns with the model), without the model.

    Training it takes well under a second and is deterministic, so it is not cached on disk."""
    vocab_size = GPTConfig.from_preset("demo").vocab_size if vocab_size is None else vocab_size
    return _demo_tokenizer(vocab_size, corpus_hash(corpus_topics()))
