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


# Header names Triton checks on restricted APIs: HTTP headers as they are; gRPC metadata keys get
# Triton's prefix "triton-grpc-protocol-" (GRPC_KEY_PREFIX).
ADMIN_KEY_HEADER = "admin-key"  # the same header as deploy/k8s
API_KEY_HEADER = "api-key"
GRPC_KEY_PREFIX = "triton-grpc-protocol-"
# What reads or changes the server itself rather than running a model. Not model-config: like
# metadata, it is what every client reads to call a model right (the gptpipe client reads `gpt`'s
# transaction policy, perf_analyzer its batching), and it is read-only.
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
# What --api-key restricts: inference (and a stream's steps); health and metadata stay open, so
# load balancers and probes keep working.
API_KEY_APIS = ("inference",)


def restricted_api_args(admin_key: str | None, api_key: str | None) -> list[str]:
    """tritonserver options restricting the admin APIs to ``admin_key`` and inference to ``api_key``."""
    args = []
    for key, header, apis, field in ((admin_key, ADMIN_KEY_HEADER, ADMIN_APIS, "admin_key"),
                                     (api_key, API_KEY_HEADER, API_KEY_APIS, "api_key")):
        if key is None:
            continue
        if not isinstance(key, str) or len(key) < 16 or not key.isascii() or not key.isprintable() or any(
                c in key for c in " ,:="):
            raise ValueError(f"{field}: must be at least 16 printable ASCII characters without spaces, ',', ':' "
                             "or '='")
        setting = f"{','.join(apis)}:{header}={key}"
        args += [f"--http-restricted-api={setting}", f"--grpc-restricted-protocol={setting}"]
    return args


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
