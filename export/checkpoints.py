"""Load and save GPT-2 checkpoints.

`load_model(source)` accepts:
- a Hugging Face GPT-2 folder: config.json + model.safetensors (or shards, or pytorch_model.bin);
  HF GPT-2 uses Conv1D, whose weights are stored (in, out): they are transposed for nn.Linear;
- a Hugging Face hub id (`gpt2`, `openai-community/gpt2`), downloaded with huggingface_hub;
- a nanoGPT `ckpt.pt` (`model_args` + `model`, possibly with torch.compile's `_orig_mod.` prefix);
- `demo`: the demo model of export/demo.py;
- `<preset>-random`: a preset's shape with seeded random weights (benchmarks without downloads).

`save_model` writes the Hugging Face layout (model.safetensors with Conv1D (in, out) weights,
config.json, tokenizer.json) that `transformers.GPT2LMHeadModel.from_pretrained` reads.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from export.config import ACTIVATIONS, PRESETS, GPTConfig
from export.model import GPT
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint source that cannot be loaded, with the reason and what is accepted."""


RANDOM_SUFFIX = "-random"
RANDOM_SEED = 0  # `<preset>-random` is deterministic: the same weights on every machine
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer.json", "vocab.json", "merges.txt"]
HUB_PROBE_TIMEOUT_S = 5.0  # fail fast where the hub is unreachable (DNS black holes hang for minutes)
HUB_ETAG_TIMEOUT_S = 10.0
NANOGPT_SUFFIXES = (".pt", ".pth", ".ckpt")
# HF GPT-2's Conv1D stores weights (in, out); nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers, not weights (HF GPT-2 `attn.bias`/`attn.masked_bias`, nanoGPT `attn.bias`)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
GPT2_EOT = 50256  # GPT-2's <|endoftext|>, also nanoGPT's (tiktoken gpt2)
HF_ACTIVATIONS = tuple(ACTIVATIONS)  # the GELUs export/model.py implements


def accepted_sources() -> str:
    presets = ", ".join(f"{name}{RANDOM_SUFFIX}" for name in PRESETS)
    return (
        "accepted sources: a Hugging Face GPT-2 folder (config.json + model.safetensors or "
        "pytorch_model.bin); a nanoGPT checkpoint file (ckpt.pt) or its out_dir; a Hugging Face "
        "hub id (e.g. 'gpt2', 'openai-community/gpt2'); 'demo'; or a preset with random weights: "
        f"{presets}"
    )


# ----------------------------------------------------------------------------- load


def load_model(
    source: PathLike, *, tokenizer: Union[PathLike, Tokenizer, None] = None
) -> tuple[GPT, Optional[Tokenizer]]:
    """The model (eval mode, fp32) and its tokenizer (None where the source has none).

    tokenizer: a tokenizer.json file, a folder with tokenizer.json or vocab.json + merges.txt, or
    a Tokenizer; it replaces the source's own (nanoGPT checkpoints carry none).
    """
    tok = _tokenizer_arg(tokenizer) if tokenizer is not None else None
    name = str(source)
    path = Path(source).expanduser()
    if name == "demo":
        model, own_tok = _load_demo()
    elif name.endswith(RANDOM_SUFFIX) and name[: -len(RANDOM_SUFFIX)] in PRESETS:
        model, own_tok = _random_model(name[: -len(RANDOM_SUFFIX)], tok)
    elif path.is_dir():
        model, own_tok = _load_dir(path, tok)
    elif path.is_file():
        model, own_tok = _load_file(path, tok)
    elif name.endswith(RANDOM_SUFFIX):
        preset = name[: -len(RANDOM_SUFFIX)]
        raise CheckpointError(
            f"unknown preset {preset!r} in {name!r}; presets: {', '.join(PRESETS)}. {accepted_sources()}"
        )
    elif looks_like_hub_id(name):
        model, own_tok = _load_dir(download(name), tok)
    else:
        raise CheckpointError(f"{name!r} is not an existing file or folder. {accepted_sources()}")
    tok = tok if tok is not None else own_tok
    if tok is not None:
        check_tokenizer_fits(tok, model.config)
    model.eval()
    log.info(
        "loaded %s: %d layers, %d heads, n_embd %d, vocab %d, context %d, %.1fM parameters; tokenizer: %s",
        name, model.config.n_layer, model.config.n_head, model.config.n_embd,
        model.config.vocab_size, model.config.n_positions, model.num_parameters() / 1e6,
        "yes" if tok is not None else "none",
    )
    return model, tok


