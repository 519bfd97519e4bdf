"""The demo model: a small GPT trained offline, in about two minutes on two CPU cores.

In the order it is made: corpus (`pydoc_data.topics`, split into train and held-out topics) →
tokenizer (a byte-level BPE trained on the train split) → recipe (the `demo` preset, AdamW,
cosine learning rate) → train (deterministic training, held-out loss) → cache (trained once per
recipe, saved in the Hugging Face layout with export/load, then loaded). `load_demo()` is the
entry point; export/sources.py's `load_model('demo')` calls it.
"""

from export.demo.cache import DemoResult, default_cache_dir, load_demo, train_demo
from export.demo.corpus import corpus_hash, corpus_topics, demo_texts, heldout_text, split_topics, unwrap
from export.demo.recipe import CODE_VERSION, MIN_LR_RATIO, DemoRecipe, lr_at
from export.demo.tokenizer import load_demo_tokenizer, train_tokenizer
from export.demo.train import heldout_loss, train_model, unigram_loss

__all__ = [
    "CODE_VERSION",
    "MIN_LR_RATIO",
    "DemoRecipe",
    "DemoResult",
    "corpus_hash",
    "corpus_topics",
    "default_cache_dir",
    "demo_texts",
    "heldout_loss",
    "heldout_text",
    "load_demo",
    "load_demo_tokenizer",
    "lr_at",
    "split_topics",
    "train_demo",
    "train_model",
    "train_tokenizer",
    "unigram_loss",
    "unwrap",
]
