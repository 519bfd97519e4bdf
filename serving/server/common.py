"""What the local process and the Docker launch share: start-up options, errors, the repository
check and GPU detection."""

from __future__ import annotations

from pathlib import Path

# Options every launch gets: load the whole repository at start-up, say "ready" only when
# every model is, and exit (rather than serve half a repository) when a model fails. On stop,
# in-flight requests get a few seconds; open sequences (idle between steps) must not hold it up.
STARTUP_ARGS = (
    "--model-control-mode=none",
    "--strict-readiness=true",
    "--exit-on-error=true",
    "--exit-timeout-secs=5",
)


class TritonServerError(RuntimeError):
    """tritonserver could not be found, started, or did not become ready."""


def check_repository(repository: Path | str) -> list[str]:
    """Names of the models in a Triton repository; ValueError if it is missing or empty."""
    path = Path(repository)
    if not path.exists():
        raise ValueError(f"repository: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"repository: {path} is not a directory")
    models = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())
    if not models:
        raise ValueError(f"repository: {path} holds no model (expected <model>/config.pbtxt in it)")
    return models


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists()