def looks_like_hub_id(name: str) -> bool:
    """`gpt2`, `openai-community/gpt2`: at most one slash, no path syntax, no file suffix."""
    if name.startswith((".", "/", "~")) or "\\" in name or ".." in name:
        return False
    if name.endswith(NANOGPT_SUFFIXES + (".bin", ".safetensors", ".json")):
        return False  # a file that is not there
    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?", name) is not None


def _load_demo() -> tuple[GPT, Optional[Tokenizer]]:
    from export.demo import load_demo  # lazily: the demo module trains a model and is optional here

    model, tok = load_demo()
    return model.float(), tok


def _random_model(preset: str, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    config = GPTConfig.from_preset(preset)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(RANDOM_SEED)
        model = GPT(config)
    own_tok = None
    if tok is None:
        own_tok = _demo_tokenizer_if_fits(config)
    return model, own_tok


def _demo_tokenizer_if_fits(config: GPTConfig) -> Optional[Tokenizer]:
    """Random weights still want a tokenizer to turn text into ids: the demo's, where it fits."""
    if config.vocab_size != PRESETS["demo"]["vocab_size"]:
        return None
    from export.demo import load_demo_tokenizer  # lazily, as in _load_demo

    return load_demo_tokenizer()


def _load_dir(folder: Path, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    if (folder / "config.json").is_file():
        return _load_hf_folder(folder, tok)
    if (folder / "ckpt.pt").is_file():  # a nanoGPT out_dir
        return _load_file(folder / "ckpt.pt", tok)
    raise CheckpointError(
        f"folder {str(folder)!r} has neither config.json (Hugging Face) nor ckpt.pt (nanoGPT). "
        f"{accepted_sources()}"
    )


def _load_file(path: Path, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    if path.name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        raise CheckpointError(
            f"{str(path)!r} is part of a Hugging Face checkpoint: pass its folder {str(path.parent)!r}"
        )
    if not path.name.endswith(NANOGPT_SUFFIXES):
        raise CheckpointError(f"{str(path)!r} is not a checkpoint this loader reads. {accepted_sources()}")
    return _load_nanogpt(path, tok), tok


# ----------------------------------------------------------------------------- Hugging Face


def _load_hf_folder(folder: Path, tok: Optional[Tokenizer]) -> tuple[GPT, Optional[Tokenizer]]:
    own_tok = None if tok is not None else tokenizer_in(folder)
    where = str(folder / "config.json")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {where}: {e}") from None
    config = config_from_hf(hf, where=where, eos_fallback=_eos_of(tok if tok is not None else own_tok))
    raw, weights_file = _read_hf_weights(folder)
    state = to_model_state(raw, config, conv1d=True, source=weights_file)
    log.info("read %d tensors from %s", len(raw), weights_file)
    return build_model(config, state), own_tok


def config_from_hf(hf: Mapping[str, Any], *, where: str, eos_fallback: Optional[int] = None) -> GPTConfig:
    """A GPTConfig from a GPT2Config dict, refusing options export/model.py does not implement."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; only gpt2 is")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise CheckpointError(f"{where}: missing GPT2Config keys {missing}")
    n_embd = hf["n_embd"]
    checks = [  # (key, value, supported?, what is supported)
        ("activation_function", hf.get("activation_function", "gelu_new"),
         lambda v: v in HF_ACTIVATIONS, f"one of {HF_ACTIVATIONS}"),
        ("n_inner", hf.get("n_inner"), lambda v: v is None or v == 4 * n_embd, f"null or 4 * n_embd = {4 * n_embd}"),
        ("scale_attn_weights", hf.get("scale_attn_weights", True), lambda v: v is True, "true"),
        ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False),
         lambda v: v is False, "false"),
        ("add_cross_attention", hf.get("add_cross_attention", False), lambda v: v is False, "false"),
    ]
    for key, value, supported, wanted in checks:
        if not supported(value):
            raise CheckpointError(f"{where}: {key}={value!r} is not supported by this GPT-2 (needs {wanted})")
    vocab_size = hf["vocab_size"]
    try:
        return GPTConfig(
            vocab_size=vocab_size,
            n_positions=hf.get("n_positions", hf.get("n_ctx")),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            bias=True,  # HF GPT-2 always has biases
            activation=hf.get("activation_function", "gelu_new"),
            bos_token_id=_token_id(hf.get("bos_token_id"), vocab_size, eos_fallback, "bos_token_id", where),
            eos_token_id=_token_id(hf.get("eos_token_id"), vocab_size, eos_fallback, "eos_token_id", where),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _token_id(value: Any, vocab_size: int, fallback: Optional[int], field: str, where: str) -> int:
    if isinstance(value, list):  # GPT2Config allows a list of eos ids; GPTConfig holds one
        if len(value) > 1:
            log.warning("%s: %s=%s is a list; using the first", where, field, value)
        value = value[0] if value else None
    if not isinstance(vocab_size, int):
        return 0  # GPTConfig rejects the vocab_size itself, with a clearer message
    if isinstance(value, int) and 0 <= value < vocab_size:
        return value
    if value is not None:
        log.warning("%s: %s=%r is outside the vocabulary (%d)", where, field, value, vocab_size)
    return default_eos(vocab_size, fallback, where=f"{where} ({field})")


def default_eos(vocab_size: int, fallback: Optional[int], *, where: str) -> int:
    """The end-of-text id where a checkpoint names none: the tokenizer's, GPT-2's, or 0."""
    if fallback is not None and 0 <= fallback < vocab_size:
        return fallback
    if GPT2_EOT < vocab_size:
        return GPT2_EOT
    log.warning("%s: no end-of-text token known for vocab %d; using id 0 (pass a tokenizer)", where, vocab_size)
    return 0


def _read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    pt_bin = folder / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(single), str(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            raw: dict[str, torch.Tensor] = {}
            for shard in shards:
                raw.update(load_file(folder / shard))
            return raw, str(index)
        if pt_bin.is_file():
            return _torch_load(pt_bin), str(pt_bin)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files: say which file
        raise CheckpointError(f"cannot read the weights in {str(folder)!r}: {type(e).__name__}: {e}") from None
    raise CheckpointError(
        f"folder {str(folder)!r} has config.json but no weights: expected model.safetensors "
        "(or model.safetensors.index.json with shards) or pytorch_model.bin"
    )


def tokenizer_in(folder: Path) -> Optional[Tokenizer]:
    """The tokenizer saved next to the weights: tokenizer.json, or vocab.json + merges.txt."""
    if (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        try:
            return Tokenizer.from_folder(folder)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the tokenizer in {str(folder)!r}: {e}") from None
    log.info("no tokenizer in %s (no tokenizer.json, no vocab.json + merges.txt)", folder)
    return None


# ----------------------------------------------------------------------------- hub


def hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads its constant at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(endpoint: str, *, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers within timeout_s. The probe runs in a thread because a DNS
    lookup is not bound by socket timeouts and can hang far longer."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an HTTP error status is still an answer
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered and answered[0])


def download(repo_id: str) -> Path:
    """The local snapshot of a hub repo: downloaded, or from the cache when offline."""
    from huggingface_hub import constants, snapshot_download

    reason = None
    if hub_offline():
        reason = "offline mode is on (HF_HUB_OFFLINE)"
    elif not hub_reachable(constants.ENDPOINT):
        reason = f"{constants.ENDPOINT} cannot be reached (no network?)"
    if reason is not None:
        try:
            folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        except Exception:
            raise CheckpointError(
                f"{repo_id!r} looks like a Hugging Face hub id, but {reason} and it is not in the "
                f"local cache. Pass a local folder instead (config.json + model.safetensors), e.g. "
                f"one made elsewhere with `hf download {repo_id}`, or a nanoGPT ckpt.pt, 'demo', "
                f"or '<preset>-random' ({', '.join(PRESETS)}).{_preset_hint(repo_id)}"
            ) from None
        log.info("%s; using the cached snapshot of %s at %s", reason, repo_id, folder)
        return Path(folder)
    log.info("downloading %s from %s", repo_id, constants.ENDPOINT)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=HUB_ETAG_TIMEOUT_S))
        if not any(folder.glob("*.safetensors")):  # older repos ship only pytorch_model.bin
            folder = Path(
                snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"], etag_timeout=HUB_ETAG_TIMEOUT_S)
            )
    except Exception as e:
        raise CheckpointError(
            f"could not download {repo_id!r} from {constants.ENDPOINT}: {type(e).__name__}: {e}. "
            f"Pass a local folder instead.{_preset_hint(repo_id)}"
        ) from None
    return folder


def _preset_hint(name: str) -> str:
    if name in PRESETS:
        return f" ({name!r} is also a preset: '{name}{RANDOM_SUFFIX}' gives its shape with random weights.)"
    return ""


# ----------------------------------------------------------------------------- nanoGPT


def _torch_load(path: Path) -> Any:
    # weights_only: unpickling arbitrary objects runs arbitrary code. nanoGPT's ckpt.pt (model_args,
    # model, optimizer, config, iter_num, best_val_loss) holds only tensors and plain containers.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle at all: garbage, truncated, another format
            reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.S)
            detail = reason.group(1) if reason else type(e).__name__
            raise CheckpointError(
                f"cannot read {str(path)!r}: not a torch.save checkpoint, or a damaged one ({detail})"
            ) from None
        raise CheckpointError(
            f"{str(path)!r} holds a {found.group(1)} object; torch.load(weights_only=True) unpickles "
            "only tensors and plain containers, and this loader will not run arbitrary unpickling "
            "code. nanoGPT's own ckpt.pt is plain data; re-save this one as such, e.g. "
            "torch.save({'model_args': dict(...), 'model': model.state_dict()}, path)."
        ) from None
    except Exception as e:
        raise CheckpointError(f"cannot read {str(path)!r} with torch.load: {type(e).__name__}: {e}") from None


def _load_nanogpt(path: Path, tok: Optional[Tokenizer]) -> GPT:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a nanoGPT checkpoint: expected a dict with 'model_args' and "
            f"'model', got {keys}"
        )
    config = config_from_nanogpt(ckpt["model_args"], where=str(path), eos_fallback=_eos_of(tok))
    state = to_model_state(ckpt["model"], config, conv1d=False, source=str(path))
    log.info("read %d tensors from %s (iter_num %s)", len(ckpt["model"]), path, ckpt.get("iter_num", "?"))
    return build_model(config, state)


def config_from_nanogpt(args: Mapping[str, Any], *, where: str, eos_fallback: Optional[int] = None) -> GPTConfig:
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise CheckpointError(f"{where}: model_args lacks {missing}")
    vocab_size = args["vocab_size"]
    try:
        eos = default_eos(vocab_size, eos_fallback, where=where) if isinstance(vocab_size, int) else 0
        return GPTConfig(
            vocab_size=vocab_size,
            n_positions=args["block_size"],
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            n_embd=args["n_embd"],
            bias=bool(args.get("bias", True)),
            activation="gelu",  # nanoGPT's MLP uses the exact (erf) GELU
            bos_token_id=eos,
            eos_token_id=eos,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- shared


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def canonical_name(key: str) -> str:
    """Our state-dict name for a checkpoint key (wrapper prefixes off, `transformer.` on)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    if key == "lm_head.weight" or key.startswith("transformer."):
        return key
    return "transformer." + key  # GPT2Model checkpoints (the hub's gpt2) have no prefix


def to_model_state(
    raw: Mapping[str, torch.Tensor], config: GPTConfig, *, conv1d: bool, source: str
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our state dict (fp32, nn.Linear layout), checked against config.

    conv1d: the checkpoint stores the four projection weights (in, out) (HF GPT-2)."""
    expected = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    lm_head: Optional[tuple[str, torch.Tensor]] = None
    for key, tensor in raw.items():
        name = canonical_name(key)
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight":
            lm_head = (key, tensor)
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        transpose = conv1d and name.endswith(CONV1D_WEIGHTS)
        want = expected[name][::-1] if transpose else expected[name]  # in the checkpoint's layout
        if tuple(tensor.shape) != want:
            raise CheckpointError(_shape_message(source, key, want, tuple(tensor.shape), config, transpose))
        tensor = tensor.t() if transpose else tensor
        state[name] = tensor.to(torch.float32).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {sorted(unexpected)}")
        raise CheckpointError(f"{source}: {'; '.join(parts)} (config: {_shape_summary(config)})")
    if lm_head is not None:
        _check_tied(lm_head, state["transformer.wte.weight"], source)
    return state


def _check_tied(lm_head: tuple[str, torch.Tensor], wte: torch.Tensor, source: str) -> None:
    key, tensor = lm_head
    if tuple(tensor.shape) != tuple(wte.shape):
        raise CheckpointError(
            f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(wte.shape)} (tied with wte)"
        )
    if not torch.equal(tensor.to(torch.float32), wte):
        raise CheckpointError(
            f"{source}: {key!r} differs from the token embedding; this GPT-2 ties the LM head to "
            "transformer.wte.weight and cannot hold a separate one"
        )


def _shape_summary(config: GPTConfig) -> str:
    return (
        f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
        f"vocab_size={config.vocab_size}, n_positions={config.n_positions}"
    )


def _shape_message(
    source: str, key: str, want: tuple[int, ...], got: tuple[int, ...], config: GPTConfig, transpose: bool
) -> str:
    layout = " (Conv1D layout: (in, out))" if transpose else ""
    return (
        f"{source}: tensor {key!r} has shape {got}, expected {want}{layout} for the config "
        f"({_shape_summary(config)})"
    )


def build_model(config: GPTConfig, state: Mapping[str, torch.Tensor]) -> GPT:
    """A GPT holding exactly `state` (already checked): built on the meta device, so the random
    init of a large model is skipped, then the tensors are assigned."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_arg(tokenizer: Union[PathLike, Tokenizer]) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = Path(tokenizer).expanduser()
    try:
        if path.is_dir():
            return Tokenizer.from_folder(path)
        if path.is_file():
            return Tokenizer.from_file(path)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer {str(path)!r}: {type(e).__name__}: {e}") from None
    raise CheckpointError(
        f"tokenizer {str(tokenizer)!r} is not an existing file or folder: pass a tokenizer.json "
        "or a folder with tokenizer.json or vocab.json + merges.txt"
    )


def _eos_of(tok: Optional[Tokenizer]) -> Optional[int]:
    return None if tok is None else tok.eos_token_id


def check_tokenizer_fits(tok: Tokenizer, config: GPTConfig) -> None:
    """Every id the tokenizer can produce must have an embedding row (the model may have more)."""
    size = tok.vocab_size
    if size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}: "
            "they do not belong together"
        )


# ----------------------------------------------------------------------------- save


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2 names and layout (Conv1D (in, out)); zero biases where the
    model has none (HF GPT-2 always has them, and a zero bias is no bias).

    lm_head.weight is left out, as in HF's own tied GPT-2 checkpoints: safetensors refuses
    tensors that share memory, and from_pretrained re-ties the head to wte."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out[name] = tensor.contiguous().clone()  # own storage: no views of the live model
    if not config.bias:
        dtype = model.transformer.wte.weight.dtype
        for name, shape in expected_shapes(GPTConfig(**{**config.to_dict(), "bias": True})).items():
            if name not in out:
                out[name] = torch.zeros(shape, dtype=dtype)
    return out


def hf_config(config: GPTConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A GPT2Config dict (the keys and defaults of the published gpt2 config.json)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,  # the old name, still read by some tools
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": config.activation,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_model(model: GPT, tokenizer: Optional[Tokenizer], folder: PathLike) -> Path:
    """Write `folder` in the Hugging Face GPT-2 layout; `load_model(folder)` and
    `GPT2LMHeadModel.from_pretrained(folder)` both read it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    dtype = model.transformer.wte.weight.dtype
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})  # transformers wants the format
    (folder / "config.json").write_text(json.dumps(hf_config(model.config, dtype=dtype), indent=2) + "\n")
    if tokenizer is not None:
        (folder / "tokenizer.json").write_text(tokenizer.to_str())
    log.info(
        "saved %d tensors (%s) to %s%s", len(state), str(dtype).removeprefix("torch."), folder,
        " with tokenizer.json" if tokenizer is not None else "",
    )
    return folder
