"""The demo corpus: the English help topics of `pydoc_data.topics` (~465 KB, in every CPython),
so the demo needs no download.

The held-out split is whole topics: the topics first in the order of sha256(topic key) until
they hold at least `HELDOUT_FRACTION` of the characters (~5 %). Ordering by a hash of the key,
not by position in the sorted key list, keeps a topic on the same side of the split in every
CPython version, whatever topics it adds. Topics are joined with `<|endoftext|>`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from serving.tokenizer import EOS_TOKEN

HELDOUT_FRACTION = 0.05  # of the corpus characters, as whole topics


def corpus_topics() -> dict[str, str]:
    """The help topics of this CPython: topic key -> English text, paragraphs unwrapped."""
    from pydoc_data.topics import topics

    return {key: unwrap(text) for key, text in topics.items()}


_RULE = re.compile(r"[*=~^-]+")  # a heading's underline


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of prose paragraphs; keep indented blocks (code, grammar)
    line by line. A small model trained on hard-wrapped text spends its capacity guessing
    where a 70-column line breaks, and its greedy output falls into loops of newlines."""
    paragraphs = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if any(line.startswith(" ") or _RULE.fullmatch(line) for line in lines) or not para.strip():
            paragraphs.append(para.strip("\n"))
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(p for p in paragraphs if p)


def split_topics(topics: dict[str, str], *, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train keys, held-out keys), each sorted; disjoint, together all keys.

    Held out: the keys first in sha256 order until they hold >= heldout_fraction of the characters.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(topics) < 2:
        raise ValueError(f"the corpus needs at least 2 topics to split, got {len(topics)}")
    total = sum(len(text) for text in topics.values())
    heldout: list[str] = []
    size = 0
    for key in sorted(topics, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest()):
        if size >= heldout_fraction * total or len(heldout) == len(topics) - 1:
            break
        heldout.append(key)
        size += len(topics[key])
    held = set(heldout)
    return sorted(k for k in topics if k not in held), sorted(heldout)


def join_topics(texts: Sequence[str]) -> str:
    """Topics separated by <|endoftext|>, as GPT-2 separates documents."""
    return EOS_TOKEN.join(texts)


def demo_texts() -> tuple[str, str]:
    """(train text, held-out text): topics in sorted key order, joined with <|endoftext|>."""
    topics = corpus_topics()
    train_keys, heldout_keys = split_topics(topics)
    return join_topics([topics[k] for k in train_keys]), join_topics([topics[k] for k in heldout_keys])


def heldout_text() -> str:
    """The held-out text, never trained on (tokenizer or model): for perplexity checks."""
    return demo_texts()[1]


def corpus_hash(topics: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(topics):
        for part in (key, topics[key]):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no ambiguous joins
    return h.hexdigest()
