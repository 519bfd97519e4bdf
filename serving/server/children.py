"""What a tritonserver leaves on the machine: its python-backend stub processes (one per model
instance) and the backend's shared-memory regions in /dev/shm, found by the server's own prefix."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from serving.server.install import STUB_NAME

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# Triton 2.51's python backend names its regions "<prefix><uuid>"; its own default prefix is this.
DEFAULT_SHM_PREFIX = "triton_python_backend_shm_region_"


def new_shm_prefix() -> str:
    """A prefix no other server on this machine uses: this process's pid and a random tag."""
    return f"gptpipe_{os.getpid()}_{secrets.token_hex(4)}_"


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm files whose names start with ``prefix``."""
    if not prefix or "/" in prefix:
        raise ValueError(f"shm prefix: {prefix!r} must be a non-empty file name prefix")
    try:
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:  # no /dev/shm (not Linux)
        return []


def remove_shm_regions(prefix: str) -> list[Path]:
    """Remove the regions of a server that is gone (crashed, killed or stopped); the removed paths."""
    removed = []
    for path in shm_regions(prefix):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed:
        logger.info("removed %d python-backend shm region(s) %s*", len(removed), prefix)
    return removed


def stub_processes(pid: int) -> dict[str, int]:
    """The python-backend stubs of the tritonserver ``pid``: ``{"<model>_<instance>": pid}``.

    A stub's command line is ``stub <repo>/<model>/<version>/model.py <shm region> ...``; the
    instance name comes from the region's order among the model's stubs.
    """
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    stubs: dict[str, int] = {}
    for child in children:
        try:
            cmdline = child.cmdline()
            if not cmdline or Path(cmdline[0]).name != STUB_NAME or len(cmdline) < 2 or child.status() == "zombie":
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        model = Path(cmdline[1]).parent.parent.name
        index = sum(1 for name in stubs if name.rsplit("_", 1)[0] == model)
        stubs[f"{model}_{index}"] = child.pid
    return stubs
