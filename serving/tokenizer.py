"""Tokenizer, incremental detokenizer and stop strings, on Hugging Face `tokenizers`.

Runs in the client and inside Triton python-backend models; no torch.

* ``Tokenizer``: a byte-level BPE (GPT-2 style) ``tokenizers.Tokenizer`` with the few
  calls the project needs; loads ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.
* ``IncrementalDetokenizer``: token ids in, text deltas out. Byte-level BPE splits
  multi-byte characters (emoji, CJK) across tokens; a delta never carries half of one.
  Uses the prefix_offset/read_offset scheme of TGI and vLLM: decode a short window of
  ids and emit only when its text does not end in U+FFFD.
* ``TextStream``: the detokenizer plus stop strings, holding back text that could still
  turn into a stop string.

Special tokens: ``encode`` matches special tokens written in the text (GPT-2's
"<|endoftext|>" becomes its id, as in Hugging Face's GPT-2 tokenizer), and ``decode``
keeps them by default, so ``decode(encode(text)) == text``. Generation loops stop on
the EOS id before pushing it to a stream.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "IncrementalDetokenizer", "TextStream", "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
_CONTEXT = 5  # emitted ids kept in the decode window as context (as TGI/vLLM)
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode puts where bytes are missing/invalid


class Tokenizer:
    """Byte-level BPE tokenizer; ``encode`` adds no special tokens (GPT-2 has none to add)."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id: int | None = backend.token_to_id(EOS_TOKEN)
        self._max_token_bytes: int | None = None

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls.from_str(path.read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_str(cls, json_text: str, *, source: str = "JSON text") -> Tokenizer:
        """Load from the text of a ``tokenizer.json`` (e.g. sent by the Triton ``tokenizer`` model)."""
        if not isinstance(json_text, str):
            raise TypeError(f"json_text must be str, got {type(json_text).__name__}")
        try:
            backend = tokenizers.Tokenizer.from_str(json_text)
        except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
            raise ValueError(f"not a valid tokenizer.json ({source}): {exc}") from exc
        return cls(backend)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load ``folder/tokenizer.json``, or else GPT-2's ``vocab.json`` + ``merges.txt``.

        The vocab/merges pair becomes a byte-level BPE with GPT-2's pre-tokenizer,
        post-processor and decoder; "<|endoftext|>" (if in the vocab) and any entries
        of ``added_tokens.json`` become special tokens, as Hugging Face loads GPT-2.
        """
        folder = Path(folder)
        tokenizer_json = folder / "tokenizer.json"
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if tokenizer_json.is_file():
            return cls.from_file(tokenizer_json)
        if vocab.is_file() and merges.is_file():
            return cls(_byte_level_bpe(vocab, merges, folder / "added_tokens.json"))
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"no tokenizer in {folder}: looked for tokenizer.json, or vocab.json together "
            f"with merges.txt (found: {found})"
        )

    # -- use ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added. "" gives []."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half an emoji) decodes to U+FFFD."""
        ids = self.check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        """ids as a list of ints in [0, vocab_size); raises ValueError otherwise.

        ``tokenizers`` silently drops unknown ids when decoding; we refuse them.
        """
        out = []
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise ValueError(f"token ids must be ints, got {i!r} ({type(i).__name__})")
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id must be in [0, {self.vocab_size}) (vocab size), got {i}")
            out.append(i)
        return out

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token of the vocabulary decodes to (computed once). A text
        of N bytes has at least N / max_token_bytes tokens: what lets a too-long prompt be
        refused before it is tokenized (serving.request_rules.check_prompt_bytes). A token that
        is part of a character decodes to U+FFFD (3 bytes), never fewer bytes than it has."""
        if self._max_token_bytes is None:
            texts = self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
            self._max_token_bytes = max(1, max(len(t.encode("utf-8", errors="surrogatepass")) for t in texts))
        return self._max_token_bytes

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def to_str(self) -> str:
        """The tokenizer.json text; ``Tokenizer.from_str(t.to_str())`` gives the same ids."""
        return self.backend.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def _byte_level_bpe(vocab: Path, merges: Path, added_tokens: Path) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from its vocab.json + merges.txt (what HF's GPT2TokenizerFast builds)."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    special: dict[str, int | None] = {}
    if backend.token_to_id(EOS_TOKEN) is not None:
        special[EOS_TOKEN] = backend.token_to_id(EOS_TOKEN)
    if added_tokens.is_file():
        table = json.loads(added_tokens.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            raise ValueError(f"{added_tokens} must map token -> id, got {type(table).__name__}")
        # ascending ids: new tokens are appended in order, so ids line up with the file
        special.update(sorted(table.items(), key=lambda kv: kv[1]))
    for token, expected in special.items():
        backend.add_special_tokens([token])
        got = backend.token_to_id(token)
        if expected is not None and got != expected:
            raise ValueError(
                f"special token {token!r}: {added_tokens.name} says id {expected}, "
                f"but it got id {got} after the {backend.get_vocab_size()} vocab entries"
            )
    return backend


class IncrementalDetokenizer:
    """Token ids in, text deltas out; a delta never ends in half a UTF-8 character.

    prefix_offset/read_offset (TGI, vLLM): ``ids[prefix:read]`` is text already
    emitted, kept as context; ``ids[read:]`` is pending. Each push decodes
    ``ids[prefix:]`` and emits what it adds to ``decode(ids[prefix:read])``, unless
    that text ends in U+FFFD (an incomplete character: wait for its next bytes). Only
    this window is kept, so a push costs the same after 10 or 10 000 tokens.

    Genuinely invalid bytes would stall that scheme forever (the text keeps ending in
    U+FFFD). So once ``max_pending`` tokens are pending, the latest token boundary
    where the bytes before it can no longer change is looked for: one where
    ``decode(a) + decode(b) == decode(a + b)`` (a lossy UTF-8 decoder merges an
    incomplete tail with the next byte exactly when that byte continues it, so once
    the next byte is known, the tail's U+FFFD is final). Everything up to there is
    emitted. Valid text split across tokens never has such a boundary, so it is never
    cut; only if ``max_window`` tokens are pending without one (garbage bytes) is all
    of it emitted. ``flush()`` emits whatever is left at the end.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
        max_pending: int = 4,
        max_window: int = 32,
    ) -> None:
        if not 1 <= max_pending <= max_window:
            raise ValueError(
                f"need 1 <= max_pending <= max_window, got max_pending={max_pending}, "
                f"max_window={max_window}"
            )
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max_pending
        self.max_window = max_window
        # the prompt's last few ids are context only (some decoders treat the start of
        # a sequence specially, e.g. drop a leading space); they are never emitted
        context = tokenizer.check_ids(prompt_ids)[-_CONTEXT:]
        if self._decode(context).endswith(_REPLACEMENT):
            context = []  # the prompt ends mid-character: no clean point to start from
        self._ids: list[int] = context  # the window, ids[prefix_offset:]
        self._read = len(context)  # window index of the first pending id
        self._prefix_text = self._decode(context)  # decode(window[:read]), already emitted

    @property
    def window(self) -> int:
        """Ids held (already-emitted context + pending); bounded, whatever the length."""
        return len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.backend.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _advance(self, read: int, read_text: str) -> str:
        """Emit window[:read] (decoding to read_text); the window then starts at the old read."""
        delta = read_text[len(self._prefix_text) :]
        # context: what was just emitted, at most _CONTEXT ids of it. Starting the window
        # mid-character is fine: window[:read] ends on a final boundary, so decode(window)
        # still starts with decode(window[:read]).
        start = max(self._read, read - _CONTEXT)
        self._ids = self._ids[start:]
        self._read = read - start
        self._prefix_text = self._decode(self._ids[: self._read])
        return delta

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self._ids.extend(self.tokenizer.check_ids((token_id,)))
        text = self._decode(self._ids)
        if not text.endswith(_REPLACEMENT) and len(text) > len(self._prefix_text):
            return self._advance(len(self._ids), text)
        pending = len(self._ids) - self._read
        if pending < self.max_pending:
            return ""
        for end in range(len(self._ids) - 1, self._read, -1):  # latest final boundary
            head = self._decode(self._ids[:end])
            if head.startswith(self._prefix_text) and head + self._decode(self._ids[end:]) == text:
                return self._advance(end, head)
        if pending < self.max_window:
            return ""
        logger.warning("%d pending tokens do not decode to valid text; emitting them", pending)
        return self.flush()

    def flush(self) -> str:
        """Emit everything pending, incomplete characters as U+FFFD. Call at the end."""
        if len(self._ids) == self._read:
            return ""
        return self._advance(len(self._ids), self._decode(self._ids))


class TextStream:
    """Detokenized text with stop strings cut off.

    ``push(token_id) -> (delta, stopped)``. Text that could still be the start of a stop
    string is held back until it cannot, so a stop string spread over several tokens is
    found too; the emitted text (``.text``) never contains a stop string or anything
    after it. Once stopped, further pushes return ("", True).

    ``push(token_id, find_stops=False)`` adds text in which no stop string is looked for
    (vLLM's ``min_tokens``: the first tokens' text is not searched); a later stop string
    may still start in it, as long as it ends in text pushed with ``find_stops``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: str | Sequence[str] = (),
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ) -> None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        for i, s in enumerate(stops):
            if not isinstance(s, str):
                raise ValueError(f"stop[{i}] must be a string, got {type(s).__name__}")
            if not s:
                raise ValueError(f"stop[{i}] is empty: stop strings must be non-empty")
        self.stop = stops
        self.stopped = False
        self.text = ""  # everything emitted so far
        self._held = ""  # text not emitted yet: it may be the start of a stop string
        self._quiet = 0  # the first chars of _held were pushed with find_stops=False
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens
        )

    def push(self, token_id: int, *, find_stops: bool = True) -> tuple[str, bool]:
        """Add one token; return (text safe to show now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        return self._emit(self._detok.push(token_id), final=False, find=find_stops), self.stopped

    def flush(self, *, find_stops: bool = True) -> str:
        """At the end of generation: the held-back and pending text (stop strings still cut)."""
        if self.stopped:
            return ""
        return self._emit(self._detok.flush(), final=True, find=find_stops)

    def _emit(self, new_text: str, *, final: bool, find: bool = True) -> str:
        buf = self._held + new_text
        # a stop string counts only where it ends past the quiet text
        hits = [i for i in (buf.find(s, max(0, self._quiet - len(s) + 1)) for s in self.stop) if i >= 0] \
            if find else []
        if hits:
            out, self._held, self.stopped = buf[: min(hits)], "", True
        elif final:
            out, self._held = buf, ""
        else:
            keep = self._partial_stop_len(buf)
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self._quiet = max(0, self._quiet - len(out)) if find else len(self._held)
        self.text += out
        return out

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
