"""The suite's exports: `export-model` in a child process, reused when the same export is already there."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from serving.bench.procs import project_root, tail
from serving.bench.progress import Progress, timed

logger = logging.getLogger(__name__)


def export_repository(source: str, *, precision: str, out: Path, tokenizer: Optional[Path] = None,
                      log: Optional[Path] = None, max_batch_size: int = 8) -> tuple[Path, bool]:
    """`export-model --model SOURCE --precision P --output OUT` in a child process (its memory
    — a 124M model, its graph, the validation — goes back when it exits); the output goes to
    `log`. An export already in OUT from the same source and precision is reused.
    Returns (repository, reused)."""
    import subprocess
    import sys

    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        served_tokenizer = out / "tokenizer" / "1" / "tokenizer.json"
        same_tokenizer = tokenizer is None or (
            served_tokenizer.is_file() and served_tokenizer.read_bytes() == Path(tokenizer).read_bytes())
        if m.get("source") == source and m.get("precision") == precision and same_tokenizer:
            logger.info("reusing the export in %s (%s, %s)", out, source, precision)
            return out, True
    cmd = [sys.executable, "-m", "export.cli", "--model", source, "--precision", precision, "--output", str(out),
           "--max-batch-size", str(max_batch_size), "--force"]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=project_root())
    if log is not None:
        log.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"export-model --model {source} --precision {precision} failed (exit "
                           f"{proc.returncode}): {tail(proc.stdout + proc.stderr, 5)}")
    return out, False


def export_all(models: Sequence[tuple[str, str, str]], out_dir: Path, *, tokenizer: Optional[Path],
               progress: Progress, timings: dict[str, float], notes: list[str]) -> dict[str, Path]:
    repos = {}
    for name, source, precision in models:
        progress.start(f"export-model --model {source} --precision {precision}", 1)
        with timed() as elapsed:
            repos[name], reused = export_repository(source, precision=precision, out=out_dir / "repos" / name,
                                                    tokenizer=tokenizer, log=out_dir / f"export_{name}.log")
        timings[f"export_{name}_s"] = elapsed()
        if reused:
            notes.append(f"export {name} reused from an earlier run ({out_dir / 'repos' / name})")
        progress.advance()
    return repos
