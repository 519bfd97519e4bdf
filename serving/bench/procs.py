"""What the suite's child processes (export-model, perf_analyzer) share: the project root, their output's tail."""

from __future__ import annotations

from pathlib import Path


def tail(text: str, lines: int) -> str:
    """The last `lines` lines of a child's output, on one line (for an error message)."""
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def project_root() -> Path:
    """The project's root folder: where `python -m export.cli` runs, and where scripts/ is."""
    return Path(__file__).resolve().parents[2]
