"""Triton in Docker: the project's images and the `docker run` command that serves a repository."""

from __future__ import annotations

from pathlib import Path

from serving.engine.contract import TENSORRT_SUFFIXES
from serving.server.common import STARTUP_ARGS
from serving.server.ports import check_port

# Triton 2.51 in both: the local binary of nvidia-pytriton 0.7.0 and this image.
TRITON_BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# The image docker/Dockerfile builds: the base plus this project's python-backend runtime.
DOCKER_IMAGE = "gptpipe-triton:0.1.0"
# docker/Dockerfile.tensorrt: Triton 24.11 (TensorRT 10.6) + gptpipe's TensorRT runtime, for
# repositories whose gpt model is a TensorRT engine (an engine runs only on the TensorRT that built it).
TENSORRT_DOCKER_IMAGE = "gptpipe-triton-trt:0.1.0"
CONTAINER_REPOSITORY = "/models"
# Ports inside the container are Triton's defaults; the host side is configurable.
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def docker_image_for(repository: Path | str) -> str:
    """The TensorRT image when the repository's `gpt` model holds a TensorRT engine
    (``gpt/<version>/*.plan``), else the default image."""
    gpt = Path(repository) / "gpt"
    engines = [p for p in gpt.glob("*/*") if p.suffix in TENSORRT_SUFFIXES and p.is_file()]
    return TENSORRT_DOCKER_IMAGE if engines else DOCKER_IMAGE


def docker_command(
    repository: Path | str,
    *,
    image: str = DOCKER_IMAGE,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
) -> list[str]:
    """``docker run`` for the project's Triton image with ``repository`` mounted at /models.

    The host ports are published on ``host`` only (127.0.0.1 by default); inside the
    container Triton listens on its default ports on all interfaces, as Docker needs.
    """
    ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
    for name, port in ports.items():
        check_port(port, f"{name}_port")
    bind = f"[{host}]" if ":" in host else host
    publish: list[str] = []
    for name, port in ports.items():
        publish += ["-p", f"{bind}:{port}:{CONTAINER_PORTS[name]}"]
    return [
        "docker", "run", "--gpus", "all", "--rm",
        # The python backend exchanges tensors with its stubs through /dev/shm; Docker's
        # default 64 MB is too small for KV caches. Limits as in NVIDIA's Triton docs.
        "--shm-size=1g", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864",
        *publish,
        "-v", f"{Path(repository).resolve()}:{CONTAINER_REPOSITORY}:ro",
        image,
        "tritonserver", f"--model-repository={CONTAINER_REPOSITORY}", *STARTUP_ARGS,
    ]
