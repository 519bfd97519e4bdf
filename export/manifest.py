"""manifest.json: what an export produced — config, precision, tensor table, checks, hashes."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from serving.repository import MANIFEST, sha256
from serving.tensors import TensorSpec


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def tensor_table(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]


def artifact_hashes(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under root (the manifest itself excluded)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        if "__pycache__" in path.parts:
            continue
        out[path.relative_to(root).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return out


def build_manifest(root: Path, **fields: Any) -> dict[str, Any]:
    packages = ("gptpipe", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt")
    manifest = {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in fields.items()},
        "versions": {p: v for p in packages if (v := _version(p))} | {"python": platform.python_version()},
        "artifacts": artifact_hashes(root),
    }
    return manifest


def write_manifest(root: Path, **fields: Any) -> Path:
    path = Path(root) / MANIFEST
    path.write_text(json.dumps(build_manifest(Path(root), **fields), indent=2, default=str) + "\n")
    return path
