"""serving.tokenizer against a byte-level BPE trained here (no downloads).

The tokenizer is trained on CPython's own help text (pydoc_data.topics) plus a few
emoji/CJK lines, so it has merges that cut multi-byte characters (e.g. " " + the first
two bytes of an emoji): exactly what the incremental detokenizer must cope with.
"""
from __future__ import annotations

import json
import random

import pytest
import tokenizers
from pydoc_data.topics import topics
from tokenizers import ByteLevelBPETokenizer, decoders, models, pre_tokenizers

from serving.tokenizer import EOS_TOKEN, IncrementalDetokenizer, TextStream, Tokenizer

FFFD = "\ufffd"
UNICODE_LINES = [
    "héllo wörld, naïve café, Ærøskøbing, São Paulo, Kraków, İstanbul",
    "emoji 😀 🎉 👍🏽 🇫🇷 👩‍👩‍👧 ❤️ 🚀",
    "日本語のテキストを書きます。東京は晴れです。",
    "中文字符测试，你好世界。",
    "한국어 텍스트 – Ελληνικά – русский текст",
]
# A text full of characters that byte-level BPE splits across tokens.
MIXED = (
    "Ça va? 😀👍🏽 日本語のテキスト, naïve café — 中文字符 🎉🎉 end.\n"
    "Zürich → Ελληνικά 🇫🇷🚀 東京は晴れ 👩‍👩‍👧 résumé ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 fin"
)


@pytest.fixture(scope="module")
def trained() -> ByteLevelBPETokenizer:
    corpus = list(topics.values()) + UNICODE_LINES * 40
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=1000, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False
    )
    return bpe


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return Tokenizer.from_str(trained._tokenizer.to_str())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHAR = _bytes_to_unicode()


def _byte_tokenizer(extra_tokens: list[bytes]) -> Tokenizer:
    """A byte-level vocabulary: the 256 bytes plus ``extra_tokens``; ids are chosen by hand."""
    vocab = {BYTE_CHAR[b]: b for b in range(256)}
    for tok_bytes in extra_tokens:
        vocab.setdefault(_chars(tok_bytes), len(vocab))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)


def _chars(raw: bytes) -> str:
    return "".join(BYTE_CHAR[b] for b in raw)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


# -- Tokenizer ------------------------------------------------------------------------


