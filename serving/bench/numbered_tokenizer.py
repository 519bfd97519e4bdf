"""A byte-level BPE tokenizer of any vocabulary size, for random-weight exports that have none (gpt2-random)."""

from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def numbered_tokenizer_json(vocab_size: int, *, eos_token_id: int) -> str:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids, for a random-weight export that
    has no tokenizer of its own (gpt2-random): ids 0-255 are the bytes, `eos_token_id` is
    <|endoftext|>, every other id decodes to " t<id>". Encoding never produces the numbered
    ids (no merges), decoding any id works — what the benchmark (token ids in, and in server
    mode ids detokenized by the `generate` model) needs."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from serving.tokenizer import EOS_TOKEN

    if not 257 <= vocab_size or not 256 <= eos_token_id < vocab_size:
        raise ValueError(f"vocab_size must be >= 257 and eos_token_id in [256, vocab_size), got "
                         f"{vocab_size} and {eos_token_id}")
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    for i in range(256, vocab_size):
        token = EOS_TOKEN if i == eos_token_id else "".join(chars[b] for b in f" t{i}".encode())
        vocab[token] = i
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    return backend.to_str()
