"""Converts a Hugging Face GPT-2 folder (the weights gptpipe exports) into the peers' formats.

Runs inside the peer venv (scripts/install_peers.sh); `serving.peers.convert` calls it:

    python convert.py gguf HF_DIR OUT_DIR [--types f32,q8_0,q4_0] [--threads N]
    python convert.py openvino HF_DIR OUT_DIR [--formats fp32,int8,int4]

gguf: `gguf.GGUFWriter` with `get_tensor_name_map(MODEL_ARCH.GPT2, n_layer)` writes OUT_DIR/f32.gguf
(Conv1D weights transposed to (out, in), the causal-mask buffers `.attn.bias` skipped, the
tokenizer's vocabulary and merges, which llama.cpp insists on); q8_0 / q4_0 come from that file
through llama.cpp's own quantiser (`llama_model_quantize`, its default recipe for the type, as
`llama-quantize` does).
openvino: `optimum-cli export openvino --task text-generation-with-past --weight-format F`, offline,
into OUT_DIR/F/.

A folder with no tokenizer (a random-weights preset) gets a placeholder byte-level BPE of the
model's vocabulary size in OUT_DIR/hf/ (the weights linked, not copied): the peers are fed token
ids, so what the tokens spell never matters, but both converters want a tokenizer.
Prints one JSON line per artefact written: {"kind", "type", "path", "seconds", "bytes"}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
SKIP = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old HF checkpoints
GGUF_TYPES = ("f32", "q8_0", "q4_0")
OV_FORMATS = ("fp32", "int8", "int4")
PLACEHOLDER_EOS = "<|endoftext|>"


def _report(kind: str, type_: str, path: Path, t0: float) -> None:
    size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
    print(json.dumps({"kind": kind, "type": type_, "path": str(path), "seconds": round(time.perf_counter() - t0, 2),
                      "bytes": size}), flush=True)


# ----------------------------------------------------------------------------- tokenizer


def placeholder_tokenizer(vocab_size: int, eos_id: int) -> Any:
    """A byte-level BPE with exactly vocab_size tokens: the 256 byte symbols, then two-symbol
    merges, and <|endoftext|> at eos_id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n_merges = vocab_size - len(alphabet) - 1
    if n_merges < 0 or n_merges > len(alphabet) ** 2:
        raise ValueError(f"vocab_size {vocab_size}: a placeholder byte-level BPE needs 257..{257 + 255 + 256 ** 2}")
    merges = [(a, b) for a in alphabet for b in alphabet][:n_merges]
    texts = alphabet + [a + b for a, b in merges]
    ids = [i for i in range(vocab_size) if i != eos_id]
    vocab = dict(zip(texts, ids))
    vocab[PLACEHOLDER_EOS] = eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(PLACEHOLDER_EOS, special=True)])
    return tok


def with_tokenizer(hf_dir: Path, out_dir: Path) -> Path:
    """hf_dir itself when it has tokenizer.json, else OUT_DIR/hf: links to its files plus a placeholder."""
    if (hf_dir / "tokenizer.json").is_file():
        return hf_dir
    config = json.loads((hf_dir / "config.json").read_text())
    folder = out_dir / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    for item in hf_dir.iterdir():
        link = folder / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    placeholder_tokenizer(config["vocab_size"], config.get("eos_token_id", config["vocab_size"] - 1)).save(
        str(folder / "tokenizer.json"))
    return folder


def _vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, gguf token types, merges "a b") from tokenizer.json."""
    from gguf import TokenType

    data = json.loads((hf_dir / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{hf_dir}/tokenizer.json: a BPE tokenizer is needed, got {model.get('type')}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [int(TokenType.CONTROL if i in special else
                 TokenType.UNUSED if i not in by_id else TokenType.NORMAL) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ValueError(f"{hf_dir}/tokenizer.json has no merges (llama.cpp refuses a GPT-2 vocabulary without them)")
    return tokens, types, merges


# ----------------------------------------------------------------------------- GGUF


def _hf_tensors(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors.numpy import load_file

    path = hf_dir / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: model.safetensors is needed (pytorch_model.bin is not read here)")
    for name, tensor in load_file(str(path)).items():
        yield name, tensor


def write_gguf_f32(hf_dir: Path, path: Path) -> Path:
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    n_layer, vocab_size = config["n_layer"], config["vocab_size"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(hf_dir.name)
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(n_layer)
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = _vocab(hf_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = config.get("eos_token_id", vocab_size - 1)
    writer.add_bos_token_id(config.get("bos_token_id", eos))
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # the prompts are ids, sent as they are

    wte = None
    for hf_name, tensor in _hf_tensors(hf_dir):
        if hf_name.endswith(SKIP):
            continue
        key = hf_name.removeprefix("transformer.")
        if key == "lm_head.weight":
            if wte is not None and np.array_equal(tensor, wte):
                continue  # tied: llama.cpp reuses token_embd as the output matrix
            name = "output.weight"
        else:
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"{hf_name}: no GGUF name for it in the GPT-2 map")
        tensor = tensor.astype(np.float32)
        if hf_name.endswith(CONV1D):
            tensor = np.ascontiguousarray(tensor.T)  # Conv1D (in, out) -> (out, in), as nn.Linear
        if key == "wte.weight":
            wte = tensor
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(src: Path, dst: Path, type_: str, *, threads: int) -> Path:
    import ctypes

    import llama_cpp

    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[type_]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {type_}) returned {rc}")
    return dst


def convert_gguf(hf_dir: Path, out_dir: Path, types: Sequence[str], *, threads: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = with_tokenizer(hf_dir, out_dir)
    f32 = out_dir / "f32.gguf"
    t0 = time.perf_counter()
    write_gguf_f32(hf_dir, f32.with_suffix(".tmp"))
    f32.with_suffix(".tmp").replace(f32)
    _report("gguf", "f32", f32, t0)
    for type_ in types:
        if type_ == "f32":
            continue
        t0 = time.perf_counter()
        path = out_dir / f"{type_}.gguf"
        quantize(f32, path.with_suffix(".tmp"), type_, threads=threads)
        path.with_suffix(".tmp").replace(path)
        _report("gguf", type_, path, t0)


# ----------------------------------------------------------------------------- OpenVINO IR


def convert_openvino(hf_dir: Path, out_dir: Path, formats: Sequence[str], *, timeout_s: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = with_tokenizer(hf_dir, out_dir)
    cli = Path(sys.executable).with_name("optimum-cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for fmt in formats:
        target = out_dir / fmt
        staging = out_dir / f"{fmt}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        t0 = time.perf_counter()
        cmd = [str(cli), "export", "openvino", "--model", str(hf_dir), "--task", "text-generation-with-past",
               "--weight-format", fmt, str(staging)]
        done = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}")
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
        _report("openvino", fmt, target, t0)


def _list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: choose from {','.join(allowed)}; got {text!r}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("gguf", "openvino"))
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help="gguf: f32,q8_0,q4_0")
    parser.add_argument("--formats", default=",".join(OV_FORMATS), help="openvino: fp32,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="openvino: per optimum-cli export")
    args = parser.parse_args(argv)
    if not (args.hf_dir / "config.json").is_file():
        raise SystemExit(f"{args.hf_dir}: not a Hugging Face folder (no config.json)")
    if args.kind == "gguf":
        convert_gguf(args.hf_dir, args.out_dir, _list(args.types, GGUF_TYPES, "--types"), threads=args.threads)
    else:
        convert_openvino(args.hf_dir, args.out_dir, _list(args.formats, OV_FORMATS, "--formats"),
                         timeout_s=args.timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