def test_round_trip_and_basics(tok):
    texts = [
        topics["if"][:2000],
        MIXED,
        *UNICODE_LINES,
        "  leading and trailing spaces  \n\ttabs\r\n",
        f"one{EOS_TOKEN}two {EOS_TOKEN}",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("") == []
    assert tok.decode([]) == ""
    assert tok.vocab_size == 1000
    assert tok.eos_token_id == tok.token_to_id(EOS_TOKEN) == 0
    # special tokens written in the text are matched, not spelled out (as HF GPT-2)
    assert tok.encode(f"a{EOS_TOKEN}b").count(tok.eos_token_id) == 1
    assert tok.decode(tok.encode(f"a{EOS_TOKEN}b"), skip_special_tokens=True) == "ab"
    # the byte-level tokenizer really splits characters (else the streaming tests are moot)
    assert any(FFFD in tok.decode([i]) for i in tok.encode(MIXED))


def test_eos_absent_is_none():
    assert _byte_tokenizer([]).eos_token_id is None


def test_to_str_from_str_round_trip(tok):
    again = Tokenizer.from_str(tok.to_str())
    assert again.encode(MIXED) == tok.encode(MIXED)
    assert again.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_str("{not json")


def test_from_folder_tokenizer_json_and_vocab_merges_agree(trained, tmp_path):
    json_dir, bpe_dir = tmp_path / "json", tmp_path / "bpe"
    json_dir.mkdir()
    bpe_dir.mkdir()
    trained.save(str(json_dir / "tokenizer.json"))
    trained.save_model(str(bpe_dir))  # vocab.json + merges.txt, GPT-2's layout
    assert sorted(p.name for p in bpe_dir.iterdir()) == ["merges.txt", "vocab.json"]

    a, b = Tokenizer.from_folder(json_dir), Tokenizer.from_folder(bpe_dir)
    assert Tokenizer.from_file(json_dir / "tokenizer.json").encode(MIXED) == a.encode(MIXED)
    for text in [MIXED, topics["for"][:3000], f"x {EOS_TOKEN} y", " 日本語", "😀😀"]:
        assert a.encode(text) == b.encode(text), text
        assert b.decode(b.encode(text)) == text
    assert (a.vocab_size, a.eos_token_id) == (b.vocab_size, b.eos_token_id)


def test_from_folder_added_tokens_json(trained, tmp_path):
    trained.save_model(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": len(vocab)}))
    t = Tokenizer.from_folder(tmp_path)
    assert t.token_to_id("<|pad|>") == len(vocab)
    assert t.encode("a<|pad|>b")[1] == len(vocab)
    # an id that cannot be honoured is an error, not a silent renumbering
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": len(vocab) + 5}))
    with pytest.raises(ValueError, match="<\\|pad\\|>"):
        Tokenizer.from_folder(tmp_path)


def test_from_folder_missing_files_says_what_it_looked_for(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_folder(tmp_path)
    msg = str(err.value)
    assert "tokenizer.json" in msg and "vocab.json" in msg and "merges.txt" in msg
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_bad_ids_and_text_are_rejected(tok):
    for bad in ([tok.vocab_size], [-1], [True], [1.5]):
        with pytest.raises(ValueError, match="token id"):
            tok.decode(bad)
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    import numpy as np

    assert tok.decode(np.array(tok.encode("numpy ids"))) == "numpy ids"


# -- IncrementalDetokenizer ----------------------------------------------------------


def test_stream_never_splits_a_character_and_is_prompt(tok):
    ids = tok.encode(MIXED)
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for n, i in enumerate(ids, start=1):
        delta = detok.push(i)
        assert FFFD not in delta, (n, delta)
        delta.encode("utf-8")  # strict: no lone surrogates either
        emitted += delta
        full = tok.decode(ids[:n])
        # text goes out as soon as it is complete, and only then
        if not full.endswith(FFFD):
            assert emitted == full
        else:
            assert full.startswith(emitted)
    assert detok.flush() == ""
    assert emitted == tok.decode(ids) == MIXED


def test_stream_cost_does_not_grow(tok):
    ids = tok.encode(MIXED + " " + topics["while"]) * 6
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(tok)
    deltas, widest = [], 0
    for i in ids:
        deltas.append(detok.push(i))
        widest = max(widest, detok.window)
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert widest <= 8  # the window: last emitted chunk + pending, never the whole text


def test_stream_with_prompt_context_and_specials(tok):
    prompt = tok.encode("The prompt 😀 ends here")
    cont = tok.encode(" and 日本語 continues") + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(_stream(detok, cont)) == " and 日本語 continues" + EOS_TOKEN
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=True)
    assert "".join(_stream(detok, cont)) == " and 日本語 continues"


def test_invalid_bytes_do_not_stall(tok):
    ff = tok.token_to_id(BYTE_CHAR[0xFF])  # 0xFF never occurs in UTF-8
    ids = [ff] * 20 + tok.encode(" 😀 ok")
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids[:20]]
    assert "".join(deltas).count(FFFD) >= 16  # emitted while still streaming, not at flush
    assert detok.window <= 8
    deltas += [detok.push(i) for i in ids[20:]] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == FFFD * 20 + " 😀 ok"
    assert "".join(deltas[20:]).endswith(" 😀 ok")

    # an emoji cut short stays U+FFFD, and flush() hands it out at the end
    detok = IncrementalDetokenizer(tok)
    partial = tok.encode("ab 😀")[:-1]
    assert tok.decode(partial).endswith(FFFD)
    deltas = _stream(detok, partial)
    assert "".join(deltas) == tok.decode(partial) and deltas[-1].endswith(FFFD)


def test_valid_text_split_mid_character_is_never_cut():
    # 3-byte tokens over 4-byte emoji: a token ends on a character boundary only every
    # 4th token. With max_pending=1 the detokenizer looks for a final boundary after
    # every token and must never take a mid-character one.
    text = "😀🎉🚀👍" * 3
    raw = text.encode("utf-8")
    pieces = [raw[i : i + 3] for i in range(0, len(raw), 3)]
    t = _byte_tokenizer(pieces)
    ids = [t.token_to_id(_chars(p)) for p in pieces]
    assert t.decode(ids) == text
    detok = IncrementalDetokenizer(t, max_pending=1)
    deltas = _stream(detok, ids)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == text
    assert sum(1 for d in deltas if d) == len(raw) // 12  # one delta per 4 tokens


def test_garbage_without_any_final_boundary_is_emitted_at_max_window():
    # tokens b"\x82\xe2": each boundary is E2|82, a valid continuation, so no boundary
    # ever becomes final; only max_window bounds the wait (and the work)
    t = _byte_tokenizer([b"\x82\xe2"])
    tid = t.token_to_id(_chars(b"\x82\xe2"))
    detok = IncrementalDetokenizer(t, max_window=16)
    deltas = []
    for _ in range(40):
        deltas.append(detok.push(tid))
        assert detok.window <= 16 + 5  # pending + a few ids of context
    assert any(deltas)
    deltas.append(detok.flush())
    assert "".join(deltas).count(FFFD) == t.decode([tid] * 40).count(FFFD)


def test_detokenizer_rejects_bad_ids_and_options(tok):
    detok = IncrementalDetokenizer(tok)
    with pytest.raises(ValueError, match="token id"):
        detok.push(tok.vocab_size)
    with pytest.raises(ValueError, match="max_pending"):
        IncrementalDetokenizer(tok, max_pending=0)


# -- TextStream ----------------------------------------------------------------------


def _run(tok, text, stop):
    stream = TextStream(tok, stop=stop)
    pushed = [stream.push(i) for i in tok.encode(text)]
    return stream, pushed, stream.flush()


def test_stop_inside_one_token(tok):
    text = "We should note that the results are good."
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    k = next(k for k, p in enumerate(pieces) if len(p.strip()) >= 3 and k > 2)
    stop = pieces[k].strip()[1:3]  # strictly inside token k
    assert text.find(stop) == sum(map(len, pieces[:k])) + pieces[k].index(stop)
    stream = TextStream(tok, stop=[stop])
    flags = [stream.push(i)[1] for i in ids]
    assert flags.index(True) == k  # detected on the token that contains it
    assert stream.text == text[: text.find(stop)]
    assert stream.flush() == "" and stream.push(ids[0]) == ("", True)


def test_stop_spanning_two_tokens_is_held_back_then_cut(tok):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    k = next(k for k in range(1, len(pieces)) if len(pieces[k - 1]) >= 3 and len(pieces[k]) >= 3)
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    start = sum(map(len, pieces[:k])) - 2
    assert text.find(stop) == start
    stream = TextStream(tok, stop=stop)  # a single string is one stop string
    for i in ids[:k]:
        assert stream.push(i)[1] is False
    assert stream.text == text[:start]  # the possible start of the stop string is held
    delta, stopped = stream.push(ids[k])
    assert stopped and delta == "" and stream.text == text[:start]


def test_stop_at_the_very_start(tok):
    text = "Stop right there."
    stream, pushed, rest = _run(tok, text, ["Stop r"])
    assert stream.stopped and stream.text == "" and rest == ""
    assert all(delta == "" for delta, _ in pushed)


def test_no_stop_flush_gives_the_rest(tok):
    text = "It was the jazz and the fizz"
    stream, pushed, rest = _run(tok, text, ["zzz", "\n\n"])
    assert not stream.stopped
    emitted = "".join(delta for delta, _ in pushed)
    assert emitted == text[:-2] and rest == "zz"  # "zz" could have been the start of "zzz"
    assert stream.text == text


def test_earliest_of_several_stops_wins_and_emoji_stop(tok):
    stream, _, _ = _run(tok, "alpha beta gamma delta", ["delta", "beta", "gam"])
    assert stream.text == "alpha "
    stream, _, _ = _run(tok, MIXED, ["🎉"])
    assert stream.text == MIXED[: MIXED.find("🎉")]


def test_random_stops_match_str_find(tok):
    rng = random.Random(0)
    text = MIXED + " " + topics["with"][:1500]
    ids = tok.encode(text)
    for _ in range(150):
        a = rng.randrange(len(text))
        stop = text[a : a + rng.randint(1, 12)]
        stream = TextStream(tok, stop=[stop, "§never§"])
        out = "".join(stream.push(i)[0] for i in ids) + stream.flush()
        assert out == stream.text == text[: text.find(stop)], repr(stop)
        assert stream.stopped


def test_stop_validation(tok):
    with pytest.raises(ValueError, match="empty"):
        TextStream(tok, stop=["ok", ""])
    with pytest.raises(ValueError, match="must be a string"):
        TextStream(tok, stop=[3])  # type: ignore[list-item]
