"""Hugging Face hub ids (`gpt2`, `openai-community/gpt2`): a snapshot downloaded with
huggingface_hub, or taken from its cache when offline; fails fast where the hub is unreachable."""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

from export.config import PRESETS
from export.load.nanogpt import NANOGPT_SUFFIXES
from export.load.state import RANDOM_SUFFIX, CheckpointError

log = logging.getLogger(__name__)

HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer.json", "vocab.json", "merges.txt"]
HUB_PROBE_TIMEOUT_S = 5.0  # fail fast where the hub is unreachable (DNS black holes hang for minutes)
HUB_ETAG_TIMEOUT_S = 10.0


def looks_like_hub_id(name: str) -> bool:
    """`gpt2`, `openai-community/gpt2`: at most one slash, no path syntax, no file suffix."""
    if name.startswith((".", "/", "~")) or "\\" in name or ".." in name:
        return False
    if name.endswith(NANOGPT_SUFFIXES + (".bin", ".safetensors", ".json")):
        return False  # a file that is not there
    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?", name) is not None


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
                f"or '<preset>-random' ({', '.join(PRESETS)}).{preset_hint(repo_id)}"
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
            f"Pass a local folder instead.{preset_hint(repo_id)}"
        ) from None
    return folder


def preset_hint(name: str) -> str:
    if name in PRESETS:
        return f" ({name!r} is also a preset: '{name}{RANDOM_SUFFIX}' gives its shape with random weights.)"
    return ""
